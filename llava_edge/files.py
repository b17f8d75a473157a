"""Writing a whole directory (or file) so that, whatever happens (an error, Ctrl-C, SIGKILL,
power loss), its path holds nothing, the previous complete one, or the new complete one.

Every stage that produces a dir (init, export, quantize, training's output) writes through
`replace_dir`, and every data file (`llava-edge data ...`) through `replace_file`: the work goes
into a hidden temporary beside the output (same filesystem, so installing it is a rename), and
leftovers of writers that were killed are cleaned up next time. Before the rename everything new
is flushed to disk (fsync: each file, and each dir of a new tree), and after it the parent dir:
a rename is durable only once its dir is, and without the flush a power cut could leave the new
name pointing at data that never reached the disk.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llava_edge.errors import LlavaEdgeError


def check_output_dir(
    out: Path, force: bool, keep: Path | None = None, keep_name: str = "the input"
) -> None:
    """Fail before any work if `out` cannot become the new dir.

    keep: a path that must survive (the checkpoint being exported): --force never deletes it.
    """
    _check_name(out, f"output dir {out}")
    try:
        if out.exists() and not out.is_dir():
            raise LlavaEdgeError(
                f"output {out} exists and is not a directory; choose another output dir"
            )
        if is_mount_point(out):  # a Docker bind mount, a disk: no rename replaces it
            raise LlavaEdgeError(
                f"output dir {out} is a mount point, which the new dir, built beside it and "
                "renamed into its place, cannot replace; give a new dir inside it"
            )
        if out.is_dir() and any(out.iterdir()) and not force:
            raise LlavaEdgeError(f"output dir {out} is not empty; pass --force to replace it")
        # The new dir is built beside `out`, so its nearest existing ancestor must be a writable
        # dir. (Under a regular file `out` does not "exist", and mkdir would fail late.)
        ancestor = _existing_ancestor(out)
    except PermissionError:  # a dir on the way that we may not even look into
        raise LlavaEdgeError(
            f"cannot create output dir {out}: permission denied; choose another output dir"
        ) from None
    if not ancestor.is_dir():
        raise LlavaEdgeError(
            f"cannot create output dir {out}: {ancestor} is a file, not a directory"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):  # also False on a read-only filesystem
        raise LlavaEdgeError(
            f"cannot create output dir {out}: {ancestor} is not writable; choose another output dir"
        )
    try:
        working = Path.cwd()
    except FileNotFoundError:  # the working directory was deleted: nothing there to spare
        working = None
    if working is not None and (out.resolve() == working or out.resolve() in working.parents):
        raise LlavaEdgeError(
            f"output dir {out} holds the working directory, which replacing it would pull out "
            "from under this command; choose another output dir, or run from outside it"
        )
    if keep is not None and keep.exists():
        source, target = keep.resolve(), out.resolve()
        if source == target or target in source.parents:
            raise LlavaEdgeError(
                f"output dir {out} holds {keep_name} {keep}, which replacing it would delete; "
                "choose another output dir"
            )
        if source.is_dir() and source in target.parents:
            raise LlavaEdgeError(
                f"output dir {out} is inside {keep_name} {keep}, which would then hold it; "
                "choose a dir outside it"
            )


MOUNTINFO = Path("/proc/self/mountinfo")  # Linux's table of this process's mounts


def is_mount_point(path: Path) -> bool:
    """Whether `path` (not a symlink to one) is where a filesystem is mounted. os.path.ismount
    compares devices, which a bind mount of a dir of the same disk shares with its parent (and
    a rename crosses it no more than another disk's): Linux's mount table names those."""
    if os.path.ismount(path):
        return True
    if os.path.islink(path):
        return False
    try:
        table = MOUNTINFO.read_bytes()
    except OSError:  # no /proc: not Linux
        return False
    real = os.fsencode(os.path.realpath(path))
    return any(
        len(fields) > 4 and _unescaped(fields[4]) == real  # the 5th field: the mount point
        for fields in (line.split(b" ") for line in table.splitlines())
    )


def _unescaped(field: bytes) -> bytes:
    """A path of the mount table, where space, tab, newline and backslash are written \\ooo."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)


def check_output_file(out: str | os.PathLike, flag: str) -> None:
    """Fail before any work if `out` cannot be written as a file (a result computed for
    minutes must not be lost to a typo in its path)."""
    out = Path(out)
    _check_name(out, f"{flag} {out}")
    if out.is_dir():
        raise LlavaEdgeError(f"{flag} {out} is a directory; give a file name")
    parent = _beside(out)
    if parent.exists() and not parent.is_dir():
        raise LlavaEdgeError(f"{flag} {out}: {parent} is a file, not a folder; choose another path")
    if not parent.is_dir():
        raise LlavaEdgeError(f"{flag} {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LlavaEdgeError(f"{flag} {out}: the folder {parent} is not writable")


# What _partial_dir and _install add to an output's name: `.NAME.partial-PID-XXXXXXXX`
PARTIAL_SUFFIX_BYTES = len(".partial-4194304-xxxxxxxx") + 1


def _check_name(out: Path, what: str) -> None:
    """Refuse, before any work, a name the writing would fail on late: one that is not UTF-8
    (onnx, tokenizers and safetensors take paths as UTF-8 text) or too long for its temporary
    twin beside it."""
    path = os.path.abspath(out)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise LlavaEdgeError(
            f"{what}: the path is not valid UTF-8 text; choose a UTF-8 name"
        ) from None
    try:
        limit = os.pathconf(_existing_ancestor(out), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    room = limit - PARTIAL_SUFFIX_BYTES
    if len(os.fsencode(out.name)) > room:
        raise LlavaEdgeError(
            f"{what}: the name is {len(os.fsencode(out.name))} bytes long, over the {room} this "
            "filesystem leaves it; choose a shorter name"
        )
    if any(len(os.fsencode(part)) > limit for part in Path(path).parts):
        raise LlavaEdgeError(f"{what}: a folder name on the path is too long; shorten it")


def _existing_ancestor(out: Path) -> Path:
    """The nearest dir above `out` that exists (under a regular file, that file)."""
    ancestor = _beside(out)
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


@contextlib.contextmanager
def replace_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary dir; if the block finishes, it becomes `out` (replacing it)."""
    tmp = _partial_dir(out, clean=True)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary dir
    try:
        try:
            yield tmp
        except Exception as e:
            if _disk_full(e):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from e
            raise
        _readable(tmp, 0o666 & ~umask)
        sync_tree(tmp)
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _disk_full(error: Exception) -> bool:
    """A full disk that a library reports in its own error type, the OS error only in its text
    (safetensors' writer: "No space left on device (os error 28)"), or as a short write without
    an errno (numpy's np.save: "36864 requested and 28640 written")."""
    if isinstance(error, OSError):
        short = re.fullmatch(r"\d+ requested and \d+ written", str(error))
        return error.errno is None and short is not None
    return f"(os error {errno.ENOSPC})" in str(error)


def disk_full(error: Exception, where: Path, needed: int) -> bool:
    """Whether `error`, raised writing under `where`, comes of a full disk: an OSError ENOSPC,
    one a library names only in its text (`_disk_full`), or torch.save's zip writer failing
    without a cause ("unexpected pos", "file write failed") where the disk has less than
    `needed` bytes free."""
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or _disk_full(error):
        return True
    if "PytorchStreamWriter" not in str(error) and "unexpected pos" not in str(error):
        return False  # not a write of torch's (its reader fails as inline_container.cc too)
    try:
        return shutil.disk_usage(_existing_ancestor(where / "_")).free < needed
    except OSError:
        return False


@contextlib.contextmanager
def scratch_beside(out: Path) -> Iterator[Path]:
    """For the block, Python's temporary files (the tempfile module, which onnxruntime's
    quantizer writes its graph-sized copies through) go to a hidden dir beside `out`.

    They then land on the disk that takes the output rather than in /tmp (a RAM-backed tmpfs on
    many Jetson images, a small partition on others), and what a killed run leaves there is
    removed by the next write of `out` with its other leftovers (`clean_leftovers`). The
    setting is process-wide while the block runs: the stages that use it are batch jobs.
    """
    scratch = _partial_dir(out)
    previous, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)


def _partial_dir(out: Path, clean: bool = False) -> Path:
    """A new hidden dir beside `out`, named as clean_leftovers finds it once its writer is
    gone (`.NAME.partial-PID-XXXX`); `clean`: clean up after killed writers first."""
    parent = _beside(out)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if clean:
            clean_leftovers(out)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise LlavaEdgeError(
            f"cannot write beside {out}: {e.strerror}; choose an output dir on a writable disk"
        ) from None


def final_path(path: Path) -> Path:
    """Where `path` will be once the replace_dir it is written in is installed: a dir named
    `.NAME.partial-PID-XXXX` becomes NAME (the path itself where no such dir holds it)."""
    parts = list(Path(path).parts)
    for i, part in enumerate(parts):
        name, dot, rest = part[1:].partition(".partial-")
        if part.startswith(".") and dot and rest.split("-", 1)[0].isdigit():
            parts[i] = name
    return Path(*parts)


@contextlib.contextmanager
def replace_file(out: Path, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """Yield a text file open for writing; if the block finishes, it is flushed to disk and
    renamed to `out` (replacing it)."""
    out = Path(out)
    try:
        _beside(out).mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent)
    except OSError as e:
        raise LlavaEdgeError(
            f"cannot write {out}: {e.strerror}; choose a path on a writable disk"
        ) from None
    tmp = Path(name)
    try:
        with open(fd, "w", encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes it private; the output is an ordinary file
        os.replace(tmp, out)
        fsync_path(_beside(out))  # the rename itself
    finally:
        tmp.unlink(missing_ok=True)


def _install(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with two renames; the old dir is put back if the second does not
    happen, and removed if it does."""
    parent = _beside(out)
    old = parent / f".{out.name}.old-{os.getpid()}"
    try:
        if os.path.lexists(out):  # a dangling symlink too
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:  # Ctrl-C may land as either rename returns
        if os.path.lexists(old):
            if os.path.lexists(out):
                _remove(old)  # the new dir is in
            else:
                os.replace(old, out)
        raise
    fsync_path(parent)  # the renames themselves
    _remove(old)


def _beside(out: Path) -> Path:
    """The dir `out` itself lies in, where its temporary and old dirs go. Not through a symlink
    at `out`: the link is replaced like any other entry (written through, the work would move to
    its target's filesystem, where no rename can reach the link)."""
    return Path(os.path.abspath(out)).parent


def _remove(path: Path) -> None:
    """Delete a file, a dir tree, or a symlink (not what it points at)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _readable(root: Path, mode: int) -> None:
    """Give files the umask's permissions where their writer made them private (onnx writes
    external data files 0600), so a model dir copied to a device or served to another user
    reads like any other dir."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                current = os.stat(path).st_mode & 0o7777
                if current | mode != current:
                    os.chmod(path, current | mode)


def sync_tree(root: Path) -> None:
    """fsync every file and dir under `root` (the dirs for their entries), deepest first."""
    for dirpath, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(dirpath)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file's data, or one dir's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_leftovers(out: Path) -> None:
    """Remove temporary dirs of killed writers; put back an old dir a killed install moved away."""
    for path in _beside(out).glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, rest = path.name[len(out.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(path, out)  # killed between the two renames: the old dir was complete
        else:
            _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Protobuf caps one message at 2 GiB (2,147,483,648 bytes). A graph whose weights exceed
# MAX_PROTOBUF bytes keeps them in `<file>.data` beside it (one file, not one per tensor as
# torch.onnx writes them), which onnxruntime and TensorRT both read; the margin below 2 GiB leaves
# room for the graph itself and whatever a later stage adds to it.
MAX_PROTOBUF = 1_800_000_000


def graph_bytes(path: Path) -> int:
    """Bytes of an ONNX file and its external data."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def is_large(path: Path) -> bool:
    """Whether a graph's weights are too big to live in its .onnx file."""
    return graph_bytes(path) > MAX_PROTOBUF


def save_graph(model: Any, path: Path) -> None:
    """Save an onnx.ModelProto as one .onnx file, with a `.data` file when its weights exceed
    MAX_PROTOBUF. Tensors already in external data (written by `stream_weights`) stay there."""
    import onnx

    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > MAX_PROTOBUF:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
