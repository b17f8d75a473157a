"""A robot app's use of the runtime from several threads: a perception thread and a control
thread asking about the same camera frame at once."""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import run_app

from llava_edge.runtime import BatchEngine, Limits, LlavaEdgeError, Pipeline, TimedOut
from llava_edge.runtime.batching import Cancelled


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    with Pipeline.load(tiny_model_dir, threads=1) as p:
        yield p


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)


def test_one_frame_asked_by_two_threads_at_once_is_encoded_once(pipe, monkeypatch):
    """Two threads asking about a new frame at the same instant each missed the feature cache
    and both ran the vision encoder, though a repeated image is promised to be encoded once."""
    image = frame(1)
    pipe.answer(frame(2), "Is the door open?", max_new_tokens=4)  # the graphs are open
    encode = pipe.backend.encode_image

    def slow_encode(pixels):
        time.sleep(0.3)  # a Jetson's vision encoder: long enough for the other thread to ask
        return encode(pixels)

    monkeypatch.setattr(pipe.backend, "encode_image", slow_encode)
    runs, hits = pipe.stats["vision_runs"], pipe.stats["feature_cache_hits"]
    start = threading.Barrier(2)
    answers = {}

    def ask(name: str) -> None:
        start.wait()
        answers[name] = pipe.answer(image, "Is the door open?", max_new_tokens=4).token_ids

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("perception", "control")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert pipe.stats["vision_runs"] - runs == 1
    assert pipe.stats["feature_cache_hits"] - hits == 1
    assert answers["perception"] == answers["control"]


@contextlib.contextmanager
def read_in_another_thread(pipe, stream, monkeypatch) -> Iterator[list[str]]:
    """A perception thread reads `stream`, its decode steps slowed; the block runs while that
    thread is inside one. Yields how the reading ended ('finished' or the error), once joined."""
    decode, in_step = pipe.backend.decode, threading.Event()

    def slow_decode(*args):
        in_step.set()
        time.sleep(0.2)
        return decode(*args)

    outcome: list[str] = []

    def read() -> None:
        try:
            for _ in stream:
                pass
            outcome.append("finished")
        except LlavaEdgeError as e:
            outcome.append(str(e))

    monkeypatch.setattr(pipe.backend, "decode", slow_decode)
    reader = threading.Thread(target=read)
    reader.start()
    assert in_step.wait(10)
    try:
        yield outcome
    finally:
        reader.join(30)
        monkeypatch.setattr(pipe.backend, "decode", decode)


def test_a_control_thread_closes_a_stream_another_thread_reads(pipe, monkeypatch):
    """A control thread cancelling the answer a perception thread is reading: close() raised
    ValueError ('generator already executing') whenever the reader was inside a decode step, and
    the chat turn it cancelled was rolled back only when the stream was garbage-collected."""
    chat = pipe.chat(frame(3), max_new_tokens=6)
    chat.ask("Is the door open?")
    fed, ids = chat.fed, list(chat.ids)
    stream = chat.stream("And the window?", max_new_tokens=200, ignore_eos=True)
    with read_in_another_thread(pipe, stream, monkeypatch) as outcome:
        stream.close()  # the reader is inside a decode step now
    assert outcome and "abandoned" in outcome[0]
    assert (chat.fed, chat.ids, chat.cache.length) == (fed, ids, fed)  # rolled back at once
    fresh = pipe.chat(frame(3), max_new_tokens=6)
    fresh.ask("Is the door open?")
    assert chat.ask("And the window?") == fresh.ask("And the window?")


def test_a_reader_asking_for_its_next_piece_while_the_closer_rolls_back(pipe, monkeypatch):
    """The other order: the control thread's close() is still rolling the turn back when the
    perception thread asks for its next piece. The reader got a bare ValueError ('generator
    already executing'), not the answer's one-line error."""
    from llava_edge.runtime.pipeline import _Turn

    chat = pipe.chat(frame(4), max_new_tokens=6)
    chat.ask("Is the door open?")
    fed, ids = chat.fed, list(chat.ids)
    stream = chat.stream("And the window?", max_new_tokens=50, ignore_eos=True)
    next(stream)
    rollback, rolling, go_on = _Turn.rollback, threading.Event(), threading.Event()

    def slow_rollback(turn):
        rolling.set()
        go_on.wait(10)
        rollback(turn)

    monkeypatch.setattr(_Turn, "rollback", slow_rollback)
    closer = threading.Thread(target=stream.close)
    closer.start()
    assert rolling.wait(10)
    try:
        with pytest.raises(LlavaEdgeError, match="abandoned"):
            next(stream)
    finally:
        go_on.set()
        closer.join(10)
    assert (chat.fed, chat.ids, chat.cache.length) == (fed, ids, fed)
    chat.ask("And the window?")  # the next turn goes on from the finished one
    assert len(chat.turns) == 2


def test_a_close_as_the_answer_ends_leaves_the_chat_as_the_reader_is_told(pipe, monkeypatch):
    """The control thread's close() lands after the last decode step, while the reader's thread
    is still recording the answer: the reader was told the answer was abandoned while the chat
    kept the turn, so asking again put the question in twice."""
    from llava_edge.runtime import pipeline as pipeline_module

    chat = pipe.chat(frame(5), max_new_tokens=4)
    chat.ask("Is the door open?")
    fed, ids = chat.fed, list(chat.ids)
    stream = chat.stream("And the window?", max_new_tokens=3, ignore_eos=True)
    timings = pipeline_module.timings

    def closed_meanwhile(*args):  # the answer's timings are taken just before it is recorded
        closer = threading.Thread(target=stream.close)
        closer.start()
        closer.join(10)
        return timings(*args)

    monkeypatch.setattr(pipeline_module, "timings", closed_meanwhile)
    with pytest.raises(LlavaEdgeError, match="abandoned"):
        for _ in stream:
            pass
    assert stream.answer is None
    assert (chat.fed, chat.ids, chat.cache.length, len(chat.turns)) == (fed, ids, fed, 1)


@pytest.mark.parametrize("entry", ["answer", "engine"])
def test_a_one_token_answer_past_the_time_limit_times_out(tiny_model_dir, monkeypatch, entry):
    """A yes/no question (max_new_tokens=1) whose image encode and prefill ran past the time
    limit came back as a normal answer, where two tokens raised TimedOut: the limit was checked
    only between decode steps, never after the prompt's."""
    with Pipeline.load(tiny_model_dir, threads=1, limits=Limits(timeout_s=0.1)) as slow_pipe:
        encode = slow_pipe.backend.encode_image

        def slow_encode(pixels):
            time.sleep(0.3)  # a device hiccup
            return encode(pixels)

        monkeypatch.setattr(slow_pipe.backend, "encode_image", slow_encode)
        with pytest.raises(TimedOut):
            if entry == "answer":
                slow_pipe.answer(frame(4), "Is the door open?", max_new_tokens=1)
            else:
                with BatchEngine(slow_pipe) as engine:
                    engine.submit(frame(4), "Is the door open?", max_new_tokens=1).result(30)


def test_a_chat_turn_started_while_another_thread_reads_the_last_is_refused(pipe, monkeypatch):
    """Starting a turn rolls back an unfinished earlier one; when another thread was inside the
    earlier turn's decode step, the new turn went on while that thread still wrote the chat's
    KV cache and then rolled it back under the new turn. It is refused instead, and the chat
    is as before the earlier question once that thread has stopped."""
    chat = pipe.chat(frame(5), max_new_tokens=6)
    chat.ask("Is the door open?")
    stream = chat.stream("And the window?", max_new_tokens=200, ignore_eos=True)
    with (
        read_in_another_thread(pipe, stream, monkeypatch) as outcome,
        pytest.raises(LlavaEdgeError, match="one thread at a time"),
    ):
        chat.ask("Is anyone there?")
    assert outcome and "abandoned" in outcome[0]
    fresh = pipe.chat(frame(5), max_new_tokens=6)
    fresh.ask("Is the door open?")
    assert chat.ask("Is anyone there?") == fresh.ask("Is anyone there?")
    assert chat.ids == fresh.ids


def test_leaving_a_requests_text_early_cancels_it(pipe, monkeypatch):
    """`for piece in request: break`, as leaving a Pipeline stream does, left the request
    decoding to its max_new_tokens in a row of the batch that no one read."""
    decode = pipe.backend.decode

    def slow_decode(*args):
        time.sleep(0.01)
        return decode(*args)

    monkeypatch.setattr(pipe.backend, "decode", slow_decode)
    with BatchEngine(pipe, max_batch=1) as engine:
        request = engine.submit(frame(6), "Describe the room.", max_new_tokens=500, ignore_eos=True)
        for _ in request:
            break
        with pytest.raises(Cancelled):
            request.result(30)
        assert engine.submit(frame(7), "Is the door open?", max_new_tokens=2).result(30)


def test_a_pipeline_sent_to_another_process_says_to_load_it_there(pipe):
    """A Pipeline handed to a spawned worker or a process pool is pickled, which failed on a lock
    deep inside it ("cannot pickle '_thread.lock' object"); it says what to do instead."""
    with pytest.raises(TypeError, match="load the model dir in each worker process"):
        pickle.dumps(pipe)
    assert pipe.generate(frame(8), "Is the door open?", max_new_tokens=2) is not None


EXIT_MID_ANSWER = """
import sys, threading, time
import onnxruntime as ort
from llava_edge.runtime import Pipeline

run = ort.InferenceSession.run
entered = threading.Event()

def slow_run(self, *args, **kwargs):  # a Jetson's long prefill: the exit comes in the middle
    entered.set()
    time.sleep(0.5)
    outputs = run(self, *args, **kwargs)
    print("call finished", flush=True)
    return outputs

ort.InferenceSession.run = slow_run
pipe = Pipeline.load(sys.argv[1], threads=1, graph_form="standard")

def worker():  # a robot node's daemon thread, answering when the app shuts down
    for _ in pipe.stream(None, "Go on.", max_new_tokens=10**4, ignore_eos=True):
        pass

threading.Thread(target=worker, daemon=True).start()
entered.wait(30)
print("exiting", flush=True)
"""


def test_an_app_that_exits_while_its_thread_is_inside_an_answer_exits_cleanly(tiny_model_dir):
    """An app's daemon thread inside a backend call as the interpreter exits: onnxruntime was
    torn down under the call, which aborts the process (exit 134, as often as not). Exit waits
    for the call in flight, and lets that thread start no other."""
    done = run_app(EXIT_MID_ANSWER, tiny_model_dir, "the exit never ended")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["exiting", "call finished"], done.stdout
    assert done.stdout.count("call finished") == 1


LAST_WORDS_AT_EXIT = """
import atexit, sys

def last_words():  # registered before the runtime is imported: runs after its exit handler
    pipe.generate(None, "Hi", max_new_tokens=2)
    print("answered", flush=True)

atexit.register(last_words)
from llava_edge.runtime import Pipeline

pipe = Pipeline.load(sys.argv[1], threads=1)
"""


def test_an_apps_own_exit_handler_may_still_ask_the_model(tiny_model_dir):
    """The exit parks a thread that would start a backend call once it began, so that no call
    runs on as the interpreter ends; an app's exit handler that runs after the runtime's (one
    registered before the runtime was imported) was parked too, on the thread running the
    exit itself, and the process never ended."""
    hung = "the app's exit handler was parked: the process never ended"
    done = run_app(LAST_WORDS_AT_EXIT, tiny_model_dir, hung)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["answered"]


ASKED_AT_EXIT_AS_A_WORKER_BEGINS = """
import atexit, sys, threading, time
import numpy as np

def last_words():  # registered before the runtime is imported: runs after its exit handler
    time.sleep(0.3)  # the worker has begun its answer about this frame, and is parked
    pipe.generate(frame, "What now?", max_new_tokens=2)
    print("answered", flush=True)

atexit.register(last_words)
from llava_edge.runtime import Pipeline, exit_guard

pipe = Pipeline.load(sys.argv[1], threads=1)
frame = np.full((40, 40, 3), 7, np.uint8)

def worker():  # a robot node's daemon thread, asking about the newest frame as the exit begins
    while exit_guard._exit_thread is None:
        time.sleep(0.001)
    pipe.generate(frame, "What is there?", max_new_tokens=2)

threading.Thread(target=worker, daemon=True).start()
"""


def test_an_exit_handler_asking_about_the_frame_a_parked_thread_encodes_is_answered(
    tiny_model_dir,
):
    """Threads asking about one new image wait for the one that encodes it; where that one was
    parked at exit before its encoder call, the app's exit handler asking about the same frame
    waited for it for good, and the process never ended."""
    hung = "the exit handler waited for a parked thread's encode: the process hung"
    done = run_app(ASKED_AT_EXIT_AS_A_WORKER_BEGINS, tiny_model_dir, hung)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["answered"]


def test_a_robots_last_frames_in_a_deque_are_asked_about_as_a_list_of_them(pipe):
    """An app keeps its camera's last frames in a deque(maxlen=K) and asks about them together:
    the public hint takes any sequence of images (a list[np.ndarray] too, which a hint of
    list[ImageInput] refused to type checkers), and the runtime read a deque as one image."""
    from collections import deque

    last = deque([frame(20), frame(21)], maxlen=2)
    question = "What changed?"
    expected = pipe.generate(list(last), question, max_new_tokens=6)
    assert pipe.generate(last, question, max_new_tokens=6) == expected
    chat = pipe.chat(last, max_new_tokens=6)
    assert chat.ask(question) == expected
    with BatchEngine(pipe, max_batch=1) as engine:
        assert engine.submit(last, question, max_new_tokens=6).result().text == expected


def test_a_robot_apps_type_checker_reads_the_runtimes_own_hints():
    """Without the PEP 561 marker in the installed package, mypy refused `from
    llava_edge.runtime import Pipeline` ('module is installed, but missing library stubs or
    py.typed marker') and typed every call of the API as Any."""
    from pathlib import Path

    import tomllib

    import llava_edge

    package = Path(llava_edge.__file__).parent
    config = tomllib.loads((package.parent / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["llava_edge"]
    assert (package / "py.typed").is_file()
