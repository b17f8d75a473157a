"""Reading weights of checkpoints in the wild without running their code.

safetensors files are read with safetensors. PyTorch's pickled `.bin` files (the original LLaVA's
`pytorch_model-*.bin` shards, `mm_projector.bin`, `non_lora_trainables.bin`) are read with
`torch.load(weights_only=True)` only, which unpickles nothing but tensors and plain containers, and
then held to be a flat dict of tensors: a file that holds anything else is refused, never run.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError, first_line

StateDict = dict[str, Any]  # name -> torch.Tensor


LFS_POINTER = b"version https://git-lfs.github.com/spec/"
SHARD_NAME = re.compile(r"(.+)-(\d+)-of-(\d+)\.(safetensors|bin)")


def read_weights(path: Path) -> StateDict:
    """One weights file: safetensors, or a pickled state dict of tensors."""
    refuse_lfs_pointer(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pickled(path)


def read_sharded(directory: Path, stem: str = "model") -> StateDict | None:
    """A whole sharded or single-file checkpoint in `directory`, None if it has none.

    Safetensors are preferred where both forms are present (they are the same weights).
    stem: "model" reads model*.safetensors / pytorch_model*.bin.
    """
    prefix = "pytorch_model" if stem == "model" else stem
    for index_name, pattern, single in (
        (f"{stem}.safetensors.index.json", f"{stem}*.safetensors", f"{stem}.safetensors"),
        (f"{prefix}.bin.index.json", f"{prefix}*.bin", f"{prefix}.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            files = sorted(set(_index_files(index)))
        elif (directory / single).is_file():
            files = [single]
        else:
            files = sorted(p.name for p in directory.glob(pattern) if _is_shard(p.name, stem))
            missing = _missing_shard(files)
            if missing is not None:
                raise LlavaEdgeError(
                    f"{directory / missing} is missing, and with it part of the weights (the "
                    "dir has no index): the download is incomplete; fetch the rest"
                )
        if files:
            state: StateDict = {}
            for name in files:
                if not (directory / name).is_file():
                    raise LlavaEdgeError(f"{directory / name} is missing (named in {index.name})")
                state.update(read_weights(directory / name))
            return state
    return None


def weight_names(directory: Path) -> set[str] | None:
    """The names of a checkpoint's weights, read off its index or its safetensors' headers
    without reading a tensor; None where only loading the files would tell (.bin shards without
    an index) or they cannot be read (read_sharded then says why)."""
    from safetensors import safe_open

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            try:
                return set(json.loads((directory / index).read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
    files = [p for p in directory.glob("model*.safetensors") if _is_shard(p.name, "model")]
    if _missing_shard([p.name for p in files]) is not None:
        return None
    names: set[str] = set()
    try:
        for path in files:
            with safe_open(str(path), "pt") as f:
                names.update(f.keys())
    except Exception:  # an LFS pointer, a damaged file...: read_sharded names it
        return None
    return names if files else None


def _is_shard(name: str, stem: str) -> bool:
    # model-00001-of-00003.safetensors, pytorch_model-00001-of-00002.bin; not training_args.bin
    return name.split(".")[0].split("-")[0] in (stem, "pytorch_model")


def _missing_shard(files: list[str]) -> str | None:
    """The first shard that shards' names (model-00001-of-00003...) say should be among `files`
    and is not: found without an index, they are all a half-finished download can tell."""
    for name in files:
        match = SHARD_NAME.fullmatch(name)
        if match is None:
            continue
        prefix, number, total, suffix = match.groups()
        for i in range(1, int(total) + 1):
            shard = f"{prefix}-{i:0{len(number)}d}-of-{total}.{suffix}"
            if shard not in files:
                return shard
    return None


def _index_files(index: Path) -> list[str]:
    try:
        files = list(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise LlavaEdgeError(f"{index} is not a weights index (no weight_map)") from None
    for name in files:  # file names in the index's own dir, nothing else
        if not isinstance(name, str) or Path(name).name != name:
            raise LlavaEdgeError(
                f"{index} names {name!r} as a weights file; an index names files beside it"
            )
    return files


def refuse_lfs_pointer(path: Path) -> None:
    """A repository cloned without Git LFS holds small text pointers where the weights belong."""
    try:
        with path.open("rb") as f:
            head = f.read(len(LFS_POINTER))
    except OSError as e:
        raise LlavaEdgeError(f"cannot read {path}: {e.strerror or e}") from None
    if head == LFS_POINTER:
        raise LlavaEdgeError(
            f"{path} is a Git LFS pointer, not the file: fetch the files (`git lfs pull` in the "
            "clone, or `hf download`)"
        )


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LlavaEdgeError(f"cannot read {path}: {first_line(e)}") from None


def _read_pickled(path: Path) -> StateDict:
    import torch

    try:
        # mmap needs the zip form torch.save has written since 1.6; older files load whole.
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # what torch's weights-only unpickler says of any object
            raise LlavaEdgeError(f"cannot read {path} as PyTorch weights: {_reason(e)}") from None
        raise LlavaEdgeError(
            f"{path} holds pickled Python objects besides tensors; llava-edge reads .bin files "
            "with torch.load(weights_only=True) only and will not unpickle them. If you trust "
            "the file, re-save its tensors as safetensors"
        ) from None
    except Exception as e:  # torch's weights-only unpickler fails on junk with any error
        raise LlavaEdgeError(f"cannot read {path} as PyTorch weights: {_reason(e)}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise LlavaEdgeError(
            f"{path} holds something other than a dict of named tensors; llava-edge takes "
            "weights files with tensors only"
        )
    return dict(state)


def _reason(error: BaseException) -> str:
    """torch.load's message, or a plain word where it is a bare type or an unpickler's detail."""
    if isinstance(error, OSError | RuntimeError | EOFError | ValueError) and str(error).strip():
        return first_line(error)
    return "not a file torch.save wrote, or a damaged one"
