"""`Pipeline.load(..., background=True)`: the graphs open while the app goes on; a request's image
runs while the decoder still opens; the answer is the eager load's; a graph that fails to load
fails the call that needs it, with the eager load's message; close() leaves nothing opening."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from llava_edge.cli import main
from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Pipeline

PICTURE = np.random.default_rng(3).integers(0, 256, (40, 56, 3), np.uint8)
PROMPT = "What is in the picture?"


@pytest.fixture
def held_decoder(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The decoder's session opens only once the returned event is set."""
    release = threading.Event()
    real = ort.InferenceSession

    def opening(path: str, *args, **kwargs) -> ort.InferenceSession:
        if Path(path).name.startswith("decoder"):
            assert release.wait(60), "the decoder was never released"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", opening)
    return release


@pytest.fixture
def broken_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    real = ort.InferenceSession

    def opening(path: str, *args, **kwargs) -> ort.InferenceSession:
        if Path(path).name.startswith("decoder"):
            raise RuntimeError(
                "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Protobuf parsing failed"
            )
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", opening)


def test_the_image_runs_while_the_decoder_opens(
    tiny_model_dir: Path, held_decoder: threading.Event
) -> None:
    pipe = Pipeline.load(tiny_model_dir, threads=1, background=True, session_cache=False)
    try:
        features = pipe.image_features(PICTURE)  # the decoder is still held
        assert features.ndim == 2 and not held_decoder.is_set()
        held_decoder.set()
        answer = pipe.answer(PICTURE, PROMPT, max_new_tokens=6)
    finally:
        pipe.close()
    with Pipeline.load(tiny_model_dir, threads=1, session_cache=False) as eager:
        assert answer.token_ids == eager.answer(PICTURE, PROMPT, max_new_tokens=6).token_ids


def test_a_graph_that_fails_fails_the_call_that_needs_it(
    tiny_model_dir: Path, broken_decoder: None
) -> None:
    with pytest.raises(LlavaEdgeError, match="cannot load graph .*decoder") as eager:
        Pipeline.load(tiny_model_dir, threads=1, session_cache=False)
    pipe = Pipeline.load(tiny_model_dir, threads=1, background=True, session_cache=False)
    try:
        for call in (lambda: pipe.answer(PICTURE, PROMPT, max_new_tokens=2), pipe.wait_loaded):
            with pytest.raises(LlavaEdgeError) as late:
                call()
            assert str(late.value) == str(eager.value)
    finally:
        pipe.close()


def test_close_while_opening_leaves_no_session(
    tiny_model_dir: Path, held_decoder: threading.Event
) -> None:
    pipe = Pipeline.load(tiny_model_dir, threads=1, background=True, session_cache=False)
    threading.Timer(0.2, held_decoder.set).start()
    pipe.close()  # waits for the decoder still opening
    assert pipe.backend.sessions == {}
    with pytest.raises(LlavaEdgeError, match="closed"):
        pipe.backend.new_cache(1)
    with pytest.raises(LlavaEdgeError, match="closed"):
        pipe.answer(PICTURE, PROMPT, max_new_tokens=2)


def test_a_request_waiting_for_a_graph_is_refused_in_one_line_when_closed(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request waiting for the decoder to open, when another thread closes the pipeline (an
    app shutting down), gets the closed pipeline's error, not concurrent.futures' bare
    CancelledError."""
    release = threading.Event()
    real = ort.InferenceSession

    def opening(path: str, *args, **kwargs) -> ort.InferenceSession:
        if Path(path).name.startswith("projector"):  # the decoder opens after it, on one thread
            assert release.wait(60), "the projector was never released"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", opening)
    pipe = Pipeline.load(tiny_model_dir, threads=1, background=True, session_cache=False)
    decoder, waiting = pipe.backend._opening["decoder"], threading.Event()

    class Watched:  # the decoder's future, telling the test when a request waits on it
        def result(self, timeout: float | None = None):
            waiting.set()
            return decoder.result(timeout)

    pipe.backend._opening["decoder"] = Watched()
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            pipe.answer(None, PROMPT, max_new_tokens=2)
        except BaseException as e:
            errors.append(e)

    asker = threading.Thread(target=ask)
    asker.start()
    assert waiting.wait(30)
    closer = threading.Thread(target=pipe.close)
    closer.start()
    asker.join(30)
    release.set()
    closer.join(30)
    assert len(errors) == 1 and isinstance(errors[0], LlavaEdgeError), errors
    assert "closed" in str(errors[0])


def test_background_is_refused_for_the_tensorrt_backend(tiny_model_dir: Path) -> None:
    with pytest.raises(LlavaEdgeError, match="background loading is for the onnxruntime"):
        Pipeline.load(tiny_model_dir, backend="tensorrt", background=True)


def test_run_reports_a_graph_that_fails_in_one_line(
    tiny_model_dir: Path,
    broken_decoder: None,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`run` opens its graphs in the background: the failure surfaces at the answer, as one line."""
    monkeypatch.setenv("LLAVA_EDGE_SESSION_CACHE", "0")  # the graph itself, not a cached copy
    argv = ["run", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llava-edge run: error: cannot load graph ") and "\n" not in err


def test_a_time_limit_does_not_count_the_wait_for_graphs_still_opening(
    tiny_model_dir: Path, held_decoder: threading.Event
) -> None:
    """A large model's decoder may take longer to open than an answer may take: a request that
    waits for it is late only by what it takes once the model is loaded (a chat or a BatchEngine
    is made from a loaded model: its requests never wait)."""
    pipe = Pipeline.load(tiny_model_dir, threads=1, background=True, session_cache=False)
    try:
        threading.Timer(1.5, held_decoder.set).start()
        answer = pipe.answer(PICTURE, PROMPT, max_new_tokens=2, timeout_s=1.0)
        assert answer.token_ids
    finally:
        pipe.close()
    held_decoder.clear()
    pipe = Pipeline.load(tiny_model_dir, threads=1, background=True, session_cache=False)
    try:
        threading.Timer(1.5, held_decoder.set).start()
        assert "".join(pipe.stream(PICTURE, PROMPT, max_new_tokens=2, timeout_s=1.0)) == answer.text
    finally:
        pipe.close()
