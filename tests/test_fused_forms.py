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


def test_fused_vision_form_is_written_only_when_it_equals_the_standard(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fused vision graph whose features differ from the standard graph's is not written, and
    fp16 graphs and unknown towers get none: each with its reason."""
    import dataclasses

    import onnx
    from onnxruntime.transformers import optimizer
    from transformers import CLIPVisionConfig

    from llava_edge.export.fused import VISION_FUSED_FILE, write_fused_vision
    from llava_edge.manifest import Manifest

    manifest = Manifest.load(tiny_model_dir)
    spec = manifest.graphs["vision_encoder"]
    standard = tiny_model_dir / spec.file
    config = CLIPVisionConfig(hidden_size=32, num_attention_heads=2)
    fused, reason = write_fused_vision(standard, spec, config, tmp_path)
    assert reason is None and (tmp_path / fused.file).is_file()
    (tmp_path / fused.file).unlink()

    fuse = optimizer.optimize_model

    def fuse_wrongly(*args, **kwargs):  # the fusions with one attention weight scaled
        optimized = fuse(*args, **kwargs)
        node = next(n for n in optimized.model.graph.node if n.op_type == "Attention")
        weight = next(w for w in optimized.model.graph.initializer if w.name == node.input[1])
        array = onnx.numpy_helper.to_array(weight) * 1.5
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        return optimized

    monkeypatch.setattr(optimizer, "optimize_model", fuse_wrongly)
    fused, reason = write_fused_vision(standard, spec, config, tmp_path)
    assert fused is None and "differ from the standard graph's" in reason
    assert not (tmp_path / VISION_FUSED_FILE).exists()

    fp16 = dataclasses.replace(spec, precision="fp16")
    assert "fp16" in write_fused_vision(standard, fp16, config, tmp_path)[1]
    config.model_type = "dinov2"
    assert "'dinov2'" in write_fused_vision(standard, spec, config, tmp_path)[1]
