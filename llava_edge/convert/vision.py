"""The CLIP vision tower of an original-format checkpoint.

The original code loads its tower by name (`mm_vision_tower`, e.g. openai/clip-vit-large-patch14-336)
and usually saves none of it. Its config and preprocessing come from `--vision` or a local dir of
that name; its weights from the checkpoint where the checkpoint holds them (LLaVA-NeXT trains the
tower), else from that dir. A checkpoint that holds the tower but comes with no dir gets a config
read off the weights' shapes, with the conventions of the OpenAI CLIP ViTs that every LLaVA
release uses (64-wide attention heads, quick GELU, OpenAI CLIP's mean and std); a LAION OpenCLIP
tower, which does not follow them, needs its dir.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_edge.convert.weights import StateDict, read_sharded
from llava_edge.errors import LlavaEdgeError, first_line

CLIP_HEAD_DIM = 64
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")  # CLIPModel, CLIPVisionModel
HUB_ID = re.compile(r"[\w-][\w.-]*/[\w-][\w.-]*")  # owner/name, as the hub spells repos
# OpenAI's CLIP names say the patch size and, past 224 pixels, the image size:
# clip-vit-large-patch14 (224), clip-vit-large-patch14-336.
OPENAI_CLIP_NAME = re.compile(r"clip-vit-[a-z]+-patch(\d+)(?:-(\d+))?")


@dataclass
class Tower:
    config: Any  # CLIPVisionConfig
    weights: StateDict
    image_processor: Any  # CLIPImageProcessor: size, crop, mean, std, resample
    source: str  # where config and weights came from, for the log


def find_vision_dir(name: str, original: Path, given: Path | None) -> Path | None:
    """--vision, else a local dir named like `mm_vision_tower` (as given, or beside the
    checkpoint under its full or last name), else None."""
    if given is not None:
        if not (given / "config.json").is_file():
            raise LlavaEdgeError(f"--vision {given} is not a CLIP checkpoint dir (no config.json)")
        return given
    beside = Path(os.path.abspath(original)).parent  # `convert . OUT` run inside the checkpoint
    candidates = [Path(name), beside / name, beside / Path(name).name]
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def missing_tower(name: str) -> LlavaEdgeError:
    if not HUB_ID.fullmatch(name):  # a dir on the machine it was trained on
        return LlavaEdgeError(
            f"the checkpoint does not hold its vision tower, which the original loaded from the "
            f"dir {name}: {_fetch(name)}"
        )
    return LlavaEdgeError(
        f"the checkpoint does not hold its vision tower {name} (the original loads it by "
        f"name): {_fetch(name)}"
    )


def config_in_weights(name: str) -> bool:
    """Whether the tower's config can be read off its weights (`config_from_weights`). LAION's
    OpenCLIP towers, which the original takes by their `laion/...` names, have GELU where
    OpenAI's have quick GELU, and 80- to 104-wide heads in the larger ones (ViT-H, g, bigG):
    their weights do not show it, and OpenAI's conventions would make another tower."""
    return "laion" not in name.lower()


def unreadable_config(name: str) -> LlavaEdgeError:
    return LlavaEdgeError(
        f"the vision tower {name} is LAION's OpenCLIP, whose activation and attention heads its "
        f"weights do not show: {_fetch(name)}"
    )


def _fetch(name: str) -> str:
    if not HUB_ID.fullmatch(name):
        return (
            f"copy that CLIP dir here and pass --vision DIR (or put it beside the checkpoint as "
            f"{Path(name).name})"
        )
    return f"download it, e.g. `hf download {name} --local-dir clip`, and pass --vision clip"


def load_tower(name: str, directory: Path | None, in_checkpoint: StateDict, log: Any) -> Tower:
    from transformers import CLIPImageProcessor

    if directory is None and not in_checkpoint:
        raise missing_tower(name)
    if directory is None:
        config = config_from_weights(in_checkpoint)
        log(
            f"vision tower: the checkpoint's own weights; config read off their shapes "
            f"(OpenAI CLIP conventions; pass --vision with {name} to use its config)"
        )
        return Tower(config, in_checkpoint, _openai_processor(config), "the checkpoint")
    config = clip_config(directory)
    if (directory / "preprocessor_config.json").is_file():
        try:
            processor = CLIPImageProcessor.from_pretrained(directory)
        except Exception as e:  # an invalid file fails anywhere in transformers
            raise LlavaEdgeError(
                f"cannot read {directory}/preprocessor_config.json: {first_line(e)}"
            ) from None
    else:
        processor = _openai_processor(config)
    if in_checkpoint:
        return Tower(config, in_checkpoint, processor, f"the checkpoint (config from {directory})")
    weights = read_sharded(directory)
    if weights is None:
        raise LlavaEdgeError(f"{directory} holds no CLIP weights")
    weights = {k: v for k, v in weights.items() if not k.startswith("text_model.")}
    return Tower(config, weights, processor, str(directory))


def clip_config(directory: Path) -> Any:
    """The CLIPVisionConfig of a CLIP dir (CLIPModel or CLIPVisionModel), nothing else."""
    from transformers import CLIPVisionConfig

    model_type = _model_type(directory)
    if model_type not in CLIP_MODEL_TYPES:  # read from a LLaVA dir's vision_config, else
        raise LlavaEdgeError(f"{directory} is a '{model_type}' model; LLaVA's vision tower is CLIP")
    try:
        return CLIPVisionConfig.from_pretrained(directory)
    except Exception as e:  # transformers' config validation raises its own error types
        raise LlavaEdgeError(
            f"cannot read the CLIP config in {directory}: {first_line(e)}"
        ) from None


def check_tower(tower: Tower, name: str, width: int | None) -> None:
    """The tower must be the one the original was trained with: as wide as its projector's
    input (mm_hidden_size), and of the patch and image size its name says where it is an OpenAI
    CLIP name. Another tower converts into a model that runs and answers wrong."""
    config = tower.config
    fix = f"pass --vision with the CLIP checkpoint it was trained with, {name}"
    if width is not None and config.hidden_size != width:
        raise LlavaEdgeError(
            f"the vision tower from {tower.source} has hidden size {config.hidden_size}; the "
            f"checkpoint's projector takes {width} (mm_hidden_size): {fix}"
        )
    match = OPENAI_CLIP_NAME.fullmatch(Path(name).name)
    if match is None or tower.source == "the checkpoint":  # its own weights say its shape
        return
    patch, size = int(match.group(1)), int(match.group(2) or 224)
    if (config.patch_size, config.image_size) != (patch, size):
        raise LlavaEdgeError(
            f"the vision tower from {tower.source} takes {config.image_size}-pixel images in "
            f"{config.patch_size}-pixel patches; {name} takes {size}-pixel images in "
            f"{patch}-pixel patches: {fix}"
        )


def _model_type(directory: Path) -> str | None:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LlavaEdgeError(f"cannot read the CLIP config in {directory}: {e}") from None
    return config.get("model_type") if isinstance(config, dict) else None


def config_from_weights(state: StateDict) -> Any:
    from transformers import CLIPVisionConfig

    def find(suffix: str) -> Any:
        for key, value in state.items():
            if key.endswith(suffix):
                return value
        raise LlavaEdgeError(f"the checkpoint's vision tower has no {suffix} weight")

    patch = find("embeddings.patch_embedding.weight")
    hidden, _, patch_size, _ = patch.shape
    positions = find("embeddings.position_embedding.weight").shape[0]
    side = math.isqrt(positions - 1)
    layers = {int(m.group(1)) for k in state if (m := re.search(r"encoder\.layers\.(\d+)\.", k))}
    if side * side != positions - 1 or not layers or hidden % CLIP_HEAD_DIM:
        raise LlavaEdgeError(
            "the checkpoint's vision tower does not look like a CLIP ViT; pass --vision with "
            "the CLIP checkpoint it was trained with"
        )
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=find("layers.0.mlp.fc1.weight").shape[0],
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=hidden // CLIP_HEAD_DIM,
        image_size=side * patch_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _openai_processor(config: Any) -> Any:
    """OpenAI CLIP's preprocessing at the tower's size (what its preprocessor_config.json says)."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = config.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
