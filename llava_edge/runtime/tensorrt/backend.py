"""The native TensorRT backend: the onnxruntime backend's interface, on engines from `build`.

Everything runs on one non-blocking CUDA stream, in order: inputs are copied into fixed device
buffers (one 256-byte aligned arena per engine), the engine runs with `execute_async_v3`, the new
keys/values are copied on the device into the KV cache (see device_cache.py), and only the logits
come back to the host, which is the one synchronisation of a step. The vision encoder's output
feeds the projector from device memory.

Device memory, copies, the stream and CUDA graphs go through cuda-python (cuda.py): no torch. On a
Jetson that is the difference between a few MB of bindings and NVIDIA's own torch wheel. Tests run
the same code against stand-ins for tensorrt and the CUDA runtime that keep "device" memory on the
host (tests/tensorrt_stub.py, tests/cudart_stub.py).

With `cuda_graph=True`, the decoder engine's run for a decode step (one token per row) is
captured once per cache capacity, as trtexec captures (run once, synchronize, capture in
thread-local mode), and replayed; the KV appends, whose destination moves every step, are two
small copies per layer after it. A graph is only replayed while nothing else has run on the
decoder since it was captured (TensorRT keeps shape state in its execution context).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError, first_line
from llava_edge.manifest import GraphSpec, Manifest
from llava_edge.runtime.exit_guard import guarded
from llava_edge.runtime.kv_cache import as_rows, check_kv_layout
from llava_edge.runtime.tensorrt import gpu
from llava_edge.runtime.tensorrt.buffers import Arena, plan
from llava_edge.runtime.tensorrt.compat import (
    Platform,
    check_engine_io,
    check_engines,
    engine_io,
    select_engines,
)
from llava_edge.runtime.tensorrt.cuda import Cuda, DeviceArray
from llava_edge.runtime.tensorrt.device_cache import DeviceKVCache, DeviceKVRows, KVPool
from llava_edge.runtime.tensorrt.names import IONames, io_names
from llava_edge.runtime.tensorrt.profiles import (
    DECODE,
    PREFILL,
    EngineLimits,
    Profile,
    graph_profiles,
    image_batch,
    max_dims,
    resolve,
)
from llava_edge.runtime.tensorrt.requirements import (
    import_tensorrt,
    start_tensorrt,
    tensorrt_logger,
)


class TensorRTBackend:
    """Runs a model dir's TensorRT engines. One call at a time (a lock); requests may interleave
    step by step, each with its own device KV cache."""

    name = "tensorrt"
    prompt_scales_per_call = False  # int8 engines quantize with calibrated (static) scales

    def __init__(
        self,
        model_dir: str | os.PathLike,
        manifest: Manifest,
        engine_dir: str | os.PathLike | None = None,
        cuda_graph: bool = False,
        device: int | str = 0,
        verify_files: bool = False,
    ):
        """engine_dir: where `llava-edge build` put the engines (default: the one recorded in the
        manifest for this GPU). device: the GPU's index (or 'cuda:N')."""
        check_kv_layout(manifest.kv)
        trt = import_tensorrt()
        index = device_index(device)
        info = gpu.probe_gpu(index)  # first: it says clearly when there is no driver or GPU
        self.cuda = Cuda()
        self.cuda.set_device(index)
        platform = Platform(trt.__version__, info.name, info.compute_capability)
        engine_dir, record = select_engines(manifest, model_dir, engine_dir, platform)
        for message in check_engines(
            record, engine_dir, manifest, model_dir, platform, verify_files
        ):
            warnings.warn(message, stacklevel=2)
        self.manifest = manifest
        self.names = io_names(manifest)
        self.limits = EngineLimits(
            record.max_batch, record.max_context, record.prefill_chunk, record.kv_chunk
        )
        self.cuda_graph = cuda_graph
        # made first: it outlives the engines
        self._runtime = start_tensorrt(
            trt.Runtime, tensorrt_logger(trt), info.name, info.driver_cuda
        )
        self.stream = self.cuda.stream()
        self._handle = int(self.stream)  # what TensorRT takes
        self._lock = threading.Lock()
        self._epoch = 0  # eager decoder runs so far: a CUDA graph is valid while it is unchanged
        self._warm: tuple | None = None  # the decode step that ran eagerly last, to capture next
        rebuild = f"rebuild with `llava-edge build {model_dir} --out {engine_dir}`"
        skip = {"projector": {self.names.projector_input}, "decoder": self.names.past}
        self.engines: dict[str, _Engine] = {}
        try:
            for name, graph in manifest.graphs.items():
                self.engines[name] = _Engine(
                    trt,
                    self._runtime,
                    engine_dir / record.engines[name].file,
                    name,
                    graph,
                    graph_profiles(manifest, name, self.limits),
                    self.cuda,
                    skip.get(name, set()),
                    rebuild,
                    tensorrt_form=graph.tensorrt_file is not None,
                )
            self.kv_dtype = _kv_dtype(self.engines["decoder"], self.names, rebuild)
        except BaseException:  # give back the engines loaded so far, their memory and the stream
            for engine in self.engines.values():
                engine.close()
            self.engines.clear()
            self.cuda.destroy_stream(self.stream)
            raise
        # Keep freed blocks for reuse while, with the caches' own, they fit in one max-context
        # cache of the largest batch (what `build` checked the GPU has room for).
        largest = self._cache(self.limits.max_batch)
        self.pool = KVPool(self.cuda, largest.block_bytes(self.limits.max_context))
        self._caches: weakref.WeakSet[DeviceKVCache] = weakref.WeakSet()  # freed by close()

    # ---- the backend interface -------------------------------------------------------------

    @property
    def max_context(self) -> int:
        """The longest conversation the engines take (`--max-context` at build time)."""
        return self.limits.max_context

    @property
    def max_batch(self) -> int:
        """The most rows one KV cache may have (`--max-batch` at build time)."""
        return self.limits.max_batch

    @guarded
    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [B, 3, H, W] -> image features in the LLM's space [B, N, hidden].

        B may exceed what the engines take in one run (several AnyRes images): it runs in parts.
        """
        with self._lock:
            self._check_open()
            self.cuda.use()
            step = image_batch(self.manifest, self.limits.max_batch)[2]
            return np.concatenate(
                [
                    self._encode(pixel_values[i : i + step])
                    for i in range(0, len(pixel_values), step)
                ]
            )

    def new_cache(self, batch: int) -> DeviceKVCache:
        """A cache that takes device memory only as the conversation grows (from a pool)."""
        if not 1 <= batch <= self.limits.max_batch:
            raise LlavaEdgeError(
                f"a batch of {batch} is over the {self.limits.max_batch} the TensorRT engines were "
                f"built for; batch at most {self.limits.max_batch} (serve and BatchEngine: "
                "--max-batch/max_batch), or rebuild them with a larger --max-batch"
            )
        cache = self._cache(batch, getattr(self, "pool", None))
        with self._lock:  # close() goes through them
            self._caches.add(cache)
        return cache

    def _cache(self, batch: int, pool: KVPool | None = None) -> DeviceKVCache:
        return DeviceKVCache(
            self.manifest.text,
            batch,
            self.limits.max_context,
            self.limits.kv_chunk,
            self.cuda,
            self.stream,
            pool,
            dtype=self.kv_dtype,
        )

    @guarded
    def decode(
        self,
        embeds: np.ndarray,
        token_mask: np.ndarray,
        positions: np.ndarray,
        cache: DeviceKVCache,
    ) -> np.ndarray:
        """Run `embeds` [B, S, hidden] through the decoder; last-position logits [B, V] float32.

        Appends the new keys/values to `cache`. Prompts longer than the engines' prefill chunk
        run in several calls, each attending to the ones before through the cache.
        """
        if embeds.shape[1] == 0:
            raise LlavaEdgeError("decode needs at least one token")
        if embeds.shape[0] != cache.batch:
            raise LlavaEdgeError(f"{embeds.shape[0]} rows for a cache made for {cache.batch}")
        chunk = min(self.limits.prefill_chunk, self.limits.max_context)
        with self._lock:
            self._check_open()
            self.cuda.use()
            for start in range(0, embeds.shape[1], chunk):
                end = start + chunk
                logits = self._step(
                    embeds[:, start:end], token_mask[:, start:end], positions[:, start:end], cache
                )
            return logits

    def wait_loaded(self) -> None:
        """Nothing to wait for: the engines are loaded when the backend is made."""

    @property
    def loaded_at(self) -> float:
        """Before any request: the engines are loaded when the backend is made."""
        return 0.0

    def close(self) -> None:
        """Free the engines, their buffers, every cache's device memory (caches still held, by a
        chat kept after the model, are emptied: a model unloaded gives back all its GPU memory)
        and the stream."""
        with self._lock:
            if not self.engines:
                return
            self.cuda.use()
            self.cuda.synchronize(self.stream)
            for engine in self.engines.values():
                engine.close()
            self.engines.clear()  # contexts and engines go before the runtime
            for cache in list(self._caches):
                cache.release()
            self.pool.close()
            self.cuda.destroy_stream(self.stream)

    def _check_open(self) -> None:
        if not self.engines:  # close() dropped them, perhaps while a request was running
            raise LlavaEdgeError("this model's TensorRT engines are closed; load the model again")

    # ---- the steps ---------------------------------------------------------------------------

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        names = self.names
        vision, projector = self.engines["vision_encoder"], self.engines["projector"]
        dims = {"batch": len(pixels), "image_tokens": self.manifest.num_image_tokens}
        vision.feed(names.pixel_values, pixels, self.stream)
        features = vision.output(names.vision_features, dims)
        vision.run(self._handle)
        projector.feed_device(names.projector_input, features)
        embeds = projector.output(names.image_embeds, dims)
        projector.run(self._handle)
        return self.cuda.to_host(embeds, self.stream)  # a new array: the buffer is reused

    def _step(
        self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: DeviceKVCache
    ) -> np.ndarray:
        names, decoder = self.names, self.engines["decoder"]
        batch, seq = mask.shape
        rows = as_rows(cache)
        rows.reserve(seq)
        decoder.select(DECODE if seq == 1 else PREFILL, self._handle)
        decoder.feed(names.inputs_embeds, embeds, self.stream)
        decoder.feed(names.attention_mask, rows.attention_mask(mask), self.stream)
        decoder.feed(names.position_ids, positions, self.stream)
        for layer, (past_k, past_v, _, _) in enumerate(names.layers):
            key, value = rows.past(layer)
            decoder.feed_device(past_k, key)
            decoder.feed_device(past_v, value)
        dims = {"batch": batch, "seq": seq}  # every input shape is set: outputs can be sized
        presents = [
            (decoder.output(present_k, dims), decoder.output(present_v, dims))
            for _, _, present_k, present_v in names.layers
        ]
        logits = decoder.output(names.logits, dims)
        if self.cuda_graph and seq == 1:
            self._decode_with_graph(decoder, rows, (rows.start, batch, rows.capacity))
        else:
            decoder.run(self._handle)
            self._epoch += 1
        for layer, (key, value) in enumerate(presents):
            rows.append(layer, key, value)
        rows.advance(mask)
        # waits for the stream: the step's one synchronisation
        return self.cuda.to_host(logits, self.stream).astype(np.float32, copy=False)

    def _decode_with_graph(self, decoder: _Engine, rows: DeviceKVRows, key: tuple) -> None:
        """Replay this cache's graph for `key`, or run eagerly once and capture on the next step."""
        entry = rows.graphs.get(key)
        if entry is not None and entry[1] == self._epoch:
            entry[0].replay(self.stream)
            return
        if self._warm == (id(rows.graphs), key, self._epoch):
            graph = self._capture(decoder)
            if graph is not None:
                rows.graphs[key] = (graph, self._epoch)
                graph.replay(self.stream)
                return
        decoder.run(self._handle)
        self._epoch += 1
        self._warm = (id(rows.graphs), key, self._epoch)

    def _capture(self, decoder: _Engine) -> _Graph | None:
        """Capture as trtexec does: the step has just run eagerly with these very bindings; wait
        for it to finish, then capture at once, in thread-local mode."""
        cuda, graph = self.cuda, None
        try:
            cuda.synchronize(self.stream)
            cuda.begin_capture(self.stream)
            try:
                decoder.run(self._handle)
            finally:
                graph = cuda.end_capture(self.stream)  # always leave capture mode
            return _Graph(cuda, graph, cuda.instantiate(graph))
        except LlavaEdgeError as e:  # TensorRT or CUDA refused the capture: decode without
            if graph is not None:  # captured, but not to be replayed
                with contextlib.suppress(LlavaEdgeError):
                    cuda.destroy_graph(graph, None)
            warnings.warn(
                f"CUDA graph capture of the decode step failed ({first_line(e)}); "
                "continuing without CUDA graphs",
                stacklevel=3,
            )
            self.cuda_graph = False
            return None


def _kv_dtype(decoder: _Engine, names: IONames, rebuild: str) -> str:
    """The device cache's dtype: the decoder's past keys/values', which its present ones must
    share (the cache copies present into past byte for byte)."""
    past = {decoder.io[n][1] for layer in names.layers for n in layer[:2]}
    present = {decoder.io[n][1] for layer in names.layers for n in layer[2:]}
    if len(past | present) != 1:
        raise LlavaEdgeError(
            f"the decoder engine's past keys/values are {'/'.join(sorted(past))} and its present "
            f"ones {'/'.join(sorted(present))}: the KV cache needs one type; re-quantize the "
            f"model or {rebuild}"
        )
    return past.pop()


def device_index(device: int | str) -> int:
    """The GPU index of 0, "1", "cuda" or "cuda:1"."""
    text = str(device).strip()
    number = "0" if text == "cuda" else text.removeprefix("cuda:")
    if number.isdigit():
        return int(number)
    raise LlavaEdgeError(f"device {device!r} is not a CUDA GPU; give its index: 0, 1, or 'cuda:1'")


class _Graph:
    """An instantiated CUDA graph, destroyed when dropped."""

    def __init__(self, cuda: Cuda, graph: Any, graph_exec: Any):
        self.graph_exec = graph_exec
        weakref.finalize(self, cuda.destroy_graph, graph, graph_exec)
        self._cuda = cuda

    def replay(self, stream: Any) -> None:
        self._cuda.launch(self.graph_exec, stream)


class _Engine:
    """One deserialized engine: its execution context and the arena its IO tensors live in."""

    def __init__(
        self,
        trt: Any,
        runtime: Any,
        path: Path,
        name: str,
        spec: GraphSpec,
        profiles: list[Profile],
        cuda: Cuda,
        external: set[str],
        rebuild: str,
        tensorrt_form: bool = False,
    ):
        """tensorrt_form: built from the graph's TensorRT form, whose float tensors may be fp16
        where the manifest's graph has fp32 (the int4 form computes in fp16)."""
        self.name, self.spec, self.rebuild, self.cuda = name, spec, rebuild, cuda
        # From a memory map: the engine's bytes are not held a second time in the process while
        # TensorRT copies the weights out (on a Jetson both copies would share the one memory).
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise LlavaEdgeError(
                f"TensorRT could not load {path} (its log above says why: usually another "
                f"TensorRT version or GPU built it); {rebuild}"
            )
        self.io = engine_io(self.engine, trt)
        check_engine_io(name, spec, self.io, rebuild, float_may_be_half=tensorrt_form)
        if self.engine.num_optimization_profiles != len(profiles):
            raise LlavaEdgeError(
                f"{path} has {self.engine.num_optimization_profiles} optimization profiles, this "
                f"llava-edge expects {len(profiles)}; {rebuild}"
            )
        self.profile_index = {p.name: i for i, p in enumerate(profiles)}
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise LlavaEdgeError(f"TensorRT could not create a context for {path} (out of memory?)")
        self.active = 0  # a new context uses profile 0
        # what is bound now: calls that would change nothing are skipped (they would also reset
        # shape state TensorRT keeps, and cannot happen during CUDA graph capture)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        largest = max_dims(profiles)
        tensors = {
            tensor: (resolve(s.shape, largest, tensor), self.io[tensor][1])
            for tensor, s in {**spec.inputs, **spec.outputs}.items()
            if tensor not in external  # bound to buffers others own (the KV cache, vision output)
        }
        self.arena = Arena(plan(tensors), cuda)

    def select(self, profile: str, stream: int) -> None:
        index = self.profile_index[profile]
        if index != self.active:
            try:  # TensorRT raises on failure (older releases returned False)
                ok = self.context.set_optimization_profile_async(index, stream)
            except Exception as e:
                raise LlavaEdgeError(
                    f"TensorRT refused profile {profile} of the {self.name} engine "
                    f"({first_line(e)}); {self.rebuild}"
                ) from None
            if ok is False:
                raise LlavaEdgeError(
                    f"TensorRT refused profile {profile} of the {self.name} engine; {self.rebuild}"
                )
            self.active = index
            # A switch invalidates the context's dynamic bindings, which must be set again
            # before the next run: the input shapes, as TensorRT documents, and the tensor
            # addresses, which it does not promise to keep.
            self.shapes.clear()
            self.addresses.clear()

    def feed(self, tensor: str, array: np.ndarray, stream: Any) -> DeviceArray:
        """Copy a host array (cast to the engine's dtype) into the tensor's buffer and bind it."""
        buffer = self.arena.view(tensor, np.shape(array))
        self.cuda.to_device(buffer, array, stream)
        self.feed_device(tensor, buffer)
        return buffer

    def feed_device(self, tensor: str, buffer: DeviceArray) -> None:
        """Bind device memory someone else owns (a cache region, another engine's output)."""
        shape = tuple(buffer.shape)
        if self.shapes.get(tensor) != shape:
            if not self.context.set_input_shape(tensor, shape):
                raise LlavaEdgeError(
                    f"shape {shape} of {tensor} is outside the {self.name} engine's profiles; "
                    f"{self.rebuild}"
                )
            self.shapes[tensor] = shape
        self._bind(tensor, buffer.ptr)

    def _bind(self, tensor: str, address: int) -> None:
        if self.addresses.get(tensor) == address:
            return
        if not self.context.set_tensor_address(tensor, address):  # False, not an exception
            raise LlavaEdgeError(
                f"TensorRT refused the address of {tensor} for the {self.name} engine (see its log)"
            )
        self.addresses[tensor] = address

    def output(self, tensor: str, dims: dict[str, int]) -> DeviceArray:
        """Bind the output's buffer for the shape the current inputs give; returns it."""
        shape = tuple(resolve(self.spec.outputs[tensor].shape, dims, tensor))
        engine_shape = tuple(self.context.get_tensor_shape(tensor))
        if engine_shape != shape:
            raise LlavaEdgeError(
                f"the {self.name} engine makes {tensor} of shape {engine_shape}, the manifest says "
                f"{shape}; {self.rebuild}"
            )
        buffer = self.arena.view(tensor, shape)
        self._bind(tensor, buffer.ptr)
        return buffer

    def run(self, stream: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise LlavaEdgeError(f"TensorRT failed to run the {self.name} engine (see its log)")

    def close(self) -> None:
        self.context = self.engine = None  # before their memory goes
        self.arena.free()
