"""Shared fixtures: tiny LLaVA checkpoints built from config and their exported model dirs.

Built once per test process (pytest-xdist runs one per core), in a temporary dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep llava-edge's cache (verified-file fingerprints) out of the user's home."""
    import os

    os.environ["LLAVA_EDGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True, scope="session")
def _library_logs_to_the_sessions_stderr() -> None:
    """transformers' log handler keeps the stderr it was first set up with. Set up inside a test
    that captures stderr (capsys), it would write to that test's stream, closed when the test
    ends: a later warning (Trainer's on resume) then prints a logging traceback into another
    test's captured stderr. Set it up once, before any test."""
    from transformers.utils import logging

    logging.get_logger("transformers")


def quiet(*_args, **_kwargs) -> None:
    """A `log` for library calls whose output tests don't read."""


def one_line_error(err: str) -> str:
    """The CLI's error, alone on the last line of stderr (progress bars may come before it),
    with no traceback."""
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err
    assert err.strip().endswith(errors[0]) and errors[0].startswith("llava-edge "), err
    return errors[0]


def run_app(script: str, model_dir, hung: str, timeout_s: float = 30) -> Any:
    """An app's script run to its end in a process of its own, on `model_dir`; `hung` is the
    failure said where it has not ended in `timeout_s`."""
    import subprocess
    import sys

    try:
        return subprocess.run(
            [sys.executable, "-c", script, str(model_dir)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(hung)


def write_pgm16(path: Path, pixels) -> None:
    """Save a 2-D uint16 array as a binary 16-bit PGM (maxval 65535), as depth and
    machine-vision cameras write one. Written by hand: pyproject's pillow floor (10.3) cannot save
    mode I;16 as PGM."""
    height, width = pixels.shape
    path.write_bytes(b"P5 %d %d 65535\n" % (width, height) + pixels.astype(">u2").tobytes())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llava_edge.training.checkpoint import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llava_edge.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("tiny_model") / "model"
    export_checkpoint(tiny_checkpoint, out, verify=False, log=quiet)
    return out


@pytest.fixture(scope="session")
def context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shape with weights drawn 15x wider than the default (std 0.3, not 0.02), so that
    its greedy answers depend on the whole conversation: with the default init, a random model's
    next token follows almost only from the last one, and a test of context could not fail."""
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.training.checkpoint import init_checkpoint

    root = tmp_path_factory.mktemp("context")
    checkpoint = init_checkpoint(
        root / "checkpoint", preset="tiny", seed=0, text={"initializer_range": 0.3}
    )
    export_checkpoint(checkpoint, root / "model", verify=False, log=quiet)
    return root / "model"


def record_syncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """("fsync", path) and ("rename", target) in the order they happen, from now on: what a
    test of power-loss safety reads."""
    import os

    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst) -> None:
        replace(src, dst)
        events.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training as on the CPU machines these tests are written for, on a GPU machine too: its
    printing from data-loader workers, its fp32 arithmetic and its one-device process group
    differ on a GPU (two ranks on one GPU fail NCCL's barrier). Child processes see no GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
