"""The GPU this machine has, read from the NVIDIA driver (libcuda) with ctypes.

Hand-written rather than taken from torch or cuda-python because `llava-edge doctor` and the
engine records must work when those are missing (that is what doctor reports), and the driver
library is present wherever a GPU can be used at all, Jetson included. Only a few stable driver
API calls are used (cuInit, cuDeviceGet*, cuMemGetInfo), all there since CUDA 3.2.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path

from llava_edge.errors import LlavaEdgeError

CU_DEVICE_ATTRIBUTE_INTEGRATED = 18
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "8.7"
    total_memory: int  # bytes
    free_memory: int | None  # bytes; None when no context could be made to ask
    integrated: bool  # shares memory with the CPU (Jetson)
    driver_cuda: str  # the newest CUDA version the driver supports, "12.6"


def probe_gpus() -> list[GpuInfo]:
    """Every CUDA GPU the driver sees; raises LlavaEdgeError saying why there is none."""
    cuda = _load_driver()
    _check(cuda.cuInit(0), "cuInit")
    version = ctypes.c_int()
    _check(cuda.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
    count = ctypes.c_int()
    _check(cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    if count.value == 0:
        raise LlavaEdgeError("the NVIDIA driver sees no CUDA GPU on this machine")
    driver = f"{version.value // 1000}.{version.value % 1000 // 10}"
    return [_device(cuda, i, driver) for i in range(count.value)]


def probe_gpu(index: int = 0) -> GpuInfo:
    gpus = probe_gpus()
    if index >= len(gpus):
        raise LlavaEdgeError(f"there is no CUDA GPU {index}: this machine has {len(gpus)}")
    return gpus[index]


def device_free_memory(index: int = 0) -> int | None:
    """GPU `index`'s free memory now, or None where there is no driver or no such GPU: cheap
    enough to sample while a model loads."""
    try:
        cuda = _load_driver()
        _check(cuda.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        _check(cuda.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    except LlavaEdgeError:
        return None
    return _free_memory(cuda, dev)


def _load_driver() -> ctypes.CDLL:
    names = ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")]
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise LlavaEdgeError(
        "no NVIDIA driver here (libcuda.so.1 not found): a CUDA GPU and its driver are needed "
        "(on a Jetson, flash JetPack 6)"
    )


def _device(cuda: ctypes.CDLL, index: int, driver: str) -> GpuInfo:
    dev = ctypes.c_int()
    _check(cuda.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    _check(cuda.cuDeviceGetName(name, 256, dev), "cuDeviceGetName")
    major, minor, integrated = (ctypes.c_int() for _ in range(3))
    _check(
        cuda.cuDeviceGetAttribute(
            ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev
        ),
        "cuDeviceGetAttribute",
    )
    _check(
        cuda.cuDeviceGetAttribute(
            ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev
        ),
        "cuDeviceGetAttribute",
    )
    _check(
        cuda.cuDeviceGetAttribute(ctypes.byref(integrated), CU_DEVICE_ATTRIBUTE_INTEGRATED, dev),
        "cuDeviceGetAttribute",
    )
    total = ctypes.c_size_t()
    _check(cuda.cuDeviceTotalMem_v2(ctypes.byref(total), dev), "cuDeviceTotalMem")
    return GpuInfo(
        index=index,
        name=name.value.decode(errors="replace"),
        compute_capability=f"{major.value}.{minor.value}",
        total_memory=total.value,
        free_memory=_free_memory(cuda, dev),
        integrated=bool(integrated.value),
        driver_cuda=driver,
    )


def _free_memory(cuda: ctypes.CDLL, dev: ctypes.c_int) -> int | None:
    """Free memory as the driver counts it, through the device's primary context."""
    ctx = ctypes.c_void_p()
    if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0:
        return None
    try:
        if cuda.cuCtxPushCurrent_v2(ctx) != 0:
            return None
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        ok = cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
        cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        return free.value if ok else None
    finally:
        cuda.cuDevicePrimaryCtxRelease_v2(dev)


def host_available_memory() -> int | None:
    """What Linux can still give programs (MemAvailable: free memory, and the page cache it would
    drop), or None where it cannot say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


CUDA_ERROR_NO_DEVICE = 100


def _check(status: int, call: str) -> None:
    if status == CUDA_ERROR_NO_DEVICE:
        raise LlavaEdgeError("the NVIDIA driver is installed but sees no CUDA GPU")
    if status != 0:
        raise LlavaEdgeError(
            f"the NVIDIA driver failed {call} (CUresult {status}); check the driver install "
            "(`nvidia-smi`, or on a Jetson `cat /etc/nv_tegra_release`)"
        )
