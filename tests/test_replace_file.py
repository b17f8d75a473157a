"""files.replace_file: a data file is the old one or the new one, never half of either."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from llava_edge.files import final_path, replace_dir, replace_file, scratch_beside


def test_the_file_appears_whole_and_ordinary(tmp_path):
    out = tmp_path / "sub" / "data.json"
    with replace_file(out) as f:
        f.write("[1, 2]\n")
        assert not out.exists()  # nothing at the path until the block finishes
    assert out.read_text() == "[1, 2]\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(out.parent) == ["data.json"]


def test_an_error_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "data.json"
    out.write_text("old")
    with pytest.raises(RuntimeError), replace_file(out) as f:
        f.write("half of the new")
        raise RuntimeError("writer failed")
    assert out.read_text() == "old"
    assert os.listdir(tmp_path) == ["data.json"]


def test_a_killed_writers_temporary_file_is_cleaned_up(tmp_path):
    out = tmp_path / "data.json"
    killed = subprocess.run(  # a writer that dies (os._exit: no cleanup) inside the block
        [sys.executable, "-c", "import os, sys; from llava_edge.files import replace_file\n"
         f"with replace_file(__import__('pathlib').Path({str(out)!r})) as f:\n"
         "    f.write('partial'); f.flush(); os._exit(9)"],
    )  # fmt: skip
    assert killed.returncode == 9
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    with replace_file(out) as f:
        f.write("new")
    assert os.listdir(tmp_path) == ["data.json"] and out.read_text() == "new"


def test_final_path_names_where_a_temporary_dir_is_installed(tmp_path):
    out = tmp_path / "model"
    with replace_dir(out) as tmp:
        inside = tmp / "sub" / "decoder.onnx"
        assert final_path(inside) == out.resolve() / "sub" / "decoder.onnx"
    assert final_path(out / "decoder.onnx") == out / "decoder.onnx"  # not in a temporary dir
    assert final_path(tmp_path / ".cache.partial-x" / "f") == tmp_path / ".cache.partial-x" / "f"


def test_scratch_files_go_beside_the_output_and_a_killed_runs_go_with_its_leftovers(tmp_path):
    out = tmp_path / "int8"
    before = tempfile.gettempdir()
    with pytest.raises(RuntimeError), scratch_beside(out) as scratch:
        assert Path(tempfile.mkdtemp()).parent == scratch and scratch.parent == tmp_path
        raise RuntimeError("failed half-way")
    assert tempfile.gettempdir() == before and os.listdir(tmp_path) == []
    killed = subprocess.run(  # a run that dies (os._exit: no cleanup) with scratch files out
        [sys.executable, "-c", "import os, tempfile; from llava_edge.files import scratch_beside\n"
         f"with scratch_beside(__import__('pathlib').Path({str(out)!r})):\n"
         "    tempfile.mkstemp(); os._exit(9)"],
    )  # fmt: skip
    assert killed.returncode == 9 and len(os.listdir(tmp_path)) == 1
    with replace_dir(out) as tmp:
        (tmp / "a").write_text("new")
    assert os.listdir(tmp_path) == ["int8"]
