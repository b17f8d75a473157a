"""The fused decoder form on onnxruntime: GroupQueryAttention over KV buffers shared in place.

The graph (written by export, see the manifest's `graphs.decoder.fused`) takes the whole KV
buffer of each layer as `past` and writes the call's keys/values into it: past and present are
bound to the same memory through IOBinding, so a step copies nothing. The buffers are the
runtime's one KVCache (runtime/kv_cache.py): row r holds its tokens in slots [0, len_r) and a
token's position is its slot, so the graph needs no positions or mask, only each row's length
(`seqlens_k` = len_r - 1 after the call). A call runs on a whole cache or on a run of its rows
(`cache.rows(start, stop)`), as continuous batching decodes them.

GroupQueryAttention takes a batch of rows in one call when the call is everyone's first (a
right-padded prompt batch) or a decode step (one token a row, rows of any length); a call that
appends several tokens to rows that already hold some (a chat's next turn, a prompt after a
reused prefix) runs row by row, each through a batch-1 view of its slice of the buffers.

An int4 dir quantized with `--prefill int8` has a second graph of the same IO (manifest
`GraphSpec.prefill`): calls of more than one token run it, single-token steps the int4 one, on the
same cache.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from llava_edge.manifest import TextSpec
from llava_edge.runtime.kv_cache import KVCache, KVRows, as_rows


class FusedDecoder:
    """Runs the fused decoder graph for OnnxBackend."""

    def __init__(
        self,
        session: ort.InferenceSession,
        text: TextSpec,
        layer_names: list,
        prefill: ort.InferenceSession | None = None,
    ):
        self.session = session
        # Calls of more than one token (prompts, a chat's next turn) run this one where the model
        # dir has it (int4 steps, int8 prompts: manifest GraphSpec.prefill); its IO is the same.
        self.prefill = prefill
        self.text = text
        self.dtype = np.dtype(text.dtype)  # of the embeddings; the KV cache may be int8
        self.names = list(layer_names)  # (past key, past value, present key, present value)

    def decode(
        self,
        embeds: np.ndarray,
        token_mask: np.ndarray,
        positions: np.ndarray,
        cache: KVCache | KVRows,
    ) -> np.ndarray:
        """One call over `embeds` [B, S, hidden]; returns each row's last-token logits [B, V].

        `token_mask` marks each row's real tokens (a left-padded batch is packed to the left
        here); positions are the slots the tokens land in, so `positions` is not read.
        """
        rows = as_rows(cache)
        new = token_mask.sum(axis=1).astype(np.int64)
        embeds = _pack_left(embeds, token_mask, new)
        after = rows.lengths + new
        rows.reserve(int(after.max()) - rows.length)
        seq = embeds.shape[1]
        logits = np.zeros((rows.batch, self.text.vocab_size), dtype=np.float32)
        if seq == 1 or not rows.lengths.any():
            self._run(embeds, rows.cache, slice(rows.start, rows.stop), after, logits)
        else:  # GroupQueryAttention continues several tokens for one row at a time
            for i in range(rows.batch):
                count = int(new[i])
                if count:
                    row = rows.start + i
                    self._run(
                        embeds[i : i + 1, :count],
                        rows.cache,
                        slice(row, row + 1),
                        after[i : i + 1],
                        logits[i : i + 1],
                    )
        rows.lengths[:] = after
        return logits

    def _run(
        self,
        embeds: np.ndarray,
        cache: KVCache,
        rows: slice,
        after: np.ndarray,
        logits: np.ndarray,
    ) -> None:
        """One graph run over cache rows `rows`, which hold `after` tokens each once it is done."""
        session = self.prefill if self.prefill and embeds.shape[1] > 1 else self.session
        io = session.io_binding()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=self.dtype))
        io.bind_cpu_input("seqlens_k", (after - 1).astype(np.int32))
        io.bind_cpu_input("total_sequence_length", np.asarray(after.max(), dtype=np.int32))
        for layer, (past_k, past_v, present_k, present_v) in enumerate(self.names):
            pairs = ((past_k, present_k, cache.keys), (past_v, present_v, cache.values))
            for past, present, buffers in pairs:
                view = buffers[layer][rows]  # rows of a C-ordered buffer: contiguous
                shape = list(view.shape)
                # The cache's own dtype: the model's, or int8 (`quantize --kv-cache int8`).
                io.bind_input(past, "cpu", 0, view.dtype, shape, view.ctypes.data)
                io.bind_output(present, "cpu", 0, view.dtype, shape, view.ctypes.data)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        session.run_with_iobinding(io)


def _pack_left(embeds: np.ndarray, token_mask: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Each row's real tokens moved to the front (right padding), cut to the longest row."""
    width = int(new.max(initial=0))
    if token_mask[:, :width].all():
        return embeds[:, :width]
    packed = np.zeros((embeds.shape[0], width, embeds.shape[2]), dtype=embeds.dtype)
    for row in range(embeds.shape[0]):
        packed[row, : new[row]] = embeds[row, token_mask[row] == 1]
    return packed
