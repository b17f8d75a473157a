"""`quantize --kv-cache int8`: the fused decoder keeps its KV cache in int8, with per-channel scales
that hold every key at every position, and answers as the same dir with an fp32 cache does."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import quiet
from PIL import Image

from llava_edge.calib.data import Sample
from llava_edge.calib.kv_int8 import KVRanges
from llava_edge.calib.quantize import quantize_model
from llava_edge.calib.report import greedy_agreement
from llava_edge.cli import main
from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import PREFILL, KVSpec, Manifest, TextSpec
from llava_edge.runtime import BatchEngine, Pipeline
from llava_edge.runtime.kv_cache import KVCache
from llava_edge.runtime.plan import plan

KV = KVSpec()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("kv_images")
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def dirs(
    tiny_model_dir: Path, images: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """int4 with int8 prompts, with its KV cache in fp32 and in int8: the same weights."""
    root = tmp_path_factory.mktemp("kv_dirs")
    out = {}
    for name, kv_cache in (("fp32_cache", None), ("int8_cache", "int8")):
        out[name] = root / name
        quantize_model(
            tiny_model_dir,
            out[name],
            "int4",
            images=images,
            samples=3,
            prefill="int8",
            kv_cache=kv_cache,
            log=quiet,
        )
    return out


def _scales(path: Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    weights = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    key, value = (f"kv_int8.{layer}.key_scale", f"kv_int8.{layer}.value_scale")
    return onnx.numpy_helper.to_array(weights[key]), onnx.numpy_helper.to_array(weights[value])


def test_the_manifest_and_the_graphs_say_int8_only_for_the_fused_forms(dirs: dict) -> None:
    manifest = Manifest.load(dirs["int8_cache"])
    manifest.check_files(dirs["int8_cache"], hashes=True)
    decoder = manifest.graphs["decoder"]
    past = KV.past_key.format(i=0)
    assert decoder.fused.inputs[past].dtype == "int8"
    assert decoder.fused.prefill.inputs[past].dtype == "int8"  # they share one cache
    assert decoder.fused.outputs[KV.present_value.format(i=0)].dtype == "int8"
    # the standard graphs (TensorRT's) keep the model's dtype
    assert decoder.inputs[past].dtype == "float32"
    for graph in (decoder.fused, decoder.fused.prefill):
        model = onnx.load(str(dirs["int8_cache"] / graph.file), load_external_data=False)
        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
        assert types[past] == onnx.TensorProto.INT8
    # `plan` counts a quarter of the fp32 cache's bytes
    int8_plan, fp32_plan = plan(dirs["int8_cache"]), plan(dirs["fp32_cache"])
    assert int8_plan.kv_dtype == "int8" and fp32_plan.kv_dtype == "float32"
    assert int8_plan.kv_cache * 4 == fp32_plan.kv_cache
    assert plan(dirs["int8_cache"], backend="tensorrt").kv_dtype != "int8"
    # a GPU provider runs the standard graphs: a cache of the model's dtype, no prompt graph
    gpu = plan(dirs["int8_cache"], providers=["cuda"])
    assert gpu.kv_dtype == "float32" and gpu.kv_cache == fp32_plan.kv_cache
    assert PREFILL in int8_plan.weights and PREFILL not in gpu.weights


def test_the_int8_cache_holds_the_fp32_keys_and_values_rounded(dirs: dict) -> None:
    """The same prompt through both dirs: each int8 slot is its fp32 value over the channel's
    scale, rounded and clipped; the logits stay close, step after step."""
    with Pipeline.load(dirs["int8_cache"]) as int8, Pipeline.load(dirs["fp32_cache"]) as fp32:
        text = int8.manifest.text
        rng = np.random.default_rng(1)
        prompt = rng.standard_normal((1, 9, text.hidden_size)).astype(np.float32)
        caches = int8.backend.new_cache(1), fp32.backend.new_cache(1)
        pipes = int8, fp32

        def call(embeds: np.ndarray) -> list[np.ndarray]:
            mask = np.ones(embeds.shape[:2], np.int64)
            return [
                p.backend.decode(embeds, mask, None, c) for p, c in zip(pipes, caches, strict=True)
            ]

        logits = [call(prompt)]
        for _ in range(6):
            logits.append(call(rng.standard_normal((1, 1, text.hidden_size)).astype(np.float32)))
        quantized, reference = caches
        assert quantized.keys[0].dtype == np.int8 and reference.keys[0].dtype == np.float32
        fused = int8.manifest.graphs["decoder"].fused
        n = int(quantized.lengths[0])
        for layer in range(text.num_layers):
            key_scale, value_scale = _scales(dirs["int8_cache"] / fused.file, layer)
            for stored, exact, scale in (
                (quantized.keys[layer], reference.keys[layer], key_scale),
                (quantized.values[layer], reference.values[layer], value_scale),
            ):
                expected = np.clip(np.round(exact[0, :, :n] / scale), -128, 127)
                assert np.abs(stored[0, :, :n].astype(np.float32) - expected).max() <= 1
                assert not stored[0, :, n:].any()  # slots past the row stay zero
        for ours, theirs in logits:
            cosine = float((ours * theirs).sum() / np.linalg.norm(ours) / np.linalg.norm(theirs))
            assert cosine > 0.999


def test_the_report_measures_what_the_int8_cache_costs(dirs: dict, images: Path) -> None:
    """`--report`'s teacher-forced pass runs the graphs the runtime runs, the int8 cache too."""
    samples = [Sample(path, "Describe the image.") for path in sorted(images.iterdir())[:2]]
    same = greedy_agreement(dirs["fp32_cache"], dirs["fp32_cache"], samples, tokens=8)
    cached = greedy_agreement(dirs["fp32_cache"], dirs["int8_cache"], samples, tokens=8)
    assert same["teacher_forced_logits_cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert 0.999 < cached["teacher_forced_logits_cosine_min"] < 1.0


def test_batches_answer_as_one_request_at_a_time(dirs: dict) -> None:
    colours = [(220, 40, 40), (40, 170, 60), (40, 80, 220)]
    requests = [(Image.new("RGB", (40, 30), c), "Where is it?") for c in colours]
    with Pipeline.load(dirs["int8_cache"]) as pipe:
        alone = [pipe.answer(i, p, max_new_tokens=6, ignore_eos=True) for i, p in requests]
        together = pipe.generate_batch(requests, max_new_tokens=6, ignore_eos=True)
        assert [a.token_ids for a in together] == [a.token_ids for a in alone]


def test_key_scales_hold_keys_at_positions_calibration_never_saw() -> None:
    """Rotary turns each pair of key channels (i, i + head_dim/2) by a position's angle: a scale
    from the channels' own maxima would clip a key turned another way; the pair's length does
    not."""
    text = TextSpec(
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=32,
        vocab_size=10,
        max_context=64,
        dtype="float32",
    )
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 2, 20, 32)).astype(np.float32) * rng.uniform(
        0.1, 5, (1, 2, 1, 32)
    )
    values = rng.standard_normal((1, 2, 20, 32)).astype(np.float32)
    cache = KVCache(text, 1)
    cache.write_row(0, [(keys[0], values[0])], 20)
    ranges = KVRanges(text)
    ranges.observe_cache(cache)
    key_scale, value_scale = (s[0] for s in ranges.scales())
    assert np.abs(values).max(axis=(0, 2))[:, None, :] == pytest.approx(value_scale * 127)
    half = 16
    for angle in np.linspace(0, 2 * np.pi, 17):
        first, second = keys[..., :half], keys[..., half:]
        cos, sin = np.cos(angle), np.sin(angle)
        turned = np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
        assert (np.abs(turned) <= key_scale * 127 * (1 + 1e-5)).all()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("fp16", "--kv-cache int8 is for int8 and int4 dirs"),
        ("unfused", "--kv-cache needs the fused decoder form"),
        # a decoder the fused form does not take: re-exporting would not help, dropping would
        ("untakeable", "lacks: head size 24 (GroupQueryAttention takes multiples of 16); drop"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(
    case: str,
    message: str,
    tiny_model_dir: Path,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    source = tiny_model_dir
    precision = "int4"
    if case == "fp16":
        precision = "fp16"
    else:
        source = tmp_path / "unfused"
        shutil.copytree(tiny_model_dir, source)
        manifest = Manifest.load(source)
        manifest.graphs["decoder"].fused = None  # as `export --no-fused` writes it
        if case == "untakeable":  # as export writes a decoder GroupQueryAttention cannot run
            reason = "head size 24 (GroupQueryAttention takes multiples of 16)"
            manifest.graphs["decoder"].details["no_fused_form"] = reason
        manifest.save(source)
    out = tmp_path / "out"
    args = ["--precision", precision, "--kv-cache", "int8"]
    if precision != "fp16":
        args += ["--images", str(images)]
    assert main(["quantize", str(source), str(out), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llava-edge quantize: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_an_onnxruntime_that_cannot_run_the_int8_cache_runs_the_standard_graphs(
    dirs: dict,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """onnxruntime 1.25 and 1.26 load the graph, then fail at its first run; 1.27 decodes a batch
    of rows of different lengths wrongly. The default form (a Jetson's older onnxruntime-gpu)
    runs the standard graphs, whose cache is the model's dtype, and says so in one line; the
    fused form asked for is refused in one."""
    import onnxruntime

    with Pipeline.load(dirs["int8_cache"], graph_form="standard") as pipe:
        standard = pipe.answer(None, "Describe it.", max_new_tokens=6, ignore_eos=True).token_ids
    monkeypatch.setattr(onnxruntime, "__version__", "1.27.0")
    with pytest.raises(LlavaEdgeError, match="needs onnxruntime 1.28 or later, not 1.27.0") as e:
        Pipeline.load(dirs["int8_cache"], graph_form="fused")
    assert "\n" not in str(e.value) and "graph_form='standard'" in str(e.value)
    caplog.clear()
    with Pipeline.load(dirs["int8_cache"]) as pipe:
        assert pipe.backend.form == "standard" and pipe.backend.kv_text.dtype == "float32"
        answer = pipe.answer(None, "Describe it.", max_new_tokens=6, ignore_eos=True)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "standard graphs, not its fused ones" in line and "int8 KV cache" in line
    assert "needs onnxruntime 1.28 or later, not 1.27.0; upgrade onnxruntime" in line
    assert answer.token_ids == standard
    with Pipeline.load(dirs["fp32_cache"]) as pipe:  # an fp32 cache runs fused on it
        assert pipe.backend.form == "fused"
    caplog.clear()  # the command line answers, saying so once
    args = ["run", str(dirs["int8_cache"]), "--prompt", "Hi", "--max-new-tokens", "2"]
    assert main(args) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [line]
    monkeypatch.setattr(onnxruntime, "__version__", "1.28.0")
    with Pipeline.load(dirs["int8_cache"]) as pipe:
        assert pipe.backend.form == "fused"


def test_scales_hold_what_the_quantized_decoder_writes_on_its_calibration_samples(
    dirs: dict, images: Path, tiny_model_dir: Path
) -> None:
    """The cache holds the quantized decoder's keys and values, not the fp32 one's: int4 weights
    move them past the fp32 maxima (some channels by several per cent on `tiny`), so scales from
    fp32 clipped even on the calls they were calibrated on."""
    from llava_edge.calib.data import DEFAULT_PROMPT, Activations

    samples = [Sample(p, DEFAULT_PROMPT) for p in sorted(images.iterdir())[:3]]  # as `dirs`
    manifest = Manifest.load(dirs["int8_cache"])
    fused = manifest.graphs["decoder"].fused
    scales = [_scales(dirs["int8_cache"] / fused.file, i) for i in range(manifest.text.num_layers)]
    with Pipeline.load(dirs["fp32_cache"]) as pipe:  # the same weights, the cache in fp32
        cache = None
        for capture in Activations(tiny_model_dir, samples).captures("decoder"):
            embeds = capture.feeds["inputs_embeds"]
            if capture.feeds["attention_mask"].shape[1] == embeds.shape[1]:
                cache = pipe.backend.new_cache(1)  # a sample's prompt
            pipe.backend.decode(embeds, np.ones(embeds.shape[:2], np.int64), None, cache)
            n = int(cache.lengths[0])
            for layer, (key_scale, value_scale) in enumerate(scales):
                for stored, scale in (
                    (cache.keys[layer], key_scale),
                    (cache.values[layer], value_scale),
                ):
                    assert (np.abs(stored[0, :, :n]) <= 127 * scale * (1 + 1e-5)).all()


def test_scales_hold_text_the_calibration_samples_never_asked(dirs: dict) -> None:
    """Calibrated on pictures asked "Describe the image." alone, the cache still holds a
    text-only prompt in other words, and any run of tokens: the vocabulary sweep gives each
    token's first-layer keys and values (which depend on the token alone) their range. Without
    it they went up to 1.4 times past it on `tiny`. (The int8 prompt decoder quantizes a call's
    activations by the call's own range, hence the tolerance.)"""
    manifest = Manifest.load(dirs["int8_cache"])
    key_scale, value_scale = _scales(dirs["int8_cache"] / manifest.graphs["decoder"].fused.file, 0)
    with Pipeline.load(dirs["fp32_cache"]) as pipe:  # the same weights, the cache in fp32
        words = pipe.prompt_ids("Write a poem about robots, 42 bolts and the sea!", [])
        anything = np.random.default_rng(1).permutation(len(pipe.table))[:200]
        anything = anything[anything != manifest.tokens.image_token_id]
        for ids in (words, anything):
            ids = np.asarray([ids], np.int64)
            cache = pipe.backend.new_cache(1)
            pipe.backend.decode(pipe.table[ids], np.ones_like(ids), None, cache)
            n = int(cache.lengths[0])
            assert (np.abs(cache.keys[0][0, :, :n]) <= 127 * key_scale * 1.02).all()
            assert (np.abs(cache.values[0][0, :, :n]) <= 127 * value_scale * 1.02).all()


def test_the_vocabulary_sweep_holds_each_token_once_the_most_frequent_first(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row of the table but the image token's, once, after BOS; of a table past the cap,
    the first rows (BPE numbers its most frequent tokens first)."""
    from llava_edge.calib import kv_int8

    manifest = Manifest.load(tiny_model_dir)
    rows = len(np.load(tiny_model_dir / manifest.embeddings, mmap_mode="r"))
    bos, image = manifest.tokens.bos_token_id, manifest.tokens.image_token_id

    def swept() -> list[int]:
        ids = []
        for prompt in kv_int8.vocabulary_prompts(manifest, rows):
            assert len(prompt) <= kv_int8.SWEEP_PROMPT + 1 and prompt[0] == bos
            ids += prompt[1:].tolist()
        return ids

    everything = swept()
    assert sorted(everything) == [i for i in range(rows) if i != image]
    assert everything != sorted(everything)  # mixed, so each prompt holds all kinds of tokens
    monkeypatch.setattr(kv_int8, "VOCAB_SWEEP_TOKENS", 100)
    assert sorted(swept()) == [i for i in range(100) if i != image]


def test_the_report_sizes_what_the_cpu_runtime_loads(dirs: dict, tiny_model_dir: Path) -> None:
    """On the CPU the runtime loads the fused forms, and with `--prefill int8` the int8 prompt
    decoder beside the int4 one: the report's sizes count them, against fp32's fused forms."""
    from llava_edge.calib.report import _sizes, format_table
    from llava_edge.files import graph_bytes

    def cpu_bytes(root: Path) -> int:
        graphs = Manifest.load(root).graphs.values()
        forms = [g.fused.forms() if g.fused else [g] for g in graphs]
        return sum(graph_bytes(root / s.file) for specs in forms for s in specs)

    quantized = dirs["int8_cache"]
    sizes = _sizes(
        tiny_model_dir, Manifest.load(tiny_model_dir), quantized, Manifest.load(quantized)
    )
    assert sizes["cpu_graph_bytes"] == cpu_bytes(quantized)
    assert sizes["fp32_cpu_graph_bytes"] == cpu_bytes(tiny_model_dir)
    assert sizes["cpu_ratio"] == round(cpu_bytes(tiny_model_dir) / cpu_bytes(quantized), 3)
    report = {"graphs": [], "greedy": {"samples": 0}, "sizes": sizes}
    assert f"(x{sizes['cpu_ratio']})" in format_table(report)


def test_an_int8_cache_reuses_prefixes_as_the_prompt_fed_whole(
    tiny_model_dir: Path, images: Path, tmp_path: Path
) -> None:
    """int4 with an int8 cache (prompts through MatMulNBits): a prompt fed as a prefix and then
    the rest gives the logits fed whole gives, bit for bit, so the prefix store stays on."""
    out = tmp_path / "int4_kv8"
    quantize_model(
        tiny_model_dir, out, "int4", images=images, samples=2, kv_cache="int8", log=quiet
    )
    with Pipeline.load(out) as pipe:
        assert not pipe.backend.prompt_scales_per_call
        x = np.random.default_rng(1).standard_normal((1, 40, pipe.manifest.text.hidden_size))
        x = x.astype(np.float32)

        def logits(*cuts: int) -> np.ndarray:
            cache = pipe.backend.new_cache(1)
            for start, stop in zip((0, *cuts), (*cuts, 40), strict=True):
                feed = x[:, start:stop]
                positions = np.arange(start, stop)[None]
                last = pipe.backend.decode(
                    feed, np.ones(feed.shape[:2], np.int64), positions, cache
                )
            assert cache.keys[0].dtype == np.int8
            return last

        np.testing.assert_array_equal(logits(), logits(25))
        engine = BatchEngine(pipe, max_batch=1, start=False)
        assert engine.prefixes.budget > 0


def test_a_prefix_cache_where_prompts_cannot_reuse_one_is_refused(dirs: dict) -> None:
    """The int8 prompt decoder (`--prefill int8`) scales each call's activations alike, so no
    prefix is reused: a prefix cache asked for would do nothing, and is refused in one line, on
    the Python API and the server's command line; left out (or 0), the engine runs without."""
    with Pipeline.load(dirs["int8_cache"]) as pipe:
        with pytest.raises(LlavaEdgeError, match="a prefix cache .* of 64 MB would do nothing"):
            BatchEngine(pipe, prefix_cache_mb=64, start=False)
        assert BatchEngine(pipe, start=False).prefixes.budget == 0
        assert BatchEngine(pipe, prefix_cache_mb=0, start=False).prefixes.budget == 0
    code = "import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["serve", str(dirs["int8_cache"]), "--port", "0", "--prefix-cache-mb", "64"]
    served = subprocess.run(
        [sys.executable, "-c", code, *argv, "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert served.returncode == 1 and "Traceback" not in served.stderr
    assert served.stderr.strip().startswith("llava-edge serve: error: a prefix cache")
    assert len(served.stderr.strip().splitlines()) == 1


def test_the_server_refuses_a_prefix_cache_that_would_do_nothing_before_it_listens(
    dirs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the port is taken and the model loaded, as every other refusal of its options:
    a supervisor sees the exit at once, and no client's request is taken only to fail."""
    from llava_edge.serve import server
    from llava_edge.serve.app import ServeOptions

    monkeypatch.setattr(server, "bind", lambda *a: pytest.fail("listened before refusing"))
    options = ServeOptions(model_dir=str(dirs["int8_cache"]), prefix_cache_mb=64)
    with pytest.raises(LlavaEdgeError, match="a prefix cache .* of 64 MB would do nothing"):
        server.serve(options, port=0)


def test_a_plan_refuses_the_prefix_cache_serve_refuses(dirs: dict, capsys) -> None:
    """`plan --prefix-cache-mb` counts serve's prefix store; where serve keeps none (prompts
    in dynamic int8, the CPU's fused forms here) a budget given is refused as serve refuses it,
    not counted as memory the server would never take. The standard graphs a GPU provider runs
    (MatMulNBits prompts) and TensorRT's static scales reuse prefixes, and count it."""
    model = dirs["int8_cache"]
    with pytest.raises(LlavaEdgeError, match="a prefix cache .* of 256 MB would do nothing"):
        plan(model, "agx-orin-64gb", prefix_cache_mb=256)
    assert plan(model, "agx-orin-64gb").prefix_cache == 0
    for options in ({"providers": ["cuda"]}, {"backend": "tensorrt"}):
        counted = plan(model, "agx-orin-64gb", prefix_cache_mb=256, **options)
        assert counted.prefix_cache == 256 * 2**20, options
    assert main(["plan", str(model), "--prefix-cache-mb", "256"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llava-edge plan: error: a prefix cache") and err.count("\n") == 1
