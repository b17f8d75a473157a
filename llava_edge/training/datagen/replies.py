"""The LLM's JSON replies, one schema per kind, turned into (question, answer) rounds.

    conversation  {"turns": [{"question": "...", "answer": "..."}, ...]}
    detail        {"description": "..."}
    reasoning     {"question": "...", "answer": "..."}

Other keys are ignored. A reply that does not fit its schema, was cut off at the token limit,
holds a lone surrogate (not UTF-8 text), writes LLaVA's `<image>` placeholder or copies raw
coordinates into an answer is dropped
(`Dropped`, with a short reason that reports count by and a detail that says where).
"""

from __future__ import annotations

import json
import re

from llava_edge.runtime.template import IMAGE_PLACEHOLDER
from llava_edge.training.data import is_utf8
from llava_edge.training.datagen.prompts import detail_question

# A run of 2-4 comma-separated numbers between 0 and 1, at least the first with decimals:
# "[0.412, 0.388, 0.705, 0.912]", "(0.41, 0.39)". Box coordinates, not prose numbers.
_COORDINATE_RUN = re.compile(
    r"(?<![\d.])(?:0?\.\d+|1\.0+)(?:\s*,\s*(?:0?\.\d+|1\.0+|[01])(?!\.?\d)){1,3}"
)
CUT_OFF = "cut off at the token limit"  # the one drop a rerun with a higher limit asks again
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


class Dropped(Exception):
    """A reply that gives no sample; `reason` is its category, `detail` the specifics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_reply(
    kind: str,
    content: str | None,
    finish_reason: str | None,
    coordinates: set[str],
    image: str,
    index: int,
) -> list[tuple[str, str]]:
    """The reply's (question, answer) rounds, or Dropped.

    coordinates: the numbers the image's boxes were shown with; any of them in an answer, or a
    run of box-like numbers, means the LLM leaked the boxes instead of describing the image.
    """
    if finish_reason == "length":
        raise Dropped(CUT_OFF, "raise --max-tokens")
    if content is None or not content.strip():
        raise Dropped("empty reply")
    text = content.strip()
    fenced = _FENCE.match(text)  # some servers wrap JSON in a Markdown block despite json mode
    if fenced:
        text = fenced.group(1).strip()
    try:
        reply = json.loads(text)
    except json.JSONDecodeError as e:
        raise Dropped("not JSON", f"{e.msg} at character {e.pos}") from None
    except RecursionError:  # a reply stuck repeating "[": too deep for Python's parser
        raise Dropped("not JSON", "nested too deeply") from None
    if not isinstance(reply, dict):
        raise Dropped("wrong schema", f"a JSON {type(reply).__name__}, not an object")
    if kind == "conversation":
        turns = reply.get("turns")
        if not isinstance(turns, list) or not turns:
            raise Dropped("wrong schema", "no 'turns' list")
        rounds = [_pair(turn, f"turn {i}") for i, turn in enumerate(turns)]
    elif kind == "detail":
        rounds = [(detail_question(image, index), _text(reply, "description", "the reply"))]
    elif kind == "reasoning":
        rounds = [_pair(reply, "the reply")]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    for i, (question, answer) in enumerate(rounds):
        if not is_utf8(question) or not is_utf8(answer):
            # half of a UTF-16 pair (an emoji split in two): no UTF-8 file can hold it
            raise Dropped("not UTF-8 text", f"round {i} holds a lone surrogate")
        if IMAGE_PLACEHOLDER in question or IMAGE_PLACEHOLDER in answer:
            # the sample puts it in its first question once; another one and training refuses
            # the sample (and `data mix` the file)
            raise Dropped("the image placeholder in the text", f"round {i}")
        leak = leaked_coordinates(answer, coordinates)
        if leak:
            raise Dropped("raw coordinates in an answer", f"answer {i}: {leak!r}")
    return rounds


def leaked_coordinates(text: str, coordinates: set[str]) -> str | None:
    """The first box coordinate the text shows, or None."""
    run = _COORDINATE_RUN.search(text)
    if run:
        return run.group(0)
    for number in re.findall(r"(?<![\d.])\d*\.\d+(?!\.?\d)", text):
        if number in coordinates or f"0{number}" in coordinates:
            return number
    return None


def _pair(value: object, where: str) -> tuple[str, str]:
    if not isinstance(value, dict):
        raise Dropped("wrong schema", f"{where} is not an object")
    return _text(value, "question", where), _text(value, "answer", where)


def _text(value: dict, key: str, where: str) -> str:
    text = value.get(key)
    if not isinstance(text, str) or not text.strip():
        raise Dropped("wrong schema", f"{where} has no text '{key}'")
    return text.strip()
