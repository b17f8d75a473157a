"""train --resume of a full run: the model is built once, from the checkpoint's weights; and the
options that decide which samples a saved step counter refers to must be the saved run's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_edge.training.synth import synthesize
from llava_edge.training.train import train

FAST = dict(
    global_batch_size=2,
    warmup_ratio=0.0,
    gradient_checkpointing=False,
    progress=False,
)


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return synthesize(tmp_path / "data", train=4, test=0, seed=1)


def test_a_full_run_resumes_with_the_model_built_once_from_the_checkpoint(
    tiny_checkpoint, data, tmp_path, monkeypatch
):
    """At 7B in fp32 a second model is 28 GB more: resuming must not build one to copy from."""
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "out"
    args = (1, tiny_checkpoint, data["captions"], out)
    train(*args, images=data["images"], max_steps=2, save_steps=2, force=True, **FAST)
    saved = load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors"))

    built = []
    init = LlavaForConditionalGeneration.__init__

    def counted(self, *a, **k):
        built.append(self)
        init(self, *a, **k)

    monkeypatch.setattr(LlavaForConditionalGeneration, "__init__", counted)
    # max_steps reached already: no step trains, and the result is the checkpoint's weights.
    result = train(*args, images=data["images"], max_steps=2, resume=True, **FAST)
    assert result.steps == 2
    assert len(built) == 1
    final = load_file(str(out / "model.safetensors"))
    start = load_file(str(tiny_checkpoint / "model.safetensors"))
    projector = [k for k in saved if k.startswith("multi_modal_projector.")]
    assert projector and not all(torch.equal(saved[k], start[k]) for k in projector)
    for key in saved:
        torch.testing.assert_close(final[key], saved[key], atol=0, rtol=0)


@pytest.fixture(scope="module")
def saved_run(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """A stage-1 OUT with a trainer checkpoint at step 1 of 2 (4 samples, batches of 2)."""
    root = tmp_path_factory.mktemp("saved")
    data = synthesize(root / "data", train=4, test=0, seed=1)
    out = root / "out"
    train(1, tiny_checkpoint, data["captions"], out, images=data["images"], max_steps=1,
          save_steps=1, max_length=512, seed=7, force=True, **FAST)  # fmt: skip
    return {"out": out, "data": data["captions"], "images": data["images"]}


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def resume_argv(run: dict[str, Path], model: Path, data: Path, *options: str) -> list[str]:
    argv = ["train", "--stage", "1", "--model", str(model), "--out", str(run["out"]), "--resume"]
    argv += ["--data", str(data), "--images", str(run["images"]), "--batch-size", "2"]
    return [*argv, "--max-length", "512", "--seed", "7", "--max-steps", "2", *options]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--max-length", "256"], "was trained with --max-length 512, not 256"),
        (["--seed", "8"], "was trained with --seed 7, not 8"),
        (["--batch-size", "4"], "was trained with --batch-size 2, not 4"),
        ("edited", "was trained on --data {old} of sha256 "),
        ("fewer", "was trained on 4 samples of --data {data}, not the 3 kept now"),
        ("repainted", "the picture {picture} of --data {data} is not the one"),
        ("model", "was trained from --model {model}, not --model {other} (their projector"),
    ],
)
def test_resuming_on_other_samples_is_refused_in_one_line(
    change, message, saved_run, tiny_checkpoint, tmp_path, capsys
):
    """The saved step count says how many batches of the run's samples, in the run's order, were
    trained: other data or pictures, truncation, seed (order) or global batch would skip other
    ones; another --model would go on with its tokenizer and processor."""
    from llava_edge.cli import main as cli

    data, images, options, model = saved_run["data"], saved_run["images"], change, tiny_checkpoint
    if change == "edited":
        samples = json.loads(data.read_text())
        samples[0]["conversations"][1]["value"] += " Edited."
        data, options = tmp_path / "data.json", []
        data.write_text(json.dumps(samples))
    elif change == "fewer":  # one image gone since: --skip-bad leaves its sample out
        images = Path(shutil.copytree(images, tmp_path / "images"))
        (images / json.loads(data.read_text())[0]["image"]).unlink()
        options = ["--skip-bad"]
    elif change == "repainted":  # same data, same names: one picture replaced by another
        images = Path(shutil.copytree(images, tmp_path / "images"))
        names = [sample["image"] for sample in json.loads(data.read_text())]
        shutil.copy(images / names[1], images / names[0])
        options = []
    elif change == "model":  # the same data, another base (its tokenizer and processor)
        from llava_edge.training.checkpoint import init_checkpoint

        model = init_checkpoint(tmp_path / "other", preset="tiny", seed=1)
        options = []
    before = snapshot(saved_run["out"])
    run = {**saved_run, "images": images}
    assert cli([*resume_argv(run, model, data, *options)]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    picture = json.loads(data.read_text())[0]["image"]
    expected = message.format(
        old=saved_run["data"], data=data, picture=picture, model=tiny_checkpoint, other=model
    )
    assert expected in last, err[-2000:]
    assert last.endswith("or pass --force to start over")
    assert snapshot(saved_run["out"]) == before


def test_resuming_with_options_that_leave_the_samples_alone_goes_on(
    saved_run, tiny_checkpoint, tmp_path
):
    """More --max-steps, other --save-steps, --logging-steps, --per-device-batch-size (the same
    global batch), --workers, --warmup-ratio, gradient checkpointing (the saved run had none),
    another --precision (the saved run's fp16 loss scale is of no use to fp32), and the same
    data, pictures and --model at another path, with another modification time (a copy to
    another machine)."""
    from llava_edge.cli import main as cli

    images = Path(shutil.copytree(saved_run["images"], tmp_path / "images"))
    for picture in images.iterdir():
        os.utime(picture, (1, 1))
    out = Path(shutil.copytree(saved_run["out"], tmp_path / "out"))
    run = {**saved_run, "out": out, "images": images}
    # As a run under --precision fp16 (on a GPU) saves its loss scaler's state.
    scaler = torch.amp.GradScaler("cpu", enabled=True).state_dict()
    torch.save(scaler, run["out"] / "checkpoints" / "checkpoint-1" / "scaler.pt")
    moved = Path(shutil.copy(saved_run["data"], tmp_path / "moved.json"))
    os.utime(moved, (1, 1))
    model = Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))
    for path in model.iterdir():
        os.utime(path, (1, 1))
    argv = resume_argv(run, model, moved, "--save-steps", "5", "--logging-steps", "2")
    argv += ["--per-device-batch-size", "1", "--workers", "0", "--warmup-ratio", "0.5"]
    assert cli(argv) == 0
    state = json.loads(
        (run["out"] / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text()
    )
    assert state["global_step"] == 2


def test_resuming_a_run_at_its_last_step_trains_no_more(tiny_checkpoint, tmp_path, capsys):
    """Killed while writing the final OUT, a run has its checkpoint at --max-steps: resumed, it
    writes that checkpoint's weights (Trainer would train one step more, mid-epoch); a checkpoint
    past --max-steps is refused."""
    from llava_edge.cli import main as cli

    data = synthesize(tmp_path / "data", train=6, test=0, seed=1)  # 3 steps an epoch
    out = tmp_path / "out"
    options = dict(images=data["images"], max_steps=2, save_steps=1, **FAST)
    train(1, tiny_checkpoint, data["captions"], out, force=True, **options)
    (out / "model.safetensors").unlink()  # as if killed before the final save
    saved = load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    result = train(1, tiny_checkpoint, data["captions"], out, resume=True, **options)
    assert result.steps == 2 and [step for step, _ in result.losses] == [1, 2]
    final = load_file(str(out / "model.safetensors"))
    for key in saved:
        torch.testing.assert_close(final[key], saved[key], atol=0, rtol=0)

    before = snapshot(out)
    argv = ["train", "--stage", "1", "--model", str(tiny_checkpoint), "--out", str(out)]
    argv += ["--data", str(data["captions"]), "--images", str(data["images"]), "--resume"]
    assert cli([*argv, "--batch-size", "2", "--max-steps", "1"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("checkpoint-2 is at step 2, past --max-steps 1; give --max-steps 2 or "
                         "more, or pass --force to start over")  # fmt: skip
    assert cli([*argv, "--batch-size", "2", "--epochs", "0.3"]) == 1  # 1 step of 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "checkpoint-2 is at step 2, past the 1 steps of --epochs 0.3; give" in err
    assert snapshot(out) == before


def test_a_pictures_fingerprint_is_its_content_not_its_path_or_time(tmp_path):
    """A copy elsewhere, touched, keeps the fingerprint; a picture replaced by another of the same
    size (its first or last bytes differ), or re-encoded to another size, does not."""
    from llava_edge.training.dataset import picture_fingerprint

    data = bytes(range(256)) * 64  # 16 KiB: hashed at both ends, not whole
    one = tmp_path / "one.jpg"
    one.write_bytes(data)
    copy = Path(shutil.copy(one, tmp_path / "copy.jpg"))
    os.utime(copy, (1, 1))
    assert picture_fingerprint(copy) == picture_fingerprint(one)
    for changed in (b"x" + data[1:], data[:-1] + b"x", data[:-1]):
        other = tmp_path / "other.jpg"
        other.write_bytes(changed)
        assert picture_fingerprint(other) != picture_fingerprint(one)


def test_a_rotation_killed_in_its_delete_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """An old checkpoint rotated out was deleted in place: killed half-way (SIGKILL in the
    rmtree), a half-deleted checkpoint-N stayed among those the next rotation and --resume
    read. It is renamed out of the checkpoint-N names first, and the next run clears it."""
    import shutil

    from llava_edge.training import train

    for step in (3, 6, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_text("weights")

    def killed(path, *args, **kwargs):
        next(Path(path).iterdir()).unlink()  # one file gone, then the process is
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        train._rotate(tmp_path, 2, None)
    monkeypatch.undo()
    whole = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert whole == ["checkpoint-6", "checkpoint-9"]
    assert all((tmp_path / name / "model.safetensors").is_file() for name in whole)
    train._clear_trainer_dir(tmp_path, keep_checkpoints=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == whole
