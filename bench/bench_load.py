"""Load time of a model dir (first and later loads) against transformers' load of its checkpoint.

    .venv/bin/python bench/bench_load.py [--runs 5] [--threads 2]
    .venv/bin/python bench/bench_load.py --model DIR --checkpoint CHECKPOINT_DIR

Every load runs in a fresh Python process (imports done before the clock starts), the sides
taking turns, so each pays what a robot app's start pays and the OS file cache is warm for both.
llava-edge: `Pipeline.load` (manifest, file checks, sessions, tokenizer, embedding table) with an
empty optimized-graph cache (the first load on a machine, which writes it; timed once), then
with it, with it and `background=True` (load returns while the graphs open; the answer waits
for the decoder), and with the cache off (LLAVA_EDGE_SESSION_CACHE=0: what the cache saves);
transformers: `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`.
Each process then answers one question about a picture (one new token): "ready" is the time from
the start of the load to that first answer, which counts what a lazy load defers (transformers
memory-maps the safetensors and reads a weight when a forward first touches it).
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

from _entry import given_dirs, positive  # bench/ is on the path of a script run from it

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest

PICTURE = """
import numpy as np
from PIL import Image
picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), np.uint8))
"""
OURS = (
    PICTURE
    + """
import sys, time
from llava_edge.runtime import Pipeline
start = time.perf_counter()
pipe = Pipeline.load(sys.argv[1], threads=int(sys.argv[2]), background=sys.argv[3] == "background")
loaded = time.perf_counter() - start
pipe.answer(picture, "What is in the picture?", max_new_tokens=1)
print(loaded, time.perf_counter() - start)
print(",".join(sorted(set(pipe.backend.cache_status.values()))))
"""
)
THEIRS = (
    PICTURE
    + """
import sys, time, torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
torch.set_num_threads(int(sys.argv[2]))
start = time.perf_counter()
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32)
processor = AutoProcessor.from_pretrained(sys.argv[1])
loaded = time.perf_counter() - start
chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
text = processor.apply_chat_template(chat, add_generation_prompt=True)
inputs = processor(images=picture, text=text, return_tensors="pt")
with torch.no_grad():
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
print(loaded, time.perf_counter() - start)
"""
)


def timed(
    script: str, target: Path, threads: int, env: dict[str, str], mode: str = "eager"
) -> tuple[tuple[float, float], str]:
    """(load seconds, ready seconds) and, for llava-edge, how the session cache was used."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(target), str(threads), mode],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode:  # its last line says why (the exception's)
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise LlavaEdgeError(f"loading {target} in a fresh process failed: {why}")
    lines = done.stdout.strip().splitlines()
    load, ready = (float(x) for x in lines[0].split())
    return (load, ready), (lines[1] if len(lines) > 1 else "")


def cache_env(cache: str) -> dict[str, str]:
    """The children's environment: the session cache in `cache` and on, whatever this shell
    says (LLAVA_EDGE_SESSION_CACHE=0 there would leave every load uncached)."""
    env = {k: v for k, v in os.environ.items() if k != "LLAVA_EDGE_SESSION_CACHE"}
    return env | {"LLAVA_EDGE_CACHE": cache}


def expect(status: str, wanted: str) -> None:
    """The session cache was used as the load being timed needs (a cache not written, short of
    disk or memory, would time uncached loads under the cached loads' names)."""
    if status != wanted:
        raise LlavaEdgeError(
            f"a load's session cache status was {status!r} where {wanted!r} was timed; the "
            "cache is written only where a tenth of the disk stays free and twice the graph "
            "fits in free memory"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--work", type=Path, default=Path(".bench/quantize"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--runs", type=positive, default=5)
    args = parser.parse_args()
    if given_dirs(parser, args, ["model", "checkpoint"]):
        from llava_edge.export.exporter import checkpoint_config
        from llava_edge.runtime.bench import check_baseline

        model, checkpoint = args.model, args.checkpoint
        Manifest.load(model)  # a missing or broken dir in one line, not in a child's traceback
        check_baseline(
            model, checkpoint_config(checkpoint), "--checkpoint"
        )  # the loads of one model
    else:
        from bench_quantize import build

        model, checkpoint = build(args.work, args.preset)["fp32"], args.work / "checkpoint"

    load_before = os.getloadavg()[0]
    later, background, uncached, theirs = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="llava-edge-load-") as scratch:
        env = cache_env(scratch)
        first, status = timed(OURS, model, args.threads, env)
        expect(status, "miss")  # an empty cache: the first load on a machine
        for run in range(args.runs):
            for side in ("ours", "background", "uncached", "theirs")[:: 1 if run % 2 else -1]:
                if side in ("ours", "background"):
                    mode = "background" if side == "background" else "eager"
                    seconds, status = timed(OURS, model, args.threads, env, mode)
                    expect(status, "hit")
                    (background if side == "background" else later).append(seconds)
                elif side == "uncached":
                    off = {**env, "LLAVA_EDGE_SESSION_CACHE": "0"}
                    seconds, status = timed(OURS, model, args.threads, off)
                    expect(status, "none")
                    uncached.append(seconds)
                else:
                    theirs.append(timed(THEIRS, checkpoint, args.threads, dict(os.environ))[0])

    def median(runs: list[tuple[float, float]], which: int) -> float:
        return round(statistics.median(r[which] for r in runs), 3)

    def speedup(which: int, ours: list[tuple[float, float]]) -> float:
        ratios = (t[which] / o[which] for t, o in zip(theirs, ours, strict=True))
        return round(statistics.median(ratios), 3)

    print(
        json.dumps(
            {
                "bench": "load",
                "model_dir": str(model),
                "threads": args.threads,
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "runs": args.runs,
                # once: it writes the session cache
                "llava_edge_first_load_s": round(first[0], 3),
                "llava_edge_first_ready_s": round(first[1], 3),
                "llava_edge_second_load_s": median(later, 0),
                "llava_edge_second_ready_s": median(later, 1),
                # load(background=True): returns while the graphs open; the answer waits for them
                "llava_edge_background_load_s": median(background, 0),
                "llava_edge_background_ready_s": median(background, 1),
                "llava_edge_uncached_load_s": median(uncached, 0),
                "llava_edge_uncached_ready_s": median(uncached, 1),
                "transformers_load_s": median(theirs, 0),
                "transformers_ready_s": median(theirs, 1),
                "second_load_speedup_vs_transformers": speedup(0, later),
                "second_ready_speedup_vs_transformers": speedup(1, later),
                "background_load_speedup_vs_transformers": speedup(0, background),
                "background_ready_speedup_vs_transformers": speedup(1, background),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
