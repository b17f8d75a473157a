"""Work killed at random moments (SIGKILL: no cleanup runs) leaves its output absent, the
previous complete one, or complete; the next run cleans up after it."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_edge.errors import LlavaEdgeError
from llava_edge.files import replace_dir
from llava_edge.manifest import Manifest

CLI = [sys.executable, "-m", "llava_edge.cli"]


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def is_complete_model_dir(path: Path) -> bool:
    try:
        Manifest.load(path).check_files(path, hashes=True)
        return True
    except LlavaEdgeError:
        return False


def kill_at_random_moments(
    argv: list[str], out: Path, previous: dict[str, bytes], kills: int
) -> None:
    """Run `argv` `kills` times, SIGKILL each at a random moment, check `out` after each."""
    rng = random.Random(int(time.time()))  # a different set of moments every run
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)  # how long one whole run takes
    duration = time.perf_counter() - start
    previous_or_new = [previous, snapshot(out)]
    for _ in range(kills):
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, duration))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not out.exists() or snapshot(out) in previous_or_new or is_complete_model_dir(out)
    subprocess.run(argv, check=True, capture_output=True)
    assert is_complete_model_dir(out)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def test_export_killed_at_random_moments(tiny_checkpoint, tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    argv = [*CLI, "export", str(tiny_checkpoint), str(out), "--force", "--no-verify"]
    kill_at_random_moments(argv, out, snapshot(out), kills=3)


def test_quantize_killed_at_random_moments(tiny_model_dir, tmp_path):
    from llava_edge.training.synth import synthesize

    data = synthesize(tmp_path / "data", train=3, test=0)
    out = tmp_path / "int8"
    argv = [*CLI, "quantize", str(tiny_model_dir), str(out), "--precision", "int8",
            "--calib", str(data["train"]), "--samples", "2", "--force"]  # fmt: skip
    kill_at_random_moments(argv, out, {}, kills=3)


def test_replace_dir_keeps_the_old_dir_until_the_new_one_is_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError), replace_dir(out) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("failed half-way")
    assert (out / "a").read_text() == "old"
    with replace_dir(out) as tmp:
        (tmp / "b").write_text("new")
    assert snapshot(out) == {"b": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_killed_writers_are_cleaned(tmp_path):
    dead = _dead_pid()
    out = tmp_path / "out"
    partial = tmp_path / f".out.partial-{dead}-x"
    partial.mkdir()
    old = tmp_path / f".out.old-{dead}"
    old.mkdir()
    (old / "a").write_text("previous")
    live = tmp_path / f".out.partial-{os.getpid()}-y"  # a writer still running: left alone
    live.mkdir()
    with replace_dir(out):
        # killed between the two renames: the previous dir is put back before anything else
        assert (out / "a").read_text() == "previous" and not partial.exists()
    assert live.exists() and not old.exists()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
