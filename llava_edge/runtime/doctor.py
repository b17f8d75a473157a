"""`llava-edge doctor`: what this machine can run, and what to install for the rest.

Each probe imports what it looks at inside a try, so a missing or broken library is reported, not
raised; nothing here needs a GPU.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llava_edge import __version__
from llava_edge.errors import LlavaEdgeError, first_line
from llava_edge.runtime.tensorrt.cuda import CUDA_HINT, import_cudart
from llava_edge.runtime.tensorrt.gpu import host_available_memory
from llava_edge.runtime.tensorrt.requirements import TENSORRT_HINT, check_version

# Both wheels install the one `onnxruntime` module: beside the CPU wheel (which llava-edge
# depends on, so `[gpu]` brings both), the GPU one's providers are hidden, and uninstalling the
# CPU one removes files the GPU one shares; hence both out, then the GPU one alone.
ORT_GPU_HINT = (
    "replace onnxruntime with onnxruntime-gpu (`pip uninstall -y onnxruntime onnxruntime-gpu && "
    "pip install onnxruntime-gpu`; on a Jetson, the JetPack 6 wheel from the Jetson AI Lab "
    "index, see docs/jetson.md)"
)

# TensorRT 10's and 11's runtime sonames on Linux (JetPack's and pip's tensorrt-cu12-libs), then
# its Windows DLL
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.11", "nvinfer_10.dll")


@dataclass
class BackendStatus:
    name: str
    ready: bool
    missing: list[str] = field(default_factory=list)  # each: what, and how to get it
    notes: list[str] = field(default_factory=list)  # what it runs, where that is worth saying


@dataclass
class Report:
    llava_edge: str
    python: str
    machine: str
    onnxruntime: str | None
    providers: list[str]
    tensorrt: str | None
    tensorrt_error: str | None
    torch: str | None
    torch_cuda: str | None  # the CUDA torch was built for; None for a CPU build
    torch_cuda_available: bool
    gpus: list[dict[str, Any]]
    gpu_error: str | None
    jetson: str | None  # /etc/nv_tegra_release's first line on a Jetson
    memory_available: int | None  # bytes the OS can still give (on a Jetson the GPU shares it)
    backends: list[BackendStatus]
    cuda_python: str | None = None  # the TensorRT backend's device memory, streams and graphs
    onnxruntime_error: str | None = None  # installed but does not import: why
    # the soname of a TensorRT library this process can load: onnxruntime's TensorRT provider
    # needs it, not the Python package (a Jetson venv without system site-packages has it alone)
    tensorrt_library: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnose() -> Report:
    """Probe this machine."""
    ort_version, providers, ort_error = _onnxruntime()
    trt_version, trt_error = _tensorrt()
    torch_version, torch_cuda, torch_ok = _torch()
    gpus, gpu_error = _gpus()
    report = Report(
        llava_edge=__version__,
        python=sys.version.split()[0],
        machine=f"{platform.system()} {platform.machine()}",
        onnxruntime=ort_version,
        providers=providers,
        tensorrt=trt_version,
        tensorrt_error=trt_error,
        torch=torch_version,
        torch_cuda=torch_cuda,
        torch_cuda_available=torch_ok,
        gpus=gpus,
        gpu_error=gpu_error,
        jetson=_jetson(),
        memory_available=host_available_memory(),
        backends=[],
        cuda_python=_cuda_python(),
        onnxruntime_error=ort_error,
        tensorrt_library=_tensorrt_library(),
    )
    report.backends = backend_status(report)
    return report


def backend_status(report: Report) -> list[BackendStatus]:
    """For each way to run a model, whether this machine can, and what is missing if not."""
    gpu = [] if report.gpus else [report.gpu_error or "a CUDA GPU"]
    ort = [] if report.onnxruntime else ["onnxruntime: `pip install onnxruntime`"]
    if report.onnxruntime_error:
        ort = [
            f"onnxruntime ({report.onnxruntime_error}): reinstall the wheel made for this "
            "machine (`pip install --force-reinstall onnxruntime`; on a Jetson, see docs/jetson.md)"
        ]
    elif report.onnxruntime:
        from llava_edge.runtime.onnx_backend import check_onnxruntime

        try:  # the backend refuses one too old to answer right (JetPack 6's 1.18 and 1.19)
            check_onnxruntime(report.onnxruntime)
        except LlavaEdgeError as e:
            ort = [str(e)]
    statuses = [
        BackendStatus("onnxruntime cpu", not ort, ort, _cpu_forms(report) if not ort else [])
    ]
    # without onnxruntime, the GPU providers come with onnxruntime-gpu, not the CPU wheel
    uninstalled = report.onnxruntime is None and report.onnxruntime_error is None
    for provider, short in (
        ("CUDAExecutionProvider", "cuda"),
        ("TensorrtExecutionProvider", "tensorrt"),
    ):
        missing = ([] if uninstalled else ort) + gpu
        wanted = ["CUDAExecutionProvider"] + (
            [provider] if provider != "CUDAExecutionProvider" else []
        )
        installed = report.onnxruntime or uninstalled
        absent = [p for p in wanted if installed and p not in report.providers]
        if absent:
            missing.append(f"onnxruntime's {' and '.join(absent)}: {ORT_GPU_HINT}")
        if short == "tensorrt" and not (report.tensorrt or report.tensorrt_library):
            missing.append(f"TensorRT's libraries: {TENSORRT_HINT}")
        statuses.append(BackendStatus(f"onnxruntime {short}", not missing, missing))
    native = list(gpu)
    if not report.tensorrt:
        detail = f" ({report.tensorrt_error})" if report.tensorrt_error else ""
        native.append(f"TensorRT's Python package{detail}: {TENSORRT_HINT}")
    else:
        try:  # the backend refuses TensorRT before 10 (JetPack 6.0's 8.6)
            check_version(report.tensorrt)
        except LlavaEdgeError as e:
            native.append(str(e))
    if not report.cuda_python:
        native.append(f"cuda-python: {CUDA_HINT}")
    statuses.append(BackendStatus("tensorrt", not native, native))
    return statuses


def _cpu_forms(report: Report) -> list[str]:
    """Which graphs graph_form 'auto' (what the CLI runs) opens on the CPU with this
    onnxruntime: the fused forms, but the standard ones of a dir whose fused decoder it cannot
    run."""
    from llava_edge.runtime.onnx_backend import fused_out_of_reach

    lacking = fused_out_of_reach(report.onnxruntime)
    if not lacking:
        return ["graph_form 'auto' runs a model dir's fused graphs"]
    return [
        "graph_form 'auto' runs a model dir's fused graphs; its standard graphs instead where "
        f"it holds {', or '.join(lacking)}"
    ]


def format_report(report: Report) -> str:
    gib = 2**30
    lines = [
        f"llava-edge {report.llava_edge}, Python {report.python}, {report.machine}"
        + (f", {report.jetson}" if report.jetson else ""),
        f"onnxruntime: {report.onnxruntime or 'not installed'}"
        + (f" (providers: {', '.join(report.providers)})" if report.onnxruntime else "")
        + (f" ({report.onnxruntime_error})" if report.onnxruntime_error else ""),
        f"TensorRT: {report.tensorrt or _library_only(report)}"
        + (f" ({report.tensorrt_error})" if report.tensorrt_error else ""),
        f"torch: {report.torch or 'not installed'}"
        + (
            f", CUDA {report.torch_cuda}"
            if report.torch_cuda
            else (", CPU only" if report.torch and not report.torch.startswith("broken") else "")
        )
        + ("" if report.torch_cuda_available or not report.torch_cuda else ", no usable GPU"),
        f"cuda-python: {report.cuda_python or 'not installed'}",
    ]
    if report.gpus:
        for g in report.gpus:
            free = (
                f", {g['free_memory'] / gib:.1f} GiB free" if g["free_memory"] is not None else ""
            )
            shared = " (shared with the CPU)" if g["integrated"] else ""
            lines.append(
                f"GPU {g['index']}: {g['name']}, compute capability {g['compute_capability']}, "
                f"{g['total_memory'] / gib:.1f} GiB{shared}{free}; driver supports CUDA {g['driver_cuda']}"
            )
    else:
        lines.append(f"GPU: none ({report.gpu_error})")
    if report.memory_available is not None:
        lines.append(f"memory available: {report.memory_available / gib:.1f} GiB")
    lines.append("backends:")
    for status in report.backends:
        lines.append(f"  {status.name:22s} {'ready' if status.ready else 'missing:'}")
        lines += [f"    - {item}" for item in status.missing]
        lines += [f"    {note}" for note in status.notes]
    return "\n".join(lines)


def _library_only(report: Report) -> str:
    if report.tensorrt_library:
        return f"{report.tensorrt_library}, without its Python package"
    return "not installed"


def _onnxruntime() -> tuple[str | None, list[str], str | None]:
    """Its version and providers, or why it does not import."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None, [], None
    try:
        ort = importlib.import_module("onnxruntime")
        return ort.__version__, list(ort.get_available_providers()), None
    except Exception as e:  # a wheel for another platform or CUDA fails in many ways
        return None, [], f"installed but does not import: {first_line(e)}"


def _tensorrt() -> tuple[str | None, str | None]:
    if importlib.util.find_spec("tensorrt") is None:
        return None, None
    try:
        return importlib.import_module("tensorrt").__version__, None
    except Exception as e:  # a stub package without its libraries fails in many ways
        return None, f"installed but does not import: {first_line(e)}"


def _tensorrt_library() -> str | None:
    """The first TensorRT runtime library the dynamic loader finds, as onnxruntime's provider
    would look for it (LD_LIBRARY_PATH, the loader's cache)."""
    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name
    return None


def _torch() -> tuple[str | None, str | None, bool]:
    if importlib.util.find_spec("torch") is None:
        return None, None, False
    try:
        torch = importlib.import_module("torch")
        return torch.__version__, torch.version.cuda, bool(torch.cuda.is_available())
    except Exception as e:  # a broken wheel (e.g. a desktop torch on a Jetson)
        return f"broken ({first_line(e)})", None, False


def _cuda_python() -> str | None:
    """cuda-python's version where the runtime module the TensorRT backend imports loads (a
    bare `cuda` is a namespace other packages share)."""
    try:
        import_cudart()
    except Exception:  # not installed, or a library it loads is missing
        return None
    try:
        return importlib.import_module("cuda.bindings").__version__
    except Exception:  # the older cuda-python (`cuda.cudart`) has no cuda.bindings
        return "installed"


def _gpus() -> tuple[list[dict[str, Any]], str | None]:
    from llava_edge.runtime.tensorrt.gpu import probe_gpus

    try:
        return [asdict(g) for g in probe_gpus()], None
    except LlavaEdgeError as e:
        return [], str(e)


def _jetson() -> str | None:
    path = Path("/etc/nv_tegra_release")
    if not path.is_file():
        return None
    try:
        release = path.read_text(errors="replace").strip().splitlines()[0].strip("# ").split(",")[0]
    except (OSError, IndexError):  # unreadable or empty: a Jetson all the same
        return "Jetson (release unknown)"
    return "Jetson " + release
