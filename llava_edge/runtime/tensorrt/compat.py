"""May these engines run here? Checked before TensorRT is asked to load them.

A TensorRT engine is tied to the TensorRT version that built it and to the GPU's compute
capability (an engine built on an Orin, SM 8.7, does not load on an SM 8.6 card), and it was built
from one exact graph file. `llava-edge build` records all three in the manifest; loading compares
them with this machine and the model dir and says to rebuild on any mismatch, instead of leaving
the user with TensorRT's deserialization error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import EngineSet, GraphSpec, Manifest, sha256

# TensorRT's DataType names -> numpy dtype names, for the types llava-edge graphs carry at IO.
TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class Platform:
    """What an engine is tied to: the TensorRT version and the GPU."""

    tensorrt: str
    gpu: str
    compute_capability: str


def engine_dir_key(model_dir: str | os.PathLike, engine_dir: str | os.PathLike) -> str:
    """How the manifest names an engine dir: relative to the model dir when inside it (so the
    pair can be copied together), else its absolute path."""
    model, engines = Path(model_dir).resolve(), Path(engine_dir).resolve()
    try:
        return engines.relative_to(model).as_posix()
    except ValueError:
        return engines.as_posix()


def engine_dir_path(model_dir: str | os.PathLike, key: str) -> Path:
    return Path(model_dir) / key  # an absolute key replaces the model dir


def select_engines(
    manifest: Manifest,
    model_dir: str | os.PathLike,
    engine_dir: str | os.PathLike | None,
    platform: Platform,
) -> tuple[Path, EngineSet]:
    """The engine set to load: the one in `engine_dir`, else the one built for this platform."""
    build = f"llava-edge build {model_dir}"
    if not manifest.engines:
        raise LlavaEdgeError(f"{model_dir} has no TensorRT engines yet; build them with `{build}`")
    if engine_dir is not None:
        key = engine_dir_key(model_dir, engine_dir)
        if key not in manifest.engines:
            raise LlavaEdgeError(
                f"{engine_dir} holds no engines built for {model_dir} (built: "
                f"{', '.join(sorted(manifest.engines))}); build them with "
                f"`{build} --out {engine_dir}`"
            )
        return engine_dir_path(model_dir, key), manifest.engines[key]
    fitting = [k for k, e in manifest.engines.items() if _fits(e, platform)]
    key = fitting[0] if fitting else sorted(manifest.engines)[0]
    return engine_dir_path(model_dir, key), manifest.engines[key]


def _fits(engines: EngineSet, platform: Platform) -> bool:
    return engines.compute_capability == platform.compute_capability and same_tensorrt(
        engines.tensorrt, platform.tensorrt
    )


def same_tensorrt(a: str, b: str) -> bool:
    """Engines load only in the TensorRT release that built them: TensorRT's support policy asks
    plan files (and timing caches) to match in major, minor, patch and build version (10.3.0.26
    does not load 10.3.0.30's engines)."""
    return a.strip().split(".") == b.strip().split(".")


def check_engines(
    engines: EngineSet,
    engine_dir: Path,
    manifest: Manifest,
    model_dir: str | os.PathLike,
    platform: Platform,
    hashes: bool = False,
) -> list[str]:
    """Fail with a message that says to rebuild on any mismatch; return softer warnings."""
    rebuild = f"rebuild them with `llava-edge build {model_dir} --out {engine_dir}`"
    if not same_tensorrt(engines.tensorrt, platform.tensorrt):
        raise LlavaEdgeError(
            f"the engines in {engine_dir} were built with TensorRT {engines.tensorrt}, but this "
            f"machine has TensorRT {platform.tensorrt}; {rebuild}"
        )
    if engines.compute_capability != platform.compute_capability:
        raise LlavaEdgeError(
            f"the engines in {engine_dir} were built for a GPU of compute capability "
            f"{engines.compute_capability} ({engines.gpu}), but this GPU ({platform.gpu}) is "
            f"{platform.compute_capability}; {rebuild}"
        )
    warnings = []
    if engines.gpu != platform.gpu:
        warnings.append(
            f"the engines in {engine_dir} were built on a {engines.gpu} and run here on a "
            f"{platform.gpu}: same compute capability, so they load, but their kernels were "
            f"timed on the other GPU; {rebuild} for full speed"
        )
    for name, graph in manifest.graphs.items():
        engine = engines.engines.get(name)
        if engine is None:
            raise LlavaEdgeError(f"{engine_dir} has no engine for graph {name}; {rebuild}")
        source = graph.tensorrt_file or graph.file
        recorded = manifest.graph_digest(source)
        if engine.source != source or (recorded and recorded != engine.source_sha256):
            raise LlavaEdgeError(
                f"graph {source} changed after its engine was built (re-exported or "
                f"re-quantized); {rebuild}"
            )
        path = engine_dir / engine.file
        if not path.is_file():
            raise LlavaEdgeError(f"engine {path} is missing; {rebuild}")
        if path.stat().st_size != engine.size or (hashes and sha256(path) != engine.sha256):
            raise LlavaEdgeError(f"engine {path} is truncated or altered; {rebuild}")
    return warnings


def engine_io(engine: Any, trt: Any) -> dict[str, tuple[str, str]]:
    """name -> ('input' | 'output', numpy dtype) of every IO tensor of a deserialized engine."""
    out = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        out[name] = (mode, numpy_dtype(engine.get_tensor_dtype(name)))
    return out


def numpy_dtype(trt_dtype: Any) -> str:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TRT_DTYPES:
        raise LlavaEdgeError(f"an engine tensor has type {name}, which llava-edge does not bind")
    return TRT_DTYPES[name]


FLOATS = ("float32", "float16")


def check_engine_io(
    graph: str,
    spec: GraphSpec,
    io: dict[str, tuple[str, str]],
    rebuild: str,
    float_may_be_half: bool = False,
) -> None:
    """The engine's IO names, directions and types must be the manifest's: it is how buffers are
    bound by name. float_may_be_half: the engine was built from the graph's TensorRT form, which
    may compute (and so take and give) in fp16 where the manifest's graph uses fp32; the backend
    sizes its buffers by the engine's types."""
    expected = {n: ("input", s.dtype) for n, s in spec.inputs.items()}
    expected |= {n: ("output", s.dtype) for n, s in spec.outputs.items()}
    if float_may_be_half:
        io = {
            n: (mode, expected[n][1])
            if n in expected and dtype in FLOATS and expected[n][1] in FLOATS
            else (mode, dtype)
            for n, (mode, dtype) in io.items()
        }
    if io == expected:
        return
    missing = sorted(set(expected) - set(io))
    extra = sorted(set(io) - set(expected))
    differ = sorted(n for n in set(io) & set(expected) if io[n] != expected[n])
    parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
    parts.append(
        "; ".join(
            f"{n} is {io[n][0]} {io[n][1]}, manifest says {expected[n][0]} {expected[n][1]}"
            for n in differ
        )
    )
    detail = "; ".join(p for p in parts if p)
    raise LlavaEdgeError(
        f"the {graph} engine's inputs/outputs differ from the manifest ({detail}); {rebuild}"
    )
