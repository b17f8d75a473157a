"""The optimized-graph cache: a second load opens what the first saved; a damaged or stale entry
is rebuilt, never used; answers are the same with and without it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import quiet

from llava_edge.manifest import cache_dir
from llava_edge.runtime import Pipeline, session_cache

PROMPT = "What is in the picture?"


def answer(model_dir: Path, cache: Path, **load: object) -> tuple[list[int], dict[str, str]]:
    image = np.full((40, 60, 3), 120, dtype=np.uint8)
    with Pipeline.load(model_dir, **load) as pipe:
        ids = pipe.answer(image, PROMPT, max_new_tokens=6, ignore_eos=True).token_ids
        return ids, dict(pipe.backend.cache_status)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path))
    return tmp_path / "onnxruntime"


def entries(cache: Path) -> list[Path]:
    return sorted(p.parent for p in cache.glob(f"*/{session_cache.META}"))


def test_second_load_hits_and_answers_the_same(tiny_model_dir: Path, cache: Path) -> None:
    reference, status = answer(tiny_model_dir, cache, session_cache=False)
    assert set(status.values()) == {"none"} and not cache.exists()
    first, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"miss"}
    assert len(entries(cache)) == 3  # vision encoder, projector, decoder
    second, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"hit"}
    assert first == second == reference


@pytest.mark.parametrize("damage", ["truncate", "garbage", "meta"])
def test_damaged_entry_is_rebuilt(tiny_model_dir: Path, cache: Path, damage: str) -> None:
    reference, _ = answer(tiny_model_dir, cache)
    decoder = next(
        e
        for e in entries(cache)
        if "decoder" in json.loads((e / "entry.json").read_text())["source"]
    )
    model = decoder / session_cache.MODEL
    if damage == "truncate":
        data = decoder / session_cache.DATA
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "garbage":  # the size the entry records, but not a graph
        model.write_bytes(
            b"\x00junk" * (model.stat().st_size // 5) + b"\x00" * (model.stat().st_size % 5)
        )
    else:
        (decoder / session_cache.META).write_text("{not json")
    ids, status = answer(tiny_model_dir, cache)
    assert status["decoder"] == "miss" and status["projector"] == "hit"
    assert ids == reference
    assert session_cache._complete(decoder)  # rewritten whole
    assert answer(tiny_model_dir, cache)[1]["decoder"] == "hit"


@pytest.mark.parametrize(
    "other",
    [("__version__", "99.0.0-other"), ("get_build_info", lambda: "ORT Build Info: a Jetson wheel")],
    ids=["version", "build"],
)
def test_two_onnxruntime_versions_keep_their_own_entries(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, other
) -> None:
    """Two venvs on one robot share the cache dir: each version's entries stay, or every switch
    between them would rebuild every graph (and delete the other's). One version built twice
    (PyPI's wheel, a Jetson's) counts as two."""
    answer(tiny_model_dir, cache)
    before = entries(cache)
    with monkeypatch.context() as patch:
        patch.setattr(session_cache.ort, *other)
        _, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"miss"}
    assert len(entries(cache)) == 6 and set(before) <= set(entries(cache))
    _, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"hit"}


def test_the_entry_of_a_replaced_graph_is_dropped(tiny_model_dir: Path, cache: Path) -> None:
    """A re-exported graph at the same path (another sha256): its old entries can never be used."""
    path = tiny_model_dir / "projector.onnx"
    session_cache.open_cached(path, "a" * 64, None, cache)
    (old,) = entries(cache)
    _, how = session_cache.open_cached(path, "b" * 64, None, cache)
    assert how == "miss" and old not in entries(cache) and len(entries(cache)) == 1


def test_entries_unused_for_long_age_out(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An onnxruntime no longer used leaves its entries behind; they go once unused for
    MAX_AGE_DAYS, while an entry that is loaded stays."""
    path = tiny_model_dir / "projector.onnx"
    with monkeypatch.context() as patch:
        patch.setattr(session_cache.ort, "__version__", "99.0.0-gone")
        session_cache.open_cached(path, "a" * 64, None, cache)
    (gone,) = entries(cache)
    session_cache.open_cached(path, "a" * 64, None, cache)
    (used,) = set(entries(cache)) - {gone}
    long_ago = time.time() - (session_cache.MAX_AGE_DAYS + 1) * 86400
    for entry in (gone, used):
        os.utime(entry / session_cache.META, (long_ago, long_ago))
    _, how = session_cache.open_cached(path, "a" * 64, None, cache)
    assert how == "hit" and entries(cache) == [used]
    assert (used / session_cache.META).stat().st_mtime > time.time() - 3600  # used: fresh again


def test_cache_can_be_turned_off(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAVA_EDGE_SESSION_CACHE", "0")
    _, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"none"} and not cache.exists()


@pytest.mark.parametrize("value", ["0", "false", "False", "NO", "off", " 0 "])
def test_every_usual_way_of_saying_off_turns_it_off(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """`=off` or `=False` left the cache on, writing twice the weights under the home dir."""
    monkeypatch.setenv("LLAVA_EDGE_SESSION_CACHE", value)
    assert not session_cache.enabled()
    monkeypatch.setenv("LLAVA_EDGE_SESSION_CACHE", "1")
    assert session_cache.enabled()


@pytest.mark.parametrize("short_of", ["memory", "disk"])
def test_no_entry_written_without_room_to_spare(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, short_of: str
) -> None:
    if short_of == "memory":
        monkeypatch.setattr(session_cache, "_free_memory", lambda: 0)
    else:  # plenty free in bytes, but writing the entry would leave under a tenth of the disk
        total = 100 * sum(p.stat().st_size for p in tiny_model_dir.glob("*.onnx*"))
        usage = SimpleNamespace(total=total, used=0, free=total // 10 + 1)
        monkeypatch.setattr(session_cache.shutil, "disk_usage", lambda path: usage)
    reference, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"off"} and not entries(cache)
    assert answer(tiny_model_dir, cache, session_cache=False)[0] == reference


def test_entry_written_in_a_temporary_dir_belongs_to_the_installed_dir(
    tiny_model_dir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`quantize` and `export` load a dir in its temporary place before installing it: the
    entries are the installed dir's, so replacing that dir's graphs later drops them."""
    partial = tmp_path / ".model.partial-123-abcd"
    shutil.copytree(tiny_model_dir, partial)
    answer(partial, cache)
    written = entries(cache)
    sources = {json.loads((e / session_cache.META).read_text())["source"] for e in written}
    assert all(Path(s).parent == tmp_path / "model" for s in sources)
    partial.rename(tmp_path / "model")
    _, status = answer(tmp_path / "model", cache)
    assert set(status.values()) == {"hit"}
    projector = tmp_path / "model" / "projector.onnx"
    source = {e: json.loads((e / session_cache.META).read_text())["source"] for e in written}
    session_cache.open_cached(projector, "b" * 64, None, cache)  # as if re-exported
    assert [source[e] for e in written if e not in entries(cache)] == [str(projector)]


def test_entries_of_a_deleted_dir_are_dropped(
    tiny_model_dir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    answer(copy, cache)
    written = entries(cache)
    shutil.rmtree(copy)
    monkeypatch.setattr(session_cache.ort, "__version__", "99.0.0-other")  # a write happens
    _, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"miss"}
    assert not set(written) & set(entries(cache)) and len(entries(cache)) == 3


@pytest.fixture
def homeless(monkeypatch: pytest.MonkeyPatch) -> None:
    """A service run under a user id with no home: HOME unset and no passwd entry."""
    for name in ("HOME", "XDG_CACHE_HOME", "LLAVA_EDGE_CACHE"):
        monkeypatch.delenv(name, raising=False)

    def no_entry(uid: int) -> None:
        raise KeyError(uid)

    monkeypatch.setattr("pwd.getpwuid", no_entry)


def test_no_home_loads_without_a_cache(
    tiny_model_dir: Path, homeless: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ids, status = answer(tiny_model_dir, tmp_path)
    assert set(status.values()) == {"off"} and ids
    assert not list(tmp_path.iterdir())  # nothing cached in the working dir instead


def test_cache_env_is_enough_without_a_home(
    tiny_model_dir: Path, homeless: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path))
    assert set(answer(tiny_model_dir, tmp_path)[1].values()) == {"miss"}
    assert len(entries(tmp_path / "onnxruntime")) == 3


@pytest.mark.parametrize("variable", ["LLAVA_EDGE_CACHE", "XDG_CACHE_HOME"])
def test_empty_or_relative_cache_variable_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.delenv("LLAVA_EDGE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(variable, "")
    assert cache_dir() == tmp_path / ".cache" / "llava-edge"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    assert cache_dir() == tmp_path / ".cache" / "llava-edge"


def test_a_failed_save_keeps_the_session_it_opened(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load whose entry fails to install (the disk full; on a filesystem without locks,
    another process's entry there first) answers with the session it opened, not a second load
    of the graph."""
    import llava_edge.files as files

    reference, _ = answer(tiny_model_dir, cache, session_cache=False)

    def lost_the_race(tmp: Path, out: Path) -> None:
        raise OSError(39, "Directory not empty")

    opened: list[str] = []
    real = session_cache.ort.InferenceSession

    def counted(path: str, *args: object, **kwargs: object) -> object:
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files, "_install", lost_the_race)
    monkeypatch.setattr(session_cache.ort, "InferenceSession", counted)
    ids, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"off"} and not entries(cache)
    assert len(opened) == len(set(opened)) == 3 and ids == reference  # each graph opened once


def test_graphs_alike_but_for_their_weights_keep_their_own_entries(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph with its weights in a `.data` file (every graph over 1.8 GB: a 7B decoder in any
    precision) is the same `.onnx` for every checkpoint of one shape, a fine-tune and its base:
    the entry of one must not answer for the other."""
    from llava_edge import files
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.training.checkpoint import init_checkpoint

    monkeypatch.setattr(files, "MAX_PROTOBUF", 0)  # every graph with a .data file
    dirs = []
    for seed in (1, 2):
        checkpoint = init_checkpoint(tmp_path / f"checkpoint{seed}", preset="tiny", seed=seed)
        export_checkpoint(
            checkpoint, tmp_path / f"model{seed}", verify=False, fused=False, log=quiet
        )
        dirs.append(tmp_path / f"model{seed}")
    assert (dirs[1] / "decoder.onnx").read_bytes() == (dirs[0] / "decoder.onnx").read_bytes()
    want, _ = answer(dirs[1], cache, session_cache=False)
    answer(dirs[0], cache)  # writes its entries
    got, status = answer(dirs[1], cache)
    assert set(status.values()) == {"miss"}
    assert got == want


def test_a_killed_writers_leftovers_go_though_no_entry_can_be_written(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load killed while it wrote its entries (a robot's power cut) leaves their partial
    copies, about twice the weights, beside the cache's entries. Only a load writing the same
    entry again removed them: where the leftovers themselves left too little disk for one (a
    Jetson's eMMC), none ever did, and the cache neither worked nor gave the disk back."""
    import subprocess
    import sys

    answer(tiny_model_dir, cache)
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # its pid names no running writer
    leftovers = []
    for i, entry in enumerate(entries(cache)):
        leftover = entry.parent / f".{entry.name}.partial-{process.pid}-x"
        entry.rename(leftover)
        if i == 0:  # killed before it wrote what the entry holds
            (leftover / session_cache.META).unlink()
        leftovers.append(leftover)
    monkeypatch.setattr(session_cache, "_free_memory", lambda: 0)  # no room for an entry
    _, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"off"}
    assert [p for p in leftovers if p.exists()] == []


@pytest.mark.parametrize(
    ("version", "prepacked"),
    [("1.27.0", True), ("1.28.1", False), ("1.31.0", False), ("1.32.0", True)],
)
def test_an_onnxruntime_that_misreads_prepacked_weights_saves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, prepacked: bool
) -> None:
    """onnxruntime 1.28 to 1.31 read an entry's pre-packed MatMulNBits weights back wrongly: an
    int4 dir answered its first load, then every cached load failed on NaN scores."""
    monkeypatch.setattr(session_cache.ort, "__version__", version)
    options = session_cache._saving(None, tmp_path)
    key = "session.save_external_prepacked_constant_initializers"
    try:
        saved = options.get_session_config_entry(key) == "1"
    except RuntimeError:  # "does not have configuration with key"
        saved = False
    assert saved is prepacked


def test_an_entry_of_a_graph_this_user_may_not_see_stays_and_fails_no_load(
    tiny_model_dir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Services of several users share one cache (LLAVA_EDGE_CACHE=/var/cache/llava-edge): an
    entry of a graph in another user's private dir cannot be told gone, and asking raised
    PermissionError, which failed every load of this user's own model."""
    theirs = tmp_path / "private" / "model"
    shutil.copytree(tiny_model_dir, theirs)
    answer(theirs, cache)
    written = entries(cache)
    real = os.stat

    def private(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).startswith(str(theirs.parent)):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", private)
    ids, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"hit"} and ids
    assert entries(cache) == written


def test_one_process_writes_entries_at_a_time(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A robot's processes start at once and load the same dir with a cold cache: each checked
    free memory and disk for itself, then all wrote the same entries at once, each holding a
    second copy of the weights and writing twice them to disk. While one writes, the others load
    uncached."""
    import fcntl

    reference, _ = answer(tiny_model_dir, cache, session_cache=False)
    cache.mkdir(parents=True)
    with open(cache / session_cache.WRITER_LOCK, "w") as other:  # another process writing
        fcntl.flock(other, fcntl.LOCK_EX)
        ids, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"off"} and not entries(cache) and ids == reference
    ids, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"miss"} and len(entries(cache)) == 3 and ids == reference


def test_an_entry_written_by_another_process_meanwhile_is_opened_not_rewritten(
    tiny_model_dir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process may finish an entry between this one finding none and taking the writer
    lock: this one opens it, rather than writing it again over the one others may be opening."""
    answer(tiny_model_dir, cache)
    written = tmp_path / "written"
    shutil.move(cache, written)
    real = session_cache._sole_writer

    @contextlib.contextmanager
    def others_finish_first(root: Path) -> Iterator[bool]:
        for entry in written.iterdir():
            if entry.is_dir() and not (root / entry.name).exists():
                shutil.copytree(entry, root / entry.name)
        with real(root) as writing:
            yield writing

    monkeypatch.setattr(session_cache, "_sole_writer", others_finish_first)
    _, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"hit"}


def test_a_writers_partial_entry_stays_whatever_its_pid_looks_like_here(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Containers sharing one cache each have their own PIDs: a writer in one is named by a PID
    that may be no process in another, whose loads removed the entry it was writing (on every
    boot where both start together, so the entry was never written)."""
    import fcntl
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # its pid: how a writer elsewhere looks from here
    cache.mkdir(parents=True)
    writing = cache / f".{'0' * 32}.partial-{process.pid}-x"
    writing.mkdir()
    with open(cache / session_cache.WRITER_LOCK, "w") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)
        _, status = answer(tiny_model_dir, cache)
        assert set(status.values()) == {"off"} and writing.exists()
    _, status = answer(tiny_model_dir, cache)  # the writer gone: a leftover, removed
    assert set(status.values()) == {"miss"} and not writing.exists()


@pytest.mark.parametrize(
    ("proc", "limit_at", "limit", "written"),
    [
        ("0::/robot.service\n", "robot.service/memory.max", "20000", False),  # cgroup v2
        ("0::/robot.service\n", "robot.service/memory.max", "max", True),
        ("0::/\n", "memory.max", "20000", False),  # v2 in a container: its cgroup is the root
        ("4:memory:/docker/abc\n", "memory/memory.limit_in_bytes", "20000", False),  # v1 docker
        ("4:memory:/robot\n0::/\n", "memory/memory.limit_in_bytes", "20000", False),  # a parent
        ("a sandbox's own table\n0::/\n", "memory.max", "max", True),
    ],
)
def test_no_entry_written_past_the_memory_a_cgroup_allows(
    tiny_model_dir: Path,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    proc: str,
    limit_at: str,
    limit: str,
    written: bool,
) -> None:
    """A container's --memory (or a systemd unit's MemoryMax=) is the process's memory whatever
    the machine has free: a first load that saved entries there held a second copy of the weights
    past it, and the kernel killed the app on every start (a plain load fitted)."""
    (tmp_path / "proc").write_text(proc)
    limit_file = tmp_path / "cgroup" / limit_at
    limit_file.parent.mkdir(parents=True)
    limit_file.write_text(limit + "\n")
    usage = "memory.current" if limit_file.name == "memory.max" else "memory.usage_in_bytes"
    (limit_file.parent / usage).write_text("1000\n")
    monkeypatch.setattr(session_cache, "PROC_CGROUP", tmp_path / "proc")
    monkeypatch.setattr(session_cache, "CGROUP_MOUNT", tmp_path / "cgroup")
    reference, _ = answer(tiny_model_dir, cache, session_cache=False)
    ids, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == ({"miss"} if written else {"off"}) and ids == reference


def test_the_cache_deleted_while_an_entry_is_written_costs_only_that_entry(
    tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's way to take the cache's space back: delete it, at any time."""
    reference, _ = answer(tiny_model_dir, cache, session_cache=False)
    real = session_cache._saving

    def cleared_meanwhile(threads: int | None, out: Path) -> object:
        options = real(threads, out)
        shutil.rmtree(cache)
        return options

    monkeypatch.setattr(session_cache, "_saving", cleared_meanwhile)
    ids, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"off"} and ids == reference
    monkeypatch.setattr(session_cache, "_saving", real)
    ids, status = answer(tiny_model_dir, cache)
    assert set(status.values()) == {"miss"} and ids == reference


def test_the_cache_follows_an_absolute_xdg_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLAVA_EDGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "llava-edge"
