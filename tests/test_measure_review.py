"""The measuring commands on the tiny model, as a user deciding what to deploy runs them:
`bench`'s workloads, baseline and plot, `eval`'s scoring and the answers that cannot match,
and `quantize --report`'s figures where a call gives NaN or the context runs out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error
from PIL import Image

from llava_edge.cli import main as cli
from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Pipeline


def _bench(model: Path, *extra: str) -> list[str]:
    return ["bench", str(model), "--runs", "1", "--question-tokens", "4", *extra]


def test_bench_one_new_token_is_refused_in_one_line(tiny_model_dir, capsys):
    # decode speed needs two new tokens; one used to end in a KeyError traceback
    assert cli(_bench(tiny_model_dir, "--new-tokens", "1")) == 1
    err = capsys.readouterr().err
    assert "--new-tokens must be at least 2" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def _eval_world(root: Path, references: list[str]) -> tuple[Path, Path]:
    """A data file asking one question of a grey picture per reference."""
    images = root / "images"
    images.mkdir(exist_ok=True)
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(images / "a.png")
    samples = [
        {
            "id": f"s{i}",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": f"<image>\nQuestion {i}?"},
                {"from": "gpt", "value": reference},
            ],
        }
        for i, reference in enumerate(references)
    ]
    data = root / "data.json"
    data.write_text(json.dumps(samples))
    return data, images


def test_eval_scores_matches_and_counts_cut_predictions(tiny_model_dir, tmp_path, capsys):
    data, images = _eval_world(tmp_path, ["?", "?", "?"])
    with Pipeline.load(tiny_model_dir) as pipe:
        own = pipe.answer(images / "a.png", "Question 0?", max_new_tokens=3)
    assert own.finish_reason == "length"  # the tiny model rambles: every answer is cut
    samples = json.loads(data.read_text())
    # its own answer, shouted with a full stop, matches; others do not
    samples[0]["conversations"][1]["value"] = f"  {own.text.upper()}. "
    data.write_text(json.dumps(samples))
    answers = tmp_path / "answers.jsonl"
    argv = ["eval", str(tiny_model_dir), "--data", str(data), "--images", str(images)]
    assert cli([*argv, "--answers", str(answers), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "VQA accuracy 33.3% (1/3)" in out
    assert "3 prediction(s) cut at --max-new-tokens 3" in out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False]
    assert rows[0]["prediction"] == own.text
    assert {r["finish"] for r in rows} == {"length"}


def test_bench_refuses_a_baseline_of_another_model(
    tiny_model_dir, tiny_checkpoint, tmp_path, capsys
):
    assert cli(_bench(tiny_model_dir, "--new-tokens", "2", "--baseline", str(tiny_checkpoint))) == 0
    assert "decode_speedup" in capsys.readouterr().out
    other = tmp_path / "other"
    assert cli(["init", str(other), "--preset", "tiny", "--layers", "1"]) == 0
    capsys.readouterr()
    assert cli(_bench(tiny_model_dir, "--new-tokens", "2", "--baseline", str(other))) == 1
    err = capsys.readouterr().err
    assert "--baseline is another model than the model dir" in err and "Traceback" not in err
    assert "(1, " in err and "(2, " in err


def test_report_shows_a_nan_call_whatever_its_order(tiny_model_dir):
    """A quantized graph that overflows on one held-out call reads NaN, not the other calls'."""
    import onnxruntime as ort

    from llava_edge.calib.data import Capture
    from llava_edge.calib.report import compare_graph

    path = tiny_model_dir / "projector.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    shape = [2 if isinstance(d, str) else d for d in feed.shape]
    good = {feed.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    overflowed = {feed.name: np.full(shape, np.nan, np.float32)}
    names = [o.name for o in session.get_outputs()]

    class Activations:
        def captures(self, graph, desc=None):
            for feeds in (good, overflowed):
                outputs = session.run(None, good)  # fp32 gave finite numbers both times
                yield Capture(graph, feeds, outputs, names)

    stats = compare_graph(Activations(), "projector", path)
    assert stats["calls"] == 2
    assert np.isnan(stats["cosine_min"]) and np.isnan(stats["max_abs_error"])


def test_bench_refuses_a_workload_the_context_cannot_hold_whole(tiny_model_dir, capsys):
    """The text alone fits, the image's tokens push it over: every new token must still be timed."""
    from llava_edge.manifest import Manifest

    context = Manifest.load(tiny_model_dir).text.max_context
    new = 8
    argv = _bench(tiny_model_dir, "--new-tokens", str(new))
    argv += ["--context-tokens", str(context - new - 4 - 2)]  # 4 question tokens, 2 to spare
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert f"over the model's context of {context}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bench_plot_without_matplotlib_is_refused_before_the_runs(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    loaded = []
    monkeypatch.setattr(Pipeline, "load", staticmethod(lambda *a, **k: loaded.append(1)))
    plot = tmp_path / "bench.png"
    assert cli(_bench(tiny_model_dir, "--new-tokens", "2", "--plot", str(plot))) == 1
    captured = capsys.readouterr()
    assert "--plot needs matplotlib" in captured.err and "Traceback" not in captured.err
    assert not loaded and not captured.out and not plot.exists()


def test_report_file_is_strict_json_where_a_figure_is_nan(tmp_path):
    from llava_edge.calib.report import write_report

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    path = tmp_path / "quantize_report.json"
    write_report({"graphs": [{"cosine_min": float("nan"), "max_abs_error": float("inf")}]}, path)
    read = json.loads(path.read_text(), parse_constant=refuse)
    assert read == {"graphs": [{"cosine_min": None, "max_abs_error": None}]}


def test_report_greedy_tokens_are_those_compared_where_the_context_runs_out(tiny_model_dir):
    from llava_edge.calib.data import Sample
    from llava_edge.calib.report import greedy_agreement
    from llava_edge.runtime.bench import question

    with Pipeline.load(tiny_model_dir) as pipe:
        room = 10
        template = len(pipe.prompt_ids(question(pipe.codec, 1), None)) - 1
        prompt = question(pipe.codec, pipe.max_context - room - template)
        assert len(pipe.prompt_ids(prompt, None)) == pipe.max_context - room
    greedy = greedy_agreement(tiny_model_dir, tiny_model_dir, [Sample(None, prompt)])
    assert greedy["tokens"] == room
    assert greedy["free_running_prefix"] == greedy["teacher_forced_top1"] == 1.0


def test_eval_without_images_dir_is_the_runs_fault_not_the_samples(
    tiny_model_dir, tmp_path, capsys
):
    """--skip-bad must not score only the text-only samples when --images was forgotten."""
    data, _ = _eval_world(tmp_path, ["grey", "grey"])
    samples = json.loads(data.read_text())
    samples.append(
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "hello"}],
        }
    )
    data.write_text(json.dumps(samples))
    answers = tmp_path / "answers.jsonl"
    argv = ["eval", str(tiny_model_dir), "--data", str(data), "--answers", str(answers)]
    assert cli([*argv, "--max-new-tokens", "2", "--skip-bad"]) == 1
    assert "is relative: pass --images DIR" in one_line_error(capsys.readouterr().err)
    assert not answers.exists()


def test_bench_baseline_that_is_no_checkpoint_is_one_line(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "ckpt"  # never looked up on the hub
    assert cli(_bench(tiny_model_dir, "--new-tokens", "2", "--baseline", str(missing))) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {missing} does not exist" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bench_plot_is_a_png_at_exactly_the_path_given(tmp_path):
    from llava_edge.runtime.bench import plot

    side = {"ttft_ms": 2.0, "prefill_ms": 1.0, "vision_ms": 1.0, "decode_tokens_per_s": 9.0}
    report = {"llava_edge": side | {"peak_memory_mb": 3.0}}
    for name in ("chart", "chart.txt", "chart.png"):
        plot(report, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart", "chart.png", "chart.txt"]


def test_the_baselines_prefill_leaves_out_its_vision_tower(tiny_checkpoint, monkeypatch) -> None:
    """transformers' forward runs the vision tower again: timed whole, its 'prefill' held the
    vision encoder too, and bench's prefill speedup came out inflated. The clock is a fake one
    that only the vision tower moves far (a millisecond per reading otherwise), so the figures do
    not depend on this machine's speed."""
    import types

    from llava_edge.export import baseline
    from llava_edge.runtime.bench import Workload

    runner = baseline.TransformersRunner(
        tiny_checkpoint, Workload(new_tokens=2, runs=1), "<image>\nHi?"
    )
    now = [0.0]

    def perf_counter() -> float:
        now[0] += 0.001
        return now[0]

    tower = runner.model.model.vision_tower
    real = tower.forward

    def slow(*args, **kwargs):
        now[0] += 1.0  # a vision tower far slower than the tiny language model
        return real(*args, **kwargs)

    monkeypatch.setattr(tower, "forward", slow)
    monkeypatch.setattr(baseline, "time", types.SimpleNamespace(perf_counter=perf_counter))
    timings = runner.run_once()
    assert timings["vision_ms"] >= 1000 and timings["prefill_ms"] < 100


def test_a_failed_warm_up_closes_the_pipeline(tiny_model_dir, monkeypatch):
    """A runner that fails before it is made (a time limit on the warm-up run) leaves no
    sessions behind for the app or notebook that goes on."""
    from llava_edge.errors import TimedOut
    from llava_edge.runtime.bench import PipelineRunner, Workload

    opened = []
    real_load = Pipeline.load

    def load(*args, **kwargs):
        opened.append(real_load(*args, **kwargs))
        return opened[-1]

    def too_slow(self, *args, **kwargs):
        raise TimedOut("the request ran past its time limit of 1 s")

    monkeypatch.setattr(Pipeline, "load", staticmethod(load))
    monkeypatch.setattr(Pipeline, "answer", too_slow)
    with pytest.raises(TimedOut):
        PipelineRunner(tiny_model_dir, Workload(new_tokens=2, runs=1))
    (pipe,) = opened
    monkeypatch.undo()
    with pytest.raises(LlavaEdgeError, match="closed"):
        pipe.answer(None, "Hi")


def test_bench_plot_names_a_baseline_only_where_one_ran(tmp_path, monkeypatch):
    from llava_edge.runtime import bench

    plt = bench.pyplot()
    titles = []
    close = plt.close
    monkeypatch.setattr(
        plt, "close", lambda fig: (titles.append(fig._suptitle.get_text()), close(fig))
    )
    side = {"ttft_ms": 2.0, "prefill_ms": 1.0, "vision_ms": 1.0, "decode_tokens_per_s": 9.0}
    bench.plot({"llava_edge": side}, tmp_path / "alone.png")
    bench.plot({"llava_edge": side, "transformers": side}, tmp_path / "both.png")
    assert "transformers" not in titles[0] and "llava-edge vs transformers" in titles[1], titles


def test_bench_counts_the_gpu_memory_a_gpu_backend_takes(tiny_model_dir, monkeypatch):
    """TensorRT's engines and onnxruntime's CUDA arena live in device memory, outside the
    process's resident set: a GPU backend's report says how far the GPU's free memory fell."""
    from llava_edge.runtime import bench

    free = iter([8000, 7000, 5000] + [6000] * 100_000)  # MiB; lowest while loading: 5000
    monkeypatch.setattr(bench, "device_free_memory", lambda index: next(free) << 20)
    monkeypatch.setattr(bench, "uses_gpu", lambda load: True)
    workload = bench.Workload(question_tokens=2, new_tokens=2, runs=1)
    report = bench.benchmark(tiny_model_dir, workload)
    assert report["llava_edge"]["gpu_memory_mb"] == 3000.0
    assert "gpu_memory_mb" in bench.table(report)


def test_bench_on_the_cpu_reports_no_gpu_memory(tiny_model_dir, monkeypatch):
    from llava_edge.runtime import bench

    monkeypatch.setattr(bench, "device_free_memory", lambda index: pytest.fail("probed a GPU"))
    workload = bench.Workload(question_tokens=2, new_tokens=2, runs=1)
    report = bench.benchmark(tiny_model_dir, workload)
    assert "gpu_memory_mb" not in report["llava_edge"]
    assert "gpu_memory_mb" not in bench.table(report) and "peak_memory_mb" in bench.table(report)


@pytest.mark.parametrize(
    "load, gpu",
    [
        ({}, False),
        ({"providers": "cpu"}, False),
        ({"providers": ["CPUExecutionProvider"]}, False),
        ({"providers": "cuda"}, True),
        ({"providers": ["tensorrt", "cuda"]}, True),
        ({"providers": "CUDAExecutionProvider"}, True),
        ({"backend": "tensorrt"}, True),
    ],
)
def test_bench_knows_which_load_options_use_a_gpu(load, gpu):
    from llava_edge.runtime import bench

    assert bench.uses_gpu(load) is gpu


def test_gpu_free_memory_is_none_without_a_driver(monkeypatch):
    """Sampled while a model loads: a machine without the driver gives None, never raises."""
    from llava_edge.runtime.tensorrt import gpu

    def no_driver():
        raise LlavaEdgeError("no NVIDIA driver here")

    monkeypatch.setattr(gpu, "_load_driver", no_driver)
    assert gpu.device_free_memory(0) is None


def test_a_text_only_workload_reports_no_image_work(tiny_model_dir):
    """Workload(image=False) asks a text-only question: its report times no preprocessing and
    no vision encoder that its requests never run."""
    from llava_edge.runtime.bench import PipelineRunner, Workload

    runner = PipelineRunner(tiny_model_dir, Workload(new_tokens=2, runs=1, image=False))
    try:
        timings = runner.run_once()
    finally:
        runner.close()
    assert (timings["preprocess_ms"], timings["vision_ms"]) == (0.0, 0.0)
    assert timings["ttft_ms"] > 0


def test_bench_refuses_threads_that_would_do_nothing(tiny_model_dir, capsys):
    """On the tensorrt backend --threads is only the --baseline's: without one it would do
    nothing, and is refused before anything loads."""
    argv = _bench(tiny_model_dir, "--backend", "tensorrt", "--threads", "3")
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert "--threads is for onnxruntime and --baseline" in err
    assert len(err.strip().splitlines()) == 1


def test_bench_reports_medians_of_the_runs_after_one_warm_up(tiny_model_dir, monkeypatch):
    """README: medians over --runs, after a warm-up run that is not counted; load time once."""
    from llava_edge.runtime import bench

    speeds = iter([1.0, 50.0, 7.0, 9.0])  # the warm-up's 1.0 would move the median
    real_answer = Pipeline.answer

    def answer(self, *args, **kwargs):
        result = real_answer(self, *args, **kwargs)
        result.timings["decode_tokens_per_s"] = next(speeds)
        return result

    monkeypatch.setattr(Pipeline, "answer", answer)
    workload = bench.Workload(question_tokens=2, new_tokens=2, runs=3)
    report = bench.benchmark(tiny_model_dir, workload)["llava_edge"]
    assert report["decode_tokens_per_s"] == 9.0 and report["runs"] == 3
    assert next(speeds, None) is None and report["load_s"] > 0
