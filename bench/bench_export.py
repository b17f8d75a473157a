"""Export time and peak memory of the big presets, printed as JSON.

    .venv/bin/python bench/bench_export.py [--work DIR] [--only small] [--keep]

For `init --preset llava-1.5-7b --layers 2` (LLaVA-1.5-7B's real shapes; its decoder is over
2 GB, so it goes to ONNX external data) and `init --preset small` (the CPU benchmark model), runs
`llava-edge init` and then `llava-edge export` (verification on) each in its own process, and
reports per step the wall time and that process's peak resident memory (from wait4's rusage,
exact per child), whether verification passed with its numbers, and which files hold the
weights. One run per preset: an export takes minutes and the numbers are for sizing, not for
comparing small differences.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = {
    "llava-1.5-7b-layers2": ["--preset", "llava-1.5-7b", "--layers", "2"],
    "small": ["--preset", "small"],
}
CLI = [sys.executable, "-m", "llava_edge.cli"]


def timed(argv: list[str]) -> dict:
    """Run one command; its wall time, peak RSS (its own process) and output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {
        "command": " ".join(["llava-edge", *argv[len(CLI) :]]),
        "exit_code": process.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB on Linux
        "stdout": stdout,
        "stderr_tail": stderr.replace("\r", "\n").strip().splitlines()[-3:],
    }


def verification(stdout: str) -> dict:
    """The numbers of the report export prints (see llava_edge.export.verify): passed when every
    form it verified (standard, fused) passed; the numbers are the first form's."""
    statuses = re.findall(r"^verify vs transformers[^:]*: (PASSED|FAILED)$", stdout, re.MULTILINE)
    found = {
        "passed": bool(statuses) and all(s == "PASSED" for s in statuses),
        "image_features_max_abs_diff": _number(r"image features\s+max \|diff\| (\S+)", stdout),
        "prefill_logits_max_abs_diff": _number(r"prefill logits\s+max \|diff\| ([^,]+)", stdout),
        "prefill_logits_cosine": _number(r"cosine (\S+)", stdout),
    }
    tokens = re.search(r"greedy tokens\s+(\d+)/(\d+) identical", stdout)
    if tokens:
        found["greedy_tokens_identical"] = f"{tokens.group(1)}/{tokens.group(2)}"
    return found


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def model_files(model_dir: Path) -> dict:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    files = {name: entry["size"] for name, entry in manifest["files"].items()}
    return {
        "external_data": sorted(n for n in files if n.endswith(".data")),
        "file_sizes_mib": {n: round(s / 2**20, 1) for n, s in sorted(files.items())},
        "total_gib": round(sum(files.values()) / 2**30, 2),
    }


def run_job(name: str, init_args: list[str], work: Path, keep: bool) -> dict:
    checkpoint, model = work / f"{name}-checkpoint", work / f"{name}-model"
    result: dict = {"job": name}
    init = timed([*CLI, "init", str(checkpoint), *init_args, "--force"])
    result["init"] = {k: v for k, v in init.items() if k != "stdout"}
    if init["exit_code"] == 0:
        export = timed([*CLI, "export", str(checkpoint), str(model), "--force"])
        result["export"] = {k: v for k, v in export.items() if k != "stdout"}
        result["verification"] = verification(export["stdout"])
        if export["exit_code"] == 0:
            result["model_dir"] = model_files(model)
    if not keep:
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llava-edge-bench-export"))
    parser.add_argument("--only", choices=list(JOBS), action="append", help="run only these")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and model dirs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_average_before": [round(x, 2) for x in os.getloadavg()],  # shared machine
        },
        "jobs": [run_job(name, JOBS[name], args.work, args.keep) for name in args.only or JOBS],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
