"""An answer as it is decoded: text pieces released as soon as they are safe, stop strings, the
finish reason and timings. One request's text, whether it runs alone (Pipeline.stream) or in a
batch (runtime/batching.py), goes through `AnswerText`, so both cut and stream it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llava_edge.runtime.generate import Timer
from llava_edge.runtime.tokenizer import TextCodec


@dataclass
class Answer:
    """Everything about one answer: its text, the ids in and out, why it stopped, and timings."""

    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "eos", "length" or "stop"
    timings: dict[str, float] = field(default_factory=dict)


class AnswerText:
    """Turns an answer's tokens into text pieces, each whole UTF-8 characters.

    A piece is held back while it could still be the start of a stop string, so a stop string
    never reaches the reader; `stopped` turns True when one appears, and the text is cut there.
    """

    def __init__(self, codec: TextCodec, stop: list[str]):
        self.decoder = codec.stream()
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # the longest a start can be
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that may be shown now ('' if none)."""
        self.text += self.decoder.push(token)
        cut, stopped = cut_at_stop(self.text, self.stop)
        if stopped:
            self.text, self.stopped = cut, True
            return self._release(len(cut))
        return self._release(len(self.text) - self._held())

    def _held(self) -> int:
        """How many of the text's last characters could begin a stop string: the longest such
        end, not the longest stop string's length, so that an answer's text reaches the reader
        as soon as it cannot be one (text already released never could)."""
        text = self.text
        for start in range(max(len(text) - self.hold, self.emitted), len(text)):
            end = text[start:]
            if any(stop.startswith(end) for stop in self.stop):
                return len(text) - start
        return 0

    def finish(self) -> str:
        """The rest of the text at the end of the answer (held-back and unfinished characters)."""
        if not self.stopped:
            self.text, stopped = cut_at_stop(self.text + self.decoder.flush(), self.stop)
            self.stopped = stopped is not None
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece = self.text[self.emitted : upto]
        self.emitted = upto
        return piece


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Cut text at the earliest stop string; the reason is 'stop' when one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], "stop") if cuts else (text, None)


def timings(timer: Timer, tokens: int) -> dict[str, float]:
    """A request's marks in ms, and its decode speed (tokens after the first, per second)."""
    m = timer.marks
    out = {k + "_ms": round(v * 1000, 3) for k, v in m.items()}
    if "first_token" in m and "done" in m and tokens > 1:
        out["decode_tokens_per_s"] = round(
            (tokens - 1) / max(m["done"] - m["first_token"], 1e-9), 3
        )
    return out
