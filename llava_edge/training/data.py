"""LLaVA-format training data, read lazily.

A data file is LLaVA's JSON (a list of `{id, image, conversations: [{from, value}, ...]}`) or
JSONL (one such object a line). LLaVA-1.5's mix has 665k samples: only each sample's byte offset
and length are kept in memory, and a sample is parsed again when the trainer asks for it.

Every sample is checked once before training starts (shape, roles, the `<image>` placeholder,
the image file), so a bad sample stops the run at the start with its id instead of hours in.
"""

from __future__ import annotations

import codecs
import json
import os
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime.template import IMAGE_PLACEHOLDER

HUMAN, GPT = "human", "gpt"
_CHUNK = 1 << 22  # bytes read at a time while indexing a JSON array
_MAX_SAMPLE_BYTES = 1 << 26  # a "sample" this large means the JSON is broken, not long


class BadSample(LlavaEdgeError):
    """A sample that cannot be trained on; the message starts with its id."""

    def __init__(self, sample_id: str, problem: str):
        super().__init__(f"sample {sample_id}: {problem}")
        self.sample_id = sample_id
        self.problem = problem


@dataclass(frozen=True)
class Sample:
    """One conversation, normalised: the image placeholder is taken out of the first question
    (the chat template puts the image back where the template wants it, as LLaVA does)."""

    id: str
    image: str | None  # path relative to the image root (or absolute), None for text-only
    turns: list[tuple[str, str]]  # (question, answer) rounds
    # The conversation opened with a gpt turn, left out as LLaVA's preprocess leaves it out
    # ("Skip the first one if it is not from human"): training counts such samples.
    dropped_first_turn: bool = False


def parse_sample(record: Any, position: int) -> Sample:
    """Check one record's shape and turn it into a Sample; BadSample names what is wrong."""
    if not isinstance(record, dict):
        raise BadSample(f"#{position}", f"is a JSON {type(record).__name__}, not an object")
    given = record.get("id")
    # a null or empty id (as a dataframe's missing values are written) names no sample
    sample_id = f"#{position}" if given is None or given == "" else str(given)
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadSample(sample_id, "has no 'conversations' list")
    image = record.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]  # multi-image data's form of one picture
    if image is not None and not (isinstance(image, str) and image):
        raise BadSample(sample_id, "'image' must be one file name (one image per sample)")
    # Turns are named by their place in the file, the dropped one included.
    dropped_first_turn = isinstance(conversations[0], dict) and conversations[0].get("from") == GPT
    skip = int(dropped_first_turn)
    if len(conversations) == skip:
        raise BadSample(sample_id, "has only a gpt turn, no question to answer")
    values = []
    for i, turn in enumerate(conversations[skip:], start=skip):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample(sample_id, f"turn {i} is not an object with a text 'value'")
        expected = HUMAN if (i - skip) % 2 == 0 else GPT
        if turn.get("from") != expected:
            raise BadSample(
                sample_id,
                f"the conversation does not alternate human/gpt: turn {i} is from "
                f"{turn.get('from')!r}, expected {expected!r}",
            )
        if not is_utf8(turn["value"]):  # a "\ud83d" escape: half of an emoji's UTF-16 pair
            raise BadSample(
                sample_id, f"turn {i} holds half of a UTF-16 pair (a lone surrogate); fix the text"
            )
        values.append(turn["value"])
    if len(values) % 2:
        raise BadSample(sample_id, "the conversation ends with a human turn that has no answer")
    for i in range(1, len(values), 2):
        if not values[i].strip():  # trained on, the model would learn to answer nothing
            raise BadSample(
                sample_id, f"turn {i + skip}, a gpt answer, is empty; write it or drop it"
            )
    placeholders = [v.count(IMAGE_PLACEHOLDER) for v in values]
    if image is None and any(placeholders):
        raise BadSample(sample_id, f"mentions {IMAGE_PLACEHOLDER} but has no 'image'")
    if image is not None and (placeholders[0] != 1 or sum(placeholders) != 1):
        raise BadSample(
            sample_id,
            f"has an image, so its first human turn must hold {IMAGE_PLACEHOLDER} once "
            "(and no other turn may)",
        )
    first = values[0].replace(IMAGE_PLACEHOLDER, "").strip() if image is not None else values[0]
    questions = [first, *values[2::2]]
    turns = list(zip(questions, values[1::2], strict=True))
    return Sample(sample_id, image, turns, dropped_first_turn)


def is_utf8(text: str) -> bool:
    """False for text holding a lone surrogate ("\ud83d": half of an emoji's UTF-16 pair, as JSON
    escapes may write), which no UTF-8 file or request can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_image_dir(root: Path | None) -> None:
    if root is None or root.is_dir():
        return
    if root.exists():
        raise LlavaEdgeError(f"image dir {root} is a file; give the dir the images are in")
    raise LlavaEdgeError(f"image dir {root} does not exist")


def image_path(sample: Sample, root: Path | None) -> Path:
    """Where a sample's image is: an absolute path as it is, else under the image dir."""
    path = Path(sample.image)
    if path.is_absolute():
        return path
    if root is None:
        raise BadSample(sample.id, "has an image but no image dir was given (--images DIR)")
    return root / path


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class SampleFile:
    """Random access to the records of a LLaVA JSON or JSONL file without holding them.

    The file is scanned once to find where each record starts and ends (with the C JSON decoder,
    record by record); `record(i)` then seeks and parses only that one. The stdlib has no lazy
    JSON-array reader and the streaming libraries give no byte offsets, hence this small index.
    """

    def __init__(
        self,
        path: str | Path,
        keep: Callable[[int, Any], bool] | None = None,
        progress: bool = False,
        limit: int | None = None,
    ):
        """Index the file; `keep(position, record)` may drop records (it sees each one once).
        limit: stop once that many records are kept, reading no further (a quick look at a
        large file)."""
        from tqdm.auto import tqdm

        self.path = Path(path)
        if self.path.is_dir():
            raise LlavaEdgeError(
                f"data file {self.path} is a directory; give a LLaVA JSON or JSONL file"
            )
        if not self.path.exists():
            raise LlavaEdgeError(f"data file {self.path} does not exist")
        if not self.path.is_file():  # read twice (indexed, then by record): a pipe gives it once
            raise LlavaEdgeError(
                f"data file {self.path} is not a file (a pipe, as <(...) gives?); save the data "
                "to a file and pass that"
            )
        self._handle = None
        self._pid = None
        self._stamp = _stamp(self.path.stat())  # the file as indexed: offsets hold for it alone
        offsets, lengths, positions = array("q"), array("q"), array("q")  # 8 bytes a sample
        done = 0
        with tqdm(
            total=self.path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"checking {self.path.name}",
            disable=not progress,
        ) as bar:
            for position, (offset, length, record) in enumerate(self.scan()):
                bar.update(offset + length - done)
                done = offset + length
                if keep is None or keep(position, record):
                    offsets.append(offset)
                    lengths.append(length)
                    positions.append(position)
                    if len(offsets) == limit:
                        break
            bar.update(bar.total - done)  # the closing bracket and blank lines
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.lengths = np.frombuffer(lengths, dtype=np.int64)
        self.positions = np.frombuffer(positions, dtype=np.int64)  # where each kept record was
        self._check_unchanged(self.path.stat())

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, index: int) -> Any:
        """The index-th kept record, parsed from the file again."""
        if self._handle is None or self._pid != os.getpid():  # one handle per loader worker
            self._handle = open(self.path, "rb")  # noqa: SIM115 (kept open for random access)
            self._pid = os.getpid()
        self._check_unchanged(os.fstat(self._handle.fileno()))
        self._handle.seek(int(self.offsets[index]))
        return json.loads(self._handle.read(int(self.lengths[index])))

    def _check_unchanged(self, stat: os.stat_result) -> None:
        """The byte offsets are the indexed file's: read from an edited one (a sample written
        over, a line added) they would cut records apart, or give another sample."""
        if _stamp(stat) != self._stamp:
            raise LlavaEdgeError(
                f"data file {self.path} changed after it was checked (its samples are read "
                "from it as training runs); leave it as it is until the run ends, or train on "
                "a copy"
            )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": None}

    def scan(self) -> Iterator[tuple[int, int, Any]]:
        """Yield (byte offset, byte length, parsed record) for every record, in file order."""
        with open(self.path, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(codecs.BOM_UTF8):
            head = head[len(codecs.BOM_UTF8) :].lstrip()
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\0" in head[:4]:
            # what PowerShell 5's Out-File and Notepad's "Unicode" write
            raise LlavaEdgeError(
                f"{self.path} is UTF-16 (or UTF-32) text; JSON is UTF-8: save it as UTF-8"
            )
        if head.startswith(b"["):
            yield from self._scan_array()
        elif head.startswith(b"{"):
            if self.path.suffix != ".jsonl" and self._one_line_object():
                self._reject_single_object()
            yield from self._scan_lines()
        elif not head:
            raise LlavaEdgeError(f"data file {self.path} is empty")
        else:
            raise LlavaEdgeError(
                f"{self.path} is neither a JSON list of samples nor JSONL (one sample object a line)"
            )

    def _scan_lines(self) -> Iterator[tuple[int, int, Any]]:
        offset = 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                stripped = line.strip()
                if stripped:
                    try:
                        record = json.loads(stripped)
                    except UnicodeDecodeError as e:  # what a tool writing Latin-1 leaves
                        raise LlavaEdgeError(
                            f"{self.path}, line {number} is not UTF-8 text (byte "
                            f"0x{e.object[e.start]:02x}: {e.reason}); JSON is UTF-8: save it as "
                            "UTF-8"
                        ) from None
                    except json.JSONDecodeError as e:
                        if number == 1 and stripped.startswith(b"{"):
                            self._reject_single_object()
                        raise LlavaEdgeError(
                            f"{self.path}, line {number}: not valid JSON ({e}); JSONL holds one "
                            "sample object a line"
                        ) from None
                    if number == 1 and not isinstance(record, dict):
                        raise LlavaEdgeError(f"{self.path}, line 1 is not a JSON object")
                    yield offset, len(line), record
                offset += len(line)

    def _one_line_object(self) -> bool:
        """A .json file of one line holding an object (JSONL would have more lines)."""
        with open(self.path, "rb") as f:
            f.readline()
            return not any(line.strip() for line in f)

    def _reject_single_object(self) -> None:
        """One JSON object, however laid out: the wrong shape, not broken JSONL."""
        if self.path.stat().st_size > _MAX_SAMPLE_BYTES:
            return  # too big to parse whole just for a better message
        try:
            json.loads(self.path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        raise LlavaEdgeError(
            f"{self.path} holds one JSON object; LLaVA data is a list of samples "
            "[{id, image, conversations}, ...] or JSONL (one sample a line)"
        )

    def _scan_array(self) -> Iterator[tuple[int, int, Any]]:
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8")()
        with open(self.path, "rb") as f:
            bom = f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8
            f.seek(len(codecs.BOM_UTF8) if bom else 0)
            # `text[pos]` is the next character to read; `at` is its byte offset in the file and
            # `line` its line; `index` counts the samples read.
            text, pos, at, eof = "", 0, f.tell(), False
            line, index = 1, 0

            def more() -> bool:
                nonlocal text, pos, eof
                if eof:
                    return False
                data = f.read(_CHUNK)
                eof = not data
                if pos > _CHUNK:  # drop what was consumed
                    text, pos = text[pos:], 0
                try:
                    text += utf8.decode(data, final=eof)
                except UnicodeDecodeError as e:
                    raise LlavaEdgeError(
                        f"{self.path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}: "
                        f"{e.reason}); JSON is UTF-8: save it as UTF-8"
                    ) from None
                return True

            def skip_space() -> str:
                nonlocal pos, at, line
                while True:
                    while pos < len(text) and text[pos] in " \t\r\n":  # JSON space is ASCII
                        line += text[pos] == "\n"
                        pos += 1
                        at += 1
                    if pos < len(text):
                        return text[pos]
                    if not more():
                        return ""

            def fail(what: str) -> LlavaEdgeError:
                return LlavaEdgeError(
                    f"{self.path}, line {line}: {what} at byte {at}; the file is not valid JSON"
                )

            def broken(error: json.JSONDecodeError | None) -> LlavaEdgeError:
                if text.startswith("]", pos):
                    return fail(f"a ',' after sample #{index - 1} with no sample following it")
                if error is None:
                    return fail(f"sample #{index} is not valid JSON")
                where = line + text.count("\n", pos, error.pos)
                return LlavaEdgeError(
                    f"{self.path}, line {where}: sample #{index} (from byte {at}) is not valid "
                    f"JSON ({error.msg}); the file is not valid JSON"
                )

            def close() -> None:
                nonlocal pos, at
                pos += 1
                at += 1
                if skip_space():  # json.load refuses it too ("Extra data")
                    raise LlavaEdgeError(
                        f"{self.path}: more data after the list's closing ']' at byte {at}; two "
                        "lists one after another? `llava-edge data mix` joins LLaVA files"
                    )

            more()
            if skip_space() != "[":
                raise fail("expected '['")
            pos += 1
            at += 1
            if skip_space() == "]":
                close()
                return
            while True:
                skip_space()
                error = None
                while True:
                    try:
                        record, end = decoder.raw_decode(text, pos)
                        if end < len(text) or eof:
                            break
                    except json.JSONDecodeError as e:
                        error = e
                        if len(text) - pos > _MAX_SAMPLE_BYTES:
                            raise broken(error) from None
                    if not more():  # the sample may go on in the next chunk
                        raise broken(error)
                length = len(text[pos:end].encode("utf-8"))
                yield at, length, record
                line += text.count("\n", pos, end)
                pos, at, index = end, at + length, index + 1
                sep = skip_space()
                if sep == "]":
                    close()
                    return
                if not sep:
                    raise fail(f"the file ends after sample #{index - 1}, before the list's ']'")
                if sep != ",":
                    raise fail(f"expected ',' or ']' after sample #{index - 1}")
                pos += 1
                at += 1
