"""The bench/ scripts still start against the current code, and read what it prints.

They are run by users, not by tests (they time things); these checks only keep them from rotting.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

from llava_edge.export.verify import _format

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture
def bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # as when a script is run from bench/


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_bench_script_answers_help(
    script: Path, bench_on_path: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def _report(passed: bool) -> dict:
    return {
        "passed": passed,
        "template": "vicuna_v1",
        "template_source": "config",
        "prompt_ids_equal": True,
        "chat_ids_equal": True,
        "pixel_max_abs_diff": 0.0,
        "image_features_max_abs_diff": 1.5e-8,
        "prefill_logits_max_abs_diff": 1.6e-7,
        "prefill_logits_cosine": 1.0,
        "greedy_tokens_matched": 32,
        "greedy_tokens_total": 32,
    }


def test_bench_export_reads_the_verification_export_prints(bench_on_path: None) -> None:
    spec = importlib.util.spec_from_file_location("bench_export", BENCH / "bench_export.py")
    bench_export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_export)
    both = _format(_report(True), "standard") + "\n" + _format(_report(True), "fused")
    found = bench_export.verification(both)
    assert found["passed"] is True
    assert found["prefill_logits_max_abs_diff"] == pytest.approx(1.6e-7)
    assert found["greedy_tokens_identical"] == "32/32"
    one_failed = _format(_report(True), "standard") + "\n" + _format(_report(False), "fused")
    assert bench_export.verification(one_failed)["passed"] is False
    assert bench_export.verification(_format(_report(True)))["passed"] is True


def test_a_script_told_of_a_missing_model_dir_ends_in_one_line(
    bench_on_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "no-model"
    argv = [
        "plan_depth.py",
        str(missing),
        str(missing),
        "--text-layers",
        "4",
        "--vision-layers",
        "3",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / "plan_depth.py"), run_name="__main__")
    assert exit_.value.code == f"plan_depth.py: error: model dir {missing} does not exist"


def test_a_script_stopped_by_ctrl_c_ends_in_one_line(
    bench_on_path: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Ctrl-C in a long run is the user's choice, not a bug: one line and a shell's 130."""
    from _entry import run

    def main() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["bench_peers.py"])
    with pytest.raises(SystemExit) as exit_:
        run(main)
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "bench_peers.py: interrupted\n"


def test_the_bench_server_gives_up_when_serve_exits_before_ready(
    bench_on_path: None, tmp_path: Path
) -> None:
    from bench_serve import Server

    from llava_edge.errors import LlavaEdgeError

    with pytest.raises(LlavaEdgeError, match="exited .1. before it was ready"):
        Server(tmp_path / "no-model")  # once hung for 300 s polling /health


@pytest.mark.parametrize(
    ("script", "argv", "said"),
    [
        ("soak.py", ["--generations", "5", "--every", "10"], "--every must be 1 to --generations"),
        ("soak_serve.py", ["--requests", "5", "--every", "0"], "--every must be 1 to --requests"),
        ("bench_load.py", ["--model", "{missing}", "--checkpoint", "{missing}"], "does not exist"),
    ],
)
def test_a_script_refuses_what_it_cannot_run_before_starting(
    script: str, argv: list[str], said: str, bench_on_path: None, monkeypatch, tmp_path, capsys
) -> None:
    missing = str(tmp_path / "no-model")
    monkeypatch.setattr(sys, "argv", [script, *(a.format(missing=missing) for a in argv)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert exit_.value.code not in (0, None)
    assert said in f"{exit_.value.code} {capsys.readouterr().err}"


@pytest.mark.parametrize(
    ("script", "argv", "said"),
    [
        ("bench_ttft.py", ["--fp32", "{model}", "--precisions", "int8"], "not in --precisions"),
        ("bench_ttft.py", ["--fp32", "{model}", "--precisions", "fp32,int8"], "without --int8"),
        ("bench_ttft.py", ["--precisions", "fp16"], "--precisions: no fp16"),
        ("bench_load.py", ["--model", "{model}"], "--model given without --checkpoint"),
        ("bench_peers.py", ["--fp32", "{model}"], "--fp32 given without --checkpoint, --int8"),
        ("bench_peers.py", ["--llama-bench", "{model}"], "without --convert"),
        ("bench_quantize.py", ["--fp32", "{model}"], "--fp32 given without --int8, --int4"),
    ],
)
def test_a_script_given_some_of_its_dirs_refuses_rather_than_build_others(
    script: str, argv: list[str], said: str, bench_on_path: None, monkeypatch, tmp_path, capsys
) -> None:
    """A dir given on the command line is timed, or the script says why not: it never builds
    and times the preset's dirs in place of the ones given."""
    import bench_quantize

    def build(*args, **kwargs):
        pytest.fail("built model dirs in place of those given")

    monkeypatch.setattr(bench_quantize, "build", build)
    model = str(tmp_path / "model")
    monkeypatch.setattr(sys, "argv", [script, *(a.format(model=model) for a in argv)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


def test_bench_ttft_times_the_one_dir_given(bench_on_path: None, monkeypatch, tmp_path) -> None:
    """`--fp32 DIR` alone times DIR (here: says it is missing), not the preset's dirs."""
    import bench_quantize

    monkeypatch.setattr(bench_quantize, "build", lambda *a, **k: pytest.fail("built dirs"))
    missing = tmp_path / "model"
    monkeypatch.setattr(sys, "argv", ["bench_ttft.py", "--fp32", str(missing)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / "bench_ttft.py"), run_name="__main__")
    assert exit_.value.code == f"bench_ttft.py: error: model dir {missing} does not exist"


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("bench_runtime.py", ["--runs", "0"]),
        ("bench_runtime.py", ["--threads", "0"]),
        ("bench_ttft.py", ["--runs", "0"]),
        ("bench_ttft.py", ["--question-tokens", "0"]),
        ("bench_load.py", ["--runs", "0"]),
        ("bench_load.py", ["--threads", "-1"]),
        ("bench_kv_cache.py", ["--threads", "0"]),
        ("bench_kv_cache.py", ["--depths", "256", "0"]),
        ("bench_peers.py", ["--runs", "0"]),
    ],
)
def test_a_count_below_one_is_refused_before_anything_is_built(
    script: str, argv: list[str], bench_on_path: None, monkeypatch, tmp_path, capsys
) -> None:
    """Runs, threads, tokens and depths below 1 are refused as the command line is read, not
    after minutes of building model dirs (nor as a statistics traceback at the end)."""
    import subprocess

    import bench_quantize

    monkeypatch.setattr(bench_quantize, "build", lambda *a, **k: pytest.fail("built dirs"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
    monkeypatch.setattr(sys, "argv", [script, "--work", str(tmp_path), *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert exit_.value.code == 2
    assert "must be a whole number, 1 or more" in capsys.readouterr().err


def test_bench_kv_cache_refuses_a_depth_past_the_context(
    tiny_model_dir: Path, bench_on_path: None, monkeypatch
) -> None:
    """A depth the context cannot hold is said, not dropped from the report without a word."""
    import bench_quantize

    monkeypatch.setattr(
        bench_quantize, "build", lambda work, preset, names: dict.fromkeys(names, tiny_model_dir)
    )
    monkeypatch.setattr(sys, "argv", ["bench_kv_cache.py", "--depths", "64", "5000"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / "bench_kv_cache.py"), run_name="__main__")
    said = str(exit_.value.code)
    assert said.startswith("bench_kv_cache.py: error: --depths 5000: past the deepest"), said


def test_bench_load_says_why_a_load_failed(bench_on_path: None, tmp_path: Path) -> None:
    """A load that fails in its fresh process (a model dir given as --checkpoint) ends the
    script with the child's own last line, not a traceback that holds the child's script."""
    import os

    from bench_load import timed

    from llava_edge.errors import LlavaEdgeError

    failing = "raise OSError('no model.safetensors in ' + __import__('sys').argv[1])"
    with pytest.raises(LlavaEdgeError) as error:
        timed(failing, tmp_path, 1, dict(os.environ))
    said = str(error.value)
    assert said.endswith(f"failed: OSError: no model.safetensors in {tmp_path}"), said


@pytest.mark.parametrize("script", ["bench_load.py", "bench_peers.py"])
def test_a_checkpoint_of_another_model_is_refused_before_timing(
    script: str, tiny_model_dir: Path, bench_on_path: None, monkeypatch, tmp_path, capsys
) -> None:
    """--checkpoint must be the dirs' own model, or transformers' side times other work."""
    import subprocess

    from llava_edge.cli import main as cli
    from llava_edge.runtime import Pipeline

    other = tmp_path / "other"
    assert cli(["init", str(other), "--preset", "tiny", "--layers", "1"]) == 0
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("loaded a dir"))
    if script == "bench_load.py":
        dirs = ["--model", str(tiny_model_dir)]
    else:
        names = ["fp32", "int8", "int4", "int4-b128", "int4-b128-prefill-int8", "int8-kv-int8"]
        names.append("int4-b128-prefill-int8-kv-int8")
        dirs = [arg for name in names for arg in (f"--{name}", str(tiny_model_dir))]
    argv = [script, "--work", str(tmp_path), "--checkpoint", str(other), *dirs]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert "--checkpoint is another model than the model dir" in str(exit_.value.code)


def test_bench_load_times_cached_loads_whatever_the_shell_says(
    bench_on_path: None, monkeypatch, tmp_path: Path
) -> None:
    """LLAVA_EDGE_SESSION_CACHE=0 in the user's shell is not passed to the loads timed as
    cached (they would time uncached loads, or end in an AssertionError); a cache status other
    than the one timed is said in one line."""
    from bench_load import cache_env, expect

    from llava_edge.errors import LlavaEdgeError

    monkeypatch.setenv("LLAVA_EDGE_SESSION_CACHE", "0")
    env = cache_env(str(tmp_path))
    assert "LLAVA_EDGE_SESSION_CACHE" not in env and env["LLAVA_EDGE_CACHE"] == str(tmp_path)
    with pytest.raises(LlavaEdgeError, match="status was 'none' where 'hit' was timed"):
        expect("none", "hit")


def test_bench_runtime_keeps_its_stdout_for_the_json(
    bench_on_path: None, monkeypatch, tmp_path: Path, capsys
) -> None:
    """Building the `small` dirs runs `llava-edge init` and `export`, whose reports would come
    before the JSON on stdout (`bench_runtime.py > result.json` then holds no JSON)."""
    import subprocess

    from bench_runtime import prepare

    def run(command, stdout=None, **kwargs):  # a CLI child, reporting on the stdout it is given
        out = Path(command[-2] if command[3] == "export" else command[4])
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "manifest.json").write_text("{}")
        print(f"wrote {out}", file=stdout or sys.stdout)

    monkeypatch.setattr(subprocess, "run", run)
    prepare(tmp_path)
    assert capsys.readouterr().out == ""


def test_dirs_built_for_one_preset_are_not_timed_as_another(
    bench_on_path: None, tmp_path: Path
) -> None:
    """The builder bench_ttft, bench_load, bench_kv_cache and bench_peers share reuses the dirs
    under --work: asked for `small` where `tiny`'s were built, it says so rather than time tiny."""
    from bench_quantize import build

    from llava_edge.errors import LlavaEdgeError

    (tmp_path / "fp32").mkdir()
    (tmp_path / "fp32" / "manifest.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    (tmp_path / "preset").write_text("tiny")
    assert build(tmp_path, "tiny", ("fp32",)) == {"fp32": tmp_path / "fp32"}
    with pytest.raises(LlavaEdgeError, match="holds the 'tiny' preset's dirs, not 'small''s"):
        build(tmp_path, "small", ("fp32",))


def test_bench_peers_remakes_its_text_model_for_another_checkpoint(
    tiny_checkpoint: Path, bench_on_path: None, tmp_path: Path
) -> None:
    """The text-only copy (and the GGUF files made from it) under --work is reused for the same
    checkpoint only: another --checkpoint gets its own, not the first one's weights."""
    import json

    from bench_peers import text_checkpoint

    from llava_edge.cli import main as cli

    other = tmp_path / "other"
    assert cli(["init", str(other), "--preset", "tiny", "--layers", "1"]) == 0
    out = tmp_path / "work" / "text-checkpoint"
    out.parent.mkdir()

    def layers() -> int:
        return json.loads((out / "config.json").read_text())["num_hidden_layers"]

    text_checkpoint(tiny_checkpoint, out)
    assert layers() == 2
    gguf = out.parent / "text-f32.gguf"
    gguf.write_text("made from the first")
    text_checkpoint(tiny_checkpoint, out)
    assert gguf.exists()  # the same checkpoint: kept
    text_checkpoint(other, out)
    assert layers() == 1 and not gguf.exists()


def test_bench_peers_says_why_llama_bench_failed(bench_on_path: None, tmp_path: Path) -> None:
    """A llama-bench that fails (an older build without -d, a missing path) ends the script in
    one line with its own reason, not a CalledProcessError traceback that hides it."""
    from bench_peers import llama_bench

    from llava_edge.errors import LlavaEdgeError

    binary = tmp_path / "llama-bench"
    binary.write_text("#!/bin/sh\necho 'error: invalid parameter for argument: -d' >&2\nexit 1\n")
    binary.chmod(0o755)
    gguf = tmp_path / "text-f32.gguf"
    with pytest.raises(LlavaEdgeError, match="failed: error: invalid parameter for argument: -d"):
        llama_bench(binary, gguf, 2, kv_q8_0=False)
    with pytest.raises(LlavaEdgeError, match=f"cannot run {tmp_path / 'missing'}: "):
        llama_bench(tmp_path / "missing", gguf, 2, kv_q8_0=False)
