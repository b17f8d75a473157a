"""`llava-edge data synth` follows the output rules of every stage: counts checked first, no
silent overwrite, and a dir written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llava_edge.training.synth as synth
from llava_edge.cli import main as cli


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def synth_cli(out: Path, *extra: str) -> int:
    return cli(["data", "synth", str(out), *extra])


def test_the_dir_holds_what_the_counts_ask_for(tmp_path):
    paths = synth.synthesize(tmp_path / "data", train=3, test=2, seed=5)
    assert sorted(p.name for p in paths["images"].iterdir()) == [
        "test_00000.png",
        "test_00001.png",
        "train_00000.png",
        "train_00001.png",
        "train_00002.png",
    ]
    assert len(json.loads(paths["captions"].read_text())) == 3
    assert len(json.loads(paths["train"].read_text())) == 3
    assert len(json.loads(paths["test"].read_text())) == 2


@pytest.mark.parametrize(
    "counts, message",
    [
        (["--train", "0"], "--train must be a whole number of at least 1, got 0"),
        (["--train", "-1"], "--train must be a whole number of at least 1, got -1"),
        (["--test", "-1"], "--test must be a whole number of at least 0, got -1"),
    ],
)
def test_bad_counts_are_refused_before_anything_is_written(tmp_path, capsys, counts, message):
    assert synth_cli(tmp_path / "data", *counts) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_cannot_be_a_dir_is_refused(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out, problem in [(afile, "is not a directory"), (afile / "data", "is a file")]:
        assert synth_cli(out, "--train", "1", "--test", "0") == 1
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, out
    assert afile.read_text() == "keep me"


def test_a_non_empty_dir_is_replaced_only_with_force(tmp_path, capsys):
    out = tmp_path / "data"
    assert synth_cli(out, "--train", "4", "--test", "2") == 0
    before = snapshot(out)
    assert synth_cli(out, "--train", "2", "--test", "1") == 1
    assert "pass --force" in capsys.readouterr().err
    assert snapshot(out) == before

    assert synth_cli(out, "--train", "2", "--test", "1", "--force") == 0
    # The new dir replaces the old one: none of the old pictures is left behind.
    assert len(list((out / "images").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("previous", [False, True])
def test_an_interrupted_run_leaves_nothing_or_the_previous_dir(tmp_path, monkeypatch, previous):
    out = tmp_path / "data"
    if previous:
        synth.synthesize(out, train=2, test=1)
    before = snapshot(out) if previous else None
    real_draw, drawn = synth.draw, []

    def draw_then_interrupt(*args, **kwargs):  # Ctrl-C half-way through the pictures
        if len(drawn) == 3:
            raise KeyboardInterrupt
        drawn.append(1)
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(synth, "draw", draw_then_interrupt)
    assert synth_cli(out, "--train", "5", "--test", "0", "--force") == 130
    assert len(drawn) == 3
    assert (snapshot(out) if out.exists() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["data"] if previous else [])
