"""`llava-edge plan`: what a deployment of a model dir needs in memory, and whether it fits.

On a Jetson the GPU and the CPU share one memory, and a board that runs out of it does not fail
cleanly: it swaps, or the kernel kills the app, or the whole board hangs. So before building or
running, `plan` adds up what the backend will hold:

- weights of each graph at their stored precision, read from the ONNX files themselves (fp32,
  fp16, int8 Q/DQ, int4 blocks and their scales), the graph the backend runs (TensorRT builds from
  `tensorrt_file` where there is one; onnxruntime opens the form its providers take, as the
  runtime picks it: on the CPU alone the fused graphs, with an int4 dir's int8 prompt decoder,
  `quantize --prefill int8`; with the CUDA or TensorRT provider the standard ones, the TensorRT
  provider's Q/DQ forms where there are); onnxruntime's CPU provider holds fp16 weights in
  fp32 (it has no fp16 kernels for most of their ops on x86, so it casts them and folds the casts
  into fp32 copies at load), so a plan for the CPU alone counts them at 4 bytes each;
- the KV cache at the planned context, batch and the cache's dtype, the decoder's own (fp16 where
  the TensorRT graph computes in fp16, int8 in a fused decoder quantized with `--kv-cache int8`);
- activations: the vision encoder on an image (an AnyRes image is its base image and every tile
  of the largest grid), and one decoder call: for onnxruntime, which takes what a call needs, the
  larger of a whole prompt (it does not split prefills; the batch engine prefills one request at
  a time) and a decode step of the whole batch; for TensorRT, whose engines hold what their
  largest profile needs, a batch of images and one prefill chunk of the whole batch;
- runtime overhead (libraries, CUDA context, onnxruntime's session copies).

It also bounds decode speed: every new token reads all decoder weights and the KV cache so far,
so tokens/s <= memory bandwidth / those bytes. The embedding table is memory-mapped on the host
and only the rows of the tokens used are ever read, so it is shown but not counted.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest
from llava_edge.runtime.anyres import max_feature_count, max_tiles
from llava_edge.runtime.onnx_sizes import GraphSizes, graph_sizes

GiB = 1 << 30
# Sources of the device table's figures. Bandwidth: NVIDIA module data sheets (Jetson AGX Orin
# Series Technical Brief; Jetson Orin NX Series Modules Data Sheet DS-10712-001; Jetson Orin Nano
# Series Data Sheet DS-11105-001; https://developer.nvidia.com/embedded/jetson-modules; Orin Nano
# Super mode, JetPack 6.1+, 102 GB/s:
# https://developer.nvidia.com/blog/nvidia-jetson-orin-nano-developer-kit-gets-a-super-boost/).
# Reserve: an estimate of the memory L4T keeps from apps (carve-outs: a 16 GB Orin NX shows CUDA
# 15.2 GB) plus a headless L4T's own use; users measure theirs with `free -b` and pass --reserve.


@dataclass(frozen=True)
class Device:
    """A board: its memory, the part the OS keeps, and its memory bandwidth."""

    name: str
    memory: int  # bytes
    reserve: int  # bytes the OS and firmware keep from applications
    bandwidth: float | None  # bytes/s; None where unknown

    @property
    def available(self) -> int:
        return self.memory - self.reserve


# The one device table. Memory: the module's LPDDR5 (GiB); bandwidth: peak, from the data sheets.
DEVICES: dict[str, Device] = {
    "orin-nano-4gb": Device("Jetson Orin Nano 4GB", 4 * GiB, GiB, 34e9),
    "orin-nano-8gb": Device("Jetson Orin Nano 8GB", 8 * GiB, 3 * GiB // 2, 68e9),
    "orin-nano-8gb-super": Device("Jetson Orin Nano 8GB, Super mode", 8 * GiB, 3 * GiB // 2, 102e9),
    "orin-nx-8gb": Device("Jetson Orin NX 8GB", 8 * GiB, 3 * GiB // 2, 102.4e9),
    "orin-nx-16gb": Device("Jetson Orin NX 16GB", 16 * GiB, 5 * GiB // 2, 102.4e9),
    "agx-orin-32gb": Device("Jetson AGX Orin 32GB", 32 * GiB, 5 * GiB // 2, 204.8e9),
    "agx-orin-64gb": Device("Jetson AGX Orin 64GB", 64 * GiB, 7 * GiB // 2, 204.8e9),
}

# Runtime overhead beyond weights, KV and activations.
ORT_LIBRARIES = 64 << 20  # numpy, onnxruntime, tokenizers, Pillow resident (measured: ~50 MB)
# onnxruntime holds more than the stored weights after it builds a session (prepacked GEMM
# weights, constant-folded copies: measured 1.05-1.75x per graph on this project's exports of
# `small`), and while it builds one it briefly holds a copy of its largest weight (the LM head).
ORT_WEIGHT_FACTOR = 0.2
# CUDA context, cuBLAS/cuDNN handles and TensorRT's runtime with lazy module loading (estimate).
TRT_RUNTIME = 600 << 20
FLOAT, FLOAT16 = 1, 10  # TensorProto data types
TRT_PREFILL_CHUNK = 512  # llava-edge build's default prefill chunk
PROMPT_TEXT_TOKENS = 128  # text of a typical prompt beside the image, for onnxruntime's prefill
VISION_HEAD_DIM = 64  # CLIP towers' head size: the manifest does not record the vision heads


@dataclass
class Plan:
    """Every figure in bytes (tokens/s for speeds)."""

    model_dir: str
    backend: str
    graph_form: str  # of the graphs counted: 'fused', 'standard' (onnxruntime) or 'tensorrt'
    device: dict[str, Any]
    max_context: int
    max_batch: int
    kv_dtype: str
    weights: dict[str, int]  # graph -> bytes
    weight_dtypes: dict[str, dict[str, int]]  # graph -> dtype -> bytes
    kv_cache: int
    activations: dict[str, int]
    overhead: int
    prefix_cache: int  # serve's store of finished conversations' keys/values (--prefix-cache-mb)
    embedding_table: int  # memory-mapped on the host, not counted
    total: int
    available: int
    fits: bool
    decode_tokens_per_s: dict[str, float] = field(default_factory=dict)
    largest_context: int = 0  # at max_batch; 0 when even one token does not fit
    largest_batch: int = 0  # at max_context

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelShapes:
    """What the arithmetic needs from a model dir, read once (`read_shapes`)."""

    manifest: Manifest
    sizes: dict[str, GraphSizes]
    form: str  # of the graphs `sizes` counts (Plan.graph_form)
    fp16_as_fp32: bool  # the runtime holds fp16 weights in fp32 (onnxruntime on the CPU alone)
    kv_itemsize: int
    act_itemsize: int
    mlp_width: int
    vision_hidden: int
    vision_mlp: int
    table: int
    prefill_chunk: int
    image_tokens: int  # the most one image fills the prompt with (an AnyRes grid: its features)
    vision_inputs: int  # vision encoder inputs of one image (AnyRes: base image and tiles)


def parse_device(
    spec: str | None, reserve_gb: float | None = None, backend: str = "onnxruntime"
) -> Device:
    """A device by name, a memory size ('8GB', '7.5GiB', '8000000000'), or this machine: for
    the tensorrt backend its GPU, which holds the engines, their KV cache and activations (on a
    Jetson, the board's one memory; `build` checks the same), else its memory."""
    if spec is None:
        device = (_this_gpu() if backend == "tensorrt" else None) or _this_machine()
    elif spec in DEVICES:
        device = DEVICES[spec]
    else:
        number = r"(\d+(?:\.\d*)?|\.\d+)(?:e\d+)?"
        match = re.fullmatch(rf"\s*({number})\s*(gib|gb|mib|mb)?\s*", spec.lower())
        if not match or not 0 < float(match.group(1)) < math.inf:
            raise LlavaEdgeError(
                f"unknown device {spec!r}: give one of {', '.join(DEVICES)} or a memory size "
                "in bytes (or with GB / GiB)"
            )
        scale = {None: 1, "gb": 1e9, "gib": GiB, "mb": 1e6, "mib": 1 << 20}[match.group(3)]
        device = Device(f"{spec} of memory", int(float(match.group(1)) * scale), 0, None)
    if reserve_gb is not None:
        if not 0 <= reserve_gb < math.inf:  # nan too
            raise LlavaEdgeError(f"--reserve must be a number of GB, 0 or more, got {reserve_gb}")
        device = replace(device, reserve=int(reserve_gb * 1e9))
        if device.reserve >= device.memory:
            raise LlavaEdgeError(
                f"--reserve {reserve_gb:g} GB leaves nothing of {device.name}'s "
                f"{device.memory / 1e9:.1f} GB; reserve less"
            )
    return device


def _this_gpu() -> Device | None:
    """GPU 0 and what it has free, as `build` counts it; None where there is no GPU."""
    from llava_edge.runtime.tensorrt import gpu
    from llava_edge.runtime.tensorrt.build import free_memory

    try:
        info = gpu.probe_gpu(0)
    except LlavaEdgeError:
        return None
    free = free_memory(info)
    return Device(f"GPU 0, {info.name}", info.total_memory, info.total_memory - free, None)


def _this_machine() -> Device:
    """This machine's memory; what is in use now counts as reserved."""
    try:
        info = dict(
            (line.split(":")[0], int(line.split()[1]) * 1024)
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.split(":")[0] in ("MemTotal", "MemAvailable")
        )
        total, free = info["MemTotal"], info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        raise LlavaEdgeError("cannot read this machine's memory; name a --device") from None
    return Device("this machine", total, total - free, None)


def plan(
    model_dir: str | os.PathLike,
    device: Device | str | None = None,
    backend: str = "onnxruntime",
    max_context: int | None = None,
    max_batch: int = 1,
    prefill_chunk: int = TRT_PREFILL_CHUNK,
    bandwidth_gbs: float | None = None,
    providers: str | list[str] | None = None,
    graph_form: str = "auto",
    prefix_cache_mb: float = 0,
) -> Plan:
    """What running `model_dir` with `backend` needs, on `device` (a Device, a name, a size).

    max_context: the longest conversation to plan for (default: the model's); max_batch: the
    most requests decoded together; bandwidth_gbs: GB/s, for a device the table does not know.
    providers, graph_form: onnxruntime's, as Pipeline.load takes them (default: the CPU, and the
    form the runtime picks for the providers); the providers need not be installed here.
    prefix_cache_mb: the most a server keeps of finished conversations for their next turns
    (`serve --prefix-cache-mb`: 256 unless told; 0 for an app without a BatchEngine's store).
    Where the prompts run onnxruntime's dynamic int8 form, which reuses no prefix, a store
    given is refused, as `serve` refuses it, rather than counted.
    """
    if backend not in ("onnxruntime", "tensorrt"):
        raise LlavaEdgeError(f"unknown backend {backend!r}; choose 'onnxruntime' or 'tensorrt'")
    if backend == "tensorrt" and providers:
        raise LlavaEdgeError(
            "providers (--provider) are onnxruntime's; the tensorrt backend runs its own "
            "engines: drop them, or plan for --backend onnxruntime"
        )
    device = device if isinstance(device, Device) else parse_device(device, backend=backend)
    if bandwidth_gbs is not None:
        if not 0 < bandwidth_gbs < math.inf:  # nan too
            raise LlavaEdgeError(
                f"--bandwidth must be a positive number of GB/s, got {bandwidth_gbs}"
            )
        device = replace(device, bandwidth=bandwidth_gbs * 1e9)
    manifest = Manifest.load(model_dir)
    # a file missing or of another size than the manifest's: the runtime refuses the dir, and
    # the sizes read from it would be of no model (sizes only: hashing a 7B model takes minutes)
    manifest.check_files(model_dir, hashes=False)
    context = manifest.text.max_context if max_context is None else max_context
    if not 1 <= context <= manifest.text.max_context:
        raise LlavaEdgeError(
            f"--max-context must be between 1 and the model's context "
            f"{manifest.text.max_context}, got {context}"
        )
    if max_batch < 1:
        raise LlavaEdgeError(f"--max-batch must be at least 1, got {max_batch}")
    if not 0 <= prefix_cache_mb < math.inf:  # nan too
        raise LlavaEdgeError(f"--prefix-cache-mb must be 0 or more, got {prefix_cache_mb}")
    shapes = read_shapes(Path(model_dir), manifest, backend, prefill_chunk, providers, graph_form)
    prefix = _prefix_cache(manifest, backend, providers, graph_form, prefix_cache_mb)
    return plan_for(shapes, device, backend, context, max_batch, str(model_dir), prefix)


def _prefix_cache(
    manifest: Manifest,
    backend: str,
    providers: str | list[str] | None,
    graph_form: str,
    prefix_cache_mb: float,
) -> int:
    """The bytes of serve's prefix store, as the server sizes it for this deployment."""
    from llava_edge.runtime.batching import prefix_budget
    from llava_edge.runtime.onnx_backend import prompt_scales_per_call, provider_list

    exact = backend == "tensorrt" or not prompt_scales_per_call(
        manifest, provider_list(providers, installed=False), graph_form
    )
    return prefix_budget(prefix_cache_mb, exact)


def plan_for(
    shapes: ModelShapes,
    device: Device,
    backend: str,
    context: int,
    max_batch: int,
    name: str,
    prefix_cache: int = 0,
) -> Plan:
    """The plan of a model whose shapes are known (`plan` reads them from a model dir)."""
    manifest = shapes.manifest
    parts = _parts(shapes, backend, context, max_batch)
    total = _total(shapes, backend, context, max_batch) + prefix_cache
    room = device.available - prefix_cache
    return Plan(
        model_dir=name,
        backend=backend,
        graph_form=shapes.form,
        device={**asdict(device), "available": device.available},
        max_context=context,
        max_batch=max_batch,
        kv_dtype=_dtype_name(shapes.kv_itemsize),
        weights=parts["weights"],
        weight_dtypes={
            name: {_onnx_dtype(t): n for t, n in sorted(_held(shapes, s).items()) if n}
            for name, s in shapes.sizes.items()
        },
        kv_cache=parts["kv"],
        activations=parts["act"],
        overhead=parts["overhead"],
        prefix_cache=prefix_cache,
        embedding_table=shapes.table,
        total=total,
        available=device.available,
        fits=total <= device.available,
        decode_tokens_per_s=_speed(shapes, device, context),
        largest_context=_largest(
            lambda c: _total(shapes, backend, c, max_batch) <= room,
            manifest.text.max_context,
        ),
        largest_batch=_largest(lambda b: _total(shapes, backend, context, b) <= room, 4096),
    )


def read_shapes(
    model_dir: Path,
    manifest: Manifest,
    backend: str,
    prefill_chunk: int = TRT_PREFILL_CHUNK,
    providers: str | list[str] | None = None,
    graph_form: str = "auto",
) -> ModelShapes:
    """Weights and input types of the graphs `backend` runs (onnxruntime: with `providers`, as
    Pipeline.load takes them, default the CPU; they need not be installed here), and the
    model's other sizes."""
    from llava_edge.runtime.onnx_backend import form_graphs, graph_files, pick_form, provider_list

    cpu_only = False
    if backend == "tensorrt":
        form = "tensorrt"
        files = {name: g.tensorrt_file or g.file for name, g in manifest.graphs.items()}
    else:  # the graphs the onnxruntime backend opens
        providers = provider_list(providers, installed=False)
        cpu_only = providers == ["CPUExecutionProvider"]
        form = pick_form(manifest, providers, graph_form)
        files = graph_files(form_graphs(manifest, form), providers)
    sizes = {name: _read_sizes(model_dir / file) for name, file in files.items()}

    def standard(name: str) -> GraphSizes:
        """The standard form's sizes, whose matrices are the model's own: a fused decoder also
        stores RoPE's cos/sin tables ([context, head_dim / 2]) and a fused vision encoder its
        packed QKV, whose widths are not the MLP's."""
        file = manifest.graphs[name].file
        return sizes[name] if files[name] == file else _read_sizes(model_dir / file)

    text = manifest.text
    past = manifest.kv_names(0)[0]
    # the cache's dtype is the decoder's past input's (int8 after `quantize --kv-cache int8`);
    # it computes in that dtype, but an int8 cache is dequantized into the model's own
    kv_dtype = sizes["decoder"].input_dtype(past) or text.dtype
    act_dtype = text.dtype if kv_dtype == "int8" else kv_dtype
    kv_itemsize = np.dtype(kv_dtype).itemsize
    vision_out = next(iter(manifest.graphs["vision_encoder"].outputs.values())).shape
    vision_hidden = vision_out[-1] if isinstance(vision_out[-1], int) else text.hidden_size
    try:
        table = np.load(model_dir / manifest.embeddings, mmap_mode="r")
        table_bytes = int(table.nbytes)
    except (OSError, ValueError):
        table_bytes = 0
    return ModelShapes(
        manifest=manifest,
        sizes=sizes,
        form=form,
        fp16_as_fp32=cpu_only,
        kv_itemsize=kv_itemsize,
        act_itemsize=np.dtype(act_dtype).itemsize,
        mlp_width=_mlp_width(standard("decoder"), text.vocab_size, 4 * text.hidden_size),
        vision_hidden=vision_hidden,
        vision_mlp=_mlp_width(standard("vision_encoder"), 0, 4 * vision_hidden),
        table=table_bytes,
        prefill_chunk=prefill_chunk,
        image_tokens=max_feature_count(manifest),
        vision_inputs=1 if manifest.image.anyres is None else max_tiles(manifest.image.anyres),
    )


def _read_sizes(path: Path) -> GraphSizes:
    try:
        return graph_sizes(path)
    except (OSError, ValueError, IndexError) as e:
        raise LlavaEdgeError(f"cannot read graph {path}: {e}") from None


def _mlp_width(sizes: GraphSizes, vocab: int, default: int) -> int:
    widths = [d for d in sizes.matrix_dims if d != vocab and (vocab == 0 or d < vocab)]
    return max(widths, default=default)


def _held(shapes: ModelShapes, sizes: GraphSizes) -> dict[int, int]:
    """A graph's weights by data type as the runtime holds them after loading."""
    held = dict(sizes.weights)
    half = held.pop(FLOAT16, 0) if shapes.fp16_as_fp32 else 0
    if half:
        held[FLOAT] = held.get(FLOAT, 0) + 2 * half
    return held


def _weight_bytes(shapes: ModelShapes, name: str) -> int:
    return sum(_held(shapes, shapes.sizes[name]).values())


def _load_copy(shapes: ModelShapes, sizes: GraphSizes) -> int:
    """What loading a graph briefly holds beside its weights: a copy of its largest weight,
    and where fp16 weights are converted to fp32, all of them at their stored size."""
    half = sizes.weights.get(FLOAT16, 0) if shapes.fp16_as_fp32 else 0
    return max(sizes.largest, half)


def _parts(shapes: ModelShapes, backend: str, context: int, batch: int) -> dict[str, Any]:
    text = shapes.manifest.text
    weights = {name: _weight_bytes(shapes, name) for name in shapes.sizes}
    kv_one = 2 * text.num_layers * text.num_kv_heads * text.head_dim * shapes.kv_itemsize
    kv = kv_one * batch * context
    if backend == "onnxruntime":
        # The host cache grows by copying every layer into larger buffers, so for a moment the
        # old and the new cache are both held.
        kv = 2 * kv
        # the batch engine encodes and prefills one request at a time, then decodes every row
        # one token a step: a whole prompt at batch 1, or a step of the batch at full context
        prompt = min(context, shapes.image_tokens + PROMPT_TEXT_TOKENS)
        decoder = max(
            _decoder_activations(shapes, 1, prompt, 0),
            _decoder_activations(shapes, batch, 1, context - 1),
        )
        vision = _vision_activations(shapes, 1)
        overhead = ORT_LIBRARIES + int(ORT_WEIGHT_FACTOR * sum(weights.values()))
        overhead += max(_load_copy(shapes, s) for s in shapes.sizes.values())
    else:
        chunk = min(shapes.prefill_chunk, context)
        decoder = _decoder_activations(shapes, batch, chunk, context - chunk)
        overhead = TRT_RUNTIME
        vision = _vision_activations(shapes, batch)
    return {
        "weights": weights,
        "kv": kv,
        "act": {"vision_encoder": vision, "decoder": decoder},
        "overhead": overhead,
    }


def _decoder_activations(shapes: ModelShapes, batch: int, seq: int, past: int) -> int:
    """One decoder call of `seq` new tokens after `past`: hidden states and MLP, attention
    scores (fp32: scores, masked, softmax), every layer's new keys/values, last logits."""
    text = shapes.manifest.text
    act = shapes.act_itemsize
    states = batch * seq * (4 * text.hidden_size + 2 * shapes.mlp_width) * act
    scores = 3 * batch * text.num_heads * seq * (past + seq) * 4
    presents = 2 * text.num_layers * batch * text.num_kv_heads * seq * text.head_dim
    logits = batch * text.vocab_size * 4
    return states + scores + presents * shapes.kv_itemsize + logits


def _vision_activations(shapes: ModelShapes, batch: int) -> int:
    tokens = shapes.manifest.num_image_tokens + 1  # of one input, and the class token
    hidden, act = shapes.vision_hidden, shapes.act_itemsize
    batch *= shapes.vision_inputs
    heads = max(1, hidden // VISION_HEAD_DIM)
    states = batch * tokens * (4 * hidden + 2 * shapes.vision_mlp) * act
    scores = 3 * batch * heads * tokens * tokens * 4
    return states + scores


def _total(shapes: ModelShapes, backend: str, context: int, batch: int) -> int:
    parts = _parts(shapes, backend, context, batch)
    return (
        sum(parts["weights"].values())
        + parts["kv"]
        + sum(parts["act"].values())
        + (parts["overhead"])
    )


def _largest(fits: Any, high: int) -> int:
    """The largest n in [1, high] with fits(n) (fits is monotone), or 0."""
    if not fits(1):
        return 0
    low = 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _speed(shapes: ModelShapes, device: Device, context: int) -> dict[str, float]:
    """Decode tokens/s of one sequence at most: bandwidth / bytes read per token."""
    if not device.bandwidth:
        return {}
    text = shapes.manifest.text
    weights = _weight_bytes(shapes, "decoder")
    kv_token = 2 * text.num_layers * text.num_kv_heads * text.head_dim * shapes.kv_itemsize
    prompt = min(context, shapes.image_tokens + PROMPT_TEXT_TOKENS)
    return {
        "weights_only": round(device.bandwidth / weights, 1),
        f"at_{prompt}_tokens": round(device.bandwidth / (weights + kv_token * prompt), 1),
        f"at_{context}_tokens": round(device.bandwidth / (weights + kv_token * context), 1),
    }


def _dtype_name(itemsize: int) -> str:
    return {1: "int8", 2: "float16", 4: "float32"}.get(itemsize, f"{itemsize}-byte")


def _onnx_dtype(code: int) -> str:
    names = {1: "float32", 10: "float16", 16: "bfloat16", 3: "int8", 2: "uint8", 22: "int4"}
    names |= {21: "uint4", 7: "int64", 6: "int32", 9: "bool", 11: "float64"}
    return names.get(code, f"onnx type {code}")


def format_plan(p: Plan) -> str:
    """The plan as a table a person reads."""
    gb = lambda n: f"{n / 1e9:8.2f} GB"  # noqa: E731
    form = f" ({p.graph_form} graphs)" if p.backend == "onnxruntime" else ""
    lines = [
        f"{p.model_dir} with {p.backend}{form} on {p.device['name']}: context {p.max_context}, "
        f"batch {p.max_batch}, KV cache {p.kv_dtype}",
    ]
    for name, n in p.weights.items():
        kinds = ", ".join(f"{k} {v / n:.0%}" for k, v in p.weight_dtypes[name].items()) if n else ""
        lines.append(f"  weights {name:<17}{gb(n)}   ({kinds})")
    lines.append(f"  KV cache{'':<18}{gb(p.kv_cache)}")
    for name, n in p.activations.items():
        lines.append(f"  activations {name:<13}{gb(n)}")
    lines.append(f"  runtime overhead{'':<10}{gb(p.overhead)}")
    if p.prefix_cache:
        lines.append(f"  prefix cache{'':<14}{gb(p.prefix_cache)}")
    lines.append(f"  total{'':<21}{gb(p.total)}")
    lines.append(
        f"  available{'':<17}{gb(p.available)}   ({p.device['memory'] / 1e9:.2f} GB, "
        f"{p.device['reserve'] / 1e9:.2f} GB kept by the OS)"
    )
    lines.append(
        f"  embedding table {gb(p.embedding_table).strip()} on the host, memory-mapped (not counted)"
    )
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(
        f"{verdict}; largest context at batch {p.max_batch}: {p.largest_context}; "
        f"largest batch at context {p.max_context}: {p.largest_batch}"
    )
    if p.decode_tokens_per_s:
        speeds = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in p.decode_tokens_per_s.items())
        lines.append(f"decode tokens/s at most (one sequence): {speeds}")
    return "\n".join(lines)
