"""The decoder's KV cache in device memory, fed to TensorRT without ever visiting the host.

The engine's `past` input must be one contiguous [B, kv, past, D] tensor per layer, so a cache
holds its used slots laid out as [B, kv, capacity, D] and binds exactly that as past; slots not
yet written are zero and masked out. Capacity grows in chunks of `kv_chunk` slots (256 unless
`build` was told otherwise): decode is bandwidth-bound, and binding a whole max-context region
every step would make attention read all of it for every token (for a 7B model at 4096 tokens,
2 GiB a token, more than its int4 weights); with chunks it reads at most kv_chunk - 1 unused slots.

Memory is taken for the context a request needs, not the max context: each layer's keys, and
its values, are one device block of the current capacity, and growing replaces them one at a
time (a larger block, the used slots copied over with one 2-D copy, the old block given back), so
a cache that grows holds one layer's keys (or values) twice for a moment, never the whole cache
twice: at the engines' max context it needs what `llava-edge plan` counts, plus one such block.
Blocks come from a pool that the backend keeps across requests, so a robot asking the same kind
of question again and again reuses the same blocks instead of allocating on every request; the
pool keeps only what fits beside the blocks caches hold in one max-context cache.

The cache's dtype is the engine's: fp16 where the graph TensorRT built computes in fp16 (the int4
form), half the memory and bandwidth of fp32.

A call writes only the new positions: the engine's `present` outputs land in staging buffers and
a 2-D copy per layer puts them at each row's length, on the backend's stream. Every row keeps its
own length, as the onnxruntime KVCache's rows do, so requests join and leave a batch
(runtime/batching.py).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import TextSpec
from llava_edge.runtime.kv_cache import RowCache, RowRun
from llava_edge.runtime.tensorrt.cuda import Allocation, Cuda, DeviceArray
from llava_edge.runtime.tensorrt.profiles import capacity


class KVPool:
    """Device blocks given back by caches, kept for the next request of the same size.

    What it keeps and what caches hold stay within `keep_bytes` together (the backend's: one
    max-context cache of its largest batch): kept blocks are freed, oldest first, before a new
    block would go past it, so a cache growing to the max context is never short of the memory
    `build` checked for because the pool still holds the blocks of its smaller capacities.

    Blocks come back from any thread (a cache dropped by the garbage collector), so giving back
    only files them; they are freed when the next block is taken, on the thread that runs the
    backend.
    """

    def __init__(self, cuda: Cuda, keep_bytes: int):
        self.cuda = cuda
        self.keep_bytes = keep_bytes
        self._free: list[Allocation] = []
        # Reentrant: the cycle collector may run a dropped cache's finalizer, which gives its
        # blocks back, on this very thread while it holds the lock (at any allocation).
        self._lock = threading.RLock()
        self._held = 0  # bytes of the blocks taken and not given back (held by caches)
        self.allocated = 0  # blocks made so far (reuse keeps this low)

    def take(self, nbytes: int) -> Allocation:
        with self._lock:
            match = next((b for b in self._free if b.nbytes == nbytes), None)
            if match is not None:
                self._free.remove(match)
            surplus = self._trim(0 if match is not None else nbytes)
            self._held += nbytes
        for block in surplus:
            block.free()
        if match is not None:
            return match
        try:
            block = Allocation(self.cuda, nbytes)
        except BaseException:
            with self._lock:
                self._held -= nbytes
            raise
        self.allocated += 1
        return block

    def give(self, block: Allocation) -> None:
        with self._lock:
            self._free.append(block)
            self._held -= block.nbytes

    def _trim(self, new: int) -> list[Allocation]:
        """Kept blocks, oldest first, taken out to be freed until they fit in `keep_bytes` beside
        the blocks caches hold and a `new` one."""
        out = []
        kept = sum(b.nbytes for b in self._free)
        while self._free and self._held + new + kept > self.keep_bytes:
            block = self._free.pop(0)
            kept -= block.nbytes
            out.append(block)
        return out

    @property
    def kept(self) -> int:
        return len(self._free)

    def close(self) -> None:
        with self._lock:
            blocks, self._free = self._free, []
        for block in blocks:
            block.free()


class DeviceKVRows(RowRun):
    """Rows of a DeviceKVCache (see RowRun)."""

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def graphs(self) -> dict[Any, Any]:
        return self.cache.graphs

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more slots in every row of the run (the capacity is shared)."""
        self.cache.grow(self.length + extra)

    def past(self, layer: int) -> tuple[DeviceArray, DeviceArray]:
        """What the engine reads as this layer's past: every slot of the current capacity."""
        c = self.cache
        return (
            c._region(2 * layer, self.start, self.stop),
            c._region(2 * layer + 1, self.start, self.stop),
        )

    def attention_mask(self, new_mask: np.ndarray) -> np.ndarray:
        """[rows, capacity + new tokens]: the rows' valid slots, then the new tokens' mask."""
        valid = self.cache.valid[self.start : self.stop]
        return np.concatenate([valid, new_mask.astype(np.int64)], axis=1)

    def append(self, layer: int, key: DeviceArray, value: DeviceArray) -> None:
        """Write one call's keys/values ([rows, kv, S, D], on the device) at each row's length:
        one 2-D copy when the rows are level (a single request), a copy per
        row otherwise."""
        c, seq = self.cache, key.shape[2]
        heads, lengths = c.text.num_kv_heads, self.lengths
        pitch, width = c.capacity * c.row_bytes, seq * c.row_bytes
        level = (lengths == lengths[0]).all()
        runs = [(0, self.batch)] if level else [(i, i + 1) for i in range(self.batch)]
        for past, new in zip(self.past(layer), (key, value), strict=True):
            for first, last in runs:
                c.cuda.copy_rows(
                    past.ptr + first * c.row_block + int(lengths[first]) * c.row_bytes,
                    pitch,
                    new.ptr + first * heads * width,
                    width,
                    width,
                    (last - first) * heads,
                    c.stream,
                )

    def advance(self, new_mask: np.ndarray) -> None:
        """Mark the slots just appended as used (where the new tokens' mask says so)."""
        seq = new_mask.shape[1]
        for i, at in enumerate(self.lengths.tolist()):
            self.cache.valid[self.start + i, at : at + seq] = new_mask[i]
        self.lengths[:] += seq


class DeviceKVCache(RowCache):
    """Keys/values of `batch` rows on the device, each layer's as one [batch, kv_heads, capacity,
    head_dim] region. Each row has its own length, as the onnxruntime KVCache's rows do, so rows
    may hold different conversations (continuous batching, runtime/batching.py): a call writes
    each row's new keys/values at that row's length, and `rows()` hands the engine a run of rows
    (batch is the outermost axis, so a run is one contiguous region, never a copy)."""

    view = DeviceKVRows

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
        self.lengths = np.zeros(batch, dtype=np.int64)  # row r uses slots [0, lengths[r])
        self.capacity = 0
        self.valid = np.zeros((batch, 0), dtype=np.int64)  # 1 where a slot holds a real token
        # CUDA graphs captured against this cache's buffers (the backend manages them).
        self.graphs: dict[Any, Any] = {}
        # each layer's keys (at 2i) and values (2i + 1): one block each; shared with the finalizer
        self._blocks: list[Allocation | None] = [None] * (2 * text.num_layers)
        weakref.finalize(self, _give_back, pool, self._blocks)

    @property
    def row_bytes(self) -> int:
        """One slot of one (batch row, head): head_dim values."""
        return self.text.head_dim * self.dtype.itemsize

    @property
    def row_block(self) -> int:
        """One batch row of one layer's keys (or values): every head's slots."""
        return self.text.num_kv_heads * self.capacity * self.row_bytes

    def region_bytes(self, slots: int) -> int:
        """One layer's keys (or values) at `slots` capacity."""
        return self.batch * self.text.num_kv_heads * slots * self.row_bytes

    def block_bytes(self, slots: int) -> int:
        return 2 * self.text.num_layers * self.region_bytes(slots)

    # ---- rows as a scheduler moves them ------------------------------------------------------

    def _forget(self, row: int, length: int) -> None:
        """Forgotten slots are zeroed on the device again and masked; the capacity, and with it
        the CUDA graphs captured for it, stays."""
        self._zero(row, length, int(self.lengths[row]))
        self.valid[row, length:] = 0

    def _copy_row(self, src: int, dst: int, n: int) -> None:
        if n:
            pitch = self.capacity * self.row_bytes
            for region in range(2 * self.text.num_layers):
                base = self._region(region).ptr
                self.cuda.copy_rows(
                    base + dst * self.row_block,
                    pitch,
                    base + src * self.row_block,
                    pitch,
                    n * self.row_bytes,
                    self.text.num_kv_heads,
                    self.stream,
                )
        self.valid[dst], self.valid[src] = self.valid[src], 0

    def read_row(self, row: int, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Host copies of row `row`'s first `length` slots, per layer ([kv_heads, length, D])."""
        out = []
        for layer in range(self.text.num_layers):
            pair = (self._row(2 * layer, row), self._row(2 * layer + 1, row))
            out.append(tuple(self.cuda.to_host(a, self.stream)[:, :length].copy() for a in pair))
        return out

    def _write_row(self, row: int, kv: list[tuple[np.ndarray, np.ndarray]], length: int) -> None:
        t = self.text
        for layer, pair in enumerate(kv):
            for index, array in zip((2 * layer, 2 * layer + 1), pair, strict=True):
                host = np.zeros((t.num_kv_heads, self.capacity, t.head_dim), self.dtype)
                host[:, :length] = array[:, :length]
                self.cuda.to_device(self._row(index, row), host, self.stream)
        self.valid[row, :length] = 1

    def shrink(self) -> None:
        """Give the device blocks back to the pool once every row is empty, and move the rows
        into blocks of a smaller capacity once the longest fits in half of it (as the onnxruntime
        KVCache does): every step's attention reads every slot of the capacity, masked or not,
        so a batch that goes on after its long request left, or a chat whose long answer was
        rolled back, would otherwise decode at the long one's cost. A shrink that cannot have
        its smaller blocks (out of memory) leaves the cache as it was."""
        if not self.lengths.any():
            self.release()
            return
        used, old = self.length, self.capacity
        new = capacity(used + 1, self.kv_chunk, self.max_context)  # as growing to it gives
        if 2 * new > old:
            return
        blocks: list[Allocation] = []
        try:
            for _ in self._blocks:
                blocks.append(self.pool.take(self.region_bytes(new)))
            for block, previous in zip(blocks, self._blocks, strict=True):
                self._lay_out(block, new, previous, old, used)
        except BaseException as e:
            _give_back(self.pool, blocks)
            if isinstance(e, Exception):  # shrinking only saves: the cache stays as it was
                return
            raise
        _give_back(self.pool, self._blocks)  # the stream copies out of them before any later use
        self._blocks[:] = blocks  # in place: the finalizer holds this list
        self.valid = self.valid[:, :new].copy()
        self.capacity = new
        self.graphs.clear()  # they bound the old blocks

    # ---- storage ---------------------------------------------------------------------------

    def grow(self, needed: int) -> None:
        """Make room for `needed` slots in every row, growing by whole chunks, or fail past the
        context. One layer's keys (or values) at a time; should a block not be had (out of
        memory), the cache is left as it was, at its old capacity, and the error raised."""
        if needed > self.max_context:
            raise LlavaEdgeError(
                f"the conversation needs {needed} tokens, over the {self.max_context} the "
                "TensorRT engines were built for; shorten the prompt, lower max_new_tokens, start "
                "a new chat, or rebuild with a larger --max-context"
            )
        if needed <= self.capacity:
            return
        new, old, used = (
            capacity(needed, self.kv_chunk, self.max_context),
            self.capacity,
            self.length,
        )
        for index, previous in enumerate(self._blocks):
            block = None
            try:
                block = self.pool.take(self.region_bytes(new))
                self._lay_out(block, new, previous, old, used)
            except BaseException:
                if block is not None:
                    self.pool.give(block)
                self._undo_growth(index, new)
                raise
            self._blocks[index] = block
            if previous is not None:
                self.pool.give(previous)  # the stream copies out of it before any later use
        valid = np.zeros((self.batch, new), dtype=np.int64)
        valid[:, :used] = self.valid[:, :used]
        self.valid, self.capacity = valid, new
        self.graphs.clear()  # they bound the old blocks

    def _lay_out(
        self, block: Allocation, new: int, previous: Allocation | None, old: int, used: int
    ) -> None:
        """Zero `block` (rows of `new` slots) and copy into it the first `used` slots of each
        row of `previous` (rows of `old` slots), on the stream."""
        self.cuda.zero(block.ptr, block.nbytes, self.stream)
        if previous is not None and used:
            self.cuda.copy_rows(
                block.ptr,
                new * self.row_bytes,
                previous.ptr,
                old * self.row_bytes,
                used * self.row_bytes,
                self.batch * self.text.num_kv_heads,
                self.stream,
            )

    def _undo_growth(self, grown: int, new: int) -> None:
        """Put the first `grown` blocks, already at capacity `new`, back at the cache's capacity:
        laid out again at its row pitch in their own (larger) blocks, through the host (a path
        taken only when the device is out of memory). A cache that had no blocks gives them back."""
        self.graphs.clear()
        if not self.capacity:
            _give_back(self.pool, self._blocks)
            return
        t, old = self.text, self.capacity
        rows = self.batch * t.num_kv_heads
        for index in range(grown):
            ptr = self._blocks[index].ptr
            grown_rows = self.cuda.to_host(
                DeviceArray(ptr, (rows, new, t.head_dim), self.dtype), self.stream
            )
            self.cuda.to_device(
                DeviceArray(ptr, (rows, old, t.head_dim), self.dtype),
                np.ascontiguousarray(grown_rows[:, :old]),
                self.stream,
            )
        self.cuda.synchronize(self.stream)  # the host array must outlive the copy

    def _region(self, index: int, start: int = 0, stop: int | None = None) -> DeviceArray:
        """Layer region `index` (keys of layer i at 2i, values at 2i + 1), rows [start, stop)."""
        t, stop = self.text, self.batch if stop is None else stop
        ptr = self._blocks[index].ptr
        shape = (stop - start, t.num_kv_heads, self.capacity, t.head_dim)
        return DeviceArray(ptr + start * self.row_block, shape, self.dtype)

    def _row(self, index: int, row: int) -> DeviceArray:
        t = self.text
        ptr = self._region(index).ptr + row * self.row_block
        return DeviceArray(ptr, (t.num_kv_heads, self.capacity, t.head_dim), self.dtype)

    def _zero(self, row: int, start: int, stop: int) -> None:
        if stop > start:
            for region in range(2 * self.text.num_layers):
                self.cuda.zero_rows(
                    self._row(region, row).ptr + start * self.row_bytes,
                    self.capacity * self.row_bytes,
                    (stop - start) * self.row_bytes,
                    self.text.num_kv_heads,
                    self.stream,
                )

    def release(self) -> None:
        """Give the device blocks back to the pool now (the cache is empty afterwards)."""
        _give_back(self.pool, self._blocks)
        self.lengths[:] = 0
        self.capacity = 0
        self.valid = np.zeros((self.batch, 0), dtype=np.int64)
        self.graphs.clear()


def _give_back(pool: KVPool, blocks: list[Allocation | None]) -> None:
    for index, block in enumerate(blocks):
        blocks[index] = None
        if block is not None:
            pool.give(block)
