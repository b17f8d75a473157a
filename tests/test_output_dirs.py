"""files.replace_dir at a path that is a symlink (a robot's `models/current` pointing at a
versioned dir, perhaps on another disk): the link is replaced by the new dir, what it pointed at
is left alone, and nothing is left behind beside either."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from llava_edge.files import replace_dir


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Path]:
    """A dir on another filesystem than tmp_path where there is one (/dev/shm is tmpfs)."""
    shm = Path("/dev/shm")
    other = shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev
    path = Path(tempfile.mkdtemp(dir=shm if other else tmp_path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("target", ["same_disk", "other_disk"])
def test_a_symlinked_output_is_replaced_not_written_through(
    tmp_path: Path, elsewhere: Path, target: str
) -> None:
    versions = tmp_path / "versions" if target == "same_disk" else elsewhere
    (versions / "v1").mkdir(parents=True, exist_ok=True)
    (versions / "v1" / "model.onnx").write_text("v1")
    app = tmp_path / "app"
    app.mkdir()
    (app / "current").symlink_to(versions / "v1")
    with replace_dir(app / "current") as tmp:
        (tmp / "model.onnx").write_text("v2")
    assert not (app / "current").is_symlink()
    assert (app / "current" / "model.onnx").read_text() == "v2"
    assert (versions / "v1" / "model.onnx").read_text() == "v1"  # the old version, untouched
    assert os.listdir(app) == ["current"] and os.listdir(versions) == ["v1"]


def test_a_dangling_symlinked_output_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "current").symlink_to(tmp_path / "gone")
    with replace_dir(tmp_path / "current") as tmp:
        (tmp / "model.onnx").write_text("v2")
    assert (tmp_path / "current" / "model.onnx").read_text() == "v2"
    assert os.listdir(tmp_path) == ["current"]


@pytest.mark.parametrize(
    "argv",
    [["init", "{out}", "--preset", "tiny", "--force"], ["data", "synth", "{out}", "--force"]],
    ids=["init", "data-synth"],
)
@pytest.mark.parametrize("out", [".", ".."])
def test_an_output_holding_the_working_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv, out
) -> None:
    """`--out .` ran the whole job, then failed to install it with an EBUSY traceback."""
    from llava_edge.cli import main

    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the robot's logs")
    monkeypatch.chdir(work)
    assert main([a.format(out=out) for a in argv]) == 1
    err = capsys.readouterr().err
    assert "holds the working directory" in err and err.count("\n") == 1
    assert (work / "notes.txt").read_text() == "the robot's logs"


@pytest.mark.parametrize(
    "argv",
    [["init", "{out}", "--preset", "tiny"], ["data", "synth", "{out}", "--train", "1"]],
    ids=["init", "data-synth"],
)
def test_an_output_that_is_a_mount_point_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv
) -> None:
    """OUT a mount point (a Docker bind mount, a disk): the whole job ran, then no rename could
    put the new dir in its place (an EBUSY traceback; train's save an EXDEV one)."""
    from llava_edge.cli import main

    out = tmp_path / "mounted"
    out.mkdir()
    ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or ismount(p))
    assert main([a.format(out=out) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"llava-edge {' '.join(argv[: argv.index('{out}')])}: error: output dir {out} is a mount "
        "point, which the new dir, built beside it and renamed into its place, cannot replace; "
        "give a new dir inside it\n"
    )
    assert sorted(tmp_path.iterdir()) == [out] and not any(out.iterdir())


def test_a_bind_mount_of_the_same_disk_is_refused_as_a_mount_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A dir bind-mounted from the same disk has its parent's device, which os.path.ismount
    compares: Linux's mount table (its paths escaped, `\\040` a space) names it, and a rename no
    more replaces it (train's save failed with EXDEV after the whole run). A symlink to it is
    replaced as any other link is."""
    from llava_edge import files
    from llava_edge.cli import main

    out = tmp_path / "bind mount"
    out.mkdir()
    escaped = str(out).replace(" ", "\\040")
    table = tmp_path.parent / f"{tmp_path.name}.mountinfo"
    table.write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        f"611 27 254:0 /srv/runs {escaped} rw,relatime - ext4 /dev/vda rw\n"
    )
    monkeypatch.setattr(files, "MOUNTINFO", table, raising=False)
    assert main(["init", str(out), "--preset", "tiny"]) == 1
    assert capsys.readouterr().err.startswith(
        f"llava-edge init: error: output dir {out} is a mount point"
    )
    assert not any(out.iterdir())
    link = tmp_path / "current"
    link.symlink_to(out)
    assert main(["init", str(link), "--preset", "tiny"]) == 0
    assert (link / "config.json").is_file() and not link.is_symlink()
    table.unlink()
