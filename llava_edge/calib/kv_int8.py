"""An int8 KV cache for the fused decoder (`quantize --kv-cache int8`).

At a depth of a few hundred tokens the KV cache is a large part of what a decode step reads: on
`small` at 512 tokens, 67 MB of fp32 keys and values beside 128 MB of int4 weights. Decoding is
bound by those bytes, so storing the cache in int8 makes each step faster and the cache four times
smaller. onnxruntime's GroupQueryAttention does it on the CPU: given an int8 past/present and a
scale per channel (`k_quant_type`/`v_quant_type` PER_CHANNEL, `kv_cache_bit_width` 8), it writes
round(x / scale) clipped to int8 and attends over the dequantized values; the rest of the graph
stays as it is.

The scales come from calibration: the keys and values the quantized fused decoder itself (and its
int8 prefill companion, which writes the prompts' slots) stores on the calibration samples, fed
what the fp32 model feeds the decoder there. Not the fp32 decoder's own: quantized weights move
keys and values past its maxima (on `tiny` in int4, some channels by several per cent), so its
scales clipped even on the samples they came from. A value's scale is its channel's largest magnitude over 127. Keys are
stored after the rotary embedding, which turns each pair of channels (i, i + head_dim / 2) by an
angle that depends on the position: a key's two channels of a pair can take any split of the
pair's length at a position calibration never saw. So both channels of a pair get the pair's
largest length, which bounds them at every position.

The samples alone hold a few dozen distinct tokens (an image folder asks each picture "Describe
the image."), and a prompt in other words, with a picture or without, writes keys and values past
scales taken from them alone (on `tiny`, up to 1.8 times a channel's range; 0.4% of an image
prompt's cache and 0.7% of a text-only one's clipped). So the vocabulary is swept too: text-only
prompts that hold every token once (vocabulary_prompts). A first layer's keys and values depend
on the token alone, so its scales then hold any text; the later layers see the tokens in some
context, and clip far less (on `tiny`, under 0.05% of either kind of prompt).

Only the fused form (onnxruntime on the CPU) changes: the standard graphs, which TensorRT builds
from, keep the model's dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from llava_edge.calib.data import Capture
from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import GraphSpec, Manifest, TensorSpec, TextSpec
from llava_edge.runtime.kv_cache import KVCache

KV_CACHE_CHOICES = ("int8",)
INT8_MAX = 127
# GroupQueryAttention's inputs: k_scale and v_scale come 13th and 14th.
K_SCALE_INPUT, V_SCALE_INPUT = 12, 13
# The vocabulary sweep: at most this many tokens (a whole Llama or Mistral vocabulary; of a larger
# one the first, most frequent ones), in prompts of SWEEP_PROMPT tokens after BOS.
VOCAB_SWEEP_TOKENS = 32768
SWEEP_PROMPT = 256


class KVRanges:
    """Each layer's largest key (per rotary pair) and value magnitudes per channel, observed over
    the caches the fused decoder wrote ([kv_heads, head_dim] each)."""

    def __init__(self, text: TextSpec):
        self.text = text
        shape = (text.num_layers, text.num_kv_heads, text.head_dim)
        self.keys = np.zeros(shape, np.float32)
        self.values = np.zeros(shape, np.float32)
        self.calls = 0

    def observe_cache(self, cache: KVCache) -> None:
        """Take the keys/values a cache holds (each row's slots up to its length)."""
        for row, length in enumerate(cache.lengths.tolist()):
            for i in range(self.text.num_layers):
                self._take(
                    i,
                    cache.keys[i][row : row + 1, :, :length],
                    cache.values[i][row : row + 1, :, :length],
                )
        self.calls += 1

    def _take(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Layer `layer`'s keys and values, [batch, kv_heads, tokens, head_dim]."""
        if not keys.shape[2]:
            return
        half = self.text.head_dim // 2
        keys = np.abs(keys.astype(np.float32))
        values = np.abs(values.astype(np.float32))
        pair = np.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2).max(axis=(0, 2))
        self.keys[layer] = np.maximum(self.keys[layer], np.concatenate([pair, pair], axis=-1))
        self.values[layer] = np.maximum(self.values[layer], values.max(axis=(0, 2)))

    def scales(self) -> tuple[np.ndarray, np.ndarray]:
        """(key scales, value scales), [layers, kv_heads, 1, head_dim]: magnitude / 127. A channel
        that was always zero gets scale 1 (any scale stores its zeros exactly)."""
        if not self.calls:
            raise LlavaEdgeError("no decoder calls to calibrate the int8 KV cache on")

        def scale(magnitude: np.ndarray) -> np.ndarray:
            out = np.where(magnitude > 0, magnitude / INT8_MAX, 1.0).astype(np.float32)
            return out[:, :, None, :]

        return scale(self.keys), scale(self.values)


def fused_ranges(manifest: Manifest, out: Path, captures: Iterable[Capture]) -> KVRanges:
    """The ranges of what the fused decoder at `out` (as quantized, its cache still in the
    model's dtype) writes to its cache when fed the fp32 decoder's calls (each sample's prompt,
    then its decode steps) and the vocabulary's prompts, as the runtime runs them (FusedDecoder,
    the prefill companion too)."""
    from tqdm import tqdm

    from llava_edge.runtime.fused_backend import FusedDecoder
    from llava_edge.runtime.session_cache import plain_session

    # Each sample's calls, held as their embeddings only (small beside their past keys/values),
    # so the fp32 model is let go before the quantized decoder loads.
    samples: list[list[np.ndarray]] = []
    for capture in captures:
        embeds = capture.feeds["inputs_embeds"]
        if capture.feeds["attention_mask"].shape[1] == embeds.shape[1] or not samples:
            samples.append([])  # no past: a sample's prompt
        samples[-1].append(embeds)
    fused = manifest.graphs["decoder"].fused

    names = [manifest.kv_names(i) for i in range(manifest.text.num_layers)]
    prefill = plain_session(out / fused.prefill.file, None) if fused.prefill else None
    decoder = FusedDecoder(
        plain_session(out / fused.file, None), manifest.text, names, prefill=prefill
    )
    ranges = KVRanges(manifest.text)
    table = np.load(out / manifest.embeddings, mmap_mode="r")
    prompts = vocabulary_prompts(manifest, len(table))
    # A prefill of up to VOCAB_SWEEP_TOKENS tokens: minutes on a large model, so it shows progress
    bar = tqdm(prompts, desc="calibrate the KV cache: vocabulary", unit="prompt", leave=False)
    sweep = ([np.asarray(table[ids], manifest.text.dtype)[None]] for ids in bar)
    for calls in itertools.chain(samples, sweep):  # one sweep prompt's embeddings at a time
        cache = KVCache(manifest.text, calls[0].shape[0])
        for embeds in calls:
            decoder.decode(embeds, np.ones(embeds.shape[:2], np.int64), None, cache)
        ranges.observe_cache(cache)
    return ranges


def vocabulary_prompts(manifest: Manifest, rows: int) -> list[np.ndarray]:
    """The token ids of text-only prompts that together hold each of the embedding table's `rows`
    once (any token the model writes is fed back to it; the image token's row aside, which the
    decoder never sees), in a seeded order, BOS first where prompts start with it. Of a larger
    table the first VOCAB_SWEEP_TOKENS rows: BPE and SentencePiece number their tokens by merge
    order or score, the most frequent first."""
    ids = np.arange(min(rows, VOCAB_SWEEP_TOKENS))
    ids = np.random.default_rng(0).permutation(ids[ids != manifest.tokens.image_token_id])
    tokens = manifest.tokens
    bos = [tokens.bos_token_id] if tokens.add_bos and tokens.bos_token_id is not None else []
    length = min(SWEEP_PROMPT, manifest.text.max_context - len(bos))
    return [
        np.concatenate([np.array(bos, np.int64), ids[start : start + length]])
        for start in range(0, len(ids), length)
    ]


def int8_kv_cache(
    path: Path, fused: GraphSpec, key_scales: np.ndarray, value_scales: np.ndarray
) -> GraphSpec:
    """Rewrite the fused decoder graph at `path` in place to keep its KV cache in int8 with these
    per-channel scales; returns its manifest entry with the cache's dtype changed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from llava_edge.files import save_graph

    model = onnx.load(str(path), load_external_data=False)  # weights stay where they are
    graph = model.graph
    cache_names: set[str] = set()
    layer = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        if layer >= len(key_scales):
            raise LlavaEdgeError(f"{path.name} has more attention layers than the model's config")
        inputs = list(node.input) + [""] * (V_SCALE_INPUT + 1 - len(node.input))
        names = (f"kv_int8.{layer}.key_scale", f"kv_int8.{layer}.value_scale")
        for name, scales in zip(names, (key_scales[layer], value_scales[layer]), strict=True):
            graph.initializer.append(numpy_helper.from_array(scales, name))
        inputs[K_SCALE_INPUT], inputs[V_SCALE_INPUT] = names
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
        cache_names.update([inputs[3], inputs[4], node.output[1], node.output[2]])
        layer += 1
    if layer != len(key_scales):
        raise LlavaEdgeError(
            f"{path.name} has {layer} attention layers, the model's config {len(key_scales)}"
        )
    for value in list(graph.input) + list(graph.output):
        if value.name in cache_names:
            value.type.tensor_type.elem_type = TensorProto.INT8
    save_graph(model, path)
    return _with_int8_cache(fused, cache_names)


def _with_int8_cache(fused: GraphSpec, cache_names: set[str]) -> GraphSpec:
    def retype(tensors: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        return {
            name: TensorSpec("int8", t.shape) if name in cache_names else t
            for name, t in tensors.items()
        }

    fused.inputs, fused.outputs = retype(fused.inputs), retype(fused.outputs)
    fused.details = {**fused.details, "kv_cache": "int8, a scale per channel from calibration"}
    return fused
