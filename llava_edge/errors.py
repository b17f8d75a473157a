"""The one exception type users see.

Every stage raises `LlavaEdgeError` for problems the user can fix (a missing file, a bad option,
a checkpoint of the wrong kind). The CLI prints its message on one line and exits non-zero; any
other exception is a bug in llava-edge and keeps its traceback.
"""

from __future__ import annotations


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


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (libraries' messages run to tracebacks and
    tables), or its type's name where it has none: what a one-line error quotes."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
