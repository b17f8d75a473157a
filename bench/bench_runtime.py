"""Runtime speed on the `small` preset against transformers, printed as JSON.

    .venv/bin/python bench/bench_runtime.py [--work DIR] [--runs 5] [--threads 2]

Builds (once, cached in --work) a `small` checkpoint and its fp32 export, then measures in one
run: a robot's typical request (one image, 32-token question, 128 new tokens, batch 1) through
llava-edge and through transformers' generate() with the same threads; decode tokens/s with
1,500 tokens of context against 100; and the decode loop's effective weight-read bandwidth next
to the machine's streaming read bandwidth (a multi-threaded sum over 1 GB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _entry import positive  # bench/ is on the path of a script run from it

from llava_edge.export.baseline import TransformersRunner
from llava_edge.runtime import bench

TARGETS = {"decode_speedup": 1.5, "ttft_speedup": 1.2, "long_context_ratio": 0.75}


def prepare(work: Path) -> tuple[Path, Path]:
    checkpoint, model = work / "small-checkpoint", work / "small-model"
    cli = [sys.executable, "-m", "llava_edge.cli"]
    # their reports go to stderr: stdout holds only the JSON result
    if not (checkpoint / "config.json").exists():
        init = [*cli, "init", str(checkpoint), "--preset", "small", "--force"]
        subprocess.run(init, check=True, stdout=sys.stderr)
    if not (model / "manifest.json").exists():
        export = [*cli, "export", str(checkpoint), str(model), "--force"]
        subprocess.run(export, check=True, stdout=sys.stderr)
    return checkpoint, model


def long_context(model: Path, threads: int, pairs: int) -> tuple[float, float, float]:
    """Decode tokens/s after 100 and after 1,500 tokens of (text) context, and their ratio.

    One pipeline answers the two prompts in turn, `pairs` times; the ratio is the median of each
    adjacent pair's, so the VM's drifting speed cancels out of it.
    """
    from llava_edge.runtime import Pipeline

    with Pipeline.load(model, threads=threads) as pipe:
        prompts = {n: bench.question(pipe.codec, n) for n in (100, 1500)}
        rates: dict[int, list[float]] = {100: [], 1500: []}
        for _ in range(pairs + 1):  # the first pair warms up
            for n, prompt in prompts.items():
                answer = pipe.answer(None, prompt, max_new_tokens=64, ignore_eos=True)
                rates[n].append(answer.timings["decode_tokens_per_s"])
    short, long = rates[100][1:], rates[1500][1:]
    ratio = statistics.median(b / a for a, b in zip(short, long, strict=True))
    return round(statistics.median(short), 2), round(statistics.median(long), 2), round(ratio, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llava-edge-bench"))
    parser.add_argument("--runs", type=positive, default=5)
    parser.add_argument("--threads", type=positive, default=2)
    args = parser.parse_args()
    checkpoint, model = prepare(args.work)

    workload = bench.Workload(
        question_tokens=32, new_tokens=128, threads=args.threads, runs=args.runs
    )
    _, prompt = bench.bench_prompt(model, workload)
    runners = [
        bench.PipelineRunner(model, workload),
        TransformersRunner(checkpoint, workload, prompt),
    ]
    results = bench.measure(runners, args.runs)
    ours, theirs = results["llava_edge"], results["transformers"]
    for runner in runners:
        runner.close()

    short_tps, long_tps, long_ratio = long_context(model, args.threads, pairs=2 * args.runs + 1)
    weight_bytes = bench.decoder_weight_bytes(model)
    ratios = bench.compare(ours, theirs)
    report = {
        "workload": vars(workload),
        "machine": bench.machine(),
        "llava_edge": ours,
        "transformers": theirs,
        "ratios": ratios,
        "decode_tokens_per_s_context_100": short_tps,
        "decode_tokens_per_s_context_1500": long_tps,
        "long_context_ratio": long_ratio,
        "decoder_weight_bytes": weight_bytes,
        "effective_weight_bandwidth_gb_s": round(
            weight_bytes * ours["decode_tokens_per_s"] / 1e9, 2
        ),
        "machine_read_bandwidth_gb_s": bench.read_bandwidth_gb_s(args.threads),
    }
    values = {**ratios, "long_context_ratio": report["long_context_ratio"]}
    report["targets_met"] = {k: values.get(k, 0) >= v for k, v in TARGETS.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
