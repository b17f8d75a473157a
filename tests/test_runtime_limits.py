"""A deployment's limits hold for every input form and every entry point, and a closed pipeline
refuses every request with a clear error.

Each refusal is paired with the same request under the limit succeeding, so a limit that refused
everything would fail too.
"""

from __future__ import annotations

import gc
import io
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_edge.cli import main
from llava_edge.errors import ChatFull, LlavaEdgeError, TimedOut
from llava_edge.runtime import Answer, BatchEngine, Limits, Pipeline

# Each entry point, run to the end: (pipeline, image, question, options) -> the answer's text.
ENTRIES: dict[str, Callable[..., str]] = {
    "generate": lambda p, image, q, **o: p.generate(image, q, **o),
    "answer": lambda p, image, q, **o: p.answer(image, q, **o).text,
    "stream": lambda p, image, q, **o: "".join(p.stream(image, q, **o)),
    "generate_batch": lambda p, image, q, **o: p.generate_batch([(image, q)], **o)[0].text,
    "chat.ask": lambda p, image, q, **o: p.chat(image, **o).ask(q),
    "chat.stream": lambda p, image, q, **o: "".join(p.chat(image).stream(q, **o)),
    "BatchEngine.submit": lambda p, image, q, **o: batched(p, image, q, **o),
}


def batched(pipe: Pipeline, image, question: str, **options) -> str:
    engine = BatchEngine(pipe, max_batch=1, start=False)
    request = engine.submit(image, question, **options)
    engine.run_until_idle()
    return request.result().text


FORMS = ["path", "bytes", "pil", "array"]
SMALL = dict(max_new_tokens=2)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    with Pipeline.load(tiny_model_dir, threads=1) as p:
        yield p


def image_as(form: str, width: int, height: int, tmp_path: Path):
    array = np.random.default_rng(width).integers(0, 256, (height, width, 3), np.uint8)
    if form == "array":
        return array
    if form == "pil":
        return Image.fromarray(array)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    if form == "bytes":
        return buffer.getvalue()
    path = tmp_path / f"{width}x{height}.png"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("form", FORMS)
def test_image_pixel_limit_holds_for_every_form_and_entry(pipe, form, entry, tmp_path, monkeypatch):
    monkeypatch.setattr(pipe, "limits", Limits(max_image_pixels=1000))
    ask = ENTRIES[entry]
    with pytest.raises(LlavaEdgeError, match=r"40x30 = 1200 pixels, over the limit of 1000"):
        ask(pipe, image_as(form, 40, 30, tmp_path), "What is it?", **SMALL)
    assert ask(pipe, image_as(form, 25, 40, tmp_path), "What is it?", **SMALL) is not None


@pytest.mark.parametrize("entry", ENTRIES)
def test_prompt_token_limit_holds_for_every_entry(pipe, entry, monkeypatch):
    short = len(pipe.answer(None, "Hi", max_new_tokens=1).prompt_token_ids)
    monkeypatch.setattr(pipe, "limits", Limits(max_prompt_tokens=short + 10))
    ask = ENTRIES[entry]
    with pytest.raises(LlavaEdgeError, match=f"over this deployment's limit of {short + 10}"):
        ask(pipe, None, "Hi " + "word " * 20, **SMALL)
    assert ask(pipe, None, "Hi", **SMALL) is not None


def test_a_chat_may_not_outgrow_the_prompt_limit(pipe, monkeypatch):
    """The limit bounds what an answer is conditioned on: in a chat, the whole conversation."""
    question = "Tell me more"
    one_turn = len(pipe.answer(None, question, max_new_tokens=1).prompt_token_ids)
    monkeypatch.setattr(pipe, "limits", Limits(max_prompt_tokens=one_turn + 4))
    chat = pipe.chat(None, max_new_tokens=4, ignore_eos=True)
    chat.ask(question)
    with pytest.raises(LlavaEdgeError, match="the conversation with this question is .* new chat"):
        chat.ask(question)
    assert pipe.generate(None, question, max_new_tokens=2) is not None  # alone it fits
    assert chat.fed == len(chat.ids) - 1  # the refused turn left the session as it was


def test_a_turn_cut_by_a_stop_string_counts_whatever_the_prompt_limit(pipe, monkeypatch):
    """The limit bounds what an answer is conditioned on, not the answer: a turn cut by a stop
    string, the conversation with its answer then over the limit, counts as one cut by its
    length does. It raised PromptTooLong once the whole answer had streamed, and left the turn
    in `turns` but not in the cache; the next question is the one refused."""
    question = "Tell me more"
    one_turn = len(pipe.answer(None, question, max_new_tokens=1).prompt_token_ids)
    full = pipe.generate(None, question, max_new_tokens=12, ignore_eos=True)
    cut = max(k for k in range(len(full) - 1) if full.find(full[k : k + 2]) == k)
    shown = pipe.conversation_ids([(question, full[:cut])])
    assert len(shown) > one_turn + 4  # the answer the stop string leaves is over the limit
    monkeypatch.setattr(pipe, "limits", Limits(max_prompt_tokens=one_turn + 4))
    chat = pipe.chat(None, max_new_tokens=12, ignore_eos=True)
    stream = chat.stream(question, stop=full[cut : cut + 2])
    assert "".join(stream) == full[:cut] and stream.answer.finish_reason == "stop"
    assert chat.turns == [(question, full[:cut])] and chat.ids == shown
    assert chat.fed == chat.cache.length > 0
    with pytest.raises(ChatFull, match="start a new chat"):
        chat.ask(question)


@pytest.mark.parametrize("entry", ENTRIES)
def test_new_token_limit_holds_for_every_entry(pipe, entry, monkeypatch):
    ask = ENTRIES[entry]
    want = pipe.generate(None, "Count.", max_new_tokens=3, ignore_eos=True)
    monkeypatch.setattr(pipe, "limits", Limits(max_new_tokens=3))
    with pytest.raises(
        LlavaEdgeError, match="max_new_tokens 4 is over this deployment's limit of 3"
    ):
        ask(pipe, None, "Count.", max_new_tokens=4)
    assert ask(pipe, None, "Count.", ignore_eos=True) == want  # asked for nothing: capped at 3


@pytest.mark.parametrize("entry", ENTRIES)
def test_timeout_holds_for_every_entry(pipe, entry, monkeypatch):
    ask = ENTRIES[entry]
    monkeypatch.setattr(pipe, "limits", Limits(timeout_s=1e-9))
    with pytest.raises(LlavaEdgeError, match="time limit of 1e-09 s"):
        ask(pipe, None, "Count.", max_new_tokens=4, ignore_eos=True)
    monkeypatch.setattr(pipe, "limits", Limits(timeout_s=60))
    assert ask(pipe, None, "Count.", max_new_tokens=4, ignore_eos=True) is not None


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_calls_own_timeout_overrides_the_pipelines_for_that_call(pipe, entry, monkeypatch):
    """A robot loop's "answer within this time or give up", on every entry point: tighter or
    looser than the pipeline's Limits.timeout_s, for that call only."""
    ask = ENTRIES[entry]
    monkeypatch.setattr(pipe, "limits", Limits(timeout_s=60))
    with pytest.raises(TimedOut, match="time limit of 1e-09 s"):
        ask(pipe, None, "Count.", max_new_tokens=4, ignore_eos=True, timeout_s=1e-9)
    assert ask(pipe, None, "Count.", max_new_tokens=4, ignore_eos=True) is not None
    monkeypatch.setattr(pipe, "limits", Limits(timeout_s=1e-9))
    assert ask(pipe, None, "Count.", max_new_tokens=4, ignore_eos=True, timeout_s=60) is not None
    assert ask(pipe, None, "Count.", **SMALL, timeout_s=float("inf")) is not None  # no limit
    with pytest.raises(TimedOut, match="time limit of 1e-09 s"):  # None: the pipeline's
        ask(pipe, None, "Count.", max_new_tokens=4, ignore_eos=True, timeout_s=None)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("bad", [0, -1, float("nan"), True, "1"], ids=repr)
def test_a_calls_timeout_is_checked_as_the_limit_is(pipe, entry, bad):
    with pytest.raises(LlavaEdgeError, match=f"timeout_s must be a positive number.*{bad!r}"):
        ENTRIES[entry](pipe, None, "Count.", **SMALL, timeout_s=bad)


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_request_late_from_its_image_runs_no_prompt(pipe, entry, monkeypatch):
    """The time limit counts the image's encoding: a request already late when its image is
    encoded fails there, without running its prompt through the decoder for nothing. A chat's
    images are encoded by its first turn, so that turn's time limit counts them."""
    encode, decode = pipe.backend.encode_image, pipe.backend.decode
    calls = []

    def slow_encode(pixels):
        time.sleep(0.3)
        return encode(pixels)

    monkeypatch.setattr(pipe.backend, "encode_image", slow_encode)
    monkeypatch.setattr(pipe.backend, "decode", lambda *a: calls.append(1) or decode(*a))
    seed = 100 + list(ENTRIES).index(entry)  # a new image: encoded, not found in the cache
    image = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), np.uint8)
    with pytest.raises(TimedOut):
        ENTRIES[entry](pipe, image, "What is it?", **SMALL, timeout_s=0.1)
    assert calls == []


def test_a_chats_timeout_holds_for_each_turn_and_a_turn_may_set_its_own(pipe):
    chat = pipe.chat(None, max_new_tokens=4, ignore_eos=True, timeout_s=1e-9)
    with pytest.raises(TimedOut):
        chat.ask("Count.")
    assert chat.turns == [] and chat.cache.length == 0  # rolled back
    assert chat.ask("Count.", timeout_s=60)
    assert len(chat.turns) == 1
    with pytest.raises(LlavaEdgeError, match="timeout_s must be a positive number"):
        pipe.chat(None, timeout_s=-1)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if not e.startswith("chat")])
def test_the_time_limit_counts_reading_the_image(pipe, entry, monkeypatch):
    """A large image's decoding and resizing is part of the request, on every entry point that
    takes an image with its question (a chat reads its images when it is made, to refuse a bad
    one at once)."""
    read = pipe.image_pixels

    def slow_read(image):
        time.sleep(0.3)
        return read(image)

    monkeypatch.setattr(pipe, "image_pixels", slow_read)
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(TimedOut):
        ENTRIES[entry](pipe, image, "What is it?", **SMALL, timeout_s=0.1)
    assert ENTRIES[entry](pipe, image, "What is it?", **SMALL, timeout_s=60) is not None


def test_a_chats_first_turn_counts_its_images_encoding(pipe, monkeypatch):
    """chat() only loads and checks its image; the first turn encodes it within its own time
    limit, and a first turn that timed out leaves the features for the question asked again."""
    encode, encoded = pipe.backend.encode_image, []

    def slow_encode(pixels):
        encoded.append(1)
        time.sleep(0.3)
        return encode(pixels)

    monkeypatch.setattr(pipe.backend, "encode_image", slow_encode)
    image = np.random.default_rng(99).integers(0, 256, (16, 16, 3), np.uint8)
    chat = pipe.chat(image, **SMALL, timeout_s=0.1)
    assert encoded == []
    with pytest.raises(TimedOut):
        chat.ask("What is it?")
    assert chat.turns == [] and chat.cache.length == 0
    assert chat.ask("What is it?", timeout_s=60) is not None
    assert encoded == [1] and len(chat.turns) == 1


# Each entry point of the library, run to the end: (pipeline, question, options) -> Answer.
ANSWERS: dict[str, Callable[..., Answer]] = {
    "answer": lambda p, q, **o: p.answer(None, q, **o),
    "stream": lambda p, q, **o: finished(p.stream(None, q, **o)),
    "generate_batch": lambda p, q, **o: p.generate_batch([(None, q)], **o)[0],
    "chat.stream": lambda p, q, **o: finished(p.chat(None).stream(q, **o)),
    "BatchEngine.submit": lambda p, q, **o: batched_answer(p, q, **o),
}


def finished(stream) -> Answer:
    for _ in stream:
        pass
    return stream.answer


def batched_answer(pipe: Pipeline, question: str, **options) -> Answer:
    engine = BatchEngine(pipe, max_batch=1, start=False)
    request = engine.submit(None, question, **options)
    engine.run_until_idle()
    return request.result()


@pytest.mark.parametrize("entry", ANSWERS)
def test_the_library_stops_an_answer_at_the_end_of_the_context(pipe, entry):
    """The library's max_new_tokens is at most: an answer that would run past the context stops
    there (finish reason 'length'), on every entry point. (The server refuses such a max_tokens
    instead, as OpenAI's API does: tests/test_serve.py.)"""
    question = "word " * (pipe.max_context - 40)
    prompt = len(pipe.answer(None, question, max_new_tokens=1).prompt_token_ids)
    room = pipe.max_context - prompt
    assert 0 < room < 64
    answer = ANSWERS[entry](pipe, question, max_new_tokens=pipe.max_context, ignore_eos=True)
    assert len(answer.token_ids) == room and answer.finish_reason == "length"


@pytest.mark.parametrize("entry", [*ENTRIES, "chat made before", "stream made before"])
def test_a_closed_pipeline_refuses_every_entry(tiny_model_dir, entry):
    p = Pipeline.load(tiny_model_dir)
    chat, stream = p.chat(None, **SMALL), p.stream(None, "Hi", **SMALL)
    p.close()
    with pytest.raises(LlavaEdgeError, match="closed; load the model dir again"):
        if entry == "chat made before":
            chat.ask("Hi")
        elif entry == "stream made before":
            "".join(stream)
        else:
            ENTRIES[entry](p, np.zeros((8, 8, 3), np.uint8), "Hi", **SMALL)


def test_a_closed_pipeline_refuses_a_chat_or_a_watch_when_asked(tiny_model_dir, tmp_path):
    """Not at the first question or frame: the call itself fails."""
    p = Pipeline.load(tiny_model_dir)
    p.close()
    with pytest.raises(LlavaEdgeError, match="closed; load the model dir again"):
        p.chat(None)
    with pytest.raises(LlavaEdgeError, match="closed; load the model dir again"):
        p.watch(tmp_path, "What?")


def test_close_gives_the_sessions_back(tiny_model_dir):
    """A robot app that swaps models closes the old one: its sessions (the weights' memory) must
    go then, not when the pipeline object is dropped."""
    p = Pipeline.load(tiny_model_dir)
    p.answer(None, "Hi", **SMALL)
    sessions = [weakref.ref(s) for s in p.backend.sessions.values()]
    p.close()
    gc.collect()
    assert all(ref() is None for ref in sessions)


# ---- the commands that run a model --------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    import json

    root = tmp_path_factory.mktemp("limits_cli")
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / "picture.png")
    record = {
        "id": "a",
        "image": "picture.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"},
            {"from": "gpt", "value": "grey"},
        ],
    }
    (root / "data.json").write_text(json.dumps([record]))
    return {"root": root, "image": root / "picture.png", "data": root / "data.json"}


LIMITS = {
    "--max-image-pixels": ("100", "over the limit of 100"),
    "--max-prompt-tokens": ("5", "over this deployment's limit of 5"),
    "--timeout": ("1e-9", "time limit"),
}


@pytest.mark.parametrize("command", ["run", "chat", "bench", "eval"])
def test_every_command_that_runs_a_model_holds_the_limits(
    tiny_model_dir, files, command, capsys, monkeypatch
):
    model, image = str(tiny_model_dir), str(files["image"])
    argv = {
        "run": ["run", model, "--image", image, "--prompt", "What colour?"],
        "chat": ["chat", model, "--image", image],
        "bench": ["bench", model, "--runs", "1", "--new-tokens", "4"],
        "eval": ["eval", model, "--data", str(files["data"]), "--images", str(files["root"])],
    }[command]
    argv += ["--max-new-tokens", "4"] if command != "bench" else []
    asked = []

    def one_question(_prompt: str = "") -> str:  # `chat` asks one question, then leaves
        if asked:
            asked.clear()
            raise EOFError
        asked.append(1)
        return "What colour?"

    monkeypatch.setattr("builtins.input", one_question)
    assert main(argv) == 0
    capsys.readouterr()
    for limit, (value, message) in LIMITS.items():
        code = main([*argv, limit, value])
        out, err = capsys.readouterr()
        if command == "chat":  # the chat reports the error and goes on; its image fails at once
            assert message in (out + err), limit
        else:
            assert code == 1 and message in err and "Traceback" not in err, limit


@pytest.mark.parametrize("form", FORMS)
def test_the_pixel_limit_governs_over_pils_own(pipe, form, tmp_path, monkeypatch):
    """PIL refuses an image over its MAX_IMAGE_PIXELS (89M, an error past twice that) as it opens
    it: a deployment's larger limit still lets it through, a smaller one refuses it first, with
    the same error for every form, and PIL's setting is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    monkeypatch.setattr(pipe, "limits", Limits(max_image_pixels=1000))
    assert pipe.answer(image_as(form, 25, 40, tmp_path), "What is it?", **SMALL) is not None
    monkeypatch.setattr(pipe, "limits", Limits(max_image_pixels=500))
    with pytest.raises(LlavaEdgeError, match=r"25x40 = 1000 pixels, over the limit of 500"):
        pipe.answer(image_as(form, 25, 40, tmp_path), "What is it?", **SMALL)
    assert Image.MAX_IMAGE_PIXELS == 300
