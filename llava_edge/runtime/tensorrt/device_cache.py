"""The decoder's KV cache in device memory, fed to TensorRT without ever visiting the host.

The engine's `past` input must be one contiguous [B, kv, past, D] tensor per layer, so a cache
holds its used slots laid out as [B, kv, capacity, D] and binds exactly that as past; slots not
yet written are zero and masked out. Capacity grows in chunks of `kv_chunk` slots (256 unless
`build` was told otherwise): decode is bandwidth-bound, and binding a whole max-context region
every step would make attention read all of it for every token (for a 7B model at 4096 tokens,
2 GiB a token, more than its int4 weights); with chunks it reads at most kv_chunk - 1 unused slots.

Memory is taken for the context a request needs, not the max context: each capacity is one
device block (every layer's keys and values), and growing takes a larger block, copies the used
slots over with one 2-D copy per layer and gives the old block back. Blocks come from a pool that
the backend keeps across requests, so a robot asking the same kind of question again and again
reuses the same few blocks instead of allocating on every request.

The cache's dtype is the engine's: fp16 where the graph TensorRT built computes in fp16 (the int4
form), half the memory and bandwidth of fp32.

A call writes only the new positions: the engine's `present` outputs land in staging buffers and
a 2-D copy per layer puts them at the cache's current length, on the backend's stream.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import TextSpec
from llava_edge.runtime.tensorrt.cuda import Allocation, Cuda, DeviceArray
from llava_edge.runtime.tensorrt.profiles import capacity


class KVPool:
    """Device blocks given back by caches, kept for the next request of the same size.

    Blocks come back from any thread (a cache dropped by the garbage collector), so giving back
    only files them; they are freed, beyond `keep_bytes`, when the next block is taken, on the
    thread that runs the backend.
    """

    def __init__(self, cuda: Cuda, keep_bytes: int):
        self.cuda = cuda
        self.keep_bytes = keep_bytes
        self._free: list[Allocation] = []
        self._lock = threading.Lock()
        self.allocated = 0  # blocks made so far (reuse keeps this low)

    def take(self, nbytes: int) -> Allocation:
        with self._lock:
            match = next((b for b in self._free if b.nbytes == nbytes), None)
            if match is not None:
                self._free.remove(match)
            surplus = self._trim()
        for block in surplus:
            block.free()
        if match is not None:
            return match
        self.allocated += 1
        return Allocation(self.cuda, nbytes)

    def give(self, block: Allocation) -> None:
        with self._lock:
            self._free.append(block)

    def _trim(self) -> list[Allocation]:
        """Blocks beyond `keep_bytes`, oldest first, taken out to be freed."""
        out = []
        while sum(b.nbytes for b in self._free) > self.keep_bytes:
            out.append(self._free.pop(0))
        return out

    @property
    def kept(self) -> int:
        return len(self._free)

    def close(self) -> None:
        with self._lock:
            blocks, self._free = self._free, []
        for block in blocks:
            block.free()


class DeviceKVCache:
    def __init__(
        self,
        text: TextSpec,
        batch: int,
        max_context: int,
        kv_chunk: int,
        cuda: Cuda,
        stream: Any,
        pool: KVPool,
        dtype: str | None = None,
    ):
        """dtype: of the keys and values, the decoder engine's (default: the manifest's)."""
        self.text = text
        self.batch = batch
        self.max_context = max_context
        self.kv_chunk = kv_chunk
        self.cuda, self.stream, self.pool = cuda, stream, pool
        self.dtype = np.dtype(dtype or text.dtype)
        self.length = 0  # slots in use (padding slots of left-padded rows included)
        self.capacity = 0
        self.valid = np.zeros((batch, 0), dtype=np.int64)  # 1 where a slot holds a real token
        # CUDA graphs captured against this cache's buffers (the backend manages them).
        self.graphs: dict[Any, Any] = {}
        self._block: list[Allocation | None] = [None]  # shared with the finalizer
        weakref.finalize(self, _give_back, pool, self._block)

    @property
    def row_bytes(self) -> int:
        """One slot of one (batch row, head): head_dim values."""
        return self.text.head_dim * self.dtype.itemsize

    def region_bytes(self, slots: int) -> int:
        """One layer's keys (or values) at `slots` capacity."""
        return self.batch * self.text.num_kv_heads * slots * self.row_bytes

    def block_bytes(self, slots: int) -> int:
        return 2 * self.text.num_layers * self.region_bytes(slots)

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more slots, growing by whole chunks, or fail past the context."""
        needed = self.length + extra
        if needed > self.max_context:
            raise LlavaEdgeError(
                f"the conversation needs {needed} tokens, over the {self.max_context} the "
                "TensorRT engines were built for; shorten the prompt, lower max_new_tokens, start "
                "a new chat, or rebuild with a larger --max-context"
            )
        if needed <= self.capacity:
            return
        new = capacity(needed, self.kv_chunk, self.max_context)
        block = self.pool.take(self.block_bytes(new))
        self.cuda.zero(block.ptr, self.block_bytes(new), self.stream)
        old = self._block[0]
        if old is not None:
            rows = self.batch * self.text.num_kv_heads
            for region in range(2 * self.text.num_layers):
                self.cuda.copy_rows(
                    block.ptr + region * self.region_bytes(new),
                    new * self.row_bytes,
                    old.ptr + region * self.region_bytes(self.capacity),
                    self.capacity * self.row_bytes,
                    self.length * self.row_bytes,
                    rows,
                    self.stream,
                )
            self.pool.give(old)
        self._block[0] = block
        valid = np.zeros((self.batch, new), dtype=np.int64)
        valid[:, : self.length] = self.valid[:, : self.length]
        self.valid, self.capacity = valid, new
        self.graphs.clear()  # they bound the old block

    def _region(self, index: int) -> DeviceArray:
        t = self.text
        ptr = self._block[0].ptr + index * self.region_bytes(self.capacity)
        return DeviceArray(ptr, (self.batch, t.num_kv_heads, self.capacity, t.head_dim), self.dtype)

    def past(self, layer: int) -> tuple[DeviceArray, DeviceArray]:
        """What the engine reads as this layer's past: every slot of the current capacity."""
        return self._region(2 * layer), self._region(2 * layer + 1)

    def attention_mask(self, new_mask: np.ndarray) -> np.ndarray:
        """[batch, capacity + new tokens]: the cache's valid slots, then the new tokens' mask."""
        return np.concatenate([self.valid, new_mask.astype(np.int64)], axis=1)

    def append(self, layer: int, key: DeviceArray, value: DeviceArray) -> None:
        """Write one call's keys/values ([B, kv, S, D], on the device) at the current length."""
        seq = key.shape[2]
        rows = self.batch * self.text.num_kv_heads
        for past, new in zip(self.past(layer), (key, value), strict=True):
            self.cuda.copy_rows(
                past.ptr + self.length * self.row_bytes,
                self.capacity * self.row_bytes,
                new.ptr,
                seq * self.row_bytes,
                seq * self.row_bytes,
                rows,
                self.stream,
            )

    def advance(self, new_mask: np.ndarray) -> None:
        """Mark the slots just appended as used."""
        seq = new_mask.shape[1]
        self.valid[:, self.length : self.length + seq] = new_mask
        self.length += seq

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on, as if they had never been appended (a chat turn
        that does not finish is rolled back with this). The capacity, and with it the CUDA
        graphs captured for it, stays; forgotten slots are zeroed on the device again."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        if length < self.length:
            rows = self.batch * self.text.num_kv_heads
            for region in range(2 * self.text.num_layers):
                self.cuda.zero_rows(
                    self._region(region).ptr + length * self.row_bytes,
                    self.capacity * self.row_bytes,
                    (self.length - length) * self.row_bytes,
                    rows,
                    self.stream,
                )
        self.valid[:, length : self.length] = 0
        self.length = length

    def release(self) -> None:
        """Give the device block back to the pool now (the cache is empty afterwards)."""
        _give_back(self.pool, self._block)
        self.length = self.capacity = 0
        self.valid = np.zeros((self.batch, 0), dtype=np.int64)
        self.graphs.clear()


def _give_back(pool: KVPool, holder: list[Allocation | None]) -> None:
    block, holder[0] = holder[0], None
    if block is not None:
        pool.give(block)
