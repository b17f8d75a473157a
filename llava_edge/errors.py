"""The one exception type users see.

Every stage raises `LlavaEdgeError` for problems the user can fix (a missing file, a bad option,
a checkpoint of the wrong kind). The CLI prints its message on one line and exits non-zero; any
other exception is a bug in llava-edge and keeps its traceback.
"""

from __future__ import annotations

import functools
from typing import Any


class LlavaEdgeError(Exception):
    """A problem with the user's input, stated with what to do about it."""


class TooLarge(LlavaEdgeError):
    """An input over a size limit (an image's pixels): refused whole, never cut down silently."""


class PromptTooLong(LlavaEdgeError):
    """A prompt over the deployment's prompt-token limit (`Limits.max_prompt_tokens`)."""


class TimedOut(LlavaEdgeError):
    """A request that ran past its time limit (`Limits.timeout_s`; in a batch, waiting
    included)."""

    @classmethod
    def after(cls, limit_s: float | None) -> TimedOut:
        return cls(f"the request ran past its time limit of {limit_s} s")


class ChatFull(LlavaEdgeError):
    """A chat turn that no longer fits the model's context or the prompt limit: the
    conversation must start over."""


class BatchFailed(LlavaEdgeError):
    """Some requests of a batch (`Pipeline.generate_batch`) failed; the others ran to their end.

    `results` holds every request's outcome in order: its Answer, or the exception that ended it
    (`failed`: those by index). The error raised is also an instance of each failed request's
    own subclass of LlavaEdgeError (TimedOut, TooLarge, ...), so the `except` that catches one
    request's failure catches a batch holding one.
    """

    def __init__(self, message: str, results: list[Any]):
        super().__init__(message)
        self.results = results

    @property
    def failed(self) -> dict[int, BaseException]:
        return {i: r for i, r in enumerate(self.results) if isinstance(r, BaseException)}

    def __reduce__(self) -> tuple[Any, ...]:  # its class is made per batch: rebuilt, not named
        return batch_failed, (self.results,)


def batch_failed(results: list[Any]) -> BatchFailed:
    """The BatchFailed of a batch's outcomes (at least one an exception), its one-line message
    naming the failed requests and why, grouped by reason."""
    failed = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
    reasons: dict[str, list[int]] = {}
    for i, error in failed.items():
        why = first_line(error)
        if not isinstance(error, LlavaEdgeError):
            why = f"internal error ({type(error).__name__}: {why})"
        reasons.setdefault(why, []).append(i)
    listed = "; ".join(f"{_requests(indices)}: {why}" for why, indices in reasons.items())
    message = (
        f"{len(failed)} of {len(results)} requests failed ({listed}); every request's answer or "
        "error is in this error's .results"
    )
    kinds = {type(e) for e in failed.values() if isinstance(e, LlavaEdgeError)}
    # the most specific only: a class may not list a base beside one of that base's subclasses
    kinds = {k for k in kinds if not issubclass(BatchFailed, k)}
    kinds = {k for k in kinds if not any(o is not k and issubclass(o, k) for o in kinds)}
    return _batch_class(tuple(sorted(kinds, key=lambda k: k.__qualname__)))(message, results)


@functools.cache
def _batch_class(kinds: tuple[type[LlavaEdgeError], ...]) -> type[BatchFailed]:
    if not kinds:
        return BatchFailed
    return type("BatchFailed", (BatchFailed, *kinds), {"__module__": __name__})


def _requests(indices: list[int]) -> str:
    """'request 3' or 'requests 0-7, 9': runs of consecutive indices as ranges."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"request{'s' if len(indices) > 1 else ''} {text}"


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (libraries' messages run to tracebacks and
    tables), or its type's name where it has none: what a one-line error quotes."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
