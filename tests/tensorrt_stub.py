"""A stand-in for the `tensorrt` module, to drive llava-edge's builder and backend on a CPU.

It implements the part of TensorRT's Python API that llava-edge uses and is strict where
TensorRT is: networks must be strongly typed, precision builder flags and calibrators are refused,
every input needs a profile whose shapes agree on each named dimension (the mask's 'past+seq' must
equal past + seq), shapes outside the active profile are rejected, addresses must be 256-byte
aligned, and every IO tensor must be bound before a run. Its "engines" remember the ONNX graph
they were built from and run it with onnxruntime, reading inputs from and writing outputs to the
addresses they were given, so the backend's buffers, KV cache and IO binding are exercised for
real. It is not TensorRT: nothing here says anything about real engines' numerics or speed.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math

import numpy as np

__version__ = "10.3.0.30"

calls: list[tuple] = []  # every builder/runtime call worth asserting on, in order


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1


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
    def __init__(self, text: str):
        self.text = text

    def desc(self) -> str:
        return self.text


class OnnxParser:
    def __init__(self, network: _Network, logger: Logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        calls.append(("parse_from_file", path))
        model = onnx.load(path, load_external_data=False)
        unsupported = sorted(
            {n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")}
        )
        if unsupported:  # e.g. onnxruntime's MatMulNBits, which TensorRT's parser does not know
            self.errors.append(_ParserError(f"No importer registered for op: {unsupported[0]}"))
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


class _TimingCache:
    def __init__(self, data: bytes):
        self.entries = json.loads(data) if data else []

    def serialize(self) -> bytes:
        return json.dumps(self.entries).encode()


class _Profile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, min, opt, max) -> None:  # noqa: A002 (TensorRT's names)
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class _Config:
    def __init__(self):
        self.flags: set[BuilderFlag] = set()
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[_Profile] = []
        self.timing: _TimingCache | None = None
        self.int8_calibrator = None

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = size

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        calls.append(("create_timing_cache", bytes(data)))
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.timing = cache
        return True

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        calls.append(
            ("build", network.path, network.flags, sorted(config.flags), dict(config.pools))
        )
        if not network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)):
            raise AssertionError("the network is not strongly typed")
        if config.flags or config.int8_calibrator is not None:
            raise AssertionError(
                "precision flags or a calibrator were set on a strongly typed build"
            )
        if not config.profiles:
            raise AssertionError("no optimization profile")
        for profile in config.profiles:
            _check_profile(network, profile)
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
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
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
            return False
        self.profile, self.shapes = index, {}
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
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
        if address % 256:
            raise AssertionError(f"{name} bound at {address:#x}, not 256-byte aligned")
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        io = self.engine.spec["io"]
        unbound = sorted(set(io) - set(self.addresses))
        if unbound or set(self.shapes) != {n for n in io if io[n][0] == "input"}:
            raise AssertionError(f"run with unbound tensors {unbound} or unset input shapes")
        path = self.engine.spec["path"]
        feeds = {
            n: _memory(self.addresses[n], self.shapes[n], NUMPY[DataType(io[n][1])]).copy()
            for n in self.shapes
        }
        outputs = [n for n in io if io[n][0] == "output"]
        for name, value in zip(outputs, _session(path).run(outputs, feeds), strict=True):
            shape = self.get_tensor_shape(name)
            if tuple(value.shape) != shape:
                raise AssertionError(f"{name}: graph made {value.shape}, shapes say {shape}")
            _memory(self.addresses[name], shape, NUMPY[DataType(io[name][1])])[...] = value
        calls.append(("execute_async_v3", path, stream))
        return True


def _memory(address: int, shape: tuple, dtype: type) -> np.ndarray:
    """The array at a (host) address: the backend's buffers are CPU torch tensors here."""
    count = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.ctypeslib.as_array(
        ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8)), shape=(count,)
    )
    return raw.view(dtype).reshape(shape)
