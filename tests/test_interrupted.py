"""Work killed at random moments (SIGKILL: no cleanup runs) leaves its output absent, the
previous complete one, or complete; the next run cleans up after it.

The moments are drawn afresh each run from a seed the test prints; LLAVA_EDGE_KILL_SEED=<seed>
draws the same moments again (how far the work has got at a moment still depends on the
machine's speed, so a replay aims at the same phase rather than the same instruction)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import record_syncs_and_renames

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


def kill_moments() -> random.Random:
    """The random source of kill moments, seeded from LLAVA_EDGE_KILL_SEED or the clock."""
    seed = int(os.environ.get("LLAVA_EDGE_KILL_SEED") or time.time_ns() % 2**32)
    print(f"kill moments from seed {seed}: replay with LLAVA_EDGE_KILL_SEED={seed}")
    return random.Random(seed)


def test_kill_moments_replay_from_the_printed_seed(monkeypatch, capsys):
    monkeypatch.delenv("LLAVA_EDGE_KILL_SEED", raising=False)
    drawn = [kill_moments().random() for _ in range(2)]
    seeds = [int(line.rsplit("=", 1)[1]) for line in capsys.readouterr().out.splitlines()]
    monkeypatch.setenv("LLAVA_EDGE_KILL_SEED", str(seeds[1]))
    assert kill_moments().random() == drawn[1]
    assert f"LLAVA_EDGE_KILL_SEED={seeds[1]}" in capsys.readouterr().out


def kill_at_random_moments(
    argv: list[str], out: Path, previous: dict[str, bytes], kills: int, tmp: Path
) -> None:
    """Run `argv` `kills` times, SIGKILL each at a random moment, check `out` after each.

    The runs' TMPDIR is `tmp`, which must stay empty: a killed run's scratch files belong
    beside `out`, where the next run removes them, not in /tmp for ever."""
    tmp.mkdir()
    # torch makes its compiler's cache dir, shared by every torch program, under the temporary
    # dir unless told otherwise (a pytest process that imported torch's compiler has told it,
    # through the environment its children inherit): not a leftover of the run.
    inductor = tmp.parent / "torchinductor"
    env = {**os.environ, "TMPDIR": str(tmp), "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    rng = kill_moments()
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)  # how long one run takes
    duration = time.perf_counter() - start
    previous_or_new = [previous, snapshot(out)]
    for _ in range(kills):
        process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        time.sleep(rng.uniform(0.2, duration))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not out.exists() or snapshot(out) in previous_or_new or is_complete_model_dir(out)
    subprocess.run(argv, check=True, capture_output=True, env=env)
    assert is_complete_model_dir(out)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []
    # onnxruntime keeps one small session-id file (.ses) in the temporary dir, whatever happens
    assert [p.name for p in tmp.iterdir() if p.name != ".ses"] == []


def test_export_killed_at_random_moments(tiny_checkpoint, tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    argv = [*CLI, "export", str(tiny_checkpoint), str(out), "--force", "--no-verify"]
    kill_at_random_moments(argv, out, snapshot(out), kills=3, tmp=tmp_path / "tmp")


def test_exports_scratch_files_go_beside_its_output(tiny_checkpoint, tmp_path, monkeypatch):
    """onnxruntime's graph optimizer (the fused vision encoder) writes through tempfile: beside
    the output, where the next run removes what a killed one left, and not in /tmp (a tmpfs on
    many Jetson images)."""
    import tempfile

    from conftest import quiet

    from llava_edge.export.exporter import export_checkpoint

    made = []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(
        tempfile, "mkdtemp", lambda *a, **k: made.append(mkdtemp(*a, **k)) or made[-1]
    )
    out = tmp_path / "out" / "model"
    export_checkpoint(tiny_checkpoint, out, verify=False, log=quiet)
    assert made and all(Path(d).is_relative_to(out.parent) for d in made), made
    assert [p.name for p in out.parent.iterdir()] == ["model"]


def test_quantize_killed_at_random_moments(tiny_model_dir, tmp_path):
    from llava_edge.training.synth import synthesize

    data = synthesize(tmp_path / "data", train=3, test=0)
    out = tmp_path / "int8"
    argv = [*CLI, "quantize", str(tiny_model_dir), str(out), "--precision", "int8",
            "--calib", str(data["train"]), "--samples", "2", "--force"]  # fmt: skip
    kill_at_random_moments(argv, out, {}, kills=3, tmp=tmp_path / "tmp")


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


@pytest.mark.parametrize("rename, left", [("aside", b"old"), ("in", b"new")])
def test_ctrl_c_as_a_rename_of_the_install_returns_leaves_one_whole_dir(
    tmp_path, monkeypatch, rename, left
):
    """Installing is two renames (the old dir aside, the new one in): Ctrl-C as either returns
    leaves the path holding the old dir or the new one, and nothing hidden beside it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    replace = os.replace

    def interrupted(src, dst) -> None:
        replace(src, dst)
        moved = Path(src if rename == "in" else dst).name
        if moved.startswith(".out.partial-" if rename == "in" else ".out.old-"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), replace_dir(out) as tmp:
        (tmp / "a").write_text("new")
    assert snapshot(out) == {"a": left}
    assert os.listdir(tmp_path) == ["out"]


def test_a_new_dir_is_on_disk_before_its_name_is(tmp_path, monkeypatch):
    """Power loss: every file and dir of the new tree is flushed before the rename that makes
    it `out`, and the parent dir (holding the rename) after it."""
    out = tmp_path / "out"
    out.mkdir()
    events = record_syncs_and_renames(monkeypatch)
    with replace_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a").write_text("a")
        (tmp / "b").write_text("b")
        made = {str(tmp), str(tmp / "sub"), str(tmp / "sub" / "a"), str(tmp / "b")}
    installed = events.index(("rename", str(out)))
    assert made <= {path for kind, path in events[:installed] if kind == "fsync"}
    assert ("fsync", str(tmp_path)) in events[installed:]


def test_files_written_private_are_installed_readable(tmp_path):
    """onnx writes external data 0600: the installed dir follows the umask like any other."""
    umask = os.umask(0o022)
    try:
        with replace_dir(tmp_path / "out") as tmp:
            (tmp / "weights.data").write_bytes(b"w")
            (tmp / "weights.data").chmod(0o600)
    finally:
        os.umask(umask)
    assert (tmp_path / "out" / "weights.data").stat().st_mode & 0o777 == 0o644


def test_a_manifest_is_on_disk_before_its_name_is(tiny_model_dir, tmp_path, monkeypatch):
    manifest = Manifest.load(tiny_model_dir)
    events = record_syncs_and_renames(monkeypatch)
    manifest.save(tmp_path)
    saved = events.index(("rename", str(tmp_path / "manifest.json")))
    temporary = [path for kind, path in events[:saved] if kind == "fsync"]
    assert len(temporary) == 1 and Path(temporary[0]).parent == tmp_path
    assert ("fsync", str(tmp_path)) in events[saved:]
    assert Manifest.load(tmp_path) == manifest


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


@pytest.mark.parametrize("name", ["model[int8]", "model*", "model?"])
def test_leftovers_are_found_whatever_the_name_holds(tmp_path, name):
    """An output's name is matched as it is, never as a pattern: leftovers of `model[int8]`
    are its own, and those of `model*` are not another output's."""
    dead = _dead_pid()
    mine = tmp_path / f".{name}.partial-{dead}-x"
    mine.mkdir()
    other = tmp_path / f".model2.partial-{dead}-x"  # another output's: its own run cleans it
    other.mkdir()
    with replace_dir(tmp_path / name):
        pass
    assert not mine.exists() and other.exists()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def is_complete_trainer_checkpoint(path: Path) -> bool:
    needed = ("model.safetensors", "trainer_state.json", "optimizer.pt", "llava_edge.json")
    return all((path / name).is_file() for name in needed)


def test_training_killed_at_random_moments_resumes_from_its_last_checkpoint(
    tiny_checkpoint, tmp_path
):
    from llava_edge.training.synth import synthesize

    data = synthesize(tmp_path / "data", train=6, test=0)
    out = tmp_path / "trained"
    argv = [*CLI, "train", "--stage", "2", "--model", str(tiny_checkpoint), "--data", str(data["train"]),
            "--images", str(data["images"]), "--out", str(out), "--max-steps", "120", "--batch-size", "2",
            "--save-steps", "3", "--save-total-limit", "2", "--no-gradient-checkpointing",
            "--logging-steps", "1"]  # fmt: skip
    rng = kill_moments()
    process = subprocess.Popen(
        [*argv, "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(2):
        # wait for a first checkpoint, then kill at a random moment of the saves that follow
        while not list((out / "checkpoints").glob("checkpoint-*")) and process.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        checkpoints = list((out / "checkpoints").glob("checkpoint-*"))
        assert checkpoints and all(is_complete_trainer_checkpoint(c) for c in checkpoints)
        assert not (out / "model.safetensors").exists()  # the final checkpoint is not there yet
        process = subprocess.Popen(
            [*argv, "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    _, err = process.communicate()
    assert process.returncode == 0, err.decode()[-2000:]
    state = json.loads((out / "checkpoints" / "checkpoint-120" / "trainer_state.json").read_text())
    assert state["global_step"] == 120
    assert (out / "model.safetensors").is_file() and not list(
        out.glob("checkpoints/tmp-checkpoint-*")
    )


BUILD_WITH_STUB = """
import sys
sys.path.insert(0, {tests!r})
import tensorrt_stub
sys.modules["tensorrt"] = tensorrt_stub
from llava_edge.runtime.tensorrt import gpu
gpu.probe_gpu = lambda index=0: gpu.GpuInfo(0, "Stub Orin", "8.7", 8 << 30, 6 << 30, True, "12.6")
from llava_edge.runtime.tensorrt.build import build_engines
build_engines({model!r}, max_batch={batch}, log=lambda *a: None)
"""


def recorded_engines_are_whole(model: Path) -> bool:
    from llava_edge.manifest import sha256

    for key, record in Manifest.load(model).engines.items():
        for spec in record.engines.values():
            path = model / key / spec.file
            if not path.is_file() or sha256(path) != spec.sha256:
                return False
    return True


def test_engine_build_killed_at_random_moments(tiny_model_dir, tmp_path):
    """With the TensorRT stand-in (tests/tensorrt_stub.py): the manifest always points at whole
    engines, old or new, and the next build removes what a killed one left."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tests = str(Path(__file__).parent)
    first = [sys.executable, "-c", BUILD_WITH_STUB.format(tests=tests, model=str(model), batch=1)]
    subprocess.run(first, check=True, capture_output=True)
    old = Manifest.load(model).engines["engines"]
    rng = kill_moments()
    argv = [sys.executable, "-c", BUILD_WITH_STUB.format(tests=tests, model=str(model), batch=2)]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    duration = time.perf_counter() - start
    for _ in range(3):
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, duration))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert recorded_engines_are_whole(model)
        assert Manifest.load(model).engines["engines"].max_batch in (old.max_batch, 2)
    subprocess.run(argv, check=True, capture_output=True)
    assert recorded_engines_are_whole(model)
    recorded = {s.file for s in Manifest.load(model).engines["engines"].engines.values()}
    assert {p.name for p in (model / "engines").glob("*.engine")} == recorded


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def test_sigterm_unwinds_like_ctrl_c_and_removes_the_partial_dir(tiny_checkpoint, tmp_path):
    """systemd or a job scheduler stops a command with SIGTERM: the command cleans up as after
    Ctrl-C (its temporary dir is gone now, not at the next run), says so in one line and exits
    143, the status a shell gives a process SIGTERM ended."""
    out = tmp_path / "model"
    argv = [*CLI, "export", str(tiny_checkpoint), str(out), "--no-verify"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: any(tmp_path.glob(".model.partial-*")), "partial dir", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err.decode()[-2000:]
    assert err.decode().strip().endswith("llava-edge export: terminated")
    assert "Traceback" not in err.decode()
    assert list(tmp_path.iterdir()) == []  # neither the output nor a leftover


def test_sigterm_ends_a_chat_waiting_for_its_question(tiny_model_dir):
    process = subprocess.Popen(
        [*CLI, "chat", str(tiny_model_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdin.write(b"Hi\n")
    process.stdin.flush()
    answered = []

    def read_answer() -> bool:  # the second prompt is out: the chat now waits on stdin
        answered.append(process.stdout.read1(1 << 16))
        return b"".join(answered).count(b"\n> ") >= 2

    _wait_for(read_answer, "first answer", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err.decode()[-2000:]
    assert "Traceback" not in err.decode() and "terminated" in err.decode()


@pytest.mark.parametrize(
    "signum, code, said", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_a_library_drops_still_ends_the_command(monkeypatch, capsys, signum, code, said):
    """C code in a library may drop the raised Terminated or KeyboardInterrupt (numpy's module
    setup does): the command then runs to its end, and still reports that it was stopped."""
    from llava_edge import cli

    before = signal.getsignal(signum)

    def command_that_drops_it(args) -> int:
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs in here
        except KeyboardInterrupt:
            pass
        return 0

    monkeypatch.setitem(cli.COMMANDS, "doctor", command_that_drops_it)
    assert cli.main(["doctor"]) == code
    assert capsys.readouterr().err.strip() == f"llava-edge doctor: {said}"
    assert signal.getsignal(signum) is before  # the command's handler is gone


@pytest.mark.parametrize(
    "signal_name, code, said", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")]
)
def test_a_signal_during_an_import_comes_once_the_import_is_done(
    monkeypatch, capsys, tmp_path, signal_name, code, said
):
    """An exception raised inside a module's setup can crash a C extension's (onnx's aborts the
    interpreter: exit -6 or -11 instead of 143 or 130, nothing cleaned up) or be dropped by it:
    the Terminated, or Ctrl-C's KeyboardInterrupt, waits until the import is done."""
    from llava_edge import cli

    (tmp_path / "slow_setup.py").write_text(
        f"import os, signal, time\nos.kill(os.getpid(), signal.{signal_name})\n"
        "time.sleep(0.3)\nDONE = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_setup", raising=False)

    def command_that_imports(args) -> int:
        import slow_setup  # noqa: F401

        time.sleep(5)  # the handler raises in here
        return 0

    monkeypatch.setitem(cli.COMMANDS, "doctor", command_that_imports)
    assert cli.main(["doctor"]) == code
    assert capsys.readouterr().err.strip() == f"llava-edge doctor: {said}"
    assert sys.modules.pop("slow_setup").DONE  # imported whole


def test_a_sigterm_while_the_parser_imports_stops_serve_before_it_starts(
    monkeypatch, capsys, tmp_path
):
    """`serve` leaves the signals to uvicorn once parsed: a SIGTERM deferred until the parser's
    import was done came after the parser's handler had gone, and was lost; the server started
    and served on (a service stopped as it started kept running until killed)."""
    from llava_edge import cli

    (tmp_path / "setup_signalled.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.01)\n"
        "DONE = True\n"  # the handler runs in the sleep, inside the import: deferred
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "setup_signalled", raising=False)
    real = cli.build_parser

    def parser_that_imports():
        import setup_signalled  # noqa: F401

        return real()

    served = []
    monkeypatch.setattr(cli, "build_parser", parser_that_imports)
    monkeypatch.setitem(cli.COMMANDS, "serve", lambda args: served.append(args) or 0)
    assert cli.main(["serve", "model"]) == 143
    assert capsys.readouterr().err.strip().endswith(": terminated")
    assert served == [] and sys.modules.pop("setup_signalled").DONE


def test_a_sigint_the_parent_ignores_stays_ignored(monkeypatch):
    """A shell starts a background job (`llava-edge export ... &`) with SIGINT ignored: the
    terminal's Ctrl-C is not for it, during the command or after."""
    from llava_edge import cli

    seen = []
    monkeypatch.setitem(
        cli.COMMANDS, "doctor", lambda args: seen.append(signal.getsignal(signal.SIGINT)) or 0
    )
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert cli.main(["doctor"]) == 0
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_the_parser_imports_is_one_line(monkeypatch, capsys):
    """The parser imports numpy before any command runs: Ctrl-C there is an interrupt too."""
    from llava_edge import cli

    real = cli.build_parser

    def slow_parser():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs in here
        return real()

    monkeypatch.setattr(cli, "build_parser", slow_parser)
    assert cli.main(["doctor"]) == 130
    assert capsys.readouterr().err.strip() == "llava-edge: interrupted"
