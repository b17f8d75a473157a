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
    assert "activation 'relu6'" in can_fuse(LlamaConfig(hidden_act="relu6"))
    assert "head size 24" in can_fuse(LlamaConfig(hidden_size=96, num_attention_heads=4))


# name -> LlamaConfig keys: MLP activations other than SiLU; dynamic rope (inside
# max_position_embeddings, the export's longest context, its tables never change) and linear.
FUSED_TEXT = {
    "gelu": {"hidden_act": "gelu"},
    "gelu-tanh": {"hidden_act": "gelu_pytorch_tanh"},
    "gelu-new": {"hidden_act": "gelu_new"},
    "quick-gelu": {"hidden_act": "quick_gelu"},
    "relu": {"hidden_act": "relu"},
    "swish": {"hidden_act": "swish"},
    "dynamic-rope": {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
    "linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
}


@pytest.mark.parametrize(("dtype", "opset"), [("float32", 13), ("float16", 20)])
@pytest.mark.parametrize("name", list(FUSED_TEXT))
def test_fused_decoder_equals_transformers(name: str, dtype: str, opset: int) -> None:
    """The fused decoder's prefill logits are transformers' (fp32: to 1e-5 of their range; the
    SiLU model's logits differ by far more, so the activation is the config's). fp16 is held to
    twice the error transformers' own model makes in fp16: that error follows the random weights,
    which each transformers release draws in its own order (from 1e-3 to 6e-3 of the range).
    Written at the lowest and the highest opset `export --opset` takes."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.activations import ACT2FN

    from llava_edge.export.fused import build_fused_decoder
    from llava_edge.manifest import TextSpec

    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=128,
        initializer_range=0.3,  # the MLP's inputs reach where the activations differ
        **FUSED_TEXT[name],
    )
    assert can_fuse(text) is None
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision))
    model.eval()
    graph = build_fused_decoder(model, TextSpec(64, 2, 4, 2, 16, 100, 128, dtype), opset)
    assert [o.version for o in graph.opset_import if o.domain == ""] == [opset]
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    seq = 9
    embeds = torch.randn(1, seq, 64)
    feed = {
        "inputs_embeds": embeds.numpy().astype(dtype),
        "seqlens_k": np.asarray([seq - 1], np.int32),
        "total_sequence_length": np.asarray(seq, np.int32),
    }
    for i in range(2):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 0, 16), dtype)
    logits = session.run(["logits"], feed)[0][0]
    with torch.no_grad():
        reference = model(inputs_embeds=embeds).logits[0, -1].numpy()
        half = model.half()(inputs_embeds=embeds.half()).logits[0, -1].float().numpy()
        model.float()
        for layer in model.model.language_model.layers:
            layer.mlp.act_fn = ACT2FN["silu"]
        silu = model(inputs_embeds=embeds).logits[0, -1].numpy()
    scale = np.abs(reference).max()
    gap = np.abs(logits - reference).max() / scale
    assert gap < (1e-5 if dtype == "float32" else 2 * np.abs(half - reference).max() / scale)
    if "hidden_act" in FUSED_TEXT[name] and name != "swish":
        assert np.abs(silu - reference).max() / scale > 1e-2


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


def test_graphs_carry_the_oldest_ir_version_their_opsets_allow(tiny_model_dir: Path) -> None:
    """The installed onnx's newest IR version (14 for onnx 1.23) is one an older onnxruntime
    refuses to load ("Unsupported model IR version: 14, max supported IR version: 13", 1.30)."""
    import onnx
    from onnx import helper

    graphs = sorted(tiny_model_dir.glob("*.onnx"))
    assert "decoder_fused.onnx" in {g.name for g in graphs}
    for path in graphs:
        model = onnx.load(str(path), load_external_data=False)
        oldest = helper.find_min_ir_version_for(model.opset_import, ignore_unknown=True)
        assert model.ir_version == oldest, path.name
