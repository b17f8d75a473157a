"""What an original-format LLaVA checkpoint holds, read without the original code.

The original LLaVA code (haotian-liu/LLaVA) saves a LLaVA model as its language model's checkpoint
with extra weights and config keys: `model.mm_projector.*` (a Linear, or an nn.Sequential of
Linear/GELU), `model.image_newline` (v1.6), sometimes the CLIP tower as
`model.vision_tower.vision_tower.*`, and `mm_*` keys in config.json. Its training leaves three
kinds of dir, all read here into one `Original`:

- a full checkpoint: config.json, safetensors or `pytorch_model-*.bin` shards;
- a LoRA output: `adapter_model.*` and `non_lora_trainables.bin` (the projector), over `--base`;
- a stage-1 output: `mm_projector.bin` alone, over `--base` (the language model).
"""

from __future__ import annotations

import ast
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_edge.convert.weights import StateDict, read_sharded, read_weights
from llava_edge.errors import LlavaEdgeError

# model_type of the original's classes -> the text model behind them
TEXT_MODELS = {"llava_llama": "llama", "llava": "llama", "llava_mistral": "mistral"}
ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
}
# A tokenizer_config.json alone holds no vocabulary: the dir has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
VISION_PREFIX = "model.vision_tower.vision_tower."
# Config keys of the original that are LLaVA's, not the language model's.
LLAVA_KEY_PREFIXES = ("mm_", "image_", "tune_", "freeze_", "unfreeze_", "tokenizer_", "use_mm")
LLAVA_KEYS = {"_name_or_path", "architectures", "model_type", "auto_map", "vision_tower", "s2"}
# How a QLoRA run (--bits 4/8) loaded its language model, not what its output holds.
QUANTIZED_TRAINING_KEYS = {"quantization_config", "_pre_quantization_dtype"}


@dataclass
class Settings:
    """The original's `mm_*` config keys, with the defaults its code applies when one is absent."""

    text_model: str  # llama, mistral
    vision_tower: str  # a hub name or a path (mm_vision_tower)
    vision_width: int | None  # mm_hidden_size: the tower's hidden size the projector takes
    projector: str  # linear, mlp2x_gelu, mlpNx_gelu
    select_layer: int
    select_feature: str  # patch (CLS dropped) or cls_patch
    im_start_end: bool
    im_patch_token: bool
    aspect_ratio: str  # pad, anyres; anything else: CLIP's resize and center crop
    grid_pinpoints: list[list[int]]  # anyres only; as the original writes them: [width, height]
    patch_merge: str  # flat, spatial_unpad...
    max_length: int | None  # tokenizer_model_max_length

    @property
    def anyres(self) -> bool:
        return self.aspect_ratio.startswith("anyres")


@dataclass
class Original:
    """An original-format checkpoint, split by part. Text weights keep the original's names
    (`model.layers.*`, `lm_head.*`: transformers' causal LM names); projector weights are named
    as in the original's nn.Sequential ("0.weight", "2.bias"; "weight" for a linear one)."""

    directory: Path
    kind: str  # full, lora, stage1
    config: dict[str, Any]
    settings: Settings
    text: StateDict
    projector: StateDict
    vision: StateDict = field(
        default_factory=dict
    )  # CLIP's own names, when it is in the checkpoint
    newline: Any = None  # model.image_newline [hidden]
    lora: StateDict = field(default_factory=dict)  # the adapter's weights (kind lora)
    tokenizer_dir: Path | None = None


def _check_full_precision(config: dict[str, Any], directory: Path) -> None:
    """A checkpoint saved quantized (the original trains with --bits 4/8 through bitsandbytes)
    holds no float language model to convert: refused before any weight is read. A LoRA or
    stage-1 output of such a run (QLoRA) holds float adapters or a float projector, trained
    over --base, which is float: it converts."""
    method = _quantization(config)
    if method and checkpoint_kind(directory) == "full":
        raise LlavaEdgeError(
            f"{directory} holds {method} weights (quantization_config in its config.json); "
            "convert takes full-precision ones (fp32, fp16 or bf16): convert the checkpoint they "
            "were quantized from"
        )


def _quantization(config: dict[str, Any]) -> str | None:
    """The method of the quantization_config a config.json names (bitsandbytes...), else None."""
    quantized = config.get("quantization_config")
    if not quantized:
        return None
    method = quantized.get("quant_method") if isinstance(quantized, dict) else None
    return str(method or "quantized")


def read_original(directory: Path, base: Path | None = None) -> Original:
    """Read config and weights of an original-format dir (and of `base` where it needs one)."""
    if not directory.is_dir():
        raise LlavaEdgeError(f"{directory} is not a directory")
    config = read_config(directory)
    settings = read_settings(config, directory)
    kind = checkpoint_kind(directory)
    original = Original(directory, kind, config, settings, {}, {})
    if kind == "full":
        if base is not None and _has_tokenizer(directory):  # an option that does nothing
            raise LlavaEdgeError(
                f"{directory} is a full checkpoint with its own language model and tokenizer: "
                "drop --base (it is for LoRA and stage-1 outputs)"
            )
        _split(read_sharded(directory) or {}, original)
    else:
        if base is None:
            raise LlavaEdgeError(
                f"{directory} is a {'LoRA' if kind == 'lora' else 'stage-1 projector'} output: "
                f"pass --base, the language model it was trained on ({_base_name(directory)})"
            )
        if not (base / "config.json").is_file():
            raise LlavaEdgeError(f"--base {base} is not a checkpoint dir with weights")
        _check_base(base, config, directory)
        base_state = read_sharded(base)
        if base_state is None:
            raise LlavaEdgeError(f"--base {base} is not a checkpoint dir with weights")
        _split(base_state, original)
        if kind == "lora":
            original.lora = read_sharded(directory, stem="adapter_model") or {}
            extra = directory / "non_lora_trainables.bin"
            if extra.is_file():
                _split(strip_peft_prefix(read_weights(extra)), original)
        else:
            _split(_projector_file(directory), original)
    if not original.text:
        raise LlavaEdgeError(f"{directory}: no language model weights found")
    if not original.projector:
        where = ""
        if kind == "lora" and not (directory / "non_lora_trainables.bin").is_file():
            where = (
                ": a LoRA run saves its projector in non_lora_trainables.bin beside the "
                "adapters; copy it from the training output"
            )
        raise LlavaEdgeError(
            f"{directory}: no projector weights (model.mm_projector.*) found{where}"
        )
    for candidate in (directory, base):
        if candidate is not None and _has_tokenizer(candidate):
            original.tokenizer_dir = candidate
            break
    else:
        raise LlavaEdgeError(f"{directory} has no tokenizer files; pass --base with the tokenizer")
    return original


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise LlavaEdgeError(f"{directory} has no config.json: it is not a LLaVA checkpoint dir")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlavaEdgeError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LlavaEdgeError(f"{path} is not a JSON object")
    return config


def read_settings(config: dict[str, Any], directory: Path) -> Settings:
    _check_full_precision(config, directory)  # first: nothing else is worth fetching for it
    model_type = config.get("model_type")
    text = TEXT_MODELS.get(model_type) or next(
        (ARCHITECTURES[a] for a in config.get("architectures") or [] if a in ARCHITECTURES), None
    )
    if model_type in ("llava", "llava_next") and "text_config" in config:
        raise LlavaEdgeError(
            f"{directory} is already a Hugging Face LLaVA checkpoint; export it directly "
            "(`llava-edge export`)"
        )
    if text is None:
        raise LlavaEdgeError(
            f"{directory}: model_type {model_type!r} is not one convert takes (the original "
            f"LLaVA's Llama and Mistral models: {', '.join(TEXT_MODELS)})"
        )
    if config.get("s2"):
        raise LlavaEdgeError(
            f"{directory}: the vision tower is an S2 multi-scale one (s2: true), which convert "
            "cannot carry into the graphs; convert a checkpoint with a plain CLIP tower"
        )
    tower = config.get("mm_vision_tower") or config.get("vision_tower")
    if not tower:
        raise LlavaEdgeError(f"{directory}/config.json names no vision tower (mm_vision_tower)")
    if "siglip" in str(tower).lower():  # else sent to download a tower it then refuses
        raise LlavaEdgeError(
            f"{directory}: the vision tower {tower} is a SigLIP one, which the original LLaVA "
            "has no code for (LLaVA-NeXT's fork trains them); convert takes CLIP towers"
        )
    settings = Settings(
        text_model=text,
        vision_tower=str(tower),
        vision_width=_integer(config, "mm_hidden_size", None, directory, positive=True),
        projector=str(config.get("mm_projector_type") or "linear"),  # absent in LLaVA v1: linear
        select_layer=_integer(config, "mm_vision_select_layer", -1, directory),
        select_feature=config.get("mm_vision_select_feature") or "patch",
        im_start_end=bool(config.get("mm_use_im_start_end", False)),
        im_patch_token=bool(config.get("mm_use_im_patch_token", True)),
        aspect_ratio=str(config.get("image_aspect_ratio") or "square"),
        grid_pinpoints=[],
        patch_merge=str(config.get("mm_patch_merge_type") or "flat"),
        max_length=_integer(config, "tokenizer_model_max_length", None, directory, positive=True),
    )
    _check_projector(settings.projector, directory)
    if settings.select_feature not in ("patch", "cls_patch"):
        raise LlavaEdgeError(
            f"{directory}: mm_vision_select_feature {settings.select_feature!r} is not supported "
            "(patch or cls_patch)"
        )
    if settings.anyres:
        if settings.aspect_ratio != "anyres":
            raise LlavaEdgeError(
                f"{directory}: image_aspect_ratio {settings.aspect_ratio!r} is not supported; "
                "anyres converts"
            )
        if settings.projector != "mlp2x_gelu":  # LLaVA-NeXT's, the one its class has
            raise LlavaEdgeError(
                f"{directory}/config.json: anyres with mm_projector_type "
                f"{settings.projector!r} has no Hugging Face class; only mlp2x_gelu (LLaVA-NeXT) "
                "converts"
            )
        if settings.patch_merge != "spatial_unpad":
            raise LlavaEdgeError(
                f"{directory}: anyres with mm_patch_merge_type {settings.patch_merge!r} has no "
                "Hugging Face class; only spatial_unpad (LLaVA-NeXT) converts"
            )
        settings.grid_pinpoints = _pinpoints(config.get("image_grid_pinpoints"), directory)
        if settings.select_feature != "patch":
            # The original and LlavaNextModel both lay each tile's features out on a square grid.
            raise LlavaEdgeError(
                f"{directory}: anyres with mm_vision_select_feature "
                f"{settings.select_feature!r} has no feature grid; only 'patch' converts"
            )
    return settings


def _check_projector(kind: str, directory: Path) -> None:
    """A type llava-edge builds no projector for (the original's 'identity', a typo) is named
    before any weight is read."""
    from llava_edge.modeling import projector_depth

    try:
        projector_depth(kind)
    except LlavaEdgeError as e:
        raise LlavaEdgeError(f"{directory}/config.json: {e}") from None


def _integer(
    config: dict[str, Any], key: str, default: int | None, directory: Path, positive: bool = False
) -> int | None:
    """An integer key: a JSON number or a numeral; -2.5 or true is refused, not rounded."""
    value = config.get(key)
    if value is None:
        return default
    number = None
    if isinstance(value, int | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = int(value)
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if number is None:
        raise LlavaEdgeError(f"{directory}: {key} {value!r} is not an integer")
    if positive and number <= 0:
        raise LlavaEdgeError(f"{directory}: {key} {value!r} is not a positive integer")
    return number


def _pinpoints(value: Any, directory: Path) -> list[list[int]]:
    """image_grid_pinpoints: [width, height] pairs, as a list or as Python source (some
    releases write "[(336, 672), ...]"), as the original's ast.literal_eval reads it."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = None
    try:
        pairs = [[int(w), int(h)] for w, h in value]
    except (TypeError, ValueError):
        pairs = []
    if not pairs or any(w <= 0 or h <= 0 for w, h in pairs):
        raise LlavaEdgeError(
            f"{directory}: anyres needs image_grid_pinpoints as [width, height] pairs, "
            f"got {value!r}"
        )
    return pairs


def text_config_dict(config: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The language model's own config keys (the original keeps them at the top level)."""
    kept = {
        k: v
        for k, v in config.items()
        if k not in LLAVA_KEYS | QUANTIZED_TRAINING_KEYS and not k.startswith(LLAVA_KEY_PREFIXES)
    }
    kept["model_type"] = settings.text_model
    kept.pop("vocab_size", None)  # the embeddings' rows say it
    return kept


def checkpoint_kind(directory: Path) -> str:
    """full, lora or stage1, by the files the original's training leaves."""
    if (directory / "adapter_config.json").is_file():
        return "lora"
    if any(directory.glob("model*.safetensors")) or any(directory.glob("pytorch_model*.bin")):
        return "full"
    if any(directory.glob("mm_projector.*")):
        return "stage1"
    raise LlavaEdgeError(
        f"{directory} holds no weights the original LLaVA writes (model*.safetensors, "
        "pytorch_model*.bin, adapter_model.* or mm_projector.bin)"
    )


def adapter_base_name(directory: Path) -> str | None:
    """The base model adapter_config.json names (base_model_name_or_path), if it names one."""
    try:
        value = json.loads((directory / "adapter_config.json").read_text())
        value = value.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def _base_name(directory: Path) -> str:
    for name in ("adapter_config.json", "config.json"):
        try:
            value = json.loads((directory / name).read_text()).get(
                "base_model_name_or_path" if name.startswith("adapter") else "_name_or_path"
            )
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return str(value)
    return "its base model"


def _check_base(base: Path, config: dict[str, Any], directory: Path) -> None:
    """--base must be a language model of the shape the output's config.json was trained on: its
    weights are read under that config."""
    base_config = read_config(base)
    model_type = base_config.get("model_type")
    text_models = (*TEXT_MODELS, *TEXT_MODELS.values())
    trained_on = f"pass the language model it was trained on ({_base_name(directory)})"
    if model_type not in text_models or "text_config" in base_config:
        raise LlavaEdgeError(
            f"--base {base} is a '{model_type}' model, not a Llama or Mistral language model: "
            f"{trained_on}"
        )
    method = _quantization(base_config)
    if method:
        raise LlavaEdgeError(
            f"--base {base} holds {method} weights (quantization_config in its config.json); "
            f"pass the full-precision model they were quantized from ({_base_name(directory)})"
        )
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        ours, theirs = config.get(key), base_config.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            raise LlavaEdgeError(
                f"--base {base} has {key} {theirs}; {directory} was trained on one of {ours}: "
                f"{trained_on}"
            )


def _projector_file(directory: Path) -> StateDict:
    """The projector file, its names as in the model (`model.mm_projector.0.weight`, what the
    original saves) or bare (`0.weight`, the nn.Sequential's own: the file holds nothing else)."""
    for name in ("mm_projector.safetensors", "mm_projector.bin"):
        if (directory / name).is_file():
            state = read_weights(directory / name)
            if any("mm_projector." in k for k in state):
                return state
            return {f"model.mm_projector.{k}": v for k, v in state.items()}
    raise LlavaEdgeError(f"{directory} has no mm_projector.bin")


def strip_peft_prefix(state: StateDict) -> StateDict:
    """non_lora_trainables.bin names its tensors as peft wraps the model; undo it as the
    original's loader does: 'base_model.' off every name, then, where any name starts with
    'model.model.', 'model.' off every name that starts with it ('base_model.model.lm_head'
    -> 'lm_head', 'base_model.model.model.mm_projector' -> 'model.mm_projector')."""
    state = {
        k[len("base_model.") :] if k.startswith("base_model.") else k: v for k, v in state.items()
    }
    if any(k.startswith("model.model.") for k in state):
        state = {k[len("model.") :] if k.startswith("model.") else k: v for k, v in state.items()}
    return state


def _split(state: StateDict, original: Original) -> None:
    """Sort weights by part, replacing what an earlier source gave for the same names."""
    for key, value in state.items():
        if key.endswith(".inv_freq") or key.startswith("model.vision_resampler."):
            continue  # rotary caches of old checkpoints; an unused (identity) resampler
        if "mm_projector." in key:
            original.projector[key.split("mm_projector.", 1)[1]] = value
        elif key.startswith(VISION_PREFIX):
            original.vision[key[len(VISION_PREFIX) :]] = value
        elif key == "model.image_newline":
            original.newline = value
        else:
            original.text[key] = value
