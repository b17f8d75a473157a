"""Which text models get a fused decoder, and how a model dir's forms are chosen."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from llava_edge.errors import LlavaEdgeError
from llava_edge.export.fused import can_fuse
from llava_edge.runtime import Pipeline


def test_can_fuse_says_why_not() -> None:
    assert can_fuse(LlamaConfig()) is None
    assert "activation" in can_fuse(LlamaConfig(hidden_act="gelu"))
    assert "head size 24" in can_fuse(LlamaConfig(hidden_size=96, num_attention_heads=4))
    dynamic = LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "dynamic rope" in can_fuse(dynamic)


@pytest.fixture(scope="module")
def unfused_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llava_edge.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("unfused") / "model"
    export_checkpoint(tiny_checkpoint, out, verify=False, fused=False, log=lambda *a: None)
    return out


def test_forms_are_chosen_and_refused_clearly(tiny_model_dir: Path, unfused_dir: Path) -> None:
    with Pipeline.load(tiny_model_dir) as pipe:
        assert pipe.backend.form == "fused"  # the CPU default where the dir has it
    with Pipeline.load(unfused_dir) as pipe:
        assert pipe.backend.form == "standard"
        assert not list(unfused_dir.glob("*_fused.onnx"))
    with pytest.raises(LlavaEdgeError, match="no fused graph form"):
        Pipeline.load(unfused_dir, graph_form="fused")
    with pytest.raises(LlavaEdgeError, match="unknown graph form"):
        Pipeline.load(tiny_model_dir, graph_form="fast")
