"""Time to first token with one image and a 32-token question, split into its stages, as JSON.

    .venv/bin/python bench/bench_ttft.py [--runs 7] [--threads 2]
    .venv/bin/python bench/bench_ttft.py --fp32 DIR --int8 DIR --int4 DIR --int4-b128 DIR \
        --int4-b128-prefill-int8 DIR

For each precision's model dir (bench_quantize.py's `small` dirs by default; int4 three times: in
blocks of 32, the default; of 128, `quantize --block-size 128`; and that with `--prefill int8`)
and each graph form (`standard`: the TorchScript graphs, as before the fused forms existed;
`fused`: onnxruntime's fused CLIP and decoder forms), one request is timed stage by stage:
preprocessing, the vision encoder, the projector, the prompt's prefill (image features put in
place, one decoder call) and picking the first token. A precision's two forms are loaded together
and take turns within each run, so a shared machine's drift hits both alike (the other dirs stay
unloaded: with every form in memory at once, timings moved by 10-15% with where they sat in it);
medians over runs, and each precision's fused/standard TTFT ratio from the same runs (and, timed
the same way, the int4 variants' fused forms against the default int4's standard graphs).
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
from _entry import given_dirs, positive  # noqa: E402
from bench_quantize import build as build_model_dirs  # noqa: E402

# int4_b128: `quantize --block-size 128`; int4_b128_prefill_int8: that with `--prefill int8`
PRECISIONS = ("fp32", "int8", "int4", "int4_b128", "int4_b128_prefill_int8")
INT4_VARIANTS = ("int4_b128", "int4_b128_prefill_int8")
FORMS = ("standard", "fused")
STAGES = ("preprocess_ms", "vision_ms", "projector_ms", "prefill_ms", "first_token_ms")


def time_request(pipe, image: np.ndarray, ids: list[int]) -> dict[str, float]:
    """One request's stages, in ms, through the pipeline's own pieces."""
    from llava_edge.runtime.anyres import image_embeds
    from llava_edge.runtime.generate import embed

    backend, manifest = pipe.backend, pipe.manifest
    marks = [time.perf_counter()]
    loaded = pipe.image_pixels(image)  # AnyRes: the base image and its tiles
    pixels = loaded.pixels.astype(manifest.graphs["vision_encoder"].inputs["pixel_values"].dtype)
    marks.append(time.perf_counter())
    (features,) = backend.sessions["vision_encoder"].run(None, {"pixel_values": pixels})
    marks.append(time.perf_counter())
    (projected,) = backend.sessions["projector"].run(None, {"image_features": features})
    placed = image_embeds(projected, loaded.size, manifest.image, pipe.newline)
    marks.append(time.perf_counter())
    batch = np.asarray([ids], dtype=np.int64)
    embeds = embed(pipe.table, batch, manifest.tokens.image_token_id, [placed])
    cache = backend.new_cache(1)
    positions = np.arange(batch.shape[1])[None]
    logits = backend.decode(embeds, np.ones_like(batch), positions, cache)
    marks.append(time.perf_counter())
    int(np.argmax(logits[0]))
    marks.append(time.perf_counter())
    stages = {k: (b - a) * 1000 for k, a, b in zip(STAGES, marks[:-1], marks[1:], strict=True)}
    stages["ttft_ms"] = (marks[-1] - marks[0]) * 1000
    return stages


def chosen_precisions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """--precisions, in PRECISIONS' order; without it, those given a dir (all where none is)."""
    given = [p for p in PRECISIONS if getattr(args, p) is not None]
    named = args.precisions.split(",") if args.precisions else given or list(PRECISIONS)
    unknown = [p for p in named if p not in PRECISIONS]
    if unknown:
        parser.error(f"--precisions: no {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    untimed = [p for p in given if p not in named]
    if untimed:
        flags = ", ".join("--" + p.replace("_", "-") for p in untimed)
        parser.error(f"{flags} given but not in --precisions {args.precisions}")
    return [p for p in PRECISIONS if p in named]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path)
    parser.add_argument("--int8", type=Path)
    parser.add_argument("--int4", type=Path)
    parser.add_argument("--int4-b128", type=Path, help="an int4 dir quantized with block 128")
    parser.add_argument("--int4-b128-prefill-int8", type=Path, help="the same with --prefill int8")
    parser.add_argument("--work", type=Path, default=Path(".bench/quantize"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--runs", type=positive, default=7)
    parser.add_argument("--question-tokens", type=positive, default=32)
    parser.add_argument(
        "--precisions", help="which dirs to time, comma-separated (default: those given, or all)"
    )
    args = parser.parse_args()
    precisions = chosen_precisions(parser, args)

    from llava_edge.runtime import Pipeline
    from llava_edge.runtime.bench import bench_image, question

    dirs = given_dirs(parser, args, precisions) or build_model_dirs(
        args.work, args.preset, precisions
    )
    with Pipeline.load(dirs[precisions[0]], threads=args.threads) as first:
        text = question(first.codec, args.question_tokens)
        image = bench_image()
        ids = first.prompt_ids(text, first.image_pixels(image))  # AnyRes: the image's own count
        image_tokens = first.manifest.num_image_tokens

    def group(keys: list[tuple[str, str]]) -> dict[tuple[str, str], list[dict[str, float]]]:
        """`keys` (dir, form) loaded together and timed in turns; the rest stay unloaded, so a
        form's speed does not depend on how many others share the machine's memory."""
        pipes = {
            (p, f): Pipeline.load(dirs[p], threads=args.threads, graph_form=f) for p, f in keys
        }
        for pipe in pipes.values():  # warm-up: first calls allocate and pre-pack
            time_request(pipe, image, ids)
        timed: dict[tuple[str, str], list[dict[str, float]]] = {k: [] for k in keys}
        for run in range(args.runs):
            shift = run % len(keys)
            for key in keys[shift:] + keys[:shift]:
                timed[key].append(time_request(pipes[key], image, ids))
        for pipe in pipes.values():
            pipe.close()
        return timed

    load_before = os.getloadavg()[0]
    runs = {}
    for p in precisions:
        runs.update(group([(p, f) for f in FORMS]))
    keys = [(p, f) for p in precisions for f in FORMS]
    result = {
        "bench": "ttft",
        "threads": args.threads,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "prompt_tokens": len(ids),
        "image_tokens": image_tokens,
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
    variants = [v for v in INT4_VARIANTS if v in precisions]
    if "int4" in precisions and variants:  # against the default int4's standard graphs
        today = ("int4", "standard")
        timed = group([today] + [(v, "fused") for v in variants])
        result["ttft_speedup_vs_int4_standard"] = {
            v: round(
                statistics.median(
                    s["ttft_ms"] / f["ttft_ms"]
                    for s, f in zip(timed[today], timed[(v, "fused")], strict=True)
                ),
                3,
            )
            for v in variants
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
