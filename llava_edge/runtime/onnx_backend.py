"""The onnxruntime backend: three sessions (vision encoder, projector, decoder) on CPU, CUDA or
TensorRT execution providers, and the decoder step that keeps the KV cache in place.

The CUDA and TensorRT providers are the other way onto a GPU besides the native TensorRT backend
(`backend='tensorrt'`): nothing to build ahead, the same model dir, but the KV cache stays on the
host and crosses to the device every step. The TensorRT provider builds its engines on first use
and keeps them (and its timing cache) in `engine_dir`, default MODEL_DIR/ort_tensorrt_cache; it is
given explicit profiles from the manifest so that it does not rebuild as the context grows, and
builds strongly typed networks from the explicit-precision graphs (its fp16/int8 flags stay off).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from llava_edge.errors import LlavaEdgeError, first_line
from llava_edge.manifest import PREFILL, GraphSpec, KVSpec, Manifest, TextSpec
from llava_edge.runtime.exit_guard import guarded
from llava_edge.runtime.fused_backend import FusedDecoder
from llava_edge.runtime.kv_cache import KVCache, as_rows, check_kv_layout
from llava_edge.runtime.session_cache import enabled as cache_enabled
from llava_edge.runtime.session_cache import is_cached, open_cached, session_options

log = logging.getLogger(__name__)

GRAPH_FORMS = ("auto", "fused", "standard")
# The oldest onnxruntime that answers as the newest on every form export and quantize write:
# 1.18 and 1.19's GroupQueryAttention continues a row that holds tokens wrongly (a chat's next
# turn), 1.18's MatMulNBits overflows to NaN and 1.19's optimized-graph cache of it answers
# otherwise. pyproject.toml's floor; also the oldest JetPack 6 onnxruntime-gpu wheel to take.
RUNTIME_ONNXRUNTIME = (1, 20)
# The first whose CPU GroupQueryAttention runs an int8 cache right (1.27 decodes a batch wrongly).
INT8_KV_ONNXRUNTIME = (1, 28)
FP16_FUSED_ONNXRUNTIME = (1, 21)  # the first whose CPU SkipSimplifiedLayerNormalization runs fp16
# What older onnxruntimes cannot run of a fused decoder: the first that runs it, and what it is
FUSED_DECODER_NEEDS = {
    "fp16": (FP16_FUSED_ONNXRUNTIME, "an fp16 fused decoder (export --dtype fp16)"),
    "int8_kv": (
        INT8_KV_ONNXRUNTIME,
        "a fused decoder with an int8 KV cache (quantize --kv-cache int8)",
    ),
}
# onnxruntime's names of the KV cache dtypes a decoder's past inputs may have.
PAST_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


ORT_TENSORRT_CACHE = "ort_tensorrt_cache"


def provider_options(
    provider: str, manifest: Manifest, graph: str, cache_dir: Path
) -> dict[str, object]:
    """Options of one provider for one graph's session (the TensorRT provider's engine cache,
    timing cache and explicit profiles; the others need none)."""
    if provider != "TensorrtExecutionProvider":
        return {}
    from llava_edge.runtime.tensorrt.profiles import ort_tensorrt_profiles

    return {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engine_cache_dir(cache_dir, manifest, graph)),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        **ort_tensorrt_profiles(manifest, graph),
    }


def engine_cache_dir(cache_dir: Path, manifest: Manifest, graph: str) -> Path:
    """Where the TensorRT provider keeps the engines of one graph: a dir named by the content
    of the file it builds from (and its external data). The provider names an engine by the
    graph's file name and node names, not its weights, so in a cache dir shared by two models of
    one architecture (or kept while a model dir is re-quantized in place) it would otherwise run
    the other weights' engine, with no error. The provider makes the dir."""
    spec = manifest.graphs[graph]
    file = spec.tensorrt_file or spec.file
    key = (manifest.graph_digest(file) or "unrecorded")[:16]
    return cache_dir / f"{Path(file).stem}-{key}"


def provider_list(names: str | list[str] | None, installed: bool = True) -> list[str]:
    """Execution providers by short name ('cpu', 'cuda', 'tensorrt'; one, or a list), with CPU
    always last. installed: each must be available in this onnxruntime; else (a plan for
    another machine) only one llava-edge knows."""
    names = [names] if isinstance(names, str) else names or ["cpu"]
    if not isinstance(names, list | tuple):
        names = [names]  # refused below, as a provider that is not a name
    available = ort.get_available_providers()
    chosen = []
    for name in names:
        if not isinstance(name, str):
            raise LlavaEdgeError(f"providers are names ('cpu', 'cuda', 'tensorrt'), got {name!r}")
        provider = PROVIDERS.get(name.lower(), name)
        if provider not in PROVIDERS.values() and not installed:
            raise LlavaEdgeError(
                f"unknown onnxruntime provider {name!r}; choose from {', '.join(PROVIDERS)}"
            )
        if provider not in available and installed:
            raise LlavaEdgeError(
                f"onnxruntime provider {provider} is not available here (available: "
                f"{', '.join(available)}); install onnxruntime-gpu for 'cuda' and 'tensorrt'"
            )
        chosen.append(provider)
    # onnxruntime takes them in order of precedence: a CPU named first would run every graph
    gpus = [p for p in dict.fromkeys(chosen) if p != "CPUExecutionProvider"]
    return [*gpus, "CPUExecutionProvider"]


def pick_form(manifest: Manifest, providers: list[str], requested: str = "auto") -> str:
    """The graph form to run: the fused graphs on the CPU where the model dir has them (their
    contrib ops run on onnxruntime's CPU kernels; GPU providers take the standard form), and
    the standard ones where this onnxruntime cannot run its fused decoder (choose_form)."""
    return choose_form(manifest, providers, requested)[0]


def choose_form(
    manifest: Manifest, providers: list[str], requested: str = "auto"
) -> tuple[str, str | None]:
    """pick_form's form, and the line to log where 'auto' runs the standard graphs because this
    onnxruntime cannot run the dir's fused decoder (None otherwise). 'fused' asked for such a
    dir is refused in one line."""
    if requested not in GRAPH_FORMS:
        raise LlavaEdgeError(
            f"unknown graph form {requested!r}; choose from {', '.join(GRAPH_FORMS)}"
        )
    has_fused = any(g.fused is not None for g in manifest.graphs.values())
    if requested == "fused" and not has_fused:
        raise LlavaEdgeError(f"this model dir has no fused graph form: {_why_no_fused(manifest)}")
    cpu_only = providers == ["CPUExecutionProvider"]
    if requested == "standard" or (requested == "auto" and not (has_fused and cpu_only)):
        return "standard", None
    lacking = fused_decoder_lacks(manifest.graphs["decoder"])
    if lacking is None:
        return "fused", None
    if requested == "fused":
        raise LlavaEdgeError(
            f"this model dir holds {lacking}: upgrade onnxruntime, or run its standard graphs "
            "(graph_form='standard', or 'auto', which falls back to them)"
        )
    return "standard", (
        f"llava-edge runs this model dir's standard graphs, not its fused ones: it holds "
        f"{lacking}; upgrade onnxruntime to run the fused graphs"
    )


def _why_no_fused(manifest: Manifest) -> str:
    """What export or quantize recorded of why the graphs lack fused forms, and what to do."""
    reasons = {g.details.get("no_fused_form") for g in manifest.graphs.values()} - {None}
    if reasons:  # the form cannot take this model: a re-export would not help
        return f"{'; '.join(sorted(reasons))}; run graph_form='standard' (or 'auto')"
    return "exported with --no-fused or by an older llava-edge; re-export it without --no-fused"


def form_graphs(manifest: Manifest, form: str) -> dict[str, GraphSpec]:
    """The graphs the backend opens in `form`: each graph's fused form where it has one, and a
    fused decoder's prompt graph (int4 dirs with int8 prompts); or the standard graphs."""
    graphs = dict(manifest.graphs)
    if form == "fused":
        graphs = {name: g.fused or g for name, g in graphs.items()}
        if graphs["decoder"].prefill:
            graphs[PREFILL] = graphs["decoder"].prefill
    return graphs


def prompt_scales_per_call(
    manifest: Manifest, providers: list[str], graph_form: str = "auto"
) -> bool:
    """Whether prompts run onnxruntime's dynamic int8 form, which quantizes activations with one
    scale per call: a prompt fed in two parts (a reused prefix, then the rest) computes other
    keys, values and logits than the whole prompt fed at once; MatMulNBits and float graphs do
    not. Read off the manifest, so that a server refuses a prefix cache before it listens."""
    graphs = form_graphs(manifest, pick_form(manifest, providers, graph_form))
    return _scaled_per_call(graphs, graph_files(graphs, providers))


def _scaled_per_call(graphs: dict[str, GraphSpec], files: dict[str, str]) -> bool:
    """Whether the graph that runs prompts is an int8 graph run as written (the dynamic form)."""
    prompts = PREFILL if PREFILL in graphs else "decoder"
    return graphs[prompts].precision == "int8" and files[prompts] == graphs[prompts].file


def graph_files(graphs: dict[str, GraphSpec], providers: list[str]) -> dict[str, str]:
    """The file of each graph the providers open: TensorRT (as a provider too) must build from
    the Q/DQ form where a dir has two."""
    tensorrt = "TensorrtExecutionProvider" in providers
    return {
        name: graph.tensorrt_file if tensorrt and graph.tensorrt_file else graph.file
        for name, graph in graphs.items()
    }


def check_graph_io(name: str, graph: GraphSpec, session: ort.InferenceSession) -> None:
    """The graph's inputs and outputs are the manifest's: same names, same fixed dimensions.

    Catches a graph copied in from another model dir, or a manifest edited by hand, at load
    time with a clear message instead of a shape error deep inside the first request.
    """
    actual = {i.name: i.shape for i in [*session.get_inputs(), *session.get_outputs()]}
    for tensor, spec in {**graph.inputs, **graph.outputs}.items():
        if tensor not in actual:
            raise LlavaEdgeError(
                f"graph {graph.file} has no tensor {tensor!r} that the manifest names: the graph "
                "and manifest come from different models; re-export the model dir"
            )
        shape = actual[tensor]
        fixed = [
            (i, want, got)
            for i, (want, got) in enumerate(zip(spec.shape, shape, strict=False))
            if isinstance(want, int) and isinstance(got, int) and want != got
        ]
        if len(shape) != len(spec.shape) or fixed:
            raise LlavaEdgeError(
                f"{name} graph {graph.file}: {tensor!r} has shape {shape} but the manifest says "
                f"{spec.shape}: the graph and manifest come from different models; re-export"
            )


def onnxruntime_version(version: str | None = None) -> tuple[int, int]:
    """The (major, minor) of `version`, by default the installed onnxruntime's."""
    major, minor = (int(x) for x in re.findall(r"\d+", version or ort.__version__)[:2])
    return major, minor


def check_onnxruntime(version: str | None = None) -> None:
    """Refuse an onnxruntime older than RUNTIME_ONNXRUNTIME (`version`, by default the installed
    one's): it loads the graphs and answers wrongly. pip's floor does not hold it off where
    onnxruntime-gpu (another distribution, one module) is installed, as on a Jetson."""
    found = version or ort.__version__
    if onnxruntime_version(found) < RUNTIME_ONNXRUNTIME:
        need = ".".join(map(str, RUNTIME_ONNXRUNTIME))
        raise LlavaEdgeError(
            f"onnxruntime {found} answers wrongly on llava-edge's graphs: install onnxruntime "
            f"{need} or later (`pip install 'onnxruntime>={need}'`; on a Jetson, the JetPack 6 "
            "onnxruntime-gpu wheel, see docs/jetson.md)"
        )


def fused_decoder_lacks(decoder: GraphSpec) -> str | None:
    """What the installed onnxruntime lacks to run the decoder's fused form, in words, or None
    where it runs it (or there is none). An fp16 fused decoder
    needs a CPU SkipSimplifiedLayerNormalization that runs fp16: 1.20 loads the graph, then fails
    at its first run ("Missing Input"). An int8 KV cache needs a CPU GroupQueryAttention that
    runs one: 1.25 and 1.26 accept the graph, then fail at its first run; 1.27 answers a batch
    otherwise than each of its requests alone."""
    fused = decoder.fused
    if fused is None:
        return None
    found = ort.__version__
    past = fused.inputs.get(KVSpec().past_key.format(i=0))
    holds = {
        "fp16": fused.precision == "fp16",
        "int8_kv": past is not None and past.dtype == "int8",
    }
    for kind, (needs, what) in FUSED_DECODER_NEEDS.items():
        if holds[kind] and onnxruntime_version(found) < needs:
            return f"{what}, which needs onnxruntime {_dotted(needs)} or later, not {found}"
    return None


def fused_out_of_reach(version: str) -> list[str]:
    """The fused decoders the onnxruntime of `version` cannot run, each with the onnxruntime it
    needs: 'auto' runs their dirs' standard graphs."""
    found = onnxruntime_version(version)
    return [
        f"{what}, which needs onnxruntime {_dotted(needs)} or later"
        for needs, what in FUSED_DECODER_NEEDS.values()
        if found < needs
    ]


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


class OnnxBackend:
    """Runs a model dir's graphs with onnxruntime.

    Any number of threads may share one backend: onnxruntime's `run` is thread-safe, and each
    request brings its own KV cache.
    """

    name = "onnxruntime"
    max_batch = None  # rows one KV cache may have: no limit but memory

    def __init__(
        self,
        model_dir: str | os.PathLike,
        manifest: Manifest,
        providers: str | list[str] | None = None,
        threads: int | None = None,
        engine_dir: str | os.PathLike | None = None,
        graph_form: str = "auto",
        session_cache: bool = True,
        background: bool = False,
    ):
        check_onnxruntime()
        check_kv_layout(manifest.kv)
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.threads = threads
        self.session_cache = session_cache and cache_enabled()
        self.cache_status: dict[str, str] = {}  # graph -> 'hit', 'miss', 'off' or 'none'
        options = session_options(threads)
        self.providers = provider_list(providers)
        cache_dir = Path(engine_dir) if engine_dir else Path(model_dir) / ORT_TENSORRT_CACHE
        if engine_dir and "TensorrtExecutionProvider" not in self.providers:
            raise LlavaEdgeError(
                f"engine_dir {engine_dir} (--engine-dir) is for TensorRT engines: add the "
                "tensorrt provider (--provider tensorrt) or backend (--backend tensorrt), or drop it"
            )
        if "TensorrtExecutionProvider" in self.providers:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LlavaEdgeError(
                    f"cannot make the TensorRT provider's engine cache {cache_dir} ({e.strerror}); "
                    "give a writable engine_dir (--engine-dir)"
                ) from None
        self.form, fallback = choose_form(manifest, self.providers, graph_form)
        if fallback:
            log.warning(fallback)
        graphs = form_graphs(manifest, self.form)
        files = graph_files(graphs, self.providers)
        self.prompt_scales_per_call = _scaled_per_call(graphs, files)

        self.layer_names = [manifest.kv_names(i) for i in range(manifest.text.num_layers)]
        self._closed = False
        self._state_lock = threading.Lock()
        self._state: tuple[TextSpec, FusedDecoder | None] | None = None
        self._opened_at: dict[str, float] = {}

        def open_one(name: str) -> ort.InferenceSession:
            providers = [
                (p, provider_options(p, manifest, name, cache_dir)) for p in self.providers
            ]
            session = self._open(name, files[name], options, providers)
            check_graph_io(name, graphs[name], session)
            self._opened_at[name] = time.perf_counter()
            return session

        # Loads from the session cache run side by side (onnxruntime releases the GIL while it
        # opens a session, and most of a cached load is touching the mapped weights); a load that
        # writes an entry holds a second copy of its weights, so those run one at a time. The
        # image graphs open first: in a background load a request's image runs while the
        # decoder still opens.
        together = self._all_cached(files.values())
        order = sorted(files, key=lambda name: name in ("decoder", PREFILL))
        pool = ThreadPoolExecutor(len(files) if together else 1, "llava-edge-load")
        self._opening = {name: pool.submit(open_one, name) for name in order}
        pool.shutdown(wait=False)  # its threads end when the last graph is open
        self._pool = pool
        if not background:
            try:
                self.wait_loaded()
            except BaseException:
                self.close()  # the other graphs stop opening: nothing outlives a failed load
                raise

    def wait_loaded(self) -> None:
        """Block until every graph is open; a graph that failed to load raises its error here (and
        at every call that needs it)."""
        for name in self._opening:
            self._session(name)
        self._decoder_state()

    @property
    def loaded_at(self) -> float | None:
        """When the last graph opened (time.perf_counter()); None while some still open (a
        background load). Time limits count from here at the earliest: the time a request waits
        for the model to load is not the request's."""
        if any(not opening.done() for opening in self._opening.values()):
            return None
        return max(self._opened_at.values(), default=0.0)

    @property
    def sessions(self) -> dict[str, ort.InferenceSession]:
        """Every graph's session, once all are open (none once closed)."""
        if self._closed:
            return {}
        return {name: self._session(name) for name in self._opening}

    def swap_session(self, name: str, session: Any) -> None:
        """Run `session` (anything with onnxruntime's `run`) in place of a graph's own: a
        recorder of its feeds, in calibration. The standard form's graphs only: the fused decoder
        holds its session."""
        self._session(name)  # opened, or its error
        swapped: Future = Future()
        swapped.set_result(session)
        self._opening[name] = swapped

    @property
    def kv_text(self) -> TextSpec:
        """The text config with the KV cache's dtype: the decoder's own past dtype (the int4
        TensorRT form keeps it in fp16, a fused decoder quantized with `--kv-cache int8` in
        int8)."""
        return self._decoder_state()[0]

    @property
    def fused(self) -> FusedDecoder | None:
        """The fused decoder's runner, where this backend runs the fused form."""
        return self._decoder_state()[1]

    def _decoder_state(self) -> tuple[TextSpec, FusedDecoder | None]:
        """What depends on the decoder's session, built once it is open. Read on every decode
        step: once built it is returned without the lock."""
        state = self._state
        if state is not None and not self._closed:
            return state
        with self._state_lock:
            self._check_open()
            if self._state is None:
                decoder = self._session("decoder")
                past = {i.name: i.type for i in decoder.get_inputs()}
                text = self.manifest.text
                kv_dtype = PAST_DTYPES.get(past.get(self.layer_names[0][0]), text.dtype)
                fused = None
                if self.form == "fused" and self.manifest.graphs["decoder"].fused:
                    prefill = self._session(PREFILL) if PREFILL in self._opening else None
                    fused = FusedDecoder(decoder, text, self.layer_names, prefill=prefill)
                self._state = (replace(text, dtype=kv_dtype), fused)
            return self._state

    def _all_cached(self, files: Any) -> bool:
        """Whether every graph would open from a complete session-cache entry."""
        if not self.session_cache or self.providers != ["CPUExecutionProvider"]:
            return False
        keys = [self.manifest.graph_digest(f) for f in files]
        return all(k is not None and is_cached(k) for k in keys)

    def _open(
        self,
        name: str,
        file: str,
        options: ort.SessionOptions,
        providers: list[tuple[str, dict]],
    ) -> ort.InferenceSession:
        """A session of one graph: CPU sessions through the optimized-graph cache."""
        path = self.model_dir / file
        key = self.manifest.graph_digest(file)
        cached = self.session_cache and key and self.providers == ["CPUExecutionProvider"]
        try:
            if cached:
                session, self.cache_status[name] = open_cached(path, key, self.threads)
                return session
            self.cache_status[name] = "none"
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors on bad files
            raise LlavaEdgeError(f"cannot load graph {path}: {first_line(e)}") from None

    @guarded
    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [B, 3, H, W] -> image features in the LLM's space [B, N, hidden]."""
        dtype = self.manifest.graphs["vision_encoder"].inputs["pixel_values"].dtype
        pixel_values = pixel_values.astype(dtype, copy=False)
        (features,) = self._session("vision_encoder").run(None, {"pixel_values": pixel_values})
        (embeds,) = self._session("projector").run(None, {"image_features": features})
        return embeds

    def new_cache(self, batch: int) -> KVCache:
        return KVCache(self.kv_text, batch)

    @guarded
    def decode(
        self, embeds: np.ndarray, token_mask: np.ndarray, positions: np.ndarray, cache: KVCache
    ) -> np.ndarray:
        """One decoder call over `embeds` [B, S, hidden]; returns last-position logits [B, V].

        Appends the call's keys/values to `cache`.
        """
        fused = self.fused
        if fused is not None:
            return fused.decode(embeds, token_mask, positions, cache)
        rows = as_rows(cache)
        rows.reserve(embeds.shape[1])
        feeds = {
            "inputs_embeds": embeds,
            "attention_mask": rows.attention_mask(token_mask),
            "position_ids": positions,
        }
        for layer, (past_k, past_v, _, _) in enumerate(self.layer_names):
            feeds[past_k], feeds[past_v] = rows.past(layer)
        outputs = self._session("decoder").run(self._outputs, feeds)
        for layer in range(len(self.layer_names)):
            rows.append(layer, outputs[1 + 2 * layer], outputs[2 + 2 * layer])
        rows.advance(token_mask)
        return outputs[0]

    def _session(self, name: str) -> ort.InferenceSession:
        """One graph's session, waiting while it opens (a background load)."""
        self._check_open()
        try:
            return self._opening[name].result()
        except (CancelledError, KeyError):  # closed by another thread while it waited
            self._check_open()
            raise

    def _check_open(self) -> None:
        if self._closed:  # perhaps while a request was running
            raise LlavaEdgeError("this model's sessions are closed; load the model dir again")

    @property
    def _outputs(self) -> list[str]:
        names = ["logits"]
        for _, _, present_k, present_v in self.layer_names:
            names += [present_k, present_v]
        return names

    def close(self) -> None:
        """Let go of every session (their weights' memory goes with the last reference); a graph
        still opening is waited for, so none outlives the backend."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._opening = {}
        with self._state_lock:
            self._state = None
