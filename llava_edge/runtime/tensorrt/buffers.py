"""Device buffer plans: where each engine tensor lives, every address 256-byte aligned.

TensorRT wants the address of every input and output aligned to 256 bytes. Rather than trust an
allocator's alignment, each engine gets one arena (one allocation) and a plan that places every
tensor, sized for its largest shape over the engine's profiles, at an aligned offset in it; the
arena itself starts at the first aligned byte of an allocation 255 bytes larger. A call then uses
a prefix of each slot, so addresses never change between calls (which CUDA graphs need).

The planning is pure arithmetic; `Arena` turns a plan into device memory (see cuda.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llava_edge.runtime.tensorrt.cuda import Allocation, Cuda, DeviceArray

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


class Arena:
    """A plan made real: one aligned device allocation and a typed view per slot."""

    def __init__(self, buffer_plan: BufferPlan, cuda: Cuda):
        self.plan = buffer_plan
        self.memory = Allocation(cuda, buffer_plan.nbytes)

    def view(self, name: str, shape: tuple[int, ...]) -> DeviceArray:
        """The slot's first prod(shape) elements, as an array of that shape."""
        slot = self.plan.slots[name]
        dtype = np.dtype(slot.dtype)
        if math.prod(shape) * dtype.itemsize > slot.nbytes:
            raise ValueError(f"{name}: shape {shape} does not fit its slot of {slot.shape}")
        return DeviceArray(self.memory.ptr + slot.offset, tuple(int(d) for d in shape), dtype)

    def address(self, name: str) -> int:
        return self.memory.ptr + self.plan.slots[name].offset

    def free(self) -> None:
        self.memory.free()
