"""CPU speed and size of fp32, int8 and int4 model dirs of one model, through the runtime.

Each run prefills CONTEXT tokens, then decodes DECODE tokens greedily, for every precision in turn
(the order rotates between runs, so drift of a shared VM's speed hits all alike). Printed as JSON:
medians over runs of prefill and decode tokens/s, the median of each run's ratio to fp32, and the
size of each dir's graphs. The aims on a CPU: int8 decode >= 2x fp32, int4 >= 2.5x, prefill no
slower than fp32.

    python bench/bench_quantize.py                       # builds the `small` preset under .bench/
    python bench/bench_quantize.py --fp32 DIR --int8 DIR --int4 DIR --threads 2 --context 512

Without dirs it makes what is missing under --work: a random-weight checkpoint of --preset, its
fp32 export, synthetic calibration pictures, and `llava-edge quantize` int8 and int4 copies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

COMPARED = ("fp32", "int8", "int4")  # the model dirs measured side by side
# How each quantized dir is made from fp32: quantize_model's options (`quantize --precision P
# [--block-size B] [--prefill int8]`).
QUANTIZED = {
    "int8": {"precision": "int8"},
    "int4": {"precision": "int4"},
    "int4_b128": {"precision": "int4", "block_size": 128},
    "int4_b128_prefill_int8": {"precision": "int4", "block_size": 128, "prefill": "int8"},
    "int8_kv_int8": {"precision": "int8", "kv_cache": "int8"},
    "int4_b128_prefill_int8_kv_int8": {
        "precision": "int4",
        "block_size": 128,
        "prefill": "int8",
        "kv_cache": "int8",
    },
}


def build(work: Path, preset: str, names: tuple[str, ...] = COMPARED) -> dict[str, Path]:
    """The model dirs `names` (fp32 and keys of QUANTIZED), made under `work` where missing
    (reused when present)."""
    from llava_edge.calib.quantize import quantize_model
    from llava_edge.errors import LlavaEdgeError
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.training.checkpoint import init_checkpoint
    from llava_edge.training.synth import synthesize

    def log(*parts: object) -> None:  # stdout holds only the JSON result
        print(*parts, file=sys.stderr)

    dirs = {p: work / p for p in ("fp32", *names)}
    stamp = work / "preset"  # the dirs are reused: they must be of the preset asked for
    if (dirs["fp32"] / "manifest.json").exists() and stamp.is_file():
        made = stamp.read_text().strip()
        if made != preset:
            raise LlavaEdgeError(
                f"{work} holds the {made!r} preset's dirs, not {preset!r}'s: pass another "
                f"--work, or remove {work}"
            )
    if not (dirs["fp32"] / "manifest.json").exists():
        checkpoint = init_checkpoint(work / "checkpoint", preset=preset, force=True)
        stamp.write_text(preset)
        export_checkpoint(checkpoint, dirs["fp32"], verify=False, force=True, log=log)
    data = work / "data"
    if not (data / "train.json").exists():
        synthesize(data, train=8, test=0)
    for name in names:
        if name != "fp32" and not (dirs[name] / "manifest.json").exists():
            quantize_model(
                dirs["fp32"],
                dirs[name],
                calib=data / "train.json",
                samples=8,
                force=True,
                log=log,
                **QUANTIZED[name],
            )
    return {name: dirs[name] for name in names}


def measure(
    backend, table: np.ndarray, context: int, decode: int, seed: int
) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for one prompt of `context` tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, min(table.shape[0], 2000), size=(1, context))
    embeds = np.asarray(table[ids.reshape(-1)]).reshape(1, context, -1)
    cache = backend.new_cache(1)
    start = time.perf_counter()
    logits = backend.decode(embeds, np.ones_like(ids), np.arange(context)[None], cache)
    prefill = context / (time.perf_counter() - start)
    ones = np.ones((1, 1), dtype=np.int64)
    steps = []
    for step in range(decode):
        start = time.perf_counter()
        token = int(np.argmax(logits[0]))
        step_embeds = np.asarray(table[[token]]).reshape(1, 1, -1)
        position = np.asarray([[context + step]], dtype=np.int64)
        logits = backend.decode(step_embeds, ones, position, cache)
        steps.append(time.perf_counter() - start)
    return prefill, 1 / statistics.median(steps), decode / sum(steps)


def graph_bytes(model_dir: Path) -> dict[str, int]:
    from llava_edge import files
    from llava_edge.manifest import Manifest

    manifest = Manifest.load(model_dir)

    def size(name: str) -> int:
        return files.graph_bytes(model_dir / name)

    return {
        "graphs": sum(size(g.file) for g in manifest.graphs.values()),
        "decoder": size(manifest.graphs["decoder"].file),
        "tensorrt_graphs": sum(size(g.tensorrt_file or g.file) for g in manifest.graphs.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path)
    parser.add_argument("--int8", type=Path)
    parser.add_argument("--int4", type=Path)
    parser.add_argument("--work", type=Path, default=Path(".bench/quantize"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded per run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from _entry import given_dirs  # bench/ is on the path of a script run from it

    from llava_edge.runtime import Pipeline

    dirs = given_dirs(parser, args, COMPARED) or build(args.work, args.preset)
    pipes = {p: Pipeline.load(dirs[p], threads=args.threads) for p in COMPARED}
    load_before = os.getloadavg()[0]
    for p in COMPARED:  # warm up: first calls allocate and pre-pack weights
        measure(pipes[p].backend, pipes[p].table, min(args.context, 64), 2, seed=0)
    runs: dict[str, dict[str, list[float]]] = {
        p: {"prefill": [], "decode": [], "decode_wall": []} for p in COMPARED
    }
    for run in range(args.runs):
        order = COMPARED[run % 3 :] + COMPARED[: run % 3]
        for p in order:
            prefill, decode, wall = measure(
                pipes[p].backend, pipes[p].table, args.context, args.decode, seed=run
            )
            runs[p]["prefill"].append(prefill)
            runs[p]["decode"].append(decode)
            runs[p]["decode_wall"].append(wall)
    sizes = {p: graph_bytes(dirs[p]) for p in COMPARED}
    result = {
        "bench": "quantize",
        "machine": f"{platform.machine()}, {args.threads} onnxruntime threads",
        # other jobs on the machine skew the ratios: say how busy it was
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "context": args.context,
        "decode_tokens": args.decode,
        "runs": args.runs,
        "dirs": {p: str(dirs[p]) for p in COMPARED},
        "decode_tokens_per_s": {
            p: round(statistics.median(runs[p]["decode"]), 2) for p in COMPARED
        },
        "decode_wall_tokens_per_s": {
            p: round(statistics.median(runs[p]["decode_wall"]), 2) for p in COMPARED
        },
        "prefill_tokens_per_s": {
            p: round(statistics.median(runs[p]["prefill"]), 1) for p in COMPARED
        },
        "decode_speedup": {},
        "decode_wall_speedup": {},
        "prefill_speedup": {},
        "graph_bytes": {p: sizes[p]["graphs"] for p in COMPARED},
        "size_ratio": {},
        "decoder_size_ratio": {},
        "tensorrt_size_ratio": {},
    }
    for p in ("int8", "int4"):
        for kind in ("decode", "decode_wall", "prefill"):
            per_run = [q / f for q, f in zip(runs[p][kind], runs["fp32"][kind], strict=True)]
            result[f"{kind}_speedup"][p] = round(statistics.median(per_run), 2)
        result["size_ratio"][p] = round(sizes["fp32"]["graphs"] / sizes[p]["graphs"], 2)
        result["decoder_size_ratio"][p] = round(sizes["fp32"]["decoder"] / sizes[p]["decoder"], 2)
        result["tensorrt_size_ratio"][p] = round(
            sizes["fp32"]["graphs"] / sizes[p]["tensorrt_graphs"], 2
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
