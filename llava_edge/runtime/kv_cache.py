"""The decoder's KV cache, preallocated on the host for the onnxruntime backend.

The decoder graph returns only the keys/values of the tokens it was given; this cache writes them
into buffers it owns and feeds the whole buffers back as `past`, slots past the end masked out.
No step copies the cache: buffers grow in chunks (one copy per chunk of tokens, amortised to
nothing) up to the model's max context.
"""

from __future__ import annotations

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import KVSpec, TextSpec

CHUNK = 64  # slots added at a time; attention spans at most this many unused slots
PRESENT_HOLDS = "new"  # the layout both KV caches implement: `present` holds this call's tokens


def check_kv_layout(kv: KVSpec) -> None:
    """Refuse a decoder whose `present` outputs hold something else than the runtime appends."""
    if kv.present_holds != PRESENT_HOLDS:
        raise LlavaEdgeError(
            f"the model's decoder returns present keys/values holding {kv.present_holds!r}, but "
            f"this llava-edge runs decoders whose present outputs hold only the new tokens "
            f"({PRESENT_HOLDS!r}); re-export the model with this llava-edge"
        )


class KVCache:
    def __init__(self, text: TextSpec, batch: int, chunk: int = CHUNK):
        self.text = text
        self.batch = batch
        self.chunk = chunk
        self.dtype = np.dtype(text.dtype)
        self.length = 0  # slots in use (padding slots of left-padded rows included)
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.valid = np.zeros((batch, 0), dtype=np.int64)  # 1 where a slot holds a real token
        self._empty = np.zeros((batch, text.num_kv_heads, 0, text.head_dim), dtype=self.dtype)

    @property
    def max_context(self) -> int:
        return self.text.max_context

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more slots, or fail clearly past the model's context."""
        needed = self.length + extra
        if needed > self.max_context:
            raise LlavaEdgeError(
                f"the conversation needs {needed} tokens, over the model's context of "
                f"{self.max_context}; shorten the prompt, lower max_new_tokens or start a new chat"
            )
        if needed <= self.capacity:
            return
        # The first reservation (a prompt) adds a chunk of headroom, so the answer's first
        # tokens do not grow the cache at once: growing copies it, the one copy it ever makes.
        headroom = self.chunk if self.length == 0 else 0
        capacity = min(self.max_context, -(-(needed + headroom) // self.chunk) * self.chunk)
        t = self.text
        shape = (self.batch, t.num_kv_heads, capacity, t.head_dim)
        keys = [self._grown(old, shape) for old in self.keys] or [
            np.zeros(shape, self.dtype) for _ in range(t.num_layers)
        ]
        values = [self._grown(old, shape) for old in self.values] or [
            np.zeros(shape, self.dtype) for _ in range(t.num_layers)
        ]
        valid = np.zeros((self.batch, capacity), dtype=np.int64)
        valid[:, : self.length] = self.valid[:, : self.length]
        self.keys, self.values, self.valid, self.capacity = keys, values, valid, capacity

    def _grown(self, old: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """`old` in a larger buffer. Unused slots must be zeros, not garbage: masked attention
        weights are exactly 0, and 0 x NaN would still be NaN."""
        new = np.empty(shape, self.dtype)
        new[:, :, : self.length] = old[:, :, : self.length]
        new[:, :, self.length :] = 0
        return new

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The past fed to the decoder: every allocated slot (unused ones are masked)."""
        if self.length == 0:
            return self._empty, self._empty
        return self.keys[layer], self.values[layer]

    def attention_mask(self, new_mask: np.ndarray) -> np.ndarray:
        """[batch, past slots + new tokens] mask matching what `past` feeds."""
        past = self.valid if self.length else self.valid[:, :0]
        return np.concatenate([past, new_mask.astype(np.int64)], axis=1)

    def append(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Write this step's keys/values ([batch, kv_heads, seq, head_dim]) after the last slot."""
        seq = key.shape[2]
        self.keys[layer][:, :, self.length : self.length + seq] = key
        self.values[layer][:, :, self.length : self.length + seq] = value

    def advance(self, new_mask: np.ndarray) -> None:
        """Mark the slots just appended as used."""
        seq = new_mask.shape[1]
        self.valid[:, self.length : self.length + seq] = new_mask
        self.length += seq

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on, as if they had never been appended.

        A chat turn that does not finish is rolled back with this. Forgotten slots are zeroed
        again: unused slots must hold zeros (see `_grown`).
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[:, :, length : self.length] = 0
        self.valid[:, length : self.length] = 0
        self.length = length
