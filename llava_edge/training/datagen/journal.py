"""The record of a `generate` run that makes it resumable.

One JSON line per settled sample, keyed by (image, kind, index): its LLaVA sample, or why its
reply was dropped, and the tokens it cost; a later line of the same key supersedes an earlier one
(a sample asked again because its image's labels changed). A line is written whole and synced before the next
one; a run killed in the middle of a line leaves a torn last line, which the next run cuts off
(that sample is asked again). The first line holds the settings that change what the LLM
writes (model, prompts, temperature, seed): a journal is only resumed with the same. The token
limit may change between runs (a reply cut off at a lower one is asked again): each entry
records its own, and one journaled without it was asked at the header's.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any

from llava_edge.errors import LlavaEdgeError

Key = tuple[str, str, int]  # image, kind, index
_HEADER = "llava-edge data generate journal"
PER_ENTRY = ("max_tokens",)  # settings a resumed run may change: each entry records its own


def key_of(entry: dict) -> Key:
    return entry["image"], entry["kind"], int(entry["index"])


class Journal:
    """Settled samples by key; `append` adds one for good."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.entries: dict[Key, dict] = {}  # the last entry of each key
        self.usage = [0, 0]  # prompt and completion tokens of every entry, superseded ones too
        self.header: dict[str, Any] = dict(settings)  # the settings of the journal's first run
        self._file: IO[str] | None = None
        self._open(settings)

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def append(self, entry: dict) -> None:
        assert self._file is not None
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a dropped reply holding a lone surrogate: escape it
            line = json.dumps(entry) + "\n"
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._add(entry)

    def _add(self, entry: dict) -> None:
        for name in PER_ENTRY:
            entry.setdefault(name, self.header.get(name))
        self.entries[key_of(entry)] = entry
        prompt, completion = entry.get("usage", [0, 0])
        self.usage = [self.usage[0] + prompt, self.usage[1] + completion]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, settings: dict[str, Any]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (kept open)
        except OSError as e:
            raise LlavaEdgeError(f"cannot write the journal {self.path}: {e.strerror}") from None
        try:
            _lock(self._file, self.path)
            self._file.seek(0)
            try:
                text = self._file.read()
            except UnicodeDecodeError:  # a picture or other binary file: a journal is UTF-8
                raise _not_a_journal(self.path) from None
            lines = _lines(text)
            if lines and ("\n" in text or not text.startswith('{"journal"')):
                _check_header(self.path, lines[0], settings)  # before anything is cut off
            if text and not text.endswith("\n"):  # killed mid-line: that sample is asked again
                text = text[: text.rfind("\n") + 1]
                self._file.truncate(len(text.encode("utf-8")))
                lines = _lines(text)
            if not lines:
                self._file.write(json.dumps({"journal": _HEADER, "settings": settings}) + "\n")
                self._file.flush()
                return
            self.header = json.loads(lines[0])["settings"]
            for number, line in enumerate(lines[1:], 2):
                try:
                    self._add(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    raise LlavaEdgeError(
                        f"journal {self.path} line {number} is damaged; delete the journal to "
                        "start over"
                    ) from None
        except BaseException:
            self.close()
            raise


def check_settings(path: Path, settings: dict[str, Any]) -> None:
    """Refuse, as a run would, settings that the journal at `path` (if any) was not written
    with; read without opening it for writing (a dry run)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        return
    if first.endswith("\n") or (first and not first.startswith('{"journal"')):
        _check_header(Path(path), first, settings)  # a torn header is cut off by the run


def _check_header(path: Path, line: str, settings: dict[str, Any]) -> None:
    try:
        header = json.loads(line)
        ok = header.get("journal") == _HEADER
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise _not_a_journal(path)
    old = header.get("settings")
    if not isinstance(old, dict):
        raise LlavaEdgeError(f"journal {path} line 1 is damaged; delete the journal to start over")
    if "prompts" in settings and old.get("prompts") != settings["prompts"]:
        # not an option: the prompts of another version of llava-edge
        raise LlavaEdgeError(
            f"journal {path} was written with the prompts of another llava-edge version; finish "
            "it with that version, or start over: delete it, or pass another --journal"
        )
    for name, value in settings.items():
        if name not in PER_ENTRY and old.get(name) != value:
            raise LlavaEdgeError(
                f"journal {path} was written with {name} {old.get(name)!r}, not "
                f"{value!r}; resume with the same settings, or delete the journal to start over"
            )


def _not_a_journal(path: Path) -> LlavaEdgeError:
    return LlavaEdgeError(
        f"{path} is not a journal of `llava-edge data generate`; choose another --journal "
        "(or --out)"
    )


def _lines(text: str) -> list[str]:
    """The journal's lines: split at "\n" only. A reply may hold U+2028 or U+0085, which JSON
    keeps as they are and str.splitlines would split at."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def settled_entries(path: Path) -> dict[Key, dict]:
    """The last entry of each key a journal holds, read without opening the journal for writing
    (a dry run's count); a torn last line and anything unreadable count as nothing."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")[:-1]
    except OSError:
        return {}
    header: dict = {}
    with contextlib.suppress(ValueError, TypeError, AttributeError, IndexError):
        header = dict(json.loads(lines[0])["settings"])
    settled = {}
    for line in lines[1:]:
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            entry = json.loads(line)
            for name in PER_ENTRY:
                entry.setdefault(name, header.get(name))
            settled[key_of(entry)] = entry
    return settled


def _lock(file: IO[str], path: Path) -> None:
    """One run per journal: two appending at once would ask and write samples twice."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run at a time is up to the user
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise LlavaEdgeError(
            f"another `llava-edge data generate` is writing {path}; wait for it or stop it"
        ) from None
