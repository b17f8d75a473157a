"""`llava-edge init`: each preset has the shape its comment documents, and what it writes is an
ordinary Hugging Face LLaVA checkpoint whose chat template agrees with the runtime's.

Big presets are checked as configs and on torch's meta device: no weights are materialised.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava_edge.cli import main
from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime.template import TEMPLATES, render, with_system
from llava_edge.training.checkpoint import (
    PRESETS,
    hf_chat_template,
    init_checkpoint,
    make_config,
    make_hf_tokenizer,
)


def _config(preset: str, layers: int | None = None):
    return make_config(preset, layers, make_hf_tokenizer(PRESETS[preset]["tokenizer_size"]))


def _meta_model(config):
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_llava_1_5_layout(config) -> None:
    """What every preset shares with LLaVA-1.5: CLIP features of layer -2 without CLS, an
    mlp2x_gelu projector (Linear, GELU, Linear) and a Llama text model."""
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert config.projector_hidden_act == "gelu"
    assert config.text_config.model_type == "llama"
    vision = config.vision_config
    assert config.image_seq_length == (vision.image_size // vision.patch_size) ** 2
    projector = _meta_model(config).model.multi_modal_projector
    assert [type(m).__name__ for m in projector.children()] == [
        "Linear",
        "GELUActivation",
        "Linear",
    ]
    assert projector.linear_1.in_features == vision.hidden_size
    assert projector.linear_1.out_features == config.text_config.hidden_size
    assert projector.linear_2.out_features == config.text_config.hidden_size


def _dims(config) -> dict:
    v, t = config.vision_config, config.text_config
    return {
        "vision": (
            v.hidden_size,
            v.intermediate_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            v.image_size,
            v.patch_size,
        ),
        "text": (
            t.hidden_size,
            t.intermediate_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            t.num_key_value_heads,
            t.vocab_size,
        ),
    }


def test_tiny_preset_is_well_under_a_million_parameters(tiny_checkpoint: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert _parameters(model) < 300_000
    _check_llava_1_5_layout(model.config)


def test_small_preset_shape() -> None:
    """CLIP ViT-B/16 at 224 px, mlp2x_gelu, 16-layer Llama 1024 wide, 16 heads without GQA."""
    config = _config("small")
    _check_llava_1_5_layout(config)
    assert _dims(config) == {
        "vision": (768, 3072, 12, 12, 224, 16),
        "text": (1024, 2816, 16, 16, 16, 32000),
    }
    assert config.image_seq_length == 196


def test_llava_1_5_7b_preset_shape() -> None:
    """LLaVA-1.5-7B as published (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 and Vicuna-7B."""
    config = _config("llava-1.5-7b")
    _check_llava_1_5_layout(config)
    assert _dims(config) == {
        "vision": (1024, 4096, 24, 16, 336, 14),
        "text": (4096, 11008, 32, 32, 32, 32064),
    }
    assert config.vision_config.hidden_act == "quick_gelu"
    text = config.text_config
    assert text.max_position_embeddings == 4096
    assert text.rms_norm_eps == 1e-5
    assert not text.tie_word_embeddings
    assert config.image_seq_length == 576
    # The published model has 7.06B parameters.
    assert 7.05e9 < _parameters(_meta_model(config)) < 7.07e9


@pytest.mark.parametrize("layers", [1, 2])
def test_layers_keeps_the_first_n_of_each_tower(layers: int) -> None:
    full, cut = _config("llava-1.5-7b"), _config("llava-1.5-7b", layers)
    assert cut.vision_config.num_hidden_layers == layers
    assert cut.text_config.num_hidden_layers == layers
    for dims_full, dims_cut in zip(_dims(full).values(), _dims(cut).values(), strict=True):
        assert dims_full[:2] == dims_cut[:2] and dims_full[3:] == dims_cut[3:]
    _check_llava_1_5_layout(cut)


def test_overrides_win_over_the_presets_defaults() -> None:
    """Any text or LLaVA setting may be overridden, those the preset sets by default too."""
    tokenizer = make_hf_tokenizer(PRESETS["tiny"]["tokenizer_size"])
    config = make_config(
        "tiny", None, tokenizer, text={"rms_norm_eps": 1e-3}, projector_hidden_act="relu"
    )
    assert config.text_config.rms_norm_eps == 1e-3
    assert config.projector_hidden_act == "relu"


def test_layers_must_be_positive() -> None:
    with pytest.raises(LlavaEdgeError, match="--layers"):
        _config("tiny", 0)


def test_init_cli_writes_a_seeded_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The command's options reach the checkpoint; the same seed gives the same weights."""
    from safetensors.torch import load_file

    assert main(["init", str(tmp_path / "one"), "--layers", "1", "--seed", "0"]) == 0
    assert main(["init", str(tmp_path / "two"), "--seed", "0"]) == 0
    assert main(["init", str(tmp_path / "three"), "--seed", "1"]) == 0

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path / "model.safetensors"))

    one = weights(tmp_path / "one")
    assert not any(".layers.1." in name for name in one)
    assert any(".layers.0." in name for name in one)
    reference, two, three = (
        weights(tiny_checkpoint),
        weights(tmp_path / "two"),
        weights(tmp_path / "three"),
    )
    assert reference.keys() == two.keys() == three.keys()
    assert all(torch.equal(reference[k], two[k]) for k in reference)
    assert not all(torch.equal(reference[k], three[k]) for k in reference)


# ---- what transformers sees ----------------------------------------------------------------------


def test_checkpoint_loads_in_transformers(tiny_checkpoint: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert type(processor).__name__ == "LlavaProcessor"
    tokenizer = processor.tokenizer
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    for token in (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
        tokenizer.unk_token,
    ):
        assert (
            token is not None
            and tokenizer.convert_tokens_to_ids(token) < model.config.text_config.vocab_size
        )
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id
    image = processor.image_processor
    size = model.config.vision_config.image_size
    assert (image.crop_size["height"], image.crop_size["width"]) == (size, size)
    assert list(image.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert list(image.image_std) == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert (tiny_checkpoint / "model.safetensors").is_file()


def test_saved_chat_template_renders_the_runtime_prompt(tiny_checkpoint: Path) -> None:
    """The checkpoint's own template (what transformers users call) == runtime.template."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    turns = [("What is this?", "A red circle."), ("And its colour?", None)]
    expected = "".join(text for text, _ in render(TEMPLATES["llava_1_5"], turns, image=True))
    assert processor.apply_chat_template(_messages(turns), add_generation_prompt=True) == expected
    assert expected.startswith("USER: <image>\nWhat is this? ASSISTANT:")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("turns", [1, 2])
# The last ends in an ideographic space (U+3000), whitespace to Python as to the runtime.
@pytest.mark.parametrize(
    "system", [None, "You are a robot.", "Be brief.\n", "日本語で答えて。\u3000"]
)
def test_every_template_renders_like_the_runtime(
    tiny_checkpoint: Path, name: str, turns: int, system: str | None
) -> None:
    """A system message too: transformers users of a checkpoint llava-edge wrote get the prompt
    the runtime builds for that system prompt (ChatML's in its own block)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    dialogue = [("What is this?", "A red circle."), ("And its colour?", None)][-turns:]
    template = TEMPLATES[name]
    given = template if system is None else with_system(template, system)
    expected = "".join(text for text, _ in render(given, dialogue, image=True))
    messages = _messages(dialogue)
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    rendered = processor.apply_chat_template(
        messages, chat_template=hf_chat_template(template), add_generation_prompt=True
    )
    assert rendered == expected
    if system is not None and template.system_format is not None:
        assert expected.startswith(template.system_format.replace("{system}", system))


def test_init_template_is_recorded(tmp_path: Path) -> None:
    """A checkpoint made with another template says so, for export to copy into the manifest."""
    import json

    from llava_edge.manifest import CHECKPOINT_INFO_FILE

    out = init_checkpoint(tmp_path / "vicuna", preset="tiny", template="vicuna_v1")
    assert json.loads((out / CHECKPOINT_INFO_FILE).read_text())["template"] == "vicuna_v1"
    from transformers import AutoProcessor

    rendered = AutoProcessor.from_pretrained(out).apply_chat_template(
        _messages([("Hi?", None)]), add_generation_prompt=True
    )
    assert rendered == "".join(t for t, _ in render(TEMPLATES["vicuna_v1"], [("Hi?", None)], True))


def _messages(turns: list[tuple[str, str | None]]) -> list[dict]:
    """(question, answer) turns as transformers' chat messages, the image in the first."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "image"}] if i == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def test_llama_3_is_metas_documented_format() -> None:
    """Meta's Llama 3 Instruct prompt (llama.meta.com, prompt formats), BOS left to the
    tokenizer: a system block, headers, and <|eot_id|> closing every message."""
    template = with_system(TEMPLATES["llama_3"], "Be brief.")
    turns = [("What is this?", "A cup."), ("And its colour?", None)]
    text = "".join(t for t, _ in render(template, turns, image=True))
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    expected = (
        header.format("system") + "Be brief.<|eot_id|>"
        + header.format("user") + "<image>\nWhat is this?<|eot_id|>"
        + header.format("assistant") + "A cup.<|eot_id|>"
        + header.format("user") + "And its colour?<|eot_id|>"
        + header.format("assistant")
    )  # fmt: skip
    assert text == expected


@pytest.mark.parametrize("projector", ["mlp1000x_gelu", "mlp0x_gelu", "mlp2x_relu"])
def test_a_projector_past_any_sane_depth_is_refused(tmp_path, capsys, projector) -> None:
    """mlp1000x_gelu would build a thousand hidden-by-hidden layers (16 billion parameters on
    LLaVA-1.5-7B's shape) before anything failed; it is refused before any work, on every
    entry point that builds a projector from a name."""
    from llava_edge.modeling import LlavaProjector

    assert main(["init", str(tmp_path / "x"), "--projector", projector]) == 1
    err = capsys.readouterr().err
    assert projector in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    config = make_config("tiny", None, make_hf_tokenizer(512))
    config.mm_projector_type = projector
    with pytest.raises(LlavaEdgeError, match=projector):
        LlavaProjector(config)


def test_a_full_disk_under_safetensors_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    """safetensors' writer reports a full disk as a SafetensorError whose text holds the OS
    error, not as an OSError: init, convert and composing (which all save through it) ended in
    a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*_args, **_kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "serialize_file", full)
    out = tmp_path / "ckpt"
    assert main(["init", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"llava-edge init: error: no space left on the device writing {out}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # neither the dir nor its hidden partial one


def test_init_dtype_takes_effect(tmp_path) -> None:
    from safetensors import safe_open

    assert main(["init", str(tmp_path / "ckpt"), "--dtype", "float16"]) == 0
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 (no dict)
