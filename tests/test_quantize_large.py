"""fp16 conversion where it is hardest: chains of nodes kept in fp32, and a graph whose weights are
over protobuf's 2 GiB, as a 7B decoder's are.

The graphs are built here, in the shapes a decoder has: an embedding table looked up by token id
and multiplied by cos(position x frequency) (the rotary pattern, kept in fp32 and joined to the
fp16 path with a Cast), and an RMS of the looked-up rows (x*x, mean, square root: kept in fp32
because x*x overflows fp16).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from llava_edge.calib.quantize import to_fp16

BIG_ROWS, BIG_WIDTH = 16448, 32768  # 2,155,872,256 bytes of float32: over 2 GiB
FILLED = 64  # rows that hold values; the rest of a big table is a sparse file's hole
SCALE = 300.0  # rows x SCALE fit fp16, their squares do not
CONVERT = """
import sys
from pathlib import Path
from llava_edge.calib.quantize import to_fp16
to_fp16(Path(sys.argv[1]), Path(sys.argv[2]))
# VmHWM, not the parent's ru_maxrss from wait4: on Linux a child's ru_maxrss starts from its
# parent's at fork, so a pytest worker that ran a big test before would show through
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) * 1024)
"""


def decoder_like_graph(root: Path, rows: int, width: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """The graph, its table in `graph.onnx.data` (only the first FILLED rows written), the
    filled rows and the rotary frequencies."""
    filled = np.random.default_rng(0).standard_normal((FILLED, width)).astype(np.float32)
    inv_freq = (1.0 / 10000 ** (np.arange(width, dtype=np.float32) / width)).astype(np.float32)
    with open(root / "graph.onnx.data", "wb") as f:
        f.write(filled.tobytes())
        f.truncate(rows * width * 4)
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, width])
    table.data_location = TensorProto.EXTERNAL
    for key, value in (
        ("location", "graph.onnx.data"),
        ("offset", 0),
        ("length", rows * width * 4),
    ):
        entry = table.external_data.add()
        entry.key, entry.value = key, str(value)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup"),
        helper.make_node("Cast", ["position_ids"], ["positions"], to=TensorProto.FLOAT, name="pos"),
        helper.make_node("Unsqueeze", ["positions", "last"], ["column"], name="column"),
        helper.make_node("Mul", ["column", "inv_freq"], ["angles"], name="angles"),
        helper.make_node("Cos", ["angles"], ["cos"], name="cos"),
        helper.make_node("Mul", ["rows", "cos"], ["rotated"], name="rotate"),
        helper.make_node("Mul", ["rows", "scale"], ["scaled"], name="scaled"),
        helper.make_node("Pow", ["scaled", "two"], ["squares"], name="square"),
        helper.make_node("ReduceMean", ["squares"], ["mean"], axes=[-1], name="mean"),
        helper.make_node("Sqrt", ["mean"], ["rms"], name="rms"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder_like",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["n"]),
        ],
        [
            helper.make_tensor_value_info("rotated", TensorProto.FLOAT, ["n", width]),
            helper.make_tensor_value_info("rms", TensorProto.FLOAT, ["n", 1]),
        ],
        [
            table,
            onnx.numpy_helper.from_array(inv_freq, "inv_freq"),
            onnx.numpy_helper.from_array(np.asarray([-1], dtype=np.int64), "last"),
            onnx.numpy_helper.from_array(np.asarray(SCALE, dtype=np.float32), "scale"),
            onnx.numpy_helper.from_array(np.asarray(2.0, dtype=np.float32), "two"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(root / "graph.onnx"))
    return root / "graph.onnx", filled, inv_freq


def check_outputs(path: Path, filled: np.ndarray, inv_freq: np.ndarray) -> None:
    """The fp16 graph computes what float32 numpy does, to fp16's precision."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ids = np.asarray([3, 0, FILLED - 1], dtype=np.int64)
    positions = np.asarray([0, 7, 1500], dtype=np.int64)  # angles of 1500 rad: fp16 steps by 1
    rotated, rms = session.run(None, {"ids": ids, "position_ids": positions})
    rows = filled[ids]
    want = rows * np.cos(positions[:, None].astype(np.float32) * inv_freq)
    assert rotated.dtype == np.float32 and rms.dtype == np.float32
    np.testing.assert_allclose(rotated, want, atol=4e-3 * np.abs(want).max())
    want_rms = np.sqrt(np.mean((rows * SCALE) ** 2, axis=-1, keepdims=True))
    np.testing.assert_allclose(rms, want_rms, rtol=2e-3)  # not inf: the squares stayed fp32


def test_fp16_keeps_chains_of_fp32_nodes_in_fp32(tmp_path: Path) -> None:
    src, filled, inv_freq = decoder_like_graph(tmp_path, rows=FILLED, width=256)
    (tmp_path / "out").mkdir()
    to_fp16(src, tmp_path / "out" / "graph.onnx")
    stored = {
        t.name: t.data_type
        for t in onnx.load(str(tmp_path / "out" / "graph.onnx")).graph.initializer
    }
    assert stored["table"] == TensorProto.FLOAT16
    assert stored["inv_freq"] == TensorProto.FLOAT  # used by the rotary nodes only
    check_outputs(tmp_path / "out" / "graph.onnx", filled, inv_freq)


def test_fp16_of_a_graph_over_2gib_loads_computes_and_streams(tmp_path: Path) -> None:
    src, filled, inv_freq = decoder_like_graph(tmp_path, rows=BIG_ROWS, width=BIG_WIDTH)
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "graph.onnx"
    with open(tmp_path / "stderr", "w+") as err:
        child = subprocess.run(
            [sys.executable, "-c", CONVERT, str(src), str(dst)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        err.seek(0)
        assert child.returncode == 0, err.read()[-2000:]
    peak = int(child.stdout.strip().splitlines()[-1])
    source_bytes = BIG_ROWS * BIG_WIDTH * 4
    # Weights streamed a chunk at a time: not even the fp16 table (half the source) was ever
    # held, let alone the fp32 one.
    assert peak < source_bytes / 2, f"peak {peak / 2**30:.2f} GiB"
    assert (tmp_path / "out" / "graph.onnx.data").stat().st_size >= source_bytes // 2
    check_outputs(dst, filled, inv_freq)


def test_weights_round_to_fp16_as_onnxruntime_rounds_them() -> None:
    """to_float16 is onnxruntime's convert_np_to_float16, bit for bit, faster and quiet: extremes
    clamp to +-65504, tiny non-zero values to +-2**-24, NaN, infinities and zeros stay."""
    import warnings

    from onnxruntime.transformers.float16 import convert_np_to_float16

    from llava_edge.calib.fp16 import to_float16

    edges = [0.0, -0.0, 1e-9, -3e-8, 6e-8, 0.1, 1.0, 65504, 65520, 1e5, -1e5, np.inf, -np.inf]
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(100_000) * np.exp(rng.uniform(-40, 15, 100_000))
    values = np.concatenate([edges, [np.nan], spread]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning in the user's terminal
        ours = to_float16(values)
    theirs = convert_np_to_float16(values)
    assert ours.dtype == np.float16
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))
    assert np.isfinite(ours[np.isfinite(values)]).all() and (ours[values != 0] != 0).all()


def test_fp16_keeps_rmsnorms_mean_of_squares_fp32_up_to_its_sqrt(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A decoder's RMSNorm adds eps between ReduceMean and Sqrt: the mean of squares must reach
    the Sqrt in float32 through that Add (past an RMS of 256 it overflows fp16, and 1/sqrt(inf)
    zeroes the layer's input). onnxruntime's CPU provider runs fp16 Adds in float32, so the
    graph's types are what is checked: TensorRT and GPU providers compute them as typed."""
    model = onnx.load(str(tiny_model_dir / "decoder.onnx"))
    onnx.save(model, str(tmp_path / "decoder.onnx"))
    (tmp_path / "out").mkdir()
    details = to_fp16(tmp_path / "decoder.onnx", tmp_path / "out" / "decoder.onnx")
    converted = onnx.load(str(tmp_path / "out" / "decoder.onnx"))
    producer = {o: n for n in converted.graph.node for o in n.output}
    sqrts = [n for n in converted.graph.node if n.op_type == "Sqrt"]
    assert len(sqrts) == 2 * 2 + 1  # two norms a layer, the final norm
    assert details["kept_fp32_nodes"] > len(sqrts)  # their + eps, and the rotary angles
    for sqrt in sqrts:
        node, path = producer[sqrt.input[0]], []
        while node.op_type != "ReduceMean":
            path.append(node)
            node = producer[node.input[0]]  # Add(mean, eps), and casts of it
        to_fp16_casts = [
            n
            for n in path
            if n.op_type == "Cast"
            and {a.name: a.i for a in n.attribute}.get("to") == TensorProto.FLOAT16
        ]
        assert not to_fp16_casts, [n.name for n in path]
