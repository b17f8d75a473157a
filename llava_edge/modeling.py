"""The models a checkpoint dir holds: transformers' LLaVA classes, and LLaVA with a projector
transformers has no class for.

LLaVA-1.5's projector (`mlp2x_gelu`: Linear, GELU, Linear) is transformers' own. LLaVA v1 used one
Linear layer (`linear`), and the original code also builds deeper MLPs (`mlp3x_gelu`...). A
checkpoint says which in config.json's `mm_projector_type`, the original LLaVA's own key;
`LlavaEdgeForConditionalGeneration` is transformers' LlavaForConditionalGeneration with that
projector in place, so loading, training, generate() and export all work unchanged. Only the
offline stages import this module (it needs torch).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)
from transformers.activations import ACT2FN

from llava_edge.errors import LlavaEdgeError, first_line
from llava_edge.manifest import MANIFEST_NAME

PROJECTOR_KEY = "mm_projector_type"
DEFAULT_PROJECTOR = "mlp2x_gelu"  # transformers' LlavaMultiModalProjector


# LLaVA's projectors have 1 to 3 layers; each more is a hidden-by-hidden Linear (16M parameters on
# a 7B), so a depth far past that is a typo, refused before a model of it is built.
MAX_PROJECTOR_DEPTH = 16


def projector_depth(kind: str) -> int:
    """Linear layers of a projector type: 'linear' 1, 'mlp{N}x_gelu' N (1 to 16)."""
    if kind == "linear":
        return 1
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match or not 1 <= int(match.group(1)) <= MAX_PROJECTOR_DEPTH:
        raise LlavaEdgeError(
            f"unknown projector type {kind!r}; llava-edge knows 'linear' and 'mlpNx_gelu' "
            f"(N from 1 to {MAX_PROJECTOR_DEPTH})"
        )
    return int(match.group(1))


def projector_type(config: Any) -> str:
    return getattr(config, PROJECTOR_KEY, None) or DEFAULT_PROJECTOR


class LlavaProjector(nn.Module):
    """LLaVA's projector of any depth: linear_1, then (activation, linear_i) for i = 2..N.

    The same math as the original's nn.Sequential (Linear, GELU, Linear, ...); layers are named
    as transformers names the two of mlp2x_gelu, so its weights load unchanged.
    """

    def __init__(self, config: Any):
        super().__init__()
        depth = projector_depth(projector_type(config))
        layers = (
            1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        )
        width = config.text_config.hidden_size
        bias = getattr(config, "multimodal_projector_bias", True)
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * layers, width, bias=bias)
        for i in range(2, depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(width, width, bias=bias))
        self.depth = depth
        self.act = ACT2FN[config.projector_hidden_act]

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(image_features)
        for i in range(2, self.depth + 1):
            hidden = getattr(self, f"linear_{i}")(self.act(hidden))
        return hidden


class LlavaEdgeForConditionalGeneration(LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration whose projector is the one `mm_projector_type` names."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.model.multi_modal_projector = LlavaProjector(config)
        self.post_init()


# The AnyRes families (model_type -> name, class): an image is a base image and tiles.
ANYRES_CLASSES = {
    "llava_next": ("LLaVA-NeXT", LlavaNextForConditionalGeneration),
    "llava_onevision": ("LLaVA-OneVision", LlavaOnevisionForConditionalGeneration),
}


def model_class(config: Any) -> type:
    """The class that holds a checkpoint of this config."""
    if config.model_type in ANYRES_CLASSES:
        name, cls = ANYRES_CLASSES[config.model_type]
        if projector_type(config) != DEFAULT_PROJECTOR:
            raise LlavaEdgeError(
                f"a {name} checkpoint with a '{projector_type(config)}' projector is not "
                f"supported; {name} uses mlp2x_gelu"
            )
        return cls
    if projector_type(config) == DEFAULT_PROJECTOR:
        return LlavaForConditionalGeneration
    projector_depth(projector_type(config))  # a clear error for an unknown type
    return LlavaEdgeForConditionalGeneration


def prompt_template(name: str, config: Any) -> Any:
    """The named chat template as this checkpoint is prompted: LLaVA v1's `<im_start>`/`<im_end>`
    round the image where the config sets `mm_use_im_start_end` (the original's key)."""
    from llava_edge.runtime.template import get_template, with_image_markers

    template = get_template(name)
    return (
        with_image_markers(template) if getattr(config, "mm_use_im_start_end", False) else template
    )


def check_full_precision(config: Any, what: str, instead: str) -> None:
    """Refuse a quantized upload (bitsandbytes, GPTQ, AWQ: `quantization_config`): graphs are
    traced and models trained from float weights, and loading one needs the quantizer's own
    package, which transformers asks for with an ImportError."""
    quantized = getattr(config, "quantization_config", None)
    if not quantized:
        return
    method = (
        quantized.get("quant_method")
        if isinstance(quantized, dict)
        else getattr(quantized, "quant_method", None)
    ) or "quantized"
    raise LlavaEdgeError(
        f"{what} holds {method} weights (quantization_config in its config.json); this takes "
        f"full-precision ones (fp32, fp16 or bf16): {instead}"
    )


# The image processors' backend whose arithmetic the runtime replays (llava_edge.runtime.image).
PROCESSOR_BACKEND = "pil"


def load_processor(source: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """A checkpoint's processor, its image processor on the PIL backend whatever is installed:
    transformers picks its torchvision backend wherever torchvision is (NVIDIA's Jetson PyTorch
    containers), whose resize differs from PIL's by up to 0.014 in normalised pixels, so export
    would verify against, and training would learn from, other pixels than the runtime's. The
    image processor loads alone (AutoProcessor would hand `backend` to the tokenizer too) and
    takes the processor's place as an attribute: passed to AutoProcessor, it would be saved as one
    of its settings, which save_pretrained cannot write. AutoImageProcessor comes from its own
    module: transformers 5.4 to 5.17 export it at the top level only where torchvision is. A
    LLaVA-OneVision processor loads without its video processor (OnevisionProcessorWithoutVideo)."""
    from transformers import AutoProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    loader = OnevisionProcessorWithoutVideo if _is_onevision(source) else AutoProcessor
    processor = loader.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    processor.image_processor = AutoImageProcessor.from_pretrained(
        str(source), trust_remote_code=trust_remote_code, backend=PROCESSOR_BACKEND
    )
    return processor


def _is_onevision(source: str | os.PathLike) -> bool:
    """Whether `source` holds a LLaVA-OneVision model. A dir without a readable config.json (a
    LoRA adapter dir holds the processor alone) is not: AutoProcessor loads it, or says why not."""
    try:
        config = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "llava_onevision"


class OnevisionProcessorWithoutVideo(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without its video processor, which transformers builds on
    torchvision (not one of export's dependencies) and loads with it, or fails to load the
    processor at all. llava-edge takes no video; images, prompts and image token counts are
    LlavaOnevisionProcessor's own."""

    video_processor = None

    @classmethod
    def get_attributes(cls) -> list[str]:
        return [name for name in super().get_attributes() if name != "video_processor"]


def check_processor(processor: Any, config: Any, what: str) -> None:
    """A LlavaProcessor without patch_size (an older llava-hf processor_config.json) cannot expand
    <image> into image tokens: transformers fails with a TypeError at the first prompt."""
    if getattr(processor, "patch_size", 0) is None:
        raise LlavaEdgeError(
            f"the processor of {what} cannot expand <image> into image tokens (no patch_size "
            f'in its processor_config.json, or no such file); add "patch_size": '
            f"{config.vision_config.patch_size} to processor_config.json (a new file where "
            "there is none)"
        )


# The vision towers LLaVA is built on (their config's model_type), each with how many of its
# outputs are no image patch: CLIP's class token, which the 'default' feature selection drops;
# SigLIP has none, so LLaVA takes all its outputs ('full').
CLASS_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}


def patch_strategy(tower: str) -> str:
    """The vision_feature_select_strategy that keeps exactly a tower's patches."""
    return "default" if CLASS_TOKENS[tower] else "full"


def no_checkpoint(path: str | os.PathLike, what: str) -> LlavaEdgeError:
    """The error for a dir without config.json given as a checkpoint; a model dir export wrote
    and LoRA adapters (`train --keep-adapters`' OUT/adapter, a LoRA run's trainer checkpoint)
    are named as such, with what to give instead (giving one where a checkpoint belongs is the
    likely slip)."""
    if (Path(path) / MANIFEST_NAME).is_file():
        return LlavaEdgeError(
            f"{what} {path} is a model dir `llava-edge export` wrote, not a checkpoint; give the "
            "checkpoint it was exported from"
        )
    if (Path(path) / "adapter_config.json").is_file():  # peft's
        return LlavaEdgeError(
            f"{what} {path} holds LoRA adapters, not a checkpoint; merge them into one with "
            f"`llava-edge merge-lora {path} OUT_DIR` and give OUT_DIR"
        )
    return LlavaEdgeError(
        f"{what} {path} has no config.json: it is not a Hugging Face checkpoint dir"
    )


def read_config(source: str | os.PathLike, what: str, trust_remote_code: bool = False) -> Any:
    """A checkpoint's config through AutoConfig, each way transformers refuses one as one line
    naming `what` was given: its strict validation raises huggingface_hub's StrictDataclassError
    (a value a field may not take) and KeyError (rope settings missing a key), besides OSError
    (no or unreadable file) and ValueError."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise LlavaEdgeError(f"cannot load {what} {source}: {first_line(e)}") from None
    except ValueError as e:
        raise LlavaEdgeError(f"{what} {source}: {first_line(e)}") from None
    except KeyError as e:  # "Missing required keys in rope_parameters ..."
        raise LlavaEdgeError(
            f"{what} {source}: config.json: {e.args[0] if e.args else e}"
        ) from None
    except StrictDataclassError as e:  # its message spans lines
        said = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise LlavaEdgeError(f"{what} {source}: config.json: {said}") from None


def load_model(checkpoint: str | os.PathLike, config: Any = None, **kwargs: Any) -> Any:
    """from_pretrained on the class `model_class` picks (kwargs go to from_pretrained), refusing
    weights that lack a tensor the model needs."""
    from safetensors import SafetensorError

    if kwargs.get("use_safetensors"):
        refuse_pickled_weights(checkpoint)
    if config is None:
        config = read_config(checkpoint, "checkpoint", kwargs.get("trust_remote_code", False))
    try:
        model, info = model_class(config).from_pretrained(
            checkpoint, output_loading_info=True, **kwargs
        )
    except SafetensorError as e:  # a truncated or corrupt weights file
        raise unreadable_weights(checkpoint, e) from None
    check_no_missing_weights(checkpoint, info["missing_keys"])
    return model


def refuse_pickled_weights(checkpoint: str | os.PathLike) -> None:
    """A checkpoint whose weights are pickled PyTorch files alone (`save_pretrained(...,
    safe_serialization=False)`, older uploads) is refused in words: reading a pickle can run
    code in it, and transformers' own refusal names only the safetensors file it did not find."""
    path = Path(checkpoint)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    if any(path.glob("pytorch_model*.bin")):
        raise LlavaEdgeError(
            f"{checkpoint} holds its weights as pickled PyTorch files (pytorch_model*.bin), "
            "which llava-edge does not read (unpickling can run code in them): if you trust it, "
            "load it in transformers with use_safetensors=False, save_pretrained the model and "
            "its processor to a new dir (safetensors by default) and give that"
        )


def check_no_missing_weights(checkpoint: str | os.PathLike, missing: Any) -> None:
    """transformers fills a tensor the weights lack with random numbers and says so only in its
    log: training would train, and export verify, a model nobody saved."""
    if missing:
        names = sorted(missing)
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise LlavaEdgeError(
            f"{checkpoint}: its weights lack {len(names)} tensor{'s' if len(names) > 1 else ''} "
            f"the model needs ({listed}), which would run as random numbers; the checkpoint is "
            "incomplete or saved under other tensor names: save it again with save_pretrained"
        )


def unreadable_weights(checkpoint: str | os.PathLike, error: Exception) -> LlavaEdgeError:
    return LlavaEdgeError(
        f"cannot read the weights in {checkpoint} ({first_line(error)}); the file is truncated or corrupt: "
        "copy or save the checkpoint again"
    )
