"""`llava-edge plan`: weight sizes read from the graphs, KV cache and activation arithmetic
against hand-computed sizes, the onnxruntime backend's measured peak memory, and `build`'s refusal
of engines that cannot fit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llava_edge import cli
from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime.onnx_sizes import graph_sizes
from llava_edge.runtime.plan import DEVICES, Device, GiB, parse_device, plan
from llava_edge.training.checkpoint import PRESETS

BIG = Device("big", 64 * GiB, 0, 100e9)
JETSON_DOC = Path(__file__).resolve().parents[1] / "docs" / "jetson.md"


def quiet(*_: object) -> None:
    pass


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory) -> Path:
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.training.checkpoint import init_checkpoint

    root = tmp_path_factory.mktemp("demo")
    checkpoint = init_checkpoint(root / "checkpoint", preset="demo", seed=0)
    export_checkpoint(checkpoint, root / "model", verify=False, log=quiet)
    return root / "model"


# ---- reading weight sizes ----------------------------------------------------------------------


def onnx_bytes(path: Path) -> int:
    """What the onnx package says the graph's initializers and Constant tensors hold."""
    model = onnx.load(path, load_external_data=False)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.type == a.TENSOR]
    total = 0.0
    for t in tensors:
        bits = (
            4
            if t.data_type in (TensorProto.INT4, TensorProto.UINT4)
            else 8 * (helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
        )
        total += np.prod(t.dims, dtype=np.int64) * bits / 8
    return int(total)


def test_weight_sizes_match_the_onnx_package(tiny_model_dir: Path, tmp_path: Path) -> None:
    for name in ("vision_encoder", "projector", "decoder"):
        path = tiny_model_dir / f"{name}.onnx"
        assert graph_sizes(path).weight_bytes == onnx_bytes(path) > 0
    # every stored precision, a Constant node, and weights in an external .data file
    int4 = helper.make_tensor("w4", TensorProto.INT4, [64, 32], np.zeros(64 * 32, np.int8))
    half = numpy_helper.from_array(np.ones((10, 3), np.float16), "w16")
    big = numpy_helper.from_array(np.ones((300, 300), np.float32), "w32")
    constant = helper.make_node(
        "Constant", [], ["c"], value=numpy_helper.from_array(np.ones(5, np.float32))
    )
    graph = helper.make_graph(
        [constant, helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, "seq"])],
        [int4, half, big],
    )
    path = tmp_path / "mixed.onnx"
    onnx.save(
        helper.make_model(graph),
        path,
        save_as_external_data=True,
        location="mixed.onnx.data",
        size_threshold=1000,
    )
    assert (tmp_path / "mixed.onnx.data").stat().st_size >= 300 * 300 * 4
    sizes = graph_sizes(path)
    assert sizes.weights == {TensorProto.INT4: 1024, TensorProto.FLOAT16: 60, 1: 360020}
    assert sizes.weight_bytes == onnx_bytes(path)
    assert sizes.input_dtype("x") == "float16" and sizes.largest == 360000
    assert {64, 32, 10, 3, 300} <= sizes.matrix_dims


# ---- sizes against hand arithmetic -------------------------------------------------------------


def llama_params(text: dict, vocab: int) -> int:
    """A freshly initialised Llama decoder's stored parameters: each layer's projections and
    MLP, the LM head (not the embedding table, which the runtime holds), and one RMSNorm weight:
    all 2L+1 norms start as ones and the ONNX exporter stores identical tensors once."""
    h, i, heads, kv = (
        text[k]
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    )
    d = h // heads
    per_layer = 2 * h * h + 2 * h * kv * d + 3 * h * i
    return text["num_hidden_layers"] * per_layer + h + h * vocab


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_plan_against_hand_computed_sizes(preset, tiny_model_dir, demo_model_dir) -> None:
    model = {"tiny": tiny_model_dir, "demo": demo_model_dir}[preset]
    text, vocab = PRESETS[preset]["text"], PRESETS[preset]["vocab_size"]
    layers, kv_heads = text["num_hidden_layers"], text["num_key_value_heads"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    p = plan(model, BIG, max_context=100, max_batch=3, graph_form="standard")
    # fp32 weights: 4 bytes a parameter, plus RoPE's inverse frequencies (head_dim / 2 floats)
    # and a few scalar constants; the rest are the graph's small int64 shape constants
    fp32 = p.weight_dtypes["decoder"]["float32"]
    assert 0 <= fp32 - 4 * llama_params(text, vocab) - 4 * head_dim // 2 <= 4 * 32
    assert p.weights["decoder"] - fp32 < 2048
    # KV: keys and values, every layer, 3 rows of 100 tokens, fp32; the host cache holds the old
    # and the grown buffers for a moment, so onnxruntime plans twice that
    kv = 2 * layers * kv_heads * head_dim * 4 * 100 * 3
    assert p.kv_dtype == "float32" and p.kv_cache == 2 * kv
    trt = plan(model, BIG, backend="tensorrt", max_context=100, max_batch=3)
    assert trt.kv_cache == kv and trt.weights == p.weights
    assert (
        trt.total == sum(trt.weights.values()) + kv + sum(trt.activations.values()) + trt.overhead
    )
    # tokens/s bound: bandwidth over the decoder's weights (and the KV cache read so far)
    assert p.decode_tokens_per_s["weights_only"] == round(100e9 / p.weights["decoder"], 1)
    assert p.decode_tokens_per_s["at_100_tokens"] == round(
        100e9 / (p.weights["decoder"] + kv / 3), 1
    )


def test_onnxruntime_activations_are_those_of_the_calls_the_batch_engine_makes(
    tiny_model_dir, monkeypatch
) -> None:
    """The batch engine encodes and prefills one request at a time and decodes its rows one
    token a step: the plan at batch 4 covers every call it makes, and does not count the prompt
    of four requests in one call, which onnxruntime never runs."""
    from llava_edge.runtime import Pipeline
    from llava_edge.runtime.batching import BatchEngine
    from llava_edge.runtime.onnx_backend import OnnxBackend
    from llava_edge.runtime.plan import _decoder_activations, _vision_activations, read_shapes

    calls: dict[str, list[tuple[int, ...]]] = {"decoder": [], "vision_encoder": []}
    decode, encode = OnnxBackend.decode, OnnxBackend.encode_image

    def spy_decode(self, embeds, mask, positions, cache, *args, **kwargs):
        calls["decoder"].append((embeds.shape[0], embeds.shape[1], int(positions.min())))
        return decode(self, embeds, mask, positions, cache, *args, **kwargs)

    def spy_encode(self, pixel_values):
        calls["vision_encoder"].append((pixel_values.shape[0],))
        return encode(self, pixel_values)

    monkeypatch.setattr(OnnxBackend, "decode", spy_decode)
    monkeypatch.setattr(OnnxBackend, "encode_image", spy_encode)
    image = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    with (
        Pipeline.load(tiny_model_dir, session_cache=False) as pipe,
        BatchEngine(pipe, max_batch=4, prefix_cache_mb=0, start=False) as engine,
    ):
        requests = [
            engine.submit(image, f"question {i}", max_new_tokens=8, ignore_eos=True)
            for i in range(4)
        ]
        engine.run_until_idle()
        context = max(len(r.result().prompt_token_ids) + 8 for r in requests)
    shapes = read_shapes(tiny_model_dir, pipe.manifest, "onnxruntime")
    p = plan(tiny_model_dir, BIG, max_context=context, max_batch=4)
    assert max(b for b, _, _ in calls["decoder"]) == 4  # the rows were decoded together
    ran = max(_decoder_activations(shapes, b, s, past) for b, s, past in calls["decoder"])
    prompts = max(s for _, s, _ in calls["decoder"])
    assert ran <= p.activations["decoder"] < _decoder_activations(shapes, 4, prompts, 0)
    seen = max(b for (b,) in calls["vision_encoder"])
    assert p.activations["vision_encoder"] == _vision_activations(shapes, seen)


def test_largest_context_and_batch_are_the_edges_of_what_fits(tiny_model_dir) -> None:
    first = plan(tiny_model_dir, BIG, backend="tensorrt", max_context=512)
    # a device just big enough for context 512 and batch 1 (plus the runtime's fixed share)
    device = Device("edge", first.total + 1000, 0, None)
    p = plan(tiny_model_dir, device, backend="tensorrt", max_context=512)
    assert p.fits and p.largest_batch == 1 and 512 <= p.largest_context < 1024
    over = plan(tiny_model_dir, device, backend="tensorrt", max_context=p.largest_context + 1)
    assert not over.fits
    at = plan(tiny_model_dir, device, backend="tensorrt", max_context=p.largest_context)
    assert at.fits
    none = plan(tiny_model_dir, Device("too small", 1000, 0, None))
    assert not none.fits and none.largest_context == 0 and none.largest_batch == 0


def test_a_servers_prefix_cache_is_counted_where_one_is_planned(tiny_model_dir, capsys) -> None:
    """serve keeps finished conversations' keys/values for their next turns (256 MB unless
    told): a plan for it must hold them, and what fits is what is left beside them."""
    alone = plan(tiny_model_dir, BIG, max_context=512)
    served = plan(tiny_model_dir, BIG, max_context=512, prefix_cache_mb=256)
    assert served.total == alone.total + 256 * 2**20 and served.prefix_cache == 256 * 2**20
    device = Device("edge", alone.total + 1000, 0, None)  # context 512 fits, with nothing over
    assert plan(tiny_model_dir, device, max_context=512).fits
    tight = plan(tiny_model_dir, device, max_context=512, prefix_cache_mb=1)
    assert not tight.fits and tight.largest_context < 512
    assert cli.main(["plan", str(tiny_model_dir), "--prefix-cache-mb", "256"]) in (0, 2)
    assert "prefix cache" in capsys.readouterr().out
    assert cli.main(["plan", str(tiny_model_dir), "--prefix-cache-mb", "-1"]) == 1
    assert "--prefix-cache-mb must be 0 or more" in capsys.readouterr().err


def test_devices_and_the_cli(tiny_model_dir, capsys) -> None:
    assert DEVICES["agx-orin-64gb"].bandwidth == 204.8e9
    assert DEVICES["orin-nano-8gb"].memory == 8 * GiB
    assert parse_device("7.5GiB").memory == int(7.5 * GiB)
    assert parse_device("8e9").memory == 8_000_000_000
    assert parse_device("orin-nx-16gb", reserve_gb=1).reserve == 10**9
    with pytest.raises(LlavaEdgeError, match="unknown device 'orin-mega'"):
        parse_device("orin-mega")
    args = ["plan", str(tiny_model_dir), "--device", "orin-nano-8gb", "--max-context", "512"]
    assert cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["device"]["name"] == "Jetson Orin Nano 8GB"
    assert report["decode_tokens_per_s"]["weights_only"] > 0
    assert cli.main([*args[:2], "--device", "1MB"]) == 2  # does not fit: exit status 2
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert cli.main([*args[:2], "--max-context", "99999"]) == 1
    assert "--max-context must be between 1 and the model's context" in capsys.readouterr().err


def test_a_dir_with_a_missing_or_truncated_file_is_refused_as_the_runtime_refuses_it(
    tiny_model_dir, tmp_path, capsys
) -> None:
    """A plan of a broken copy would count sizes of no model (or say a dir that cannot run
    fits): it names the file and what to do, in one line, as `run` does."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    decoder = model / "decoder_fused.onnx"  # the graph a CPU plan reads
    decoder.write_bytes(decoder.read_bytes()[:3000])
    assert cli.main(["plan", str(model)]) == 1
    err = capsys.readouterr().err
    assert f"{decoder} is 3000 bytes but the manifest says" in err and "re-export" in err
    assert len(err.strip().splitlines()) == 1
    shutil.copy(tiny_model_dir / decoder.name, decoder)
    (model / "embed_tokens.npy").unlink()  # read by no plan figure, needed by every run
    assert cli.main(["plan", str(model)]) == 1
    assert "embed_tokens.npy is missing; copy the whole model dir" in capsys.readouterr().err


def test_onnxruntime_plans_count_the_graphs_its_providers_open(tiny_model_dir, capsys) -> None:
    """On the CPU alone the runtime opens the fused graphs, with a GPU provider the standard
    ones: the plan counts what `run --provider ...` would hold."""
    from llava_edge.manifest import Manifest
    from llava_edge.runtime.onnx_backend import OnnxBackend

    manifest = Manifest.load(tiny_model_dir)
    decoder = manifest.graphs["decoder"]
    cpu, cuda = plan(tiny_model_dir, BIG), plan(tiny_model_dir, BIG, providers=["cuda"])
    assert (cpu.graph_form, cuda.graph_form) == ("fused", "standard")
    assert cpu.weights["decoder"] == graph_sizes(tiny_model_dir / decoder.fused.file).weight_bytes
    assert cuda.weights["decoder"] == graph_sizes(tiny_model_dir / decoder.file).weight_bytes
    assert cpu.weights["decoder"] != cuda.weights["decoder"]
    backend = OnnxBackend(tiny_model_dir, manifest)  # on the CPU, as the plan's default
    try:
        assert (backend.form, set(backend.sessions)) == (cpu.graph_form, set(cpu.weights))
    finally:
        backend.close()
    args = ["plan", str(tiny_model_dir), "--device", "8GB", "--json"]
    assert cli.main([*args, "--provider", "cuda"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == cuda.weights
    assert cli.main([*args, "--provider", "gpu"]) == 1
    assert "unknown onnxruntime provider 'gpu'" in capsys.readouterr().err
    assert cli.main([*args, "--provider", "cuda", "--backend", "tensorrt"]) == 1
    assert "providers (--provider) are onnxruntime's" in capsys.readouterr().err


def test_a_cpu_plan_counts_fp16_weights_as_the_fp32_copies_onnxruntime_holds(
    tiny_model_dir, tmp_path
) -> None:
    """onnxruntime's CPU provider runs an fp16 graph's MatMuls in fp32 and folds the casts of
    their weights into fp32 copies at load: the plan counts what the session holds, read from
    the graph onnxruntime itself optimizes; a GPU provider holds the fp16 weights as stored."""
    import onnxruntime as ort

    from llava_edge.calib.quantize import quantize_model
    from llava_edge.manifest import Manifest

    model = tmp_path / "fp16"
    quantize_model(tiny_model_dir, model, precision="fp16", log=quiet)
    cpu, cuda = plan(model, BIG), plan(model, BIG, providers=["cuda"])
    for name, graph in Manifest.load(model).graphs.items():
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.held.onnx")
        ort.InferenceSession(str(model / graph.file), options, providers=["CPUExecutionProvider"])
        held = graph_sizes(tmp_path / f"{name}.held.onnx")
        assert abs(cpu.weights[name] - held.weight_bytes) <= 0.05 * held.weight_bytes, name
        assert cuda.weights[name] == graph_sizes(model / graph.file).weight_bytes
    assert cpu.overhead > cuda.overhead  # the fp16 copy read while converting it
    assert cpu.decode_tokens_per_s["weights_only"] < cuda.decode_tokens_per_s["weights_only"]


def test_the_mlp_width_is_the_models_whatever_form_is_counted(tiny_checkpoint, tmp_path) -> None:
    """The fused decoder stores RoPE's cos/sin tables, [context, head_dim / 2]: a context wider
    than the MLP (and narrower than the vocabulary, as Qwen2's 32k against 152k) is not the MLP's
    width, which sizes every call's activations."""
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.manifest import Manifest
    from llava_edge.runtime.plan import read_shapes

    model = tmp_path / "model"
    export_checkpoint(tiny_checkpoint, model, max_context=512, verify=False, log=quiet)
    manifest = Manifest.load(model)
    width = PRESETS["tiny"]["text"]["intermediate_size"]
    assert manifest.text.max_context == 512 > width and manifest.text.vocab_size > 512
    for form in ("fused", "standard"):
        assert read_shapes(model, manifest, "onnxruntime", graph_form=form).mlp_width == width
    assert plan(model, BIG).activations == plan(model, BIG, graph_form="standard").activations


def test_a_tensorrt_plan_for_this_machine_is_for_its_gpu(tiny_model_dir, monkeypatch) -> None:
    """The engines, their KV cache and activations live in the GPU's memory: a server with 64 GB
    of RAM and a 24 GB card has 24 GB for them, as `build` counts."""
    from llava_edge.runtime.tensorrt import gpu

    card = gpu.GpuInfo(0, "RTX 4090", "8.9", 24 * GiB, 20 * GiB, False, "12.6")
    monkeypatch.setattr(gpu, "probe_gpu", lambda index=0: card)
    trt = plan(tiny_model_dir, backend="tensorrt")
    assert trt.device["name"] == "GPU 0, RTX 4090" and trt.available == 20 * GiB
    assert plan(tiny_model_dir).device["name"] == "this machine"  # onnxruntime: host memory

    def none(index=0):
        raise LlavaEdgeError("no NVIDIA driver here")

    monkeypatch.setattr(gpu, "probe_gpu", none)  # no GPU: this machine's memory, as before
    assert plan(tiny_model_dir, backend="tensorrt").device["name"] == "this machine"


@pytest.mark.parametrize(
    "option, message",
    [
        (["--device", "1e400"], "unknown device '1e400'"),
        (["--device", "8GB", "--bandwidth", "nan"], "--bandwidth must be a positive number"),
        (["--device", "8GB", "--bandwidth", "inf"], "--bandwidth must be a positive number"),
        (["--reserve", "nan"], "--reserve must be a number of GB, 0 or more"),
        (["--reserve", "inf"], "--reserve must be a number of GB, 0 or more"),
    ],
)
def test_numbers_that_are_not_finite_are_refused(
    tiny_model_dir, capsys, option: list[str], message: str
) -> None:
    assert cli.main(["plan", str(tiny_model_dir), *option]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


# ---- against what onnxruntime really holds ---------------------------------------------------

MEASURE = """
import json, sys
import numpy as np
from llava_edge.runtime import Pipeline
# the plan models the standard graphs, loaded without the optimized-graph cache
with Pipeline.load(sys.argv[1], threads=2, graph_form="standard", session_cache=False) as pipe:
    image = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    answer = pipe.answer(image, "What is in the picture? Describe it.", max_new_tokens=32,
                         ignore_eos=True)
# VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts from its parent's at fork
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
peak = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps({"peak": peak, "tokens": len(answer.prompt_token_ids) + len(answer.token_ids)}))
"""


def test_plan_is_within_15_percent_of_onnxruntime_peak_memory(tmp_path_factory) -> None:
    """`small`'s shapes (ViT-B/16, hidden 1024, 32k vocabulary) with 4 of its layers, so the
    suite stays fast: weights 0.43 GB, where the fixed overheads weigh more than on all 16."""
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.training.checkpoint import init_checkpoint

    root = tmp_path_factory.mktemp("small4")
    checkpoint = init_checkpoint(root / "checkpoint", preset="small", layers=4, seed=0)
    model = root / "model"
    export_checkpoint(checkpoint, model, verify=False, log=quiet)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model)], capture_output=True, text=True, check=True
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    planned = plan(model, BIG, max_context=measured["tokens"], graph_form="standard")
    assert abs(planned.total - measured["peak"]) <= 0.15 * measured["peak"], (
        planned.total,
        measured,
    )


def test_anyres_plans_every_tile_and_the_whole_grid_of_image_tokens(tiny_model_dir, tmp_path):
    """An AnyRes image runs the vision encoder on its base image and every tile, and fills the
    prompt with the whole grid's features: a plan of one tile's would not hold the real run."""
    import shutil

    from llava_edge.runtime.anyres import max_feature_count, max_tiles
    from llava_edge.runtime.plan import PROMPT_TEXT_TOKENS

    model = tmp_path / "anyres"
    shutil.copytree(tiny_model_dir, model)
    manifest = json.loads((model / "manifest.json").read_text())
    side = int(manifest["num_image_tokens"] ** 0.5)
    tile = manifest["image"]["height"]
    manifest["format_version"] = 2
    manifest["image"]["anyres"] = {
        "grid_pinpoints": [[tile, 2 * tile], [2 * tile, 2 * tile]],
        "tile_size": tile,
        "base_size": [tile, tile],
        "tile_features": side,
        "newline": None,
    }
    (model / "manifest.json").write_text(json.dumps(manifest))
    from llava_edge.manifest import Manifest

    loaded = Manifest.load(model)
    tiles, tokens = max_tiles(loaded.image.anyres), max_feature_count(loaded)
    assert (tiles, tokens) == (5, 5 * side * side)
    single, grid = plan(tiny_model_dir, BIG), plan(model, BIG)
    # the vision encoder's activations scale with its batch: five inputs an image, not one
    assert grid.activations["vision_encoder"] == tiles * single.activations["vision_encoder"]
    assert grid.activations["decoder"] > single.activations["decoder"]
    assert f"at_{tokens + PROMPT_TEXT_TOKENS}_tokens" in grid.decode_tokens_per_s


def _table_rows(section: str) -> list[list[str]]:
    """The cells of each row of a Markdown table (header included, the |---| line left out)."""
    return [
        [c.strip() for c in row.split("|")] for row in re.findall(r"^\| (.*) \|$", section, re.M)
    ]


def test_the_jetson_docs_decode_bounds_are_bandwidth_over_their_weights() -> None:
    """docs/jetson.md's tokens/s table says it is each board's bandwidth over the decoder
    weights of its memory table: a cell that does not follow from them (weights changed in one
    table only) fails here."""
    text = JETSON_DOC.read_text()
    memory = text.split("## 4. Memory needed")[1].split("\n### ")[0]
    weights: dict[tuple[str, str], float] = {}
    model = ""
    for cells in _table_rows(memory)[1:]:
        model = re.search(r"\d+B", cells[0]).group() if cells[0] else model
        weights.setdefault((model, cells[1].split()[0]), float(cells[2].split()[0]))
    bounds = text.split("## 5. Tokens per second, at most")[1].split("\n## ")[0]
    header, *rows = _table_rows(bounds)
    columns = [tuple(name.split()) for name in header[1:]]
    assert len(rows) == 5 and len(weights) == 6
    for board, *cells in rows:
        bandwidth = float(re.search(r"\(([\d.]+) GB/s\)", board).group(1))
        for column, cell in zip(columns, cells, strict=True):
            shown = float(re.search(r"[\d.]+", cell).group())
            bound = bandwidth / weights[column]
            assert abs(shown - bound) <= 0.1, (
                f"{board}, {' '.join(column)}: {cell}, not {bound:.1f}"
            )
