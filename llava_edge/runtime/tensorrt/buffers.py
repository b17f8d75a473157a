"""Device buffer plans: where each engine tensor lives, every address 256-byte aligned.

TensorRT wants the address of every input and output aligned to 256 bytes. Rather than trust an
allocator's alignment, each engine gets one arena (one allocation) and a plan that places every
tensor, sized for its largest shape over the engine's profiles, at an aligned offset in it; the
arena itself starts at the first aligned byte of an allocation 255 bytes larger. A call then uses
a prefix of each slot, so addresses never change between calls (which CUDA graphs need).

The planning is pure arithmetic; `Arena` turns a plan into torch tensors (CUDA ones on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava_edge.manifest import TextSpec

ALIGNMENT = 256


def align(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """`nbytes` rounded up to a multiple of `alignment`."""
    return -(-nbytes // alignment) * alignment


@dataclass(frozen=True)
class Slot:
    """One tensor's place in an arena: room for `shape` (its largest) elements of `dtype`."""

    offset: int
    shape: tuple[int, ...]
    dtype: str  # numpy name

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class BufferPlan:
    slots: dict[str, Slot]
    nbytes: int  # of the arena, a multiple of the alignment


def plan(tensors: dict[str, tuple[tuple[int, ...], str]]) -> BufferPlan:
    """Place tensors (name -> (largest shape, numpy dtype)) one after another, each aligned."""
    slots, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        slot = Slot(offset, tuple(int(d) for d in shape), str(np.dtype(dtype)))
        slots[name] = slot
        offset += align(max(slot.nbytes, 1))
    return BufferPlan(slots, offset)


def kv_plan(text: TextSpec, batch: int, max_context: int) -> BufferPlan:
    """The device KV cache: keys and values of every layer, each with room for the max context.

    Reserving everything up front means a conversation can never run out of memory halfway (on a
    Jetson the GPU shares its memory with everything else on the board).
    """
    shape = (batch, text.num_kv_heads, max_context, text.head_dim)
    tensors = {}
    for layer in range(text.num_layers):
        tensors[f"key.{layer}"] = (shape, text.dtype)
        tensors[f"value.{layer}"] = (shape, text.dtype)
    return plan(tensors)


class Arena:
    """A plan made real: one zeroed torch allocation and a flat typed view per slot."""

    def __init__(self, buffer_plan: BufferPlan, device: Any):
        import torch

        self.plan = buffer_plan
        raw = torch.zeros(buffer_plan.nbytes + ALIGNMENT - 1, dtype=torch.uint8, device=device)
        start = (-raw.data_ptr()) % ALIGNMENT
        self._raw = raw  # keeps the memory alive
        self.flat = {}
        for name, slot in buffer_plan.slots.items():
            dtype = torch_dtype(slot.dtype)
            begin = start + slot.offset
            self.flat[name] = raw[begin : begin + slot.nbytes].view(dtype)

    def view(self, name: str, shape: tuple[int, ...]) -> Any:
        """The slot's first prod(shape) elements as a contiguous tensor of that shape."""
        flat = self.flat[name]
        count = math.prod(shape)
        if count > flat.numel():
            raise ValueError(f"{name}: shape {shape} does not fit its slot of {flat.numel()}")
        return flat[:count].view(shape)

    def address(self, name: str) -> int:
        return self.flat[name].data_ptr()


def torch_dtype(name: str) -> Any:
    import torch

    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "int64": torch.int64,
        "int32": torch.int32,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }[name]
