"""The CUDA runtime calls the TensorRT backend makes, through cuda-python.

cuda-python (`cuda.bindings.runtime`, formerly `cuda.cudart`) is what TensorRT's own Python
samples use to hold device memory: a thin binding of the CUDA runtime API, a few MB, where torch
would be a multi-GB install that a Jetson can only get from NVIDIA's own wheels. Every call here
returns cuda-python's `(error, result...)` tuple; a failure becomes a LlavaEdgeError naming the
call and CUDA's error name, never a silent wrong result.

Device memory is plain addresses: `DeviceArray` is a typed view (address, shape, dtype) of memory
someone owns, the shape a prefix of what was allocated, so binding it to TensorRT is giving it the
address.
"""

from __future__ import annotations

import importlib
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError, first_line

# The release of CUDA 12 (JetPack 6's): the unpinned `cuda-python` is a CUDA 13 release, which a
# CUDA 12 driver cannot run. The same range as pyproject.toml's `trt` extra.
CUDA_BINDINGS = "cuda-bindings>=12.6,<13"
CUDA_HINT = (
    f"the TensorRT backend reaches the GPU through cuda-python: `pip install '{CUDA_BINDINGS}'` "
    "(on an x86 or SBSA server `pip install 'llava-edge[trt]'` installs it with TensorRT)"
)


def import_cudart() -> Any:
    """cuda-python's runtime module (the 12.6+ name, or the older `cuda.cudart`)."""
    failure = None
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        except ImportError as e:  # installed, but a library it loads is missing
            failure = failure or e
    if failure is not None:
        raise LlavaEdgeError(f"cuda-python does not load ({first_line(failure)}); {CUDA_HINT}")
    raise LlavaEdgeError(f"cuda-python is not installed; {CUDA_HINT}")


@dataclass(frozen=True)
class DeviceArray:
    """A typed view of device memory: `shape` elements of `dtype` from address `ptr`."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Cuda:
    """The calls the backend needs, each checked. One instance per backend."""

    def __init__(self, runtime: Any | None = None):
        self.rt = runtime if runtime is not None else import_cudart()
        self.device: int | None = None  # set_device's: made current on each calling thread
        self._thread = threading.local()
        self._success = int(self.rt.cudaError_t.cudaSuccess)
        kinds = self.rt.cudaMemcpyKind
        self.host_to_device = kinds.cudaMemcpyHostToDevice
        self.device_to_host = kinds.cudaMemcpyDeviceToHost
        self.device_to_device = kinds.cudaMemcpyDeviceToDevice

    def call(self, name: str, *args: Any) -> Any:
        """Run `name(*args)`; its results after the error code (one, several, or None)."""
        if self.device is not None and getattr(self._thread, "device", None) != self.device:
            self.use()
        return self._checked(name, getattr(self.rt, name)(*args))

    def _checked(self, name: str, result: tuple) -> Any:
        error, rest = result[0], result[1:]
        if int(error) != self._success:
            reason = self.error_name(error)
            if reason == "cudaErrorInsufficientDriver":  # e.g. cuda-python 13 on JetPack 6
                reason += (
                    ": the NVIDIA driver is older than the CUDA this cuda-python was built for; "
                    f"`pip install '{CUDA_BINDINGS}'`, or update the driver"
                )
            raise LlavaEdgeError(f"CUDA {name} failed: {reason}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def error_name(self, error: Any) -> str:
        try:
            _, name = self.rt.cudaGetErrorName(error)
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            return str(error)

    # ---- devices, memory, streams --------------------------------------------------------------

    def set_device(self, index: int) -> None:
        """Use GPU `index` from now on, on every thread. CUDA's current device is per host
        thread, and memory is allocated and TensorRT launches on the calling thread's: a backend
        made on one thread and run on another (a batching thread, a server's worker) would
        otherwise allocate its KV cache on GPU 0 and launch on it."""
        self.device = index
        self.use()

    def use(self) -> None:
        """Make the device current on this thread (again: other code may have changed it)."""
        if self.device is not None:
            self._checked("cudaSetDevice", self.rt.cudaSetDevice(self.device))
            self._thread.device = self.device

    def malloc(self, nbytes: int) -> int:
        try:
            return int(self.call("cudaMalloc", max(nbytes, 1)))
        except LlavaEdgeError as e:
            raise LlavaEdgeError(
                f"out of GPU memory allocating {nbytes / 2**20:.1f} MiB ({e}); lower --max-context "
                "or --max-batch when building, or check `llava-edge plan`"
            ) from None

    def free(self, ptr: int) -> None:
        self.call("cudaFree", ptr)

    def stream(self) -> Any:
        """A non-blocking stream: it does not wait for work on the legacy default stream."""
        return self.call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)

    def destroy_stream(self, stream: Any) -> None:
        self.call("cudaStreamDestroy", stream)

    def synchronize(self, stream: Any) -> None:
        self.call("cudaStreamSynchronize", stream)

    # ---- copies --------------------------------------------------------------------------------

    def to_device(self, dst: DeviceArray, array: np.ndarray, stream: Any) -> None:
        """Copy a host array into `dst` (pageable memory: the call returns once it is staged)."""
        array = np.ascontiguousarray(array, dtype=dst.dtype)
        if array.nbytes != dst.nbytes:
            raise ValueError(f"copying {array.nbytes} bytes into a {dst.nbytes}-byte view")
        self.call(
            "cudaMemcpyAsync", dst.ptr, array.ctypes.data, array.nbytes, self.host_to_device, stream
        )

    def to_host(self, src: DeviceArray, stream: Any) -> np.ndarray:
        """A new host array with `src`'s contents; waits for the stream (the step's one sync)."""
        out = np.empty(src.shape, dtype=src.dtype)
        self.call(
            "cudaMemcpyAsync", out.ctypes.data, src.ptr, out.nbytes, self.device_to_host, stream
        )
        self.synchronize(stream)
        return out

    def copy_rows(
        self,
        dst: int,
        dst_pitch: int,
        src: int,
        src_pitch: int,
        width: int,
        rows: int,
        stream: Any,
    ) -> None:
        """Copy `rows` rows of `width` bytes on the device, each pitch apart (one 2-D copy)."""
        if width and rows:
            self.call(
                "cudaMemcpy2DAsync",
                dst,
                dst_pitch,
                src,
                src_pitch,
                width,
                rows,
                self.device_to_device,
                stream,
            )

    def zero(self, ptr: int, nbytes: int, stream: Any) -> None:
        if nbytes:
            self.call("cudaMemsetAsync", ptr, 0, nbytes, stream)

    def zero_rows(self, ptr: int, pitch: int, width: int, rows: int, stream: Any) -> None:
        """Zero `rows` rows of `width` bytes, each `pitch` apart."""
        if width and rows:
            self.call("cudaMemset2DAsync", ptr, pitch, 0, width, rows, stream)

    # ---- CUDA graphs ---------------------------------------------------------------------------

    def begin_capture(self, stream: Any) -> None:
        """Thread-local mode, as trtexec captures: CUDA calls of other threads (another request,
        a camera reader) neither break this capture nor are captured into it."""
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.call("cudaStreamBeginCapture", stream, mode)

    def end_capture(self, stream: Any) -> Any:
        return self.call("cudaStreamEndCapture", stream)

    def instantiate(self, graph: Any) -> Any:
        return self.call("cudaGraphInstantiate", graph, 0)

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self.call("cudaGraphLaunch", graph_exec, stream)

    def destroy_graph(self, graph: Any, graph_exec: Any) -> None:
        if graph_exec is not None:
            self.call("cudaGraphExecDestroy", graph_exec)
        if graph is not None:
            self.call("cudaGraphDestroy", graph)


class Allocation:
    """One device allocation, aligned to 256 bytes (what TensorRT wants of every address)."""

    ALIGNMENT = 256

    def __init__(self, cuda: Cuda, nbytes: int):
        self.cuda = cuda
        self.nbytes = nbytes
        self.raw = cuda.malloc(nbytes + self.ALIGNMENT - 1)
        self.ptr = self.raw + (-self.raw) % self.ALIGNMENT

    def free(self) -> None:
        if self.raw:
            self.cuda.free(self.raw)
            self.raw = self.ptr = 0
