"""LoRA on the language model, as LLaVA-1.5's LoRA runs do, with peft.

Adapters go on every Linear of the language model and nowhere else: PEFT has no default targets
for LLaVA, and CLIP's attention uses the same q_proj/k_proj/v_proj names, so the targets are a
regex anchored on `language_model`. The projector trains fully (`modules_to_save`), the vision
tower and lm_head stay frozen.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError

PROJECTOR = "multi_modal_projector"
ADAPTER_DIR = "adapter"


def language_model_targets(model: Any) -> str:
    """A regex for peft's target_modules matching exactly the language model's Linear layers."""
    import torch

    suffixes = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if ".language_model." in f".{name}." and isinstance(module, torch.nn.Linear)
        }
    )
    if not suffixes:
        raise LlavaEdgeError("the language model has no Linear layers to put LoRA adapters on")
    return rf".*\blanguage_model\..*\.({'|'.join(map(re.escape, suffixes))})"


def add_lora(model: Any, rank: int, alpha: int, dropout: float) -> Any:
    """Wrap the model in peft LoRA adapters; only adapters and projector stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=language_model_targets(model),
        modules_to_save=[PROJECTOR],
    )
    return get_peft_model(model, config)


def merge_lora(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Fold saved adapters (and their trained projector) into a plain LLaVA checkpoint.

    `base` defaults to the checkpoint the adapters were trained from (adapter_config.json).
    The processor and template come from the adapter dir when it has them, else from the base.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor

    from llava_edge.files import check_output_dir, replace_dir
    from llava_edge.manifest import read_checkpoint_template
    from llava_edge.modeling import load_model
    from llava_edge.training.checkpoint import saved_dtype, write_llava_edge_file

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise LlavaEdgeError(f"{adapter_dir} has no adapter_config.json: it holds no LoRA adapters")
    if base is None:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
        if not base:
            raise LlavaEdgeError(f"{config_path} does not name its base model; pass --base")
    base = Path(base)
    if not (base / "config.json").is_file():
        raise LlavaEdgeError(f"base checkpoint {base} does not exist; pass --base")
    out = Path(out_dir)
    check_output_dir(out, force, keep=adapter_dir, keep_name="the adapters")
    model = load_model(base, dtype=torch.float32, use_safetensors=True)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    source = adapter_dir if (adapter_dir / "processor_config.json").is_file() else base
    processor = AutoProcessor.from_pretrained(source)
    template = read_checkpoint_template(source) or read_checkpoint_template(base)

    with replace_dir(out) as tmp:
        merged.to(getattr(torch, saved_dtype(base))).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_llava_edge_file(tmp, template)
    return out
