"""How far a quantized model dir is from its fp32 source, on samples it was not calibrated on.

Per graph and per form (the onnxruntime `file`, the TensorRT `tensorrt_file` run here on the
CPU, which is how its accuracy is checked without a GPU, and the fused vision encoder, which is
what onnxruntime runs on the CPU): cosine similarity and largest absolute
error of the outputs, each graph fed exactly what the fp32 model fed it, so errors do not
compound across graphs. End to end, through the runtime: greedy-token agreement over
GREEDY_TOKENS tokens, both free-running (how long the two answers stay identical) and
teacher-forced (how often the quantized model's next token is fp32's, given fp32's text so far).
And the size of each file, and of all of each form (the CPU runtime's: the fused forms and an
int4 dir's int8 prompt decoder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.calib.data import Activations, Sample
from llava_edge.files import graph_bytes
from llava_edge.manifest import GraphSpec, Manifest

GREEDY_TOKENS = 64
_OUTPUT = {"vision_encoder": "image_features", "projector": "image_embeds", "decoder": "logits"}


def build_report(
    fp32_dir: str | os.PathLike, quant_dir: str | os.PathLike, samples: list[Sample]
) -> dict[str, Any]:
    """The comparison as plain data (what `write_report` saves and `format_table` prints)."""
    fp32_dir, quant_dir = Path(fp32_dir), Path(quant_dir)
    reference = Manifest.load(fp32_dir)
    quantized = Manifest.load(quant_dir)
    activations = Activations(fp32_dir, samples)
    graphs = []
    for name, graph in quantized.graphs.items():
        fp32 = reference.graphs[name]
        forms = graph_forms(graph, fp32)
        for form, (file, precision, fp32_file) in forms.items():
            stats = compare_graph(activations, name, quant_dir / file)
            graphs.append(
                {
                    "graph": name,
                    "form": form,
                    "file": file,
                    "precision": precision,
                    **stats,
                    "bytes": graph_bytes(quant_dir / file),
                    "fp32_bytes": graph_bytes(fp32_dir / fp32_file),
                }
            )
    return {
        "fp32_dir": str(fp32_dir),
        "quantized_dir": str(quant_dir),
        "held_out_samples": len(samples),
        "graphs": graphs,
        "greedy": greedy_agreement(fp32_dir, quant_dir, samples),
        "sizes": _sizes(fp32_dir, reference, quant_dir, quantized),
    }


def graph_forms(graph: GraphSpec, fp32: GraphSpec) -> dict[str, tuple[str, str, str]]:
    """The forms of a quantized graph the report measures, each as (file, precision, the fp32
    file its size is compared with)."""
    forms = {"onnxruntime": (graph.file, graph.precision, fp32.file)}
    if graph.tensorrt_file:
        # its own, where quantize recorded it: a Conv-only graph is int8 there, fp32 in `file`
        held = graph.details.get("tensorrt", {}).get("precision", graph.precision)
        forms["tensorrt"] = (graph.tensorrt_file, held, fp32.file)
    # The fused form is what onnxruntime runs on the CPU; measured here where it takes the
    # standard form's feeds (the vision encoder: the fused decoder's IO differ, and the greedy
    # figures measure it)
    if graph.fused and fp32.fused and graph.fused.inputs.keys() == graph.inputs.keys():
        forms["fused"] = (graph.fused.file, graph.fused.precision, fp32.fused.file)
    return forms


def compare_graph(activations: Activations, graph: str, path: Path) -> dict[str, Any]:
    """Cosine and max error of `path`'s output against fp32's over every captured call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output = _OUTPUT[graph]
    index = [o.name for o in session.get_outputs()].index(output)
    half = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
    cosines, errors = [], []
    for capture in activations.captures(graph, desc=f"compare {path.name}"):
        # the int4 TensorRT form takes its KV cache in fp16
        feeds = {k: v.astype(np.float16) if k in half else v for k, v in capture.feeds.items()}
        (got,) = session.run([output], feeds)
        want = capture.outputs[index]
        cosines.append(cosine(want, got))
        errors.append(float(np.max(np.abs(want.astype(np.float64) - got))))
    if not cosines:
        return {"calls": 0}
    # numpy's min and max, not Python's: a NaN (an overflowed call) must show, not hide by order
    return {
        "calls": len(cosines),
        "cosine_min": float(np.min(cosines)),
        "cosine_mean": float(np.mean(cosines)),
        "max_abs_error": float(np.max(errors)),
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms else float(np.array_equal(a, b))


def greedy_agreement(
    fp32_dir: Path, quant_dir: Path, samples: list[Sample], tokens: int = GREEDY_TOKENS
) -> dict[str, Any]:
    """Free-running and teacher-forced agreement of greedy tokens, through the runtime (the
    graphs it runs: the fused forms and their KV cache on the CPU), and the cosine of the two
    dirs' logits at each teacher-forced step."""
    from tqdm import tqdm

    from llava_edge.runtime import Pipeline

    prefix, forced, cosines, compared = [], [], [], []
    options = {"max_new_tokens": tokens, "ignore_eos": True}
    # No session-cache entries for the fp32 reference: they would cost twice its weights on disk
    # for a dir the robot does not run (the quantized dir's are what it loads next)
    with (
        Pipeline.load(fp32_dir, session_cache=False) as ref,
        Pipeline.load(quant_dir) as pipe,
    ):
        for sample in tqdm(samples, desc="greedy agreement", unit="sample", leave=False):
            image = str(sample.image) if sample.image else None
            want = ref.answer(image, sample.prompt, **options).token_ids
            got = pipe.answer(image, sample.prompt, **options).token_ids
            compared.append(len(want))  # fewer than `tokens` where the context runs out
            same = next(
                (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), len(want)
            )
            prefix.append(same / len(want))
            # Teacher forcing: feed fp32's tokens to both, compare each step's logits.
            theirs = _forced_logits(ref, image, sample.prompt, want)
            ours = _forced_logits(pipe, image, sample.prompt, want)
            hits = sum(int(np.argmax(o) == t) for o, t in zip(ours, want, strict=True))
            forced.append(hits / len(want))
            cosines += [cosine(o, t) for o, t in zip(ours, theirs, strict=True)]
    return {
        "tokens": min(compared, default=tokens),  # on the sample with the least room
        "samples": len(samples),
        "free_running_prefix": float(np.mean(prefix)) if prefix else None,
        "teacher_forced_top1": float(np.mean(forced)) if forced else None,
        "teacher_forced_logits_cosine_min": float(np.min(cosines)) if cosines else None,
        "teacher_forced_logits_cosine_mean": float(np.mean(cosines)) if cosines else None,
    }


def _forced_logits(pipe: Any, image: str | None, prompt: str, tokens: list[int]) -> list[Any]:
    """The logits before each of `tokens`, with the tokens before it fed in."""
    from llava_edge.runtime.generate import embed

    pixels = [pipe.image_pixels(image)] if image else []
    ids = np.asarray([pipe.prompt_ids(prompt, pixels)], dtype=np.int64)
    features = [pipe.pixel_features(pixels)] if image else []
    cache = pipe.backend.new_cache(1)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None]
    embeds = embed(pipe.table, ids, pipe.manifest.tokens.image_token_id, features)
    logits = [pipe.backend.decode(embeds, np.ones_like(ids), positions, cache)[0]]
    for step, token in enumerate(tokens[:-1]):
        position = np.asarray([[ids.shape[1] + step]], dtype=np.int64)
        step_embeds = embed(pipe.table, np.asarray([[token]]), -1, [])
        logits.append(
            pipe.backend.decode(step_embeds, np.ones((1, 1), np.int64), position, cache)[0]
        )
    return logits


def _sizes(
    fp32_dir: Path, reference: Manifest, quant_dir: Path, quantized: Manifest
) -> dict[str, Any]:
    fp32 = sum(graph_bytes(fp32_dir / g.file) for g in reference.graphs.values())
    ort_form = sum(graph_bytes(quant_dir / g.file) for g in quantized.graphs.values())
    trt_form = sum(
        graph_bytes(quant_dir / (g.tensorrt_file or g.file)) for g in quantized.graphs.values()
    )
    fp32_cpu, cpu = _cpu_bytes(fp32_dir, reference), _cpu_bytes(quant_dir, quantized)
    return {
        "fp32_graph_bytes": fp32,
        "onnxruntime_graph_bytes": ort_form,
        "tensorrt_graph_bytes": trt_form,
        "onnxruntime_ratio": round(fp32 / ort_form, 3),
        "tensorrt_ratio": round(fp32 / trt_form, 3),
        "fp32_cpu_graph_bytes": fp32_cpu,
        "cpu_graph_bytes": cpu,
        "cpu_ratio": round(fp32_cpu / cpu, 3),
    }


def _cpu_bytes(root: Path, manifest: Manifest) -> int:
    """What the runtime loads on the CPU: each graph's fused form where it has one, with its
    prompt companion (an int4 dir's int8 prefill decoder), else the graph itself."""
    forms = [g.fused.forms() if g.fused else [g] for g in manifest.graphs.values()]
    return sum(graph_bytes(root / spec.file) for specs in forms for spec in specs)


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Strict JSON, which jq and JavaScript read: a NaN or infinite figure is written as null."""
    text = json.dumps(_finite(report), indent=2, allow_nan=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table for a terminal."""
    head = f"{'graph':15} {'form':12} {'precision':9} {'cos min':>9} {'cos mean':>9} "
    head += f"{'max err':>10} {'MB':>9} {'x smaller':>9}"
    lines = [head, "-" * len(head)]
    for row in report["graphs"]:
        if not row.get("calls"):
            lines.append(f"{row['graph']:15} {row['form']:12} {row['precision']:9} (not run)")
            continue
        lines.append(
            f"{row['graph']:15} {row['form']:12} {row['precision']:9} "
            f"{row['cosine_min']:9.5f} {row['cosine_mean']:9.5f} {row['max_abs_error']:10.4g} "
            f"{row['bytes'] / 1e6:9.1f} {row['fp32_bytes'] / row['bytes']:9.2f}"
        )
    greedy = report["greedy"]
    if greedy["samples"]:
        lines.append(
            f"greedy tokens over {greedy['tokens']}: identical prefix "
            f"{greedy['free_running_prefix']:.1%}, teacher-forced top-1 "
            f"{greedy['teacher_forced_top1']:.1%}, logits cosine min "
            f"{greedy['teacher_forced_logits_cosine_min']:.5f} mean "
            f"{greedy['teacher_forced_logits_cosine_mean']:.5f} ({greedy['samples']} held-out "
            "samples, the graphs the runtime runs)"
        )
    sizes = report["sizes"]
    lines.append(
        f"graphs: fp32 {sizes['fp32_graph_bytes'] / 1e6:.1f} MB, onnxruntime form "
        f"{sizes['onnxruntime_graph_bytes'] / 1e6:.1f} MB (x{sizes['onnxruntime_ratio']}), "
        f"TensorRT form {sizes['tensorrt_graph_bytes'] / 1e6:.1f} MB "
        f"(x{sizes['tensorrt_ratio']}); what the CPU runtime loads: fp32 "
        f"{sizes['fp32_cpu_graph_bytes'] / 1e6:.1f} MB, quantized "
        f"{sizes['cpu_graph_bytes'] / 1e6:.1f} MB (x{sizes['cpu_ratio']})"
    )
    return "\n".join(lines)
