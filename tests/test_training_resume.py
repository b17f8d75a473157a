"""train --resume of a full run: the model is built once, from the checkpoint's weights; and the
options that decide which samples a saved step counter refers to must be the saved run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_edge.training.synth import synthesize
from llava_edge.training.train import train

FAST = dict(
    global_batch_size=2,
    warmup_ratio=0.0,
    gradient_checkpointing=False,
    progress=False,
)


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return synthesize(tmp_path / "data", train=4, test=0, seed=1)


def test_a_full_run_resumes_with_the_model_built_once_from_the_checkpoint(
    tiny_checkpoint, data, tmp_path, monkeypatch
):
    """At 7B in fp32 a second model is 28 GB more: resuming must not build one to copy from."""
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "out"
    args = (1, tiny_checkpoint, data["captions"], out)
    train(*args, images=data["images"], max_steps=2, save_steps=2, force=True, **FAST)
    saved = load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors"))

    built = []
    init = LlavaForConditionalGeneration.__init__

    def counted(self, *a, **k):
        built.append(self)
        init(self, *a, **k)

    monkeypatch.setattr(LlavaForConditionalGeneration, "__init__", counted)
    # max_steps reached already: no step trains, and the result is the checkpoint's weights.
    result = train(*args, images=data["images"], max_steps=2, resume=True, **FAST)
    assert result.steps == 2
    assert len(built) == 1
    final = load_file(str(out / "model.safetensors"))
    start = load_file(str(tiny_checkpoint / "model.safetensors"))
    projector = [k for k in saved if k.startswith("multi_modal_projector.")]
    assert projector and not all(torch.equal(saved[k], start[k]) for k in projector)
    for key in saved:
        torch.testing.assert_close(final[key], saved[key], atol=0, rtol=0)
