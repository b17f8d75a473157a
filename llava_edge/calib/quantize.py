"""`llava-edge quantize`: an fp32 model dir -> a model dir of explicit-precision graphs.

Precision lives in the ONNX itself (TensorRT 10 takes Q/DQ nodes and fp16 tensors as the truth;
TensorRT 11 has no calibrators or precision flags left). Two consumers read the result and want
different forms of the same precision:

- onnxruntime on a CPU (the runtime's default backend, `GraphSpec.file`). Static Q/DQ runs
  slower than fp32 there (most weights keep a DequantizeLinear that runs on every call:
  docs/quantization.md measures it); what ORT's CPU kernels accelerate is dynamic int8
  (MatMulInteger, activations quantized per call) and MatMulNBits (4-bit blocks).
- TensorRT (`GraphSpec.tensorrt_file` where it differs): static symmetric Q/DQ with zero point 0,
  per-channel int8 weights or block-wise INT4 weights, scales fixed at build time by calibration.

| precision | graph              | file (onnxruntime)                    | tensorrt_file                   |
|-----------|--------------------|---------------------------------------|---------------------------------|
| int8      | all three          | dynamic int8 MatMul, per-channel      | static Q/DQ int8, calibrated    |
| int4      | decoder            | MatMulNBits, 4-bit blocks of 32       | INT4 Q/DQ blocks of 32, opset 21,|
|           |                    |                                       | fp16 activations and KV cache   |
| int4      | vision, projector  | as int8                               | as int8                         |
| fp16      | all three          | fp16 weights and math, fp32 IO        | (same file)                     |

Graph inputs and outputs keep their names and dtypes, so the runtime loads the result unchanged;
the exceptions are the KV caches of the int4 TensorRT form (fp16) and of the fused decoders under
`kv_cache="int8"` (int8): the backends size their caches by the graph's own types.
Everything is written to a temporary dir, loaded by the runtime (which answers one question
with it, and onnxruntime opens each form that load does not run: the TensorRT forms, and the
standard ones beside fused ones), and renamed into place only then: a dir that `quantize`
installs always loads.

Models of any size: what needs the whole graph (shape inference, opset conversion) runs on the
graph without its weights, fp16 weights are converted a chunk at a time (calib/fp16.py), and
onnxruntime's int8 and int4 quantizers, which need the fp32 weights in memory (its calibrators
a few copies of them), write external data past 2 GB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import numbers
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.calib.data import (
    Activations,
    BadSample,
    FeedReader,
    Sample,
    check_samples,
    load_samples,
)
from llava_edge.calib.fp16 import fp16_graph, load_weights, to_fp16
from llava_edge.calib.kv_int8 import KV_CACHE_CHOICES, fused_ranges, int8_kv_cache
from llava_edge.errors import LlavaEdgeError, first_line
from llava_edge.files import (
    check_output_dir,
    graph_bytes,
    is_large,
    replace_dir,
    save_graph,
    scratch_beside,
)
from llava_edge.logs import quiet
from llava_edge.manifest import GraphSpec, Manifest

TARGETS = ("int8", "int4", "fp16")  # what `quantize --precision` makes of an fp32 model dir
# Why an fp16 dir has no fused forms, recorded in each graph's details.no_fused_form: the
# fused forms serve onnxruntime's CPU, where fp16 math is emulated.
FP16_NO_FUSED = (
    "quantize --precision fp16 keeps no fused forms (`export --dtype fp16` writes an fp16 fused "
    "decoder)"
)
# onnxruntime.quantization's calibration cache (quantize_static's calibration_cache_path,
# save_tensors_data) first shipped in 1.27; the int4 TensorRT form (fp16 KV cache, int4 Q/DQ),
# which check_loads opens, loads on the CPU from 1.31. The [calib] extra asks for it.
MIN_ONNXRUNTIME = (1, 31)
# onnxruntime publishes no wheels for Python 3.10 from 1.24 on: there `pip install` cannot bring
# MIN_ONNXRUNTIME, whatever the extra asks.
ONNXRUNTIME_PYTHON = (3, 11)
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_SAMPLES = 32
DEFAULT_METHOD = "minmax"
REPORT_SAMPLES = 8  # held out from calibration and compared against fp32 by --report
INT4_BLOCK = 32  # weights per scale; 32 keeps random-init and trained Llamas usable at 4 bits
# The block sizes `quantize --block-size` offers (MatMulNBits takes powers of two from 16; 32 is
# the smallest the TensorRT form is known to build with). A MatMul whose K the asked-for block
# does not divide takes the largest smaller one that does.
INT4_BLOCKS = (32, 64, 128, 256)
# MatMulNBits' accuracy_level 4 quantizes activations to int8 for the dot products: onnxruntime's
# fast CPU path for 4-bit weights (bench/bench_quantize.py measures it), at an accuracy cost far
# below the 4-bit weights' own.
INT4_ACCURACY_LEVEL = 4
QDQ_MIN_OPSET = 13  # per-channel (axis) QuantizeLinear/DequantizeLinear start at opset 13
INT4_OPSET = 21  # DequantizeLinear's INT4 type and block_size attribute start at opset 21
INT4_IR_VERSION = 10  # the IR version that has the INT4 type
QDQ_SUFFIX = ".qdq.onnx"
# A TensorRT form none of whose weights quantized: int4's is converted to fp16 all the same
TENSORRT_FLOAT = {"int8": "fp32", "int4": "fp16"}
REPORT_FILE = "quantize_report.json"

# onnxruntime.quantization options that give what TensorRT's explicit quantization accepts (the
# settings NVIDIA's modelopt passes to the same quantizer): symmetric int8 with zero point 0,
# weights stored as int8 with a DequantizeLinear, biases left in float.
TENSORRT_QDQ_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    "AddQDQPairToWeight": False,
    "ForceQuantizeNoInputCheck": True,
    "QDQDisableWeightAdjustForInt32Bias": True,
    # Q/DQ on the inputs of each GEMM/convolution only: TensorRT runs them in int8 and hands on
    # float, so the next norm or activation never sees int8 rounding of its input.
    "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm", "MatMul"],
}
# onnxruntime.quantization logs every node it touches (some of it on the root logger) and
# advises pre-processing that graphs from our own exporter do not need.
QUANTIZER_LOGGERS = ("", "onnxruntime")
PROBE_QUESTION = "What is in the picture?"


def quantize_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    precision: str,
    calib: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    method: str | None = None,
    samples: int | None = None,
    report: bool = False,
    force: bool = False,
    block_size: int | None = None,
    prefill: str | None = None,
    kv_cache: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Write a quantized copy of `model_dir` to `out_dir`; returns the report (empty without it).

    int8 and int4 need calibration data (`calib`: a LLaVA JSON file or an image folder;
    `images`: the JSON's image root, or alone an image folder) for the TensorRT graphs' static
    activation scales; fp16 needs none unless a report is asked for. `block_size` (int4 only,
    default 32) is how many weights share a scale: 128 prefills and decodes faster on the CPU
    and costs accuracy (docs/quantization.md measures both). `prefill="int8"` (int4 only) adds
    the fused decoder in int8 for prompts: int8 prefills about twice as fast as int4 on the CPU,
    for the int8 weights' memory on top of the int4 ones. `kv_cache="int8"` (int8 and int4) keeps
    the fused decoder's KV cache in int8, scales calibrated per channel (calib/kv_int8.py): a
    decode step at depth reads a quarter of the cache's bytes. `method` (default "minmax") and
    `samples` (default 32) set int8 and int4 calibration.
    """
    _check_onnxruntime()
    method = DEFAULT_METHOD if method is None else method
    given = samples
    samples = DEFAULT_SAMPLES if samples is None else samples
    if precision not in TARGETS:
        raise LlavaEdgeError(f"--precision must be one of {', '.join(TARGETS)}, got {precision}")
    block = _check_block(precision, block_size)
    _check_prefill(precision, prefill)
    _check_kv_cache(precision, kv_cache)
    if method not in METHODS:
        raise LlavaEdgeError(f"--method must be one of {', '.join(METHODS)}, got {method}")
    if isinstance(samples, bool | np.bool_) or not isinstance(samples, numbers.Integral):
        samples = None  # refused below, named as given
    if samples is None or samples < 1:
        raise LlavaEdgeError(f"--samples must be a whole number of at least 1, got {given!r}")
    samples = int(samples)
    source = Path(model_dir)
    manifest = Manifest.load(source)
    _check_source(manifest, source)
    for option, given in (("--prefill", prefill), ("--kv-cache", kv_cache)):
        if given and manifest.graphs["decoder"].fused is None:
            raise LlavaEdgeError(_needs_fused(option, manifest.graphs["decoder"]))
    opset = manifest.source.get("opset")
    if precision != "fp16" and isinstance(opset, int) and opset < QDQ_MIN_OPSET:
        raise LlavaEdgeError(
            f"{source} was exported at opset {opset}; the int8 and int4 TensorRT forms need "
            f"per-channel Q/DQ, opset {QDQ_MIN_OPSET} or later: re-export it with "
            f"--opset {QDQ_MIN_OPSET} or more"
        )
    out = Path(out_dir)
    if out.resolve() == source.resolve():
        raise LlavaEdgeError(
            "OUT_DIR must differ from MODEL_DIR: the fp32 graphs are the reference"
        )
    check_output_dir(out, force, keep=source, keep_name="the source model dir")
    for data in (calib, images):  # --force must not delete the calibration data either
        if data is not None:
            check_output_dir(out, force, keep=Path(data), keep_name="the calibration data")
    bad: list[BadSample] = []
    calibration, held_out, loaded = _split(precision, calib, images, samples, report, source, bad)
    # ... nor the pictures a JSON file names (found beside it unless --images says where)
    for folder in sorted({s.image.parent for s in loaded if s.image}):
        check_output_dir(out, force, keep=folder, keep_name="the calibration images in")
    if bad:
        log(f"skipped {len(bad)} bad sample(s) of {calib or images}; the first: {bad[0]}")
    elif precision != "fp16" and len(calibration) < samples:
        kept = f", {len(held_out)} more held out for --report" if report else ""
        shared = len(loaded) - len(calibration) - len(held_out)  # of a held-out picture
        kept += f", {shared} left out as they ask about a held-out picture" if shared else ""
        log(
            f"note: calibrating on {len(calibration)} samples, fewer than --samples {samples} "
            f"asks: the data holds no more{kept}"
        )

    start = time.perf_counter()
    largest = max(graph_bytes(source / s.file) for g in manifest.graphs.values() for s in g.forms())
    with scratch_beside(out), replace_dir(out) as tmp, _full_disk_named(out, 2 * largest):
        for name in manifest.data_files():
            shutil.copy2(source / name, tmp / name)
        activations = Activations(source, calibration)
        plan = _plan(precision)
        for name, kind in plan.items():
            graph = manifest.graphs[name]
            _quantize_graph(name, kind, graph, source, tmp, activations, method, block, log)
            if graph.fused and kind == "fp16":
                graph.fused = None
                graph.details["no_fused_form"] = FP16_NO_FUSED
            elif graph.fused:
                graph.fused = quantize_fused(kind, graph.fused, source, tmp, block)
                if prefill and name == "decoder":  # from the fp32 fused decoder of that name
                    graph.fused.prefill = prefill_form(graph.fused, source / graph.fused.file, tmp)
        if kv_cache:
            _int8_kv_cache(manifest, tmp, activations)
        manifest.source["quantized_from"] = {
            "model_dir": str(source.resolve()),
            "files": {n: e.sha256 for n, e in manifest.files.items()},
        }
        manifest.engines = {}  # engines built for the source dir do not fit these graphs
        manifest.record_files(tmp)
        manifest.save(tmp)
        check_loads(tmp, precision)
        result: dict[str, Any] = {}
        if report:
            from llava_edge.calib.report import build_report, format_table, write_report

            # named as installed: the dir it is built in is gone once renamed into place
            result = {**build_report(source, tmp, held_out), "quantized_dir": str(out)}
            write_report(result, tmp / REPORT_FILE)
            log(format_table(result))
    manifest.mark_verified(out)  # every file was hashed above: the first load need not again
    log(f"quantized {source} -> {out} ({precision}) in {time.perf_counter() - start:.1f} s")
    return result


@contextlib.contextmanager
def _full_disk_named(out: Path, needed: int) -> Iterator[None]:
    """Name a full disk: a write to it fails in onnx and onnxruntime as anything (an OSError, or
    a protobuf DecodeError of a truncated copy they wrote and read back). Where the disk holding
    `out` has less free than `needed` (a step's copies of the largest graph), that is the cause."""
    try:
        yield
    except LlavaEdgeError:
        raise
    except Exception:
        free = shutil.disk_usage(_existing(out)).free
        if free >= needed:
            raise
        raise LlavaEdgeError(
            f"the disk holding {out} is full ({free / 1e6:.1f} MB free; quantize needs about "
            f"{needed / 1e6:.1f} MB beyond its output); nothing was installed. Free some space "
            "or choose another OUT_DIR"
        ) from None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _needs_fused(option: str, decoder: GraphSpec) -> str:
    """Why `option` cannot apply, and what to do: export records why a decoder has no fused form
    where the form cannot take it (re-exporting would not help then)."""
    reason = decoder.details.get("no_fused_form")
    if reason:
        return (
            f"{option} needs the fused decoder form, which this model's decoder lacks: {reason}; "
            f"drop {option}"
        )
    return (
        f"{option} needs the fused decoder form, which this model dir lacks (exported with "
        f"--no-fused, or by an older llava-edge); re-export it without --no-fused, or drop "
        f"{option}"
    )


def _check_block(precision: str, block_size: int | None) -> int:
    if block_size is None:
        return INT4_BLOCK
    if precision != "int4":
        raise LlavaEdgeError(
            f"--block-size applies to int4 only (its weights share a scale per block); "
            f"drop it for {precision}"
        )
    if block_size not in INT4_BLOCKS:
        raise LlavaEdgeError(
            f"--block-size must be one of {', '.join(map(str, INT4_BLOCKS))}, got {block_size}"
        )
    return block_size


def _check_prefill(precision: str, prefill: str | None) -> None:
    if prefill is None:
        return
    if precision != "int4" or prefill != "int8":
        raise LlavaEdgeError(
            f"--prefill int8 is for int4 dirs (int8 prompts, int4 steps); got --precision "
            f"{precision} --prefill {prefill}"
        )


def _check_kv_cache(precision: str, kv_cache: str | None) -> None:
    if kv_cache is None:
        return
    if kv_cache not in KV_CACHE_CHOICES or precision not in ("int8", "int4"):
        raise LlavaEdgeError(
            f"--kv-cache int8 is for int8 and int4 dirs; got --precision {precision} "
            f"--kv-cache {kv_cache}"
        )


def _int8_kv_cache(manifest: Manifest, out: Path, activations: Activations) -> None:
    """The fused decoder (and its int8 prefill companion, which shares the cache) with an int8 KV
    cache, its scales from the keys and values they write on the calibration samples."""
    captures = activations.captures("decoder", desc="calibrate the KV cache")
    keys, values = fused_ranges(manifest, out, captures).scales()
    fused = manifest.graphs["decoder"].fused
    prefill = fused.prefill
    fused = int8_kv_cache(out / fused.file, fused, keys, values)
    if prefill:
        fused.prefill = int8_kv_cache(out / prefill.file, prefill, keys, values)
    manifest.graphs["decoder"].fused = fused


def check_fp16_options(
    precision: str,
    calib: str | os.PathLike | None,
    images: str | os.PathLike | None,
    method: str | None,
    samples: int | None,
    report: bool,
) -> None:
    """The command's check: fp16 casts weights and calibrates nothing, so calibration options
    would do nothing (quantize_model itself ignores them, so one call can serve every precision)."""
    if precision != "fp16":
        return
    if method is not None or samples is not None:
        raise LlavaEdgeError(
            "--method and --samples set int8 and int4 calibration; fp16 calibrates nothing: "
            "drop them"
        )
    if (calib is not None or images is not None) and not report:
        raise LlavaEdgeError(
            "fp16 needs no calibration data: drop --calib/--images, or add --report to compare "
            "the fp16 dir with the fp32 one on them"
        )


def _check_onnxruntime() -> None:
    import onnxruntime

    from llava_edge.runtime.onnx_backend import onnxruntime_version

    found = onnxruntime.__version__
    if onnxruntime_version() < MIN_ONNXRUNTIME:
        need = ".".join(map(str, MIN_ONNXRUNTIME))
        raise LlavaEdgeError(
            f"quantize needs onnxruntime {need} or later (its quantizers, and the int4 form it checks), "
            f"found {found}; {_onnxruntime_install(need)}"
        )


def _onnxruntime_install(need: str) -> str:
    """How to get onnxruntime `need`: pip where this Python has its wheels, else another Python."""
    if sys.version_info < ONNXRUNTIME_PYTHON:
        python = ".".join(map(str, sys.version_info[:2]))
        return (
            f"onnxruntime {need} has no wheels for Python {python}: quantize under Python "
            f"{'.'.join(map(str, ONNXRUNTIME_PYTHON))} or later, in a venv with "
            "'llava-edge[calib]' (the model dir it writes runs here)"
        )
    return f"pip install 'onnxruntime>={need}' (or 'llava-edge[calib]')"


def _check_source(manifest: Manifest, source: Path) -> None:
    done = {n: g.precision for n, g in manifest.graphs.items() if g.precision != "fp32"}
    if done:
        kinds = ", ".join(sorted(set(done.values())))
        fp32 = (
            "quantize the fp32 model dir it was quantized from"
            if "quantized_from" in manifest.source
            else "quantize an fp32 export (`llava-edge export` without --dtype)"
        )
        raise LlavaEdgeError(f"{source} is already {kinds} ({', '.join(sorted(done))}); {fp32}")
    manifest.check_files(source)


def _split(
    precision: str,
    calib: str | os.PathLike | None,
    images: str | os.PathLike | None,
    samples: int,
    report: bool,
    source: Path,
    bad: list[BadSample],
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Calibration samples, the held-out ones the report compares on, and every good sample the
    data holds (_choose). Bad samples (not LLaVA's shape, a picture missing, unreadable or over
    the pixel limit, a prompt the context cannot hold) are left out and added to `bad`, as
    `train --skip-bad` leaves them out, as long as what they leave fills what was asked: the
    --samples to calibrate on (fp16: the report's held-out samples); else refused, named.

    Only the samples chosen are checked against the runtime (a picture's header read, a prompt
    tokenized): a bad one found there is left out and the choice made again."""
    if precision == "fp16" and not report:
        return [], [], []
    if precision == "fp16" and calib is None and images is None:
        raise LlavaEdgeError("--report needs held-out data: pass --calib or --images")
    everything = load_samples(calib, images, bad)
    total = len(everything) + len(bad)
    checked: set[Sample] = set()
    while True:
        try:
            calibration, held_out = _choose(precision, everything, samples, report)
        except LlavaEdgeError as e:
            if bad and not everything:  # the bad samples' fault, not the data's
                raise _too_few(bad, calib or images, 0, precision, samples, total) from None
            if bad:  # the good ones cannot serve either (none with a picture, one alone)
                raise LlavaEdgeError(
                    f"{e}; {len(bad)} bad sample(s) of {calib or images} were left out (the "
                    f"first: {bad[0]})"
                ) from None
            raise e from None
        chosen = [s for s in calibration + held_out if s not in checked]
        good = check_samples(source, chosen, bad=bad)
        checked.update(good)
        if len(good) == len(chosen):
            break
        dropped = set(chosen) - set(good)
        everything = [s for s in everything if s not in dropped]
    got = len(held_out) if precision == "fp16" else len(calibration)
    wanted = min(REPORT_SAMPLES, total) if precision == "fp16" else samples
    if bad and got < wanted:
        raise _too_few(bad, calib or images, got, precision, samples, total)
    return calibration, held_out, everything


def _too_few(
    bad: list[BadSample],
    data: Any,
    got: int,
    precision: str,
    samples: int,
    total: int,
) -> LlavaEdgeError:
    if precision == "fp16":
        use, wanted = "compare on", f"the {min(REPORT_SAMPLES, total)} --report holds out"
        fewer = "fix or remove them"
    else:
        use, wanted = "calibrate on", f"--samples {samples}"
        fewer = f"fix or remove them, or pass --samples {got}" if got else "fix them"
    return LlavaEdgeError(
        f"{len(bad)} bad sample(s) of {data} leave {got} to {use}, fewer than {wanted} (the "
        f"first: {bad[0]}); {fewer}"
    )


def _choose(
    precision: str, everything: list[Sample], samples: int, report: bool
) -> tuple[list[Sample], list[Sample]]:
    """The calibration samples and the held-out ones the report compares on (never calibrated
    on, nor their pictures: the vision encoder's and projector's rows compare on pictures
    alone)."""
    if precision == "fp16":
        return [], everything[:REPORT_SAMPLES]
    held = 0
    if report:
        if len(everything) < 2:
            raise LlavaEdgeError(
                "--report needs samples beyond the calibration ones: give at least 2"
            )
        held = min(REPORT_SAMPLES, max(1, len(everything) - samples), len(everything) // 2)
    held_out = everything[len(everything) - held :]
    rest = everything[: len(everything) - held]
    pictures = {s.image for s in held_out if s.image}
    unseen = [s for s in rest if s.image not in pictures]
    # Where every picture is a held-out one too (one scene asked many questions), the prompts
    # still differ.
    pool = unseen if any(s.image for s in unseen) else rest
    calibration = pool[:samples]
    if not any(s.image for s in calibration):
        first = next((i for i, s in enumerate(pool) if s.image), None)
        if first is None:
            raise LlavaEdgeError(
                "no calibration sample has an image: the vision encoder and projector need pictures"
            )
        raise LlavaEdgeError(
            f"none of the first {len(calibration)} calibration samples has an image, and the "
            f"vision encoder and projector need pictures; the first with one is "
            f"{pool[first].origin}: pass --samples {first + 1} or more, or put samples with "
            "images first"
        )
    return calibration, held_out


def _plan(precision: str) -> dict[str, str]:
    """What each graph becomes."""
    if precision == "fp16":
        return {"vision_encoder": "fp16", "projector": "fp16", "decoder": "fp16"}
    decoder = "int4" if precision == "int4" else "int8"
    return {"vision_encoder": "int8", "projector": "int8", "decoder": decoder}


def _quantize_graph(
    name: str,
    kind: str,
    graph: GraphSpec,
    source: Path,
    out: Path,
    activations: Activations,
    method: str,
    block: int,
    log: Any,
) -> None:
    from tqdm import tqdm

    src = source / graph.file
    steps = {"fp16": 1, "int8": 2, "int4": 2}[kind]
    with (
        tqdm(total=steps, desc=f"{kind} {name}", unit="form", leave=True) as bar,
        quiet(*QUANTIZER_LOGGERS),
    ):
        if kind == "fp16":
            bar.set_postfix_str("fp16")
            graph.details = {**graph.details, **to_fp16(src, out / graph.file)}
            bar.update()
        elif kind == "int8":
            bar.set_postfix_str("onnxruntime: dynamic int8")
            ort_details = int8_dynamic(src, out / graph.file)
            bar.update()
            bar.set_postfix_str(f"tensorrt: calibrating ({method})")
            trt_file = Path(graph.file).stem + QDQ_SUFFIX
            reader = FeedReader(activations.captures(name, desc=f"calibrate {name}"))
            trt_details = int8_static_qdq(src, out / trt_file, reader, method)
            bar.update()
            graph.tensorrt_file = trt_file
            graph.details = {
                **graph.details,
                "onnxruntime": ort_details,
                "tensorrt": {**trt_details, "calibration_feeds": reader.count},
            }
        else:
            bar.set_postfix_str("onnxruntime: MatMulNBits")
            ort_details = int4_matmulnbits(src, out / graph.file, block)
            bar.update()
            bar.set_postfix_str("tensorrt: INT4 Q/DQ")
            trt_file = Path(graph.file).stem + QDQ_SUFFIX
            trt_details = int4_qdq(src, out / trt_file, block)
            bar.update()
            graph.tensorrt_file = trt_file
            graph.details = {**graph.details, "onnxruntime": ort_details, "tensorrt": trt_details}
    graph.precision = kind
    if kind == "fp16":
        return
    # What the TensorRT form holds, for --report: not always what `file` does, as it also
    # quantizes Conv and Gemm, and int4's is the fp16 graph where no block fits
    quantized = graph.details["tensorrt"]["quantized_nodes"]
    graph.details["tensorrt"]["precision"] = kind if quantized else TENSORRT_FLOAT[kind]
    if not graph.details["onnxruntime"]["quantized_nodes"]:
        # The manifest says what `file` holds
        graph.precision = "fp32"
        kept = graph.details["onnxruntime"].get("kept_float")
        why = (
            f"none of its {len(kept)} weight MatMuls has an input size (K) that a block of 32 "
            "divides"
            if kept
            else "it has no MatMul with constant weights"
        )
        where = f" in its onnxruntime form (its TensorRT form is {kind})" if quantized else ""
        log(f"warning: {name} stays fp32{where}: {why}")
    elif kept := graph.details["onnxruntime"].get("kept_float"):
        total = len(kept) + graph.details["onnxruntime"]["quantized_nodes"]
        log(
            f"warning: {len(kept)} of {name}'s {total} weight MatMuls stay fp32: no block of 32 "
            "divides their input size (K); manifest.json names them (details.onnxruntime.kept_float)"
        )


def quantize_fused(kind: str, fused: GraphSpec, source: Path, out: Path, block: int) -> GraphSpec:
    """A graph's fused form (onnxruntime only) in the onnxruntime form of `kind` (int8, int4)."""
    with quiet(*QUANTIZER_LOGGERS):
        if kind == "int8":
            details = int8_dynamic(source / fused.file, out / fused.file, ("MatMul", "Attention"))
        else:
            details = int4_matmulnbits(source / fused.file, out / fused.file, block)
    fused.precision = kind if details["quantized_nodes"] else "fp32"
    fused.details = {**fused.details, "onnxruntime": details}
    return fused


PREFILL_FILE = "decoder_prefill.onnx"


def prefill_form(fused: GraphSpec, fp32_fused: Path, out: Path) -> GraphSpec:
    """The fused decoder in dynamic int8 for prompts, beside `fused` (the int4 one): the same IO,
    so both run on one KV cache."""
    with quiet(*QUANTIZER_LOGGERS):
        details = int8_dynamic(fp32_fused, out / PREFILL_FILE)
    return dataclasses.replace(
        fused,
        file=PREFILL_FILE,
        precision="int8",
        prefill=None,
        details={"form": fused.details.get("form"), "onnxruntime": details},
    )


# ---- the forms ---------------------------------------------------------------------------------


def weight_nodes(model: Any, op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")) -> list[Any]:
    """Nodes whose weight (second input) is a stored tensor: the ones worth quantizing.

    MatMuls between two activations (attention's scores and weighted values) are left alone:
    they hold no weights to shrink, and quantizing them costs accuracy in every backend.
    """
    stored = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in op_types and n.input[1] in stored]


def int8_dynamic(src: Path, dst: Path, op_types: tuple[str, ...] = ("MatMul",)) -> dict[str, Any]:
    """onnxruntime's CPU form: int8 per-channel weights, activations quantized on the fly.
    (A fused vision encoder's Attention nodes, `op_types` with "Attention", become QAttention.)"""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    nodes = [n.name for n in weight_nodes(model, op_types)]
    with _linked_apart(src) as linked:
        quantize_dynamic(
            str(linked),
            str(dst),
            op_types_to_quantize=list(op_types),
            nodes_to_quantize=nodes,
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=is_large(src),
            # Shape inference cannot type the outputs of contrib ops (the fused decoder's)
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {
        "form": "dynamic int8 (DynamicQuantizeLinear + MatMulInteger), per-channel weights",
        "quantized_nodes": len(nodes),
    }


def int8_static_qdq(src: Path, dst: Path, reader: FeedReader, method: str) -> dict[str, Any]:
    """TensorRT's form: static symmetric Q/DQ on the inputs of every weight MatMul/Gemm/Conv.

    Activations get one calibrated scale per tensor, weights one per output channel. Norms,
    softmax and attention's activation-by-activation MatMuls stay in float: TensorRT fuses Q/DQ
    only around the GEMMs and convolutions, which hold nearly all the weights.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src), load_external_data=False)
    nodes = weight_nodes(model)
    op_types = sorted({n.op_type for n in nodes})
    with tempfile.TemporaryDirectory(prefix="calib-") as scratch, _linked_apart(src) as linked:
        ranges = Path(scratch) / "ranges.json"
        calibrate(linked, nodes, reader, method, ranges)
        quantize_static(
            str(linked),
            str(dst),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            nodes_to_quantize=[n.name for n in nodes],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_CALIBRATION[method](),
            use_external_data_format=is_large(src),
            extra_options=dict(TENSORRT_QDQ_OPTIONS),
            calibration_cache_path=ranges,
        )
    return {
        "form": "static Q/DQ int8: symmetric, zero point 0, per-tensor activations, "
        "per-channel weights",
        "method": method,
        "quantized_nodes": len(nodes),
        "op_types": op_types,
    }


@contextlib.contextmanager
def _linked_apart(src: Path) -> Iterator[Path]:
    """A path to `src` in a temporary dir, to hand to onnxruntime's quantizers and calibrators
    in its place: they write a shape-inferred copy of the graph beside the path they are given,
    which must not land in the source model dir (it may be read-only; a killed run would leave
    the copy there).

    A symlink where the weights are inside the graph. onnx refuses external data behind a
    symlink or a hard link, so a graph with a `.data` file is handed over as it is where its dir
    is writable (the copy onnxruntime writes refers to the same `.data`, a few MB, and is removed
    on every exit, Ctrl-C included), and copied, weights and all, only where it is not: the
    scratch space the docs count on, one fp32 graph at a time.
    """
    data = src.with_name(src.name + ".data")
    if data.exists() and os.access(src.parent, os.W_OK):
        # onnxruntime's name for it (quant_utils.load_model_with_shape_infer), which it removes
        # only when the step finishes
        inferred = src.with_name(f"{src.stem}-inferred{src.suffix}")
        ours = not inferred.exists()
        try:
            yield src
        finally:
            if ours:
                inferred.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="source-") as scratch:
        linked = Path(scratch) / src.name
        if data.exists():
            shutil.copyfile(src, linked)
            shutil.copyfile(data, Path(scratch) / data.name)
        else:
            linked.symlink_to(src.resolve())
        yield linked


_CALIBRATION = {
    "minmax": lambda: _method("MinMax"),
    "entropy": lambda: _method("Entropy"),
    "percentile": lambda: _method("Percentile"),
}


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return getattr(CalibrationMethod, name)


def calibrate(src: Path, nodes: list[Any], reader: FeedReader, method: str, out: Path) -> None:
    """Ranges of the activations entering `nodes` over the reader's feeds, for quantize_static.

    onnxruntime's calibrators are handed one feed at a time: its histogram collector stacks a
    batch's tensors into one array, which fails when prompts differ in length (and decode steps
    always do), and merging histograms call by call keeps memory flat however many samples.
    """
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="calib-") as scratch:
        calibrator = create_calibrator(
            str(src),
            sorted({n.op_type for n in nodes}),
            augmented_model_path=str(Path(scratch) / "augmented.onnx"),
            calibrate_method=_CALIBRATION[method](),
            use_external_data_format=is_large(src),
            extra_options={"symmetric": True},  # TensorRT's ranges are symmetric about 0
        )
        if method != "minmax":
            # Histograms only of what gets quantized: the same op types also take attention's
            # cached keys, empty at prefill, which the percentile collector cannot take.
            calibrator.tensors_to_calibrate &= {n.input[0] for n in nodes}
        # The histogram calibrators print a line a call ("Collecting tensor data and making
        # histogram ...") on stdout, which is the user's, not theirs.
        with contextlib.redirect_stdout(io.StringIO()):
            for feeds in reader:
                calibrator.collect_data(_One(feeds))
            if reader.count == 0:
                raise LlavaEdgeError(f"no calibration input reached {src.name}")
            ranges = calibrator.compute_data()
        save_tensors_data(ranges, out)
        del calibrator  # its session holds the augmented model open


class _One:
    """A CalibrationDataReader over a single feed."""

    def __init__(self, feeds: dict[str, Any]):
        self.feeds: dict[str, Any] | None = feeds

    def get_next(self) -> dict[str, Any] | None:
        feeds, self.feeds = self.feeds, None
        return feeds


def int4_matmulnbits(src: Path, dst: Path, block: int = INT4_BLOCK) -> dict[str, Any]:
    """onnxruntime's CPU form: MatMulNBits (com.microsoft), 4-bit symmetric blocks along K."""
    details = _int4(src, dst, block, qdq=False)
    return {
        "form": "MatMulNBits 4-bit symmetric blocks (com.microsoft), onnxruntime only",
        **details,
    }


# The TensorRT int4 form's graph IO kept in fp32: what the runtime exchanges with the host. The KV
# cache (past and present) goes fp16 with the activations, so the device holds half the bytes.
INT4_FP32_IO = ("inputs_embeds", "logits")


def int4_qdq(src: Path, dst: Path, block: int = INT4_BLOCK) -> dict[str, Any]:
    """TensorRT's form: INT4 weights with block-wise DequantizeLinear (axis 0, blocks along K)
    into each MatMul, from fp16 activations with fp16 scales: weight-only INT4 as NVIDIA's tools
    make it for TensorRT (its INT4 weight-only GEMM kernels take fp16 activations; with fp32
    ones there may be no fast kernel at all). The KV cache IO is fp16 too. Each block's scale is
    positive (int4_blocks), as TensorRT's parser demands.

    Block-wise DequantizeLinear needs opset 21, so the graph is converted first with ONNX's own
    version converter (it rewrites ops whose form changed since the export's opset, e.g.
    ReduceMean's axes); one with no MatMul a block fits keeps its opset (TensorRT 10.3 reads
    opset 21 only for block-wise weights).
    """
    details = _int4(src, dst, block, qdq=True)
    return {
        "form": "INT4 weight-only Q/DQ: block-wise symmetric DequantizeLinear, no zero point, "
        "fp16 activations and scales, fp16 KV cache",
        "fp32_io": list(INT4_FP32_IO),
        **details,
    }


def _int4(src: Path, dst: Path, block: int, qdq: bool) -> dict[str, Any]:
    """Both int4 forms take the same blocks of the same MatMuls. onnxruntime's CPU form comes
    from its MatMulNBitsQuantizer, which takes one block size a pass (nodes whose K needs a
    smaller block than `block` get a pass of their own). The Q/DQ form is written here
    (dequantize_blocks): that quantizer signs each block's scale so that its largest weight
    lands on -8, and TensorRT's ONNX parser refuses a DequantizeLinear whose scales are not all
    positive ("Scale coefficients must all be positive")."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src), load_external_data=False)
    blocks, skipped = _int4_blocks(model, block)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if qdq:  # on the graph without its weights: the converters serialize it (2 GiB at most)
        model, halved = fp16_graph(model, keep_io_types=list(INT4_FP32_IO))
        if blocks:  # opset 21 only where a block-wise DequantizeLinear needs it
            opset = INT4_OPSET
            model = _convert_version(model, opset)
            model.ir_version = max(model.ir_version, INT4_IR_VERSION)
        load_weights(model, src.parent, halved)
        dequantize_blocks(model, blocks)
    else:
        load_external_data_for_model(model, str(src.parent))
        for size in sorted(set(blocks.values()), reverse=True):
            config = DefaultWeightOnlyQuantConfig(
                block_size=size,
                is_symmetric=True,
                quant_format=QuantFormat.QOperator,
                op_types_to_quantize=("MatMul",),
                accuracy_level=INT4_ACCURACY_LEVEL,
            )
            others = [name for name, b in blocks.items() if b != size]
            quantizer = MatMulNBitsQuantizer(
                model, nodes_to_exclude=skipped + others, algo_config=config
            )
            quantizer.process()
            model = quantizer.model.model
    save_graph(model, dst)
    settings = {"opset": opset} if qdq else {"accuracy_level": INT4_ACCURACY_LEVEL}
    counts = {size: list(blocks.values()).count(size) for size in sorted(set(blocks.values()))}
    return {
        "block_size": block,
        "nodes_per_block": {str(size): count for size, count in counts.items()},
        **settings,
        "quantized_nodes": len(blocks),
        "kept_float": skipped,
    }


def int4_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A [K, N] weight as INT4 in blocks of `block` along K, zero point 0: (values in -8..7 as
    int8, fp16 scales [K / block, N]). A block's scale is the smallest positive one that holds
    it in -8..7 (its most negative weight over 8 or its largest over 7, whichever is more: all
    16 steps in use where the block's extreme is negative, as onnxruntime's signed scales use
    them), and never below fp16's smallest normal number, so that an all-zero block (an LM
    head's unused row) or a tiny one still has a positive scale."""
    k, n = weight.shape
    blocks = weight.astype(np.float32).reshape(k // block, block, n)
    needed = np.maximum(blocks.max(axis=1) / 7, -blocks.min(axis=1) / 8)
    tiny = np.finfo(np.float16).tiny
    scales = np.clip(needed, tiny, np.finfo(np.float16).max).astype(np.float16)
    values = np.rint(blocks / scales.astype(np.float32)[:, None, :])
    return np.clip(values, -8, 7).astype(np.int8).reshape(k, n), scales


def dequantize_blocks(model: Any, blocks: dict[str, int]) -> None:
    """Replace the weight of each MatMul named in `blocks` (weights loaded, in memory) by INT4
    blocks of its size along K and a block-wise DequantizeLinear (axis 0) of fp16 scales."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    stored = {t.name: t for t in graph.initializer}
    dequantized: dict[str, str] = {}  # a weight's name -> its DequantizeLinear's output
    nodes = []
    for node in [_copied(n) for n in graph.node]:  # the graph's own are released below
        if node.name in blocks:
            name = node.input[1]
            if name not in dequantized:
                weight = numpy_helper.to_array(stored[name])
                values, scales = int4_blocks(weight, blocks[node.name])
                flat = values.ravel().astype(np.uint8) & 0x0F
                flat = np.append(flat, np.uint8(0)) if flat.size % 2 else flat
                packed = flat[0::2] | (flat[1::2] << 4)  # two per byte, the first one low
                quant = helper.make_tensor(
                    f"{name}_DQ_Q4", onnx.TensorProto.INT4, values.shape, packed.tobytes(), True
                )
                scale = numpy_helper.from_array(scales, f"{name}_DQ_scales")
                graph.initializer.extend([quant, scale])
                dequantized[name] = f"{name}_DQ"
                nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [quant.name, scale.name],
                        [dequantized[name]],
                        name=f"{name}_DequantizeLinear",
                        axis=0,
                        block_size=blocks[node.name],
                    )
                )
            node.input[1] = dequantized[name]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    # by position: removing a tensor by value compares it, weights and all, with each before it
    replaced = [i for i, t in enumerate(graph.initializer) if t.name in dequantized]
    for index in reversed(replaced):
        del graph.initializer[index]


def _copied(node: Any) -> Any:
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _convert_version(model: Any, opset: int) -> Any:
    """`model` converted to `opset`, each initializer still naming where its weights are stored:
    onnx before 1.19 converts versions without them (initializers with no data at all)."""
    import onnx
    from onnx import version_converter

    stored = {
        t.name: list(t.external_data)
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    converted = version_converter.convert_version(model, opset)
    for tensor in converted.graph.initializer:
        if tensor.name in stored and not tensor.external_data:
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.extend(stored[tensor.name])
    return converted


def _int4_blocks(model: Any, block: int) -> tuple[dict[str, int], list[str]]:
    """Each MatMul to quantize with its block (the largest up to `block` that divides its K),
    and those kept in float because no block of INT4_BLOCKS divides K (a partial last block is
    legal ONNX, but neither MatMulNBits' fast path nor TensorRT's block quantization is
    documented for it)."""
    stored = {t.name: t for t in model.graph.initializer}
    blocks, skipped = {}, []
    for node in weight_nodes(model, ("MatMul",)):
        k = stored[node.input[1]].dims[0]
        fits = [b for b in INT4_BLOCKS if b <= block and k % b == 0]
        if fits:
            blocks[node.name] = max(fits)
        else:
            skipped.append(node.name)
    return blocks, skipped


# ---- the check before installing --------------------------------------------------------------


def check_loads(model_dir: Path, precision: str) -> None:
    """Fail unless the runtime loads `model_dir` and answers a question with it, and onnxruntime
    opens each form that load does not run: the TensorRT forms (the graphs `llava-edge build`
    will hand to TensorRT), and the standard forms where there are fused ones (what GPU
    providers and `graph_form="standard"` run)."""
    import onnxruntime as ort

    from llava_edge.runtime import Pipeline

    def fail(reason: str) -> LlavaEdgeError:
        return LlavaEdgeError(
            f"the {precision} model dir quantize wrote does not load ({reason}); nothing was "
            "installed. Please report this with the source dir's manifest.json"
        )

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Loading is what is checked: type errors surface when onnxruntime resolves the graph, and
    # without graph optimizations each weight is held once, in its stored precision.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    manifest = Manifest.load(model_dir)
    unloaded = [(g.tensorrt_file, g.file if g.fused else None) for g in manifest.graphs.values()]
    for file in [f for pair in unloaded for f in pair if f]:
        path = model_dir / file
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors on bad graphs
            raise fail(f"{path.name}: {first_line(e)}") from None
    try:
        with Pipeline.load(model_dir, verify_files=False) as pipe:
            pipe.answer(_probe_image(), PROBE_QUESTION, max_new_tokens=2)
    except LlavaEdgeError as e:
        raise fail(str(e)) from None


def _probe_image() -> np.ndarray:
    """A small picture with edges and colour, as a camera would hand it over."""
    y, x = np.mgrid[0:48, 0:64]
    return np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
