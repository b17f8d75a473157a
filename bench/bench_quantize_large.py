"""Time and peak memory of `llava-edge quantize` at each precision on LLaVA-1.5-7B's shapes,
printed as JSON.

    .venv/bin/python bench/bench_quantize_large.py [--work DIR] [--layers 2] [--keep]

Makes `init --preset llava-1.5-7b --layers N` (N=2: a decoder of 2.1 GB, over protobuf's 2 GiB,
so in external data), exports it, then for fp16, int8 and int4 runs `llava-edge quantize` (which
loads its result and answers one question before installing it) and then `llava-edge run` on the
result (load and answer in a fresh process). Each command runs in its own process and reports its
wall time and that process's peak resident memory (wait4's rusage, exact per child), plus the
size of the dir it wrote. One run each: the steps take minutes and the numbers are for sizing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from bench_export import CLI, timed  # bench/ is on the path of a script run from it

TARGETS = ("fp16", "int8", "int4")


def dir_gib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llava-edge-bench-quantize-large"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--only", choices=TARGETS, action="append", help="run only these")
    parser.add_argument("--verify-export", action="store_true", help="export with verification")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and model dirs")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, fp32, data = work / "checkpoint", work / "fp32", work / "data"
    report: dict = {
        "machine": {
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_average_before": [round(x, 2) for x in os.getloadavg()],  # shared machine
        },
        "model": f"llava-1.5-7b --layers {args.layers}",
    }
    steps: dict = {}
    init = [*CLI, "init", str(checkpoint), "--preset", "llava-1.5-7b"]
    steps["init"] = timed([*init, "--layers", str(args.layers), "--seed", "0", "--force"])
    export = [*CLI, "export", str(checkpoint), str(fp32), "--force"]
    steps["export"] = timed(export if args.verify_export else [*export, "--no-verify"])
    steps["data"] = timed([*CLI, "data", "synth", str(data), "--train", "8", "--test", "0"])
    report["fp32_dir_gib"] = dir_gib(fp32) if fp32.exists() else None
    report["precisions"] = {}
    image = next(iter(sorted((data / "images").glob("*.png"))), None) if data.exists() else None
    for precision in args.only or TARGETS:
        out = work / precision
        quantize = [*CLI, "quantize", str(fp32), str(out), "--precision", precision, "--force"]
        if precision != "fp16":
            quantize += ["--calib", str(data / "train.json"), "--samples", "8"]
        entry: dict = {"quantize": timed(quantize)}
        if entry["quantize"]["exit_code"] == 0:
            entry["dir_gib"] = dir_gib(out)
            run = [*CLI, "run", str(out), "--image", str(image), "--prompt", "What is shown?"]
            entry["load_and_answer"] = timed([*run, "--max-new-tokens", "4", "--json"])
            try:
                answer = json.loads(entry["load_and_answer"]["stdout"])
                entry["load_and_answer"]["answer_tokens"] = len(answer["token_ids"])
                entry["load_and_answer"]["timings"] = answer.get("timings")
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        report["precisions"][precision] = entry
    for entry in [*steps.values(), *(e for p in report["precisions"].values() for e in p.values())]:
        if isinstance(entry, dict):
            entry.pop("stdout", None)
    report["steps"] = steps
    if not args.keep:
        for path in (checkpoint, fp32, data):
            shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
