"""Time to first token with one image and a 32-token question, split into its stages, as JSON.

    .venv/bin/python bench/bench_ttft.py [--runs 7] [--threads 2]
    .venv/bin/python bench/bench_ttft.py --fp32 DIR --int8 DIR --int4 DIR --int4-b128 DIR

For each precision's model dir (bench_quantize.py's `small` dirs by default; int4 twice, in blocks
of 32, the default, and of 128, `quantize --block-size 128`) and each graph form
(`standard`: the TorchScript graphs, as before the fused forms existed; `fused`: onnxruntime's
fused CLIP and decoder forms), one request is timed stage by stage: preprocessing, the vision
encoder, the projector, the prompt's prefill (image features put in place, one decoder call) and
picking the first token. Forms and precisions take turns within each run so a shared machine's
drift hits all alike; medians over runs, and each precision's fused/standard TTFT ratio from the
same runs (and int4 in blocks of 128 fused against the default int4's standard graphs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import build as build_model_dirs  # noqa: E402

PRECISIONS = ("fp32", "int8", "int4", "int4_b128")  # int4_b128: `quantize --block-size 128`
FORMS = ("standard", "fused")
STAGES = ("preprocess_ms", "vision_ms", "projector_ms", "prefill_ms", "first_token_ms")


def time_request(pipe, image: np.ndarray, ids: list[int]) -> dict[str, float]:
    """One request's stages, in ms, through the pipeline's own pieces."""
    from llava_edge.runtime.generate import embed
    from llava_edge.runtime.image import load_image, preprocess

    backend, manifest = pipe.backend, pipe.manifest
    marks = [time.perf_counter()]
    pixels = preprocess(load_image(image), manifest.image)[None]
    pixels = pixels.astype(manifest.graphs["vision_encoder"].inputs["pixel_values"].dtype)
    marks.append(time.perf_counter())
    (features,) = backend.sessions["vision_encoder"].run(None, {"pixel_values": pixels})
    marks.append(time.perf_counter())
    (image_embeds,) = backend.sessions["projector"].run(None, {"image_features": features})
    marks.append(time.perf_counter())
    batch = np.asarray([ids], dtype=np.int64)
    embeds = embed(pipe.table, batch, manifest.tokens.image_token_id, [image_embeds[0]])
    cache = backend.new_cache(1)
    positions = np.arange(batch.shape[1])[None]
    logits = backend.decode(embeds, np.ones_like(batch), positions, cache)
    marks.append(time.perf_counter())
    int(np.argmax(logits[0]))
    marks.append(time.perf_counter())
    stages = {k: (b - a) * 1000 for k, a, b in zip(STAGES, marks[:-1], marks[1:], strict=True)}
    stages["ttft_ms"] = (marks[-1] - marks[0]) * 1000
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path)
    parser.add_argument("--int8", type=Path)
    parser.add_argument("--int4", type=Path)
    parser.add_argument("--int4-b128", type=Path, help="an int4 dir quantized with block 128")
    parser.add_argument("--work", type=Path, default=Path(".bench/quantize"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="which dirs to time")
    args = parser.parse_args()
    precisions = [p for p in PRECISIONS if p in args.precisions.split(",")]

    from llava_edge.runtime import Pipeline
    from llava_edge.runtime.bench import bench_image, question

    given = {p: getattr(args, p) for p in precisions}
    dirs = given if all(given.values()) else build_model_dirs(args.work, args.preset, precisions)
    pipes = {
        (p, f): Pipeline.load(dirs[p], threads=args.threads, graph_form=f)
        for p in precisions
        for f in FORMS
    }
    first = pipes[(precisions[0], "standard")]
    text = question(first.codec, args.question_tokens)
    image = bench_image()
    ids = first.prompt_ids(text, first.image_pixels(image))  # AnyRes: the image's own count
    for pipe in pipes.values():  # warm-up: first calls allocate and pre-pack
        time_request(pipe, image, ids)
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, str], list[dict[str, float]]] = {k: [] for k in pipes}
    keys = list(pipes)
    for run in range(args.runs):
        shift = run % len(keys)
        for key in keys[shift:] + keys[:shift]:
            runs[key].append(time_request(pipes[key], image, ids))
    result = {
        "bench": "ttft",
        "threads": args.threads,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "prompt_tokens": len(ids),
        "image_tokens": first.manifest.num_image_tokens,
        "runs": args.runs,
        "medians_ms": {
            f"{p}.{f}": {
                k: round(statistics.median(r[k] for r in runs[(p, f)]), 1)
                for k in (*STAGES, "ttft_ms")
            }
            for p, f in keys
        },
        "ttft_speedup_fused_vs_standard": {
            p: round(
                statistics.median(
                    s["ttft_ms"] / f["ttft_ms"]
                    for s, f in zip(runs[(p, "standard")], runs[(p, "fused")], strict=True)
                ),
                3,
            )
            for p in precisions
        },
    }
    if {"int4", "int4_b128"} <= set(precisions):  # blocks of 128 against the default int4's graphs
        result["ttft_speedup_int4_b128_fused_vs_int4_standard"] = round(
            statistics.median(
                s["ttft_ms"] / f["ttft_ms"]
                for s, f in zip(
                    runs[("int4", "standard")], runs[("int4_b128", "fused")], strict=True
                )
            ),
            3,
        )
    for pipe in pipes.values():
        pipe.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
