"""What the TensorRT backend needs, imported lazily, with one-line instructions when it is missing.

`llava-edge doctor` reports the same facts, so the install hints live here once.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from llava_edge.errors import LlavaEdgeError, first_line

TENSORRT_HINT = (
    "on a Jetson (JetPack 6.1 or later) it comes with JetPack: `sudo apt install nvidia-jetpack`, then make "
    "the venv with `python3 -m venv --system-site-packages`; on an x86 or SBSA machine "
    "`pip install 'llava-edge[trt]'` (tensorrt-cu12 and the cuda-python it needs; see "
    "docs/jetson.md)"
)


MIN_TENSORRT = 10  # strongly typed networks; older releases silently ignore the flag


def import_tensorrt() -> Any:
    """The tensorrt module (10 or later), or a LlavaEdgeError saying how to get it."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as e:
        detail = "" if e.name == "tensorrt" else f" ({first_line(e)})"
        raise LlavaEdgeError(
            f"TensorRT's Python package is not installed{detail}; {TENSORRT_HINT}"
        ) from None
    check_version(trt.__version__)
    return trt


def check_version(version: str) -> None:
    """TensorRT before 10 has no strongly typed networks: the flag would become 0 and engines
    would be built weakly typed, with precisions the graph never asked for."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise LlavaEdgeError(f"cannot read TensorRT's version {version!r}") from None
    if major < MIN_TENSORRT:
        raise LlavaEdgeError(
            f"TensorRT {version} is too old: llava-edge needs TensorRT 10 or later (strongly typed "
            "engines). On a Jetson, flash JetPack 6.1 or later, which ships TensorRT 10.3 "
            "(JetPack 6.0 ships 8.6); elsewhere `pip install -U 'llava-edge[trt]'`"
        )


@functools.cache
def tensorrt_logger(trt: Any) -> Any:
    """The one logger llava-edge gives TensorRT, kept for the life of the process. TensorRT logs
    through a single logger, the first builder's or runtime's, for as long as any builder or
    runtime exists (one made with another logger meanwhile is warned and uses the first), and
    that logger must outlive them all: a logger per build or loaded model would be freed with
    its model while another model, loaded beside it, still logs through it."""
    return trt.Logger(trt.Logger.WARNING)


def start_tensorrt(factory: Any, logger: Any, gpu_name: str, driver_cuda: str) -> Any:
    """`trt.Builder(logger)` or `trt.Runtime(logger)`, or a LlavaEdgeError saying why TensorRT
    could not start: where it cannot initialise CUDA (typically "CUDA initialization failure with
    error 35": a driver older than the CUDA TensorRT was built for), it logs why and its bindings
    raise TypeError("pybind11::init(): factory function returned nullptr")."""
    try:
        return factory(logger)
    except TypeError as e:
        if "nullptr" not in str(e):
            raise
    major = driver_cuda.split(".")[0]
    raise LlavaEdgeError(
        f"TensorRT could not start on the {gpu_name} (its log above says why; usually the NVIDIA "
        f"driver, which supports CUDA {driver_cuda}, is older than the CUDA this TensorRT was "
        f"built for): update the driver, or install TensorRT for CUDA {major} (`pip install "
        f"tensorrt-cu{major}`; on a Jetson, JetPack's)"
    )
