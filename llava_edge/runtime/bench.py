"""How fast a model dir runs: load time, vision, prefill, time to first token, decode tokens/s,
peak memory, as medians over several runs of one workload (`benchmark`, behind `llava-edge
bench`).

A transformers baseline of the same workload lives with the export stage (it needs torch, which
the runtime never imports): `benchmark` takes it as a factory of runners and `compare` joins the
two reports into ratios.
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.files import graph_bytes, replace_file
from llava_edge.runtime.image import ImageInput
from llava_edge.runtime.tensorrt.gpu import device_free_memory

METRICS = (
    "load_s",
    "preprocess_ms",
    "vision_ms",
    "prefill_ms",
    "ttft_ms",
    "decode_tokens_per_s",
    "peak_memory_mb",
    "gpu_memory_mb",
)
# tokens below the target `question` goes on cutting characters for an exact count
CUT_SLACK = 4
WORDS = [
    "please",
    "look",
    "at",
    "the",
    "picture",
    "and",
    "tell",
    "me",
    "what",
    "the",
    "robot",
    "should",
    "pick",
    "up",
    "from",
    "the",
    "table",
    "next",
]


@dataclass
class Workload:
    """One benchmark request: an image, a question of `question_tokens` tokens, fixed output length."""

    question_tokens: int = 32
    new_tokens: int = 128  # at least 2: decode speed is timed from the first token to the last
    context_tokens: int = 0  # extra text before the question, for long-context decode speed
    image: bool = True  # False: a text-only prompt (to set the context length exactly)
    threads: int = 2
    runs: int = 5

    def __post_init__(self) -> None:
        for name, least in [
            ("question_tokens", 1),
            ("new_tokens", 2),
            ("context_tokens", 0),
            ("threads", 1),
            ("runs", 1),
        ]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                flag = "--" + name.replace("_", "-")
                why = " (decode speed is timed from the first new token)" * (name == "new_tokens")
                raise LlavaEdgeError(f"{flag} must be at least {least}{why}, got {value!r}")


def question(codec: Any, tokens: int, prefix_tokens: int = 0) -> str:
    """A question that encodes to exactly `tokens` (+ `prefix_tokens`) tokens with this tokenizer,
    or, where no cut of its words does, the longest under that (the report's prompt_tokens says
    which)."""
    target = tokens + prefix_tokens

    def text(words: int) -> str:
        return " ".join(WORDS[i % len(WORDS)] for i in range(words))

    def length(words: int) -> int:
        return len(codec.encode(text(words), first=False))

    # the fewest words that reach the target (tokens grow with words): double, then bisect
    low, high = 0, 1
    while length(high) < target:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if length(middle) < target else (low, middle)
    return _cut_to(codec, text(high), target)


def _cut_to(codec: Any, text: str, target: int) -> str:
    """The longest start of `text` that encodes to exactly `target` tokens. Cutting a
    character off can take two tokens (a byte-level BPE's merges) and the next cut give one
    back, so the cuts go on a little below the target; where none hits it, the longest under."""
    under = None
    for end in range(len(text), 0, -1):
        tokens = len(codec.encode(text[:end], first=False))
        if tokens == target:
            return text[:end]
        if tokens < target and under is None:
            under = text[:end]
        if tokens < target - CUT_SLACK:
            break
    return under or text[:1]


def bench_image() -> ImageInput:
    """A fixed camera-like frame (H, W, 3) uint8, the same for every backend."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)


class PeakMemory:
    """Peak resident memory above the level at start, sampled every few milliseconds; with a
    `device`, also the most GPU memory taken meanwhile (the drop in the GPU's free memory).

    Resident memory alone misses what a GPU backend holds: TensorRT's engines and activations
    and onnxruntime's CUDA arena live in device memory, which on a Jetson is also not in the
    process's resident set. Read from /proc and the CUDA driver (Linux; Jetson too) so the
    runtime needs no psutil or pynvml.
    """

    def __init__(self, interval: float = 0.005, device: int | None = None):
        self.interval = interval
        self.device = device
        self.peak = 0
        self._free_at_start: int | None = None
        self._least_free: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self.base = rss_bytes()
        self.peak = self.base
        if self.device is not None:
            self._free_at_start = self._least_free = device_free_memory(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._take_sample()
            time.sleep(self.interval)

    def _take_sample(self) -> None:
        self.peak = max(self.peak, rss_bytes())
        if self._least_free is not None:
            free = device_free_memory(self.device)
            if free is not None:
                self._least_free = min(self._least_free, free)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._take_sample()

    @property
    def megabytes(self) -> float:
        return round((self.peak - self.base) / 2**20, 1)

    @property
    def gpu_megabytes(self) -> float | None:
        """None without a device, or where its free memory cannot be read."""
        if self._free_at_start is None or self._least_free is None:
            return None
        return round((self._free_at_start - self._least_free) / 2**20, 1)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_prompt(model_dir: str | os.PathLike, workload: Workload) -> tuple[str, str]:
    """The workload's question, and the full prompt the chat template makes of it (for baselines)."""
    from llava_edge.manifest import Manifest
    from llava_edge.runtime.template import user_turn
    from llava_edge.runtime.tokenizer import TextCodec

    manifest = Manifest.load(model_dir)
    wanted = workload.question_tokens + workload.context_tokens + workload.new_tokens
    if wanted > manifest.text.max_context:
        raise LlavaEdgeError(
            f"the workload takes {wanted} tokens before the image's (question, context and new "
            f"tokens), over the model's context of {manifest.text.max_context}; ask for fewer"
        )
    codec = TextCodec(
        Path(model_dir) / manifest.tokenizer, manifest.tokens, manifest.num_image_tokens
    )
    text = question(codec, workload.question_tokens, workload.context_tokens)
    return text, user_turn(manifest.template, text, image=workload.image, first=True)


class PipelineRunner:
    """The runtime side of a benchmark: loads once, then times one request per `run_once`."""

    name = "llava_edge"

    def __init__(self, model_dir: str | os.PathLike, workload: Workload, **load: Any):
        """load: Pipeline.load's options (backend, providers, engine_dir, verify_files, limits);
        its threads are the workload's."""
        from llava_edge.runtime import Pipeline

        self.workload = workload
        self.text, _ = bench_prompt(model_dir, workload)
        self.image = bench_image()
        start = time.perf_counter()
        with PeakMemory(device=0 if uses_gpu(load) else None) as memory:
            # the threads are onnxruntime's (and the baseline's): TensorRT engines take none
            onnxruntime = load.get("backend", "onnxruntime") == "onnxruntime"
            threads = workload.threads if onnxruntime else None
            self.pipe = Pipeline.load(model_dir, threads=threads, **load)
            self.load_s = time.perf_counter() - start
            try:
                self._check_context()
                self.run_once()  # warm: the first run allocates the cache and pays one-off costs
            except BaseException:  # a caller that goes on (an app, a notebook) keeps no sessions
                self.pipe.close()
                raise
        self.memory_mb = memory.megabytes
        self.gpu_memory_mb = memory.gpu_megabytes

    def _check_context(self) -> None:
        """The whole prompt (template and image tokens too) and every new token must fit, or the
        runtime would end each answer early and time fewer tokens than the workload says."""
        pipe = self.pipe
        pixels = [pipe.image_pixels(self.image)] if self.workload.image else []
        prompt = len(pipe.prompt_ids(self.text, pixels))
        if prompt + self.workload.new_tokens > pipe.max_context:
            raise LlavaEdgeError(
                f"the workload's prompt is {prompt} tokens (template and image included) and it "
                f"asks for {self.workload.new_tokens} new ones, over the model's context of "
                f"{pipe.max_context}; ask for fewer --context-tokens or --new-tokens"
            )

    def run_once(self) -> dict[str, float]:
        pipe = self.pipe
        preprocess_ms = vision_ms = 0.0  # a text-only workload runs neither
        if self.workload.image:
            start = time.perf_counter()
            # AnyRes: the base image and the tiles
            pixels = pipe.image_pixels(self.image).pixels
            encode = time.perf_counter()
            pipe.backend.encode_image(pixels)
            done = time.perf_counter()
            pipe._features.clear()  # the request below encodes it again, as a new frame would
            preprocess_ms, vision_ms = (encode - start) * 1000, (done - encode) * 1000
        image = self.image if self.workload.image else None
        answer = pipe.answer(
            image, self.text, max_new_tokens=self.workload.new_tokens, ignore_eos=True
        )
        t = answer.timings
        return {
            "preprocess_ms": preprocess_ms,
            "vision_ms": vision_ms,
            "prefill_ms": t["prefill_ms"] - t["vision_ms"],
            "ttft_ms": t["first_token_ms"],
            "decode_tokens_per_s": t["decode_tokens_per_s"],
            "prompt_tokens": len(answer.prompt_token_ids),
        }

    def close(self) -> None:
        self.pipe.close()


def uses_gpu(load: dict[str, Any]) -> bool:
    """Whether Pipeline.load's options put the model on a GPU (the first: the runtime's)."""
    from llava_edge.runtime.onnx_backend import provider_list

    if load.get("backend", "onnxruntime") != "onnxruntime":
        return True
    return provider_list(load.get("providers"), installed=False) != ["CPUExecutionProvider"]


def measure(runners: list[Any], runs: int) -> dict[str, dict[str, Any]]:
    """Medians of each runner's timings, the runners taking turns so drift hits all alike."""
    results: dict[str, list[dict[str, float]]] = {r.name: [] for r in runners}
    for _ in range(runs):
        for runner in runners:
            results[runner.name].append(runner.run_once())
    reports = {}
    for runner in runners:
        report = medians(results[runner.name])
        report.update(load_s=round(runner.load_s, 3), peak_memory_mb=runner.memory_mb)
        if getattr(runner, "gpu_memory_mb", None) is not None:
            report["gpu_memory_mb"] = runner.gpu_memory_mb
        report["prompt_tokens"] = results[runner.name][-1]["prompt_tokens"]
        reports[runner.name] = report
    return reports


def benchmark(
    model_dir: str | os.PathLike,
    workload: Workload,
    baseline: Callable[[Workload, str], Any] | None = None,
    **load: Any,
) -> dict[str, Any]:
    """The report `llava-edge bench` prints: the workload, the machine, the runtime's medians and,
    with a baseline, its medians and the ratios between the two.

    baseline: makes a runner from (workload, full prompt), e.g. a partial of
    llava_edge.export.baseline.TransformersRunner. load: Pipeline.load's options.
    """
    report: dict[str, Any] = {"workload": asdict(workload), "machine": machine()}
    runners = [PipelineRunner(model_dir, workload, **load)]
    try:
        if baseline is not None:
            _, prompt = bench_prompt(model_dir, workload)
            runners.append(baseline(workload, prompt))
        report.update(measure(runners, workload.runs))
    finally:
        runners[0].close()
    if baseline is not None:
        report["ratios"] = compare(report[runners[0].name], report[runners[1].name])
    return report


def check_plot(
    path: str | os.PathLike, model_dir: str | os.PathLike, baseline: str | None = None
) -> None:
    """Refuse a --plot path inside the model dir or the --baseline checkpoint, before the
    benchmark runs: the chart, written over one of their files (`--plot MODEL/decoder.onnx`),
    would wreck the model it measured."""
    inputs = {"the model dir": model_dir, "the --baseline checkpoint": baseline}
    for name, folder in inputs.items():
        if folder is not None and Path(folder).resolve() in Path(path).resolve().parents:
            raise LlavaEdgeError(
                f"--plot {path} is inside {name} {folder}; write the chart elsewhere"
            )


def check_baseline(model_dir: str | os.PathLike, config: Any, flag: str = "--baseline") -> None:
    """Refuse a baseline checkpoint (its transformers config; given as `flag`) whose language
    model is not the dir's (its layers, width or vocabulary differ): its timings would be of
    other work, and the ratios meaningless. Checked before anything loads."""
    from llava_edge.manifest import Manifest

    text, spec = config.text_config, Manifest.load(model_dir).text
    theirs = (text.num_hidden_layers, text.hidden_size, text.vocab_size)
    ours = (spec.num_layers, spec.hidden_size, spec.vocab_size)
    if theirs != ours:
        raise LlavaEdgeError(
            f"{flag} is another model than the model dir: its decoder has (layers, width, "
            f"vocabulary) {theirs}, the dir's {ours}; pass the checkpoint the dir was exported "
            "from"
        )


def medians(runs: list[dict[str, float]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k != "prompt_tokens"]
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in keys} | {"runs": len(runs)}


def compare(ours: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """Speed-ups of ours over the baseline (above 1 means ours is faster or smaller)."""
    ratios = {}
    for key in ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "load_s", "peak_memory_mb"):
        if ours.get(key) and baseline.get(key):
            ratios[
                key.rsplit("_", 1)[0] + "_speedup" if key != "peak_memory_mb" else "memory_ratio"
            ] = round(baseline[key] / ours[key], 3)
    if ours.get("decode_tokens_per_s") and baseline.get("decode_tokens_per_s"):
        ratios["decode_speedup"] = round(
            ours["decode_tokens_per_s"] / baseline["decode_tokens_per_s"], 3
        )
    return ratios


def read_bandwidth_gb_s(threads: int, size_bytes: int = 1 << 30, runs: int = 5) -> float:
    """Streaming read bandwidth: a multi-threaded sum over a 1 GB buffer, median of `runs`.

    The figure the decode loop's effective weight bandwidth is held against.
    """
    data = np.ones(size_bytes // 4, dtype=np.float32)
    chunks = np.array_split(data, threads * 4)
    with ThreadPoolExecutor(threads) as pool:
        times = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            list(pool.map(np.sum, chunks))
            times.append(time.perf_counter() - start)
    return round(size_bytes / statistics.median(times[1:]) / 1e9, 2)


def decoder_weight_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of weights the decoder reads per token: its graph and external data files."""
    from llava_edge.manifest import Manifest

    model_dir = Path(model_dir)
    return graph_bytes(model_dir / Manifest.load(model_dir).graphs["decoder"].file)


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files; `bench` asks for it before the runs, so that a
    missing matplotlib is said at once, not after minutes of timing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LlavaEdgeError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """A PNG bar chart of ours, beside the baseline where one ran. Needs matplotlib (installed
    with [train])."""
    plt = pyplot()
    metrics = ["ttft_ms", "prefill_ms", "vision_ms", "decode_tokens_per_s", "peak_memory_mb"]
    sides = [k for k in ("llava_edge", "transformers") if k in report]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 3.2))
    for ax, metric in zip(axes, metrics, strict=True):
        values = [report[s].get(metric, 0) for s in sides]
        ax.bar(sides, values, color=["#4c8c4a", "#999999"][: len(sides)])
        ax.set_title(metric.replace("_", " "), fontsize=9)
        ax.tick_params(labelsize=8)
    title = "llava-edge vs transformers" if "transformers" in report else "llava-edge"
    fig.suptitle(f"{title} (higher tokens/s, lower ms/MB is better)", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    # PNG whatever the name: matplotlib would pick the format from the extension (refusing
    # .txt, adding .png to a name without one)
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    try:
        with replace_file(Path(path)) as f:  # whole or not at all
            f.buffer.write(png.getvalue())
    except OSError as e:
        raise LlavaEdgeError(f"cannot write --plot {path}: {e.strerror or e}") from None


def table(report: dict[str, Any]) -> str:
    """The report as an aligned text table, ours beside the baseline."""
    ours, base = report["llava_edge"], report.get("transformers", {})
    rows = [("metric", "llava-edge", "transformers" if base else "")]
    for key in [k for k in METRICS if k in ours or k in base]:
        rows.append((key, str(ours.get(key, "-")), str(base.get(key, "-")) if base else ""))
    lines = [f"{a:<22}{b:>14}{c:>16}" for a, b, c in rows]
    for key, value in report.get("ratios", {}).items():
        lines.append(f"{key:<22}{value:>14}")
    return "\n".join(lines)
