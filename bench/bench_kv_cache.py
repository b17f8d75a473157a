"""What an int8 KV cache (`quantize --kv-cache int8`) does to prefill and decode, by depth, as JSON.

    .venv/bin/python bench/bench_kv_cache.py [--depths 256 512 1024 1900] [--runs 3]

Pairs of dirs that differ only in their KV cache (built under --work by bench_quantize.py's
builder, as bench_peers.py builds them): int8, and int4 in blocks of 128 with `--prefill int8`,
each with and without `--kv-cache int8`. At each depth every dir prefills that many tokens from
an empty cache, then decodes 32 tokens after them; runs are interleaved, the order rotating.
Printed: medians of prefill and decode tokens/s, the median per-run ratio of each int8-cache dir
to its pair, and the cache's bytes a token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import positive  # noqa: E402
from bench_quantize import build as build_model_dirs  # noqa: E402
from bench_quantize import measure  # noqa: E402

from llava_edge.errors import LlavaEdgeError  # noqa: E402
from llava_edge.runtime import bench  # noqa: E402

PAIRS = {  # a dir with an fp32 cache -> the same with an int8 one
    "int8": "int8_kv_int8",
    "int4_b128_prefill_int8": "int4_b128_prefill_int8_kv_int8",
}
DECODE = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(".bench/quantize"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--depths", type=positive, nargs="+", default=[256, 512, 1024, 1900])
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--runs", type=positive, default=3)
    args = parser.parse_args()

    from llava_edge.runtime import Pipeline

    names = [n for pair in PAIRS.items() for n in pair]
    dirs = build_model_dirs(args.work, args.preset, tuple(names))
    pipes = {n: Pipeline.load(dirs[n], threads=args.threads) for n in names}
    longest = min(p.manifest.text.max_context for p in pipes.values()) - DECODE
    deep = [d for d in args.depths if d > longest]
    if deep:
        for pipe in pipes.values():
            pipe.close()
        raise LlavaEdgeError(
            f"--depths {' '.join(map(str, deep))}: past the deepest the dirs' context holds "
            f"with {DECODE} tokens decoded after, {longest}; ask for depths up to {longest}"
        )
    depths = args.depths
    for pipe in pipes.values():  # warm-up: first calls allocate and pre-pack weights
        measure(pipe.backend, pipe.table, 64, 2, seed=0)
    load_before = os.getloadavg()[0]
    rates = {(n, d): {"prefill": [], "decode": []} for n in names for d in depths}
    for run in range(args.runs):
        order = names[run % len(names) :] + names[: run % len(names)]
        for depth in depths:
            for name in order:
                prefill, decode, _ = measure(
                    pipes[name].backend, pipes[name].table, depth, DECODE, seed=run
                )
                rates[name, depth]["prefill"].append(prefill)
                rates[name, depth]["decode"].append(decode)

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    result = {
        "bench": "kv_cache",
        "machine": bench.machine(),
        "threads": args.threads,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "runs": args.runs,
        "decode_tokens": DECODE,
        "kv_bytes_per_token": {},
        "by_depth": {},
    }
    for name, pipe in pipes.items():
        text = pipe.backend.kv_text
        per_token = 2 * text.num_layers * text.num_kv_heads * text.head_dim
        result["kv_bytes_per_token"][name] = per_token * np.dtype(text.dtype).itemsize
    for depth in depths:
        row: dict[str, dict] = {}
        for name in names:
            row[name] = {k: median(v) for k, v in rates[name, depth].items()}
        for fp32_cache, int8_cache in PAIRS.items():
            for kind in ("prefill", "decode"):
                ours, theirs = rates[int8_cache, depth][kind], rates[fp32_cache, depth][kind]
                per_run = [a / b for a, b in zip(ours, theirs, strict=True)]
                row[f"{kind}.{int8_cache}_vs_{fp32_cache}"] = round(statistics.median(per_run), 3)
        result["by_depth"][str(depth)] = row
    for pipe in pipes.values():
        pipe.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
