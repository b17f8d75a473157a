"""A robot app's use of the runtime from several threads: a perception thread and a control
thread asking about the same camera frame at once."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llava_edge.runtime import Pipeline


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
