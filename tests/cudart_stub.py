"""A stand-in for cuda-python's runtime module (`cuda.bindings.runtime`), on the CPU.

"Device" memory is host memory from ctypes, so tests/tensorrt_stub.py's engines read and write it
at the addresses the backend binds. It keeps cuda-python's conventions (every call returns a tuple
whose first item is a cudaError_t) and is strict where CUDA is: fresh allocations hold garbage
(0xFF bytes, NaN as floats), not zeros; every device access must lie inside a live allocation;
pitches must hold their rows; a stream being captured takes no synchronize and no copy to or from
the host; only work on the capturing stream is recorded into the graph, then replayed by
`cudaGraphLaunch`. `limit` makes cudaMalloc fail past that many bytes in use. The current device
is per host thread (0 until `cudaSetDevice`), as CUDA's is: memory is allocated on the calling
thread's device and a stream belongs to the device it was made on (`device_of`,
`stream_device`), so the TensorRT stand-in can refuse to launch work across devices.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import threading


class cudaError_t(enum.IntEnum):  # noqa: N801 (CUDA's names)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


cudaStreamNonBlocking = 1
OK = cudaError_t.cudaSuccess

calls: list[tuple] = []  # (name, ...) of the calls worth asserting on
limit: int | None = None  # bytes of device memory; cudaMalloc fails past it
_memory: dict[int, ctypes.Array] = {}  # live allocations by address
_allocated_on: dict[int, int] = {}  # live allocation's address -> device
_thread = threading.local()  # .device: the calling thread's current device
_capturing: dict[int, list] = {}  # stream handle -> work recorded so far
_handles = itertools.count(0x1000)
_streams: dict[int, int] = {}  # stream handle -> device


class cudaStream_t:  # noqa: N801
    def __init__(self) -> None:
        self.handle = next(_handles)
        self.device = current_device()
        _streams[self.handle] = self.device

    def __int__(self) -> int:
        return self.handle


class cudaGraph_t:  # noqa: N801
    def __init__(self, work: list) -> None:
        self.work = work


class cudaGraphExec_t:  # noqa: N801
    def __init__(self, work: list) -> None:
        self.work = work


def reset() -> None:
    global limit
    calls.clear()
    _capturing.clear()
    limit = None


def in_use() -> int:
    return sum(ctypes.sizeof(b) for b in _memory.values())


def capturing(stream: int) -> bool:
    return int(stream) in _capturing


def current_device() -> int:
    return getattr(_thread, "device", 0)


def stream_device(stream: int) -> int:
    return _streams[int(stream)]


def device_of(ptr: int) -> int | None:
    """The device of the allocation holding `ptr` (None: not device memory)."""
    for address, buffer in _memory.items():
        if address <= ptr < address + ctypes.sizeof(buffer):
            return _allocated_on[address]
    return None


def enqueue(stream, work) -> None:
    """Run `work` now, or record it when the stream is being captured (TensorRT's enqueue too)."""
    recorded = _capturing.get(int(stream))
    if recorded is None:
        work()
    else:
        recorded.append(work)


def _inside(ptr: int, nbytes: int) -> bool:
    return any(a <= ptr and ptr + nbytes <= a + ctypes.sizeof(b) for a, b in _memory.items())


def _check(ptr: int, nbytes: int, device: bool) -> None:
    if device and nbytes and not _inside(ptr, nbytes):
        raise AssertionError(f"device access [{ptr:#x}, +{nbytes}) outside every allocation")


# ---- memory --------------------------------------------------------------------------------


def cudaSetDevice(index: int):  # noqa: N802
    calls.append(("cudaSetDevice", index))
    _thread.device = index
    return (OK,)


def cudaMalloc(nbytes: int):  # noqa: N802
    if limit is not None and in_use() + nbytes > limit:
        return (cudaError_t.cudaErrorMemoryAllocation, None)
    buffer = (ctypes.c_uint8 * nbytes)()
    ctypes.memset(buffer, 0xFF, nbytes)  # real device memory is not zeroed
    address = ctypes.addressof(buffer)
    _memory[address] = buffer
    _allocated_on[address] = current_device()
    calls.append(("cudaMalloc", nbytes))
    return (OK, address)


def cudaFree(ptr: int):  # noqa: N802
    if ptr not in _memory:
        return (cudaError_t.cudaErrorInvalidValue,)
    del _memory[ptr], _allocated_on[ptr]
    calls.append(("cudaFree", ptr))
    return (OK,)


def _copy_kind(kind: cudaMemcpyKind) -> tuple[bool, bool]:
    """(destination on the device, source on the device)"""
    return {
        cudaMemcpyKind.cudaMemcpyHostToHost: (False, False),
        cudaMemcpyKind.cudaMemcpyHostToDevice: (True, False),
        cudaMemcpyKind.cudaMemcpyDeviceToHost: (False, True),
        cudaMemcpyKind.cudaMemcpyDeviceToDevice: (True, True),
    }[cudaMemcpyKind(kind)]


def cudaMemcpyAsync(dst: int, src: int, count: int, kind, stream):  # noqa: N802
    dst_device, src_device = _copy_kind(kind)
    if capturing(stream) and not (dst_device and src_device):
        return (cudaError_t.cudaErrorStreamCaptureUnsupported,)  # host memory in a graph
    _check(dst, count, dst_device)
    _check(src, count, src_device)
    enqueue(stream, lambda: ctypes.memmove(dst, src, count))
    return (OK,)


def cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream):  # noqa: N802
    dst_device, src_device = _copy_kind(kind)
    if width > dpitch or width > spitch:
        return (cudaError_t.cudaErrorInvalidValue,)
    for row in range(height):
        _check(dst + row * dpitch, width, dst_device)
        _check(src + row * spitch, width, src_device)
    calls.append(("cudaMemcpy2DAsync", width, height))

    def work() -> None:
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)

    enqueue(stream, work)
    return (OK,)


def cudaMemsetAsync(ptr: int, value: int, count: int, stream):  # noqa: N802
    _check(ptr, count, True)
    enqueue(stream, lambda: ctypes.memset(ptr, value, count))
    return (OK,)


def cudaMemset2DAsync(ptr: int, pitch: int, value: int, width: int, height: int, stream):  # noqa: N802
    if width > pitch:
        return (cudaError_t.cudaErrorInvalidValue,)
    for row in range(height):
        _check(ptr + row * pitch, width, True)

    def work() -> None:
        for row in range(height):
            ctypes.memset(ptr + row * pitch, value, width)

    enqueue(stream, work)
    return (OK,)


# ---- streams and graphs --------------------------------------------------------------------


def cudaStreamCreateWithFlags(flags: int):  # noqa: N802
    calls.append(("cudaStreamCreateWithFlags", flags))
    return (OK, cudaStream_t())


def cudaStreamDestroy(stream):  # noqa: N802
    calls.append(("cudaStreamDestroy", int(stream)))
    return (OK,)


def cudaStreamSynchronize(stream):  # noqa: N802
    if capturing(stream):
        return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
    return (OK,)


def cudaStreamBeginCapture(stream, mode):  # noqa: N802
    calls.append(("cudaStreamBeginCapture", cudaStreamCaptureMode(mode)))
    _capturing[int(stream)] = []
    return (OK,)


def cudaStreamEndCapture(stream):  # noqa: N802
    work = _capturing.pop(int(stream))
    calls.append(("cudaStreamEndCapture",))
    return (OK, cudaGraph_t(work))


def cudaGraphInstantiate(graph, flags: int):  # noqa: N802
    return (OK, cudaGraphExec_t(graph.work))


def cudaGraphLaunch(graph_exec, stream):  # noqa: N802
    calls.append(("cudaGraphLaunch",))

    def replay() -> None:
        for work in graph_exec.work:
            work()

    enqueue(stream, replay)
    return (OK,)


def cudaGraphExecDestroy(graph_exec):  # noqa: N802
    return (OK,)


def cudaGraphDestroy(graph):  # noqa: N802
    calls.append(("cudaGraphDestroy",))
    return (OK,)


def cudaGetErrorName(error):  # noqa: N802
    return (OK, cudaError_t(error).name.encode())
