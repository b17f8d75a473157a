"""bench/gpu_check.py's steps on the CPU: the TensorRT section through the stand-ins for tensorrt
and the CUDA runtime, the training section on the tiny preset for two steps a stage, and the
report's shape. The script has not run on a GPU here; this holds its logic, not its figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cudart_stub
import pytest
import tensorrt_stub

from llava_edge.runtime.tensorrt import cuda, gpu

ROOT = Path(__file__).resolve().parents[1]
STUB_GPU = gpu.GpuInfo(0, "Stub GPU", "9.0", 80 << 30, 70 << 30, False, "12.6")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tensorrt_section_builds_compares_and_times_each_precision(
    gpu_check, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_stub)
    monkeypatch.setattr(gpu, "probe_gpu", lambda index=0: STUB_GPU)
    monkeypatch.setattr(cuda, "import_cudart", lambda: cudart_stub)
    monkeypatch.setattr(gpu_check, "SPEED_RUNS", 1)
    monkeypatch.setattr(gpu_check, "SPEED_TOKENS", 8)
    precisions = ["fp16", "int3", "int8", "int4"]  # int3 fails; the others still run
    report = gpu_check.check_tensorrt(tmp_path, "tiny", precisions, quiet=True)
    assert set(report["precisions"]) == set(precisions)
    failure = report["precisions"].pop("int3")
    assert failure["error"].startswith("LlavaEdgeError: --precision must be one of")
    for precision, result in report["precisions"].items():
        assert result["parity"]["prefill_logits_cosine"] > 0.99, precision
        identical, total = map(int, result["parity"]["greedy_tokens_identical"].split("/"))
        assert total == gpu_check.PARITY_TOKENS and 0 <= identical <= total
        assert result["speed"]["decode_tokens_per_s"] > 0 and result["build_s"] >= 0
    assert report["precisions"]["int4"]["kv_dtype"] == "float16"
    assert report["precisions"]["int8"]["kv_dtype"] == "float32"
    assert report["onnxruntime_cpu_speed"]["first_token_ms"] > 0


def test_training_section_through_its_cpu_baseline(gpu_check, tmp_path, capfd) -> None:
    """One run, the CPU baseline: the subprocess that cannot see CUDA trains stage 1 and 2 (two
    steps each), exports with verification, answers the test questions and reports back. The
    GPU runs are the same function in this process (in bf16, stage 2 also with LoRA)."""
    report = gpu_check.check_training(tmp_path, quick=True, lora=())
    # the trainer's lines of losses go to stderr: `gpu_check.py > report.json` is JSON
    assert capfd.readouterr().out == ""
    run = report["cpu_fp32_full"]
    assert set(report) == {"cpu_fp32_full"} and "answers" not in run
    assert run["exported_and_verified"] and run["stage1"]["steps"] == run["stage2"]["steps"] == 2
    assert run["stage2"]["step_ms_median"] > 0 and 0 <= run["test_accuracy"] <= 1
    assert {"loss_first", "loss_last", "loss_falls"} <= set(run["stage1"])


def test_the_report_says_why_a_section_was_skipped(gpu_check, tmp_path, capsys) -> None:
    report = gpu_check.main(
        ["--work", str(tmp_path), "--skip-training", "--out", str(tmp_path / "r.json")]
    )
    assert report["tensorrt"] == {"skipped": "TensorRT is not installed"}
    assert report["training"] == {"skipped": "--skip-training"}
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "r.json").read_text())


def test_a_tensorrt_too_old_or_broken_skips_the_section_saying_why(gpu_check) -> None:
    env = {"tensorrt": "8.6.2.3", "cuda_python": "12.6.2", "gpus": ["Orin (SM 8.7)"]}
    assert "TensorRT 8.6.2.3 is too old" in gpu_check.tensorrt_missing(env)
    assert gpu_check.tensorrt_missing({**env, "tensorrt": "10.3.0.30"}) is None
    broken = {**env, "tensorrt": None, "tensorrt_error": "installed but does not import: x"}
    assert gpu_check.tensorrt_missing(broken) == "TensorRT is installed but does not import: x"


def test_a_failing_training_run_leaves_the_others_in_the_report(
    gpu_check, tmp_path, monkeypatch, cpu_only
) -> None:
    def train_demo(root, data, lora, precision, quick):
        if lora:
            raise RuntimeError("CUDA error: no kernel image is available\nmore detail")
        return {"stage2": {"loss_falls": True}, "answers": ["circle"]}

    monkeypatch.setattr(gpu_check, "train_demo", train_demo)
    report = gpu_check.check_training(tmp_path, quick=True, cpu_baseline=False)
    assert report == {
        "cpu_bf16_full": {"stage2": {"loss_falls": True}},
        "cpu_bf16_lora": {"error": "RuntimeError: CUDA error: no kernel image is available"},
    }


def test_a_failing_section_is_reported_and_the_json_still_comes_out(
    gpu_check, tmp_path, capsys, monkeypatch
) -> None:
    def check_training(work, quick):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gpu_check, "check_training", check_training)
    out = tmp_path / "r.json"
    argv = ["gpu_check.py", "--work", str(tmp_path), "--dry-run", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        gpu_check.cli()
    assert stopped.value.code == 1  # a part failed: the JSON says which
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert report["training"] == {"error": "RuntimeError: out of memory"}
    assert report["tensorrt"] == {"skipped": "TensorRT is not installed"}
