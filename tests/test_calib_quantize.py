"""`llava-edge quantize` on the tiny model: int8, int4 and fp16 dirs the runtime loads unchanged,
whose TensorRT forms pass the TensorRT 10.3 check, with a report that measures them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import quiet
from PIL import Image

from llava_edge.calib.data import Sample
from llava_edge.calib.quantize import REPORT_FILE, quantize_model
from llava_edge.calib.report import build_report
from llava_edge.calib.trt_check import check_graph, check_model_dir
from llava_edge.cli import main
from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest
from llava_edge.runtime import Pipeline
from llava_edge.runtime.plan import plan

COLOURS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 205, 40), (140, 60, 180)]


@pytest.fixture(scope="module")
def calib_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five pictures with a question each, as LLaVA JSON (images under images/)."""
    root = tmp_path_factory.mktemp("calib")
    (root / "images").mkdir()
    items = []
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (48, 40), (245, 245, 240))
        image.paste(colour, (4 * i, 6, 4 * i + 20, 30))
        image.save(root / "images" / f"{i}.png")
        question = "<image>\nWhat color is the shape?" if i % 2 else "<image>\nWhere is it?"
        items.append(
            {
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": "red"},
                ],
            }
        )
    path = root / "train.json"
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="module")
def quantized(
    tiny_model_dir: Path, calib_json: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for precision, report in (("int8", True), ("int4", False), ("fp16", False)):
        path = root / precision
        result = quantize_model(
            tiny_model_dir,
            path,
            precision,
            report=report,
            **({} if precision == "fp16" else dict(calib=calib_json, samples=3)),  # fp16 takes none
            log=quiet,
        )
        out[precision] = (path, result)
    return out


def _io(path: Path) -> tuple[list, list]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (
        [(i.name, i.type) for i in session.get_inputs()],
        [(o.name, o.type) for o in session.get_outputs()],
    )


def test_the_manifest_tells_what_each_graph_is(quantized: dict) -> None:
    """Each graph's recorded precision and forms are what its files hold, hashes re-recorded."""
    for precision, (path, _) in quantized.items():
        manifest = Manifest.load(path)
        manifest.check_files(path, hashes=True)  # sizes and hashes re-recorded
        for name, graph in manifest.graphs.items():
            model = onnx.load(str(path / graph.file))
            ops = {n.op_type for n in model.graph.node}
            weights = {w.data_type for w in model.graph.initializer}
            held = (
                "int4"
                if "MatMulNBits" in ops
                else "int8"
                if ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
                else "fp16"
                if onnx.TensorProto.FLOAT16 in weights
                else "fp32"
            )
            assert graph.precision == held, (precision, name)
            if precision == "fp16":
                assert graph.tensorrt_file is None  # one file serves both
                continue
            # onnxruntime's CPU form and TensorRT's form differ for int8 and int4
            assert graph.tensorrt_file and graph.tensorrt_file != graph.file
            assert {graph.file, graph.tensorrt_file} <= set(manifest.files)
            qdq = onnx.load(str(path / graph.tensorrt_file))
            opset = next(o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx"))
            assert graph.details["tensorrt"].get("opset", opset) == opset
            dequantized = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
            assert len(dequantized) >= graph.details["tensorrt"]["quantized_nodes"] > 0
            if graph.precision == "int4":
                assert _blocks(model, "MatMulNBits") == {graph.details["onnxruntime"]["block_size"]}


def _blocks(model: onnx.ModelProto, op_type: str) -> set[int]:
    return {
        a.i
        for n in model.graph.node
        if n.op_type == op_type
        for a in n.attribute
        if a.name == "block_size"
    }


def test_int4_block_size_takes_effect_node_by_node(
    tiny_model_dir: Path, calib_json: Path, tmp_path: Path
) -> None:
    """--block-size 128 on the tiny decoder, whose K are 64 (hidden) and 172 (the MLP's): K=64
    takes the largest block that divides it, 172 (a multiple of no block) stays float; in both
    onnxruntime forms and in TensorRT's, and the dir still answers."""
    out = tmp_path / "int4"
    assert (
        main(
            [
                "quantize",
                str(tiny_model_dir),
                str(out),
                "--precision",
                "int4",
                "--calib",
                str(calib_json),
                "--samples",
                "2",
                "--block-size",
                "128",
            ]
        )
        == 0
    )
    manifest = Manifest.load(out)
    decoder = manifest.graphs["decoder"]
    details = decoder.details["onnxruntime"]
    assert details["block_size"] == 128
    assert details["nodes_per_block"] == {"64": details["quantized_nodes"]}
    assert details["kept_float"]  # down_proj: K = 172
    for file in (decoder.file, decoder.fused.file):
        assert _blocks(onnx.load(str(out / file)), "MatMulNBits") == {64}, file
    qdq = onnx.load(str(out / decoder.tensorrt_file))
    assert _blocks(qdq, "DequantizeLinear") == {64}
    assert check_model_dir(out) == {"vision_encoder": [], "projector": [], "decoder": []}
    assert Pipeline.load(out).answer(Image.new("RGB", (40, 40)), "Where?", max_new_tokens=2)


def test_int4_with_int8_prefill_runs_prompts_in_int8_and_steps_in_int4(
    tiny_model_dir: Path, calib_json: Path, quantized: dict, tmp_path: Path
) -> None:
    """`--prefill int8`: a prompt's logits are the int8 dir's, bit for bit, and a step after it
    is the int4 dir's decoder on that same cache."""
    out = tmp_path / "int4_prefill"
    args = ["--precision", "int4", "--calib", str(calib_json), "--samples", "2"]
    assert main(["quantize", str(tiny_model_dir), str(out), *args, "--prefill", "int8"]) == 0
    manifest = Manifest.load(out)
    manifest.check_files(out, hashes=True)
    fused = manifest.graphs["decoder"].fused
    assert (fused.precision, fused.prefill.precision) == ("int4", "int8")
    assert fused.prefill.file in manifest.files
    # a runtime that predates a field skips it (so one without `prefill` runs int4 throughout)
    data = manifest.to_dict()
    data["graphs"]["decoder"]["fused"]["a_later_field"] = {"file": "x.onnx"}
    assert Manifest.from_dict(data).graphs["decoder"].fused.prefill == fused.prefill
    # `plan` counts the prompt decoder's weights, which onnxruntime holds beside the int4 ones
    weights = plan(out).weights
    assert weights["decoder_prefill"] > 0 and weights["decoder"] > 0
    assert "decoder_prefill" not in plan(out, backend="tensorrt").weights

    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, 9, manifest.text.hidden_size)).astype(np.float32)
    step = rng.standard_normal((1, 1, manifest.text.hidden_size)).astype(np.float32)

    def run(pipe: Pipeline, cache: object, embeds: np.ndarray) -> np.ndarray:
        seq = embeds.shape[1]
        return pipe.backend.decode(embeds, np.ones((1, seq), np.int64), None, cache)

    with (
        Pipeline.load(out) as hybrid,
        Pipeline.load(quantized["int8"][0]) as int8,
        Pipeline.load(quantized["int4"][0]) as int4,
    ):
        mixed, reference = hybrid.backend.new_cache(1), int8.backend.new_cache(1)
        np.testing.assert_array_equal(run(hybrid, mixed, prompt), run(int8, reference, prompt))
        int4_prompt = run(int4, int4.backend.new_cache(1), prompt)
        assert not np.array_equal(run(hybrid, hybrid.backend.new_cache(1), prompt), int4_prompt)
        np.testing.assert_array_equal(run(hybrid, mixed, step), run(int4, reference, step))
        # a batch (continuous batching: prompts alone, steps together) answers as one at a time
        requests = [(Image.new("RGB", (40, 30), c), "Where is it?") for c in COLOURS[:3]]
        alone = [hybrid.answer(i, p, max_new_tokens=5, ignore_eos=True) for i, p in requests]
        together = hybrid.generate_batch(requests, max_new_tokens=5, ignore_eos=True)
        assert [a.token_ids for a in together] == [a.token_ids for a in alone]


def test_prefill_needs_the_fused_decoder(
    tiny_model_dir: Path, calib_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    unfused = tmp_path / "unfused"
    shutil.copytree(tiny_model_dir, unfused)
    manifest = Manifest.load(unfused)
    manifest.graphs["decoder"].fused = None  # as `export --no-fused` writes it
    manifest.save(unfused)
    args = ["--precision", "int4", "--calib", str(calib_json), "--prefill", "int8"]
    assert main(["quantize", str(unfused), str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert "--prefill needs the fused decoder form" in err and "\n" not in err
    assert "without --no-fused, or drop --prefill" in err  # re-exporting alike would not help
    assert not (tmp_path / "out").exists()


def test_graph_io_names_and_dtypes_are_unchanged(tiny_model_dir: Path, quantized: dict) -> None:
    """Except the int4 TensorRT form's KV cache, which is fp16 like its activations."""
    reference = Manifest.load(tiny_model_dir)
    kv = ("past_key_values.", "present.")
    for path, _ in quantized.values():
        manifest = Manifest.load(path)
        for name, graph in manifest.graphs.items():
            want = _io(tiny_model_dir / reference.graphs[name].file)
            for file in {graph.file, graph.tensorrt_file} - {None}:
                expected = want
                if path.name == "int4" and file == "decoder.qdq.onnx":
                    expected = tuple(
                        [(n, "tensor(float16)" if n.startswith(kv) else t) for n, t in part]
                        for part in want
                    )
                assert _io(path / file) == expected, (path.name, file)


def test_graphs_really_are_in_their_precision(quantized: dict) -> None:
    def ops(path: Path) -> dict[str, int]:
        model = onnx.load(str(path))
        counts: dict[str, int] = {}
        for node in model.graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts

    int8, int4, fp16 = (quantized[p][0] for p in ("int8", "int4", "fp16"))
    assert ops(int8 / "decoder.onnx").get("MatMulInteger", 0) + ops(int8 / "decoder.onnx").get(
        "DynamicQuantizeMatMul", 0
    )
    assert ops(int8 / "decoder.qdq.onnx")["QuantizeLinear"] > 0
    assert ops(int4 / "decoder.onnx")["MatMulNBits"] > 0
    blocked = [
        n
        for n in onnx.load(str(int4 / "decoder.qdq.onnx")).graph.node
        if n.op_type == "DequantizeLinear"
    ]
    assert blocked and all(any(a.name == "block_size" for a in n.attribute) for n in blocked)
    weights = onnx.load(str(fp16 / "decoder.onnx")).graph.initializer
    assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    for precision in ("int8", "int4"):  # weights shrink: int4 below int8 below fp32
        assert (quantized[precision][0] / "decoder.onnx").stat().st_size < (
            fp16 / "decoder.onnx"
        ).stat().st_size


def test_int8_quantizes_every_stored_weight_and_nothing_else(
    tiny_model_dir: Path, quantized: dict
) -> None:
    """docs/quantization.md: every MatMul/Gemm/Conv whose weight is stored in the graph is
    quantized (the LM head included), in the TensorRT form with Q/DQ on its inputs and its bias
    and output left in float; attention's activation-by-activation MatMuls stay in float."""
    int8 = quantized["int8"][0]
    for name in ("vision_encoder", "projector", "decoder"):
        fp32 = onnx.load(str(tiny_model_dir / f"{name}.onnx")).graph
        stored = {t.name for t in fp32.initializer}
        gemms = [n for n in fp32.node if n.op_type in ("MatMul", "Gemm", "Conv")]
        weighted = {n.name for n in gemms if n.input[1] in stored}
        between_activations = {n.name for n in gemms if n.name not in weighted}
        qdq = onnx.load(str(int8 / f"{name}.qdq.onnx")).graph
        made_by = {out: n.op_type for n in qdq.node for out in n.output}
        taken_by: dict[str, set[str]] = {}
        for n in qdq.node:
            for i in n.input:
                taken_by.setdefault(i, set()).add(n.op_type)
        for node in qdq.node:
            fed = [made_by.get(i) for i in node.input]
            if node.name in weighted:
                assert fed[:2] == ["DequantizeLinear"] * 2, (name, node.name, fed)
                assert "DequantizeLinear" not in fed[2:], (name, node.name)  # the bias: float
                assert "QuantizeLinear" not in taken_by.get(node.output[0], set()), node.name
            elif node.name in between_activations:
                assert "DequantizeLinear" not in fed, (name, node.name)
        assert weighted, name
        if name == "decoder":
            assert any("lm_head" in n for n in weighted) and between_activations
            matmuls = {n.name for n in gemms if n.op_type == "MatMul"} & weighted
            dynamic = onnx.load(str(int8 / "decoder.onnx")).graph.node
            integer = [
                n for n in dynamic if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
            ]
            assert len(integer) == len(matmuls)


def _dtypes(graph: onnx.GraphProto) -> dict[str, int]:
    """Each tensor's element type: inferred, else a Cast's target, else its producer's first
    input's (fp16's kept ops, and the arithmetic between them, give out their input's type)."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    types |= {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:  # in topological order
        for out in node.output:
            if out not in types and node.op_type == "Cast":
                types[out] = next(a.i for a in node.attribute if a.name == "to")
            elif out not in types and node.input and node.input[0] in types:
                types[out] = types[node.input[0]]
    return types


def test_fp16_keeps_norms_softmax_and_layernorm_in_fp32(quantized: dict) -> None:
    """docs/quantization.md: Pow, ReduceMean, Sqrt, Softmax and LayerNormalization compute in
    float32 inside an fp16 graph (each is fed float32)."""
    kept = {"Pow", "ReduceMean", "Sqrt", "Softmax", "LayerNormalization"}
    seen = set()
    for name in ("vision_encoder", "decoder"):
        path = quantized["fp16"][0] / f"{name}.onnx"
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
        types = _dtypes(graph)
        for node in graph.node:
            if node.op_type in kept:
                seen.add(node.op_type)
                assert types[node.input[0]] == onnx.TensorProto.FLOAT, (name, node.name)
    assert seen == kept  # the tiny model has each of them


def test_the_onnxruntime_forms_take_the_documented_settings(quantized: dict) -> None:
    """docs/quantization.md: int4's MatMulNBits are symmetric (no zero points), blocks of 32,
    accuracy_level 4, in the standard and the fused decoder; int8's dynamic MatMuls have one
    weight scale per output channel."""
    int4, int8 = quantized["int4"][0], quantized["int8"][0]
    for file in ("decoder.onnx", "decoder_fused.onnx"):
        nodes = [n for n in onnx.load(str(int4 / file)).graph.node if n.op_type == "MatMulNBits"]
        assert nodes, file
        for node in nodes:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attributes["bits"], attributes["block_size"]) == (4, 32), node.name
            assert attributes["accuracy_level"] == 4, node.name
            assert len([i for i in node.input if i]) == 3, node.name  # A, B, scales: no zero points
    for name in ("vision_encoder", "projector", "decoder"):
        graph = onnx.load(str(int8 / f"{name}.onnx")).graph
        stored = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        nodes = [n for n in graph.node if n.op_type == "MatMulInteger"]
        assert nodes, name
        for node in nodes:
            weight, zero_point = stored[node.input[1]], stored[node.input[3]]
            assert zero_point.shape == (weight.shape[1],) and not zero_point.any(), node.name


def test_every_tensorrt_graph_passes_the_static_check(quantized: dict) -> None:
    for path, _ in quantized.values():
        assert check_model_dir(path) == {"vision_encoder": [], "projector": [], "decoder": []}
    # onnxruntime's CPU forms are not for TensorRT, and the check says so
    assert any(
        "DynamicQuantizeLinear" in p for p in check_graph(quantized["int8"][0] / "decoder.onnx")
    )
    assert any("MatMulNBits" in p for p in check_graph(quantized["int4"][0] / "decoder.onnx"))


def test_the_runtime_loads_every_dir_unchanged(quantized: dict, calib_json: Path) -> None:
    image = calib_json.parent / "images" / "0.png"
    for path, _ in quantized.values():
        with Pipeline.load(path) as pipe:
            answer = pipe.answer(image, "What color is the shape?", max_new_tokens=4)
            assert len(answer.token_ids) >= 1


def test_report_measures_each_form_against_fp32(quantized: dict, tiny_model_dir: Path) -> None:
    path, report = quantized["int8"]
    assert json.loads((path / REPORT_FILE).read_text()) == report
    rows = {(r["graph"], r["form"]): r for r in report["graphs"]}
    # the fused vision encoder (what onnxruntime runs on the CPU) takes the standard one's feeds;
    # the fused decoder's IO differ (the greedy figures measure it)
    assert set(rows) == {
        (g, f)
        for g in ("vision_encoder", "projector", "decoder")
        for f in ("onnxruntime", "tensorrt")
    } | {("vision_encoder", "fused")}
    fused = rows[("vision_encoder", "fused")]
    assert fused["file"] == "vision_encoder_fused.onnx" and fused["precision"] == "int8"
    assert fused["fp32_bytes"] == (tiny_model_dir / "vision_encoder_fused.onnx").stat().st_size
    for row in rows.values():
        assert row["calls"] > 0 and 0.95 < row["cosine_min"] < 1.0 and row["max_abs_error"] > 0
    # every held-out prompt's prefill and its decode steps were compared
    assert rows[("decoder", "onnxruntime")]["calls"] > report["held_out_samples"]
    greedy = report["greedy"]
    assert greedy["tokens"] == 64 and 0 <= greedy["free_running_prefix"] <= 1
    assert 0.5 < greedy["teacher_forced_top1"] <= 1
    cosines = (
        greedy["teacher_forced_logits_cosine_min"],
        greedy["teacher_forced_logits_cosine_mean"],
    )
    assert 0.9 < cosines[0] <= cosines[1] < 1
    assert report["sizes"]["onnxruntime_ratio"] > 1.5 and report["sizes"]["tensorrt_ratio"] > 1.5


def test_the_report_names_the_dir_quantize_installed(quantized: dict) -> None:
    """Not the temporary dir it was built in, which is gone once renamed into place."""
    path, report = quantized["int8"]
    saved = json.loads((path / REPORT_FILE).read_text())
    assert saved["quantized_dir"] == report["quantized_dir"] == str(path)


def test_report_of_a_dir_against_itself_is_exact(tiny_model_dir: Path, calib_json: Path) -> None:
    sample = Sample(calib_json.parent / "images" / "1.png", "What color is the shape?")
    report = build_report(tiny_model_dir, tiny_model_dir, [sample])
    for row in report["graphs"]:
        # the same graph in another session: equal up to float summation order
        assert row["cosine_min"] == pytest.approx(1.0, abs=1e-9) and row["max_abs_error"] < 1e-5
    assert report["greedy"]["free_running_prefix"] == 1.0
    assert report["greedy"]["teacher_forced_top1"] == 1.0
    assert report["greedy"]["teacher_forced_logits_cosine_min"] == pytest.approx(1.0, abs=1e-9)


def test_report_writes_no_session_cache_for_the_fp32_dir(
    tiny_model_dir: Path,
    quantized: dict,
    calib_json: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An entry costs twice the graph's weights on disk (26 GB of fp32 decoder: 52 GB): the fp32
    dir is the reference here, not what the robot runs, so --report leaves its graphs uncached.
    The quantized dir's entries are kept: they are what it runs."""
    import json as json_module

    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    sample = Sample(calib_json.parent / "images" / "1.png", "What color is the shape?")
    build_report(tiny_model_dir, quantized["int8"][0], [sample])
    sources = [
        Path(json_module.loads(meta.read_text())["source"]).parent
        for meta in (tmp_path / "cache").glob("onnxruntime/*/entry.json")
    ]
    assert sources and tiny_model_dir.resolve() not in sources


@pytest.mark.parametrize(
    "case, message",
    [
        ("samples_0", "--samples must be a whole number of at least 1"),
        ("already_quantized", "is already int8"),
        ("fp16_export", "is already fp16 (decoder"),  # and names the fix: an fp32 export
        ("empty_folder", "holds no images"),
        ("unreadable_json", "cannot read calibration file"),
        ("no_calibration", "no calibration data"),
        ("block_size_for_int8", "--block-size applies to int4 only"),
        ("prefill_for_int8", "--prefill int8 is for int4 dirs"),
        ("not_empty", "is not empty; pass --force"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    case: str,
    message: str,
    tiny_model_dir: Path,
    quantized: dict,
    calib_json: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    source, out = tiny_model_dir, tmp_path / "out"
    args = ["--precision", "int8", "--calib", str(calib_json)]
    if case == "samples_0":
        args += ["--samples", "0"]
    elif case == "already_quantized":
        source = quantized["int8"][0]
        message += " (decoder, projector, vision_encoder); quantize the fp32 model dir it was"
    elif case == "fp16_export":  # as `export --dtype fp16` writes it: no quantized_from
        source = tmp_path / "fp16_export"
        shutil.copytree(tiny_model_dir, source)
        manifest = Manifest.load(source)
        manifest.graphs["decoder"].precision = "fp16"
        manifest.save(source)
        message += "); quantize an fp32 export (`llava-edge export` without --dtype)"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args[3] = str(tmp_path / "empty")
    elif case == "unreadable_json":
        (tmp_path / "bad.json").write_bytes(b"\xff\xfe not json")
        args[3] = str(tmp_path / "bad.json")
    elif case == "no_calibration":
        args = ["--precision", "int4"]
    elif case == "block_size_for_int8":
        args += ["--block-size", "64"]
    elif case == "prefill_for_int8":
        args += ["--prefill", "int8"]
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    assert main(["quantize", str(source), str(out), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llava-edge quantize: error:") and message in err
    assert "\n" not in err
    if case == "not_empty":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # no half-written temp dir left behind


def test_force_replaces_an_existing_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["quantize", str(tiny_model_dir), str(out), "--precision", "fp16", "--force"]) == 0
    assert (
        not (out / "old.txt").exists() and Manifest.load(out).graphs["decoder"].precision == "fp16"
    )
    with Pipeline.load(out) as pipe:
        features = pipe.image_features(np.full((32, 32, 3), 128, dtype=np.uint8))
    assert features.dtype == np.float32 and np.isfinite(features).all()


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_every_calibration_method_gives_a_tensorrt_graph(
    method: str, tiny_model_dir: Path, calib_json: Path, tmp_path: Path, capsys
) -> None:
    from llava_edge.calib.data import Activations, FeedReader, load_samples
    from llava_edge.calib.quantize import int8_static_qdq

    samples = load_samples(calib_json, None)[:2]
    activations = Activations(tiny_model_dir, samples, decode_steps=1)
    out = tmp_path / "decoder.qdq.onnx"
    details = int8_static_qdq(
        tiny_model_dir / "decoder.onnx", out, FeedReader(activations.captures("decoder")), method
    )
    assert details["method"] == method and check_graph(out) == []
    assert capsys.readouterr().out == ""  # onnxruntime's calibrators print nothing of their own
    reference = ort.InferenceSession(str(tiny_model_dir / "decoder.onnx"))
    quantized = ort.InferenceSession(str(out))
    for capture in activations.captures("decoder"):  # prompts of different lengths, then steps
        want = reference.run(["logits"], capture.feeds)[0]
        got = quantized.run(["logits"], capture.feeds)[0]
        assert (
            0.99
            < float(want.ravel() @ got.ravel()) / np.linalg.norm(want) / np.linalg.norm(got)
            < 1
        )


def test_fused_forms_are_quantized_and_agree(tiny_model_dir: Path, quantized: dict) -> None:
    """int8/int4 dirs carry the fused forms in their precision's onnxruntime form (MatMulNBits,
    MatMulInteger, QAttention); fp16 dirs none. Both forms answer alike."""
    fp32 = Manifest.load(tiny_model_dir).graphs
    assert fp32["decoder"].fused and fp32["vision_encoder"].fused
    want_ops = {
        "int8": ("MatMulInteger", "MatMulInteger"),
        "int4": ("MatMulNBits", "MatMulInteger"),
    }
    image = np.full((40, 60, 3), 90, dtype=np.uint8)
    for precision, (path, _) in quantized.items():
        graphs = Manifest.load(path).graphs
        if precision == "fp16":
            assert all(g.fused is None for g in graphs.values())
            continue
        for name, op in zip(("decoder", "vision_encoder"), want_ops[precision], strict=True):
            fused = graphs[name].fused
            assert fused.precision == graphs[name].precision
            assert op in {n.op_type for n in onnx.load(str(path / fused.file)).graph.node}
        attention = {
            n.op_type for n in onnx.load(str(path / graphs["vision_encoder"].fused.file)).graph.node
        }
        assert "QAttention" in attention
        answers = []
        for form in ("standard", "fused"):
            with Pipeline.load(path, graph_form=form) as pipe:
                answers.append(
                    pipe.answer(image, "What?", max_new_tokens=8, ignore_eos=True).token_ids
                )
        assert answers[0] == answers[1], precision


# ---- models whose weights live in external data, and results that must not be installed -------


@pytest.fixture(scope="module")
def external_quantized(
    tiny_checkpoint: Path, calib_json: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The tiny model exported, and quantized to each precision, as if every graph were over
    2 GB: weights in .data files, read and written the way a 7B model's are."""
    from llava_edge import files
    from llava_edge.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("external")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "MAX_PROTOBUF", 0)
        export_checkpoint(tiny_checkpoint, root / "fp32", verify=False, log=quiet)
        for precision in ("fp16", "int8", "int4"):
            quantize_model(
                root / "fp32",
                root / precision,
                precision,
                log=quiet,
                **({} if precision == "fp16" else dict(calib=calib_json, samples=3)),
            )
    return {p: root / p for p in ("fp32", "fp16", "int8", "int4")}


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_external_weights_quantize_to_what_inline_weights_do(
    precision: str, external_quantized: dict, quantized: dict, calib_json: Path
) -> None:
    path = external_quantized[precision]
    manifest = Manifest.load(path)
    assert any(name.endswith(".data") for name in manifest.files)  # still external
    image = calib_json.parent / "images" / "3.png"
    answers = []
    for model_dir in (path, quantized[precision][0]):
        with Pipeline.load(model_dir) as pipe:
            answer = pipe.answer(image, "What color is the shape?", max_new_tokens=8)
            ids = np.asarray([pipe.codec.encode("USER: where is it? ASSISTANT:")])
            logits = pipe.backend.decode(
                np.asarray(pipe.table[ids[0]])[None], np.ones_like(ids), np.arange(ids.size)[None],
                pipe.backend.new_cache(1),
            )  # fmt: skip
            answers.append((answer.token_ids, logits))
    assert answers[0][0] == answers[1][0]
    np.testing.assert_allclose(answers[0][1], answers[1][1], rtol=1e-5, atol=1e-5)


def _convert_without_types(original):
    """onnxruntime's fp16 converter as it behaves when shape inference could not run."""

    def convert(model, *args, **kwargs):
        del model.graph.value_info[:]
        return original(model, *args, **{**kwargs, "disable_shape_infer": True})

    return convert


def _int4_qdq_left_at_the_source_opset(model, opset):
    return model  # block-wise DequantizeLinear in an opset-17 graph: onnxruntime refuses it


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_a_dir_that_does_not_load_is_never_installed(
    precision: str,
    tiny_model_dir: Path,
    calib_json: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    if precision == "fp16":
        import onnxruntime.transformers.float16 as float16

        converter = _convert_without_types(float16.convert_float_to_float16)
        monkeypatch.setattr(float16, "convert_float_to_float16", converter)
    else:
        from onnx import version_converter

        monkeypatch.setattr(
            version_converter, "convert_version", _int4_qdq_left_at_the_source_opset
        )
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous dir")
    args = ["--precision", precision, "--force"]
    if precision != "fp16":  # fp16 takes no calibration options
        args += ["--calib", str(calib_json), "--samples", "2"]
    assert main(["quantize", str(tiny_model_dir), str(out), *args]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert error.startswith("llava-edge quantize: error:")
    assert "does not load" in error and "nothing was installed" in error
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # the old dir, untouched
    assert not list(tmp_path.glob(".out.*"))


def test_an_onnxruntime_too_old_for_the_quantizers_is_named(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """1.27 to 1.30 quantize, then cannot open the int4 TensorRT form they wrote."""
    monkeypatch.setattr(ort, "__version__", "1.30.0")
    assert (
        main(["quantize", str(tiny_model_dir), str(tmp_path / "out"), "--precision", "fp16"]) == 1
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "onnxruntime 1.31 or later" in line and "found 1.30.0" in line
    assert "pip install 'onnxruntime>=1.31'" in line
    assert not (tmp_path / "out").exists()


def test_on_python_310_the_refusal_names_a_python_that_can_quantize(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """onnxruntime has no Python 3.10 wheels from 1.24 on: there pip cannot bring 1.31, and the
    way on is another Python, not a pip command that fails to resolve."""
    import collections
    import sys

    version = collections.namedtuple("version_info", "major minor micro releaselevel serial")
    monkeypatch.setattr(sys, "version_info", version(3, 10, 13, "final", 0))
    monkeypatch.setattr(ort, "__version__", "1.23.2")  # the newest onnxruntime for 3.10
    assert (
        main(["quantize", str(tiny_model_dir), str(tmp_path / "out"), "--precision", "fp16"]) == 1
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "onnxruntime 1.31 or later" in line and "found 1.23.2" in line
    assert "no wheels for Python 3.10" in line and "Python 3.11 or later" in line
    assert "pip install" not in line
    assert not (tmp_path / "out").exists()


def _one_weight_graph(
    tmp_path: Path, node: onnx.NodeProto, weight: np.ndarray, shapes: tuple
) -> None:
    """src/g.onnx: `node` alone, of weight "w", its input and output of `shapes`; out/ for what
    it becomes."""
    from onnx import TensorProto, helper, numpy_helper

    (given, _), (made,) = node.input, node.output
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(given, TensorProto.FLOAT, shapes[0])],
        [helper.make_tensor_value_info(made, TensorProto.FLOAT, shapes[1])],
        [numpy_helper.from_array(weight, "w")],
    )
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(tmp_path / "src" / "g.onnx"),
    )


def _one_matmul_of_k_20(tmp_path: Path, given: str, made: str) -> None:
    """src/g.onnx: one MatMul of K 20, which no int4 block divides."""
    node = onnx.helper.make_node("MatMul", [given, "w"], [made])
    _one_weight_graph(tmp_path, node, np.ones((20, 8), np.float32), ([1, 20], [1, 8]))


def test_int4_warning_names_why_a_graph_stays_float(tmp_path: Path) -> None:
    """A graph whose MatMuls all have a K no block divides stays float, and says so (not that it
    has no MatMul)."""

    from llava_edge.calib.quantize import _quantize_graph
    from llava_edge.manifest import GraphSpec

    _one_matmul_of_k_20(tmp_path, "x", "y")
    spec = GraphSpec("g.onnx", {}, {})
    said: list[str] = []
    _quantize_graph(
        "g", "int4", spec, tmp_path / "src", tmp_path / "out", None, "minmax", 32, said.append
    )
    assert spec.details["onnxruntime"]["kept_float"]
    assert spec.precision == "fp32"  # what the graph holds, not what was asked
    assert said == [
        "warning: g stays fp32: none of its 1 weight MatMuls has an input size (K) that a block "
        "of 32 divides"
    ]


def test_int4_warns_of_the_matmuls_a_partly_quantized_graph_keeps_float(tmp_path: Path) -> None:
    """A hidden size no block divides keeps most of a decoder's MatMuls float: int4 was asked,
    so that is said, not only written in the report's details."""
    from onnx import TensorProto, helper, numpy_helper

    from llava_edge.calib.quantize import _quantize_graph
    from llava_edge.manifest import GraphSpec

    nodes = [
        helper.make_node("MatMul", ["x", "w32"], ["h"], name="fits"),
        helper.make_node("MatMul", ["h", "w20"], ["y"], name="kept"),
    ]
    weights = [np.ones((32, 20), np.float32), np.ones((20, 8), np.float32)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w, n) for w, n in zip(weights, ("w32", "w20"), strict=True)],
    )
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "src" / "g.onnx"))
    spec = GraphSpec("g.onnx", {}, {})
    said: list[str] = []
    _quantize_graph(
        "g", "int4", spec, tmp_path / "src", tmp_path / "out", None, "minmax", 32, said.append
    )
    assert spec.precision == "int4" and spec.details["onnxruntime"]["kept_float"] == ["kept"]
    assert said == [
        "warning: 1 of g's 2 weight MatMuls stay fp32: no block of 32 divides their input size "
        "(K); manifest.json names them (details.onnxruntime.kept_float)"
    ]


def test_the_report_names_an_int4_decoder_that_stays_float_by_what_each_form_holds(
    tmp_path: Path,
) -> None:
    """No block fits: `file` stays fp32, and its TensorRT form is the fp16 graph, which the
    report's precision column says (it said fp32 beside a size half fp32's)."""
    from onnx import TensorProto

    from llava_edge.calib.quantize import _quantize_graph
    from llava_edge.calib.report import graph_forms
    from llava_edge.manifest import GraphSpec

    _one_matmul_of_k_20(tmp_path, "inputs_embeds", "logits")
    spec = GraphSpec("g.onnx", {}, {})
    _quantize_graph(
        "g", "int4", spec, tmp_path / "src", tmp_path / "out", None, "minmax", 32, quiet
    )
    held = {}
    for form, (file, precision, _) in graph_forms(spec, GraphSpec("g.onnx", {}, {})).items():
        weights = onnx.load(str(tmp_path / "out" / file)).graph.initializer
        held[form] = (precision, {w.data_type for w in weights})
    assert held == {
        "onnxruntime": ("fp32", {TensorProto.FLOAT}),
        "tensorrt": ("fp16", {TensorProto.FLOAT16}),
    }


class _Feeds:
    """Activations' stand-in: one call of a graph whose input is `x`."""

    def captures(self, graph: str, desc: str | None = None):
        from llava_edge.calib.data import Capture

        yield Capture(
            graph, {"x": np.linspace(-1, 1, 48, dtype=np.float32).reshape(1, 3, 4, 4)}, [], []
        )


def test_a_graph_whose_only_weights_are_a_conv_is_int8_for_tensorrt_and_says_so(
    tmp_path: Path,
) -> None:
    """The `demo` preset's vision encoder is its patch embedding alone: onnxruntime's form
    quantizes MatMuls only and keeps it fp32, TensorRT's quantizes the Conv. The warning and the
    report's rows say which is which (both said fp32)."""
    from llava_edge.calib.quantize import _quantize_graph
    from llava_edge.calib.report import graph_forms
    from llava_edge.manifest import GraphSpec

    conv = onnx.helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2])
    weight = np.ones((8, 3, 2, 2), np.float32)
    _one_weight_graph(tmp_path, conv, weight, ([1, 3, 4, 4], [1, 8, 2, 2]))
    spec = GraphSpec("g.onnx", {}, {})
    said: list[str] = []
    out = tmp_path / "out"
    _quantize_graph("g", "int8", spec, tmp_path / "src", out, _Feeds(), "minmax", 32, said.append)
    forms = graph_forms(spec, GraphSpec("g.onnx", {}, {}))
    held = {form: precision for form, (_, precision, _) in forms.items()}
    assert held == {"onnxruntime": "fp32", "tensorrt": "int8"}
    ops = {n.op_type for n in onnx.load(str(out / spec.tensorrt_file)).graph.node}
    assert "DequantizeLinear" in ops
    assert said == [
        "warning: g stays fp32 in its onnxruntime form (its TensorRT form is int8): it has no "
        "MatMul with constant weights"
    ]


def test_an_int4_tensorrt_form_without_blocks_keeps_its_opset(tmp_path: Path) -> None:
    """Opset 21 is only for block-wise INT4 (TensorRT 10.3 reads 9-20): a graph none of whose
    MatMuls takes a block stays at the export's opset, and passes the TensorRT check."""
    from onnx import TensorProto, helper, numpy_helper

    from llava_edge.calib.quantize import int4_qdq

    for k, opset in ((20, 17), (64, 21)):
        weight = numpy_helper.from_array(np.ones((k, 8), np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["inputs_embeds", "w"], ["logits"])],
            "g",
            [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, k])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
            [weight],
        )
        src, dst = tmp_path / f"{k}.onnx", tmp_path / f"{k}.qdq.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
        details = int4_qdq(src, dst)
        written = onnx.load(str(dst))
        assert [o.version for o in written.opset_import if o.domain in ("", "ai.onnx")] == [opset]
        assert details["opset"] == opset
        assert check_graph(written) == []


def test_int4_tensorrt_scales_are_all_positive(tmp_path: Path) -> None:
    """TensorRT's ONNX parser refuses a DequantizeLinear whose scales are not all positive
    ("Scale coefficients must all be positive"). onnxruntime's quantizer signs each block's scale
    so that its largest weight lands on -8, and gives an all-zero block (an LM head's unused
    row) a zero scale: every int4 TensorRT form failed to build. Each scale is positive, and
    the weights are still each block's nearest INT4 step."""
    from onnx import TensorProto, helper, numpy_helper

    from llava_edge.calib.quantize import int4_qdq

    weight = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    weight[:, 3] = 0  # an all-zero output channel
    weight[:32, 5] = 1e-9  # a block far below fp16's smallest normal scale
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["inputs_embeds", "w"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    src, dst = tmp_path / "g.onnx", tmp_path / "g.qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    int4_qdq(src, dst)
    written = onnx.load(str(dst))
    stored = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    (dq,) = [n for n in written.graph.node if n.op_type == "DequantizeLinear"]
    values, scales = stored[dq.input[0]].astype(np.float32), stored[dq.input[1]]
    assert scales.dtype == np.float16 and scales.shape == (2, 8)
    assert np.all(scales > 0)
    dequantized = values * np.repeat(scales.astype(np.float32), 32, axis=0)
    steps = np.repeat(scales.astype(np.float32), 32, axis=0)
    assert np.all(np.abs(dequantized - weight) <= steps / 2 + 1e-6)
    assert not dequantized[:, 3].any()
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"inputs_embeds": x})
    np.testing.assert_allclose(logits, x @ dequantized, rtol=1e-2, atol=1e-2)


def _convert_version_dropping_external_data(original):
    """onnx's version converter as onnx before 1.19 (the [calib] floor is 1.16) behaves: the
    initializers it returns no longer say where their weights are stored, and hold none."""

    def convert(model, *args, **kwargs):
        converted = original(model, *args, **kwargs)
        for tensor in converted.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
        return converted

    return convert


def test_an_int4_tensorrt_form_of_external_weights_holds_them_on_every_onnx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph over 2 GB keeps its weights in a .data file, and its int4 TensorRT form is made at
    opset 21 from the graph without them: with onnx 1.16-1.18's converter, as with the newest,
    the form holds every weight (it held none, and quantize refused every 7B int4 dir)."""
    from onnx import TensorProto, helper, numpy_helper, version_converter

    from llava_edge.calib.quantize import int4_qdq

    values = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["inputs_embeds", "w"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(values, "w")],
    )
    src = tmp_path / "g.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(src), save_as_external_data=True, location="g.data", size_threshold=0)
    int4_qdq(src, tmp_path / "newest.onnx")
    converter = _convert_version_dropping_external_data(version_converter.convert_version)
    monkeypatch.setattr(version_converter, "convert_version", converter)
    int4_qdq(src, tmp_path / "old.onnx")
    x = np.ones((1, 64), np.float32)
    logits = [
        ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(
            None, {"inputs_embeds": x}
        )
        for f in ("newest.onnx", "old.onnx")
    ]
    np.testing.assert_array_equal(logits[0], logits[1])


def test_an_fp16_dir_says_why_it_has_no_fused_form(quantized: dict) -> None:
    """Asked for the fused form, an fp16 dir names quantize's reason, not 're-export' (which gives
    the same dir)."""
    path = quantized["fp16"][0]
    assert all(g.fused is None for g in Manifest.load(path).graphs.values())
    with pytest.raises(LlavaEdgeError, match="fp16 keeps no fused forms") as error:
        Pipeline.load(path, graph_form="fused")
    assert "re-export" not in str(error.value) and "graph_form='standard'" in str(error.value)
