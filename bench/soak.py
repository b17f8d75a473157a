"""Soak test: thousands of generations in one process; memory and open files over time, as JSON.

    .venv/bin/python bench/soak.py [--model DIR] [--generations 2000] [--every 100]

Without --model it builds the tiny demo model in a temporary dir. Requests vary (new images,
repeated images, chats, batches, streams, sampled and greedy answers, and a bad request every
so often) as a robot's would. After warm-up (the first 10% of generations), resident memory
must grow by under 10% and the count of open files must not grow at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Pipeline
from llava_edge.runtime.bench import rss_bytes


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def request(pipe: Pipeline, i: int, rng: np.random.Generator) -> None:
    """One of several kinds of request, chosen by the generation's number."""
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    kind = i % 6
    if kind == 0:
        pipe.generate(frame, "What is in front of the robot?", max_new_tokens=16)
    elif kind == 1:
        pipe.generate(
            frame, "Is the path clear?", max_new_tokens=16, temperature=0.8, top_p=0.9, seed=i
        )
    elif kind == 2:
        "".join(pipe.stream(frame, "Describe the scene.", max_new_tokens=16))
    elif kind == 3:
        chat = pipe.chat(frame, max_new_tokens=8)
        chat.ask("What colour is it?")
        chat.ask("And its shape?")
    elif kind == 4:
        pipe.generate_batch(
            [(frame, "Left?"), (frame[::-1].copy(), "Right side?")], max_new_tokens=8
        )
    else:
        with contextlib.suppress(LlavaEdgeError):  # a bad request must leave nothing behind
            pipe.generate(None, "<image> with no image", max_new_tokens=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--generations", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    if not 1 <= args.every <= args.generations:  # no sample, no report
        parser.error(f"--every must be 1 to --generations ({args.generations}), got {args.every}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny(Path(tmp))
        samples = []
        rng = np.random.default_rng(0)
        with Pipeline.load(model, threads=2) as pipe:
            for i in range(args.generations):
                request(pipe, i, rng)
                if (i + 1) % args.every == 0:
                    samples.append(
                        {
                            "generations": i + 1,
                            "rss_mb": round(rss_bytes() / 2**20, 1),
                            "open_files": open_files(),
                        }
                    )
    warm = next(s for s in samples if s["generations"] >= args.generations // 10)
    last = samples[-1]
    report = {
        "generations": args.generations,
        "samples": samples,
        "rss_growth_after_warmup": round(last["rss_mb"] / warm["rss_mb"] - 1, 4),
        "open_files_growth_after_warmup": last["open_files"] - warm["open_files"],
    }
    report["passed"] = (
        report["rss_growth_after_warmup"] < 0.10 and report["open_files_growth_after_warmup"] <= 0
    )
    print(json.dumps(report, indent=2))


def build_tiny(work: Path) -> Path:
    cli = [sys.executable, "-m", "llava_edge.cli"]
    subprocess.run(
        [*cli, "init", str(work / "ckpt"), "--preset", "tiny"], check=True, capture_output=True
    )
    subprocess.run(
        [*cli, "export", str(work / "ckpt"), str(work / "model"), "--no-verify"],
        check=True,
        capture_output=True,
    )
    return work / "model"


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
