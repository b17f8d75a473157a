"""Everything worth checking on a machine with a GPU, in one command, as one JSON object.

    python bench/gpu_check.py [--work DIR] [--out FILE] [--skip-tensorrt] [--skip-training]
    python bench/gpu_check.py --dry-run        # the training steps on the CPU, tiny, quickly
    PYTHONPATH=. python bench/gpu_check.py     # from a checkout where llava-edge is not installed

Sections run where the machine allows them; each says why it was skipped otherwise:

- tensorrt (TensorRT, cuda-python and a GPU): the `small` preset exported, quantized to fp16,
  int8 and int4, engines built for each; parity against onnxruntime on the CPU (prefill logits'
  cosine, greedy tokens identical out of 32); the speed bench (first token, decode tokens/s).
- training (torch with CUDA): the demo's stages 1 and 2 trained on the GPU in bf16, stage 2 both
  fully and with LoRA, and once on the CPU in fp32 (a subprocess without CUDA) for comparison:
  does the loss fall, does the result export (verified against transformers) and answer the test
  questions, how often do its answers equal the CPU-trained model's, and how long a step takes.

Sized for under 10 minutes on a datacenter GPU. A part that fails (a precision, a training run,
a section) is reported as `{"error": "..."}` with its traceback on stderr, and the rest still
runs: the JSON always comes out, and `--out` is rewritten after each section, so a run stopped at
a time limit leaves what it finished. The exit code is 1 when any part failed. `--dry-run` runs
the training section's code on the CPU with the tiny preset and two steps a stage (the TensorRT
section still needs TensorRT; tests/test_gpu_check.py drives it through the stand-ins); its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

QUESTION = "What kind of shape is shown?\nAnswer the question using a single word or phrase."
PARITY_TOKENS = 32
SPEED_RUNS = 5
SPEED_TOKENS = 128


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def attempt(part: Callable[[], Any]) -> Any:
    """`part()`, or `{"error": ...}` where it fails: one failure costs its own part of the report,
    not the others' results (a run on a borrowed GPU is one call). The traceback goes to stderr."""
    try:
        return part()
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        lines = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")}


def failed(report: Any) -> bool:
    """Whether any part of the report is an error."""
    if isinstance(report, dict):
        return "error" in report or any(failed(v) for v in report.values())
    return False


# ---- what this machine has ---------------------------------------------------------------------


def environment() -> dict[str, Any]:
    from llava_edge.runtime.doctor import diagnose

    report = diagnose()
    return {
        "tensorrt": report.tensorrt,
        "tensorrt_error": report.tensorrt_error,
        "cuda_python": report.cuda_python,
        "torch": report.torch,
        "torch_cuda_available": report.torch_cuda_available,
        "gpus": [f"{g['name']} (SM {g['compute_capability']})" for g in report.gpus],
        "gpu_error": report.gpu_error,
        "onnxruntime": report.onnxruntime,
    }


def tensorrt_missing(env: dict[str, Any]) -> str | None:
    from llava_edge.errors import LlavaEdgeError
    from llava_edge.runtime.tensorrt.requirements import check_version

    if not env["tensorrt"]:
        error = env.get("tensorrt_error")
        return f"TensorRT is {error}" if error else "TensorRT is not installed"
    try:
        check_version(env["tensorrt"])  # JetPack 6.0's 8.6 imports, but cannot build here
    except LlavaEdgeError as e:
        return str(e)
    if not env["cuda_python"]:
        return "cuda-python is not installed"
    if not env["gpus"]:
        return env["gpu_error"] or "no GPU"
    return None


# ---- TensorRT: build, parity, speed --------------------------------------------------------------


def check_tensorrt(work: Path, preset: str, precisions: list[str], quiet: bool) -> dict:
    """Engines for each precision of `preset`, compared with onnxruntime on the CPU and timed."""
    from llava_edge.calib.quantize import quantize_model
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.runtime import Pipeline
    from llava_edge.runtime.tensorrt.build import build_engines
    from llava_edge.training.checkpoint import init_checkpoint
    from llava_edge.training.synth import synthesize

    say = (lambda *a: None) if quiet else log
    checkpoint, fp32 = work / f"{preset}-checkpoint", work / f"{preset}-fp32"
    if not (checkpoint / "config.json").exists():
        init_checkpoint(checkpoint, preset=preset, seed=0, force=True)
    if not (fp32 / "manifest.json").exists():
        export_checkpoint(checkpoint, fp32, verify=False, force=True, log=say)
    images = synthesize(work / "calib", train=16, test=0, force=True)["images"]
    picture = sorted(Path(images).iterdir())[0]
    out: dict[str, Any] = {"preset": preset, "precisions": {}}

    def engines_for(precision: str) -> dict[str, Any]:
        model = work / f"{preset}-{precision}"
        started = time.perf_counter()
        if not (model / "manifest.json").exists():
            quantize_model(fp32, model, precision, calib=images, samples=8, force=True, log=say)
        quantized_s = time.perf_counter() - started
        started = time.perf_counter()
        build_engines(model, log=say)
        built_s = time.perf_counter() - started
        with Pipeline.load(model, backend="tensorrt") as engines:
            return {
                "quantize_s": round(quantized_s, 1),
                "build_s": round(built_s, 1),
                "kv_dtype": engines.backend.kv_dtype,
                "parity": parity(engines, reference, picture),
                "speed": speed(engines, picture),
            }

    with Pipeline.load(fp32) as reference:
        for precision in precisions:
            out["precisions"][precision] = attempt(functools.partial(engines_for, precision))
        out["onnxruntime_cpu_speed"] = attempt(lambda: speed(reference, picture))
    return out


def parity(engines: Any, reference: Any, picture: Path) -> dict[str, Any]:
    """Prefill logits' cosine and how many greedy tokens equal onnxruntime fp32's."""
    import numpy as np

    from llava_edge.runtime.generate import embed

    def logits(pipe: Any) -> np.ndarray:
        image = pipe.image_pixels(str(picture))
        ids, features = pipe.prompt_ids(QUESTION, image), pipe.pixel_features(image)
        ids = np.asarray([ids])
        embeds = embed(pipe.table, ids, pipe.manifest.tokens.image_token_id, [features])
        mask = np.ones_like(ids)
        return pipe.backend.decode(embeds, mask, np.cumsum(mask, 1) - 1, pipe.backend.new_cache(1))

    a, b = logits(engines).ravel().astype(np.float64), logits(reference).ravel()
    options = dict(max_new_tokens=PARITY_TOKENS, ignore_eos=True)
    got = engines.answer(str(picture), QUESTION, **options).token_ids
    want = reference.answer(str(picture), QUESTION, **options).token_ids
    same = next((i for i, (x, y) in enumerate(zip(got, want, strict=True)) if x != y), len(want))
    return {
        "prefill_logits_cosine": round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 6),
        "greedy_tokens_identical": f"{same}/{len(want)}",
    }


def speed(pipe: Any, picture: Path) -> dict[str, float]:
    """Medians over SPEED_RUNS answers of SPEED_TOKENS tokens (after one warm-up)."""
    timings = []
    for i in range(SPEED_RUNS + 1):
        answer = pipe.answer(str(picture), QUESTION, max_new_tokens=SPEED_TOKENS, ignore_eos=True)
        if i:
            timings.append(answer.timings)
    return {
        "first_token_ms": round(statistics.median(t["first_token_ms"] for t in timings), 2),
        "decode_tokens_per_s": round(
            statistics.median(t["decode_tokens_per_s"] for t in timings), 1
        ),
    }


# ---- training: GPU bf16 (full, LoRA) against the CPU ---------------------------------------------


def check_training(
    work: Path, quick: bool, lora: tuple[bool, ...] = (False, True), cpu_baseline: bool = True
) -> dict[str, Any]:
    """The demo's two stages on this process's device in bf16 (stage 2 fully and with LoRA),
    and in fp32 on the CPU in a subprocess that cannot see CUDA. What the trainer prints (a line
    of losses a step) goes to stderr: stdout is the report's."""
    with contextlib.redirect_stdout(sys.stderr):
        return _check_training(work, quick, lora, cpu_baseline)


def _check_training(
    work: Path, quick: bool, lora: tuple[bool, ...], cpu_baseline: bool
) -> dict[str, Any]:
    import torch

    from llava_edge.training.synth import synthesize

    data = synthesize(
        work / "data", train=16 if quick else 1000, test=8 if quick else 200, force=True
    )
    device = "gpu" if torch.cuda.is_available() else "cpu"
    out: dict[str, Any] = {}
    runs = [(f"{device}_bf16_{'lora' if x else 'full'}", x) for x in lora]
    for name, with_lora in runs:
        run = functools.partial(
            train_demo, work / name, data, lora=with_lora, precision="bf16", quick=quick
        )
        out[name] = attempt(run)
    if cpu_baseline:
        out["cpu_fp32_full"] = attempt(lambda: train_on_cpu(work, quick))
        for name, _ in runs:
            if not failed(out[name]) and not failed(out["cpu_fp32_full"]):
                out[name]["answers_equal_cpu"] = agreement(
                    out[name]["answers"], out["cpu_fp32_full"]["answers"]
                )
    for result in out.values():
        result.pop("answers", None)
    return out


def train_on_cpu(work: Path, quick: bool) -> dict[str, Any]:
    """The full run in fp32 in a subprocess that cannot see CUDA."""
    cpu = work / "cpu_fp32_full"
    args = [sys.executable, __file__, "--train-on-cpu", str(cpu), "--work", str(work)]
    subprocess.run(
        args + (["--dry-run"] if quick else []),
        check=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        stdout=2,  # the process's stderr, as above
    )
    return json.loads((cpu / "result.json").read_text())


def train_demo(
    root: Path, data: dict[str, Path], lora: bool, precision: str, quick: bool
) -> dict[str, Any]:
    """init -> stage 1 -> stage 2 (full or LoRA) -> export (verified) -> eval, as `make demo`."""
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.training.checkpoint import init_checkpoint
    from llava_edge.training.evaluate import evaluate
    from llava_edge.training.train import train

    init_checkpoint(root / "init", preset="tiny" if quick else "demo", force=True)
    common = dict(
        precision=precision,
        gradient_checkpointing=False,
        save_steps=10**6,
        logging_steps=1,
        learning_rate=1e-3,
        force=True,
        progress=False,
    )
    stages = {}
    clock = StepClock()
    stage1 = train(
        1,
        root / "init",
        data["captions"],
        root / "stage1",
        images=data["images"],
        callbacks=[clock],
        global_batch_size=32,
        **({"max_steps": 2} if quick else {}),
        **common,
    )
    stages["stage1"] = summary(stage1, clock)
    clock = StepClock()
    lora_options = dict(lora=True, lora_rank=8, lora_alpha=16, projector_lr=1e-3) if lora else {}
    stage2 = train(
        2,
        root / "stage1",
        data["train"],
        root / "stage2",
        images=data["images"],
        callbacks=[clock],
        global_batch_size=16,
        **({"max_steps": 2} if quick else {"epochs": 8}),
        **lora_options,
        **common,
    )
    stages["stage2"] = summary(stage2, clock)
    export_checkpoint(root / "stage2", root / "model", verify=True, force=True, log=lambda *a: None)
    result = evaluate(
        root / "model", data["test"], images=data["images"], max_new_tokens=8, progress=False
    )
    answers = [json.loads(line) for line in Path(result.answers).read_text().splitlines()]
    return {
        **stages,
        "exported_and_verified": True,
        "test_accuracy": round(result.accuracy, 3),
        "answers": [a["prediction"] for a in answers],
    }


class StepClock:
    """A transformers TrainerCallback that times each optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def __getattr__(self, name: str) -> Any:  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def summary(result: Any, clock: StepClock) -> dict[str, Any]:
    losses = [loss for _, loss in result.losses]
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
    first, last = statistics.mean(head), statistics.mean(tail)
    return {
        "steps": result.steps,
        "loss_first": round(first, 4),
        "loss_last": round(last, 4),
        "loss_falls": last < first,
        "step_ms_median": round(1000 * statistics.median(clock.times[1:] or clock.times), 2),
    }


def agreement(a: list[str], b: list[str]) -> float:
    same = sum(x.strip().lower() == y.strip().lower() for x, y in zip(a, b, strict=True))
    return round(same / max(len(a), 1), 3)


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llava-edge-gpu-check"))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--dry-run", action="store_true", help="tiny, on the CPU: tests the steps")
    parser.add_argument("--skip-tensorrt", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--train-on-cpu", type=Path, help=argparse.SUPPRESS)  # the CPU baseline
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.train_on_cpu:  # the subprocess: CUDA is hidden from it
        data = {k: Path(v) for k, v in _data_paths(args.work).items()}
        result = train_demo(
            args.train_on_cpu, data, lora=False, precision="fp32", quick=args.dry_run
        )
        (args.train_on_cpu / "result.json").write_text(json.dumps(result))
        return result
    started = time.perf_counter()
    env = environment()
    report: dict[str, Any] = {"dry_run": args.dry_run, "environment": env}
    missing = tensorrt_missing(env)
    if args.skip_tensorrt:
        report["tensorrt"] = {"skipped": "--skip-tensorrt"}
    elif missing:
        report["tensorrt"] = {"skipped": missing}
    else:
        preset = "tiny" if args.dry_run else "small"
        report["tensorrt"] = attempt(
            lambda: check_tensorrt(args.work, preset, ["fp16", "int8", "int4"], args.dry_run)
        )
    save(report, args.out)
    if args.skip_training:
        report["training"] = {"skipped": "--skip-training"}
    elif not env["torch_cuda_available"] and not args.dry_run:
        report["training"] = {"skipped": "torch has no CUDA GPU here"}
    else:
        report["training"] = attempt(lambda: check_training(args.work, quick=args.dry_run))
    report["total_s"] = round(time.perf_counter() - started, 1)
    save(report, args.out)
    print(json.dumps(report, indent=2))
    return report


def save(report: dict[str, Any], out: Path | None) -> None:
    """The report so far, in `--out` (replaced whole: a reader never sees half a file)."""
    from llava_edge.files import replace_file

    if out is not None:
        with replace_file(out) as f:
            f.write(json.dumps(report, indent=2) + "\n")


def cli() -> None:
    """Exit 1 when any part of the report failed (the JSON says which)."""
    if failed(main()):
        sys.exit(1)


def _data_paths(work: Path) -> dict[str, str]:
    data = work / "data"
    return {
        "images": str(data / "images"),
        "captions": str(data / "captions.json"),
        "train": str(data / "train.json"),
        "test": str(data / "test.json"),
    }


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(cli)
