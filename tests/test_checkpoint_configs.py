"""Published checkpoints' configurations, built tiny from their config.json (tests/hf_checkpoints.py).

llava-interleave-qwen-0.5b-hf (a SigLIP tower with every patch kept, Qwen2 with tied embeddings
and q/k/v biases, a ChatML-like template without BOS) exports, verifies in both graph forms, runs
through the runtime token for token as transformers' generate(), and quantizes to int8 and int4.
Text-config keys of other published checkpoints (Llama 3.2's llama3 rope with tied embeddings,
Qwen2.5's YaRN, an explicit head_dim, Mistral's sliding window) and the Qwen3, Gemma and Phi-3 text
models export token-exact in both forms (Phi-4-mini's partial rotary in the standard form);
LLaVA-NeXT over SigLIP exports token-exact too. Configs export cannot honour (longrope, a context
too short for one image, a vision_feature_layer outside the tower, another tower, a processor
counting image tokens otherwise than the model, a chat template the manifest's strings cannot
hold) are refused in one line before loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import quiet
from hf_checkpoints import interleave_qwen, write_checkpoint
from PIL import Image

from llava_edge.manifest import Manifest
from llava_edge.runtime import Pipeline

QUESTION = "What is shown in this image?"
NEW_TOKENS = 24


@dataclass
class Exported:
    checkpoint: Path
    model_dir: Path
    report: dict[str, Any]
    model: Any  # LlavaForConditionalGeneration, fp32
    processor: Any


def export_tiny(root: Path, config: dict[str, Any]) -> Exported:
    """Write `config`'s checkpoint under root, export it (verified against transformers)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_edge.export.exporter import export_checkpoint

    checkpoint = write_checkpoint(root / "checkpoint", config)
    report = export_checkpoint(checkpoint, root / "model", log=quiet)
    model = LlavaForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return Exported(
        checkpoint, root / "model", report, model, AutoProcessor.from_pretrained(checkpoint)
    )


@pytest.fixture(scope="module")
def interleave(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return export_tiny(tmp_path_factory.mktemp("interleave"), interleave_qwen())


def picture() -> Image.Image:
    """Noise with a block, wider than tall: SigLIP's square resize squeezes it."""
    array = np.random.default_rng(3).integers(0, 256, (75, 100, 3), dtype=np.uint8)
    array[10:40, 20:60] = (230, 40, 40)
    return Image.fromarray(array)


def test_interleave_exports_verified_in_both_forms(interleave: Exported) -> None:
    forms = interleave.report["forms"]
    assert set(forms) == {"standard", "fused"}
    for report in forms.values():
        assert report["passed"] and report["prompt_ids_equal"] and report["chat_ids_equal"]
        assert report["greedy_tokens_matched"] == report["greedy_tokens_total"] == 32
    manifest = Manifest.load(interleave.model_dir)
    assert manifest.source["vision_model_type"] == "siglip_vision_model"
    assert manifest.num_image_tokens == (60 // 14) ** 2  # every patch, no CLS token
    image = manifest.image
    assert (image.height, image.width, image.center_crop) == (60, 60, False)
    assert manifest.tokens.add_bos is False and manifest.tokens.bos_token_id is None
    assert manifest.template.user == "<|im_start|>user "
    # The SigLIP tower has its fused form: onnxruntime's Attention and SigLIP's tanh GELU.
    vision = manifest.graphs["vision_encoder"].fused
    assert vision is not None and "FastGelu" in vision.details["form"]
    ops = {n.op_type for n in onnx.load(str(interleave.model_dir / vision.file)).graph.node}
    assert {"Attention", "FastGelu", "SkipLayerNormalization"} <= ops


@pytest.mark.parametrize("form", ["standard", "fused"])
def test_interleave_runtime_generates_transformers_tokens(interleave: Exported, form: str) -> None:
    image = picture()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    text = interleave.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = interleave.processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        reference = interleave.model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )[0, inputs["input_ids"].shape[1] :].tolist()
    with Pipeline.load(interleave.model_dir, graph_form=form) as pipe:
        assert pipe.backend.form == form
        answer = pipe.answer(image, QUESTION, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        generated = pipe.generate(image, QUESTION, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert answer.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert answer.token_ids == reference and len(reference) == NEW_TOKENS
    assert generated == answer.text


def test_tied_lm_head_is_the_embedding_table(interleave: Exported) -> None:
    """With tie_word_embeddings the decoder's output projection is the table the runtime embeds
    with, in both forms (the checkpoint stores it once)."""
    model = interleave.model
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    manifest = Manifest.load(interleave.model_dir)
    table = np.load(interleave.model_dir / manifest.embeddings)
    decoder = manifest.graphs["decoder"]
    for file in (decoder.file, decoder.fused.file):
        graph = onnx.load(str(interleave.model_dir / file)).graph
        projections = [
            onnx.numpy_helper.to_array(w)
            for w in graph.initializer
            if tuple(w.dims) == (table.shape[1], table.shape[0])
        ]
        assert len(projections) == 1, file
        np.testing.assert_array_equal(projections[0], table.T)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_interleave_quantizes(interleave: Exported, tmp_path: Path, precision: str) -> None:
    """The tied lm_head is quantized with the other MatMuls; the embedding table stays float."""
    from llava_edge.calib.quantize import quantize_model

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (50 + 10 * i, 40), (60 * i, 120, 200)).save(images / f"{i}.png")
    out = tmp_path / precision
    quantize_model(interleave.model_dir, out, precision, images=images, samples=2, log=quiet)
    manifest = Manifest.load(out)
    vocab = manifest.text.vocab_size
    quantized = {"int8": "MatMulInteger", "int4": "MatMulNBits"}[precision]
    for graph in (manifest.graphs["decoder"], manifest.graphs["decoder"].fused):
        nodes = onnx.load(str(out / graph.file)).graph
        shapes = {w.name: tuple(w.dims) for w in nodes.initializer}
        heads = [
            n
            for n in nodes.node
            if n.op_type == quantized and any(vocab in shapes.get(i, ()) for i in n.input)
        ]
        assert len(heads) == 1, graph.file
    assert np.load(out / manifest.embeddings).dtype == np.float32
    with Pipeline.load(out) as pipe:
        answer = pipe.answer(picture(), QUESTION, max_new_tokens=4, ignore_eos=True)
    assert len(answer.token_ids) == 4


def test_llava_next_with_a_siglip_tower_exports_token_exact(tmp_path: Path) -> None:
    """LLaVA-NeXT over SigLIP keeps every patch ('full'): verified against
    LlavaNextForConditionalGeneration in both forms, tiles and all."""
    from llava_edge.export.exporter import export_checkpoint

    config = interleave_qwen(
        model_type="llava_next",
        architectures=["LlavaNextForConditionalGeneration"],
        image_grid_pinpoints=[[60, 120], [120, 60], [120, 120]],
    )
    checkpoint = write_checkpoint(tmp_path / "checkpoint", config)
    report = export_checkpoint(checkpoint, tmp_path / "model", log=quiet)
    assert set(report["forms"]) == {"standard", "fused"}
    for form in report["forms"].values():
        assert form["passed"] and form["greedy_tokens_matched"] == form["greedy_tokens_total"]
    manifest = Manifest.load(tmp_path / "model")
    assert manifest.image.anyres.tile_features == 60 // 14
    assert manifest.source["vision_model_type"] == "siglip_vision_model"


def test_llava_next_max_context_holds_the_verification_image(tmp_path: Path) -> None:
    """A LLaVA-NeXT image takes its base grid and its tiles' features: a --max-context that
    holds the base grid and 64 tokens but not the verification's picture is refused before
    loading, and the least it names exports verified."""
    import re

    from llava_edge.errors import LlavaEdgeError
    from llava_edge.export.exporter import export_checkpoint

    config = interleave_qwen(
        model_type="llava_next",
        architectures=["LlavaNextForConditionalGeneration"],
        image_grid_pinpoints=[[60, 120], [120, 60], [120, 120]],
    )
    checkpoint = write_checkpoint(tmp_path / "checkpoint", config)
    base_grid = (60 // 14) ** 2
    with pytest.raises(LlavaEdgeError, match="--max-context must be between") as refused:
        export_checkpoint(checkpoint, tmp_path / "low", max_context=base_grid + 64, log=quiet)
    assert not (tmp_path / "low").exists() and len(str(refused.value).splitlines()) == 1
    least = int(re.search(r"between (\d+)", str(refused.value)).group(1))
    report = export_checkpoint(checkpoint, tmp_path / "model", max_context=least, log=quiet)
    assert report["passed"] and report["greedy_tokens_matched"] == report["greedy_tokens_total"]
    assert Manifest.load(tmp_path / "model").text.max_context == least


@pytest.mark.parametrize(
    "text, context",
    [
        # Phi-3-mini-4k: a 2047-token window in a 4096-token context
        (dict(model_type="phi3", sliding_window=2047, max_position_embeddings=4096), 2047),
        # Qwen3 as published: a window no layer uses
        (dict(model_type="qwen3", sliding_window=256, use_sliding_window=False), 1024),
        # Qwen3 sliding from layer 1 on (max_window_layers, which sets its layer_types)
        (
            dict(
                model_type="qwen3", sliding_window=256, use_sliding_window=True, max_window_layers=1
            ),
            256,
        ),
    ],
)
def test_a_sliding_window_caps_the_context_where_a_layer_uses_it(text, context) -> None:
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig

    from llava_edge.export.exporter import _max_context

    text_config = AutoConfig.for_model(
        **{"max_position_embeddings": 1024, "num_hidden_layers": 2, **text}
    )
    vision = CLIPVisionConfig(image_size=64, patch_size=8)
    assert _max_context(LlavaConfig(vision_config=vision, text_config=text_config), None) == context


def test_generation_config_settings_do_not_fail_verification(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """generation_config.json's settings that change which token greedy decoding picks (a
    repetition penalty, n-gram blocking, beams, a least length) are generate()'s options, not
    the graphs': verification holds the graphs to plain greedy decoding, as the runtime's."""
    import shutil

    from llava_edge.export.exporter import export_checkpoint

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    generation.update(
        repetition_penalty=1.5, no_repeat_ngram_size=2, num_beams=2, min_new_tokens=40
    )
    (checkpoint / "generation_config.json").write_text(json.dumps(generation))
    report = export_checkpoint(checkpoint, tmp_path / "model", log=quiet)
    assert report["passed"] and report["greedy_tokens_matched"] == report["greedy_tokens_total"]


# ---- text-config keys of other published checkpoints, on the tiny CLIP checkpoint -------------

WINDOW = 160  # holds the verification's prompt (about 80 tokens) and its 32 new tokens
TEXT_VARIANTS: dict[str, dict[str, Any]] = {
    # Llama 3.2 1B/3B's text config: the llama3 rope (low frequencies scaled; the original length
    # is small so that the tiny heads' frequencies are among those scaled) and tied embeddings.
    "llama3-rope": dict(
        text={
            "tie_word_embeddings": True,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        }
    ),
    # YaRN (Qwen2.5's long-context rope): scaled frequencies and an attention factor on cos/sin.
    "yarn-rope": dict(
        backbone="qwen2",
        text={
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 16.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    # An explicit head_dim unlike hidden / heads (as Mistral-Nemo's 128 of 5120 / 32), with GQA.
    "head-dim": dict(backbone="mistral", text={"head_dim": 32, "num_key_value_heads": 2}),
    # Mistral v0.1's sliding window (bakLlava, llava-v1.6-mistral): the context stops at it.
    "sliding-window": dict(backbone="mistral", text={"sliding_window": WINDOW}),
    # Qwen3: an RMSNorm over each head's queries and keys before rotary, with GQA.
    "qwen3": dict(backbone="qwen3", text={"head_dim": 16, "num_key_value_heads": 2}),
    # Gemma (llava-gemma): embeddings scaled by sqrt(hidden_size), norms scaling by 1 + weight,
    # tanh GELU, MQA, tied embeddings.
    "gemma": dict(backbone="gemma", text={"head_dim": 16, "num_key_value_heads": 1}),
    # Phi-3 (llava-phi-3): q/k/v and gate/up each packed into one projection.
    "phi3": dict(backbone="phi3", text={"num_key_value_heads": 2}),
    # Phi-4-mini's rotary over part of each head: the standard decoder only.
    "phi3-partial-rotary": dict(
        backbone="phi3",
        text={
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            }
        },
    ),
}


@dataclass
class Variant:
    checkpoint: Path
    model_dir: Path
    report: dict[str, Any]
    model: Any


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """name -> the variant's checkpoint exported (and verified), each made once when first asked."""
    from transformers import LlavaForConditionalGeneration

    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.training.checkpoint import init_checkpoint

    made: dict[str, Variant] = {}

    def get(name: str) -> Variant:
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            checkpoint = init_checkpoint(root / "checkpoint", seed=11, **TEXT_VARIANTS[name])
            report = export_checkpoint(checkpoint, root / "model", log=quiet)
            model = LlavaForConditionalGeneration.from_pretrained(
                checkpoint, dtype=torch.float32, attn_implementation="eager"
            ).eval()
            made[name] = Variant(checkpoint, root / "model", report, model)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(TEXT_VARIANTS))
def test_text_variant_exports_token_exact(variants: Any, name: str) -> None:
    """Verified against transformers in both forms (prompt ids, logits, greedy tokens to EOS or
    32), and the config key really shapes the model (else the check would prove nothing)."""
    variant = variants(name)
    model = variant.model
    assert set(variant.report["forms"]) == {"standard", "fused"}
    for form in variant.report["forms"].values():
        assert form["passed"] and form["greedy_tokens_matched"] == form["greedy_tokens_total"] > 0
    manifest = Manifest.load(variant.model_dir)
    decoder = manifest.graphs["decoder"]
    text = model.config.text_config
    language = model.model.language_model
    if name == "phi3-partial-rotary":
        assert decoder.fused is None and "part of each head" in decoder.details["no_fused_form"]
        assert language.rotary_emb(torch.zeros(1), torch.arange(2)[None])[0].shape[-1] == 8
        return
    assert decoder.fused is not None  # the fused decoder holds it too
    if name == "llama3-rope":
        rotary = model.model.language_model.rotary_emb
        dim = manifest.text.head_dim
        plain = 1.0 / 500000.0 ** (torch.arange(0, dim, 2).float() / dim)
        assert rotary.rope_type == "llama3"
        assert not torch.allclose(rotary.inv_freq, plain)
        tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert tied
    elif name == "yarn-rope":
        rotary = model.model.language_model.rotary_emb
        assert rotary.rope_type == "yarn" and rotary.attention_scaling != 1.0
    elif name == "head-dim":
        assert manifest.text.head_dim == text.head_dim == 32
        assert text.hidden_size // text.num_attention_heads != 32
    elif name == "qwen3":
        assert hasattr(language.layers[0].self_attn, "q_norm")
    elif name == "gemma":
        table = np.load(variant.model_dir / manifest.embeddings)
        raw = model.get_input_embeddings().weight.detach().numpy()
        np.testing.assert_allclose(table, raw * text.hidden_size**0.5, rtol=1e-6)
        assert type(language.norm).__name__ == "GemmaRMSNorm"
    elif name == "phi3":
        assert hasattr(language.layers[0].self_attn, "qkv_proj")
        assert hasattr(language.layers[0].mlp, "gate_up_proj")
    else:
        assert manifest.text.max_context == WINDOW < text.max_position_embeddings


def test_sliding_window_caps_the_context(variants: Any, tmp_path: Path) -> None:
    """Inside the window full attention is sliding attention: a prompt of exactly the window
    gives transformers' logits in both forms; a longer context is refused."""
    from llava_edge.errors import LlavaEdgeError
    from llava_edge.export.exporter import export_checkpoint

    variant = variants("sliding-window")
    checkpoint, model_dir, model = variant.checkpoint, variant.model_dir, variant.model
    with pytest.raises(LlavaEdgeError, match=f"--max-context must be between .* and {WINDOW}"):
        export_checkpoint(checkpoint, tmp_path / "out", max_context=WINDOW + 1, log=quiet)
    assert not (tmp_path / "out").exists()
    table = np.load(model_dir / Manifest.load(model_dir).embeddings)
    ids = np.random.default_rng(0).integers(0, table.shape[0], (1, WINDOW))
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(ids)).logits[0, -1].numpy()
    for form in ("standard", "fused"):
        with Pipeline.load(model_dir, graph_form=form) as pipe:
            cache = pipe.backend.new_cache(1)
            logits = pipe.backend.decode(
                table[ids], np.ones_like(ids), np.arange(WINDOW)[None], cache
            )
        np.testing.assert_allclose(logits[0], reference, rtol=1e-4, atol=1e-5)


NEXT = {"model_type": "llava_next", "image_grid_pinpoints": [[64, 128], [128, 64]]}
# name -> (init_checkpoint overrides, and `config_json` / `processor_json` keys written over its
# config.json / processor_config.json; what the one-line refusal says). Each is refused before the weights are read (the test deletes
# them), with no output dir.
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    # Frequencies that switch with the sequence length, inside the traced graph.
    "longrope": (
        dict(
            text={
                "rope_scaling": {
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 64,
                }
            }
        ),
        "rope type 'longrope' is not supported",
    ),
    # A window (the export's context) too short for one image (64 tokens) and a question.
    "window-below-one-image": (
        dict(backbone="mistral", text={"sliding_window": 80}),
        "context of 80 tokens (its sliding_window) cannot hold one image",
    ),
    "positions-below-one-image": (
        dict(text={"max_position_embeddings": 100}),
        "context of 100 tokens (its max_position_embeddings) cannot hold one image",
    ),
    # The tiny tower has 2 layers: hidden states -3..2 (the embeddings, then each layer's output).
    "feature-layer-past-the-tower": (
        dict(vision_feature_layer=3),
        "vision_feature_layer 3 is outside the vision tower's hidden states (-3 to 2)",
    ),
    "feature-layers-before-the-tower": (
        dict(vision_feature_layer=[-4, -1]),
        "vision_feature_layer -4 is outside the vision tower's hidden states (-3 to 2)",
    ),
    # transformers' LLaVA asks the tower for no hidden states then (a TypeError in verification).
    "feature-layer-zero": (dict(vision_feature_layer=0), "vision_feature_layer 0 "),
    # Pixtral (mistral-community/pixtral-12b is a 'llava' checkpoint): a tower the graphs
    # cannot call (it takes each image's size).
    "pixtral-tower": (
        dict(
            config_json={
                "vision_config": {
                    "model_type": "pixtral",
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "head_dim": 16,
                    "image_size": 64,
                    "patch_size": 8,
                }
            }
        ),
        "vision tower 'pixtral' is not supported",
    ),
    # LLaVA-NeXT lays a tile's features out as the tower's patch grid: CLIP's CLS token must go.
    "next-clip-full": (
        dict(config_json=dict(NEXT, vision_feature_select_strategy="full")),
        "LLaVA-NeXT with a clip_vision_model tower and vision_feature_select_strategy 'full'",
    ),
    # SigLIP has no CLS token: 'default' would drop a patch.
    "next-siglip-default": (
        dict(config_json=dict(NEXT, vision_config={"model_type": "siglip_vision_model"})),
        "LLaVA-NeXT with a siglip_vision_model tower and vision_feature_select_strategy 'default'",
    ),
    # An image token id past the tokenizer's vocabulary (512 tokens in the tiny preset).
    "image-token-past-the-vocabulary": (
        dict(config_json={"image_token_index": 100000}),
        "config.json's image_token_index 100000 is not in the tokenizer's vocabulary",
    ),
    # A processor that puts another number of image tokens in the prompt than the model makes
    # (CLIP's CLS token not counted, then dropped: 63 for 64 features): transformers fails too.
    "processor-image-tokens": (
        dict(processor_json={"num_additional_image_tokens": 0}),
        "its processor puts 63 image tokens in the prompt per image, its model makes 64",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_config_is_refused_before_loading(tmp_path: Path, capsys, name: str) -> None:
    from llava_edge.cli import main
    from llava_edge.training.checkpoint import init_checkpoint

    overrides, message = REFUSED[name]
    overrides = dict(overrides)
    changes = overrides.pop("config_json", {})
    processor_changes = overrides.pop("processor_json", {})
    checkpoint = init_checkpoint(tmp_path / "checkpoint", **overrides)
    if changes:  # what init cannot make (another tower, LLaVA-NeXT), in config.json alone
        config = json.loads((checkpoint / "config.json").read_text())
        for key, value in changes.items():
            config[key] = {**config[key], **value} if key == "vision_config" else value
        (checkpoint / "config.json").write_text(json.dumps(config))
    processor_file = checkpoint / "processor_config.json"
    processor = json.loads(processor_file.read_text())
    processor_file.write_text(json.dumps({**processor, **processor_changes}))
    (checkpoint / "model.safetensors").unlink()
    capsys.readouterr()  # what init said
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()
