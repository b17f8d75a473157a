"""`llava-edge build`: one TensorRT engine per graph of a model dir, recorded in its manifest.

Networks are strongly typed: the precision of every tensor comes from the ONNX itself (fp16
tensors, Q/DQ nodes), never from builder flags. TensorRT 10.1 deprecated its INT8 calibrators and
10.12 its FP16/INT8 flags; TensorRT 11 removed both and always builds strongly typed (the flag is
kept there and ignored), so the same code builds on JetPack 6 (TensorRT 10.3) and on 11.x.

Engine files are named by their content (`decoder.<sha256 prefix>.engine`; one byte-identical to
an engine another model recorded in a shared dir gets a suffix of its own), so a build never
overwrites the engines the manifest records: it writes new files, then saves the manifest (one
atomic rename, the build's only commit point), then deletes the engines that this model's previous
build into the same dir made and no record names any more (never other files: an engine dir may be
shared by several models, or with other programs); a build that fails before its commit removes the
new engines it wrote, which no manifest names, and one killed before it leaves a note of them in
the model dir for the next build to remove. Each engine is written under a temporary name of the
build's own (several models' builds may share an engine dir at the same time), and the next build
removes what a killed one was writing. Engines are flushed to disk before the manifest names
them, so killed, failed or cut off from power at any moment, a build leaves the manifest pointing
at engines that are all there, old or new. The timing cache is read before and saved after (also
after a failure; written under a name of the build's own, then renamed, as builds sharing it may
save at once), so a rebuild skips the kernel timing it already did.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError
from llava_edge.files import _alive, fsync_path, replace_file
from llava_edge.manifest import EngineSet, EngineSpec, Manifest
from llava_edge.runtime.tensorrt import gpu
from llava_edge.runtime.tensorrt.compat import engine_dir_key, engine_dir_path
from llava_edge.runtime.tensorrt.profiles import (
    DEFAULT_KV_CHUNK,
    DEFAULT_PREFILL_CHUNK,
    EngineLimits,
    graph_profiles,
)
from llava_edge.runtime.tensorrt.requirements import (
    import_tensorrt,
    start_tensorrt,
    tensorrt_logger,
)

ENGINE_DIR = "engines"  # default, inside the model dir
# In the model dir while a build renames its engines into place and has not yet saved the manifest:
# the files that a build killed then would leave, for the next one to remove.
UNCOMMITTED = ".engines-uncommitted.json"
# Integrated GPUs (Jetson) share the board's memory: TensorRT's default scratch limit is all of it
INTEGRATED_WORKSPACE = 2 << 30


def timing_cache_name(version: str) -> str:
    """The default timing cache file in an engine dir: one per TensorRT version, since another
    version cannot read it."""
    return f"timing-{version}.cache"


def build_engines(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    max_batch: int = 1,
    max_context: int | None = None,
    workspace_gb: float | None = None,
    timing_cache: str | os.PathLike | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    kv_chunk: int = DEFAULT_KV_CHUNK,
    log: Any = print,
    check_memory: bool = True,
) -> Path:
    """Build the engines of `model_dir` into `out_dir` (default MODEL_DIR/engines); returns it.

    max_context: the longest conversation the engines take (default: the model's); the KV cache
    is reserved for it, so a smaller value saves memory. workspace_gb caps TensorRT's scratch
    memory while it builds and runs (default: TensorRT's, the whole GPU). prefill_chunk: most
    tokens one decoder call takes (longer prompts run in pieces); kv_chunk: the step by which the
    device KV cache grows. check_memory: refuse engines that `llava-edge plan` says cannot fit in
    the GPU's free memory.
    """
    model_dir = Path(model_dir)
    manifest = Manifest.load(model_dir)
    manifest.check_files(model_dir)
    limits = _limits(manifest, max_batch, max_context, prefill_chunk, kv_chunk)
    _check_row_alignment(model_dir, manifest, limits)
    if workspace_gb is not None and not 0 < workspace_gb < math.inf:  # nan too
        raise LlavaEdgeError(f"--workspace must be a positive number of GiB, got {workspace_gb}")
    profiles = {name: graph_profiles(manifest, name, limits) for name in manifest.graphs}
    trt = import_tensorrt()
    device = gpu.probe_gpu(0)  # TensorRT builds for the current CUDA device, the first
    if check_memory:
        _check_memory(model_dir, device, limits)
    out = Path(out_dir) if out_dir is not None else model_dir / ENGINE_DIR
    _check_writable(model_dir, out)
    _remove_stale_writes(out)
    _remove_uncommitted(model_dir, manifest)
    cache_path = (
        Path(timing_cache) if timing_cache is not None else out / timing_cache_name(trt.__version__)
    )
    _check_timing_cache(cache_path)
    _remove_stale_writes(cache_path.parent, f".{glob.escape(cache_path.name)}.*-*.tmp")
    workspace = int(workspace_gb * 2**30) if workspace_gb is not None else None
    if workspace is None and device.integrated:
        workspace = min(INTEGRATED_WORKSPACE, free_memory(device) // 4)

    logger = tensorrt_logger(trt)
    builder = start_tensorrt(trt.Builder, logger, device.name, device.driver_cuda)
    timing = None
    built: dict[str, tuple[Path, EngineSpec]] = {}
    installed: list[Path] = []  # new engine files renamed into `out`, not yet in the manifest
    try:
        with _progress(len(manifest.graphs), log) as bar:
            for name, graph in manifest.graphs.items():
                bar.set_postfix_str(name)
                config = builder.create_builder_config()
                if timing is None:
                    # One cache object serves every graph of the build (TensorRT shares a timing
                    # cache across builder configs); it starts from the file when there is one.
                    timing = _timing_cache(config, cache_path, log)
                elif not config.set_timing_cache(timing, False):
                    raise LlavaEdgeError(
                        "TensorRT refused the timing cache; delete " + str(cache_path)
                    )
                if workspace is not None:
                    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
                source = graph.tensorrt_file or graph.file
                network, parser = _parse(
                    trt, builder, logger, model_dir / source, set(graph.inputs)
                )
                for profile in profiles[name]:
                    shapes = builder.create_optimization_profile()
                    for tensor, (low, opt, high) in profile.shapes(graph.inputs).items():
                        shapes.set_shape(tensor, low, opt, high)
                    if config.add_optimization_profile(shapes) < 0:  # -1: not valid, not added
                        raise LlavaEdgeError(
                            f"TensorRT refused the {profile.name} optimization profile of the "
                            f"{name} engine (its log above says why)"
                        )
                start = time.perf_counter()
                plan = builder.build_serialized_network(network, config)
                del network, parser  # the parsed weights: free them before the plan is written
                if plan is None:
                    raise LlavaEdgeError(
                        f"TensorRT could not build the {name} engine from {source} (its log above "
                        f"says why){_check_findings(model_dir / source)}"
                    )
                tmp = _tmp_path(out, f"{name}.engine")
                size, digest = _write(tmp, plan)
                built[name] = (
                    tmp,
                    EngineSpec(
                        file=f"{name}.{digest[:12]}.engine",
                        source=source,
                        source_sha256=manifest.graph_digest(source) or "",
                        size=size,
                        sha256=digest,
                        profiles={p.name: p.shapes(graph.inputs) for p in profiles[name]},
                    ),
                )
                del plan, config
                log(
                    f"built {name}.engine ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s"
                )
                bar.update()
        key = engine_dir_key(model_dir, out)
        replaced = manifest.engines.get(key)
        kept = {spec.file for spec in replaced.engines.values()} if replaced else set()
        for name, (tmp, spec) in built.items():
            if spec.file not in kept and (out / spec.file).exists():
                # the same bytes another model's build recorded (a shared engine dir): a name of
                # this model's own, so neither model's rebuild or failed build removes the other's
                unique = f"{name}.{spec.sha256[:12]}-{secrets.token_hex(4)}.engine"
                built[name] = (tmp, dataclasses.replace(spec, file=unique))
        # the same content under the same name where kept
        installed = [out / spec.file for _, spec in built.values() if spec.file not in kept]
        _note_uncommitted(model_dir, installed)  # for the next build, should this one be killed
        for tmp, spec in built.values():
            os.replace(tmp, out / spec.file)
        fsync_path(out)  # the renames: durable before the manifest names the files
        manifest.engines[key] = EngineSet(
            tensorrt=trt.__version__,
            gpu=device.name,
            compute_capability=device.compute_capability,
            max_batch=limits.max_batch,
            max_context=limits.max_context,
            prefill_chunk=limits.prefill_chunk,
            kv_chunk=limits.kv_chunk,
            engines={name: spec for name, (_, spec) in built.items()},
        )
        manifest.save(model_dir)
        installed.clear()  # committed: the manifest names them
        (model_dir / UNCOMMITTED).unlink(missing_ok=True)
        if replaced is not None:
            _remove_replaced(out, replaced, manifest.engines[key])
    finally:
        for path in [tmp for tmp, _ in built.values()] + installed:
            path.unlink(missing_ok=True)  # what no manifest names
        if installed:
            (model_dir / UNCOMMITTED).unlink(missing_ok=True)
        if timing is not None:
            _save_timing_cache(timing, cache_path, log)
    log(f"engines for {device.name} (TensorRT {trt.__version__}) in {out}")
    return out


def free_memory(info: gpu.GpuInfo) -> int:
    """The memory the engines can have. An integrated GPU (Jetson) allocates from the board's
    memory, where CUDA's free count can be less than what can be allocated (CUDA for Tegra: it
    leaves out what the OS can free by swapping): Linux's MemAvailable, which also counts the page
    cache the kernel would drop, is taken where it says more."""
    free = info.free_memory if info.free_memory is not None else info.total_memory
    if info.integrated:
        free = min(info.total_memory, max(free, gpu.host_available_memory() or 0))
    return free


def _check_memory(model_dir: Path, info: gpu.GpuInfo, limits: EngineLimits) -> None:
    """Refuse engines whose weights, KV cache and activations cannot fit in the free memory."""
    from llava_edge.runtime.plan import Device, plan

    free = free_memory(info)
    device = Device(info.name, info.total_memory, info.total_memory - free, None)
    needed = plan(
        model_dir,
        device,
        backend="tensorrt",
        max_context=limits.max_context,
        max_batch=limits.max_batch,
        prefill_chunk=limits.prefill_chunk,
    )
    if needed.fits:
        return
    ways = []
    if needed.largest_context:
        ways.append(
            f"lower --max-context (at most {needed.largest_context} fits at --max-batch "
            f"{limits.max_batch})"
        )
    if limits.max_batch > 1 and needed.largest_batch:
        ways.append(
            f"--max-batch (at most {needed.largest_batch} fits at --max-context "
            f"{limits.max_context})"
        )
    advice = " or ".join(ways) or "quantize the model (int4) or use a device with more memory"
    raise LlavaEdgeError(
        f"these engines would need {needed.total / 1e9:.2f} GB (weights, KV cache for "
        f"{limits.max_context} tokens x {limits.max_batch}, activations, CUDA) but the GPU has "
        f"{free / 1e9:.2f} GB free; {advice}, or build anyway with --skip-memory-check "
        f"(details: `llava-edge plan {model_dir} --backend tensorrt`)"
    )


def _check_writable(model_dir: Path, out: Path) -> None:
    """Fail now, not after the build's minutes of work: the engines are written to `out` and
    recorded in the model dir's manifest (a model dir on a read-only disk, an --out that is a
    file or another user's)."""
    for where, what, advice in (
        (out, "the engine dir", "choose another --out"),
        (model_dir, "the model dir", "its manifest records the engines: build in a writable copy"),
    ):
        try:
            where.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".build-", dir=where)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise LlavaEdgeError(
                f"cannot write to {what} {where}: {e.strerror or e}; {advice}"
            ) from None


def _check_row_alignment(model_dir: Path, manifest: Manifest, limits: EngineLimits) -> None:
    """A call on rows [start, stop) of a batched device KV cache binds its past at row `start`
    (runtime/tensorrt/device_cache.py), and TensorRT takes only 256-byte aligned addresses: every
    capacity the cache takes (multiples of kv_chunk, and the max context) must make a row's
    keys a multiple of 256 bytes, or a request joining a batch in row 1 or later is refused."""
    if limits.max_batch == 1:  # one row: its past is the block itself
        return
    from llava_edge.runtime.onnx_sizes import graph_sizes

    text, decoder = manifest.text, manifest.graphs["decoder"]
    source = model_dir / (decoder.tensorrt_file or decoder.file)
    dtype = graph_sizes(source).input_dtype(manifest.kv_names(0)[0]) or text.dtype
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}.get(dtype, 1)
    slot = text.num_kv_heads * text.head_dim * itemsize  # bytes of one position of one row
    unit = 256 // math.gcd(slot, 256)
    options = [("--max-context", limits.max_context)]
    if limits.kv_chunk < limits.max_context:
        options.append(("kv_chunk", limits.kv_chunk))
    for option, value in options:
        if value % unit:
            lower = value - value % unit
            instead = f"{lower} or {lower + unit}" if lower else f"{unit}"
            raise LlavaEdgeError(
                f"{option} {value} with --max-batch {limits.max_batch}: this model's KV cache "
                f"({text.num_kv_heads} KV heads x {text.head_dim} x {itemsize} bytes a position) "
                f"needs a multiple of {unit} for the rows of a batch to start 256-byte aligned, "
                f"as TensorRT requires; give {instead} (or --max-batch 1)"
            )


def _check_timing_cache(path: Path) -> None:
    """A timing cache the build can read and put its new timings in: refused now, not with a
    traceback or after the build's minutes of work (a directory, a dir that cannot be made)."""
    if path.is_dir():
        raise LlavaEdgeError(
            f"--timing-cache {path} is a directory; name a file in it (it is read, then rewritten)"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlavaEdgeError(
            f"cannot make the timing cache's dir {path.parent}: {e.strerror or e}; choose another "
            "--timing-cache"
        ) from None


def _limits(
    manifest: Manifest, max_batch: int, max_context: int | None, prefill_chunk: int, kv_chunk: int
) -> EngineLimits:
    model_context = manifest.text.max_context
    if max_context is not None and not 1 <= max_context <= model_context:
        raise LlavaEdgeError(
            f"--max-context must be between 1 and the model's context {model_context}, got {max_context}"
        )
    limits = EngineLimits(max_batch, max_context or model_context, prefill_chunk, kv_chunk)
    limits.validate()
    return limits


def network_flags(trt: Any) -> int:
    """Strongly typed: opt-in on 10.x, the only mode on 11 (where the flag is accepted, ignored)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _parse(trt: Any, builder: Any, logger: Any, path: Path, inputs: set[str]) -> tuple[Any, Any]:
    """The network of one graph, and its parser (which must outlive the network's use)."""
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so that weights in a .data file beside the graph load.
    if not parser.parse_from_file(str(path)):
        errors = [_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LlavaEdgeError(
            f"TensorRT's ONNX parser rejected {path.name}: {'; '.join(errors) or 'no detail'}"
        )
    found = {network.get_input(i).name for i in range(network.num_inputs)}
    if found != inputs:
        raise LlavaEdgeError(
            f"{path.name} has inputs {sorted(found)} but the manifest says {sorted(inputs)}; re-export the model"
        )
    return network, parser


def _timing_cache(config: Any, path: Path, log: Any) -> Any:
    """The timing cache from `path`, attached to `config`; or an empty one where TensorRT cannot
    use the file: another TensorRT version wrote it or it is damaged (create_timing_cache returns
    None), or another GPU did (set_timing_cache refuses a cache of other device properties,
    returning False; its timings would not hold here)."""
    try:
        data = _read(path)
    except OSError as e:
        raise LlavaEdgeError(
            f"cannot read the timing cache {path}: {e.strerror or e}; choose another --timing-cache"
        ) from None
    cache = config.create_timing_cache(data)
    if data and (cache is None or not config.set_timing_cache(cache, False)):
        log(f"timing cache {path} is stale or from another TensorRT or GPU; starting an empty one")
        data, cache = b"", config.create_timing_cache(b"")
    if cache is None or (not data and not config.set_timing_cache(cache, False)):
        raise LlavaEdgeError("TensorRT could not create a timing cache (its log above says why)")
    return cache


def _save_timing_cache(timing: Any, path: Path, log: Any) -> None:
    """Save the kernel timings for the next build. A cache that cannot be written (a full disk, a
    read-only share) only costs the next build its timing: it neither fails a build whose engines
    are committed nor hides why a failed one failed."""
    tmp = _tmp_path(path.parent, path.name)  # builds sharing the cache may save at once
    try:
        _write(tmp, timing.serialize())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log(
            f"could not save the timing cache {path} ({e.strerror or e}); the next build times again"
        )


def _error_text(error: Any) -> str:
    """TensorRT's parser error as str() gives it (node, operator and description)."""
    text = str(error).strip()
    if not text or text.startswith("<"):  # an object without a useful str(): its description
        desc = getattr(error, "desc", None)
        text = (desc() if callable(desc) else text).strip()
    return text


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def _check_findings(source: Path) -> str:
    """What llava-edge's TensorRT 10.3 check finds in a graph TensorRT could not build, as the
    end of the message; it needs onnx, which a device that only runs engines may lack."""
    try:
        from llava_edge.calib.trt_check import check_graph

        problems = check_graph(source)
    except ImportError:
        return "; with onnx installed, llava_edge.calib.check_graph(path) lists known problems"
    if not problems:
        return ""
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"; llava-edge's TensorRT 10.3 check finds: {'; '.join(problems[:3])}{more}"


def _tmp_path(directory: Path, name: str) -> Path:
    """Where file `name` (an engine, `NAME.engine`, or the timing cache) is written before its
    rename: a name of this build's own (several models' builds may share the engine dir, and its
    timing cache, at the same time), with the pid by which the next build tells what a killed
    one left (`_remove_stale_writes`)."""
    return directory / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _remove_stale_writes(directory: Path, pattern: str = ".*.engine.*-*.tmp") -> None:
    """Files that killed builds were writing (engines by default): their process is gone."""
    for path in directory.glob(pattern):
        pid = path.name.rsplit(".", 2)[-2].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _note_uncommitted(model_dir: Path, paths: list[Path]) -> None:
    """Record the engine files about to be renamed into place, before the manifest names them."""
    with replace_file(model_dir / UNCOMMITTED) as f:
        json.dump([str(p.resolve()) for p in paths], f)


def _remove_uncommitted(model_dir: Path, manifest: Manifest) -> None:
    """The engines a build killed between its renames and its commit left: listed in the note it
    wrote, named by no record of the manifest."""
    note = model_dir / UNCOMMITTED
    if not note.is_file():
        return
    recorded = {
        (engine_dir_path(model_dir, key) / spec.file).resolve()
        for key, record in manifest.engines.items()
        for spec in record.engines.values()
    }
    try:
        paths = [Path(p) for p in json.loads(note.read_text())]
    except (OSError, ValueError):
        paths = []  # a note cut short: its renames had not begun
    for path in paths:
        if path.suffix == ".engine" and path.resolve() not in recorded:
            path.unlink(missing_ok=True)
    note.unlink(missing_ok=True)


def _remove_replaced(out: Path, old: EngineSet, new: EngineSet) -> None:
    """The engines this model's previous build into `out` made and this one does not use. Only
    those: an engine dir may also hold other models' engines, or other programs'."""
    keep = {spec.file for spec in new.engines.values()}
    for spec in old.engines.values():
        if spec.file not in keep:
            (out / spec.file).unlink(missing_ok=True)


def _write(path: Path, data: Any) -> tuple[int, str]:
    """Write and flush to disk: the manifest must never name an engine that a power cut could
    leave empty (the manifest's own save is atomic and flushed too). A write that does not finish
    (a full disk, Ctrl-C during a large engine's) removes its part-written file."""
    view = memoryview(data).cast("B")
    try:
        with open(path, "wb") as f:
            f.write(view)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return view.nbytes, hashlib.sha256(view).hexdigest()


class _Log:
    """A progress report through `log` where tqdm is not installed (it is not a runtime need)."""

    def __init__(self, total: int, log: Any):
        self.total, self.done, self.log = total, 0, log

    def set_postfix_str(self, text: str) -> None:
        self.log(f"[{self.done + 1}/{self.total}] building {text}")

    def update(self) -> None:
        self.done += 1

    def __enter__(self) -> _Log:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _progress(total: int, log: Any) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return _Log(total, log)
    return tqdm(total=total, desc="build", unit="engine")
