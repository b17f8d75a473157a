"""The decoder's KV cache, preallocated on the host for the onnxruntime backend.

The decoder graph returns only the keys/values of the tokens it was given; this cache writes them
into buffers it owns and feeds the whole buffers back as `past`, slots past each row's end masked
out. No step copies the cache: buffers grow in chunks (one copy per chunk of tokens, amortised to
nothing) up to the model's max context.

Every row has its own length. Row r holds its tokens in slots [0, lengths[r]), with no padding
and no holes; a call writes each row's new keys/values at that row's own length, the attention
mask is `slot < lengths[r]`, and a row's next position is its length. So rows of one batch may be
at different points of different conversations (continuous batching, runtime/batching.py): a
new request is prefilled alone into a free row, then decodes with the others, and a finished
row is emptied without touching the rest. `rows(start, stop)` hands the decoder a contiguous
run of rows (batch is the outermost axis, so a run is a view, never a copy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import KVSpec, TextSpec

CHUNK = 64  # slots added at a time (a prompt reserves one more as headroom for its answer)
PRESENT_HOLDS = "new"  # the layout both KV caches implement: `present` holds this call's tokens


def check_kv_layout(kv: KVSpec) -> None:
    """Refuse a decoder whose `present` outputs hold something else than the runtime appends."""
    if kv.present_holds != PRESENT_HOLDS:
        raise LlavaEdgeError(
            f"the model's decoder returns present keys/values holding {kv.present_holds!r}, but "
            f"this llava-edge runs decoders whose present outputs hold only the new tokens "
            f"({PRESENT_HOLDS!r}); re-export the model with this llava-edge"
        )


class RowRun:
    """Rows [start, stop) of a cache whose rows keep their own lengths (this KVCache, and the
    TensorRT backend's device cache): what a decoder call reads and writes for a batch made of
    those rows."""

    def __init__(self, cache: Any, start: int, stop: int):
        self.cache = cache
        self.start, self.stop = start, stop
        self.batch = stop - start

    @property
    def lengths(self) -> np.ndarray:
        return self.cache.lengths[self.start : self.stop]

    @property
    def length(self) -> int:
        return int(self.lengths.max(initial=0))

    @property
    def max_context(self) -> int:
        return self.cache.max_context


class KVRows(RowRun):
    """Rows of a KVCache (see RowRun)."""

    cache: KVCache

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more slots in every row, or fail clearly past the context."""
        length = self.length
        # A prompt (a row's first call) reserves a chunk of headroom, so the answer's first
        # tokens do not grow the cache at once: growing copies it, the one copy it ever makes.
        self.cache.grow(length + extra, self.cache.chunk if length == 0 else 0)

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The past fed to the decoder: every allocated slot of these rows (unused ones masked),
        or none while the rows are empty (a fresh prompt attends to nothing before it)."""
        c = self.cache
        if self.length == 0:
            t = c.text
            empty = np.zeros((self.batch, t.num_kv_heads, 0, t.head_dim), dtype=c.dtype)
            return empty, empty
        return c.keys[layer][self.start : self.stop], c.values[layer][self.start : self.stop]

    def attention_mask(self, new_mask: np.ndarray) -> np.ndarray:
        """[batch, past slots + new tokens]: 1 for slot < the row's length, then the new tokens."""
        width = self.cache.capacity if self.length else 0
        past = (np.arange(width)[None, :] < self.lengths[:, None]).astype(np.int64)
        return np.concatenate([past, new_mask.astype(np.int64)], axis=1)

    def append(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Write this call's keys/values ([batch, kv_heads, seq, head_dim]), each row's at its own
        length (one slice when the rows are level, as a single request's always are)."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        seq, lengths = key.shape[2], self.lengths
        first = int(lengths[0])
        if (lengths == first).all():
            rows = slice(self.start, self.stop)
            keys[rows, :, first : first + seq] = key
            values[rows, :, first : first + seq] = value
            return
        for i, at in enumerate(lengths.tolist()):
            keys[self.start + i, :, at : at + seq] = key[i]
            values[self.start + i, :, at : at + seq] = value[i]

    def advance(self, new_mask: np.ndarray) -> None:
        """Count the slots just appended. Rows hold no padding: every new token is real."""
        if not new_mask.all():
            raise ValueError("the onnxruntime KV cache takes no padding; prefill rows apart")
        self.lengths[:] += new_mask.shape[1]


class RowCache:
    """What both KV caches (this one, and the TensorRT backend's device cache) share: a length
    per row, runs of rows handed to the decoder, and the decoder's interface over all rows.
    A subclass sets `batch`, `lengths` and `view` (its RowRun class)."""

    batch: int
    lengths: np.ndarray
    view: type[RowRun]

    @property
    def length(self) -> int:
        """Slots in use by the longest row (of a one-row cache: its conversation so far)."""
        return int(self.lengths.max(initial=0))

    def rows(self, start: int, stop: int) -> Any:
        """Rows [start, stop) as a cache the decoder can run on (a view: writes land here)."""
        if not 0 <= start < stop <= self.batch:
            raise ValueError(f"rows [{start}, {stop}) of a cache of {self.batch}")
        return self.view(self, start, stop)

    def truncate(self, length: int, row: int | None = None) -> None:
        """Forget every slot from `length` on, in one row or in all, as if they had never been
        appended (a chat turn that does not finish is rolled back with this; a finished request
        leaves its row with length 0)."""
        rows = range(self.batch) if row is None else [row]
        for r in rows:
            if not 0 <= length <= self.lengths[r]:
                raise ValueError(f"cannot truncate row {r} of {self.lengths[r]} slots to {length}")
        for r in rows:
            self._forget(r, length)
            self.lengths[r] = length

    def move_row(self, src: int, dst: int) -> None:
        """Put row `src`'s tokens in row `dst` (whose own are dropped) and empty row `src`."""
        n, old = int(self.lengths[src]), int(self.lengths[dst])
        self._copy_row(src, dst, n)
        self._zero(dst, n, old)
        self._zero(src, 0, n)
        self.lengths[dst], self.lengths[src] = n, 0

    def write_row(self, row: int, kv: list[tuple[np.ndarray, np.ndarray]], length: int) -> None:
        """Fill the empty row `row` with the first `length` slots of `kv` (from read_row)."""
        if self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} slots; empty it first")
        self.rows(row, row + 1).reserve(length)
        self._write_row(row, kv, length)
        self.lengths[row] = length

    # What each cache does its own way, on its own memory:

    def _forget(self, row: int, length: int) -> None:
        """Clear row `row`'s slots from `length` on (before its length drops to `length`)."""
        raise NotImplementedError

    def _copy_row(self, src: int, dst: int, n: int) -> None:
        """Copy row `src`'s first `n` slots over row `dst`'s."""
        raise NotImplementedError

    def _zero(self, row: int, start: int, stop: int) -> None:
        """Zero row `row`'s slots [start, stop)."""
        raise NotImplementedError

    def _write_row(self, row: int, kv: list[tuple[np.ndarray, np.ndarray]], length: int) -> None:
        """Write the first `length` slots of `kv` (per layer, [kv_heads, slots, head_dim]) into
        the empty row `row`."""
        raise NotImplementedError

    # ---- the decoder's interface, over all rows ------------------------------------------------
    # Through a view made per call: one kept on the cache would be a reference cycle, and a
    # dropped cache must give its memory back at once, not when the cycle collector runs.

    def reserve(self, extra: int) -> None:
        self.rows(0, self.batch).reserve(extra)

    def past(self, layer: int) -> Any:
        return self.rows(0, self.batch).past(layer)

    def attention_mask(self, new_mask: np.ndarray) -> np.ndarray:
        return self.rows(0, self.batch).attention_mask(new_mask)

    def append(self, layer: int, key: Any, value: Any) -> None:
        self.rows(0, self.batch).append(layer, key, value)

    def advance(self, new_mask: np.ndarray) -> None:
        self.rows(0, self.batch).advance(new_mask)


def as_rows(cache: RowCache | RowRun) -> Any:
    """The run of rows a decoder call works on: a run as given, a whole cache as the run of all
    its rows (one view a call, not one a layer)."""
    return cache if isinstance(cache, RowRun) else cache.rows(0, cache.batch)


class KVCache(RowCache):
    """Keys/values of `batch` rows, each layer's as one [batch, kv_heads, capacity, head_dim]
    buffer. The cache itself reads and writes all its rows; `rows()` gives a run of them."""

    view = KVRows

    def __init__(self, text: TextSpec, batch: int, chunk: int = CHUNK):
        self.text = text
        self.batch = batch
        self.chunk = chunk
        self.dtype = np.dtype(text.dtype)
        self.lengths = np.zeros(batch, dtype=np.int64)  # row r holds slots [0, lengths[r])
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    @property
    def max_context(self) -> int:
        return self.text.max_context

    # ---- rows as a scheduler moves them ----------------------------------------------------------

    def _forget(self, row: int, length: int) -> None:
        """Forgotten slots are zeroed again: unused slots must hold zeros (see `_grown`)."""
        self._zero(row, length, int(self.lengths[row]))

    def _copy_row(self, src: int, dst: int, n: int) -> None:
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[dst, :, :n] = buffer[src, :, :n]

    def _zero(self, row: int, start: int, stop: int) -> None:
        if stop > start:
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[row, :, start:stop] = 0

    def read_row(self, row: int, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Copies of row `row`'s first `length` slots, per layer ([kv_heads, length, head_dim])."""
        return [
            (k[row, :, :length].copy(), v[row, :, :length].copy())
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def _write_row(self, row: int, kv: list[tuple[np.ndarray, np.ndarray]], length: int) -> None:
        for (k, v), keys, values in zip(kv, self.keys, self.values, strict=True):
            keys[row, :, :length] = k[:, :length]
            values[row, :, :length] = v[:, :length]

    # ---- storage ---------------------------------------------------------------------------------

    def grow(self, needed: int, headroom: int) -> None:
        """Make the buffers hold at least `needed` slots per row (plus `headroom`), in chunks."""
        if needed > self.max_context:
            raise LlavaEdgeError(
                f"the conversation needs {needed} tokens, over the model's context of "
                f"{self.max_context}; shorten the prompt, lower max_new_tokens or start a new chat"
            )
        if needed <= self.capacity:
            return
        capacity = min(self.max_context, -(-(needed + headroom) // self.chunk) * self.chunk)
        t = self.text
        shape = (self.batch, t.num_kv_heads, capacity, t.head_dim)
        used = int(self.lengths.max(initial=0))
        keys = [self._grown(old, shape, used) for old in self.keys] or [
            np.zeros(shape, self.dtype) for _ in range(t.num_layers)
        ]
        values = [self._grown(old, shape, used) for old in self.values] or [
            np.zeros(shape, self.dtype) for _ in range(t.num_layers)
        ]
        # all at once: a failure above (out of memory, Ctrl-C) leaves the old buffers whole
        self.keys, self.values, self.capacity = keys, values, capacity

    def shrink(self) -> None:
        """Give memory back once the longest row fits in half the buffers (a long conversation
        has left): every step reads every allocated slot of every row, masked or not."""
        used = int(self.lengths.max(initial=0))
        capacity = -(-(used + self.chunk) // self.chunk) * self.chunk if used else 0
        if 2 * capacity > self.capacity:
            return
        t = self.text
        shape = (self.batch, t.num_kv_heads, capacity, t.head_dim)
        keys = [self._grown(old, shape, used) for old in self.keys] if capacity else []
        values = [self._grown(old, shape, used) for old in self.values] if capacity else []
        self.keys, self.values, self.capacity = keys, values, capacity

    def _grown(self, old: np.ndarray, shape: tuple[int, ...], used: int) -> np.ndarray:
        """`old`'s first `used` slots in a buffer of another size. Unused slots must be zeros,
        not garbage: masked attention weights are exactly 0, and 0 x NaN would still be NaN."""
        new = np.empty(shape, self.dtype)
        new[:, :, :used] = old[:, :, :used]
        new[:, :, used:] = 0
        return new
