"""LoRA on the language model, as LLaVA-1.5's LoRA runs do, with peft.

Adapters go on every Linear of the language model and nowhere else: PEFT has no default targets
for LLaVA, and CLIP's attention uses the same q_proj/k_proj/v_proj names, so the targets are a
regex anchored on `language_model`. The projector trains fully (`modules_to_save`), the vision
tower and lm_head stay frozen.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError, first_line

PROJECTOR = "multi_modal_projector"
ADAPTER_DIR = "adapter"
CONFIG_NAME = "adapter_config.json"  # peft's


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
    with _no_deprecation_noise():
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
    Adapters that do not fit the base (other widths, other layers) are refused, never merged in
    part; so are adapters `train` saved, onto another base than they were trained from.
    """
    import torch

    from llava_edge.files import check_output_dir, replace_dir
    from llava_edge.manifest import read_checkpoint_template
    from llava_edge.modeling import load_model, load_processor
    from llava_edge.training.checkpoint import saved_dtype, write_llava_edge_file

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    given = base is not None
    if base is None:
        base = config.base_model_name_or_path
        if not base:
            raise LlavaEdgeError(
                f"{adapter_dir}/{CONFIG_NAME} does not name its base model; pass --base"
            )
    base = Path(base)
    if given and not (base / "config.json").is_file():
        raise LlavaEdgeError(
            f"--base {base} is not a checkpoint dir (it has no config.json); give the checkpoint "
            "the adapters were trained from"
        )
    if not (base / "config.json").is_file():
        raise LlavaEdgeError(f"base checkpoint {base} does not exist; pass --base")
    _check_not_merged_into(base, adapter_dir, config)
    _check_trained_from(base, adapter_dir, config)
    out = Path(out_dir)
    check_output_dir(out, force, keep=adapter_dir, keep_name="the adapters")
    check_output_dir(out, force, keep=base, keep_name="the base checkpoint")
    source = adapter_dir if (adapter_dir / "processor_config.json").is_file() else base
    what = "the base checkpoint" if source == base else "the adapters"
    try:  # before the merge: its tokenizer and image processor are saved with the result
        processor = load_processor(source)
    except (OSError, ValueError) as e:  # a broken config, missing tokenizer files
        detail = first_line(e).strip().rstrip(":")
        raise LlavaEdgeError(f"cannot load the processor of {what} {source}: {detail}") from None
    try:
        model = load_model(base, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:  # no weights file
        raise LlavaEdgeError(f"cannot load the base checkpoint {base}: {first_line(e)}") from None
    merged = load_adapters(model, adapter_dir, config, base).merge_and_unload()
    template = read_checkpoint_template(source) or read_checkpoint_template(base)

    with replace_dir(out) as tmp:
        merged.to(getattr(torch, saved_dtype(base))).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_llava_edge_file(tmp, template)
    return out


def _check_not_merged_into(base: Path, adapter_dir: Path, config: Any) -> None:
    """Refuse as base the OUT of the `train --lora` run that holds these adapters (OUT/adapter,
    OUT/checkpoints/...): OUT has them merged in already, and would get them twice."""
    from llava_edge.training.train import TRAINER_DIR

    try:
        inside = adapter_dir.resolve().relative_to(base.resolve()).parts
    except ValueError:
        return
    if inside and inside[0] in (ADAPTER_DIR, TRAINER_DIR):
        trained_from = config.base_model_name_or_path
        hint = (
            f"leave out --base to merge them into {trained_from}, which they were trained from"
            if trained_from
            else "pass the checkpoint they were trained from"
        )
        raise LlavaEdgeError(
            f"--base {base} is the checkpoint these adapters were merged into when they were "
            f"trained: merging them again would add them twice; {hint}"
        )


def _check_trained_from(base: Path, adapter_dir: Path, config: Any) -> None:
    """Refuse a base other than the one `train` trained the adapters from (the run record it
    saves beside them names it by checkpoint.base_fingerprint): another model of the same shape
    (another fine-tune, another stage-1 projector, a checkpoint rewritten at the path the
    adapters name) takes them without a size mismatch and gives a model nobody trained; that
    last is said so where `base` is the path the adapters' config names. Adapters saved without
    a record are not checked."""
    from llava_edge.training.checkpoint import base_fingerprint
    from llava_edge.training.train import RUN_FILE

    record = adapter_dir / RUN_FILE
    try:
        was = json.loads(record.read_text())
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlavaEdgeError(
            f"cannot read {record} ({first_line(e)}), the record of the run that trained the "
            "adapters; copy it again with them"
        ) from None
    if not isinstance(was, dict) or was.get("base_sha256") in (None, base_fingerprint(base)):
        return
    named = config.base_model_name_or_path  # the path they were trained from, absolute
    if named and Path(named).resolve() == base.resolve():
        raise LlavaEdgeError(
            f"the base checkpoint {base} was written over since the adapters in {adapter_dir} "
            "were trained from it (its projector, token embeddings or shape differ): merged "
            "there they would make a model nobody trained; give --base a copy of the "
            "checkpoint they were trained from"
        )
    raise LlavaEdgeError(
        f"the adapters in {adapter_dir} were trained from --model {was.get('base')}, not {base} "
        "(their projector, token embeddings or shape differ): merged there they would make a "
        "model nobody trained; give --base the checkpoint they were trained from"
    )


def read_adapter_config(adapter_dir: Path) -> Any:
    """The adapters' peft config, or a one-line error naming what is wrong with it or with the
    dir (no weights beside it)."""
    from peft import PeftConfig
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    path = adapter_dir / CONFIG_NAME
    if not adapter_dir.exists():
        raise LlavaEdgeError(f"adapter dir {adapter_dir} does not exist")
    if not path.is_file():
        raise LlavaEdgeError(
            f"{adapter_dir} has no {CONFIG_NAME}: it holds no LoRA adapters; "
            + _where_adapters_are(adapter_dir)
        )
    try:
        config = PeftConfig.from_pretrained(adapter_dir)
    except (OSError, ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise LlavaEdgeError(f"cannot read {path}: {first_line(e)}; re-save the adapters") from None
    # peft would look for them on the Hub, and say only that a path is no repo id
    if not any((adapter_dir / name).is_file() for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise LlavaEdgeError(
            f"{adapter_dir} has {CONFIG_NAME} but no adapter weights ({SAFETENSORS_WEIGHTS_NAME} "
            f"or {WEIGHTS_NAME}); copy them there too"
        )
    return config


def _where_adapters_are(given: Path) -> str:
    """What to give merge-lora instead of a dir without adapters: a `train --lora` OUT has them
    merged in already, and keeps them (with --keep-adapters) in OUT/adapter."""
    kept = given / ADAPTER_DIR
    if (kept / CONFIG_NAME).is_file():
        return (
            f"{given} is a checkpoint with them merged in already (use it as it is), and {kept} "
            "holds them"
        )
    return (
        f"give the dir that holds {CONFIG_NAME} (`train --lora --keep-adapters` keeps OUT/adapter)"
    )


def load_adapters(model: Any, adapter_dir: Path, config: Any, base: Path) -> Any:
    """`model` wrapped in the saved adapters, each of their weights loaded into it.

    PeftModel.from_pretrained loads what matches and drops the rest unsaid (an adapter of a
    layer the base lacks); its load_adapter returns the keys left over, so the check is here.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    mismatch = (
        f"the adapters in {adapter_dir} do not fit the base checkpoint {base} "
        f"(they were trained on {config.base_model_name_or_path or 'another'})"
    )
    config.inference_mode = True
    with _no_deprecation_noise():
        model = PeftModel(model, config)
    try:
        loaded = model.load_adapter(adapter_dir, "default")
    except RuntimeError as e:  # load_state_dict: "size mismatch for ..."
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), "")
        raise LlavaEdgeError(f"{mismatch}: {detail or first_line(e)}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LlavaEdgeError(
            f"cannot read the adapter weights in {adapter_dir}: {first_line(e)}; re-save the adapters"
        ) from None
    if loaded.unexpected_keys:
        keys = loaded.unexpected_keys
        raise LlavaEdgeError(
            f"{mismatch}: {len(keys)} adapter weight(s) have no module to go into, e.g. {keys[0]}"
        )
    if loaded.missing_keys:
        keys = loaded.missing_keys
        raise LlavaEdgeError(
            f"{mismatch}: they lack {len(keys)} weight(s) their config puts on the base, "
            f"e.g. {keys[0]}"
        )
    return model


@contextlib.contextmanager
def _no_deprecation_noise() -> Iterator[None]:
    """peft reads transformers' deprecated `is_gradient_checkpointing`, a FutureWarning on every
    run that is no concern of the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        yield
