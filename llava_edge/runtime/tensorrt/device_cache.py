"""The decoder's KV cache in device memory, fed to TensorRT without ever visiting the host.

Scheme: each layer's keys and values get one region reserved for the max context at creation.
The engine's `past` input must be one contiguous [B, kv, past, D] tensor, so the cache keeps its
used slots laid out as [B, kv, capacity, D] at the start of each region and binds exactly that as
past; slots not yet written are zero and masked out. Capacity grows in chunks of `kv_chunk` slots
(256 unless `build` was told otherwise) and each growth re-lays the region for the new stride
with device-to-device copies: a handful of copies per chunk of tokens. This beats binding the
whole max-context region every step because decode is bandwidth-bound: attention would then read
the full max-context cache for every token (for a 7B model at 4096 tokens, 2 GiB a token, more
than its int4 weights), while with chunks it reads at most kv_chunk - 1 unused slots per
sequence.

A call writes only the new positions: the engine's `present` outputs land in staging buffers and
`index_copy_` puts them at the cache's current length, on the device, on the backend's stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import TextSpec
from llava_edge.runtime.tensorrt.buffers import Arena, kv_plan
from llava_edge.runtime.tensorrt.profiles import capacity


class DeviceKVCache:
    def __init__(
        self,
        text: TextSpec,
        batch: int,
        max_context: int,
        kv_chunk: int,
        device: Any,
        stream: Any = None,
    ):
        """stream: the CUDA stream the backend runs on, where the cache's own device work
        (zeroing slots it forgets) must go too; None on a CPU."""
        self.text = text
        self.stream = stream
        self.batch = batch
        self.max_context = max_context
        self.kv_chunk = kv_chunk
        self.arena = Arena(kv_plan(text, batch, max_context), device)
        self.length = 0  # slots in use (padding slots of left-padded rows included)
        self.capacity = 0
        self.valid = np.zeros((batch, 0), dtype=np.int64)  # 1 where a slot holds a real token
        # CUDA graphs captured against this cache's buffers (the backend manages them).
        self.graphs: dict[Any, Any] = {}

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
        for name in self.arena.flat:
            self._relayout(name, new)
        valid = np.zeros((self.batch, new), dtype=np.int64)
        valid[:, : self.length] = self.valid[:, : self.length]
        self.valid, self.capacity = valid, new
        self.graphs.clear()  # they bound the old shapes

    def _relayout(self, name: str, new: int) -> None:
        """Move the used slots from stride `capacity` to stride `new`, then zero the rest.

        Every (batch, head) block moves to a higher offset and may overlap where it was, so the
        used slots go through a temporary copy (one layer's keys or values at a time).
        """
        if self.length:
            used = self.view(name, self.capacity)[:, :, : self.length].clone()
            self.view(name, new)[:, :, : self.length].copy_(used)
        self.view(name, new)[:, :, self.length :].zero_()

    def view(self, name: str, slots: int | None = None) -> Any:
        """A region as [batch, kv_heads, slots, head_dim] (default: the current capacity)."""
        t = self.text
        slots = self.capacity if slots is None else slots
        return self.arena.view(name, (self.batch, t.num_kv_heads, slots, t.head_dim))

    def past(self, layer: int) -> tuple[Any, Any]:
        """What the engine reads as this layer's past: every slot of the current capacity."""
        return self.view(f"key.{layer}"), self.view(f"value.{layer}")

    def attention_mask(self, new_mask: np.ndarray) -> np.ndarray:
        """[batch, capacity + new tokens]: the cache's valid slots, then the new tokens' mask."""
        return np.concatenate([self.valid, new_mask.astype(np.int64)], axis=1)

    def append(self, layer: int, key: Any, value: Any, slots: Any) -> None:
        """Write one call's keys/values ([B, kv, S, D], on the device) at slots `slots` ([S])."""
        past_k, past_v = self.past(layer)
        past_k.index_copy_(2, slots, key)
        past_v.index_copy_(2, slots, value)

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
            import torch

            with torch.cuda.stream(self.stream):  # None (a CPU): no stream to enter
                for name in self.arena.flat:
                    self.view(name)[:, :, length : self.length].zero_()
        self.valid[:, length : self.length] = 0
        self.length = length
