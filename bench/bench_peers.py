"""llava-edge against llama.cpp and transformers on the same language-model weights, as JSON.

    .venv/bin/python bench/bench_peers.py [--runs 5] [--threads 2]
    .venv/bin/python bench/bench_peers.py --llama-bench PATH --convert PATH/convert_hf_to_gguf.py

What is measured, 2 threads by default: prefill of 512 tokens from an empty context and decode of
64 tokens at a depth of 512, for llava-edge's fp32, int8 and int4 decoders (int4 three times: blocks
of 32, the default; `quantize --block-size 128`; and that with `--prefill int8`, whose prompts run
through int8 weights held beside the int4 ones) against llama.cpp's f32, q8_0 and q4_0 GGUF of
the same text model (`llama-bench -p 512 -n 0` and `-p 0 -n 64 -d 512`), and transformers' fp32
forward on it. Dirs with an int8 KV cache (`quantize --kv-cache int8`: int8, and int4 in blocks of
128 with `--prefill int8`) meet llama.cpp with its KV cache in q8_0 (`-ctk q8_0 -ctv q8_0 -fa 1`). `decode_ceiling` says what memory allows: a decode step reads every decoder weight
and the KV cache once, so the machine's read bandwidth (measured as `llava-edge bench` and
bench_runtime.py measure it) over those bytes bounds every engine's decode rate. Runs are interleaved (every engine and
precision once per round, the order rotating) so the drift of a shared machine hits all alike;
medians over rounds, ratios from the same run.

llama.cpp is built once into a cache dir (--llama-cache, default ~/.cache/llava-edge/llama.cpp)
from the `llama-cpp-python` source package on PyPI, which carries llama.cpp's full source
(`pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`, then CMake targets
`llama-bench` and `llama-quantize`; `convert_hf_to_gguf.py` runs with its `gguf-py` on the path).
Where that cannot happen (no compiler, no network) llama.cpp is skipped with the reason in the
JSON and on stderr, and the rest is measured.

The checkpoint and the llava-edge model dirs come from bench_quantize.py's builder (a `small`
preset checkpoint under --work, its fp32 export and int8/int4 copies), or from --checkpoint and
--fp32/--int8/--int4/--int4-b128/--int4-b128-prefill-int8/--int8-kv-int8/
--int4-b128-prefill-int8-kv-int8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.files import graph_bytes
from llava_edge.runtime import bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import given_dirs, positive  # noqa: E402
from bench_quantize import build as build_model_dirs  # noqa: E402
from bench_quantize import measure as measure_runtime  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
# llava-edge's dirs -> the llama.cpp type each is measured against. int4_b128 is `quantize
# --block-size 128`, int4_b128_prefill_int8 adds `--prefill int8` (prompts through int8 weights,
# held beside the int4 ones): bench_quantize.QUANTIZED says how each dir is made.
PRECISIONS = {
    "fp32": "f32",
    "int8": "q8_0",
    "int4": "q4_0",
    "int4_b128": "q4_0",
    "int4_b128_prefill_int8": "q4_0",
    "int8_kv_int8": "q8_0+kv_q8_0",
    "int4_b128_prefill_int8_kv_int8": "q4_0+kv_q8_0",
}
# A dir with an int8 KV cache (`quantize --kv-cache int8`) is measured against llama.cpp with its
# KV cache in q8_0 too (`-ctk q8_0 -ctv q8_0`, which needs flash attention: `-fa 1`).
KV_Q8_0 = "+kv_q8_0"
PREFILL, DECODE, DEPTH = 512, 64, 512  # llava-edge's prefill is its depth: keep them equal


class Skip(Exception):
    """llama.cpp cannot be had here; the message says why."""


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---- llama.cpp ---------------------------------------------------------------------------------


def llama_cpp_tools(cache: Path, version: str) -> dict[str, Path]:
    """llama-bench, llama-quantize and convert_hf_to_gguf.py, built into `cache` on first use."""
    from llava_edge.runtime.session_cache import cpu_flags

    root = cache / version
    # GGML_NATIVE builds for this CPU's features: a build from another CPU could crash here, or
    # run slower than llama.cpp can, so each CPU gets its own build dir
    build = root / f"build-{cpu_flags()}"
    tools = {"bench": build / "bin" / "llama-bench", "quantize": build / "bin" / "llama-quantize"}
    source = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"), None) if root.is_dir() else None
    if source is None:
        source = _fetch_source(root, version)
    tools["convert"] = source / "convert_hf_to_gguf.py"
    if all(p.exists() for p in tools.values()):
        return tools
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise Skip(f"building llama.cpp needs {tool}, which is not installed")
    log(f"building llama.cpp (llama-cpp-python {version}) in {root}: minutes on a small machine")
    configure = [
        "cmake",
        "-S",
        str(source),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",  # the same CPU features onnxruntime's kernels pick at run time
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
    ]
    make = ["cmake", "--build", str(build), "--target", "llama-bench", "llama-quantize"]
    for command in (configure, [*make, "-j", str(os.cpu_count() or 2)]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            (root / "build.log").write_text(done.stdout + done.stderr)
            raise Skip(f"building llama.cpp failed; see {root / 'build.log'}")
    return tools


def _fetch_source(root: Path, version: str) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        got = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                scratch,
            ],
            capture_output=True,
            text=True,
        )
        archives = list(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not archives:
            raise Skip(f"cannot download llama-cpp-python {version}'s source from PyPI")
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            archive.extractall(root, filter="data")
    return next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))


def text_checkpoint(llava_checkpoint: Path, out: Path) -> Path:
    """The LLaVA checkpoint's language model alone (a *ForCausalLM dir), for the GGUF converter.

    The converter needs as many tokenizer entries as embedding rows; LLaVA checkpoints often
    have fewer (the `small` preset: a 2,050-entry tokenizer, 32,000 rows). The copy written here
    pads its tokenizer.json with unused entries; the checkpoint itself is untouched.

    The copy and the GGUF files made from it (beside `out`) are reused while they are of the same
    checkpoint, as its path and its files' sizes and times say; another checkpoint's are made
    again, or llama.cpp and transformers would run other weights than the dirs'.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    source = _source_stamp(llava_checkpoint)
    if (out / "config.json").exists() and _read(out / "source.json") == source:
        return out
    for stale in out.parent.glob("text-*.gguf"):  # made from the copy being replaced
        stale.unlink()
    llava = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint, dtype=torch.float32)
    causal = AutoModelForCausalLM.from_config(llava.config.text_config)
    causal.model = llava.model.language_model
    causal.lm_head = llava.lm_head
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    causal.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(llava_checkpoint)
    tokenizer.save_pretrained(tmp)
    _pad_tokenizer(tmp / "tokenizer.json", llava.config.text_config.vocab_size)
    (tmp / "source.json").write_text(source)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _source_stamp(checkpoint: Path) -> str:
    files = sorted(p for p in Path(checkpoint).resolve().iterdir() if p.is_file())
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    return json.dumps({"checkpoint": str(Path(checkpoint).resolve()), "files": stats})


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _pad_tokenizer(path: Path, rows: int) -> None:
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    for token in data.get("added_tokens", []):  # the converter reads every id from the vocab
        vocab.setdefault(token["content"], token["id"])
    used = set(vocab.values())
    for i in range(rows):
        if i not in used:
            vocab[f"<unused{i}>"] = i
    path.write_text(json.dumps(data))


def gguf_files(tools: dict[str, Path], text_dir: Path, work: Path) -> dict[str, Path]:
    """f32 GGUF from the converter; q8_0 and q4_0 from llama-quantize, as llama.cpp users do."""
    types = dict.fromkeys(p.removesuffix(KV_Q8_0) for p in PRECISIONS.values())
    files = {t: work / f"text-{t}.gguf" for t in types}
    if not files["f32"].exists():
        env = {**os.environ, "PYTHONPATH": str(tools["convert"].parent / "gguf-py")}
        tmp = files["f32"].with_suffix(".tmp")
        done = subprocess.run(
            [sys.executable, str(tools["convert"]), str(text_dir), "--outtype", "f32"]
            + ["--outfile", str(tmp)],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise Skip(f"convert_hf_to_gguf.py failed: {tail}")
        os.replace(tmp, files["f32"])
    for kind in ("q8_0", "q4_0"):
        if not files[kind].exists():
            if not tools["quantize"].exists():
                raise Skip(f"{tools['quantize']} does not exist")
            tmp = files[kind].with_suffix(".tmp")
            done = subprocess.run(
                [str(tools["quantize"]), str(files["f32"]), str(tmp), kind],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise Skip(f"llama-quantize {kind} failed: {done.stderr.strip()[-200:]}")
            os.replace(tmp, files[kind])
    return files


def llama_bench(binary: Path, gguf: Path, threads: int, kv_q8_0: bool) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) from one llama-bench repetition of each test."""
    common = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    if kv_q8_0:
        common += ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1"]
    rates = []
    for test in (["-p", str(PREFILL), "-n", "0"], ["-p", "0", "-n", str(DECODE), "-d", str(DEPTH)]):
        try:
            done = subprocess.run([*common, *test], capture_output=True, text=True)
        except OSError as e:  # not there, not executable
            raise LlavaEdgeError(f"cannot run {binary}: {e.strerror or e}") from None
        if done.returncode:
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise LlavaEdgeError(f"{binary} {' '.join(common[3:] + test)} failed: {why}")
        (row,) = json.loads(done.stdout)
        rates.append(float(row["avg_ts"]))
    return rates[0], rates[1]


# ---- what the memory allows ---------------------------------------------------------------------


def decode_ceiling(pipes: dict[str, Any], measured: dict[str, float], threads: int) -> dict:
    """A decode step reads every decoder weight and the KV cache once: no engine decodes faster
    than the bandwidth over those bytes. Per llava-edge dir: the bytes of a step at DEPTH, that
    ceiling in tokens/s, and the share of it measured."""
    gb_s = bench.read_bandwidth_gb_s(threads)  # the figure bench_runtime.py reports too
    bandwidth = gb_s * 1e9
    out: dict[str, Any] = {"read_bandwidth_gb_per_s": gb_s}
    for p, pipe in pipes.items():
        graph = pipe.manifest.graphs["decoder"]
        graph = graph.fused or graph
        weights = graph_bytes(pipe.model_dir / graph.file)
        held = weights + (graph_bytes(pipe.model_dir / graph.prefill.file) if graph.prefill else 0)
        text = pipe.backend.kv_text
        kv = 2 * text.num_layers * text.num_kv_heads * DEPTH * text.head_dim
        kv *= np.dtype(text.dtype).itemsize
        ceiling = bandwidth / (weights + kv)
        out[f"llava_edge.{p}"] = {
            "decoder_graphs_mb": round(held / 1e6, 1),  # with --prefill int8: both decoders
            "step_mb": round((weights + kv) / 1e6, 1),
            "ceiling_tokens_per_s": round(ceiling, 1),
            "share_measured": round(measured[f"llava_edge.{p}"] / ceiling, 3),
        }
    return out


# ---- transformers ------------------------------------------------------------------------------


class TransformersText:
    """The same text model in transformers (fp32, eager): prefill, then decode step by step."""

    def __init__(self, text_dir: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32).eval()

    def measure(self, seed: int) -> tuple[float, float]:
        import torch

        rng = np.random.default_rng(seed)
        vocab = min(self.model.config.vocab_size, 2000)  # in range on any preset's vocab
        ids = torch.from_numpy(rng.integers(3, vocab, size=(1, PREFILL)))
        with torch.no_grad():
            start = time.perf_counter()
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            prefill = PREFILL / (time.perf_counter() - start)
            cache, steps = out.past_key_values, []
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(DECODE):
                start = time.perf_counter()
                out = self.model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                steps.append(time.perf_counter() - start)
        return prefill, DECODE / sum(steps)  # llama-bench's avg_ts: tokens over total time


# ---- the run -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(".bench/quantize"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--checkpoint", type=Path, help="the LLaVA checkpoint of the dirs below")
    parser.add_argument("--fp32", type=Path)
    parser.add_argument("--int8", type=Path)
    parser.add_argument("--int4", type=Path)
    parser.add_argument("--int4-b128", type=Path, help="an int4 dir quantized with block 128")
    parser.add_argument("--int4-b128-prefill-int8", type=Path, help="the same with --prefill int8")
    parser.add_argument("--int8-kv-int8", type=Path, help="an int8 dir with --kv-cache int8")
    parser.add_argument(
        "--int4-b128-prefill-int8-kv-int8",
        type=Path,
        help="int4 b128, --prefill int8, --kv-cache int8",
    )
    parser.add_argument("--llama-bench", type=Path, help="a llama-bench binary (else built)")
    parser.add_argument("--llama-quantize", type=Path, help="default: beside --llama-bench")
    parser.add_argument("--convert", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument(
        "--llama-cache", type=Path, default=Path.home() / ".cache" / "llava-edge" / "llama.cpp"
    )
    parser.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON, help="source version")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--runs", type=positive, default=5)
    args = parser.parse_args()

    from llava_edge.runtime import Pipeline

    given = given_dirs(parser, args, ["checkpoint", *PRECISIONS])
    given_tools = given_dirs(parser, args, ["llama_bench", "convert"])
    if args.llama_quantize and not given_tools:
        parser.error("--llama-quantize goes with --llama-bench and --convert")
    if given:
        from llava_edge.export.exporter import checkpoint_config

        dirs, checkpoint = given, given["checkpoint"]
        for p in PRECISIONS:  # the same weights on every side, or the ratios compare models
            bench.check_baseline(dirs[p], checkpoint_config(checkpoint), "--checkpoint")
    else:
        dirs = build_model_dirs(args.work, args.preset, tuple(PRECISIONS))
        checkpoint = args.work / "checkpoint"
    text_dir = text_checkpoint(checkpoint, args.work / "text-checkpoint")

    llama: dict[str, Any] = {}
    ggufs: dict[str, Path] = {}
    bench_binary = None
    try:
        if args.no_llama:
            raise Skip("--no-llama")
        if given_tools:
            tools = {
                "bench": args.llama_bench,
                "quantize": args.llama_quantize or args.llama_bench.with_name("llama-quantize"),
                "convert": args.convert,
            }
        else:
            tools = llama_cpp_tools(args.llama_cache, args.llama_cpp_python)
        ggufs = gguf_files(tools, text_dir, args.work)
        bench_binary = tools["bench"]
        llama["version"] = f"llama-cpp-python {args.llama_cpp_python} source"
    except Skip as e:
        log(f"llama.cpp skipped: {e}")
        llama["skipped"] = str(e)

    pipes = {p: Pipeline.load(dirs[p], threads=args.threads) for p in PRECISIONS}
    forms = {p: getattr(pipes[p].backend, "form", "standard") for p in PRECISIONS}
    hf = TransformersText(text_dir, args.threads)
    for p in PRECISIONS:  # warm-up: first calls allocate and pre-pack weights
        measure_runtime(pipes[p].backend, pipes[p].table, 64, 2, seed=0)
    hf.measure(seed=0)

    jobs: list[tuple[str, Any]] = [(f"llava_edge.{p}", p) for p in PRECISIONS]
    peers = dict.fromkeys(PRECISIONS.values()) if ggufs else {}
    jobs += [(f"llama_cpp.{q}", q) for q in peers]
    jobs.append(("transformers.fp32", None))
    rates: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n, _ in jobs}
    load_before = os.getloadavg()[0]
    for run in range(args.runs):
        shift = run % len(jobs)
        for name, key in jobs[shift:] + jobs[:shift]:
            if name.startswith("llava_edge"):
                pipe = pipes[key]
                # prefill of PREFILL tokens from empty, then DECODE tokens at that depth
                prefill, _, decode = measure_runtime(pipe.backend, pipe.table, DEPTH, DECODE, run)
            elif name.startswith("llama_cpp"):
                gguf = ggufs[key.removesuffix(KV_Q8_0)]
                prefill, decode = llama_bench(bench_binary, gguf, args.threads, KV_Q8_0 in key)
            else:
                prefill, decode = hf.measure(seed=run)
            rates[name]["prefill"].append(prefill)
            rates[name]["decode"].append(decode)
            log(f"run {run} {name}: prefill {prefill:.1f} tok/s, decode {decode:.2f} tok/s")

    def median(name: str, kind: str) -> float:
        return round(statistics.median(rates[name][kind]), 2)

    def ratio(ours: str, theirs: str, kind: str) -> float:
        per_run = [a / b for a, b in zip(rates[ours][kind], rates[theirs][kind], strict=True)]
        return round(statistics.median(per_run), 3)

    result: dict[str, Any] = {
        "bench": "peers",
        "machine": bench.machine(),
        "threads": args.threads,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "workload": {"prefill_tokens": PREFILL, "decode_tokens": DECODE, "decode_depth": DEPTH},
        "runs": args.runs,
        "llava_edge_forms": forms,
        "llama_cpp": llama,
        "prefill_tokens_per_s": {n: median(n, "prefill") for n, _ in jobs},
        "decode_tokens_per_s": {n: median(n, "decode") for n, _ in jobs},
        "ratios": {},
    }
    for p, q in PRECISIONS.items():
        ours = f"llava_edge.{p}"
        compared = ([f"llama_cpp.{q}"] if ggufs else []) + ["transformers.fp32"]
        for peer in compared:
            for kind in ("prefill", "decode"):
                result["ratios"][f"{kind}.{p}_vs_{peer}"] = ratio(ours, peer, kind)
    for p in PRECISIONS:
        if p != "fp32":
            result["ratios"][f"prefill.{p}_vs_fp32"] = ratio(
                f"llava_edge.{p}", "llava_edge.fp32", "prefill"
            )
    result["decode_ceiling"] = decode_ceiling(pipes, result["decode_tokens_per_s"], args.threads)
    for pipe in pipes.values():
        pipe.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
