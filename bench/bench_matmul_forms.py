"""Which quantized MatMul form is fastest on this CPU, for prompts and for decode steps, as JSON.

    .venv/bin/python bench/bench_matmul_forms.py [--k 1024] [--n 2816] [--threads 2] [--runs 7]

One graph of eight independent [M, K] x [K, N] MatMuls (so a call's fixed cost does not hide
the kernels), in each form onnxruntime's quantizers write: fp32, dynamic int8 (MatMulInteger, what
`quantize --precision int8` writes for onnxruntime), and MatMulNBits at 8 and 4 bits with blocks
of 32 and 128 (accuracy level 4: int8 activations, what `--precision int4` writes). Timed at M=1
(a decode step: weights read once, bandwidth-bound) and M=256 (a prompt: compute-bound),
interleaved, medians of `--runs`. The defaults are the `small` preset's MLP (hidden 1024,
intermediate 2816). The kernels onnxruntime picks differ by instruction set (AVX2, AVX-512, VNNI,
NEON on a Jetson): this is how to choose a form on the machine that will run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

MATMULS = 8
ROWS = (1, 256)


def fp32_graph(k: int, n: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((k, n)) * 0.02).astype(np.float32) for _ in range(MATMULS)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(MATMULS)]
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(MATMULS)], ["y"]))
    graph = helper.make_graph(
        nodes,
        "matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def quantized_forms(fp32: Path, root: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    forms = {"fp32": fp32, "int8 MatMulInteger": root / "int8.onnx"}
    quantize_dynamic(
        fp32, forms["int8 MatMulInteger"], weight_type=QuantType.QInt8, per_channel=True
    )
    for bits in (8, 4):
        for block in (32, 128):
            config = DefaultWeightOnlyQuantConfig(
                block_size=block, is_symmetric=True, accuracy_level=4, bits=bits
            )
            quantizer = MatMulNBitsQuantizer(onnx.load(fp32), algo_config=config)
            quantizer.process()
            path = root / f"nbits{bits}_{block}.onnx"
            onnx.save(quantizer.model.model, path)
            forms[f"{bits}-bit MatMulNBits, block {block}"] = path
    return forms


def time_forms(forms: dict[str, Path], k: int, threads: int, runs: int) -> dict[str, dict]:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    sessions = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in forms.items()
    }
    times: dict[str, dict[int, list[float]]] = {name: {m: [] for m in ROWS} for name in forms}
    for _ in range(runs):  # interleaved: the machine's drift falls on every form alike
        for rows in ROWS:
            x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
            calls = 50 if rows == 1 else 5
            for name, session in sessions.items():
                session.run(None, {"x": x})  # warm
                start = time.perf_counter()
                for _ in range(calls):
                    session.run(None, {"x": x})
                times[name][rows].append((time.perf_counter() - start) / calls * 1e3)
    fp32 = {m: statistics.median(times["fp32"][m]) for m in ROWS}
    report = {}
    for name, by_rows in times.items():
        ms = {m: statistics.median(v) for m, v in by_rows.items()}
        report[name] = {
            "bytes": Path(forms[name]).stat().st_size,
            "decode_ms (M=1)": round(ms[1], 3),
            "prompt_ms (M=256)": round(ms[256], 3),
            "decode_speedup_vs_fp32": round(fp32[1] / ms[1], 2),
            "prompt_speedup_vs_fp32": round(fp32[256] / ms[256], 2),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1024, help="input width (hidden size)")
    parser.add_argument("--n", type=int, default=2816, help="output width (MLP width)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        fp32_graph(args.k, args.n, root / "fp32.onnx")
        forms = quantized_forms(root / "fp32.onnx", root)
        report = time_forms(forms, args.k, args.threads, args.runs)
    print(
        json.dumps(
            {
                "matmuls": MATMULS,
                "k": args.k,
                "n": args.n,
                "threads": args.threads,
                "forms": report,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
