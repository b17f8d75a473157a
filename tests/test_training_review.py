"""train and eval used as a robotics engineer would: inputs an output dir must not swallow,
resuming a run with other options, an interrupted final save, LLaVA's stage-1 input, the
model's context as the longest sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_edge.cli import main as cli
from llava_edge.training.synth import synthesize


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return synthesize(tmp_path / "data", train=4, test=0, seed=1)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("out", ["data", "data/images"])
def test_out_holding_the_data_or_images_is_refused(out, tiny_checkpoint, data, tmp_path, capsys):
    before = snapshot(tmp_path / "data")
    argv = ["train", "--stage", "1", "--model", str(tiny_checkpoint), "--out", str(tmp_path / out)]
    argv += ["--data", str(data["captions"]), "--images", str(data["images"]), "--force"]
    assert cli([*argv, "--max-steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("which the trained checkpoint would replace; choose another output dir")
    assert "--data file" in err or "--images dir" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert snapshot(tmp_path / "data") == before


FAST = dict(
    global_batch_size=2,
    warmup_ratio=0.0,
    gradient_checkpointing=False,
    progress=False,
    force=True,
)


def test_an_interrupted_final_save_keeps_the_checkpoints(
    tiny_checkpoint, data, tmp_path, monkeypatch
):
    import llava_edge.files as files
    from llava_edge.training.train import train

    out = tmp_path / "out"
    sync_tree = files.sync_tree

    def interrupted(root: Path) -> None:  # Ctrl-C while the new OUT goes to disk
        if Path(root).name.startswith(f".{out.name}.partial-"):
            raise KeyboardInterrupt
        sync_tree(root)

    monkeypatch.setattr(files, "sync_tree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(1, tiny_checkpoint, data["captions"], out, images=data["images"], max_steps=2, **FAST)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "model.safetensors").is_file()
    monkeypatch.setattr(files, "sync_tree", sync_tree)
    options = {**FAST, "force": False, "resume": True}
    result = train(
        1, tiny_checkpoint, data["captions"], out, images=data["images"], max_steps=2, **options
    )
    assert result.steps == 2 and (out / "model.safetensors").is_file()
    assert (out / "checkpoints" / "checkpoint-2" / "optimizer.pt").is_file()
