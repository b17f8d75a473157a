"""Load time of a model dir (first and later loads) against transformers' load of its checkpoint.

    .venv/bin/python bench/bench_load.py [--runs 5] [--threads 2]
    .venv/bin/python bench/bench_load.py --model DIR --checkpoint CHECKPOINT_DIR

Every load runs in a fresh Python process (imports done before the clock starts), the two sides
taking turns, so each pays what a robot app's start pays and the OS file cache is warm for both.
llava-edge: `Pipeline.load` (manifest, file checks, sessions, tokenizer, embedding table) with an
empty optimized-graph cache (the first load on a machine, which writes it; timed once), then
with it, and with the cache off (LLAVA_EDGE_SESSION_CACHE=0: what the cache saves);
transformers: `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`.
Medians over runs, printed as JSON with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

OURS = """
import sys, time
from llava_edge.runtime import Pipeline
start = time.perf_counter()
pipe = Pipeline.load(sys.argv[1], threads=int(sys.argv[2]))
print(time.perf_counter() - start)
print(",".join(sorted(set(pipe.backend.cache_status.values()))))
"""
THEIRS = """
import sys, time, torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
torch.set_num_threads(int(sys.argv[2]))
start = time.perf_counter()
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32)
processor = AutoProcessor.from_pretrained(sys.argv[1])
print(time.perf_counter() - start)
"""


def timed(script: str, target: Path, threads: int, env: dict[str, str]) -> tuple[float, str]:
    done = subprocess.run(
        [sys.executable, "-c", script, str(target), str(threads)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    lines = done.stdout.strip().splitlines()
    return float(lines[0]), (lines[1] if len(lines) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--work", type=Path, default=Path(".bench/quantize"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.model and args.checkpoint:
        model, checkpoint = args.model, args.checkpoint
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_quantize import build

        model, checkpoint = build(args.work, args.preset)["fp32"], args.work / "checkpoint"

    load_before = os.getloadavg()[0]
    later, uncached, theirs = [], [], []
    with tempfile.TemporaryDirectory(prefix="llava-edge-load-") as scratch:
        env = {**os.environ, "LLAVA_EDGE_CACHE": scratch}
        first, status = timed(OURS, model, args.threads, env)
        assert status == "miss", status  # an empty cache: the first load on a machine
        for run in range(args.runs):
            for side in ("ours", "uncached", "theirs")[:: 1 if run % 2 else -1]:
                if side == "ours":
                    seconds, status = timed(OURS, model, args.threads, env)
                    assert status == "hit", status
                    later.append(seconds)
                elif side == "uncached":
                    off = {**env, "LLAVA_EDGE_SESSION_CACHE": "0"}
                    seconds, status = timed(OURS, model, args.threads, off)
                    assert status == "none", status
                    uncached.append(seconds)
                else:
                    theirs.append(timed(THEIRS, checkpoint, args.threads, dict(os.environ))[0])
    ratio = statistics.median(t / o for t, o in zip(theirs, later, strict=True))
    print(
        json.dumps(
            {
                "bench": "load",
                "model_dir": str(model),
                "threads": args.threads,
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "runs": args.runs,
                "llava_edge_first_load_s": round(first, 3),  # once: it writes the cache
                "llava_edge_second_load_s": round(statistics.median(later), 3),
                "llava_edge_uncached_load_s": round(statistics.median(uncached), 3),
                "transformers_load_s": round(statistics.median(theirs), 3),
                "second_load_speedup_vs_transformers": round(ratio, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
