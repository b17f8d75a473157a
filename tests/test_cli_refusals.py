"""Options that cannot work are refused before any work, in one line, writing nothing: the
benchmark's counts and plot path, plan's device sizes, outputs inside their inputs, options that
would do nothing (fp16 calibration, --layers past the preset, a preset beside --vision/--llm)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from llava_edge.cli import main


def cases(model: Path, checkpoint: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    bench = ["bench", str(model), "--runs", "1", "--new-tokens", "2", "--question-tokens", "4"]
    return {
        "bench no runs": (["bench", str(model), "--runs", "0"], "--runs must be at least 1"),
        "bench negative context": (
            [*bench, "--context-tokens", "-1"],
            "--context-tokens must be at least 0",
        ),
        "bench context far past the model's": (
            [*bench, "--context-tokens", "100000"],
            "over the model's context",
        ),
        "bench plot in a missing folder": (
            [*bench, "--plot", str(tmp / "nowhere" / "p.png")],
            "does not exist",
        ),
        "bench plot under a file": (
            [*bench, "--plot", str(tmp / "a_file" / "p.png")],
            "a_file is a file, not a folder",
        ),
        "bench plot inside the model dir": (
            [*bench, "--plot", str(model / "bench.png")],
            "is inside the model dir",
        ),
        "bench plot inside the baseline checkpoint": (
            [*bench, "--baseline", str(checkpoint), "--plot", str(checkpoint / "bench.png")],
            "is inside the --baseline checkpoint",
        ),
        "plan malformed size": (["plan", str(model), "--device", "1.2.3GB"], "unknown device"),
        "plan a dot": (["plan", str(model), "--device", "."], "unknown device"),
        "plan no memory": (["plan", str(model), "--device", "0GB"], "unknown device"),
        "plan reserve all": (
            ["plan", str(model), "--device", "8GB", "--reserve", "10"],
            "leaves nothing",
        ),
        "plan a file": (["plan", str(tmp / "a_file")], "is a file"),
        "export inside the checkpoint": (
            ["export", str(checkpoint), str(checkpoint / "sub")],
            "is inside the checkpoint",
        ),
        "quantize inside the source": (
            ["quantize", str(model), str(model / "sub"), "--precision", "fp16"],
            "is inside the source model dir",
        ),
        "fp16 with calibration data": (
            ["quantize", str(model), str(tmp / "q"), "--precision", "fp16", "--calib", str(tmp)],
            "fp16 needs no calibration data",
        ),
        "fp16 with a method": (
            ["quantize", str(model), str(tmp / "q"), "--precision", "fp16", "--method", "entropy"],
            "fp16 calibrates nothing",
        ),
        "fp16 with the default method written out": (
            ["quantize", str(model), str(tmp / "q"), "--precision", "fp16", "--method", "minmax"],
            "fp16 calibrates nothing",
        ),
        "fp16 with the default sample count written out": (
            ["quantize", str(model), str(tmp / "q"), "--precision", "fp16", "--samples", "32"],
            "fp16 calibrates nothing",
        ),
        "init more layers than the preset": (
            ["init", str(tmp / "i"), "--layers", "100"],
            "--layers must be 1 to 2",
        ),
        "a model dir whose path is not UTF-8": (
            ["run", str(tmp / "m\udcff"), "--prompt", "hi"],
            "the path is not valid UTF-8 text",
        ),
        "an output dir whose path is not UTF-8": (
            ["export", str(checkpoint), str(tmp / "out\udcff")],
            "the path is not valid UTF-8 text",
        ),
        "an output name too long to write beside": (
            ["init", str(tmp / ("n" * 240))],
            "choose a shorter name",
        ),
        "a plot name too long": ([*bench, "--plot", str(tmp / ("p" * 300))], "shorter name"),
        "a model dir name too long": (
            ["plan", str(tmp / ("m" * 300))],
            "a path is too long for the filesystem",
        ),
        "an engine dir onnxruntime would not use": (
            ["run", str(model), "--prompt", "hi", "--engine-dir", str(tmp)],
            "add the tensorrt provider",
        ),
        "a provider the tensorrt backend would not use": (
            ["run", str(model), "--prompt", "hi", "--backend", "tensorrt", "--provider", "cuda"],
            "the tensorrt backend runs its own engines",
        ),
        "threads the tensorrt backend would not use": (
            ["run", str(model), "--prompt", "hi", "--backend", "tensorrt", "--threads", "4"],
            "the tensorrt backend runs its engines on the GPU",
        ),
        "serve a remote timeout with no remote images": (
            ["serve", str(model), "--remote-timeout", "5"],
            "--remote-timeout times remote image fetches, which only --allow-remote-images allows",
        ),
        "serve no rows": (["serve", str(model), "--max-batch", "0"], "--max-batch must be"),
        "serve a negative drain": (
            ["serve", str(model), "--drain-timeout", "-1"],
            "--drain-timeout must be 0 or more",
        ),
        "data names its sub-command": (
            ["data", "synth", str(tmp / "a_file")],
            "llava-edge data synth: error: output",
        ),
        "run no new tokens": (
            ["run", str(model), "--prompt", "hi", "--max-new-tokens", "0"],
            "--max-new-tokens must be a positive integer, got 0",
        ),
        "chat a negative temperature": (
            ["chat", str(model), "--temperature", "-1"],
            "--temperature must be in [0, 100], got -1.0",
        ),
        "watch a top-p past 1": (
            [
                "watch",
                str(model),
                "--source",
                str(tmp),
                "--prompt",
                "hi",
                "--temperature",
                "1",
                "--top-p",
                "2",
            ],
            "--top-p must be in [0, 1], got 2.0",
        ),
        "run a stop string too long": (
            ["run", str(model), "--prompt", "hi", "--stop", "x" * 257],
            "--stop strings may be at most 256 characters each, got one of 257",
        ),
        "init a preset beside --vision": (
            ["init", str(tmp / "i"), "--vision", str(tmp), "--llm", str(tmp), "--preset", "small"],
            "drop one or the other",
        ),
    }


@pytest.mark.parametrize(
    "case", list(cases(Path("m"), Path("c"), Path("t"))), ids=lambda case: case.replace(" ", "-")
)
def test_refused_in_one_line_before_any_work(
    case, tiny_model_dir, tiny_checkpoint, tmp_path, capsys
):
    (tmp_path / "a_file").write_text("not a model dir")
    (tmp_path / "m\udcff").symlink_to(tiny_model_dir)  # a name in another encoding
    argv, message = cases(tiny_model_dir, tiny_checkpoint, tmp_path)[case]
    before = {
        p for p in (*tmp_path.rglob("*"), *tiny_model_dir.rglob("*"), *tiny_checkpoint.rglob("*"))
    }
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    after = {
        p for p in (*tmp_path.rglob("*"), *tiny_model_dir.rglob("*"), *tiny_checkpoint.rglob("*"))
    }
    assert after == before


def test_a_full_disk_is_one_line_and_installs_nothing(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    """A write that runs out of space, anywhere in any command, ends in one line naming the
    disk; the half-made output dir goes with it."""
    from llava_edge.export import exporter

    def full(model, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(exporter, "save_graph", full)
    out = tmp_path / "model"
    assert main(["export", str(tiny_checkpoint), str(out), "--no-verify", "--no-fused"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith("llava-edge export: error: no space left on the device writing ")
    assert "vision_encoder.onnx" in err and "Traceback" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the dir nor its hidden partial one


def test_a_short_write_of_numpy_is_a_full_disk(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """np.save (the embedding table) reports a full disk as a short write, an OSError without
    an errno: one line naming the disk, as for any other full disk."""
    from llava_edge.export import exporter

    def short_write(*_args, **_kwargs):
        raise OSError("36864 requested and 28640 written")  # numpy's words, from tofile

    monkeypatch.setattr(exporter.np, "save", short_write)
    out = tmp_path / "model"
    assert main(["export", str(tiny_checkpoint), str(out), "--no-verify", "--no-fused"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith(f"llava-edge export: error: no space left on the device writing {out}")
    assert list(tmp_path.iterdir()) == []


def test_an_input_deleted_mid_run_is_one_line_and_installs_nothing(tmp_path, capsys, monkeypatch):
    """An input another process moves or deletes while the command reads it: one line naming
    it, no traceback, no half-written output."""
    from llava_edge.training.datagen import mix
    from llava_edge.training.synth import synthesize

    data = synthesize(tmp_path / "data", train=4, test=0)
    real = mix.parse_sample

    def parse_then_delete(*args, **kwargs):
        data["train"].unlink(missing_ok=True)  # the source goes after its first sample
        return real(*args, **kwargs)

    monkeypatch.setattr(mix, "parse_sample", parse_then_delete)
    out = tmp_path / "mix.json"
    assert main(["data", "mix", str(data["train"]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"llava-edge data mix: error: file not found: {data['train']};")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_read_only_disk_is_one_line_that_says_what_to_do(tmp_path, capsys, monkeypatch):
    """Where permissions cannot tell (root, a disk mounted read-only), the first write fails:
    one line, naming the disk's refusal and the way out."""
    from llava_edge import files

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    assert main(["init", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Read-only file system; choose an output dir" in err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_extra_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """A plain `pip install llava-edge` runs models; a command that needs more says which
    extra to install, whichever module it misses first."""
    from llava_edge.training import checkpoint

    def without_torch(*_args, **_kwargs):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(checkpoint, "init_checkpoint", without_torch)
    assert main(["init", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "llava-edge init: error: `llava-edge init` needs the export extra (torch is missing): "
        "pip install 'llava-edge[export]'"
    )


def test_a_dependency_transformers_misses_names_its_extra(tmp_path, capsys, monkeypatch):
    """transformers raises a lazy attribute's missing dependency (TrainingArguments without
    accelerate, which only the train extra brings) as an error naming no module, the failed
    import as its cause: the line still names the extra, with no traceback."""
    from llava_edge.training import train

    def without_accelerate(*_args, **_kwargs):
        try:
            raise ModuleNotFoundError("No module named 'accelerate'", name="accelerate")
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError("Could not import module 'TrainingArguments'.") from e

    monkeypatch.setattr(train, "train", without_accelerate)
    argv = ["train", "--stage", "1", "--model", str(tmp_path), "--data", str(tmp_path / "d.json")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == (
        "llava-edge train: error: `llava-edge train` needs the train extra (accelerate is "
        "missing): pip install 'llava-edge[train]'"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "{tmp}/model", "--data", "{tmp}/data.json"],
        ["data", "mix", "{tmp}/data.json", "--out", "{tmp}/mix.json"],
    ],
    ids=["eval", "data mix"],
)
def test_commands_beyond_the_runtime_name_their_extra(argv, tmp_path, capsys, monkeypatch):
    """`eval` and `data mix` show progress with tqdm, which a plain `pip install llava-edge`
    (the runtime alone) does not bring: they say which extra does, in one line."""
    import sys

    (tmp_path / "data.json").write_text("[]")
    for module in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 1
    err = capsys.readouterr().err.strip()
    name = " ".join(argv[:2]) if argv[0] == "data" else argv[0]
    assert err == (
        f"llava-edge {name}: error: `llava-edge {name}` needs the data extra (tqdm is missing): "
        "pip install 'llava-edge[data]'"
    )


def test_bench_on_tensorrt_keeps_its_threads_for_the_baseline(tiny_model_dir, capsys):
    """bench's --threads (2 unless told) also sets the transformers baseline's threads, so the
    tensorrt backend does not refuse them there: the load goes on to the engines."""
    argv = ["bench", str(tiny_model_dir), "--backend", "tensorrt", "--runs", "1"]
    assert main(argv) == 1  # no TensorRT here
    err = capsys.readouterr().err
    assert "TensorRT" in err and "threads" not in err, err
