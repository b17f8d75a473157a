"""How many bytes of weights an ONNX graph stores, at their stored precision, without `onnx`.

`llava-edge plan` runs on the robot, where only the runtime is installed (numpy, pillow,
tokenizers, onnxruntime; no `onnx` package), and onnxruntime does not tell weight sizes. So this
module reads the few ModelProto fields it needs straight from protobuf's wire format: each
initializer's dims and data type (and, for weights in a `.data` file, nothing else: their size
follows from the same two fields), tensors held by Constant nodes, and each graph input's element
type. Raw weight bytes are skipped over, never copied, so a 2 GB graph is scanned through a memory
map. tests/test_plan.py holds it to the `onnx` package's own reading.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field

# TensorProto.DataType -> bytes per element (4-bit types: half a byte)
ITEMSIZE = {
    1: 4.0,  # FLOAT
    2: 1.0,  # UINT8
    3: 1.0,  # INT8
    4: 2.0,  # UINT16
    5: 2.0,  # INT16
    6: 4.0,  # INT32
    7: 8.0,  # INT64
    9: 1.0,  # BOOL
    10: 2.0,  # FLOAT16
    11: 8.0,  # DOUBLE
    12: 4.0,  # UINT32
    13: 8.0,  # UINT64
    16: 2.0,  # BFLOAT16
    17: 1.0,  # FLOAT8E4M3FN
    18: 1.0,  # FLOAT8E4M3FNUZ
    19: 1.0,  # FLOAT8E5M2
    20: 1.0,  # FLOAT8E5M2FNUZ
    21: 0.5,  # UINT4
    22: 0.5,  # INT4
    23: 0.5,  # FLOAT4E2M1
}
NUMPY_NAMES = {
    1: "float32",
    10: "float16",
    16: "bfloat16",
    3: "int8",  # a KV cache after `quantize --kv-cache int8`
    2: "uint8",
    7: "int64",
    6: "int32",
    9: "bool",
}

# Field numbers in onnx.proto
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT = 1, 5, 11
NODE_ATTRIBUTE = 5
ATTRIBUTE_T, ATTRIBUTE_TENSORS = 5, 11
TENSOR_DIMS, TENSOR_DATA_TYPE = 1, 2
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR, TENSOR_TYPE_ELEM = 1, 1


@dataclass
class GraphSizes:
    """What a graph stores: weight bytes by data type, and each graph input's element type."""

    weights: dict[int, int] = field(default_factory=dict)  # data type -> bytes
    inputs: dict[str, int] = field(default_factory=dict)  # input name -> data type
    # sizes of weight matrices: both dims of 2-D initializers, the output dim of MatMulNBits'
    # 3-D packed ones; the widest that is not the vocabulary is the MLP's width
    matrix_dims: set[int] = field(default_factory=set)
    largest: int = 0  # bytes of the largest single weight

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    def input_dtype(self, name: str) -> str | None:
        return NUMPY_NAMES.get(self.inputs.get(name, 0))


def graph_sizes(path: str | os.PathLike) -> GraphSizes:
    """Weights (initializers and Constant tensors, inline or external) and input types."""
    sizes = GraphSizes()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for number, start, end in _fields(data, 0, len(data)):
            if number == MODEL_GRAPH:
                _graph(data, start, end, sizes)
    return sizes


def _graph(data: mmap.mmap, start: int, end: int, sizes: GraphSizes) -> None:
    for number, s, e in _fields(data, start, end):
        if number == GRAPH_INITIALIZER:
            _tensor(data, s, e, sizes)
        elif number == GRAPH_NODE:
            for n, a, b in _fields(data, s, e):
                if n == NODE_ATTRIBUTE:
                    for m, ts, te in _fields(data, a, b):
                        if m in (ATTRIBUTE_T, ATTRIBUTE_TENSORS):
                            _tensor(data, ts, te, sizes)
        elif number == GRAPH_INPUT:
            name, dtype = "", 0
            for n, a, b in _fields(data, s, e):
                if n == VALUE_NAME:
                    name = bytes(data[a:b]).decode()
                elif n == VALUE_TYPE:
                    dtype = _elem_type(data, a, b)
            sizes.inputs[name] = dtype


def _elem_type(data: mmap.mmap, start: int, end: int) -> int:
    for n, a, b in _fields(data, start, end):
        if n == TYPE_TENSOR:
            for m, value, _ in _fields(data, a, b):
                if m == TENSOR_TYPE_ELEM:
                    return value
    return 0


def _tensor(data: mmap.mmap, start: int, end: int, sizes: GraphSizes) -> None:
    dims: list[int] = []
    dtype = 0
    for number, a, b in _fields(data, start, end):
        if number == TENSOR_DIMS:
            if b is None:  # one varint (unpacked)
                dims.append(a)
            else:  # packed varints
                pos = a
                while pos < b:
                    value, pos = _varint(data, pos)
                    dims.append(value)
        elif number == TENSOR_DATA_TYPE:
            dtype = a
    if len(dims) == 2:
        sizes.matrix_dims.update(dims)
    elif len(dims) == 3 and dtype == 2:  # MatMulNBits: [N, blocks, block bytes]
        sizes.matrix_dims.add(dims[0])
    nbytes = math.ceil(math.prod(dims) * ITEMSIZE.get(dtype, 0.0))
    sizes.weights[dtype] = sizes.weights.get(dtype, 0) + nbytes
    sizes.largest = max(sizes.largest, nbytes)


def _fields(data: mmap.mmap, start: int, end: int):
    """(field number, value, None) for varints; (field number, start, end) for byte fields."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value, None
        elif wire == 2:
            length, pos = _varint(data, pos)
            yield number, pos, pos + length
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")


def _varint(data: mmap.mmap, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
