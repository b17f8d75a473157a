"""The TensorRT 10.3 static check: on a plain fp32 export, and on small graphs that break one rule
each (a check that never fails would pass them all)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llava_edge.calib.trt_check import SUPPORTED_OPS, check_graph, check_model_dir
from llava_edge.manifest import Manifest

K, N = 64, 8


def test_a_plain_fp32_export_passes_at_its_opset(tiny_model_dir: Path) -> None:
    manifest = Manifest.load(tiny_model_dir)
    assert check_model_dir(tiny_model_dir) == {"vision_encoder": [], "projector": [], "decoder": []}
    for graph in manifest.graphs.values():
        model = onnx.load(str(tiny_model_dir / graph.file), load_external_data=False)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset == graph.details["opset"] == manifest.source["opset"]


def _matmul(
    weight_scale: np.ndarray | None = None,
    weight_axis: int = 1,
    weight_zero: np.ndarray | None = None,
    act_scale: np.ndarray | None = None,
    act_zero: np.ndarray | None = None,
    opset: int = 17,
    block: int = 0,
    weight_type: int = TensorProto.INT8,
    extra: list | None = None,
    scale_is_input: bool = False,
) -> onnx.ModelProto:
    """x [1, K] -> Q/DQ -> MatMul with DQ'd weights [K, N]: the pattern quantize writes."""
    weight_scale = np.full(N, 0.01, np.float32) if weight_scale is None else weight_scale
    act_scale = np.array(0.02, np.float32) if act_scale is None else act_scale
    act_zero = np.array(0, np.int8) if act_zero is None else act_zero
    initializers = [
        numpy_helper.from_array(act_scale, "a_scale"),
        numpy_helper.from_array(act_zero, "a_zero"),
        numpy_helper.from_array(weight_scale, "w_scale"),
        helper.make_tensor("w", weight_type, [K, N], np.zeros(K * N, np.int8).tolist()),
    ]
    dq_inputs = ["w", "w_scale"]
    if weight_zero is not None:
        initializers.append(numpy_helper.from_array(weight_zero, "w_zero"))
        dq_inputs.append("w_zero")
    dq_attrs = {"axis": weight_axis, **({"block_size": block} if block else {})}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])]
    if scale_is_input:
        initializers = [i for i in initializers if i.name != "a_scale"]
        inputs.append(helper.make_tensor_value_info("a_scale", TensorProto.FLOAT, []))
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zero"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", dq_inputs, ["wd"], name="w_dq", **dq_attrs),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
        *(extra or []),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        initializers,
    )
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=imports)


def test_the_pattern_quantize_writes_passes() -> None:
    assert check_graph(_matmul()) == []


def _int4(**kw) -> onnx.ModelProto:
    blocks = K // 32
    return _matmul(
        weight_scale=np.full((blocks, N), 0.01, np.float32),
        block=32,
        weight_axis=0,
        weight_type=TensorProto.INT4,
        opset=21,
        **kw,
    )


def test_block_wise_int4_weights_pass_at_opset_21() -> None:
    assert check_graph(_int4()) == []


@pytest.mark.parametrize(
    "model, message",
    [
        (lambda: _matmul(act_zero=np.array(3, np.int8)), "zero point is not 0"),
        (lambda: _matmul(act_zero=np.array(0, np.uint8)), "zero point type UINT8"),
        (lambda: _matmul(weight_zero=np.full(N, 1, np.int8)), "zero point is not 0"),
        (
            lambda: _matmul(weight_scale=np.array(0.01, np.float32)),
            "quantize them per output channel",
        ),
        (lambda: _matmul(weight_scale=np.full(K, 0.01, np.float32), weight_axis=0), "axis 1"),
        (lambda: _matmul(act_scale=np.full(K, 0.02, np.float32)), "one scale per tensor"),
        (lambda: _matmul(scale_is_input=True), "scale must be a constant"),
        # TensorRT's parser refuses them: "Scale coefficients must all be positive"
        (lambda: _matmul(act_scale=np.array(0.0, np.float32)), "a scale is not positive"),
        (
            lambda: _matmul(
                weight_scale=np.full((K // 32, N), -0.01, np.float16),
                block=32,
                weight_axis=0,
                weight_type=TensorProto.INT4,
                opset=21,
            ),
            "a scale is not positive (smallest -0.01",
        ),
        (lambda: _matmul(opset=21), "opset 21"),
        (lambda: _matmul(opset=8), "opset 8"),
        (
            lambda: _matmul(
                extra=[helper.make_node("DynamicQuantizeLinear", ["x"], ["a", "b", "c"])]
            ),
            "does not import DynamicQuantizeLinear",
        ),
        (
            lambda: _matmul(
                extra=[helper.make_node("MatMulNBits", ["x"], ["m"], domain="com.microsoft")]
            ),
            "com.microsoft.MatMulNBits is not a standard",
        ),
        (lambda: _matmul(extra=[helper.make_node("STFT", ["x"], ["s"])]), "does not import STFT"),
        (
            lambda: _matmul(extra=[helper.make_node("Gelu", ["x"], ["g"])], opset=20),
            "does not import Gelu (an export at --opset 20 by an older llava-edge wrote it; export",
        ),
        (
            lambda: _int4(extra=[helper.make_node("Relu", ["wd"], ["r"])]),
            "not one MatMul/Gemm/Conv",
        ),
        (
            lambda: _matmul(
                weight_scale=np.full((2, N), 0.01, np.float32), block=32, weight_axis=0, opset=21
            ),
            "INT4-only",
        ),
    ],
)
def test_each_broken_rule_is_reported(model, message: str) -> None:
    problems = check_graph(model())
    assert any(message in p for p in problems), problems


def test_int4_blocks_must_run_along_k() -> None:
    model = _matmul(
        weight_scale=np.full((K, N // 4), 0.01, np.float32),
        block=4,
        weight_axis=1,
        weight_type=TensorProto.INT4,
        opset=21,
    )
    assert any("block along K" in p for p in check_graph(model))


def test_the_operator_list_is_the_103_parser() -> None:
    # present in 10.3 (DeformConv came in 10.1) and absent (added in 10.4-10.15 or never)
    assert {"DeformConv", "LayerNormalization", "QuantizeLinear", "Einsum"} <= SUPPORTED_OPS
    absent = {"STFT", "HannWindow", "Attention", "RMSNormalization", "RotaryEmbedding"}
    absent |= {"TensorScatter", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear"}
    assert not absent & SUPPORTED_OPS


def _without_activation_zero_points(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in model.graph.node:
        if node.name in ("q", "dq"):
            del node.input[2]
    return model


@pytest.mark.parametrize(
    "model",
    [
        # QuantizeLinear without a zero point (or output_dtype) quantizes to UINT8
        lambda: _without_activation_zero_points(_matmul()),
        lambda: _matmul(weight_type=TensorProto.UINT8),  # unsigned weights, no zero point
    ],
    ids=["activations", "weights"],
)
def test_unsigned_quantization_without_a_zero_point_is_reported(model) -> None:
    problems = check_graph(model())
    assert any("UINT8" in p and "signed" in p for p in problems), problems


def test_a_quantize_linear_typed_by_output_dtype_passes() -> None:
    model = _without_activation_zero_points(_matmul(opset=21, block=0))
    for node in model.graph.node:
        if node.name == "q":
            node.attribute.append(helper.make_attribute("output_dtype", TensorProto.INT8))
    problems = check_graph(model)
    assert not [p for p in problems if "signed" in p], problems


def _wide_per_channel(zero: int, path: Path | None = None) -> onnx.ModelProto | Path:
    """A MatMul with 70,000 output channels (an LM head over Llama 3's or Qwen2's vocabulary),
    its int8 weights per channel with a zero point per channel, as onnxruntime writes them;
    saved with its tensors in a `.data` file where `path` is given."""
    wide, k = 70_000, 2
    initializers = [
        numpy_helper.from_array(np.zeros((k, wide), np.int8), "w"),
        numpy_helper.from_array(np.full(wide, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.full(wide, zero, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=1),
        helper.make_node("MatMul", ["x", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, wide])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if path is None:
        return model
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_zero_points_of_a_wide_weight_are_read_not_guessed(tmp_path: Path, external: bool) -> None:
    """A zero point too large to read by default, or in a `.data` file, is read: one of zeros
    passes, one that is not zero is reported."""
    for zero, passes in ((0, True), (1, False)):
        model = _wide_per_channel(zero, tmp_path / f"wide{zero}.onnx" if external else None)
        problems = check_graph(model)
        assert (problems == []) == passes, problems
        assert passes or all("zero point is not 0" in p for p in problems), problems


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_an_export_at_opset_20_passes(tiny_checkpoint: Path, tmp_path: Path, dtype: str) -> None:
    """export offers --opset 20, where torch.onnx writes the projector's GELU as ONNX's Gelu, an
    operator TensorRT 10.3 is not documented to parse: the check refused the graph TensorRT would
    build. The GELU is written as the Erf ops of the opsets before 20, in the graph's own float
    type, and the graphs still match transformers token for token."""
    from conftest import quiet

    from llava_edge.export.exporter import export_checkpoint

    report = export_checkpoint(
        tiny_checkpoint, tmp_path / "model", dtype=dtype, opset=20, fused=False, log=quiet
    )
    assert report["forms"]
    for form in report["forms"].values():
        assert form["passed"] and form["greedy_tokens_matched"] == form["greedy_tokens_total"]
    assert check_model_dir(tmp_path / "model") == {
        "vision_encoder": [],
        "projector": [],
        "decoder": [],
    }
    projector = Manifest.load(tmp_path / "model").graphs["projector"]
    assert "Erf" in {
        n.op_type for n in onnx.load(str(tmp_path / "model" / projector.file)).graph.node
    }
