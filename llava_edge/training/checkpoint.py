"""Make LLaVA checkpoints: seeded random weights from a preset (`llava-edge init --preset`).

The checkpoint is an ordinary Hugging Face dir (config, safetensors, tokenizer, processor, chat
template) that `LlavaForConditionalGeneration.from_pretrained` (llava_edge.modeling's subclass for a
projector other than LLaVA-1.5's) and `AutoProcessor.from_pretrained` load, plus `llava_edge.json`, which names the chat template the model was trained with so that
export and runtime prompt it the same way.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llava_edge.errors import LlavaEdgeError, first_line
from llava_edge.files import check_output_dir, replace_dir
from llava_edge.logs import quiet_loading
from llava_edge.manifest import write_checkpoint_info
from llava_edge.runtime.template import IMAGE_PLACEHOLDER, get_template, hf_chat_template

DEFAULT_PROJECTOR = "mlp2x_gelu"
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Each preset: vision tower (CLIP), text model (Llama) and tokenizer sizes.
PRESETS: dict[str, dict[str, Any]] = {
    # Well under 1M parameters: for tests and the demo.
    "tiny": {
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
        ),
        "text": dict(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        ),
        "tokenizer_size": 512,
        "vocab_size": 576,
    },
    # `make demo`: trained from scratch on synthetic pictures in a few CPU minutes (~0.3M
    # parameters). The vision tower stays frozen and random, as LLaVA's stays pretrained, so it
    # must pass the pixels on: one layer, whose layer -2 (LLaVA's choice) is the patch embedding
    # itself. The larger tokenizer makes every word of the demo's data one token.
    "demo": {
        "vision": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
        ),
        "text": dict(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        ),
        "tokenizer_size": 1024,
        "vocab_size": 704,
    },
    # CLIP ViT-B/16 at 224 px, a 16-layer Llama of hidden 1024: the CPU benchmark model.
    "small": {
        "vision": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        ),
        "text": dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=4096,
        ),
        "tokenizer_size": 2048,
        "vocab_size": 32000,
    },
    # LLaVA-1.5-7B's exact dimensions: CLIP ViT-L/14-336 and Vicuna-7B.
    "llava-1.5-7b": {
        "vision": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        "text": dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        ),
        "tokenizer_size": 2048,
        "vocab_size": 32064,
    },
}


def write_llava_edge_file(out_dir: Path, template_name: str) -> None:
    write_checkpoint_info(out_dir, template_name)


def save_processor(out_dir: Path, hf_tokenizer: Any, config: Any, template_name: str) -> None:
    """Save tokenizer, CLIP image processor, processor config and chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    vision = config.vision_config
    size = vision.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=hf_tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=hf_chat_template(get_template(template_name)),
    )
    processor.save_pretrained(out_dir)
    write_llava_edge_file(out_dir, template_name)


def make_hf_tokenizer(tokenizer_size: int) -> Any:
    from transformers import PreTrainedTokenizerFast

    from llava_edge.training.tokenizer import BOS, EOS, PAD, UNK, build_tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(tokenizer_size),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
        padding_side="left",
        add_bos_token=True,
    )


def make_config(preset: str, layers: int | None, tokenizer: Any, **overrides: Any) -> Any:
    """A LlavaConfig for a preset; `overrides` set LlavaConfig fields (vision_feature_layer...)."""
    from transformers import (
        CLIPVisionConfig,
        GemmaConfig,
        LlamaConfig,
        LlavaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    if preset not in PRESETS:
        raise LlavaEdgeError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    vision = dict(spec["vision"])
    text = dict(spec["text"])
    if layers is not None:
        deepest = max(vision["num_hidden_layers"], text["num_hidden_layers"])
        if not 1 <= layers <= deepest:
            raise LlavaEdgeError(
                f"--layers must be 1 to {deepest} (the {preset} preset's deepest tower), got {layers}"
            )
        vision["num_hidden_layers"] = min(layers, vision["num_hidden_layers"])
        text["num_hidden_layers"] = min(layers, text["num_hidden_layers"])
    text.update(overrides.pop("text", {}))
    backbones = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma": GemmaConfig,
        "phi3": Phi3Config,
    }
    backbone = overrides.pop("backbone", "llama")
    if backbone not in backbones:
        raise LlavaEdgeError(f"unknown backbone {backbone!r}; choose from {', '.join(backbones)}")
    text_cls = backbones[backbone]
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    strategy = overrides.get("vision_feature_select_strategy", "default")
    text = {
        "vocab_size": spec["vocab_size"],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "rms_norm_eps": 1e-5,
        **text,  # the preset's and the caller's settings win over these defaults
    }
    llava = {
        "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        "image_seq_length": image_tokens + (1 if strategy == "full" else 0),
        "projector_hidden_act": "gelu",
        **overrides,
    }
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=text_cls(**text), **llava
    )


def init_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    layers: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
    template: str = "llava_1_5",
    force: bool = False,
    projector: str = DEFAULT_PROJECTOR,
    **overrides: Any,
) -> Path:
    """Write a seeded random-weight LLaVA checkpoint of a preset's shape.

    `overrides` reach LlavaConfig (e.g. vision_feature_layer=[-2, -1]); `text={...}` changes the
    text model (num_key_value_heads for GQA...), `backbone` ("mistral", "qwen2", "qwen3", "gemma",
    "phi3") swaps Llama for that model. projector: 'mlp2x_gelu' (LLaVA-1.5), 'linear' (LLaVA v1) or
    'mlpNx_gelu'.
    """
    import torch
    from transformers import GenerationConfig

    from llava_edge.modeling import PROJECTOR_KEY, model_class, projector_depth

    out = Path(out_dir)
    check_output_dir(out, force)
    projector_depth(projector)  # an unknown type fails before any work
    dtype = check_dtype(dtype or "float32")
    tokenizer = make_hf_tokenizer(PRESETS.get(preset, {}).get("tokenizer_size", 512))
    config = make_config(preset, layers, tokenizer, **overrides)
    if projector != DEFAULT_PROJECTOR:
        setattr(config, PROJECTOR_KEY, projector)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = model_class(config)(config)
    model = model.to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Written beside `out` and renamed into place: a failed init leaves no half checkpoint, and
    # --force replaces the old one whole (no stale shards from it stay behind).
    with replace_dir(out) as tmp, quiet_loading():  # no progress bar in an error's one line
        model.save_pretrained(tmp, safe_serialization=True)
        save_processor(tmp, tokenizer, config, template)
    return out


# ---- helpers for checkpoints that training writes --------------------------------------------


DTYPES = ("float32", "float16", "bfloat16")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise LlavaEdgeError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return dtype


def saved_dtype(checkpoint: str | Path) -> str:
    """The dtype a checkpoint's weights were saved in (config.json), float32 if it says none."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "float32"
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


# ---- a new LLaVA from a CLIP vision model and a causal LM (`llava-edge init --vision --llm`) ----


def compose_checkpoint(
    out_dir: str | Path,
    vision: str | Path,
    llm: str | Path,
    seed: int = 0,
    template: str = "llava_1_5",
    force: bool = False,
    projector: str = DEFAULT_PROJECTOR,
    dtype: str | None = None,
) -> Path:
    """Build LLaVA the way LLaVA-1.5 starts: a pretrained CLIP (or SigLIP) tower, a pretrained
    causal LM, and a fresh mlp2x_gelu projector between them (features from layer -2; CLIP's CLS
    dropped, SigLIP's patches all kept, as it has no CLS).

    The tokenizer gains `<image>` (and a padding token if it has none); the LM's embeddings grow
    to cover them if they must, padded to a multiple of 64 as the Hugging Face LLaVA-1.5 port
    does. An LM whose embeddings already cover its tokenizer keeps them as they are.

    dtype: 'float32', 'float16' or 'bfloat16'; by default the LM's own (what its config.json
    says it was saved in), so a 7B LM in fp16 does not become a checkpoint twice its size.
    """
    import torch
    from safetensors import SafetensorError
    from tokenizers import AddedToken
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlavaConfig,
        LlavaProcessor,
    )

    from llava_edge.modeling import (
        PROJECTOR_KEY,
        check_full_precision,
        model_class,
        projector_depth,
        unreadable_weights,
    )

    out = Path(out_dir)
    projector_depth(projector)
    for name, path in (("--vision", vision), ("--llm", llm)):
        if not (Path(path) / "config.json").is_file():
            raise LlavaEdgeError(f"{name} {path} is not a Hugging Face checkpoint dir")
        check_output_dir(out, force, keep=Path(path), keep_name=f"the {name} checkpoint")
        check_full_precision(
            SimpleNamespace(
                quantization_config=_read_config(Path(path)).get("quantization_config")
            ),
            f"{name} {path}",
            "give the full-precision model it was quantized from",
        )
    torch_dtype = getattr(torch, check_dtype(dtype or saved_dtype(llm)))
    kind = vision_tower_kind(vision)
    _check_causal_lm(llm)
    loading = vision
    _check_tokenizer_readable(Path(llm))
    # safetensors where a dir has them, else pickled .bin files (LLaVA-1.5's Vicuna ships only
    # those), which transformers reads with torch.load(weights_only=True): tensors, never code.
    try:
        # No progress bars or notes (a full CLIP's text tower is "unexpected": we want the
        # vision half): a failure must end in one line.
        with quiet_loading():
            tower = kind.model_class().from_pretrained(vision, dtype=torch_dtype)
            loading = llm
            lm = AutoModelForCausalLM.from_pretrained(llm, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(llm)
    except SafetensorError as e:
        raise unreadable_weights(loading, e) from None
    except pickle.UnpicklingError:  # torch's weights-only unpickler met something else
        raise LlavaEdgeError(
            f"cannot read the weights in {loading}: a .bin file there holds pickled Python "
            "objects besides tensors, which llava-edge will not unpickle; re-save its tensors "
            "as safetensors if you trust it"
        ) from None
    except (OSError, ValueError, KeyError) as e:
        flag = "--vision" if loading == vision else "--llm"
        raise LlavaEdgeError(f"cannot load {flag} {loading}: {first_line(e)}") from None
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            [AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True
        )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    torch.manual_seed(seed)  # from here on every random weight: the grown rows, the projector
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        # Grown only when a token has no row: Qwen's rows past its tokenizer's stay as they are.
        with quiet_loading():  # the note on how new rows are initialised
            lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    vision_config = tower.config
    image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=lm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        image_seq_length=image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy=kind.strategy,
        projector_hidden_act="gelu",
    )
    if projector != DEFAULT_PROJECTOR:
        setattr(config, PROJECTOR_KEY, projector)
    with torch.device("cpu"):
        model = model_class(config)._from_config(config, dtype=torch_dtype)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(lm.base_model.state_dict())
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=(
            tokenizer.eos_token_id
            if lm.generation_config.eos_token_id is None
            else lm.generation_config.eos_token_id
        ),
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = LlavaProcessor(
        image_processor=kind.image_processor(vision, vision_config.image_size),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=kind.extra_tokens,
        chat_template=hf_chat_template(get_template(template)),
    )

    with replace_dir(out) as tmp, quiet_loading():  # no progress bar in an error's one line
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_llava_edge_file(tmp, template)
    return out


BASE_TENSORS = ("multi_modal_projector.", "embed_tokens.weight")  # what base_fingerprint hashes


def base_fingerprint(checkpoint: str | Path) -> str:
    """What identifies the --model a training run starts from: a hash of its shape (each
    tower's kind and depth, the layer the features come from) and of the projector's and the
    token embeddings' tensors (dtype, shape, bytes; a few hundred MB at 7B, read one tensor at a
    time without loading the model). Two models (another fine-tune, another stage-1 projector)
    differ there; a copy of one, anywhere, does not, nor do its tensors' names (which
    transformers versions spell differently). Weights in pickled files alone are refused
    (modeling.refuse_pickled_weights) here, before any work: read from safetensors only, they
    would leave the shape alone to tell models apart."""
    import hashlib

    import torch
    from safetensors import SafetensorError, safe_open

    from llava_edge.modeling import refuse_pickled_weights

    checkpoint = Path(checkpoint)
    refuse_pickled_weights(checkpoint)
    config = _read_config(checkpoint)
    shape = {
        part: {
            key: (config.get(part) or {}).get(key) for key in ("model_type", "num_hidden_layers")
        }
        for part in ("text_config", "vision_config")
    }
    shape["vision_feature_layer"] = config.get("vision_feature_layer")
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    found = []  # (the tensor's name without its prefix, file, key)
    try:
        for path in sorted(checkpoint.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                    role = next((r for r in BASE_TENSORS if r in key), None)
                    if role is not None:
                        found.append((role + key.split(role)[-1], path, key))
        for name, path, key in sorted(found):
            with safe_open(str(path), "pt") as f:
                tensor = f.get_tensor(key).contiguous()
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy())
    except (SafetensorError, OSError) as e:
        raise LlavaEdgeError(f"cannot read the weights in {checkpoint}: {first_line(e)}") from None
    return digest.hexdigest()


def _read_config(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LlavaEdgeError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(config, dict):
        raise LlavaEdgeError(f"{path} is not a JSON object")
    return config


def _check_causal_lm(llm: str | Path) -> None:
    """Name an --llm that is no causal LM (a vision tower, a whole LLaVA) before any loading;
    transformers would say only "Unrecognized configuration class", of one of the two parts.
    A causal LM export does not take is refused too: its LLaVA would train but never run here."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from llava_edge.export.exporter import UNSUPPORTED_ROPE, rope_type
    from llava_edge.export.graphs import SUPPORTED_TEXT_MODELS

    config = _read_config(Path(llm))
    model_type = config.get("model_type")
    if model_type is not None and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LlavaEdgeError(
            f"--llm {llm} is a {model_type!r} model, not a causal language model (one "
            "AutoModelForCausalLM loads, such as Llama, Mistral or Qwen2)"
        )
    if model_type is not None and model_type not in SUPPORTED_TEXT_MODELS:
        raise LlavaEdgeError(
            f"--llm {llm} is a {model_type!r} language model, which export does not take "
            f"(it takes {', '.join(SUPPORTED_TEXT_MODELS)}): choose one of those"
        )
    rope = rope_type(
        SimpleNamespace(**{k: config.get(k) for k in ("rope_parameters", "rope_scaling")})
    )
    if rope in UNSUPPORTED_ROPE:  # Phi-3's 128k-context models
        raise LlavaEdgeError(
            f"--llm {llm} has rope type {rope!r}, which export does not take "
            f"({UNSUPPORTED_ROPE[rope]}): choose a language model without it"
        )


def _check_tokenizer_readable(llm: Path) -> None:
    """A SentencePiece tokenizer alone (tokenizer.model, as Vicuna ships) needs sentencepiece;
    without it transformers asks for `tiktoken`, and only after the weights are loaded."""
    import importlib.util

    sentencepiece_only = (llm / "tokenizer.model").is_file() and not (
        llm / "tokenizer.json"
    ).is_file()
    if sentencepiece_only and importlib.util.find_spec("sentencepiece") is None:
        raise LlavaEdgeError(
            f"the tokenizer in {llm} is SentencePiece's (tokenizer.model alone): "
            "pip install sentencepiece"
        )


@dataclass(frozen=True)
class VisionTowerKind:
    """What composing needs to know of a vision tower's family: which class loads it, which
    features LLaVA takes (CLIP: its patches, CLS dropped; SigLIP has no CLS: all of them) and its
    image processor."""

    family: str  # "clip" or "siglip"
    strategy: str  # vision_feature_select_strategy
    extra_tokens: int  # num_additional_image_tokens: outputs that are no patch (CLIP's CLS)

    def model_class(self) -> Any:
        from transformers import CLIPVisionModel, SiglipVisionModel

        return CLIPVisionModel if self.family == "clip" else SiglipVisionModel

    def image_processor(self, vision: str | Path, size: int) -> Any:
        """The tower's own preprocessing if its dir has it, else its family's at the tower's size
        (OpenAI CLIP's resize and crop; SigLIP's square resize, mean and std 0.5)."""
        with quiet_loading():  # the note that torchvision is absent, made on import
            from transformers import CLIPImageProcessor, SiglipImageProcessor

            cls = CLIPImageProcessor if self.family == "clip" else SiglipImageProcessor
            if (Path(vision) / "preprocessor_config.json").is_file():
                return cls.from_pretrained(vision)
            if self.family == "siglip":
                return SiglipImageProcessor(size={"height": size, "width": size})
            return CLIPImageProcessor(
                size={"shortest_edge": size},
                crop_size={"height": size, "width": size},
                image_mean=OPENAI_CLIP_MEAN,
                image_std=OPENAI_CLIP_STD,
            )


def _tower_kind(family: str) -> VisionTowerKind:
    from llava_edge.modeling import CLASS_TOKENS, patch_strategy

    tower = f"{family}_vision_model"
    return VisionTowerKind(family, patch_strategy(tower), CLASS_TOKENS[tower])


# A whole CLIP or SigLIP (text tower too) or its vision model alone, by its config's model_type
TOWER_FAMILIES = {
    name: family for family in ("clip", "siglip") for name in (family, f"{family}_vision_model")
}


def vision_tower_kind(vision: str | Path) -> VisionTowerKind:
    """The family of the --vision checkpoint (a whole CLIP/SigLIP or its vision model alone)."""
    path = Path(vision) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise LlavaEdgeError(f"cannot read {path}: {first_line(e)}") from None
    if model_type not in TOWER_FAMILIES:
        raise LlavaEdgeError(
            f"--vision {vision} is a {model_type!r} model; LLaVA is composed from a CLIP or "
            "SigLIP vision tower (model_type clip, clip_vision_model, siglip, siglip_vision_model)"
        )
    return _tower_kind(TOWER_FAMILIES[model_type])
