"""Choosing the backend, and what `build` and `--backend tensorrt` say where TensorRT, torch with
CUDA or a GPU is missing: one line naming it and how to install it, exit 1, no traceback."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llava_edge import cli
from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Pipeline
from llava_edge.runtime.onnx_backend import OnnxBackend
from llava_edge.runtime.tensorrt import backend as trt_backend
from llava_edge.runtime.tensorrt import gpu

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_build_without_tensorrt_names_it_and_how_to_install(
    no_tensorrt, capsys, tiny_model_dir: Path, tmp_path: Path
) -> None:
    err = one_line_error(capsys, ["build", str(tiny_model_dir), "--out", str(tmp_path / "engines")])
    assert err.startswith("llava-edge build: error: TensorRT's Python package is not installed")
    assert "JetPack" in err and "--system-site-packages" in err and "llava-edge[trt]" in err
    assert not (tmp_path / "engines").exists()


def test_run_with_the_tensorrt_backend_without_tensorrt(
    no_tensorrt, capsys, tiny_model_dir: Path
) -> None:
    err = one_line_error(
        capsys, ["run", str(tiny_model_dir), "--prompt", "hi", "--backend", "tensorrt"]
    )
    assert "TensorRT's Python package is not installed" in err and "llava-edge[trt]" in err


def test_the_installed_command_exits_1_without_a_traceback(tiny_model_dir: Path) -> None:
    code = (
        "import sys; sys.modules['tensorrt'] = None; from llava_edge.cli import main; "
        f"sys.exit(main(['build', {str(tiny_model_dir)!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("llava-edge build: error: TensorRT's Python package is not installed")
    assert done.stdout == ""


def test_tensorrt_backend_without_cuda_python_or_a_gpu(
    monkeypatch, capsys, tiny_model_dir: Path
) -> None:
    import tensorrt_stub

    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_stub)
    run = ["run", str(tiny_model_dir), "--prompt", "hi", "--backend", "tensorrt"]

    def no_driver(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(gpu.ctypes, "CDLL", no_driver)
    for argv in (run, ["build", str(tiny_model_dir)]):
        assert "no NVIDIA driver here (libcuda.so.1 not found)" in one_line_error(capsys, argv)
    monkeypatch.setattr(
        gpu,
        "probe_gpu",
        lambda index=0: gpu.GpuInfo(0, "Orin", "8.7", 8 << 30, 6 << 30, True, "12.6"),
    )
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` raises ImportError
    err = one_line_error(capsys, run)
    # the CUDA 12 release, as the `trt` extra pins it: an unpinned install takes CUDA 13's,
    # which JetPack 6's driver cannot run
    extra = re.search(r'^trt = \[.*"(cuda-bindings[^"]*)"', PYPROJECT.read_text(), re.M)
    assert "cuda-python is not installed" in err and f"pip install '{extra[1]}'" in err
    assert "pip install cuda-python" not in err

    real = importlib.import_module

    def broken(name: str):
        if name == "cuda.bindings.runtime":
            raise ImportError("libcudart.so.12: cannot open shared object file")
        return real(name)

    monkeypatch.setattr(importlib, "import_module", broken)
    err = one_line_error(capsys, run)
    assert "cuda-python does not load (libcudart.so.12: cannot open shared object file)" in err


def test_the_trt_extra_installs_tensorrt_and_cuda_python_for_one_cuda() -> None:
    # The `tensorrt` metapackage installs its newest CUDA's build (tensorrt_cu13 for 11.4), which
    # a CUDA 12 driver cannot run and the CUDA 12 cuda-bindings beside it do not match.
    from llava_edge.runtime.tensorrt.cuda import CUDA_BINDINGS
    from llava_edge.runtime.tensorrt.requirements import TENSORRT_HINT

    extra = re.search(r"^trt = \[(.*)\]", PYPROJECT.read_text(), re.M)[1]
    requirements = re.findall(r'"([^"]+)"', extra)
    assert CUDA_BINDINGS in requirements and "<13" in CUDA_BINDINGS
    (tensorrt,) = [r for r in requirements if r.startswith("tensorrt")]
    assert re.match(r"tensorrt-cu12\b", tensorrt), tensorrt
    assert "pip install 'llava-edge[trt]'" in TENSORRT_HINT  # the extra checked above


def test_pipeline_load_chooses_the_backend(monkeypatch, tiny_model_dir: Path) -> None:
    with pytest.raises(
        LlavaEdgeError, match="unknown backend 'tensorrtx'; choose 'onnxruntime' or 'tensorrt'"
    ):
        Pipeline.load(tiny_model_dir, backend="tensorrtx")
    with Pipeline.load(tiny_model_dir) as pipe:
        assert isinstance(pipe.backend, OnnxBackend)
    made = []

    class Recorder:
        def __init__(self, model_dir, manifest, **options):
            made.append(options)

        def close(self):
            pass

    monkeypatch.setattr(trt_backend, "TensorRTBackend", Recorder)
    with Pipeline.load(tiny_model_dir, backend="tensorrt", engine_dir="e", cuda_graph=True) as pipe:
        assert isinstance(pipe.backend, Recorder)
    assert made == [{"engine_dir": "e", "cuda_graph": True, "verify_files": None}]


def test_run_passes_backend_options(monkeypatch, tiny_model_dir: Path) -> None:
    seen = {}

    def load(model_dir, **options):
        seen.update(options)
        raise LlavaEdgeError("stop here")

    monkeypatch.setattr(Pipeline, "load", load)
    argv = [
        "run",
        str(tiny_model_dir),
        "--prompt",
        "hi",
        "--backend",
        "tensorrt",
        "--engine-dir",
        "x",
    ]
    assert cli.main(argv) == 1
    assert seen["backend"] == "tensorrt" and seen["engine_dir"] == "x"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "m", "--prompt", "p", "--backend", "tvm"])
