"""The fused decoder form on onnxruntime: GroupQueryAttention over KV buffers shared in place.

The graph (written by export, see the manifest's `graphs.decoder.fused`) takes the whole KV
buffer of each layer as `past` and writes the call's keys/values into it: past and present are
bound to the same memory through IOBinding, so a step copies nothing. Rows are right-padded: row r
holds its tokens in slots [0, len_r) and a token's position is its slot, so the graph needs no
positions or mask, only each row's length (`seqlens_k` = len_r - 1 after the call).

GroupQueryAttention takes a batch of rows in one call when the call is everyone's first (a
right-padded prompt batch) or a decode step (one token a row, rows of any length); a call that
appends several tokens to rows that already hold some (a chat's next turn) runs row by row, each
through a batch-1 view of its slice of the buffers.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import TextSpec

CHUNK = 64  # slots added at a time: GroupQueryAttention's scratch grows with the buffer


class FusedKVCache:
    """Per-layer key and value buffers [batch, kv_heads, capacity, head_dim] and each row's length.

    Buffers grow in chunks of `chunk` slots (one copy per chunk, the only copy ever made), so
    attention's scratch, which spans the whole buffer, stays near the real context.
    """

    def __init__(self, text: TextSpec, batch: int, chunk: int = CHUNK):
        self.text = text
        self.batch = batch
        self.chunk = chunk
        self.dtype = np.dtype(text.dtype)
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.capacity = 0
        self.buffers: list[np.ndarray] = []  # layer i: keys at 2i, values at 2i + 1

    @property
    def length(self) -> int:
        """Slots the longest row uses (what a chat continues from, batch 1)."""
        return int(self.lengths.max(initial=0))

    @property
    def max_context(self) -> int:
        return self.text.max_context

    def reserve(self, needed: int) -> None:
        """Room for `needed` slots in every row, or a clear error past the model's context."""
        if needed > self.max_context:
            raise LlavaEdgeError(
                f"the conversation needs {needed} tokens, over the model's context of "
                f"{self.max_context}; shorten the prompt, lower max_new_tokens or start a new chat"
            )
        if needed <= self.capacity:
            return
        # The first reservation (a prompt) adds a chunk of headroom for the answer's tokens.
        headroom = self.chunk if self.capacity == 0 else 0
        capacity = min(self.max_context, -(-(needed + headroom) // self.chunk) * self.chunk)
        t = self.text
        shape = (self.batch, t.num_kv_heads, capacity, t.head_dim)
        used = self.length
        grown = []
        for old in self.buffers or [None] * (2 * t.num_layers):
            new = np.zeros(shape, self.dtype)
            if old is not None:
                new[:, :, :used] = old[:, :, :used]
            grown.append(new)
        self.buffers, self.capacity = grown, capacity

    def free_row(self, row: int) -> None:
        """Empty one row for a new request (continuous batching); the others keep theirs."""
        self.lengths[row] = 0

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (a chat turn rolled back). Slots past a row's
        length are never read, so nothing needs clearing."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        self.lengths = np.minimum(self.lengths, length)


class FusedDecoder:
    """Runs the fused decoder graph for OnnxBackend."""

    def __init__(self, session: ort.InferenceSession, text: TextSpec, layer_names: list):
        self.session = session
        self.text = text
        self.dtype = np.dtype(text.dtype)
        self.names = list(layer_names)  # (past key, past value, present key, present value)

    def new_cache(self, batch: int) -> FusedKVCache:
        return FusedKVCache(self.text, batch)

    def decode(
        self,
        embeds: np.ndarray,
        token_mask: np.ndarray,
        positions: np.ndarray,
        cache: FusedKVCache,
    ) -> np.ndarray:
        """One call over `embeds` [B, S, hidden]; returns each row's last-token logits [B, V].

        `token_mask` marks each row's real tokens (a left-padded batch is packed to the left
        here); positions are the slots the tokens land in, so `positions` is not read.
        """
        new = token_mask.sum(axis=1).astype(np.int64)
        embeds = _pack_left(embeds, token_mask, new)
        after = cache.lengths + new
        cache.reserve(int(after.max()))
        seq = embeds.shape[1]
        logits = np.zeros((cache.batch, self.text.vocab_size), dtype=np.float32)
        if seq == 1 or not cache.lengths.any():
            self._run(embeds, cache, slice(None), after, int(after.max()), logits)
        else:  # GroupQueryAttention continues several tokens for one row at a time
            for row in range(cache.batch):
                rows = slice(row, row + 1)
                count = int(new[row])
                if count == 0:
                    continue
                self._run(
                    embeds[rows, :count], cache, rows, after[rows], int(after[row]), logits[rows]
                )
        cache.lengths = after
        return logits

    def prefill_row(self, embeds: np.ndarray, cache: FusedKVCache, row: int) -> np.ndarray:
        """Append `embeds` [1, S, hidden] to one row alone (a new request joining a running
        batch: it is prefilled by itself, then decodes with the others); its logits [1, V]."""
        after = cache.lengths.copy()
        after[row] += embeds.shape[1]
        cache.reserve(int(after.max()))
        logits = np.zeros((1, self.text.vocab_size), dtype=np.float32)
        rows = slice(row, row + 1)
        self._run(embeds, cache, rows, after[rows], int(after[row]), logits)
        cache.lengths = after
        return logits

    def _run(
        self,
        embeds: np.ndarray,
        cache: FusedKVCache,
        rows: slice,
        after: np.ndarray,
        total: int,
        logits: np.ndarray,
    ) -> None:
        io = self.session.io_binding()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=self.dtype))
        io.bind_cpu_input("seqlens_k", (after - 1).astype(np.int32))
        io.bind_cpu_input("total_sequence_length", np.asarray(total, dtype=np.int32))
        for layer, (past_k, past_v, present_k, present_v) in enumerate(self.names):
            for j, (past, present) in enumerate(((past_k, present_k), (past_v, present_v))):
                view = cache.buffers[2 * layer + j][rows]  # rows of a C-ordered buffer: contiguous
                shape = list(view.shape)
                io.bind_input(past, "cpu", 0, self.dtype, shape, view.ctypes.data)
                io.bind_output(present, "cpu", 0, self.dtype, shape, view.ctypes.data)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io)


def _pack_left(embeds: np.ndarray, token_mask: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Each row's real tokens moved to the front (right padding), cut to the longest row."""
    width = int(new.max(initial=0))
    if token_mask[:, :width].all():
        return embeds[:, :width]
    packed = np.zeros((embeds.shape[0], width, embeds.shape[2]), dtype=embeds.dtype)
    for row in range(embeds.shape[0]):
        packed[row, : new[row]] = embeds[row, token_mask[row] == 1]
    return packed
