"""`llava-edge doctor`: what the machine has, and per backend what is missing and how to get it."""

from __future__ import annotations

import json
import sys

import pytest

from llava_edge import cli
from llava_edge.runtime import doctor


def machine(**changes) -> doctor.Report:
    """A report of a Jetson that has everything, changed as a test needs."""
    report = doctor.Report(
        llava_edge="0.1.0",
        python="3.10.12",
        machine="Linux aarch64",
        onnxruntime="1.20.0",
        providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        tensorrt="10.3.0.30",
        tensorrt_error=None,
        torch="2.5.0a0+872d972e41.nv24.08",
        torch_cuda="12.6",
        torch_cuda_available=True,
        gpus=[
            dict(
                index=0,
                name="Orin",
                compute_capability="8.7",
                total_memory=64 << 30,
                free_memory=50 << 30,
                integrated=True,
                driver_cuda="12.6",
            )
        ],
        gpu_error=None,
        jetson="Jetson R36 (release), REVISION: 4.3",
        memory_available=48 << 30,
        backends=[],
        cuda_python="12.6.2",
    )
    for key, value in changes.items():
        setattr(report, key, value)
    report.backends = doctor.backend_status(report)
    return report


def status(report: doctor.Report) -> dict[str, list[str]]:
    return {s.name: s.missing for s in report.backends if not s.ready} | {
        s.name: "ready" for s in report.backends if s.ready
    }


def test_a_complete_jetson_can_run_every_backend() -> None:
    report = machine()
    assert all(s.ready and not s.missing for s in report.backends)
    text = doctor.format_report(report)
    assert (
        "GPU 0: Orin, compute capability 8.7, 64.0 GiB (shared with the CPU), 50.0 GiB free" in text
    )
    assert "TensorRT: 10.3.0.30" in text and "torch: 2.5.0a0+872d972e41.nv24.08, CUDA 12.6" in text


def test_each_missing_piece_is_named_with_how_to_get_it() -> None:
    s = status(machine(providers=["CPUExecutionProvider"], tensorrt=None))
    assert s["onnxruntime cpu"] == "ready"
    assert s["onnxruntime cuda"] == ["onnxruntime's CUDAExecutionProvider: " + doctor.ORT_GPU_HINT]
    assert (
        "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
        in (s["onnxruntime cuda"][0])
    )  # the two wheels share a module: an install beside the CPU one hides the GPU providers
    assert any("TensorrtExecutionProvider" in m for m in s["onnxruntime tensorrt"])
    (native,) = s["tensorrt"]
    assert (
        native.startswith("TensorRT's Python package: ")
        and "sudo apt install nvidia-jetpack" in native
    )

    # torch is no concern of the runtime's: the TensorRT backend needs cuda-python
    s = status(machine(torch=None, torch_cuda=None, torch_cuda_available=False))
    assert list(s.values()).count("ready") == 4
    s = status(machine(cuda_python=None))
    assert list(s.values()).count("ready") == 3
    assert s["tensorrt"] == ["cuda-python: " + doctor.CUDA_HINT]

    s = status(machine(gpus=[], gpu_error="no NVIDIA driver here"))
    assert s["onnxruntime cpu"] == "ready"
    assert all(
        s[n][0] == "no NVIDIA driver here"
        for n in ("onnxruntime cuda", "onnxruntime tensorrt", "tensorrt")
    )

    s = status(
        machine(tensorrt=None, tensorrt_error="installed but does not import: libnvinfer.so.10")
    )
    assert "(installed but does not import: libnvinfer.so.10)" in s["tensorrt"][0]


def test_without_onnxruntime_the_gpu_providers_are_said_to_come_with_onnxruntime_gpu() -> None:
    """`pip install onnxruntime` brings the CPU provider alone: for the cuda and tensorrt
    providers doctor names the GPU wheel, as it does where the CPU one is installed."""
    s = status(machine(onnxruntime=None, providers=[]))
    assert s["onnxruntime cpu"] == ["onnxruntime: `pip install onnxruntime`"]
    assert s["onnxruntime cuda"] == ["onnxruntime's CUDAExecutionProvider: " + doctor.ORT_GPU_HINT]
    assert s["onnxruntime tensorrt"] == [
        "onnxruntime's CUDAExecutionProvider and TensorrtExecutionProvider: " + doctor.ORT_GPU_HINT
    ]
    assert s["tensorrt"] == "ready"  # the native backend needs no onnxruntime provider


def test_a_tensorrt_the_backend_refuses_is_not_ready() -> None:
    """JetPack 6.0's TensorRT 8.6 imports, but the native backend needs 10 (strongly typed
    engines); onnxruntime's TensorRT provider, built against it, still runs."""
    s = status(machine(tensorrt="8.6.2.3"))
    (native,) = s["tensorrt"]
    assert "TensorRT 8.6.2.3 is too old" in native and "JetPack 6.1 or later" in native
    assert s["onnxruntime tensorrt"] == "ready"


def test_an_onnxruntime_the_backend_refuses_is_not_ready() -> None:
    """JetPack 6's onnxruntime-gpu 1.18 and 1.19 import and list their providers; the backend
    refuses them, so doctor does not call them ready."""
    s = status(machine(onnxruntime="1.19.0"))
    for backend in ("onnxruntime cpu", "onnxruntime cuda", "onnxruntime tensorrt"):
        assert any("install onnxruntime 1.20 or later" in m for m in s[backend]), s[backend]
    assert s["tensorrt"] == "ready"


@pytest.mark.parametrize(
    ("version", "standard_for"),
    [
        ("1.20.0", ["an fp16 fused decoder", "an int8 KV cache"]),  # JetPack 6's onnxruntime-gpu
        ("1.27.1", ["an int8 KV cache"]),
        ("1.28.0", []),
    ],
)
def test_the_graphs_auto_runs_on_the_cpu_are_said(version: str, standard_for: list[str]) -> None:
    """graph_form 'auto' (what every command runs) falls back to a dir's standard graphs where
    this onnxruntime cannot run its fused decoder: the doctor says which dirs, and needs what."""
    report = machine(onnxruntime=version)
    cpu = next(s for s in report.backends if s.name == "onnxruntime cpu")
    (note,) = cpu.notes
    assert note.startswith("graph_form 'auto' runs a model dir's fused graphs")
    assert ("standard graphs instead" in note) == bool(standard_for)
    assert all(kind in note for kind in standard_for)
    assert ("1.21 or later" in note) == ("an fp16 fused decoder" in standard_for)
    assert f"    {note}" in doctor.format_report(report).splitlines()
    refused = machine(onnxruntime="1.19.0").backends[0]  # runs no form at all
    assert refused.name == "onnxruntime cpu" and not refused.ready and not refused.notes


def test_this_machine_is_probed_without_raising() -> None:
    import importlib.util

    import onnxruntime
    import torch

    report = doctor.diagnose()
    assert report.onnxruntime == onnxruntime.__version__
    assert "CPUExecutionProvider" in report.providers
    assert status(report)["onnxruntime cpu"] == "ready"
    assert bool(report.gpus) != bool(report.gpu_error)
    assert all(s.ready == (not s.missing) for s in report.backends)
    # what this machine lacks, found without the doctor, is what the doctor says is missing
    native = next(s for s in report.backends if s.name == "tensorrt")
    if importlib.util.find_spec("tensorrt") is None:
        assert not native.ready and any("TensorRT" in m for m in native.missing)
    if not torch.cuda.is_available():
        assert not native.ready and any("CUDA" in m for m in native.missing)


def test_doctor_command_prints_text_or_json(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "backends:" in text and "onnxruntime cpu" in text
    assert cli.main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in data["backends"]] == [
        "onnxruntime cpu",
        "onnxruntime cuda",
        "onnxruntime tensorrt",
        "tensorrt",
    ]


def test_a_broken_onnxruntime_is_reported_not_raised(tmp_path, monkeypatch) -> None:
    """A wheel for another platform or CUDA fails at import in many ways; the doctor names it."""
    fake = tmp_path / "onnxruntime"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('libcudnn.so.9: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in list(sys.modules) if m.split(".")[0] == "onnxruntime"]:
        monkeypatch.delitem(sys.modules, name)
    report = doctor.diagnose()
    assert report.onnxruntime is None and "libcudnn.so.9" in report.onnxruntime_error
    missing = status(report)["onnxruntime cpu"]
    assert "does not import" in missing[0] and "libcudnn.so.9" in missing[0]
    assert "libcudnn.so.9" in doctor.format_report(report)
    json.dumps(report.to_dict(), allow_nan=False)


def test_a_broken_torch_is_not_said_to_be_a_cpu_build() -> None:
    text = doctor.format_report(
        machine(torch="broken (libcudart.so.12)", torch_cuda=None, torch_cuda_available=False)
    )
    assert "torch: broken (libcudart.so.12)\n" in text


def test_cuda_python_counts_only_where_its_runtime_module_loads(monkeypatch) -> None:
    """`cuda` alone is a namespace other packages share (cuda-pathfinder stays behind when
    cuda-bindings is uninstalled): the TensorRT backend needs its runtime module."""
    import cuda  # noqa: F401  (the namespace, still importable)

    for name in ("cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    report = doctor.diagnose()
    assert report.cuda_python is None
    assert "cuda-python: " + doctor.CUDA_HINT in status(report)["tensorrt"]


@pytest.mark.parametrize("content", ["", "\n"])
def test_an_empty_jetson_release_file_is_a_jetson_of_unknown_release(
    tmp_path, monkeypatch, content: str
) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text(content)
    monkeypatch.setattr(doctor, "Path", lambda _: release)
    assert doctor.diagnose().jetson == "Jetson (release unknown)"


def test_the_tensorrt_provider_needs_the_libraries_not_the_python_package() -> None:
    """A Jetson venv made without system site-packages cannot import `tensorrt`, yet JetPack's
    libnvinfer is on the loader's path, which is all onnxruntime's TensorRT provider loads."""
    s = status(machine(tensorrt=None, tensorrt_library="libnvinfer.so.10"))
    assert s["onnxruntime tensorrt"] == "ready"
    assert any("Python package" in m for m in s["tensorrt"])  # the native backend imports it
    text = doctor.format_report(machine(tensorrt=None, tensorrt_library="libnvinfer.so.10"))
    assert "TensorRT: libnvinfer.so.10, without its Python package" in text


def test_the_library_probe_reports_the_first_soname_the_loader_opens(monkeypatch) -> None:
    opened = []

    def cdll(name: str) -> object:
        opened.append(name)
        if name != "libnvinfer.so.11":
            raise OSError(f"{name}: cannot open shared object file")
        return object()

    monkeypatch.setattr(doctor.ctypes, "CDLL", cdll)
    assert doctor._tensorrt_library() == "libnvinfer.so.11"
    assert opened == ["libnvinfer.so.10", "libnvinfer.so.11"]
    monkeypatch.setattr(doctor.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    assert doctor._tensorrt_library() is None
