"""An int8 KV cache for the fused decoder (`quantize --kv-cache int8`).

At a depth of a few hundred tokens the KV cache is a large part of what a decode step reads: on
`small` at 512 tokens, 67 MB of fp32 keys and values beside 128 MB of int4 weights. Decoding is
bound by those bytes, so storing the cache in int8 makes each step faster and the cache four times
smaller. onnxruntime's GroupQueryAttention does it on the CPU: given an int8 past/present and a
scale per channel (`k_quant_type`/`v_quant_type` PER_CHANNEL, `kv_cache_bit_width` 8), it writes
round(x / scale) clipped to int8 and attends over the dequantized values; the rest of the graph
stays as it is.

The scales come from calibration: the fp32 decoder's keys and values on the calibration samples
(its present outputs). A value's scale is its channel's largest magnitude over 127. Keys are
stored after the rotary embedding, which turns each pair of channels (i, i + head_dim / 2) by an
angle that depends on the position: a key's two channels of a pair can take any split of the
pair's length at a position calibration never saw. So both channels of a pair get the pair's
largest length, which bounds them at every position.

Only the fused form (onnxruntime on the CPU) changes: the standard graphs, which TensorRT builds
from, keep the model's dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llava_edge.calib.data import Capture
from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import GraphSpec, KVSpec, TensorSpec, TextSpec

KV_CACHE_CHOICES = ("int8",)
INT8_MAX = 127
# GroupQueryAttention's inputs: k_scale and v_scale come 13th and 14th.
K_SCALE_INPUT, V_SCALE_INPUT = 12, 13


class KVRanges:
    """Each layer's largest key (per rotary pair) and value magnitudes per channel, observed over
    the standard decoder's calls ([kv_heads, head_dim] each)."""

    def __init__(self, text: TextSpec):
        self.text = text
        shape = (text.num_layers, text.num_kv_heads, text.head_dim)
        self.keys = np.zeros(shape, np.float32)
        self.values = np.zeros(shape, np.float32)
        self.calls = 0

    def observe(self, capture: Capture) -> None:
        """Take the keys/values one call of the standard decoder returned (its present outputs
        hold that call's new tokens, [batch, kv_heads, new, head_dim])."""
        outputs = dict(zip(capture.output_names, capture.outputs, strict=True))
        kv = KVSpec()
        half = self.text.head_dim // 2
        for i in range(self.text.num_layers):
            keys = np.abs(outputs[kv.present_key.format(i=i)].astype(np.float32))
            values = np.abs(outputs[kv.present_value.format(i=i)].astype(np.float32))
            pair = np.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2).max(axis=(0, 2))
            self.keys[i] = np.maximum(self.keys[i], np.concatenate([pair, pair], axis=-1))
            self.values[i] = np.maximum(self.values[i], values.max(axis=(0, 2)))
        self.calls += 1

    def scales(self) -> tuple[np.ndarray, np.ndarray]:
        """(key scales, value scales), [layers, kv_heads, 1, head_dim]: magnitude / 127. A channel
        that was always zero gets scale 1 (any scale stores its zeros exactly)."""
        if not self.calls:
            raise LlavaEdgeError("no decoder calls to calibrate the int8 KV cache on")

        def scale(magnitude: np.ndarray) -> np.ndarray:
            out = np.where(magnitude > 0, magnitude / INT8_MAX, 1.0).astype(np.float32)
            return out[:, :, None, :]

        return scale(self.keys), scale(self.values)


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
