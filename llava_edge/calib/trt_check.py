"""A static check of an ONNX graph against what TensorRT 10.3 (JetPack 6) builds from it.

TensorRT cannot be installed where this project is developed, so the rules are read from its
documentation and checked on the graph itself:

- every node is a standard ONNX operator that TensorRT 10.3's ONNX parser imports (no
  com.microsoft contrib ops such as MatMulNBits, no DynamicQuantizeLinear, MatMulInteger or
  QLinearMatMul), at an opset the parser reads;
- quantization is explicit and symmetric: every QuantizeLinear/DequantizeLinear has a constant
  scale, all of it positive (the parser refuses others: "Scale coefficients must all be
  positive"), and zero point 0 (or none) of a signed type; activations have one scale per tensor;
  weights one per output channel (the axis TensorRT scales a GEMM's or convolution's filters on),
  or INT4 blocks along the reduction axis, the only block quantization TensorRT has.

`check_graph` returns the problems found (empty: the graph passes); `check_model_dir` checks the
form TensorRT would build of each graph in a model dir (`tensorrt_file` where the manifest names
one, else `file`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.manifest import Manifest

TENSORRT_VERSION = "10.3"

# Operators TensorRT 10.3's ONNX parser imports. Source: onnx/onnx-tensorrt docs/operators.md,
# the TensorRT 10.x support matrix (rows marked Y), less the operators docs/Changelog.md says were
# added after 10.3 (10.4: BlackmanWindow, HammingWindow, HannWindow; 10.5: STFT; 10.14: Attention;
# 10.15: RMSNormalization, RotaryEmbedding, TensorScatter) and less CastLike, Gelu and Mish, whose
# arrival in the 10.x series the documents do not date (left out: a false alarm is cheaper than
# an engine that fails to build on the robot).
SUPPORTED_OPS = frozenset(
    [
        "Abs",
        "Acos",
        "Acosh",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "Asin",
        "Asinh",
        "Atan",
        "Atanh",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Ceil",
        "Celu",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "Cosh",
        "CumSum",
        "DeformConv",
        "DepthToSpace",
        "DequantizeLinear",
        "Div",
        "Dropout",
        "Einsum",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "EyeLike",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gemm",
        "GlobalAveragePool",
        "GlobalLpPool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "GridSample",
        "GroupNormalization",
        "GRU",
        "HardSigmoid",
        "HardSwish",
        "Hardmax",
        "Identity",
        "If",
        "ImageScaler",
        "InstanceNormalization",
        "IsInf",
        "IsNaN",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "Loop",
        "LRN",
        "LSTM",
        "LpNormalization",
        "LpPool",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "MeanVarianceNormalization",
        "Min",
        "Mod",
        "Mul",
        "Neg",
        "NonMaxSuppression",
        "NonZero",
        "Not",
        "OneHot",
        "Or",
        "Pad",
        "ParametricSoftplus",
        "Pow",
        "PRelu",
        "QuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Range",
        "Reciprocal",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Relu",
        "Reshape",
        "Resize",
        "ReverseSequence",
        "RNN",
        "RoiAlign",
        "Round",
        "ScaledTanh",
        "Scan",
        "Scatter",
        "ScatterElements",
        "ScatterND",
        "Selu",
        "Shape",
        "Shrink",
        "Sigmoid",
        "Sign",
        "Sin",
        "Sinh",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tan",
        "Tanh",
        "ThresholdedRelu",
        "Tile",
        "TopK",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Upsample",
        "Where",
        "Xor",
    ]
)

# What to do about an unsupported operator that graphs an older llava-edge wrote may hold
REMEDIES = {
    "Gelu": (
        " (an export at --opset 20 by an older llava-edge wrote it; export the checkpoint again, "
        "which writes GELU in Erf or Tanh ops at every opset)"
    ),
}

# operators.md for TensorRT 10.0: "supports operators in the inclusive range of opset 9 to opset
# 20"; the changelog records no change of range through 10.3.
OPSETS = range(9, 21)
# Block-wise DequantizeLinear (INT4 weights) exists only from opset 21, and NVIDIA's parser reads
# it there (NVIDIA/TensorRT#4298: "Block-wise quantization is only supported in opset 21 onwards
# of ONNX"; INT4 quantization arrived in TensorRT 10.0). Allowed only for graphs that need it.
BLOCKWISE_OPSET = 21

_SIGNED = {"INT8", "INT4"}
# The input holding the weight, and the axis of its output channels, for each weighted operator.
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}


def check_graph(model: str | os.PathLike | Any) -> list[str]:
    """Problems that would stop or silently degrade a TensorRT 10.3 build; empty when none.

    `model`: a path, or an onnx.ModelProto; one loaded without its `.data` file has the zero
    points stored there left unchecked (a path's are read from it)."""
    import onnx

    base_dir = None
    if not isinstance(model, onnx.ModelProto):
        base_dir = Path(model).parent
        model = onnx.load(str(model), load_external_data=False)
    problems: list[str] = []
    graphs = list(_all_graphs(model.graph))
    blockwise = any(_is_blockwise(n) for g in graphs for n in g.node)
    problems += _check_opsets(model, blockwise)
    for graph in graphs:
        problems += _check_ops(graph)
        problems += _check_quantization(graph, base_dir)
    return problems


def check_model_dir(model_dir: str | os.PathLike) -> dict[str, list[str]]:
    """check_graph on the form TensorRT builds of each graph of a model dir."""
    model_dir = Path(model_dir)
    manifest = Manifest.load(model_dir)
    return {
        name: check_graph(model_dir / (graph.tensorrt_file or graph.file))
        for name, graph in manifest.graphs.items()
    }


# ---- rules -------------------------------------------------------------------------------------


def _check_opsets(model: Any, blockwise: bool) -> list[str]:
    problems = []
    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            continue  # nodes of other domains are reported one by one
        if opset.version in OPSETS or (blockwise and opset.version == BLOCKWISE_OPSET):
            continue
        allowed = f"{OPSETS.start}-{OPSETS.stop - 1}"
        if blockwise:
            allowed += f" ({BLOCKWISE_OPSET} for block-wise INT4)"
        problems.append(
            f"opset {opset.version}: TensorRT {TENSORRT_VERSION}'s parser reads opsets {allowed}"
        )
    return problems


def _check_ops(graph: Any) -> list[str]:
    problems = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(
                f"{node.name or node.op_type}: {node.domain}.{node.op_type} is not a standard "
                "ONNX operator; TensorRT's parser has no importer for it"
            )
        elif node.op_type not in SUPPORTED_OPS:
            problems.append(
                f"{node.name or node.op_type}: TensorRT {TENSORRT_VERSION} does not import "
                f"{node.op_type}{REMEDIES.get(node.op_type, '')}"
            )
    return problems


def _check_quantization(graph: Any, base_dir: Path | None) -> list[str]:
    constants = _constants(graph, base_dir)
    stored = {t.name for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in (
            "",
            "ai.onnx",
        ):
            continue
        where = node.name or node.output[0]
        problems += _check_scale_and_zero(node, where, constants)
        problems += _check_implied_type(node, where, constants, producer)
        if node.op_type == "QuantizeLinear":
            if node.input[0] in stored:  # float weights quantized at build time: fine, as below
                continue
            if constants.get(node.input[1]) is not None and constants[node.input[1]].size != 1:
                problems.append(f"{where}: activations must have one scale per tensor")
            continue
        source = producer.get(node.input[0])
        is_weight = node.input[0] in stored or (
            source is not None and source.op_type == "QuantizeLinear" and source.input[0] in stored
        )
        if is_weight:
            weight = node.input[0] if node.input[0] in stored else source.input[0]
            problems += _check_weight_dq(node, where, constants[weight], constants, consumers)
        elif constants.get(node.input[1]) is not None and constants[node.input[1]].size != 1:
            problems.append(f"{where}: activations must have one scale per tensor")
        if _is_blockwise(node) and not is_weight:
            problems.append(f"{where}: block-wise (INT4) quantization is for weights only")
    return problems


def _check_scale_and_zero(node: Any, where: str, constants: dict[str, Any]) -> list[str]:
    problems = []
    if len(node.input) < 2 or constants.get(node.input[1]) is None:
        problems.append(f"{where}: the scale must be a constant (TensorRT fixes it at build time)")
    else:
        scales = constants[node.input[1]].read()
        if scales is not None and not np.all(scales.astype(np.float32) > 0):
            problems.append(
                f"{where}: a scale is not positive (smallest {scales.min()}); TensorRT's parser "
                "takes positive scales only"
            )
    if len(node.input) > 2 and node.input[2]:
        zero = constants.get(node.input[2])
        if zero is None:
            problems.append(f"{where}: the zero point must be a constant")
        else:
            values = zero.read()
            if values is not None and np.any(values != 0):
                problems.append(f"{where}: zero point is not 0; TensorRT quantizes symmetrically")
            if zero.dtype not in _SIGNED:
                problems.append(
                    f"{where}: zero point type {zero.dtype}; TensorRT takes signed INT8/INT4 "
                    "(unsigned quantization is asymmetric)"
                )
    return problems


def _check_implied_type(
    node: Any, where: str, constants: dict[str, _Const], producer: dict[str, Any]
) -> list[str]:
    """Without a zero point the quantized type is implied: a QuantizeLinear's is UINT8 unless
    its output_dtype says otherwise, a DequantizeLinear's that of the tensor it reads."""
    if len(node.input) > 2 and node.input[2]:
        return []  # the zero point's type, checked with it
    dtype = _quantized_type(node, constants, producer)
    if dtype is None or not dtype.startswith("UINT"):
        return []
    return [
        f"{where}: quantizes to {dtype} (no zero point says otherwise); TensorRT takes signed "
        "INT8/INT4 (unsigned quantization is asymmetric)"
    ]


def _quantized_type(
    node: Any, constants: dict[str, _Const], producer: dict[str, Any]
) -> str | None:
    from onnx import TensorProto

    if node.op_type == "QuantizeLinear":
        if len(node.input) > 2 and node.input[2] and node.input[2] in constants:
            return constants[node.input[2]].dtype
        output_dtype = _attr(node, "output_dtype", 0)
        return TensorProto.DataType.Name(output_dtype) if output_dtype else "UINT8"
    if node.input[0] in constants:
        return constants[node.input[0]].dtype
    source = producer.get(node.input[0])
    if source is not None and source.op_type == "QuantizeLinear":
        return _quantized_type(source, constants, producer)
    return None  # a graph input or another op's output: its type is not read here


def _check_weight_dq(
    node: Any,
    where: str,
    weight: _Const,
    constants: dict[str, _Const],
    consumers: dict[str, list[Any]],
) -> list[str]:
    users = consumers.get(node.output[0], [])
    user = users[0] if len(users) == 1 else None
    if user is None or _WEIGHT_INPUT.get(user.op_type) is None:
        names = ", ".join(u.op_type for u in users) or "nothing"
        return [f"{where}: dequantized weights feed {names}, not one MatMul/Gemm/Conv"]
    if list(user.input).index(node.output[0]) != _WEIGHT_INPUT[user.op_type]:
        return [f"{where}: dequantized weights are not {user.op_type}'s weight input"]
    scale = constants.get(node.input[1])
    if scale is None:
        return []  # reported already
    shape = weight.shape
    rank = len(shape)
    axis = _attr(node, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    block = _attr(node, "block_size", 0)
    if block:
        return _check_blocks(where, user, shape, axis, block, scale, weight.dtype)
    channel = _channel_axis(user, rank)
    if scale.size == 1:
        return [f"{where}: weights have one scale; quantize them per output channel"]
    if axis != channel or list(scale.shape) != [shape[channel]]:
        return [
            f"{where}: weight scales {list(scale.shape)} on axis {axis}; {user.op_type} weights "
            f"{list(shape)} take one scale per output channel on axis {channel}"
        ]
    return []


def _check_blocks(
    where: str, user: Any, shape: list[int], axis: int, block: int, scale: _Const, dtype: str
) -> list[str]:
    problems = []
    if dtype != "INT4":
        problems.append(f"{where}: block-wise quantization is INT4-only in TensorRT")
    if user.op_type != "MatMul" or len(shape) != 2:
        return problems + [f"{where}: block-wise weights must be 2-D MatMul weights"]
    if axis != 0:  # blocks run along K, the reduction axis of a [K, N] weight
        problems.append(f"{where}: blocks on axis {axis}; MatMul weights [K, N] block along K (0)")
    expected = [math.ceil(shape[0] / block), shape[1]]
    if list(scale.shape) != expected:
        problems.append(f"{where}: block scales {list(scale.shape)}, expected {expected}")
    return problems


def _channel_axis(user: Any, rank: int) -> int:
    if user.op_type == "Gemm":
        return 0 if _attr(user, "transB", 0) else 1
    if user.op_type == "MatMul":
        return rank - 1  # [..., K, N]: the output channels are N
    if user.op_type == "ConvTranspose":
        return 1  # [C_in, C_out / groups, ...]
    return 0  # Conv: [C_out, C_in / groups, ...]


# ---- reading the graph -------------------------------------------------------------------------


class _Const:
    """A constant tensor's type and shape, and its values on request (`read`): a weight's are
    never needed, and may be gigabytes in a `.data` file."""

    def __init__(self, tensor: Any, base_dir: Path | None):
        from onnx import TensorProto

        self.tensor, self.base_dir = tensor, base_dir
        self.dtype = TensorProto.DataType.Name(tensor.data_type)
        self.shape = list(tensor.dims)
        self.size = int(np.prod(self.shape)) if self.shape else 1

    def read(self) -> np.ndarray | None:
        """The values, from the graph or its `.data` file; None where they are in a file this
        check was not told where to find (a graph handed over in memory without its weights)."""
        from onnx import TensorProto, numpy_helper

        external = self.tensor.data_location == TensorProto.EXTERNAL
        if external and self.base_dir is None:
            return None
        try:
            return numpy_helper.to_array(self.tensor, str(self.base_dir or ""))
        except OSError:
            return None


def _constants(graph: Any, base_dir: Path | None) -> dict[str, _Const]:
    """Initializers and Constant outputs; `base_dir` holds the graph's `.data` file."""
    out = {t.name: _Const(t, base_dir) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = _Const(a.t, base_dir)
    return out


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _is_blockwise(node: Any) -> bool:
    return (
        node.op_type in ("QuantizeLinear", "DequantizeLinear") and _attr(node, "block_size", 0) > 0
    )


def _all_graphs(graph: Any) -> Any:
    """The graph and every subgraph (If/Loop/Scan bodies) inside it."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.g.node:
                yield from _all_graphs(a.g)
            for g in a.graphs:
                yield from _all_graphs(g)
