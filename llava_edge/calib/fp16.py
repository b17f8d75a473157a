"""fp16 graphs of any size: onnxruntime's float16 converter on the graph without its weights, then
the weights converted and written a chunk at a time.

The converter decides where fp32 and fp16 meet (and puts a Cast there) from the graph's types,
which ONNX shape inference gives it. Shape inference serializes the proto, which protobuf caps
at 2 GiB, so it cannot run on a 7B decoder with its weights loaded, and a converter left
without types joins fp32 and fp16 tensors in one node (onnxruntime then refuses the graph).
Without its external weights the same graph is a few MB: inference runs on it, the converter
sees one-element stand-ins for the weights (it needs their names and types, not their values),
and the weights it turned to fp16 are then read, converted and written a chunk at a time, so
memory stays at one chunk however big the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.files import save_graph

# Kept in float32 in fp16 graphs: x*x in norms and softmax's exponent overflow fp16's 65504, and
# TensorRT warns that fp16 LayerNormalization after attention may overflow.
FP16_KEEP_FP32_OPS = ["Pow", "ReduceMean", "Sqrt", "Softmax", "LayerNormalization"]
CHUNK_ELEMENTS = 1 << 24  # weights converted per step: 64 MB of fp32 in, 32 MB of fp16 out
DATA_ALIGNMENT = 4096  # each tensor starts on a page, so onnxruntime can map it from the file


def to_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """fp16 weights and math with onnxruntime's converter; graph IO stays as it was (fp32)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)  # external weights stay on disk
    kept_nodes = len(_rotary_nodes(model)) + len(_norm_epsilon_nodes(model))
    model, halved = fp16_graph(model, keep_io_types=True)
    stream_weights(model, src.parent, dst, halved)
    save_graph(model, dst)
    return {
        "form": "fp16 weights and activations (onnxruntime.transformers.float16), fp32 graph IO",
        "kept_fp32_ops": FP16_KEEP_FP32_OPS,
        "kept_fp32_nodes": kept_nodes,  # beyond those ops: rotary angles, norms' + eps
    }


def fp16_graph(model: Any, keep_io_types: bool | list[str]) -> tuple[Any, set[str]]:
    """The converter's fp16 form of `model`, loaded without its external weights.

    keep_io_types: True keeps every graph input and output as it was, or the names of those that
    stay fp32. Returns the converted graph, whose external weights still point at their fp32
    bytes on disk, and the names of those the converter relabelled fp16: `stream_weights` or
    `load_weights` convert their data.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.shape_inference.infer_shapes(model)
    stored = _stand_in_external_weights(model)
    kept_nodes = _rotary_nodes(model) + _norm_epsilon_nodes(model)
    kept_ops = DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FP32_OPS
    _keep_fp32_between_kept_nodes(model, set(kept_ops), set(kept_nodes))
    model = convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        op_block_list=kept_ops,
        node_block_list=kept_nodes,
        disable_shape_infer=True,  # inferred above, with the weights' real shapes
    )
    halved = set()
    for tensor in model.graph.initializer:
        if tensor.name in stored:
            dtype = tensor.data_type  # what the converter decided for this weight
            tensor.CopyFrom(stored[tensor.name])
            if dtype != tensor.data_type:
                tensor.data_type = dtype
                halved.add(tensor.name)
    # Shapes the converter noted for its casts came from the stand-ins; consumers infer them.
    del model.graph.value_info[:]
    return model, halved


def _keep_fp32_between_kept_nodes(model: Any, ops: set[str], names: set[str]) -> None:
    """Forget the type of each tensor that one fp32 node hands only to other fp32 nodes.

    The converter turns every typed float tensor to fp16 and casts around the nodes it keeps in
    fp32, so a chain of them would round each link through fp16: x*x overflowing between Pow and
    ReduceMean, rotary angles losing whole radians between Mul and Cos. A tensor with no type
    is left as it is, fp32 from end to end.
    """
    kept = [n for n in model.graph.node if n.op_type in ops or n.name in names]
    made_by_kept = {out for node in kept for out in node.output}
    used_elsewhere = {
        i for n in model.graph.node if not (n.op_type in ops or n.name in names) for i in n.input
    }
    used_elsewhere |= {o.name for o in model.graph.output}
    inner = made_by_kept - used_elsewhere
    keep = [v for v in model.graph.value_info if v.name not in inner]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _stand_in_external_weights(model: Any) -> dict[str, Any]:
    """Replace each initializer whose data lives in external data by a one-element tensor of the
    same name, type and rank; return the originals by name."""
    import onnx

    stored = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        stored[tensor.name] = onnx.TensorProto()
        stored[tensor.name].CopyFrom(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        stand_in = onnx.numpy_helper.from_array(
            np.zeros([1] * len(tensor.dims), dtype=dtype), tensor.name
        )
        tensor.CopyFrom(stand_in)
    return stored


def _rotary_nodes(model: Any) -> list[str]:
    """Nodes computing rotary angles from position_ids: position x frequency reaches thousands of
    radians, where fp16's spacing is several radians, so cos/sin would be noise."""
    produced_by = {out: node for node in model.graph.node for out in node.output}
    downstream = {"position_ids"}
    for node in model.graph.node:  # nodes are topologically sorted in a valid graph
        if any(i in downstream for i in node.input):
            downstream.update(node.output)
    chain: set[str] = set()
    todo = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    while todo:
        node = todo.pop()
        if node.name in chain or not any(o in downstream for o in node.output):
            continue
        chain.add(node.name)
        todo += [produced_by[i] for i in node.input if i in produced_by]
    return sorted(chain)


def _norm_epsilon_nodes(model: Any) -> list[str]:
    """The nodes between a ReduceMean and the Sqrt it feeds (RMSNorm's `+ eps`): kept in fp32
    with them, or the mean of squares would be rounded through fp16 there, and overflow past an
    RMS of 256 (Sqrt of infinity, then 1/infinity: the norm's output all zeros)."""
    produced_by = {out: node for node in model.graph.node for out in node.output}
    stored = {t.name for t in model.graph.initializer}
    chain: list[str] = []
    for sqrt in (n for n in model.graph.node if n.op_type == "Sqrt"):
        path, node = [], produced_by.get(sqrt.input[0])
        while node is not None and node.op_type in ("Add", "Mul", "Cast") and len(path) < 4:
            path.append(node)
            sources = [
                produced_by[i]
                for i in node.input
                if i in produced_by and i not in stored and produced_by[i].op_type != "Constant"
            ]
            node = sources[0] if len(sources) == 1 else None
        if node is not None and node.op_type == "ReduceMean":
            chain += [n.name for n in path]
    return chain


def stream_weights(model: Any, src_dir: Path, dst: Path, halved: set[str]) -> None:
    """Copy every external initializer of `model` from `src_dir` into `dst`'s `.data` file,
    converting those named in `halved` from float32 to float16 (onnxruntime's rounding: finite
    values stay finite, small ones stay non-zero), and point the tensors at their new place.

    The converter relabels those tensors as fp16 without touching their (unloaded) data, so
    their on-disk bytes are still fp32 until this runs.
    """
    import onnx

    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    location = dst.name + ".data"
    with open(dst.parent / location, "wb") as out:
        for tensor in external:
            info = {e.key: e.value for e in tensor.external_data}
            count = int(np.prod(tensor.dims, dtype=np.int64))
            out.write(b"\0" * (-out.tell() % DATA_ALIGNMENT))
            offset = out.tell()
            with open(src_dir / info["location"], "rb") as source:
                source.seek(int(info.get("offset", 0)))
                if tensor.name in halved:
                    for start in range(0, count, CHUNK_ELEMENTS):
                        n = min(CHUNK_ELEMENTS, count - start)
                        chunk = np.fromfile(source, dtype=np.float32, count=n)
                        if chunk.size != n:
                            raise OSError(f"{source.name} ends before {tensor.name}'s data does")
                        out.write(to_float16(chunk).tobytes())
                else:
                    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
                    _copy_bytes(source, out, count * itemsize)
            del tensor.external_data[:]
            for key, value in (
                ("location", location),
                ("offset", offset),
                ("length", out.tell() - offset),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)


def load_weights(model: Any, src_dir: Path, halved: set[str]) -> None:
    """Read every external initializer of `model` from `src_dir` into memory, converting those
    named in `halved` from float32 to float16 (for tools that need the weights in memory)."""
    import onnx

    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        count = int(np.prod(tensor.dims, dtype=np.int64))
        stored = np.float32 if tensor.name in halved else None
        dtype = stored or onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        with open(src_dir / info["location"], "rb") as source:
            source.seek(int(info.get("offset", 0)))
            values = np.fromfile(source, dtype=dtype, count=count)
        if values.size != count:
            raise OSError(f"{src_dir / info['location']} ends before {tensor.name}'s data does")
        if stored is not None:
            values = to_float16(values)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = values.tobytes()


def to_float16(values: np.ndarray) -> np.ndarray:
    """float32 -> float16 as onnxruntime's converter rounds weights (convert_np_to_float16): finite
    values stay finite (beyond 65504 they become +-65504) and non-zero ones non-zero (below fp16's
    smallest step they become +-2**-24); NaN, infinities and zeros are kept.

    Written here because onnxruntime's version makes a dozen passes over the array (some only to
    log its extremes): 3-4x slower, which is minutes on a 7B model.
    """
    with np.errstate(over="ignore"):  # overflow is what the next line mends
        half = values.astype(np.float16)
    overflowed = np.isinf(half) & np.isfinite(values)
    half[overflowed] = np.copysign(np.float16(65504), values[overflowed])
    vanished = (half == 0) & (values != 0)
    half[vanished] = np.copysign(np.float16(2**-24), values[vanished])
    return half


def _copy_bytes(source: Any, out: Any, length: int) -> None:
    remaining = length
    while remaining:
        block = source.read(min(remaining, 1 << 24))
        if not block:
            raise OSError(f"{source.name} ends {remaining} bytes early")
        out.write(block)
        remaining -= len(block)
