"""A chat turn that does not finish leaves no trace: the session answers the next question with
the very tokens of a fresh session that replays the finished turns.

Run on `context_model_dir`, whose greedy answers depend on the whole conversation; each test also
shows that a session keeping the unfinished turn's keys/values would answer differently, so it
can fail.
"""

from __future__ import annotations

import gc
import io
import time
import types
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from llava_edge.errors import ChatFull, LlavaEdgeError, PromptTooLong
from llava_edge.runtime import Pipeline, TextStream
from llava_edge.runtime.interactive import chat_loop
from llava_edge.runtime.kv_cache import KVCache

FIRST, UNFINISHED, NEXT = "What is in the picture?", "Where is the red thing?", "And then?"
OPTIONS = dict(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def pipe(context_model_dir):
    with Pipeline.load(context_model_dir, threads=1) as p:
        yield p


def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (50, 60, 3), np.uint8)


class Faulty:
    """The pipeline's backend, with `hook(call)` run after each of its decoder calls."""

    def __init__(self, backend, hook: Callable[[int], None]):
        self.backend, self.hook, self.calls = backend, hook, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def decode(self, *args):
        logits = self.backend.decode(*args)  # the cache has advanced: then the fault
        self.calls += 1
        self.hook(self.calls)
        return logits


def fail_at(call: int) -> Callable[[int], None]:
    def hook(n: int) -> None:
        if n == call:
            raise RuntimeError("the accelerator fell over")

    return hook


def stall_at(call: int, seconds: float) -> Callable[[int], None]:
    def hook(n: int) -> None:
        if n == call:
            time.sleep(seconds)

    return hook


def unfinished(pipe: Pipeline, chat, how: str, monkeypatch) -> TextStream | None:
    """Ask UNFINISHED in `chat` and leave the turn unfinished in the way `how` names; return the
    stream where it is left open."""
    if how == "break":
        for _ in chat.stream(UNFINISHED):
            break  # the stream is dropped with the loop
    elif how == "dropped":
        stream = chat.stream(UNFINISHED)
        next(stream)
        del stream  # garbage: its generator is closed by the collector
        gc.collect()
    elif how == "close":
        stream = chat.stream(UNFINISHED)
        next(stream)
        stream.close()
        with pytest.raises(LlavaEdgeError, match="abandoned"):
            next(stream)
    elif how == "raised":
        monkeypatch.setattr(pipe, "backend", Faulty(pipe.backend, fail_at(4)))
        with pytest.raises(RuntimeError, match="fell over"):
            chat.ask(UNFINISHED)
        monkeypatch.undo()
    elif how == "timed out":
        monkeypatch.setattr(pipe, "backend", Faulty(pipe.backend, stall_at(4, 1.2)))
        monkeypatch.setattr(pipe.limits, "timeout_s", 1.0)
        with pytest.raises(LlavaEdgeError, match="time limit"):
            "".join(chat.stream(UNFINISHED))
        monkeypatch.undo()
    elif how == "out of memory":  # growing the cache fails half-way: keys grown, values not
        layers, real, calls = pipe.manifest.text.num_layers, KVCache._grown, []

        def grown(cache, *args):
            calls.append(args)
            if len(calls) == layers + 1:
                raise MemoryError
            return real(cache, *args)

        monkeypatch.setattr(KVCache, "_grown", grown)
        with pytest.raises(MemoryError):
            chat.ask(UNFINISHED, max_new_tokens=pipe.max_context)
        monkeypatch.undo()
    elif how == "superseded":
        stream = chat.stream(UNFINISHED)
        next(stream)
        return stream  # still open when the next turn starts
    else:  # pragma: no cover
        raise AssertionError(how)
    return None


HOWS = ["break", "dropped", "close", "raised", "timed out", "out of memory", "superseded"]


@pytest.mark.parametrize("how", HOWS)
def test_an_unfinished_turn_is_rolled_back_whole(pipe, how, monkeypatch):
    fresh = pipe.chat(frame(), **OPTIONS)
    fresh.ask(FIRST)
    want = fresh.stream(NEXT)
    want_text = "".join(want)

    chat = pipe.chat(frame(), **OPTIONS)
    chat.ask(FIRST)
    before = (list(chat.ids), chat.fed, chat.cache.length)
    left_open = unfinished(pipe, chat, how, monkeypatch)
    if left_open is None:  # rolled back at once; an open one when the next turn starts
        assert (chat.ids, chat.fed, chat.cache.length) == before
    got = chat.stream(NEXT)
    assert "".join(got) == want_text
    assert got.answer.token_ids == want.answer.token_ids
    assert chat.ids == fresh.ids and chat.fed == fresh.fed == chat.cache.length
    if left_open is not None:
        with pytest.raises(LlavaEdgeError, match="abandoned"):
            next(left_open)


def test_a_session_that_kept_the_unfinished_turn_would_answer_otherwise(pipe, monkeypatch):
    """Without the rollback the next answer changes: the model reads the whole conversation."""
    fresh = pipe.chat(frame(), **OPTIONS)
    fresh.ask(FIRST)
    want = fresh.stream(NEXT)
    "".join(want)
    from llava_edge.runtime.pipeline import _Turn

    # the session as it was without the rollback: the turn's keys/values stay in the cache
    monkeypatch.setattr(_Turn, "rollback", lambda self: None)
    stale = pipe.chat(frame(), **OPTIONS)
    stale.ask(FIRST)
    for _ in stale.stream(UNFINISHED):
        break
    got = stale.stream(NEXT)
    "".join(got)
    assert got.answer.token_ids != want.answer.token_ids


def test_a_first_turn_rolled_back_asks_about_the_image_again(pipe):
    chat = pipe.chat(frame(), **OPTIONS)
    for _ in chat.stream(UNFINISHED):
        break
    assert (chat.ids, chat.fed, chat.cache.length) == ([], 0, 0)
    assert chat.ask(FIRST) == pipe.chat(frame(), **OPTIONS).ask(FIRST)


def test_a_long_turn_rolled_back_gives_its_memory_back(pipe):
    """The buffers a long abandoned answer grew shrink back to what the finished turns need."""
    chat = pipe.chat(frame(), **OPTIONS)
    chat.ask(FIRST)
    capacity = chat.cache.capacity
    stream = chat.stream(UNFINISHED, max_new_tokens=pipe.max_context, ignore_eos=True)
    for _ in stream:
        if chat.cache.capacity >= 2 * capacity + chat.cache.chunk:
            break
    assert chat.cache.capacity >= 2 * capacity + chat.cache.chunk  # the turn did grow them
    stream.close()
    assert chat.cache.capacity == capacity
    fresh = pipe.chat(frame(), **OPTIONS)
    fresh.ask(FIRST)
    assert chat.ask(NEXT) == fresh.ask(NEXT)  # the smaller buffers kept the finished turn


def test_a_turn_never_iterated_changes_nothing(pipe):
    chat = pipe.chat(frame(), **OPTIONS)
    chat.ask(FIRST)
    before = (list(chat.ids), chat.fed, chat.cache.length)
    chat.stream(UNFINISHED)  # created, never read, dropped
    stream = chat.stream(UNFINISHED)
    stream.close()
    assert (chat.ids, chat.fed, chat.cache.length) == before
    with pytest.raises(LlavaEdgeError, match="abandoned"):
        next(stream)


def test_chat_command_loop_keeps_a_usable_session_after_a_timeout(pipe, monkeypatch):
    """`llava-edge chat --timeout`: the question that timed out is forgotten, the chat goes on."""
    fresh = pipe.chat(frame(), **OPTIONS)
    fresh.ask(FIRST)
    want = fresh.ask(NEXT)

    faulty = Faulty(pipe.backend, lambda n: None)
    monkeypatch.setattr(pipe, "backend", faulty)
    monkeypatch.setattr(pipe.limits, "timeout_s", 1.0)
    lines = iter([FIRST, UNFINISHED, NEXT, "/quit"])

    def read(_prompt: str) -> str:
        line = next(lines)
        # only the second question stalls, on its fourth decoder call
        faulty.hook = stall_at(faulty.calls + 4, 1.2) if line == UNFINISHED else (lambda n: None)
        return line

    out = io.StringIO()
    chat_loop(pipe, frame(), OPTIONS, read=read, out=out)
    text = out.getvalue()
    assert text.endswith("\n" + want + "\n")
    assert "\nerror: the request ran past its time limit" in text  # on a line of its own


def test_chat_command_loop_resets_to_the_last_image_that_opened(pipe, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(frame()).save(good)
    lines = iter([f"/image {good}", f"/image {tmp_path / 'missing.png'}", "/reset", FIRST, "/quit"])
    out = io.StringIO()
    chat_loop(pipe, None, OPTIONS, read=lambda _prompt: next(lines), out=out)
    text = out.getvalue()
    assert text.count("does not exist") == 1  # the bad image, not the /reset after it
    assert text.endswith("(new conversation)\n" + pipe.chat(good, **OPTIONS).ask(FIRST) + "\n")


def test_chat_command_with_a_bad_image_fails_before_its_greeting(pipe, tmp_path):
    """`chat --image missing.png` greeted ("Ask about the image.") and then failed: the one line
    a bad input gets must be the error alone."""
    out = io.StringIO()
    with pytest.raises(LlavaEdgeError, match="does not exist"):
        chat_loop(pipe, str(tmp_path / "missing.png"), OPTIONS, read=lambda _prompt: "", out=out)
    assert out.getvalue() == ""


def test_chat_command_help_says_whether_an_image_is_in_the_conversation(pipe, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(frame()).save(good)
    lines = iter(["/help", f"/image {good}", "/help", "/quit"])
    out = io.StringIO()
    chat_loop(pipe, None, OPTIONS, read=lambda _prompt: next(lines), out=out)
    greeting, first_help, _, second_help = out.getvalue().splitlines()
    assert greeting == first_help and greeting.startswith("Ask anything (no image).")
    assert second_help.startswith("Ask about the image.")


def test_chat_command_image_paths_as_a_terminal_pastes_them(pipe, tmp_path, monkeypatch):
    """A file dropped into a terminal is pasted quoted ('/path/my photo.png'), and ~ is the home
    dir: both were read as part of the file name ("does not exist")."""
    monkeypatch.setenv("HOME", str(tmp_path))
    good = tmp_path / "my photo.png"
    Image.fromarray(frame()).save(good)
    for pasted in (f"'{good}' ", f'"{good}"', "~/my photo.png"):
        lines = iter([f"/image {pasted}", FIRST, "/quit"])
        out = io.StringIO()
        chat_loop(pipe, None, OPTIONS, read=lambda _prompt, lines=lines: next(lines), out=out)
        text = out.getvalue()
        assert "error" not in text, text
        assert text.endswith(f"about {good})\n" + pipe.chat(good, **OPTIONS).ask(FIRST) + "\n")


def test_chat_command_ctrl_c_mid_answer_ends_the_answers_line(pipe, monkeypatch):
    """Ctrl-C leaves `llava-edge chat`; the partial answer's line ends first, so "interrupted"
    is not glued to it."""
    lines = iter([FIRST])
    real = pipe.chat

    def chat(*args, **kwargs):
        session = real(*args, **kwargs)

        def interrupted(*_args, **_kwargs):
            yield "half an ans"
            raise KeyboardInterrupt

        session.stream = interrupted
        return session

    monkeypatch.setattr(pipe, "chat", chat)
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        chat_loop(pipe, frame(), OPTIONS, read=lambda _prompt: next(lines), out=out)
    assert out.getvalue().endswith("half an ans\n")


def test_a_full_chat_says_to_start_a_new_one(pipe):
    chat = pipe.chat(None, ignore_eos=True)
    chat.ask(FIRST, max_new_tokens=pipe.max_context)  # cut short at the context's end
    with pytest.raises(ChatFull, match="start a new chat"):
        chat.ask(NEXT)
    lines = iter([FIRST, NEXT, "/quit"])
    out = io.StringIO()
    loop_options = dict(OPTIONS, max_new_tokens=pipe.max_context)
    chat_loop(pipe, None, loop_options, read=lambda _prompt: next(lines), out=out)
    assert out.getvalue().rstrip().endswith("start a new chat (/reset)")


def test_a_chat_from_a_history_that_no_longer_fits_says_to_start_a_new_one(pipe):
    """A question that does not fit after a given history is ChatFull, as after the same turns
    asked in the session: an app that starts a new chat on ChatFull does so on both paths."""
    turns = [(FIRST, "word " * 40)] * 2
    given = pipe.chat(None, history=turns)
    asked = pipe.chat(None, ignore_eos=True)
    asked.ask(FIRST, max_new_tokens=100)
    question = "word " * (pipe.max_context - 60)
    for session in (given, asked):
        before = list(session.turns)
        with pytest.raises(ChatFull, match="start a new chat"):
            session.ask(question)
        assert session.turns == before
    assert pipe.chat(None).ask(question, max_new_tokens=1) is not None  # a new chat takes it
    assert given.ask(NEXT, **OPTIONS) == pipe.chat(None, history=turns).ask(NEXT, **OPTIONS)


def test_a_question_no_chat_could_hold_says_to_shorten_it_and_the_chat_goes_on(pipe):
    """A later question too long for even a new chat is PromptTooLong: told to start a new chat
    (ChatFull), a user would lose the conversation to be told to shorten it there."""
    chat = pipe.chat(frame(), **OPTIONS)
    chat.ask(FIRST)
    fresh = pipe.chat(frame(), **OPTIONS)
    fresh.ask(FIRST)
    for words in (pipe.max_context - 30, pipe.max_context):
        with pytest.raises(PromptTooLong, match="shorten it") as refused:
            chat.ask("word " * words)
        assert not isinstance(refused.value, ChatFull)
        with pytest.raises(PromptTooLong, match="shorten it"):
            pipe.chat(frame(), **OPTIONS).ask("word " * words)
    assert chat.ask(NEXT) == fresh.ask(NEXT)


# ---- the caches' truncate, which the rollback is made of ----------------------------------------


def prompt(rng: np.random.Generator, tokens: int, hidden: int) -> np.ndarray:
    return rng.standard_normal((1, tokens, hidden)).astype(np.float32)


def check_truncate(backend, hidden: int) -> None:
    """Decoding after a truncate equals decoding on a cache that never held the cut slots."""
    rng = np.random.default_rng(0)
    first, cut, second = prompt(rng, 5, hidden), prompt(rng, 7, hidden), prompt(rng, 3, hidden)

    def run(cache, embeds, start):
        mask = np.ones(embeds.shape[:2], np.int64)
        return backend.decode(embeds, mask, start + np.arange(embeds.shape[1])[None], cache)

    clean = backend.new_cache(1)
    run(clean, first, 0)
    want = run(clean, second, 5)

    cache = backend.new_cache(1)
    run(cache, first, 0)
    run(cache, cut, 5)
    cache.truncate(5)
    assert cache.length == 5
    # equal up to float rounding: the two caches may span different capacities of masked slots
    np.testing.assert_allclose(run(cache, second, 5), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(cache.length + 1)


def test_onnxruntime_cache_truncate(context_model_dir):
    """The standard form (masked slots): forgotten slots are masked and zero again."""
    with Pipeline.load(context_model_dir, threads=1, graph_form="standard") as pipe:
        check_truncate(pipe.backend, pipe.manifest.text.hidden_size)
        cache = pipe.backend.new_cache(1)
        mask = np.ones((1, 4), np.int64)
        embeds = np.ones((1, 4, pipe.manifest.text.hidden_size), np.float32)
        pipe.backend.decode(embeds, mask, np.arange(4)[None], cache)
        cache.truncate(1)
        assert not cache.attention_mask(np.ones((1, 1), np.int64))[:, 1:-1].any()  # masked
        assert not any(k[:, :, 1:].any() for k in cache.keys)  # forgotten slots are zeros again


def test_fused_cache_truncate(pipe):
    """The fused form (no mask, GroupQueryAttention reads each row's length): a truncated row
    continues as if it had never been longer."""
    assert pipe.backend.form == "fused"
    check_truncate(pipe.backend, pipe.manifest.text.hidden_size)


def test_a_turn_cut_by_a_stop_string_is_held_as_it_was_shown(pipe):
    """The session goes on from the answer the user saw (the stop string and what came with it
    dropped), as a server does when its client sends the conversation back: the next turn is a
    fresh session's whose history holds the shown answer, token for token."""
    image = frame()
    full = pipe.answer(image, FIRST, **OPTIONS).text
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if full[i : i + 2].strip())
    chat = pipe.chat(image, **OPTIONS)
    shown = chat.ask(FIRST, stop=[stop])
    assert shown == full[: full.index(stop)]  # the stop string cut it
    pixels = pipe.image_pixels(image)
    assert chat.ids == pipe.conversation_ids([(FIRST, shown)], pixels, image_turn=0)
    stream = chat.stream(NEXT)
    "".join(stream)
    replay = pipe.chat(image, history=[(FIRST, shown)], **OPTIONS).stream(NEXT)
    "".join(replay)
    assert stream.answer.token_ids == replay.answer.token_ids
    assert stream.answer.prompt_token_ids == replay.answer.prompt_token_ids


def test_a_mistyped_command_is_refused_not_asked():
    """/bogus or /imagefoo is not a question for the model; a path that starts a question is."""
    asked = []

    class Recording:
        def stream(self, question, image=None):
            asked.append(question)
            return iter(["ok"])

    fake = types.SimpleNamespace(chat=lambda *a, **k: Recording())
    lines = iter(["/bogus", "/imagefoo", "/help", "/usr/share is what?", "/quit"])
    out = io.StringIO()
    chat_loop(fake, None, OPTIONS, read=lambda _prompt: next(lines), out=out)
    text = out.getvalue()
    assert "unknown command /bogus" in text and "unknown command /imagefoo" in text
    assert text.count("/reset: start over") == 4  # the greeting, two refusals and /help
    assert asked == ["/usr/share is what?"]


def test_a_stopped_answer_that_spells_an_image_placeholder_counts(pipe, monkeypatch):
    """An answer cut by a stop string is re-rendered from its text, where a model's "<image>"
    spelled out in ordinary tokens would read back as an image placeholder: the turn failed
    after its whole answer was shown (and so did every later turn with a stop string). Such a
    turn is held as it was generated."""
    import llava_edge.runtime.generate as generate

    tokenizer = pipe.codec.tokenizer
    script = [tokenizer.token_to_id(f"<0x{b:02X}>") for b in b"<image>!A"]

    class Scripted(generate.Sampler):
        def __call__(self, logits, seen):
            self.at = getattr(self, "at", -1) + 1
            return np.array([script[self.at % len(script)]])

    monkeypatch.setattr(generate, "Sampler", Scripted)
    chat = pipe.chat(None, max_new_tokens=12)
    stream = chat.stream("Spell the placeholder.", stop=["!"])
    assert "".join(stream) == "<image>" and stream.answer.finish_reason == "stop"
    assert chat.turns == [("Spell the placeholder.", "<image>")]
    assert chat.ids == stream.answer.prompt_token_ids + stream.answer.token_ids
    assert chat.fed == chat.cache.length == len(chat.ids) - 1
    assert chat.ask("Again?", stop=["!"]) == "<image>"
    assert len(chat.turns) == 2


@pytest.mark.parametrize("at", [2, 7])  # amid the answer (fed), and its last token (not fed)
def test_an_answer_holding_the_image_token_is_held_as_shown(pipe, monkeypatch, at):
    """A model may generate its image token (llava-hf's 32000 has a row in the output layer);
    its text shows nothing. Held as generated, the next turn read it as one of the images' slots:
    a turn bringing an image then failed with a shape error (every such turn, so the chat could
    take no image again). The turn is held as shown, as the conversation rendered again is."""
    import llava_edge.runtime.generate as generate

    script = [pipe.codec.tokenizer.token_to_id(f"<0x{b:02X}>") for b in b"Answer!!"]
    script[at] = pipe.manifest.tokens.image_token_id

    class Scripted(generate.Sampler):
        def __call__(self, logits, seen):
            self.at = getattr(self, "at", -1) + 1
            return np.array([script[self.at]])

    with monkeypatch.context() as scripted:
        scripted.setattr(generate, "Sampler", Scripted)
        chat = pipe.chat(frame(), **OPTIONS)
        assert chat.stream(FIRST).read().token_ids == script
    again = pipe.chat(frame(), history=chat.turns, **OPTIONS)
    got = chat.stream(NEXT, image=other_frame()).read()
    assert got.token_ids == again.stream(NEXT, image=other_frame()).read().token_ids
    assert chat.ids == again.ids and chat.fed == chat.cache.length == len(chat.ids) - 1


# ---- images brought by later turns ---------------------------------------------------------------


def other_frame() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (40, 70, 3), np.uint8)


def fresh(pipe, ids: list[int], images: list[np.ndarray]) -> list[int]:
    """Greedy tokens of `ids` computed whole, on a cache that never saw a chat."""
    from llava_edge.runtime import BatchEngine

    pixels = [pipe.image_pixels(one) for one in images]
    with BatchEngine(pipe, max_batch=1, prefix_cache_mb=0) as engine:
        return engine.submit_ids(ids, pixels, dict(OPTIONS)).result().token_ids


def test_a_later_turn_brings_a_new_image_as_the_whole_conversation_would(pipe):
    """A robot's next frame in turn 2: its features go where its tokens are, after the cached
    first turn, and the answer equals the conversation computed whole."""
    chat = pipe.chat(frame(), **OPTIONS)
    first = chat.ask(FIRST)
    second = chat.stream(NEXT, image=other_frame())
    list(second)
    ids = second.answer.prompt_token_ids
    assert second.answer.token_ids == fresh(pipe, ids, [frame(), other_frame()])
    without = pipe.chat(frame(), **OPTIONS)
    without.ask(FIRST)
    assert without.ask(NEXT) != second.answer.text  # the new frame changed the answer
    # from a history, the turns rendered whole: as serve renders the same messages
    resumed = pipe.chat(frame(), history=[(FIRST, first)], **OPTIONS).stream(
        NEXT, image=other_frame()
    )
    list(resumed)
    pixels = [pipe.image_pixels(frame()), pipe.image_pixels(other_frame())]
    whole = pipe.conversation_ids([(FIRST, first), (NEXT, None)], pixels, [0, 1])
    assert resumed.answer.prompt_token_ids == whole
    assert resumed.answer.token_ids == fresh(pipe, whole, [frame(), other_frame()])


def test_an_unfinished_turns_image_leaves_with_it(pipe):
    chat = pipe.chat(frame(), **OPTIONS)
    chat.ask(FIRST)
    stream = chat.stream(UNFINISHED, image=other_frame())
    next(stream)
    stream.close()
    never = pipe.chat(frame(), **OPTIONS)
    never.ask(FIRST)
    assert chat.ask(NEXT) == never.ask(NEXT)


def test_a_stop_cut_turn_with_a_new_image_is_held_as_the_conversation_rendered_whole(pipe):
    said = pipe.chat(frame(), **OPTIONS)
    said.ask(FIRST)
    text = said.ask(NEXT, image=other_frame())
    stop = text.strip()[-2:]
    assert len(stop) == 2, text
    chat = pipe.chat(frame(), **OPTIONS)
    first = chat.ask(FIRST)
    shown = chat.ask(NEXT, image=other_frame(), stop=[stop])
    third = chat.stream(UNFINISHED)
    list(third)
    pixels = [pipe.image_pixels(frame()), pipe.image_pixels(other_frame())]
    turns = [(FIRST, first), (NEXT, shown), (UNFINISHED, None)]
    assert third.answer.prompt_token_ids == pipe.conversation_ids(turns, pixels, [0, 1])


def test_a_later_turns_placeholders_are_one_per_image_it_brings(pipe):
    chat = pipe.chat(frame(), **OPTIONS)
    chat.ask(FIRST)
    with pytest.raises(LlavaEdgeError, match="1 <image> placeholder.* for the 0 image"):
        chat.ask("<image> And this?")
    placed = chat.stream("Compare <image> with the first.", image=other_frame())
    list(placed)
    assert placed.answer.token_ids == fresh(
        pipe, placed.answer.prompt_token_ids, [frame(), other_frame()]
    )


def test_chat_command_add_brings_an_image_with_the_next_question(pipe, tmp_path):
    """/add PATH: a camera's next frame goes with the next question, in the same conversation
    (a bad path is said at once and queues nothing); /image would start a new one."""
    other = tmp_path / "other.png"
    Image.fromarray(other_frame()).save(other)
    missing = tmp_path / "missing.png"
    lines = iter([FIRST, f"/add {other}", f"/add {missing}", NEXT, UNFINISHED, "/quit"])
    out = io.StringIO()
    chat_loop(pipe, frame(), OPTIONS, read=lambda _prompt: next(lines), out=out)
    chat = pipe.chat(frame(), **OPTIONS)
    chat.ask(FIRST)
    with_frame = chat.ask(NEXT, image=str(other))
    after = chat.ask(UNFINISHED)
    text = out.getvalue()
    assert text.count("does not exist") == 1
    assert text.endswith(f"{with_frame}\n{after}\n")
    plain = pipe.chat(frame(), **OPTIONS)
    plain.ask(FIRST)
    assert plain.ask(NEXT) != with_frame  # the frame reached the question


def test_chat_command_add_prepares_each_image_once_for_its_check(pipe, monkeypatch, tmp_path):
    """Each /add checks its image and the ones added before it by their sizes: the ones before
    are not loaded and prepared again (about 30 ms a 1080p picture) at every later /add. The
    question then brings them all, read as `ask(image=...)` reads them."""
    paths = []
    for seed in range(4):  # the chat's picture, then three to add
        path = tmp_path / f"{seed}.png"
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), np.uint8)).save(
            path
        )
        paths.append(str(path))
    prepared = []
    real = pipe.image_pixels
    monkeypatch.setattr(pipe, "image_pixels", lambda one: prepared.append(one) or real(one))
    lines = iter([FIRST, *(f"/add {path}" for path in paths[1:]), NEXT, "/quit"])
    out = io.StringIO()
    chat_loop(pipe, paths[0], OPTIONS, read=lambda _prompt: next(lines), out=out)
    assert [prepared.count(path) for path in paths[1:]] == [2, 2, 2]  # its /add, the question
    monkeypatch.undo()
    chat = pipe.chat(paths[0], **OPTIONS)
    chat.ask(FIRST)
    assert out.getvalue().endswith(f"{chat.ask(NEXT, image=paths[1:])}\n")
