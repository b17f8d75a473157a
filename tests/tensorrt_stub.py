"""A stand-in for the `tensorrt` module, to drive llava-edge's builder and backend on a CPU.

It implements the part of TensorRT's Python API that llava-edge uses and is strict where
TensorRT is: networks must be strongly typed, precision builder flags and calibrators are refused,
every input needs a profile whose shapes agree on each named dimension (the mask's 'past+seq' must
equal past + seq), shapes outside the active profile are rejected, addresses must be 256-byte
aligned, every IO tensor must be bound before a run (a profile switch unbinds them all: shapes and
addresses are set again) to device memory that holds it whole, and a run launches on the calling
thread's current CUDA device, with the stream and every tensor on it. TensorRT keeps one logger
for all its builders and runtimes (the first one's): a builder or runtime given another is
warned, and logging through one freed while a builder or runtime it serves lives fails. It
fails the way TensorRT does: a failed build returns None, a refused address or input shape
returns False, a bad profile index raises, a profile with min > opt raises at `set_shape`,
`create_timing_cache` returns None for bytes it cannot read (and `set_timing_cache(None)` raises
TypeError), `set_timing_cache` returns False for a cache another GPU wrote
(`device_properties`), and the parser needs a graph's external `.data` file.
`use_version("11.1.0.1")` switches to TensorRT 11's enums (no FP16/INT8 builder flags, no
calibrator, STRONGLY_TYPED at bit 0 and another flag at bit 1). Its "engines" remember the ONNX
graph they were built from and run it with onnxruntime, reading inputs from and writing outputs to the
addresses they were given, so the backend's buffers, KV cache and IO binding are exercised for
real. It is not TensorRT: nothing here says anything about real engines' numerics or speed.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math
import weakref
from pathlib import Path

import numpy as np

__version__ = "10.3.0.30"

calls: list[tuple] = []  # every builder/runtime call worth asserting on, in order
errors: list[str] = []  # what the real TensorRT would print through its logger


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1
    PREFER_JIT_PYTHON_PLUGINS = 2
    PREFER_AOT_PYTHON_PLUGINS = 3


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1


class _Flags11(enum.IntEnum):  # TensorRT 11: strongly typed always; the flag kept, at bit 0
    STRONGLY_TYPED = 0
    PREFER_AOT_PYTHON_PLUGINS = 1
    PREFER_JIT_PYTHON_PLUGINS = 2


class _BuilderFlag11(enum.IntEnum):  # FP16, INT8 and the precision constraints are gone
    DEBUG = 1
    GPU_FALLBACK = 2
    REFIT = 3


_VERSION_10 = (__version__, NetworkDefinitionCreationFlag, BuilderFlag)


def use_version(version: str) -> None:
    """Behave as TensorRT `version` (10.x or 11.x) does."""
    global __version__, NetworkDefinitionCreationFlag, BuilderFlag
    if version.startswith("11."):
        __version__, NetworkDefinitionCreationFlag, BuilderFlag = version, _Flags11, _BuilderFlag11
    else:
        _, NetworkDefinitionCreationFlag, BuilderFlag = _VERSION_10
        __version__ = version


def _major() -> int:
    return int(__version__.split(".")[0])


def _strongly_typed(flags: int) -> bool:
    """What the network's creation flags mean to this version."""
    if _major() >= 11:
        known = sum(1 << int(f) for f in _Flags11)
        if flags & ~known or flags & (1 << int(_Flags11.PREFER_AOT_PYTHON_PLUGINS)):
            raise AssertionError(f"creation flags {flags:#b} set a flag other than STRONGLY_TYPED")
        return True
    return bool(flags & (1 << int(_VERSION_10[1].STRONGLY_TYPED)))


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 7: DataType.INT64, 6: DataType.INT32}
NUMPY = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT64: np.int64,
    DataType.INT32: np.int32,
}


class Logger:
    WARNING = 2

    def __init__(self, severity: int = WARNING):
        self.severity = severity


# TensorRT keeps a single logger for all its builders and runtimes: the first one's, for as long as
# any of them exists. A later one's logger is ignored, with a warning ("The logger passed into
# createInferRuntime differs from one already provided for an existing builder, runtime, or
# refitter", NVIDIA/TensorRT issue 1475), and the one in use must stay valid until every object
# made through it is released (ILogger's docstring in TensorRT's Python bindings).
_logger: weakref.ref | None = None
_logger_users: weakref.WeakSet = weakref.WeakSet()  # the builders and runtimes alive


def _take_logger(user: object, logger: Logger, factory: str) -> None:
    global _logger
    if not _logger_users:
        _logger = weakref.ref(logger)
    elif _logger is None or _logger() is not logger:
        errors.append(f"the logger passed into {factory} differs from the one TensorRT uses")
    _logger_users.add(user)
    _log()


def _log() -> None:
    """TensorRT passes every message to its logger (which filters by severity): a freed one is
    a use after free, where real TensorRT would crash or worse."""
    if _logger_users and (_logger is None or _logger() is None):
        raise AssertionError(
            "TensorRT logged through a logger that was freed while a builder or runtime it "
            "serves was alive"
        )


class _Tensor:
    def __init__(self, name: str, dtype: DataType, dims: list):
        self.name, self.dtype, self.dims = name, dtype, dims


class _Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.path: str | None = None
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]


class _ParserError:
    """str() names the node and operator, as TensorRT's ParserError does; desc() only says what."""

    def __init__(self, text: str, node: int = -1, op: str = ""):
        self.text, self.node, self.op = text, node, op

    def desc(self) -> str:
        return self.text

    def __str__(self) -> str:
        return f"In node {self.node} with operator {self.op}: {self.text}"


class OnnxParser:
    def __init__(self, network: _Network, logger: Logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        calls.append(("parse_from_file", path))
        model = onnx.load(path, load_external_data=False)
        for tensor in model.graph.initializer:  # weights in a .data file beside the graph
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = {e.key: e.value for e in tensor.external_data}["location"]
                if not (Path(path).parent / location).is_file():
                    self.errors.append(_ParserError(f"Failed to open file: {location}"))
                    return False
        for index, node in enumerate(model.graph.node):
            if node.domain not in ("", "ai.onnx"):  # e.g. onnxruntime's MatMulNBits
                self.errors.append(
                    _ParserError(
                        f"No importer registered for op: {node.op_type}", index, node.op_type
                    )
                )
                return False
        initializers = {i.name for i in model.graph.initializer}

        def tensors(values):
            out = []
            for v in values:
                if v.name in initializers:
                    continue
                t = v.type.tensor_type
                dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
                out.append(_Tensor(v.name, ONNX_TO_TRT[t.elem_type], dims))
            return out

        self.network.path = path
        self.network.inputs = tensors(model.graph.input)
        self.network.outputs = tensors(model.graph.output)
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> _ParserError:
        return self.errors[i]


# The CUDA device properties a timing cache's header records (TensorRT verifies them when the
# cache is attached to a builder config); a test changes it to play another GPU.
device_properties = "Stub Orin, SM 8.7"


class _TimingCache:
    def __init__(self, entries: list, device: str | None):
        self.entries, self.device = entries, device  # None: empty, fits any device

    def serialize(self) -> bytes:
        head = f"STUB-TIMING {__version__}\t{self.device or device_properties}\n"
        return (head + json.dumps(self.entries)).encode()


def _read_timing(data: bytes) -> _TimingCache | None:
    """None for bytes another version (or anything else) wrote, as TensorRT does."""
    if not data:
        return _TimingCache([], None)
    head, _, body = bytes(data).partition(b"\n")
    version, _, device = head.decode(errors="replace").partition("\t")
    if version != f"STUB-TIMING {__version__}":
        errors.append("timing cache: incompatible or corrupt data")
        return None
    return _TimingCache(json.loads(body), device)


class _Profile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, min, opt, max) -> None:  # noqa: A002 (TensorRT's names)
        low, mid, high = tuple(min), tuple(opt), tuple(max)
        if not (len(low) == len(mid) == len(high)) or not all(
            a <= b <= c for a, b, c in zip(low, mid, high, strict=True)
        ):
            # the bindings raise RuntimeError ("Shape provided for min is inconsistent ...")
            raise RuntimeError(f"{name}: min {low} opt {mid} max {high} are not ordered")
        self.shapes[name] = (low, mid, high)


class _Config:
    def __init__(self):
        self.flags: set[BuilderFlag] = set()
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[_Profile] = []
        self.timing: _TimingCache | None = None
        self.int8_calibrator = None

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def __setattr__(self, name, value) -> None:
        if name == "int8_calibrator" and value is not None and _major() >= 11:
            raise AttributeError("'IBuilderConfig' object has no attribute 'int8_calibrator'")
        object.__setattr__(self, name, value)

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = size

    def create_timing_cache(self, data: bytes) -> _TimingCache | None:
        calls.append(("create_timing_cache", bytes(data)))
        return _read_timing(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        """False for a cache of another device, unless told to ignore the mismatch."""
        if not isinstance(cache, _TimingCache):  # pybind11 refuses None
            raise TypeError("set_timing_cache(): incompatible function arguments")
        if cache.device not in (None, device_properties) and not ignore_mismatch:
            errors.append("timing cache: CUDA device properties differ from the current device")
            return False
        self.timing = cache
        return True

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger  # the bindings keep it alive as long as the builder
        _take_logger(self, logger, "createInferBuilder")

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        _log()
        calls.append(
            ("build", network.path, network.flags, sorted(config.flags), dict(config.pools))
        )
        if not _strongly_typed(network.flags):
            raise AssertionError("the network is not strongly typed")
        if config.flags or config.int8_calibrator is not None:
            raise AssertionError(
                "precision flags or a calibrator were set on a strongly typed build"
            )
        if not config.profiles:
            errors.append("Network has dynamic or shape inputs, but no optimization profile")
            return None
        try:
            for profile in config.profiles:
                _check_profile(network, profile)
        except AssertionError as e:  # TensorRT logs why and returns None
            errors.append(str(e))
            return None
        if config.timing is not None:
            config.timing.entries.append(network.path)
        io = {t.name: ["input", int(t.dtype)] for t in network.inputs}
        io |= {t.name: ["output", int(t.dtype)] for t in network.outputs}
        engine = {
            "path": network.path,
            "io": io,
            "dims": {t.name: t.dims for t in network.inputs + network.outputs},
            "profiles": [
                {k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config.profiles
            ],
        }
        return b"STUB-ENGINE" + json.dumps(engine).encode()


def _check_profile(network: _Network, profile: _Profile) -> None:
    """Every input covered, min <= opt <= max, and each named ONNX dimension one value (sums too)."""
    for t in network.inputs:
        if t.name not in profile.shapes:
            raise AssertionError(f"input {t.name} has no shapes in a profile")
    for point in range(3):
        _bind_dims(
            {t.name: t.dims for t in network.inputs},
            {n: s[point] for n, s in profile.shapes.items()},
        )
    for name, (low, opt, high) in profile.shapes.items():
        if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
            raise AssertionError(f"{name}: min {low} opt {opt} max {high} are not ordered")


def _bind_dims(dims: dict[str, list], shapes: dict[str, tuple]) -> dict[str, int]:
    """The value of each named dimension given input shapes; raises where they disagree."""
    values: dict[str, int] = {}
    for name, spec in dims.items():
        shape = shapes[name]
        if len(shape) != len(spec):
            raise AssertionError(f"{name}: rank {len(shape)}, graph has {len(spec)}")
        for d, v in zip(spec, shape, strict=True):
            if isinstance(d, int) and d > 0 and d != v:
                raise AssertionError(f"{name}: static dim {d} given {v}")
            if isinstance(d, str) and "+" not in d and values.setdefault(d, v) != v:
                raise AssertionError(f"dimension {d} is {values[d]} and {v}")
    for name, spec in dims.items():
        for d, v in zip(spec, shapes[name], strict=True):
            if isinstance(d, str) and "+" in d and sum(values[p] for p in d.split("+")) != v:
                raise AssertionError(f"{name}: {d} must be the sum of its parts, got {v}")
    return values


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger  # the bindings keep it alive as long as the runtime
        _take_logger(self, logger, "createInferRuntime")

    def deserialize_cuda_engine(self, data) -> _Engine | None:
        _log()
        data = bytes(memoryview(data))  # any buffer: bytes, or a memory map of the file
        calls.append(("deserialize_cuda_engine", len(data)))
        if not data.startswith(b"STUB-ENGINE"):
            return None
        return _Engine(json.loads(data[len(b"STUB-ENGINE") :]))


class _Engine:
    def __init__(self, spec: dict):
        self.spec = spec
        self.names = list(spec["io"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.spec["profiles"])

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if self.spec["io"][name][0] == "input" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType(self.spec["io"][name][1])

    def create_execution_context(self) -> _Context:
        _log()
        return _Context(self)


_SESSIONS: dict[str, object] = {}


def _session(path: str):
    import onnxruntime as ort

    if path not in _SESSIONS:
        _SESSIONS[path] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


class _Context:
    def __init__(self, engine: _Engine):
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self._measured: dict[tuple, dict[str, tuple]] = {}

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        calls.append(("set_optimization_profile_async", index))
        if not 0 <= index < self.engine.num_optimization_profiles:
            raise RuntimeError(f"profile index {index} is out of range")
        # a switch invalidates the context's dynamic bindings: every input shape and (strict:
        # TensorRT 10 does not promise to keep them) every tensor address is set again
        self.profile, self.shapes, self.addresses = index, {}, {}
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        calls.append(("set_input_shape", name))
        low, _, high = self.engine.spec["profiles"][self.profile][name]
        if len(shape) != len(low) or not all(
            a <= s <= b for a, s, b in zip(low, shape, high, strict=True)
        ):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        inputs = {
            n: d
            for n, d in self.engine.spec["dims"].items()
            if self.engine.spec["io"][n][0] == "input"
        }
        if self.engine.spec["io"][name][0] == "input":
            return self.shapes.get(name, tuple(-1 for _ in self.engine.spec["dims"][name]))
        values = _bind_dims(inputs, self.shapes)
        shape = tuple(
            values.get(d, -1) if isinstance(d, str) else d for d in self.engine.spec["dims"][name]
        )
        if -1 in shape:  # a dimension no input names (the image tokens): ask the graph
            shape = self._measured_shapes()[name]
        return shape

    def _measured_shapes(self) -> dict[str, tuple]:
        key = tuple(sorted(self.shapes.items()))
        if key not in self._measured:
            io = self.engine.spec["io"]
            feeds = {n: np.zeros(s, NUMPY[DataType(io[n][1])]) for n, s in self.shapes.items()}
            outputs = [n for n in io if io[n][0] == "output"]
            values = _session(self.engine.spec["path"]).run(outputs, feeds)
            self._measured[key] = {n: tuple(v.shape) for n, v in zip(outputs, values, strict=True)}
        return self._measured[key]

    def set_tensor_address(self, name: str, address: int) -> bool:
        calls.append(("set_tensor_address", name))
        if address % 256 or name not in self.engine.spec["io"]:
            errors.append(f"{name} bound at {address:#x}: unknown or not 256-byte aligned")
            return False
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        """Checks now; runs the graph now, or when the CUDA graph it is captured into replays."""
        import cudart_stub

        io = self.engine.spec["io"]
        unbound = sorted(set(io) - set(self.addresses))
        if unbound or set(self.shapes) != {n for n in io if io[n][0] == "input"}:
            raise AssertionError(f"run with unbound tensors {unbound} or unset input shapes")
        if not isinstance(stream, int) or stream == 0:
            raise AssertionError(
                f"execute_async_v3 wants a non-default stream handle, got {stream!r}"
            )
        device = cudart_stub.stream_device(stream)
        elsewhere = sorted(
            n for n, a in self.addresses.items() if cudart_stub.device_of(a) not in (None, device)
        )
        if cudart_stub.current_device() != device or elsewhere:
            # CUDA launches no kernel on a stream of another device than the thread's current one
            errors.append(
                f"enqueueV3 on device {device}'s stream from a thread on device "
                f"{cudart_stub.current_device()}, tensors {elsewhere} on another device"
            )
            return False
        shapes, addresses = dict(self.shapes), dict(self.addresses)
        outputs = {n: self.get_tensor_shape(n) for n in io if io[n][0] == "output"}
        self._check_memory({**shapes, **outputs}, addresses)
        cudart_stub.enqueue(stream, lambda: self._execute(shapes, addresses, outputs))
        calls.append(("execute_async_v3", self.engine.spec["path"], stream))
        return True

    def _check_memory(self, shapes: dict, addresses: dict) -> None:
        """Every tensor wholly inside a live device allocation, when the run is enqueued and
        when it runs (a CUDA graph replays later): the engine reads and writes device memory."""
        import cudart_stub

        for name, shape in shapes.items():
            nbytes = (
                math.prod(shape)
                * np.dtype(NUMPY[DataType(self.engine.spec["io"][name][1])]).itemsize
            )
            if not cudart_stub._inside(addresses[name], nbytes):
                raise AssertionError(f"{name} {shape} at {addresses[name]:#x} is not device memory")

    def _execute(self, shapes: dict, addresses: dict, outputs: dict) -> None:
        self._check_memory({**shapes, **outputs}, addresses)
        io = self.engine.spec["io"]
        feeds = {
            n: _memory(addresses[n], shapes[n], NUMPY[DataType(io[n][1])]).copy() for n in shapes
        }
        names = list(outputs)
        for name, value in zip(
            names, _session(self.engine.spec["path"]).run(names, feeds), strict=True
        ):
            if tuple(value.shape) != outputs[name]:
                raise AssertionError(
                    f"{name}: graph made {value.shape}, shapes say {outputs[name]}"
                )
            _memory(addresses[name], outputs[name], NUMPY[DataType(io[name][1])])[...] = value


def _memory(address: int, shape: tuple, dtype: type) -> np.ndarray:
    """The array at a (host) address: the backend's buffers are CPU torch tensors here."""
    count = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.ctypeslib.as_array(
        ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8)), shape=(count,)
    )
    return raw.view(dtype).reshape(shape)
