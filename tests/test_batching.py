"""Continuous batching in the runtime: the KV cache's per-row lengths, and BatchEngine's requests
joining and leaving a running batch while each answers exactly as it would alone, on both
decoder forms."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import quiet, run_app
from PIL import Image

from llava_edge.calib.quantize import quantize_model
from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest
from llava_edge.runtime import (  # the errors as README names them, from the runtime package
    BatchEngine,
    Cancelled,
    EngineClosed,
    Pipeline,
    QueueFull,
    TimedOut,
)
from llava_edge.runtime.kv_cache import KVCache


@pytest.fixture(scope="module", params=["fused", "standard"])
def pipe(context_model_dir, request):
    """Both decoder forms (they share the KV cache), on the model whose answers depend on their
    whole context: a row reading another row's keys would change its tokens."""
    with Pipeline.load(context_model_dir, threads=1, graph_form=request.param) as p:
        assert p.backend.form == request.param
        yield p


def picture(seed: int, size=(72, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


# ---- the KV cache ----------------------------------------------------------------------------


def test_rows_keep_their_own_lengths(tiny_model_dir):
    text = Manifest.load(tiny_model_dir).text
    cache = KVCache(text, batch=3)
    heads, dim = text.num_kv_heads, text.head_dim
    rng = np.random.default_rng(0)
    prompts = [rng.standard_normal((1, heads, n, dim)).astype(np.float32) for n in (5, 2, 9)]
    for row, kv in enumerate(prompts):  # each row prefilled alone, as the engine does
        rows = cache.rows(row, row + 1)
        rows.reserve(kv.shape[2])
        for layer in range(text.num_layers):
            rows.append(layer, kv, -kv)
        rows.advance(np.ones((1, kv.shape[2]), dtype=np.int64))
    assert cache.lengths.tolist() == [5, 2, 9]
    step = rng.standard_normal((3, heads, 1, dim)).astype(np.float32)
    mask = cache.attention_mask(np.ones((3, 1), dtype=np.int64))
    assert mask.shape == (3, cache.capacity + 1)
    assert mask[:, :-1].sum(axis=1).tolist() == [5, 2, 9] and mask[:, -1].tolist() == [1, 1, 1]
    assert (mask[1, :2] == 1).all() and (mask[1, 2:-1] == 0).all()  # slot < length: no holes
    cache.reserve(1)
    for layer in range(text.num_layers):
        cache.append(layer, step, -step)
    cache.advance(np.ones((3, 1), dtype=np.int64))
    keys = cache.past(0)[0]
    for row, (kv, at) in enumerate(zip(prompts, (5, 2, 9), strict=True)):
        np.testing.assert_array_equal(keys[row, :, :at], kv[0])  # each row's new key went
        np.testing.assert_array_equal(keys[row, :, at], step[row, :, 0])  # to its own length
    saved = cache.read_row(2, 10)
    cache.move_row(2, 0)  # the last row fills a freed one
    assert cache.lengths.tolist() == [10, 3, 0]
    np.testing.assert_array_equal(cache.past(0)[0][0, :, :10], saved[0][0])
    cache.truncate(4, row=0)
    assert cache.lengths.tolist() == [4, 3, 0]
    cache.write_row(2, saved, 7)
    assert cache.lengths.tolist() == [4, 3, 7]
    np.testing.assert_array_equal(cache.past(1)[1][2, :, :7], saved[1][1][:, :7])
    with pytest.raises(ValueError, match="no padding"):
        cache.rows(0, 1).advance(np.array([[0, 1]]))
    long = KVCache(text, batch=2)
    long.rows(0, 1).reserve(300)  # a long conversation's row
    long.lengths[:] = [300, 5]
    assert long.capacity >= 300
    long.truncate(0, row=0)  # it leaves: the buffers shrink to the short row
    long.shrink()
    assert long.capacity == 2 * long.chunk and long.lengths.tolist() == [0, 5]  # 5 + headroom
    long.truncate(0)
    long.shrink()
    assert long.capacity == 0 and long.keys == []


def test_a_cache_past_the_context_fails_clearly(tiny_model_dir):
    text = Manifest.load(tiny_model_dir).text
    cache = KVCache(text, batch=2)
    with pytest.raises(LlavaEdgeError, match="over the model's context"):
        cache.rows(1, 2).reserve(text.max_context + 1)


# ---- the engine ------------------------------------------------------------------------------


def test_requests_joining_a_running_batch_answer_as_alone(pipe):
    images = [picture(i) for i in range(5)]
    asks = [
        (images[0], "What is it?", 30),
        (None, "Say something long, please.", 41),
        (images[2], "Colour?", 9),
        (images[3], "How many shapes are in the picture?", 26),
        (None, "Where?", 35),
    ]
    alone = [pipe.answer(im, q, max_new_tokens=n, ignore_eos=True) for im, q, n in asks]
    engine = BatchEngine(pipe, max_batch=3, start=False)
    requests = [engine.submit(im, q, max_new_tokens=n, ignore_eos=True) for im, q, n in asks[:2]]
    for _ in range(4):  # the first two are decoding when the others arrive
        engine.step()
    requests += [engine.submit(im, q, max_new_tokens=n, ignore_eos=True) for im, q, n in asks[2:]]
    engine.step()
    assert engine.stats()["running"] == 3 and engine.stats()["waiting"] == 2  # one row each
    engine.run_until_idle()
    for want, request in zip(alone, requests, strict=True):
        got = request.result()
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.prompt_token_ids == want.prompt_token_ids
        assert got.finish_reason == want.finish_reason == "length"
    stats = engine.stats()
    assert stats["running"] == 0 and stats["finished"] == 5
    assert stats["generated_tokens"] == sum(n for *_, n in asks)


def test_each_request_keeps_its_own_sampler_stops_and_stream(pipe):
    image = picture(7)
    seeded = {"temperature": 0.9, "top_k": 40, "seed": 3, "max_new_tokens": 20}
    text = pipe.generate(image, "Stop somewhere.", max_new_tokens=20, ignore_eos=True)
    assert len(text) >= 10
    stop = text[8:10]
    engine = BatchEngine(pipe, max_batch=4, start=False)
    first = engine.submit(image, "A sampled answer?", **seeded)
    second = engine.submit(image, "A sampled answer?", **{**seeded, "seed": 4})
    third = engine.submit(image, "A sampled answer?", **seeded)
    stopped = engine.submit(image, "Stop somewhere.", max_new_tokens=20, ignore_eos=True, stop=stop)
    engine.run_until_idle()
    assert first.result().token_ids == third.result().token_ids  # same seed, same tokens
    assert first.result().token_ids != second.result().token_ids
    assert stopped.result().finish_reason == "stop"
    assert stopped.result().text == text[: text.find(stop)]
    assert pipe.answer(image, "A sampled answer?", **seeded).token_ids == first.result().token_ids


def test_streamed_pieces_join_to_the_answer_from_another_thread(pipe):
    engine = BatchEngine(pipe, max_batch=2)
    try:
        pieces: list[str] = []
        request = engine.submit(picture(8), "Describe it.", max_new_tokens=25)
        reader = threading.Thread(target=lambda: pieces.extend(request))
        reader.start()
        reader.join(30)
        assert "".join(pieces) == request.result().text
    finally:
        engine.close()
    with pytest.raises(LlavaEdgeError, match="shutting down"):
        engine.submit(None, "After close?")


def test_a_cancelled_request_frees_its_row_at_the_next_step(pipe):
    engine = BatchEngine(pipe, max_batch=2, max_queue=1, start=False)
    long = engine.submit(None, "Go on and on.", max_new_tokens=200, ignore_eos=True)
    other = engine.submit(picture(9), "And you?", max_new_tokens=200, ignore_eos=True)
    waiting = engine.submit(None, "Me next.", max_new_tokens=5)
    with pytest.raises(QueueFull, match="waiting"):
        engine.submit(None, "One too many.")
    engine.step()
    assert engine.stats()["running"] == 1  # one admission between two decode steps
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 1
    long.cancel()
    engine.step()
    stats = engine.stats()
    assert stats["cancelled"] == 1 and stats["running"] == 2  # `waiting` took the row
    with pytest.raises(Cancelled):
        long.result()
    engine.run_until_idle()
    assert len(other.result().token_ids) == 200  # it moved rows and went on unharmed
    assert (
        other.result().token_ids
        == pipe.answer(picture(9), "And you?", max_new_tokens=200, ignore_eos=True).token_ids
    )
    assert waiting.result().finish_reason in ("eos", "length")
    queued = engine.submit(None, "Cancelled while queued.")
    queued.cancel()
    assert not engine.step() and engine.stats()["cancelled"] == 2


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt])
def test_leaving_the_with_block_on_an_exception_cancels_the_requests(pipe, raised):
    """On an exception (Ctrl-C too) nothing reads the answers: they are cancelled, not waited
    for; leaving the block as written drains them."""
    with pytest.raises(raised), BatchEngine(pipe, max_batch=1) as engine:
        long = engine.submit(None, "Go on and on.", max_new_tokens=400, ignore_eos=True)
        queued = engine.submit(None, "Me next.", max_new_tokens=400, ignore_eos=True)
        raise raised
    for request in (long, queued):
        with pytest.raises(Cancelled):
            request.result()
    with BatchEngine(pipe, max_batch=1) as engine:
        drained = engine.submit(None, "Me next.", max_new_tokens=3, ignore_eos=True)
    assert len(drained.result().token_ids) == 3


def test_close_resolves_every_request_without_a_thread(pipe):
    """An engine its caller schedules (start=False) closes as a threaded one does: drained
    requests finish, the others are cancelled; none is left for a step that never comes."""
    engine = BatchEngine(pipe, max_batch=1, start=False)
    first = engine.submit(None, "First?", max_new_tokens=4, ignore_eos=True)
    second = engine.submit(None, "Second?", max_new_tokens=4, ignore_eos=True)
    engine.close()
    assert len(first.result(timeout=0).token_ids) == len(second.result(timeout=0).token_ids) == 4
    engine = BatchEngine(pipe, max_batch=1, start=False)
    dropped = engine.submit(None, "Dropped?", max_new_tokens=4)
    engine.close(drain=False)
    with pytest.raises(Cancelled):
        dropped.result(timeout=0)


EXIT_WITH_AN_ENGINE_RUNNING = """
import atexit, sys, time

def seen_at_exit():  # registered before the runtime's own exit handler: runs after it
    print(type(request.error).__name__, engine._thread.is_alive(), flush=True)

atexit.register(seen_at_exit)
from llava_edge.runtime import BatchEngine, Pipeline

pipe = Pipeline.load(sys.argv[1], threads=1)
engine = BatchEngine(pipe, max_batch=1)
request = engine.submit(None, "Go on.", max_new_tokens=10**6, ignore_eos=True)
while not request.generated:
    time.sleep(0.01)
"""


def test_an_app_that_exits_with_its_engine_running_exits_cleanly(context_model_dir):
    """An app may end without closing its engine (its thread is a daemon); the interpreter
    then ended under the thread's onnxruntime call, which aborts the process (exit 134, as
    often as not). Exit cancels the engine's requests and waits for its thread."""
    done = run_app(
        EXIT_WITH_AN_ENGINE_RUNNING, context_model_dir, "the exit never ended", timeout_s=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["Cancelled", "False"]


STALLED_ENGINE_GIVEN_UP = """
import sys, time
from llava_edge.runtime import BatchEngine, Pipeline

pipe = Pipeline.load(sys.argv[1], threads=1)
engine = BatchEngine(pipe, max_batch=1)
request = engine.submit(None, "Go on.", max_new_tokens=10**6, ignore_eos=True)
while not request.generated:
    time.sleep(0.01)
pipe.backend.decode = lambda *args: time.sleep(60)  # a device that stalls
time.sleep(0.1)
print(engine.close(drain=False, timeout=0.1), flush=True)
"""


def test_exit_does_not_wait_again_for_an_engine_its_closer_gave_up_on(context_model_dir):
    """A server gives a stalled backend call 10 s at shutdown, then exits without it: exit
    waits only for engines nobody closed."""
    import subprocess
    import sys

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", STALLED_ENGINE_GIVEN_UP, str(context_model_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.split() == ["False"], done.stderr[-2000:]
    assert time.monotonic() - started < 8  # not CLOSE_AT_EXIT_S more


ENGINE_MADE_AT_EXIT = """
import atexit, sys

def late():  # registered before the runtime's own exit handler: runs after it
    with BatchEngine(pipe, max_batch=2) as engine:
        requests = [engine.submit(None, q, max_new_tokens=3, ignore_eos=True) for q in "AB"]
        print(*[len(r.result(timeout=10).token_ids) for r in requests])
        print(requests[0].result().text == pipe.generate(None, "A", max_new_tokens=3, ignore_eos=True))

atexit.register(late)
from llava_edge.runtime import BatchEngine, Pipeline

pipe = Pipeline.load(sys.argv[1], threads=1)
"""


def test_an_engine_made_by_a_late_exit_handler_answers(context_model_dir):
    """An app's exit handler that runs after the runtime's may still ask the model; an engine
    it made started a thread whose first model call the exit parked for good, so the handler
    waited on its answers for ever. Its requests are answered within submit, as alone."""
    done = run_app(ENGINE_MADE_AT_EXIT, context_model_dir, "the exit handler's engine hung")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3", "3", "True"]


class InterruptedStart(threading.Thread):
    """A scheduler thread that starts, but whose starter gets Ctrl-C while `start` waits."""

    def start(self) -> None:
        super().start()
        raise KeyboardInterrupt


def test_a_ctrl_c_as_the_scheduler_starts_leaves_no_thread(pipe, monkeypatch):
    """Ctrl-C while BatchEngine() waits for its scheduler thread to start: no engine comes back
    to be closed, and the thread waited for requests, holding the pipeline, for good."""
    from llava_edge.runtime import batching

    def schedulers() -> int:
        return sum(t.name == "llava-edge-batch" for t in threading.enumerate())

    before = schedulers()
    monkeypatch.setattr(batching.threading, "Thread", InterruptedStart)
    with pytest.raises(KeyboardInterrupt):
        BatchEngine(pipe, max_batch=1)
    monkeypatch.undo()
    deadline = time.monotonic() + 5
    while schedulers() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert schedulers() == before


def test_close_without_draining_cancels_a_request_on_its_way_to_a_row(pipe, monkeypatch):
    """close(drain=False) while the scheduler holds a request it took from the queue and has
    not yet given a row: that one is cancelled too, not decoded to its end while close waits
    (a server's shutdown, held up by an answer nobody reads)."""
    engine = BatchEngine(pipe, max_batch=1)
    take, taken, go = engine._take_waiting, threading.Event(), threading.Event()

    def take_and_pause():
        requests = take()
        if requests:
            taken.set()
            go.wait(10)
        return requests

    monkeypatch.setattr(engine, "_take_waiting", take_and_pause)
    request = engine.submit(None, "Go on.", max_new_tokens=900, ignore_eos=True)
    assert taken.wait(10)
    closing = threading.Thread(target=engine.close, kwargs={"drain": False})
    closing.start()
    while not engine._closing:
        time.sleep(0.001)
    go.set()
    closing.join(30)
    with pytest.raises(Cancelled):
        request.result(timeout=0)


def test_time_limit_ends_a_request_not_the_engine(pipe):
    engine = BatchEngine(pipe, max_batch=2, start=False)
    slow = engine.submit_ids(
        pipe.prompt_ids("Slow?", None), None, {"max_new_tokens": 50}, timeout_s=1e-9
    )
    fine = engine.submit(None, "Fine?", max_new_tokens=5)
    engine.run_until_idle()
    with pytest.raises(TimedOut, match="time limit"):
        slow.result()
    assert fine.result().token_ids


def test_a_request_that_cannot_be_sampled_fails_alone(pipe):
    """A temperature so small that the scaled logits overflow float32 fails its own request
    with a clear error, on admission or in a decode step; the requests beside it go on."""
    with BatchEngine(pipe, max_batch=3) as engine:
        fine = engine.submit(None, "Fine?", max_new_tokens=40, ignore_eos=True)
        bad = engine.submit(None, "Hot?", max_new_tokens=40, temperature=1e-40, seed=0)
        waiting = engine.submit(picture(3), "Next?", max_new_tokens=8)
        with pytest.raises(LlavaEdgeError, match="temperature"):
            bad.result(timeout=30)
        want = pipe.answer(None, "Fine?", max_new_tokens=40, ignore_eos=True).token_ids
        assert fine.result(timeout=30).token_ids == want
        assert waiting.result(timeout=30).token_ids
        assert engine.stats()["failed"] == 1


def test_a_request_past_its_time_limit_while_waiting_ends_before_a_row_frees(pipe):
    engine = BatchEngine(pipe, max_batch=1, start=False)
    long = engine.submit(None, "Go on and on.", max_new_tokens=200, ignore_eos=True)
    engine.step()  # `long` holds the only row for 200 steps
    queued = engine.submit_ids(
        pipe.prompt_ids("Quick?", None), None, {"max_new_tokens": 5}, timeout_s=0.05
    )
    time.sleep(0.1)
    engine.step()
    with pytest.raises(TimedOut, match="time limit"):
        queued.result(timeout=0)
    stats = engine.stats()
    assert stats["waiting"] == 0 and stats["running"] == 1 and stats["failed"] == 1
    engine.run_until_idle()
    assert len(long.result().token_ids) == 200


def test_a_conversations_next_turn_reuses_its_prefix_and_answers_the_same(pipe):
    image = picture(10)
    engine = BatchEngine(pipe, max_batch=2, start=False)
    first = engine.submit(image, "What is in the picture?", max_new_tokens=12)
    engine.run_until_idle()
    answer = first.result().text
    turns = [("What is in the picture?", answer), ("And its colour?", None)]
    pixels = pipe.image_pixels(image)
    ids = pipe.conversation_ids(turns, pixels, image_turn=0)
    second = engine.submit_ids(ids, pixels, {"max_new_tokens": 12})
    engine.run_until_idle()
    reused = second.result().timings["prefix_reused"]
    assert reused >= len(first.result().prompt_token_ids)  # the whole first prompt was copied
    fresh = BatchEngine(pipe, max_batch=1, prefix_cache_mb=0, start=False)
    again = fresh.submit_ids(ids, pixels, {"max_new_tokens": 12})
    fresh.run_until_idle()
    assert again.result().timings["prefix_reused"] == 0
    assert second.result().token_ids == again.result().token_ids
    chat = pipe.chat(image, history=turns[:1])
    stream = chat.stream("And its colour?", max_new_tokens=12)
    assert "".join(stream) == second.result().text
    assert stream.answer.token_ids == second.result().token_ids
    # Another image with the same question shares only the text before the image.
    other = engine.submit(picture(11), "What is in the picture?", max_new_tokens=4)
    engine.run_until_idle()
    image_start = ids.index(pipe.manifest.tokens.image_token_id)
    assert other.result().timings["prefix_reused"] in (0, image_start)


def test_a_row_too_large_for_the_prefix_store_is_not_read(pipe, monkeypatch):
    """A finished request whose keys/values exceed the store's whole budget is not kept, so
    its row is not copied out either (for a 7B model's 600-token answer, 300 MB copied while
    every other row waits for its next token, then dropped)."""
    engine = BatchEngine(pipe, max_batch=1, prefix_cache_mb=0.01, start=False)
    reads: list[int] = []
    read_row = engine.cache.read_row
    monkeypatch.setattr(engine.cache, "read_row", lambda *a: reads.append(a[1]) or read_row(*a))
    request = engine.submit(picture(5), "Long?", max_new_tokens=20, ignore_eos=True)
    engine.run_until_idle()
    t = pipe.manifest.text
    slot = 2 * t.num_layers * t.num_kv_heads * t.head_dim * engine.cache.dtype.itemsize
    assert len(request.result().prompt_token_ids) * slot > engine.prefixes.budget
    assert reads == [] and engine.stats()["prefix_entries"] == 0
    small = BatchEngine(pipe, max_batch=1, prefix_cache_mb=1, start=False)
    small.submit(None, "Short question, short answer?", max_new_tokens=10, ignore_eos=True)
    small.run_until_idle()
    assert small.stats()["prefix_entries"] == 1  # what fits is still kept


def test_a_failure_to_keep_a_prefix_costs_no_answer(pipe, monkeypatch):
    """Copying a finished row into the prefix store fails (no host memory for it): that answer
    and the one decoding beside it both stand; only the reuse is lost."""
    engine = BatchEngine(pipe, max_batch=2, start=False)

    def no_memory(*args):
        raise MemoryError("no host memory for the copy")

    monkeypatch.setattr(engine.cache, "read_row", no_memory)
    short = engine.submit(None, "Short question, short answer?", max_new_tokens=10, ignore_eos=True)
    long = engine.submit(None, "A longer answer, please.", max_new_tokens=30, ignore_eos=True)
    engine.run_until_idle()
    for request, n in ((short, 10), (long, 30)):
        assert len(request.result().token_ids) == n
    assert engine.stats()["prefix_entries"] == 0 and engine.stats()["failed"] == 0


def test_a_turn_that_adds_a_picture_reuses_the_conversation_before_it(pipe):
    """Each image of a prompt keys its own tokens: a next turn with a new picture copies the
    turns before it (first picture included) and computes only from the new picture on."""
    first_picture = picture(30)
    engine = BatchEngine(pipe, max_batch=1, start=False)
    first = engine.submit(first_picture, "What is in the picture?", max_new_tokens=6)
    engine.run_until_idle()
    turns = [("What is in the picture?", first.result().text), ("And in this one?", None)]
    pixels = [pipe.image_pixels(first_picture), pipe.image_pixels(picture(31))]
    ids = pipe.conversation_ids(turns, pixels, [0, 1])
    image_id = pipe.manifest.tokens.image_token_id
    new_picture_at = [i for i, t in enumerate(ids) if t == image_id][pipe.image_tokens(pixels)[0]]
    second = engine.submit_ids(ids, pixels, {"max_new_tokens": 8})
    engine.run_until_idle()
    reused = second.result().timings["prefix_reused"]
    assert len(first.result().prompt_token_ids) <= reused <= new_picture_at
    fresh = BatchEngine(pipe, max_batch=1, prefix_cache_mb=0, start=False)
    again = fresh.submit_ids(ids, pixels, {"max_new_tokens": 8})
    fresh.run_until_idle()
    assert second.result().token_ids == again.result().token_ids
    # Another first picture under the same tokens: only the text before it is shared.
    other = [pipe.image_pixels(picture(32)), pixels[1]]
    third = engine.submit_ids(pipe.conversation_ids(turns, other, [0, 1]), other, {})
    engine.run_until_idle()
    assert third.result().timings["prefix_reused"] in (0, ids.index(image_id))


def test_pictures_a_reused_prefix_holds_are_not_encoded_again(pipe):
    """A next turn whose picture's tokens all come from the prefix store runs no vision encoder,
    and one that adds a picture encodes that one only, once the feature cache has let the first
    go (it keeps 8 pictures on a 7B model: a server's ninth recent picture evicts the first).
    Each still answers as computed whole."""
    first_picture = picture(40)
    engine = BatchEngine(pipe, max_batch=1, start=False)
    first = engine.submit(first_picture, "What is in the picture?", max_new_tokens=6)
    engine.run_until_idle()
    turns = [("What is in the picture?", first.result().text), ("And this?", None)]
    one = [pipe.image_pixels(first_picture)]
    two = [*one, pipe.image_pixels(picture(41))]
    for pixels, encoded in ((one, 0), (two, 1)):
        ids = pipe.conversation_ids(turns, pixels, [0] * len(one) + [1] * (len(pixels) - 1))
        pipe._features.clear()  # evicted by other pictures
        runs = pipe.stats["vision_runs"]
        second = engine.submit_ids(ids, pixels, {"max_new_tokens": 8})
        engine.run_until_idle()
        assert second.result().timings["prefix_reused"] >= len(first.result().prompt_token_ids)
        assert pipe.stats["vision_runs"] - runs == encoded
        fresh = BatchEngine(pipe, max_batch=1, prefix_cache_mb=0, start=False)
        again = fresh.submit_ids(ids, pixels, {"max_new_tokens": 8})
        fresh.run_until_idle()
        assert second.result().token_ids == again.result().token_ids


def test_bad_requests_fail_at_submit_and_leave_the_engine_working(pipe):
    engine = BatchEngine(pipe, max_batch=2, start=False)
    with pytest.raises(LlavaEdgeError, match="max_new_tokens"):
        engine.submit(None, "Q", max_new_tokens=0)
    with pytest.raises(LlavaEdgeError, match="placeholder"):
        engine.submit(None, "<image> Q")
    with pytest.raises(LlavaEdgeError, match="not an image"):
        engine.submit(b"not an image", "Q")
    with pytest.raises(LlavaEdgeError, match="at most 256 characters"):
        engine.submit_ids(pipe.prompt_ids("Q", None), None, {"stop": ["x" * 257]})
    with pytest.raises(LlavaEdgeError, match="image tokens"):
        engine.submit_ids(pipe.prompt_ids("Q", pipe.image_pixels(picture(1))), None, {})
    # an empty prompt failed at its prefill (IndexError), ids in an array or as floats raw
    for ids, message in (([], "empty"), ([1, 2.5], "token ids"), (["1"], "token ids")):
        with pytest.raises(LlavaEdgeError, match=message):
            engine.submit_ids(ids, None, {})
    # an image as submit takes it (an array, a path) raised AttributeError or miscounted
    image = picture(1)
    ids = pipe.prompt_ids("Q", pipe.image_pixels(image))
    for raw in (np.asarray(image), "photo.jpg", [np.asarray(image)]):
        with pytest.raises(LlavaEdgeError, match="images as Pipeline.image_pixels gives"):
            engine.submit_ids(ids, raw, {})
    assert engine.stats()["requests"] == 0
    request = engine.submit(None, "Still fine?", max_new_tokens=3)
    ids = np.asarray(pipe.prompt_ids("Still fine?", None))  # token ids of any integer type
    from_array = engine.submit_ids(ids, None, {"max_new_tokens": 3})
    engine.run_until_idle()
    assert request.result().token_ids
    assert from_array.result().token_ids == request.result().token_ids
    with pytest.raises(LlavaEdgeError, match="max_batch"):
        BatchEngine(pipe, max_batch=0)


# ---- the app's side: listeners and readers ---------------------------------------------------


def test_a_listener_that_raises_fails_only_its_own_request(pipe):
    engine = BatchEngine(pipe, max_batch=2, start=False)
    innocent = engine.submit(None, "Innocent?", max_new_tokens=30, ignore_eos=True)
    kinds: list[str] = []

    def buggy(event):
        kinds.append(event.kind)
        if event.kind == "text":
            raise ValueError("a bug in the app's listener")

    bad = engine.submit(picture(4), "Buggy?", listener=buggy, max_new_tokens=30, ignore_eos=True)
    engine.run_until_idle()
    with pytest.raises(ValueError, match="listener"):
        bad.result(timeout=0)
    assert kinds[-1] == "error" and kinds.count("text") == 1  # no text after the one it broke on
    want = pipe.answer(None, "Innocent?", max_new_tokens=30, ignore_eos=True).token_ids
    assert innocent.result(timeout=0).token_ids == want
    stats = engine.stats()
    assert (stats["finished"], stats["failed"], stats["running"]) == (1, 1, 0)


def test_a_listener_that_always_raises_leaves_the_scheduler_running(pipe):
    def broken(event):
        raise ValueError(f"a bug in the app's listener ({event.kind})")

    with BatchEngine(pipe, max_batch=2) as engine:
        innocent = engine.submit(None, "Innocent?", max_new_tokens=30, ignore_eos=True)
        bad = engine.submit(None, "Buggy?", listener=broken, max_new_tokens=30, ignore_eos=True)
        with pytest.raises(ValueError, match="started"):
            bad.result(timeout=30)
        want = pipe.answer(None, "Innocent?", max_new_tokens=30, ignore_eos=True).token_ids
        assert innocent.result(timeout=30).token_ids == want
        later = engine.submit(None, "Later?", max_new_tokens=3)
        assert later.result(timeout=30).token_ids
        assert engine._thread.is_alive()


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(pipe, monkeypatch):
    """A step that raises (a scheduler bug), with a cache that cannot even be cleared after it:
    the requests in hand, running and waiting, fail with its error (a listener that raises too
    changes nothing), and the next request is served from a fresh cache."""
    with BatchEngine(pipe, max_batch=2) as engine:
        decode, shrink = engine._decode, engine.cache.shrink

        def bug() -> None:
            monkeypatch.setattr(engine, "_decode", decode)
            raise RuntimeError("a scheduler bug")

        def broken_shrink() -> None:
            monkeypatch.setattr(engine.cache, "shrink", shrink)
            raise RuntimeError("the cache is gone too")

        def broken(event):
            raise ValueError("a bug in the app's listener")

        monkeypatch.setattr(engine.cache, "shrink", broken_shrink)
        monkeypatch.setattr(engine, "_decode", bug)
        with engine._lock:  # both in the queue before the first step: one is admitted
            running = engine.submit(None, "First?", max_new_tokens=5)
            waiting = engine.submit(None, "Second?", listener=broken, max_new_tokens=5)
        for request in (running, waiting):
            with pytest.raises(RuntimeError, match="scheduler bug"):
                request.result(timeout=30)
        later = engine.submit(None, "Later?", max_new_tokens=5, ignore_eos=True)
        want = pipe.answer(None, "Later?", max_new_tokens=5, ignore_eos=True).token_ids
        assert later.result(timeout=30).token_ids == want
        assert engine._thread.is_alive() and engine.stats()["failed"] == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_engine_that_cannot_go_on_fails_its_requests_and_refuses_new_ones(pipe, monkeypatch):
    """A failed step whose cache can be neither cleared nor replaced (the device's memory is
    gone) stops the scheduler thread: the requests in hand fail, later ones are refused at
    submit with the reason, and none waits for a thread that is no more."""
    with BatchEngine(pipe, max_batch=2) as engine:

        def bug() -> None:
            raise RuntimeError("a scheduler bug")

        def gone(*args) -> None:
            raise MemoryError("out of device memory")

        monkeypatch.setattr(engine, "_decode", bug)
        monkeypatch.setattr(engine.cache, "shrink", gone)
        monkeypatch.setattr(pipe.backend, "new_cache", gone)
        with engine._lock:  # both in the queue before the first step: one is admitted
            running = engine.submit(None, "First?", max_new_tokens=5)
            waiting = engine.submit(None, "Second?", max_new_tokens=5)
        for request in (running, waiting):
            with pytest.raises(RuntimeError, match="scheduler bug"):
                request.result(timeout=10)
        engine._thread.join(10)
        with pytest.raises(EngineClosed, match="out of device memory"):
            engine.submit(None, "Later?", max_new_tokens=5)
        assert isinstance(engine.failure, MemoryError)


def read_in_thread(request) -> list[str]:
    """`request`'s text pieces, read by another thread; fails instead of waiting forever."""
    pieces: list[str] = []
    errors: list[Exception] = []

    def read() -> None:
        try:
            pieces.extend(request)
        except Exception as e:
            errors.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading the request blocked"
    if errors:
        raise errors[0]
    return pieces


def test_a_requests_text_is_read_once(pipe):
    """As a TextStream's: a second read (after the text, or after its error) yields nothing."""
    engine = BatchEngine(pipe, max_batch=2, start=False)
    request = engine.submit(None, "Read me.", max_new_tokens=6, ignore_eos=True)
    bad = engine.submit(None, "Hot?", max_new_tokens=6, temperature=1e-40, seed=0)
    engine.run_until_idle()
    assert "".join(read_in_thread(request)) == request.result().text
    assert read_in_thread(request) == []
    with pytest.raises(LlavaEdgeError, match="temperature"):
        read_in_thread(bad)
    assert read_in_thread(bad) == []


# ---- quantized model dirs --------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(context_model_dir, tmp_path_factory) -> dict[str, Pipeline]:
    """int8; int4 whose prompts run the int8 fused decoder (`--prefill int8`); plain int4."""
    root = tmp_path_factory.mktemp("batch_quantized")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        picture(40 + i).save(images / f"{i}.png")
    forms = {"int8": ("int8", None), "int4 prefill int8": ("int4", "int8"), "int4": ("int4", None)}
    pipes = {}
    for name, (precision, prefill) in forms.items():
        path = root / name.replace(" ", "_")
        quantize_model(
            context_model_dir, path, precision, images=images, samples=3, prefill=prefill, log=quiet
        )
        pipes[name] = Pipeline.load(path, threads=1, graph_form="fused")
    yield pipes
    for p in pipes.values():
        p.close()


def next_turn(engine, pipe, image):
    """A first question, then its conversation's next turn; the next turn's Answer."""
    first = engine.submit(image, "What is in the picture?", max_new_tokens=12, ignore_eos=True)
    engine.run_until_idle()
    turns = [("What is in the picture?", first.result().text), ("And its colour?", None)]
    pixels = pipe.image_pixels(image)
    second = engine.submit_ids(
        pipe.conversation_ids(turns, pixels, image_turn=0), pixels, {"max_new_tokens": 12}
    )
    engine.run_until_idle()
    return second.result()


@pytest.mark.parametrize("name", ["int8", "int4 prefill int8"])
def test_prompts_quantized_per_call_reuse_no_prefix(quantized, name):
    """A prompt graph that scales its activations per call would answer otherwise from a stored
    prefix: the engine computes every prompt whole, and answers as without a prefix store."""
    pipe = quantized[name]
    assert pipe.backend.prompt_scales_per_call
    engine = BatchEngine(pipe, max_batch=1, start=False)
    got = next_turn(engine, pipe, picture(12))
    assert got.timings["prefix_reused"] == 0
    stats = engine.stats()
    assert stats["prefix_tokens_reused"] == stats["prefix_entries"] == stats["prefix_bytes"] == 0
    want = next_turn(
        BatchEngine(pipe, max_batch=1, prefix_cache_mb=0, start=False), pipe, picture(12)
    )
    assert got.token_ids == want.token_ids


def test_int4_keeps_prefix_reuse_and_answers_as_alone(quantized):
    pipe = quantized["int4"]
    assert not pipe.backend.prompt_scales_per_call
    engine = BatchEngine(pipe, max_batch=1, start=False)
    got = next_turn(engine, pipe, picture(12))
    assert got.timings["prefix_reused"] > 0
    want = next_turn(
        BatchEngine(pipe, max_batch=1, prefix_cache_mb=0, start=False), pipe, picture(12)
    )
    assert got.token_ids == want.token_ids
    # and requests decoded together answer as alone
    asks = [
        (picture(13), "What is it?", 20),
        (None, "Say something.", 27),
        (picture(14), "Why?", 9),
    ]
    alone = [pipe.answer(im, q, max_new_tokens=n, ignore_eos=True).token_ids for im, q, n in asks]
    batch = BatchEngine(pipe, max_batch=3, start=False)
    requests = [batch.submit(im, q, max_new_tokens=n, ignore_eos=True) for im, q, n in asks]
    batch.run_until_idle()
    assert [r.result().token_ids for r in requests] == alone
