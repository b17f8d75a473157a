"""The native TensorRT backend: the onnxruntime backend's interface, on engines from `build`.

Everything runs on one non-default CUDA stream, in order: inputs are copied into fixed device
buffers (one 256-byte aligned arena per engine), the engine runs with `execute_async_v3`, the new
keys/values are copied on the device into the KV cache (see device_cache.py), and only the logits
come back to the host, which is the one synchronisation of a step. The vision encoder's output
feeds the projector from device memory.

With `cuda_graph=True`, a decode step (one token per row) is captured once per cache capacity and
replayed: the engine call and the KV appends become one graph launch. A graph is only replayed
while nothing else has run on the decoder since it was captured (TensorRT keeps shape state in
its execution context), so each answer captures about one graph per chunk of the KV cache.

torch holds the device memory: its CUDA tensors give addresses TensorRT takes directly, a stream,
device-side index copies and CUDA graph capture, and the same code runs on CPU tensors, which is
how the control flow is tested without a GPU (against a stand-in for tensorrt).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import GraphSpec, Manifest
from llava_edge.runtime.kv_cache import check_kv_layout
from llava_edge.runtime.tensorrt import gpu
from llava_edge.runtime.tensorrt.buffers import Arena, plan
from llava_edge.runtime.tensorrt.compat import (
    Platform,
    check_engine_io,
    check_engines,
    engine_io,
    select_engines,
)
from llava_edge.runtime.tensorrt.device_cache import DeviceKVCache
from llava_edge.runtime.tensorrt.names import io_names
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
from llava_edge.runtime.tensorrt.requirements import import_tensorrt, import_torch

SLOTS = "llava_edge.slots"  # the decoder arena's extra buffer: cache positions of the new tokens


class TensorRTBackend:
    """Runs a model dir's TensorRT engines. One call at a time (a lock); requests may interleave
    step by step, each with its own device KV cache."""

    name = "tensorrt"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        manifest: Manifest,
        engine_dir: str | os.PathLike | None = None,
        cuda_graph: bool = False,
        device: str = "cuda",
        verify_files: bool = False,
    ):
        """engine_dir: where `llava-edge build` put the engines (default: the one recorded in the
        manifest for this GPU). device: 'cuda' or 'cuda:N'; 'cpu' only works with a stand-in for
        tensorrt (the tests use one)."""
        check_kv_layout(manifest.kv)
        trt = import_tensorrt()
        torch = import_torch(cuda=device.startswith("cuda"))
        self._torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        info = gpu.probe_gpu(self.device.index or 0)
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
        self.cuda_graph = cuda_graph and self.cuda
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._handle = self.stream.cuda_stream if self.cuda else 0
        self._lock = threading.Lock()
        self._epoch = 0  # eager decoder runs so far: a CUDA graph is valid while it is unchanged
        self._warm: tuple | None = None  # the decode step that ran eagerly last, to capture next
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # outlives the engines
        rebuild = f"rebuild with `llava-edge build {model_dir} --out {engine_dir}`"
        skip = {"projector": {self.names.projector_input}, "decoder": self.names.past}
        with self._on_device():
            self.engines = {
                name: _Engine(
                    trt,
                    self._runtime,
                    engine_dir / record.engines[name].file,
                    name,
                    graph,
                    graph_profiles(manifest, name, self.limits),
                    self.device,
                    skip.get(name, set()),
                    rebuild,
                )
                for name, graph in manifest.graphs.items()
            }

    # ---- the backend interface -------------------------------------------------------------

    @property
    def max_context(self) -> int:
        """The longest conversation the engines take (`--max-context` at build time)."""
        return self.limits.max_context

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [B, 3, H, W] -> image features in the LLM's space [B, N, hidden].

        B may exceed what the engines take in one run (several AnyRes images): it runs in parts.
        """
        with self._lock, self._on_device():
            self._check_open()
            step = image_batch(self.manifest, self.limits.max_batch)[2]
            return np.concatenate(
                [
                    self._encode(pixel_values[i : i + step])
                    for i in range(0, len(pixel_values), step)
                ]
            )

    def new_cache(self, batch: int) -> DeviceKVCache:
        if not 1 <= batch <= self.limits.max_batch:
            raise LlavaEdgeError(
                f"a batch of {batch} is over the {self.limits.max_batch} the TensorRT engines were "
                "built for; rebuild them with a larger --max-batch"
            )
        with self._on_device():
            return DeviceKVCache(
                self.manifest.text,
                batch,
                self.limits.max_context,
                self.limits.kv_chunk,
                self.device,
                self.stream,
            )

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
        with self._lock, self._on_device():
            self._check_open()
            for start in range(0, embeds.shape[1], chunk):
                end = start + chunk
                logits = self._step(
                    embeds[:, start:end], token_mask[:, start:end], positions[:, start:end], cache
                )
            return logits

    def close(self) -> None:
        with self._lock:
            if self.cuda:
                self.stream.synchronize()
            self.engines.clear()  # contexts and engines go before the runtime

    def _check_open(self) -> None:
        if not self.engines:  # close() dropped them, perhaps while a request was running
            raise LlavaEdgeError("this model's TensorRT engines are closed; load the model again")

    # ---- the steps ---------------------------------------------------------------------------

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        names = self.names
        vision, projector = self.engines["vision_encoder"], self.engines["projector"]
        dims = {"batch": len(pixels), "image_tokens": self.manifest.num_image_tokens}
        vision.feed(names.pixel_values, pixels)
        features = vision.output(names.vision_features, dims)
        vision.run(self._handle)
        projector.feed_device(names.projector_input, features)
        embeds = projector.output(names.image_embeds, dims)
        projector.run(self._handle)
        return embeds.to("cpu", copy=True).numpy()  # a copy: the buffer is reused

    def _step(
        self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: DeviceKVCache
    ) -> np.ndarray:
        names, decoder = self.names, self.engines["decoder"]
        batch, seq = mask.shape
        cache.reserve(seq)
        decoder.select(DECODE if seq == 1 else PREFILL, self._handle)
        decoder.feed(names.inputs_embeds, embeds)
        decoder.feed(names.attention_mask, cache.attention_mask(mask))
        decoder.feed(names.position_ids, positions)
        slots = decoder.feed(SLOTS, np.arange(cache.length, cache.length + seq, dtype=np.int64))
        for layer, (past_k, past_v, _, _) in enumerate(names.layers):
            key, value = cache.past(layer)
            decoder.feed_device(past_k, key)
            decoder.feed_device(past_v, value)
        dims = {"batch": batch, "seq": seq}  # every input shape is set: outputs can be sized
        presents = [
            (decoder.output(present_k, dims), decoder.output(present_v, dims))
            for _, _, present_k, present_v in names.layers
        ]
        logits = decoder.output(names.logits, dims)

        def work() -> None:
            decoder.run(self._handle)
            for layer, (key, value) in enumerate(presents):
                cache.append(layer, key, value, slots)

        if self.cuda_graph and seq == 1:
            self._decode_with_graph(work, cache, (batch, cache.capacity))
        else:
            work()
            self._epoch += 1
        cache.advance(mask)
        # a copy (the buffer is reused); waits for the stream: the step's one synchronisation
        return logits.to("cpu", copy=True).numpy().astype(np.float32, copy=False)

    def _decode_with_graph(self, work: Any, cache: DeviceKVCache, key: tuple) -> None:
        """Replay this cache's graph for `key`, or run eagerly once and capture on the next step."""
        entry = cache.graphs.get(key)
        if entry is not None and entry[1] == self._epoch:
            entry[0].replay()
            return
        if self._warm == (id(cache), key, self._epoch):
            graph = self._capture(work)
            if graph is not None:
                cache.graphs[key] = (graph, self._epoch)
                graph.replay()
                return
        work()
        self._epoch += 1
        self._warm = (id(cache), key, self._epoch)

    def _capture(self, work: Any) -> Any:
        torch = self._torch
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                work()
        except Exception as e:  # TensorRT or CUDA refused the capture: keep decoding without
            warnings.warn(
                f"CUDA graph capture of the decode step failed ({str(e).splitlines()[0]}); "
                "continuing without CUDA graphs",
                stacklevel=3,
            )
            self.cuda_graph = False
            return None
        return graph

    def _on_device(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        if self.cuda:
            stack.enter_context(self._torch.cuda.device(self.device))
            stack.enter_context(self._torch.cuda.stream(self.stream))
        return stack


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
        device: Any,
        external: set[str],
        rebuild: str,
    ):
        import torch

        self._torch = torch
        self.name, self.spec, self.rebuild = name, spec, rebuild
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise LlavaEdgeError(
                f"TensorRT could not load {path} (its log above says why: usually another "
                f"TensorRT version or GPU built it); {rebuild}"
            )
        check_engine_io(name, spec, engine_io(self.engine, trt), rebuild)
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
        largest = max_dims(profiles)
        tensors = {
            tensor: (resolve(s.shape, largest, tensor), s.dtype)
            for tensor, s in {**spec.inputs, **spec.outputs}.items()
            if tensor not in external  # bound to buffers others own (the KV cache, vision output)
        }
        if name == "decoder":
            tensors[SLOTS] = ((largest["seq"],), "int64")
        self.arena = Arena(plan(tensors), device)

    def select(self, profile: str, stream: int) -> None:
        index = self.profile_index[profile]
        if index != self.active:
            if not self.context.set_optimization_profile_async(index, stream):
                raise LlavaEdgeError(
                    f"TensorRT refused profile {profile} of the {self.name} engine"
                )
            self.active = index

    def feed(self, tensor: str, array: np.ndarray) -> Any:
        """Copy a host array into the tensor's buffer and bind it; returns the device tensor."""
        array = np.ascontiguousarray(array, dtype=self.arena.plan.slots[tensor].dtype)
        if not array.flags.writeable:  # torch.from_numpy wants a writable array
            array = array.copy()
        buffer = self.arena.view(tensor, array.shape)
        buffer.copy_(self._torch.from_numpy(array), non_blocking=True)
        if tensor != SLOTS:
            self.feed_device(tensor, buffer)
        return buffer

    def feed_device(self, tensor: str, buffer: Any) -> None:
        """Bind a device tensor someone else owns (a cache region, another engine's output)."""
        if not self.context.set_input_shape(tensor, tuple(buffer.shape)):
            raise LlavaEdgeError(
                f"shape {tuple(buffer.shape)} of {tensor} is outside the {self.name} engine's "
                f"profiles; {self.rebuild}"
            )
        self.context.set_tensor_address(tensor, buffer.data_ptr())

    def output(self, tensor: str, dims: dict[str, int]) -> Any:
        """Bind the output's buffer for the shape the current inputs give; returns it."""
        shape = tuple(resolve(self.spec.outputs[tensor].shape, dims, tensor))
        engine_shape = tuple(self.context.get_tensor_shape(tensor))
        if engine_shape != shape:
            raise LlavaEdgeError(
                f"the {self.name} engine makes {tensor} of shape {engine_shape}, the manifest says "
                f"{shape}; {self.rebuild}"
            )
        buffer = self.arena.view(tensor, shape)
        self.context.set_tensor_address(tensor, buffer.data_ptr())
        return buffer

    def run(self, stream: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise LlavaEdgeError(f"TensorRT failed to run the {self.name} engine (see its log)")
