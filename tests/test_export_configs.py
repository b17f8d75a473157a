"""Checkpoint configurations beyond the presets' (tests/test_export_variants.py and
tests/test_checkpoint_configs.py cover the published ones): export holds each to transformers
on the same weights, or refuses it in one line naming the setting.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def assert_export_refused(checkpoint: Path, out: Path, capsys, message: str) -> None:
    """Export refuses the checkpoint (its weights removed: a refusal before they load) in one
    line holding `message`, and writes nothing."""
    from llava_edge.cli import main

    (checkpoint / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(out)]) != 0
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error
    assert not out.exists()


@pytest.fixture
def processors_made(monkeypatch: pytest.MonkeyPatch) -> dict:
    """backend asked for -> the image processor AutoImageProcessor made for it."""
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    made = {}
    load = AutoImageProcessor.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        made[kwargs.get("backend")] = load(cls, *args, **kwargs)
        return made[kwargs.get("backend")]

    monkeypatch.setattr(AutoImageProcessor, "from_pretrained", classmethod(spy))
    return made


def _loaded_by(what: str, checkpoint: Path):
    if what == "export":
        from llava_edge.export.exporter import load_checkpoint

        return load_checkpoint(checkpoint).processor
    if what == "train":
        from llava_edge.training.train import _load_processor_and_config

        return _load_processor_and_config(checkpoint, checkpoint)[0]
    from llava_edge.export.baseline import TransformersRunner
    from llava_edge.runtime.bench import Workload

    workload = Workload(question_tokens=2, new_tokens=2, threads=1, runs=1)
    return TransformersRunner(checkpoint, workload, "USER: <image>\nHi? ASSISTANT:").processor


@pytest.mark.parametrize("what", ["export", "train", "bench --baseline"])
def test_the_processor_is_read_with_the_pil_backend(
    tiny_checkpoint: Path, processors_made: dict, what: str
) -> None:
    """The runtime replays the PIL backend's arithmetic. Where torchvision is installed (as in
    NVIDIA's Jetson PyTorch containers), transformers picks its torchvision backend instead, whose
    resize differs by up to 0.014 in normalised pixels: every export then failed verification,
    and training learnt from other pixels than the runtime's. torchvision cannot be installed
    beside the CPU torch here, so the request itself is checked; and the tokenizer is not handed
    the backend too (its own `backend` says "tokenizers")."""
    processor = _loaded_by(what, tiny_checkpoint)
    assert processor.image_processor is processors_made.get("pil")
    assert type(processor.image_processor).__name__.endswith("Pil")
    assert processor.tokenizer.backend == "tokenizers"


@pytest.mark.parametrize("what", ["export", "train", "bench --baseline"])
def test_the_processor_loads_where_transformers_hides_auto_image_processor(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """transformers 5.4 to 5.17 export AutoImageProcessor at the top level only where
    torchvision is installed (its module names TorchvisionBackend); elsewhere the name is a
    placeholder that raises ImportError, and export and train failed on every checkpoint."""
    import transformers

    class Placeholder:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise ImportError("AutoImageProcessor requires the Torchvision library")

    monkeypatch.setattr(transformers, "AutoImageProcessor", Placeholder)
    processor = _loaded_by(what, tiny_checkpoint)
    assert type(processor.image_processor).__name__.endswith("Pil")


NEXT = {"model_type": "llava_next", "image_grid_pinpoints": [[64, 128], [128, 64]]}
# name -> (changes to processor_config.json's image_processor, and to config.json under
# "config"; what the one-line refusal says)
REFUSED_PROCESSORS = {
    # transformers' CLIP tower fails on 64x48 pixel values ("doesn't match model (64*64)")
    "crop-not-square": (
        {"crop_size": {"height": 64, "width": 48}},
        "its image processor makes 48x64 pixel values of a 48x40 image (processor_config.json's "
        "size {'shortest_edge': 64}, do_center_crop True, crop_size {'height': 64, 'width': 48}), "
        "its vision tower takes 64x64",
    ),
    # a shortest-edge resize without a crop keeps the image's aspect ratio
    "resize-without-crop": (
        {"do_center_crop": False},
        "makes 76x64 pixel values of a 48x40 image (processor_config.json's size "
        "{'shortest_edge': 64}, do_center_crop False",
    ),
    # transformers' LlavaImageProcessorPil pads with the mean colour, which it reads as a list
    # only (a TypeError on a scalar image_mean)
    "pad-with-scalar-mean": (
        {"image_processor_type": "LlavaImageProcessor", "do_pad": True, "image_mean": 0.5},
        "its processor fails on a 48x40 image (TypeError: ",
    ),
    # transformers' normalize takes one number or one per channel; LLaVA-NeXT's processor is
    # not run before the weights load, and the runtime failed on such a mean at its first image
    "next-two-channel-mean": (
        {"image_mean": [0.5, 0.5], "config": NEXT},
        "processor_config.json's image_mean [0.5, 0.5] must be one number or 3 (one per RGB "
        "channel)",
    ),
    "std-of-text": (
        {"image_std": ["0.5", "0.5", "0.5"]},
        "processor_config.json's image_std ['0.5', '0.5', '0.5'] must be one number or 3",
    ),
    # transformers' PIL backend resizes with bilinear in place of a name; its torchvision backend
    # refuses one (export read it with int(): a ValueError traceback)
    "resample-by-name": (
        {"resample": "bicubic", "config": NEXT},
        "processor_config.json's resample 'bicubic' must be one of PIL's filter numbers (0 "
        "nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming): write 3 for 'bicubic'",
    ),
    "resample-past-the-filters": ({"resample": 7}, "processor_config.json's resample 7 must be"),
    # LLaVA-NeXT resizes its tiles by resample whether or not do_resize is set
    "next-tiles-resample-by-name": (
        {"resample": "bicubic", "do_resize": False, "config": NEXT},
        "processor_config.json's resample 'bicubic' must be one of PIL's filter numbers",
    ),
}


def test_a_resample_that_nothing_reads_is_not_read(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Without a resize, LLaVA's processor never reads resample (transformers runs such a
    checkpoint): export took it all the same, with int(), and failed on a name with a
    ValueError traceback."""
    import json
    import shutil

    from llava_edge.export.exporter import _image_spec, load_checkpoint
    from llava_edge.runtime.image import preprocess

    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    settings = json.loads((checkpoint / "processor_config.json").read_text())
    settings["image_processor"].update(do_resize=False, resample="bicubic")
    (checkpoint / "processor_config.json").write_text(json.dumps(settings))
    loaded = load_checkpoint(checkpoint)
    spec = _image_spec(loaded.processor.image_processor, loaded.model.config)
    assert spec.resize is None
    image = Image.new("RGB", (70, 66), (200, 10, 10))
    expected = loaded.processor.image_processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image, spec), expected, atol=1e-5)


@pytest.mark.parametrize("name", list(REFUSED_PROCESSORS))
def test_a_processor_the_tower_cannot_take_is_refused(tmp_path: Path, capsys, name: str) -> None:
    """Pixel values of another size than the tower's input, or a processor that fails: one line
    before the weights load (they are deleted here), not a traceback."""
    import json

    from llava_edge.training.checkpoint import init_checkpoint

    changes, message = REFUSED_PROCESSORS[name]
    changes = dict(changes)
    checkpoint = init_checkpoint(tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(changes.pop("config", {}))  # config.json's own changes
    config["vision_config"]["hidden_act"] = "gelu"  # an erf GELU tower (CLIP's is quick_gelu)
    (checkpoint / "config.json").write_text(json.dumps(config))
    settings = json.loads((checkpoint / "processor_config.json").read_text())
    settings["image_processor"].update(changes)
    (checkpoint / "processor_config.json").write_text(json.dumps(settings))
    assert_export_refused(checkpoint, tmp_path / "out", capsys, message)


def test_unusual_settings_export_token_exact(tmp_path: Path) -> None:
    """One checkpoint of settings no preset has, verified against transformers in both forms
    (pixels, features, logits, 32 greedy tokens): Llama with biases on every projection
    (attention_bias, mlp_bias: the fused decoder writes them by hand), an erf GELU MLP, linear
    rope, an odd rms_norm_eps; a bias-free SiLU projector; a CLIP tower with an erf GELU; mean/std
    0.5 and a bilinear resize."""
    import json

    import onnx
    from conftest import quiet
    from safetensors.torch import load_file
    from test_export_variants import _random_biases

    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.manifest import Manifest
    from llava_edge.training.checkpoint import init_checkpoint

    checkpoint = init_checkpoint(
        tmp_path / "checkpoint",
        seed=12,
        projector_hidden_act="silu",
        multimodal_projector_bias=False,
        text={
            "attention_bias": True,
            "mlp_bias": True,
            "hidden_act": "gelu",
            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
            "rms_norm_eps": 1e-2,
        },
    )
    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "gelu"  # an erf GELU tower (CLIP's is quick_gelu)
    (checkpoint / "config.json").write_text(json.dumps(config))
    settings = json.loads((checkpoint / "processor_config.json").read_text())
    settings["image_processor"].update(image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2)
    (checkpoint / "processor_config.json").write_text(json.dumps(settings))
    _random_biases(checkpoint)  # transformers starts them at zero, where a misplaced one hides
    report = export_checkpoint(checkpoint, tmp_path / "model", log=quiet)
    assert set(report["forms"]) == {"standard", "fused"}
    for form in report["forms"].values():
        assert form["passed"] and form["greedy_tokens_matched"] == form["greedy_tokens_total"]
        assert form["pixel_max_abs_diff"] == 0.0
    manifest = Manifest.load(tmp_path / "model")
    assert manifest.graphs["decoder"].fused is not None
    # the fused vision form's details name the GELU it holds (not CLIP's usual QuickGelu)
    vision = manifest.graphs["vision_encoder"].fused
    ops = {n.op_type for n in onnx.load(str(tmp_path / "model" / vision.file)).graph.node}
    assert "BiasGelu" in ops and "QuickGelu" not in ops
    assert "BiasGelu" in vision.details["form"] and "QuickGelu" not in vision.details["form"]
    assert (manifest.image.mean, manifest.image.resample) == ([0.5] * 3, 2)
    # the settings really shape the model (else the check proves nothing)
    tensors = load_file(checkpoint / "model.safetensors")
    biases = [k for k in tensors if k.endswith(("o_proj.bias", "down_proj.bias"))]
    assert len(biases) == 4 and all(tensors[k].abs().max() > 0 for k in biases)
    assert not any("multi_modal_projector" in k and k.endswith("bias") for k in tensors)
    assert config["text_config"]["hidden_act"] == "gelu"
    assert config["projector_hidden_act"] == "silu"


def test_a_tokenizer_past_the_embedding_table_is_refused(tmp_path: Path, capsys) -> None:
    """<image> added to the tokenizer but the embeddings not resized: transformers fails with an
    IndexError in verification, after the weights load; one line before loading instead."""
    from llava_edge.cli import main
    from llava_edge.training.checkpoint import init_checkpoint

    # the tiny tokenizer: 512 tokens, then <image> (512) and <pad> (513)
    checkpoint = init_checkpoint(
        tmp_path / "checkpoint", text={"vocab_size": 512, "pad_token_id": 0}
    )
    (checkpoint / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err.strip()
    assert "the tokenizer has 514 tokens, the text model's embedding table 512 rows" in error
    assert len(error.splitlines()) == 1 and not (tmp_path / "out").exists()


# name -> (config.json changes, what the one-line refusal says)
REFUSED_CONFIGS = {
    # 4 query heads over 3 KV heads: a reshape traceback from tracing, after loading
    "kv-heads-not-dividing": (
        {"text_config": {"num_key_value_heads": 3}},
        "num_attention_heads 4 is not a multiple of its num_key_value_heads 3",
    ),
    "no-kv-heads": (  # a ZeroDivisionError as the model was built
        {"text_config": {"num_key_value_heads": 0}},
        "num_attention_heads 4 is not a multiple of its num_key_value_heads 0",
    ),
    # a window of no tokens: transformers' attention failed on a mask of another size
    "window-of-nothing": (
        {"text_config": {"model_type": "mistral", "sliding_window": 0}},
        "this model's context of 0 tokens (its sliding_window) cannot hold one image",
    ),
    # transformers' strict config validation raised its own exception type: a traceback
    "strategy-unknown": (
        {"vision_feature_select_strategy": "cls_patch"},
        "config.json: Validation error for field 'vision_feature_select_strategy': TypeError: "
        "Field 'vision_feature_select_strategy' expected one of ('default', 'full'), got cls_patch",
    ),
    # names transformers has no code for: a KeyError as the model is built, after loading began
    "text-activation-unknown": (
        {"text_config": {"hidden_act": "swiglu"}},
        "config.json's text_config.hidden_act 'swiglu' is no activation transformers knows",
    ),
    "projector-activation-unknown": (
        {"projector_hidden_act": "swiglu"},
        "config.json's projector_hidden_act 'swiglu' is no activation transformers knows",
    ),
    "rope-type-unknown": (
        {"text_config": {"rope_scaling": {"rope_type": "ntk", "factor": 2.0}}},
        "text_config rope type 'ntk' is unknown to transformers",
    ),
    # transformers' rope validation raises KeyError as the config loads
    "rope-without-its-factor": (
        {"text_config": {"rope_scaling": {"rope_type": "linear"}}},
        "config.json: Missing required keys in `rope_parameters` for 'rope_type'='linear'",
    ),
    # a projector of no inputs: a size-mismatch RuntimeError as the weights load
    "no-feature-layers": ({"vision_feature_layer": []}, "vision_feature_layer is an empty list"),
    # the runtime's first image failed, telling to re-export
    "next-without-pinpoints": (
        {"model_type": "llava_next", "image_grid_pinpoints": []},
        "LLaVA-NeXT's image_grid_pinpoints is empty",
    ),
    # a LLaVA-OneVision checkpoint's refusals named it LLaVA-NeXT
    "onevision-without-pinpoints": (
        {"model_type": "llava_onevision", "image_grid_pinpoints": []},
        "LLaVA-OneVision's image_grid_pinpoints is empty",
    ),
    "onevision-clip-full": (
        {"model_type": "llava_onevision", "vision_feature_select_strategy": "full"},
        "LLaVA-OneVision with a clip_vision_model tower and vision_feature_select_strategy 'full'",
    ),
}


def checkpoint_with_config(path: Path, changes: dict) -> Path:
    """A tiny checkpoint whose config.json takes `changes` (a dict value updates that section)."""
    import json

    from llava_edge.training.checkpoint import init_checkpoint

    checkpoint = init_checkpoint(path)
    config = json.loads((checkpoint / "config.json").read_text())
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (checkpoint / "config.json").write_text(json.dumps(config))
    return checkpoint


@pytest.mark.parametrize("name", list(REFUSED_CONFIGS))
def test_a_config_transformers_cannot_run_is_refused(tmp_path: Path, capsys, name: str) -> None:

    changes, message = REFUSED_CONFIGS[name]
    checkpoint = checkpoint_with_config(tmp_path / "checkpoint", changes)
    assert_export_refused(checkpoint, tmp_path / "out", capsys, message)


def test_llava_next_processor_pinpoints_unlike_the_configs_are_refused(
    tmp_path: Path, capsys
) -> None:
    """The processor tiling on other grids than the model packs: transformers answers wrongly
    about images the two place differently (silently), the runtime would follow config.json's;
    export passed verification (its picture lands on the same grid under both)."""
    import json

    from hf_checkpoints import interleave_qwen, write_checkpoint

    from llava_edge.cli import main

    config = interleave_qwen(
        model_type="llava_next",
        architectures=["LlavaNextForConditionalGeneration"],
        image_grid_pinpoints=[[60, 120], [120, 60], [120, 120]],
    )
    checkpoint = write_checkpoint(tmp_path / "checkpoint", config)
    settings = json.loads((checkpoint / "processor_config.json").read_text())
    settings["image_processor"]["image_grid_pinpoints"] = [[60, 60], [120, 120]]
    (checkpoint / "processor_config.json").write_text(json.dumps(settings))
    (checkpoint / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err.strip()
    assert (
        "processor_config.json's image_grid_pinpoints [[60, 60], [120, 120]] differ from "
        "config.json's [[60, 120], [120, 60], [120, 120]]" in error
    )
    assert len(error.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_window_no_layer_uses_does_not_cap_the_context(tmp_path: Path) -> None:
    """Qwen2 with use_sliding_window but max_window_layers at its depth slides in no layer: the
    context is max_position_embeddings, not the window, and a prompt past the window still gives
    transformers' logits in both forms."""
    import numpy as np
    import torch
    from conftest import quiet
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.manifest import Manifest
    from llava_edge.runtime import Pipeline
    from llava_edge.training.checkpoint import init_checkpoint

    window = 160
    checkpoint = init_checkpoint(
        tmp_path / "checkpoint",
        backbone="qwen2",
        text={"use_sliding_window": True, "sliding_window": window, "max_window_layers": 2},
    )
    config = AutoConfig.from_pretrained(checkpoint).text_config
    assert config.sliding_window == window and "sliding_attention" not in config.layer_types
    export_checkpoint(checkpoint, tmp_path / "model", verify=False, log=quiet)
    manifest = Manifest.load(tmp_path / "model")
    assert manifest.text.max_context == config.max_position_embeddings > window
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    table = np.load(tmp_path / "model" / manifest.embeddings)
    ids = np.random.default_rng(0).integers(0, 500, (1, 2 * window))
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(ids)).logits[0, -1].numpy()
    for form in ("standard", "fused"):
        with Pipeline.load(tmp_path / "model", graph_form=form) as pipe:
            cache = pipe.backend.new_cache(1)
            positions = np.arange(ids.shape[1])[None]
            logits = pipe.backend.decode(table[ids], np.ones_like(ids), positions, cache)
        np.testing.assert_allclose(logits[0], reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["strategy-unknown", "rope-without-its-factor"])
def test_train_and_the_model_loader_refuse_such_configs_in_one_line_too(
    tmp_path: Path, capsys, name: str
) -> None:
    """transformers' strict validation raises its own exception types as config.json loads:
    every command that reads a checkpoint's config (train; merge-lora's base and bench's
    baseline through load_model) says what is wrong in one line, as export does."""
    import json

    from llava_edge.cli import main
    from llava_edge.errors import LlavaEdgeError
    from llava_edge.modeling import load_model

    changes, message = REFUSED_CONFIGS[name]
    checkpoint = checkpoint_with_config(tmp_path / "checkpoint", changes)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "a", "conversations": []}]))
    capsys.readouterr()
    argv = ["train", "--stage", "1", "--model", str(checkpoint), "--data", str(data)]
    assert main([*argv, "--out", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error
    with pytest.raises(LlavaEdgeError, match="config.json: "):
        load_model(checkpoint)


def test_llava_onevision_with_a_clip_tower_exports_token_exact(tmp_path: Path, capsys) -> None:
    """LlavaOnevisionProcessor counts num_image_tokens less one under 'default' (CLIP's CLS
    token, which the model drops), so a CLIP tower's processor holds its patches and that token:
    export refused such a checkpoint, saying transformers could not run it, and took one whose
    count transformers' own forward refuses (a traceback in verification). The first exports
    token-exact in both forms; the second is refused in one line."""
    import json

    from conftest import quiet
    from hf_checkpoints import onevision_qwen, write_checkpoint

    from llava_edge.export.exporter import export_checkpoint

    config = onevision_qwen(
        vision={"model_type": "clip_vision_model", "image_size": 28},
        vision_feature_select_strategy="default",
    )
    checkpoint = write_checkpoint(tmp_path / "checkpoint", config, chat_template=None)
    settings = json.loads((checkpoint / "processor_config.json").read_text())
    assert settings["num_image_tokens"] == (28 // 14) ** 2 + 1
    report = export_checkpoint(checkpoint, tmp_path / "model", log=quiet)
    assert set(report["forms"]) == {"standard", "fused"}
    for form in report["forms"].values():
        assert form["passed"] and form["greedy_tokens_matched"] == form["greedy_tokens_total"]
    settings["num_image_tokens"] = (28 // 14) ** 2  # the patches alone: one token short
    (checkpoint / "processor_config.json").write_text(json.dumps(settings))
    assert_export_refused(
        checkpoint,
        tmp_path / "out",
        capsys,
        "num_image_tokens 4 is not the vision tower's 4 patches and its CLS token",
    )


def test_verification_stops_at_the_tokenizers_eos_where_generation_config_names_none(
    tiny_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """generation_config.json without eos_token_id (one saved with sampling settings alone): the
    runtime stops at the tokenizer's EOS, transformers' generate() at none, so export failed
    verification ("ours the end of the answer") on any answer that ends within 32 tokens. The
    EOS row here scores as one of the greedy answer's tokens, so the answer ends early."""
    import json
    import shutil

    from conftest import quiet
    from safetensors.torch import load_file, save_file

    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.export.verify import QUESTION, sample_image
    from llava_edge.runtime import Pipeline

    with Pipeline.load(tiny_model_dir) as pipe:
        answer = pipe.answer(sample_image(), QUESTION, max_new_tokens=32, ignore_eos=True)
        eos = pipe.manifest.tokens.eos_token_ids[0]
    tokens = answer.token_ids
    step = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    weights = load_file(checkpoint / "model.safetensors")
    head = weights["language_model.lm_head.weight"]
    head[eos] = head[tokens[step]] * 1.01  # EOS wins where that token would
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    del generation["eos_token_id"]
    (checkpoint / "generation_config.json").write_text(json.dumps(generation))
    report = export_checkpoint(checkpoint, tmp_path / "model", log=quiet)
    for form in report["forms"].values():
        assert form["passed"] and form["greedy_tokens_matched"] == form["greedy_tokens_total"]
        assert form["greedy_tokens_total"] <= step + 1  # the answer ended at EOS


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_a_decomposed_gelu_is_the_gelu_op_and_onnxruntime_fuses_the_erf_one(
    approximate: str, dtype: str, tmp_path: Path
) -> None:
    """decompose_gelus writes two Gelus of opset 20 (named by their outputs, so names stay
    unique) as their Erf or Tanh ops, the same function as onnxruntime's Gelu kernel but for
    float rounding; onnxruntime's CPU provider fuses the fp32 erf pattern back into one Gelu at
    load, and leaves the tanh one as its ops (the fused vision form makes it FastGelu)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from llava_edge.export.exporter import decompose_gelus

    kind = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [
            helper.make_node("Gelu", ["x"], ["a"], approximate=approximate),
            helper.make_node("Gelu", ["a"], ["y"], approximate=approximate),
        ],
        "gelus",
        [helper.make_tensor_value_info("x", kind, [4, 256])],
        [helper.make_tensor_value_info("y", kind, [4, 256])],
    )
    gelu = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    decomposed = decompose_gelus(
        onnx.ModelProto.FromString(gelu.SerializeToString()), np.dtype(dtype)
    )
    onnx.checker.check_model(decomposed, full_check=True)
    nodes, initializers = decomposed.graph.node, decomposed.graph.initializer
    names = [n.name for n in nodes] + [i.name for i in initializers]
    assert len(names) == len(set(names)) and "Gelu" not in {n.op_type for n in nodes}

    x = (np.random.default_rng(0).standard_normal((4, 256)) * 4).astype(dtype)
    expected = ort.InferenceSession(gelu.SerializeToString()).run(None, {"x": x})[0]
    plain, loaded = ort.SessionOptions(), ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    loaded.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    loaded.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    for options in (plain, loaded):
        got = ort.InferenceSession(decomposed.SerializeToString(), options).run(None, {"x": x})[0]
        # a rounding of the result: 2 ** -9 at fp16 on values up to about 13
        np.testing.assert_allclose(got, expected, rtol=0, atol=4e-3 if dtype == "float16" else 2e-6)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "loaded.onnx")).graph.node}
    if dtype == "float32":
        assert ops == ({"Gelu"} if approximate == "none" else {"Mul", "Add", "Tanh"}), ops


def test_a_siglip_tower_at_opset_20_is_a_graph_tensorrt_103_takes(tmp_path: Path) -> None:
    """From opset 20 torch.onnx writes a GELU as one ONNX Gelu (SigLIP's with approximate='tanh',
    the projector's erf one), which TensorRT 10.3 is not documented to parse: export at --opset 20
    gave standard graphs (the TensorRT form) that the TensorRT check refuses. They hold the Tanh
    and Erf ops of the opsets before 20, still token-exact against transformers, and the fused
    vision form still has SigLIP's GELU as FastGelu, equal to the standard graph but for float
    rounding."""
    import onnx
    from conftest import quiet
    from hf_checkpoints import interleave_qwen, write_checkpoint

    from llava_edge.calib.trt_check import check_model_dir
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.export.fused import _vision_gap
    from llava_edge.manifest import Manifest

    checkpoint = write_checkpoint(tmp_path / "checkpoint", interleave_qwen())
    report = export_checkpoint(checkpoint, tmp_path / "model", opset=20, log=quiet)
    assert report["forms"]
    for form in report["forms"].values():
        assert form["passed"] and form["greedy_tokens_matched"] == form["greedy_tokens_total"]
    assert check_model_dir(tmp_path / "model") == {
        "vision_encoder": [],
        "projector": [],
        "decoder": [],
    }
    graphs = Manifest.load(tmp_path / "model").graphs
    ops = {
        name: {n.op_type for n in onnx.load(str(tmp_path / "model" / g.file)).graph.node}
        for name, g in graphs.items()
    }
    assert "Tanh" in ops["vision_encoder"] and "Erf" in ops["projector"]
    vision = graphs["vision_encoder"]
    assert vision.fused is not None, vision.details.get("no_fused_form")
    fused = tmp_path / "model" / vision.fused.file
    fused_ops = {n.op_type for n in onnx.load(str(fused)).graph.node}
    assert "FastGelu" in fused_ops and not fused_ops & {"Gelu", "BiasGelu"}
    assert _vision_gap(tmp_path / "model" / vision.file, fused, vision) < 1e-5


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_a_window_in_a_text_model_that_never_slides_caps_nothing(model_type: str) -> None:
    """Llama and Gemma attend to every token whatever `sliding_window` their config.json holds
    (one carried over from a Mistral or Qwen config): export capped their context at it, and
    refused a --max-context past it."""
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig

    from llava_edge.export.exporter import _max_context

    text = AutoConfig.for_model(
        model_type, max_position_embeddings=1024, num_hidden_layers=2, sliding_window=256
    )
    assert text.sliding_window == 256
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=64, patch_size=8), text_config=text
    )
    assert _max_context(config, None) == 1024
    assert _max_context(config, 512) == 512


def test_verification_answers_within_a_context_its_prompt_nearly_fills(
    tmp_path: Path, capsys
) -> None:
    """A --max-context that holds one image and 64 tokens but not the chat template's prompt and
    32 answer tokens (llava_llama_2's system prompt takes over 100): export failed verification,
    the runtime's answer cut at the context called a divergence from transformers, or, where
    the prompt alone filled it, the runtime's "shorten the prompt ... or start a new chat". The
    answer compared is as long as the context holds; a context the prompt alone fills is
    refused in a line saying so, before any graph is written."""
    from conftest import quiet

    from llava_edge.cli import main
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.training.checkpoint import init_checkpoint

    checkpoint = init_checkpoint(tmp_path / "checkpoint", layers=1, template="llava_llama_2")
    report = export_checkpoint(checkpoint, tmp_path / "model", max_context=230, log=quiet)
    for form in report["forms"].values():
        assert form["passed"] and form["greedy_tokens_matched"] == form["greedy_tokens_total"]
        assert 0 < form["greedy_tokens_total"] < 32
    capsys.readouterr()
    argv = [
        "export",
        str(checkpoint),
        str(tmp_path / "short"),
        "--max-context",
        "200",
        "--no-fused",
    ]
    assert main(argv) != 0
    error = capsys.readouterr().err
    line = error.strip().splitlines()[-1]  # after the progress bars
    assert line.startswith("llava-edge export: error: ") and "Traceback" not in error
    assert "export decoder" not in error  # refused before the graphs
    assert "leaves no room for an answer in the exported context of 200" in line
    assert "--max-context" in line and not (tmp_path / "short").exists()
