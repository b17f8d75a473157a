"""Load graphs fast the second time: onnxruntime's optimized graphs, weights pre-packed, on disk.

Opening a session does the same work on every start: parse the graph, optimize it, copy every
weight out of the protobuf and re-pack the MatMul weights into the CPU kernels' layout. The first
load of a graph on a machine saves what comes out (the optimized graph, with its weights and the
pre-packed copies in an external data file that later loads memory-map) under the user cache dir;
later loads open that with optimizations off.

An entry is keyed by everything that shapes it: the graph's sha256 (from the manifest; with its
`.data` file's where its weights are there, as the `.onnx` alone is then one shape's), the
onnxruntime version and build, the execution providers and the session options that change the
result, and the CPU (pre-packed layouts depend on its instruction set). It is written beside its final
place and renamed in (llava_edge.files.replace_dir), so a reader never sees half an entry; an
entry whose files are missing, of the wrong size or unreadable by onnxruntime is deleted and
rebuilt. Entries of one graph under other onnxruntime versions stay (two venvs on one robot
share the cache, and would otherwise rebuild every graph on each switch), but every load drops the
entries nothing can use any more: one of a graph since replaced at its path (a re-export), one
whose graph is gone (a deleted model dir), and one no load has opened for MAX_AGE_DAYS (an
onnxruntime no longer installed). An entry records the graph's final path beside the one it was
opened from: one written while `quantize` or `export` checks a dir in its temporary place belongs
to the dir once it is installed. Only CPU sessions are cached: GPU providers keep their own
caches (the TensorRT provider's engines).

The cache costs disk: about twice the graph's weights (the weights and their pre-packed copies);
and the load that writes an entry holds a second copy of the weights in memory meanwhile, so it
is only written when twice the graph fits in free memory (within the process's cgroup limit: a
container's --memory) and on the disk with a tenth of it left free (else the load is a plain
one), and by one process at a time: while one writes, the others (a robot's processes starting
at once) load plain rather than each hold and write another copy.
`LLAVA_EDGE_SESSION_CACHE=0` (or false, no, off) turns it off, as does `session_cache=False` on the backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort

from llava_edge.files import clean_leftovers, final_path, replace_dir
from llava_edge.manifest import cache_dir

CACHE_FORMAT = 1
MODEL = "model.onnx"
DATA = "model.onnx.data"
META = "entry.json"
# Held (flock) by the one process writing an entry: the checks of free memory and disk hold for
# one writer, not for several processes of a robot that start at once and each write.
WRITER_LOCK = ".writing"
# onnxruntime 1.28 to 1.31 read pre-packed MatMulNBits weights (int4) back wrongly from an entry:
# every answer of a cached load is NaN. Their entries hold the optimized graph without them.
PREPACKED_UNREADABLE = ((1, 28), (1, 31))
# An entry no load has opened for this long is deleted; a load marks its entry used at most
# once a day (the mtime of its META), so a hit costs no disk write.
MAX_AGE_DAYS = 30
DAY_S = 86400


def enabled() -> bool:
    value = os.environ.get("LLAVA_EDGE_SESSION_CACHE", "1").strip().lower()
    return value not in ("0", "false", "no", "off", "")


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def cache_key(graph_sha256: str, providers: list[str]) -> str:
    """What the optimized graph depends on, hashed."""
    facts = {
        "format": CACHE_FORMAT,
        "graph": graph_sha256,
        "onnxruntime": ort.__version__,
        # one version built twice (PyPI's wheel, a Jetson's) may optimize differently
        "build": getattr(ort, "get_build_info", str)(),
        "providers": providers,
        "optimization": "ORT_ENABLE_ALL",
        "prepacked": saves_prepacked(),
        "machine": platform.machine(),
        "cpu_flags": cpu_flags(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def is_cached(graph_sha256: str, root: Path | None = None) -> bool:
    """Whether a CPU session of this graph would load from a complete entry (writing none)."""
    root = root or _root()
    return root is not None and _complete(root / cache_key(graph_sha256, ["CPUExecutionProvider"]))


def open_cached(
    path: Path,
    graph_sha256: str,
    threads: int | None,
    root: Path | None = None,
) -> tuple[ort.InferenceSession, str]:
    """A CPU session of `path`, through the cache; and how: 'hit', 'miss' (written) or 'off'
    (the cache dir cannot be written, or another process is writing an entry: a plain load)."""
    root = root or _root()
    if root is None:  # no cache dir on this machine (no home directory)
        return plain_session(path, threads), "off"
    entry = root / cache_key(graph_sha256, ["CPUExecutionProvider"])
    source = str(final_path(path.resolve()))
    _drop_stale(root, entry, source, graph_sha256)
    session = _open_entry(entry, threads)
    if session is not None:
        return session, "hit"
    with _sole_writer(root) as writing:
        if writing:
            # Another process may have written the entry before this one took the lock.
            session = _open_entry(entry, threads)
            if session is not None:
                return session, "hit"
            if _room_to_save(path, root):
                return _write_entry(path, entry, threads, graph_sha256, source)
    return plain_session(path, threads), "off"


def _write_entry(
    path: Path, entry: Path, threads: int | None, graph_sha256: str, source: str
) -> tuple[ort.InferenceSession, str]:
    """A session of `path` that saves `entry` as it opens ('miss'); 'off' where saving failed."""
    session = None
    try:
        with replace_dir(entry) as tmp:
            session = ort.InferenceSession(
                str(path), _saving(threads, tmp), providers=["CPUExecutionProvider"]
            )
            files = {name: (tmp / name).stat().st_size for name in (MODEL, DATA)}
            meta = {"source": source, "opened": str(path.resolve()), "graph": graph_sha256}
            (tmp / META).write_text(json.dumps({**meta, "files": files}))
    except Exception:  # no room, a read-only home: the session still loads, uncached
        # Where only saving failed (the disk filled) the session is whole: a second load would
        # hold the weights twice meanwhile.
        return session or plain_session(path, threads), "off"
    return session, "miss"


def _open_entry(entry: Path, threads: int | None) -> ort.InferenceSession | None:
    """A session of a complete entry; None where there is none (a corrupt one is deleted)."""
    if not _complete(entry):
        return None
    options = session_options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(
            str(entry / MODEL), options, providers=["CPUExecutionProvider"]
        )
    except Exception:  # onnxruntime's own untyped errors: a corrupt entry is rebuilt
        shutil.rmtree(entry, ignore_errors=True)
        return None
    _mark_used(entry)
    return session


@contextlib.contextmanager
def _sole_writer(root: Path) -> Iterator[bool]:
    """Whether this process may write an entry: True while it holds the cache's writer lock;
    False where another process holds it (that one writes; this one loads uncached rather than
    wait for it) or the cache dir cannot be written."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / WRITER_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:  # a read-only cache: nothing could be written there
        yield False
        return
    try:
        yield _lock(fd)
    finally:
        os.close(fd)  # and with it the lock


def _lock(fd: int) -> bool:
    """Take an exclusive lock on `fd` without waiting; False where another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the writer writes as if alone
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks (some network shares): as if alone
        pass
    return True


def _root() -> Path | None:
    found = cache_dir()
    return found / "onnxruntime" if found else None


def plain_session(path: Path, threads: int | None) -> ort.InferenceSession:
    """A session opened as if there were no cache."""
    return ort.InferenceSession(
        str(path), session_options(threads), providers=["CPUExecutionProvider"]
    )


def _room_to_save(path: Path, root: Path) -> bool:
    """Saving holds a second copy of the weights in memory while it writes them (measured on
    `small`: peak 2.8 GB against 1.6 GB for a plain load): only when that fits in free memory.
    The entry (about twice the weights) must also leave a tenth of the cache's disk free: a
    cache is not worth a full disk under the robot's logs and recordings."""
    data = Path(str(path) + ".data")
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return 2 * size < _free_memory() and 2 * size < _free_disk(root)


def _free_memory() -> float:
    """Free memory, within what this process's cgroups let it take."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        free = math.inf
    return min(free, _cgroup_free())


PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_MOUNT = Path("/sys/fs/cgroup")
# Per cgroup version: the memory controller's dir under the mount, its limit, what the cgroup holds
CGROUP_FILES = {
    2: ("", "memory.max", "memory.current"),
    1: ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
}


def _cgroup_free() -> float:
    """What the cgroups this process is in (a container's --memory, a systemd unit's MemoryMax=)
    let it take beside what they hold: past it the kernel kills the process, however much the
    machine has free. The tightest of its cgroup and those above that this process can see (in a
    container, its own cgroup is the mount's root); inf where none sets a limit. What a cgroup
    holds includes page cache the kernel could drop: counted as held, the cache waits for room
    rather than count on the kernel dropping it in time."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:  # not Linux
        return math.inf
    free = math.inf
    for fields in (line.split(":", 2) for line in lines):
        if len(fields) != 3:  # not the kernel's id:controllers:path (a sandbox's own table)
            continue
        _, controllers, path = fields
        version = 2 if not controllers else 1 if "memory" in controllers.split(",") else None
        if version is None:
            continue
        sub, limit_name, usage_name = CGROUP_FILES[version]
        mount = CGROUP_MOUNT / sub
        here = mount / path.lstrip("/")
        for cgroup in [here, *(p for p in here.parents if p.is_relative_to(mount))]:
            free = min(free, _cgroup_room(cgroup / limit_name, cgroup / usage_name))
    return free


def _cgroup_room(limit_file: Path, usage_file: Path) -> float:
    """One cgroup's limit less what it holds; inf where it sets none ("max") or is not there."""
    try:
        limit = limit_file.read_text().strip()
        usage = int(usage_file.read_text())
    except (OSError, ValueError):  # another cgroup version's layout, or not visible here
        return math.inf
    return int(limit) - usage if limit.isdigit() else math.inf


def _free_disk(root: Path) -> float:
    """Bytes the cache may take on its disk: what is free beyond a tenth of the disk."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        usage = shutil.disk_usage(existing)
    except OSError:
        return 0
    return usage.free - usage.total / 10


def _saving(threads: int | None, out: Path) -> ort.SessionOptions:
    options = session_options(threads)
    options.optimized_model_filepath = str(out / MODEL)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", DATA
    )
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    # The pre-packed weights go into the data file too: loading them is what the cache saves.
    if saves_prepacked():
        options.add_session_config_entry(
            "session.save_external_prepacked_constant_initializers", "1"
        )
    return options


def saves_prepacked() -> bool:
    """Whether this onnxruntime's entries hold the pre-packed weights (PREPACKED_UNREADABLE)."""
    from llava_edge.runtime.onnx_backend import onnxruntime_version

    low, high = PREPACKED_UNREADABLE
    return not low <= onnxruntime_version() <= high


def _complete(entry: Path) -> bool:
    """Every file there, of the size written: a truncated or half-deleted entry is not used."""
    try:
        meta = json.loads((entry / META).read_text())
        return all((entry / n).stat().st_size == size for n, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        return False


def _drop_stale(root: Path, keep: Path, source: str, graph_sha256: str) -> None:
    """Delete the entries no load can use: of the graph at `source` before it was replaced (another
    sha256; an entry that records none, from an older llava-edge, ages out instead), of a graph
    that is gone (neither path recorded exists: a deleted model dir), or unused for MAX_AGE_DAYS.
    Entries of this graph under other keys (another onnxruntime, another CPU) stay. What a
    killed writer left (about twice a graph's weights) goes too: else only a load writing that
    same entry would remove it, and where the leftover itself leaves no room for one, none does.
    Only while no process writes: the PID a leftover is named by means nothing to a process in
    another PID namespace (a container sharing the cache), to which a live writer may look dead."""
    leftovers = list(root.glob(".*.*-*"))  # `.KEY.partial-PID-X`, `.KEY.old-PID`
    if leftovers:
        with _sole_writer(root) as writing:
            for leftover in leftovers if writing else []:
                # a read-only cache holds none that could be removed, nor takes new entries
                with contextlib.suppress(OSError):
                    clean_leftovers(root / leftover.name[1:].split(".", 1)[0])
    too_old = time.time() - MAX_AGE_DAYS * DAY_S
    for meta in root.glob(f"*/{META}"):
        if meta.parent == keep:
            continue
        try:
            facts = json.loads(meta.read_text())
            recorded = [facts.get("source"), facts.get("opened")]
            graph = facts.get("graph")
            unused = meta.stat().st_mtime < too_old
        except (OSError, ValueError, AttributeError):
            continue
        paths = [Path(p) for p in recorded if isinstance(p, str)]
        replaced = recorded[0] == source and graph is not None and graph != graph_sha256
        if replaced or unused or not any(_may_exist(p) for p in paths):
            shutil.rmtree(meta.parent, ignore_errors=True)


def _may_exist(path: Path) -> bool:
    """Whether `path` may exist. One this user may not look into (in a cache that services of
    several users share, another user's private model dir) counts as there: its entry is theirs."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    # PermissionError: pathlib's exists() raises it up to Python 3.13 and says False from 3.14
    except OSError:
        return True
    return True


def _mark_used(entry: Path) -> None:
    """Keep a loaded entry from ageing out (at most one write a day; a read-only cache is fine)."""
    try:
        if (entry / META).stat().st_mtime < time.time() - DAY_S:
            os.utime(entry / META)
    except OSError:
        pass


def cpu_flags() -> str:
    """A short hash of this CPU's feature flags: what is packed or compiled for one CPU may not
    run, or not run as fast, on another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor()
