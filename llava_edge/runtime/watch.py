"""Ask a question about a video, a camera or a stream, again and again: `Pipeline.watch`.

    for answer in pipe.watch("/dev/video0", "Is the door open?", every_s=2.0):
        print(f"{answer.timestamp:.1f}s {answer.text} (skipped {answer.skipped})")

The source may also be an app's own frames, any iterable of images (a camera driver's
generator of arrays): it is read in a thread, as a camera is.

One answer per sampled frame (see llava_edge.runtime.frames for how live sources drop stale
frames). `changes_only=True` yields an answer only when its text differs from the previous one,
an alert stream; `frames=K` asks about the last K sampled frames at once, as K images in one
prompt (each `<image>` placeholder filled with one frame's features, as transformers' LLaVA
models take several images).

Leaving the answers before their end (break, an exception) should stop the camera at once, so
`watch` returns a `Watch`: used in a `with` block, or closed, it stops the source's reader and
closes the source there and then, even while the iterator is still bound to a name (a generator
would keep the camera open until it was garbage-collected, and a second watch of the same
camera would find it busy). A reader stuck in a read that stalled closes it only when that read
returns (see llava_edge.runtime.frames.open_frames).
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llava_edge.errors import LlavaEdgeError, PromptTooLong, TimedOut, TooLarge
from llava_edge.runtime.anyres import ImagePixels, check_several, untiles_several
from llava_edge.runtime.frames import DEFAULT_TIMEOUT_S, Frame, open_frames
from llava_edge.runtime.generate import Timer
from llava_edge.runtime.image import load_image
from llava_edge.runtime.sampling import true_or_false, whole_number
from llava_edge.runtime.template import IMAGE_PLACEHOLDER

# Unreadable frames in a row that end a watch: one is a glitch (a JPEG cut short in transit, a
# driver's torn buffer), and the watch goes on; a source whose frames keep failing is broken.
BAD_FRAMES_IN_A_ROW = 5


@dataclass
class WatchAnswer:
    """The answer about one sampled frame."""

    index: int  # the frame's position in the source
    timestamp: float  # seconds since the source's first frame
    text: str
    skipped: int  # frames due for an answer that were dropped while the last answer ran
    frames: list[int] = field(default_factory=list)  # indices of every frame in the prompt
    # the answer's timings, and how old its frame was when the answer began (frame_age_ms) and
    # when it was ready (lag_ms); empty for a frame that could not be read
    timings: dict[str, float] = field(default_factory=dict)
    # Why this frame has no answer: it ran past its time limit (`answer_timeout_s`, else the
    # pipeline's Limits.timeout_s), or it could not be read as an image (corrupt bytes, a bad
    # array, over the pixel limit, too far from square), or (AnyRes) its size gives it more
    # tokens than the context or the prompt limit holds. The watch goes on with the next
    # frame: one slow answer or one bad frame does not end a robot's watch
    # (BAD_FRAMES_IN_A_ROW unreadable or unfitting ones do).
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "timestamp": round(self.timestamp, 6),
            "text": self.text,
            "skipped": self.skipped,
            "frames": self.frames,
            "timings": self.timings,
            "error": self.error,
        }


class Watch(Iterator[WatchAnswer]):
    """The answers about a source's frames; `with pipe.watch(...) as answers:` closes the source
    when the block ends, however it ends."""

    def __init__(
        self,
        answers: Generator[WatchAnswer, None, None],
        cancel: threading.Event,
        stream: Iterator[Frame],
    ):
        self._answers, self._cancel, self._stream = answers, cancel, stream

    def __next__(self) -> WatchAnswer:
        return next(self._answers)

    def close(self) -> None:
        """Stop the source's reader and close the source; the answers end here. From another
        thread (a robot's shutdown handler) while the iterating one waits for a frame or an
        answer, it returns at once; that thread's wait then ends with the answers (after the
        answer in progress, which is dropped), and the source is closed there. A reader blocked
        in a read nothing can interrupt (an app's camera driver waiting for a frame) is waited
        for a second at most: that thread's wait ends then, and the source is closed when the
        read returns."""
        unstarted = inspect.getgeneratorstate(self._answers) == inspect.GEN_CREATED
        self._cancel.set()
        try:
            self._answers.close()
        except ValueError:  # running in another thread, which ends it once it sees the cancel
            if not self._answers.gi_running:
                raise
        if unstarted:  # the answers' cleanup never ran: close the source here
            self._stream.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def watch(
    pipe: Any,
    source: str | os.PathLike | Iterable[Any],
    prompt: str,
    every_s: float = 1.0,
    frames: int = 1,
    changes_only: bool = False,
    max_frames: int | None = None,
    live: bool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    folder_fps: float | None = None,
    answer_timeout_s: float | None = None,
    reconnect_s: float = 0.0,
    follow: bool = False,
    **options: Any,
) -> Watch:
    """Answers about `source`'s frames. The arguments are checked at once (an image folder is
    listed, a local file or camera must exist); a video is opened at the first frame asked for,
    so that a live stream opens under the frame timeout.

    frames: how many of the last sampled frames go into each prompt, as several images (at most
    `pipe.images_that_fit(prompt, smallest=True)`: as many as the context holds with the
    question and an answer; a frame that does not fit is reported like an unreadable one);
    while they fill up, the first answers have fewer, so the question holds no `<image>`
    placeholder unless frames is 1 (a raw prompt then holds exactly one). max_frames: stop after
    this many frames (answered, or reported without an answer: late or unreadable). timeout_s:
    how long the source may send no frame before it counts as stalled (the watch ends with an
    error). answer_timeout_s: each answer's time limit, in place of the pipeline's
    `Limits.timeout_s` (an answer past it is reported, and the watch goes on). reconnect_s: how
    long a camera or network stream that drops is tried again before the watch ends with its
    error (0: not at all; see llava_edge.runtime.frames.open_frames). follow: an image folder
    is watched for new pictures, or a picture file for its rewrites, read live as a camera's
    frames are. The remaining
    options are the generation options of `Pipeline.answer`.
    """
    pipe._check_open()
    changes_only = true_or_false("changes_only", changes_only)
    follow = true_or_false("follow", follow)
    live = (
        None
        if live is None
        else true_or_false("live", live, "True or False or None (the source decides)")
    )
    if answer_timeout_s is not None:
        options = {**options, "timeout_s": answer_timeout_s}
    frames = whole_number("frames", frames, 1, "at least 1")
    if max_frames is not None:
        max_frames = whole_number("max_frames", max_frames, 1, "a whole number, at least 1")
    pipe._check_options(options)  # bad options fail now, not at the first frame
    raw, system = bool(options.get("raw", False)), options.get("system")
    _check_placeholders(prompt, frames, raw=raw)
    # Refused here only where no frame could fit: an AnyRes frame's tokens depend on its size,
    # so a frame too large for the context is told in its own answer (as an unreadable one is).
    fit = pipe.images_that_fit(prompt, raw=raw, system=system, smallest=True)
    if fit == 0:
        raise LlavaEdgeError(
            "the question leaves no room for a frame and an answer in the model's context; "
            "shorten it"
        )
    if frames > fit:
        raise LlavaEdgeError(
            f"with this question the model's context holds {fit} frame{'s' if fit > 1 else ''} "
            f"and an answer, so it cannot be asked about {frames} at once; use --frames {fit} "
            "or fewer"
        )
    cancel = threading.Event()
    stream = open_frames(
        source,
        every_s,
        live=live,
        timeout_s=timeout_s,
        folder_fps=folder_fps,
        cancel=cancel,
        reconnect_s=reconnect_s,
        follow=follow,
    )
    answers = _answers(pipe, stream, prompt, frames, changes_only, max_frames, options, cancel)
    return Watch(answers, cancel, stream)


def _check_placeholders(prompt: str, frames: int, raw: bool) -> None:
    """Each prompt holds one image per frame, and while the last `frames` frames fill up the first
    answers have fewer: only a single frame can have a placeholder of its own."""
    held = prompt.count(IMAGE_PLACEHOLDER) if isinstance(prompt, str) else 0
    if raw and frames > 1:
        raise LlavaEdgeError(
            f"a raw prompt holds one {IMAGE_PLACEHOLDER} per image, but the first answers about "
            f"the last {frames} frames have fewer; use frames=1, or the chat template"
        )
    if raw and held != 1:
        raise LlavaEdgeError(
            f"a raw prompt holds one {IMAGE_PLACEHOLDER} placeholder for the frame; this one "
            f"holds {held}"
        )
    if not raw and held > (1 if frames == 1 else 0):
        each = "one frame" if frames == 1 else f"1 to {frames} frames"
        raise LlavaEdgeError(
            f"the question holds {held} {IMAGE_PLACEHOLDER} placeholder(s), but each answer is "
            f"about {each}, put before the question: leave the placeholders out"
        )


def _answers(
    pipe: Any,
    stream: Iterator[Frame],
    prompt: str,
    frames: int,
    changes_only: bool,
    max_frames: int | None,
    options: dict[str, Any],
    cancel: threading.Event,
) -> Generator[WatchAnswer, None, None]:
    # the last frames' indices and their images as Pipeline.image_pixels prepared them: each
    # frame is prepared once, however many answers it is part of
    window: deque[tuple[int, ImagePixels]] = deque(maxlen=frames)
    last_text: str | None = None
    answered = bad = 0
    try:
        for frame in stream:
            if cancel.is_set():
                return
            bad_frame: LlavaEdgeError | None = None
            try:  # decoded here, so that a bad frame is told from a failing answer
                picture = load_image(frame.image, pipe.limits.max_image_pixels)
                # asked about with the next frames, as one of `frames` images
                check_several([picture.size] * frames, pipe.manifest.image)
            except LlavaEdgeError as e:
                bad_frame = e
            if bad_frame is None:
                started, timer = time.monotonic(), Timer()
                in_window = False  # a frame whose input cannot be made stays out of it
                try:
                    window.append((frame.index, pipe.image_pixels(picture)))
                    in_window = True
                    images = [pixels for _, pixels in window]
                    answer = pipe._answer_prepared(images, prompt, timer, **options)
                    text, timings, error = answer.text, answer.timings, None
                except TimedOut as e:
                    text, timings, error = "", {}, str(e)
                # A shape the vision encoder's input cannot be made from, or (AnyRes) a frame
                # whose size gives it more tokens than the context or the prompt limit holds.
                except (TooLarge, PromptTooLong) as e:
                    if in_window and not _fits_with_the_next(pipe, e, len(window), frames):
                        window.pop()  # the frames before it were answered with
                    bad_frame = e
            if bad_frame is not None:
                bad += 1
                fault = (
                    "did not fit" if isinstance(bad_frame, PromptTooLong) else "could not be read"
                )
                if bad >= BAD_FRAMES_IN_A_ROW:
                    raise LlavaEdgeError(
                        f"{bad} frames in a row {fault}, the last ({frame.index}): "
                        f"{bad_frame}; check the source"
                    ) from None
                error = f"frame {frame.index} {fault}: {bad_frame}"
                yield WatchAnswer(frame.index, frame.timestamp, "", frame.skipped, [], {}, error)
                answered += 1
                if max_frames is not None and answered >= max_frames:
                    return
                continue
            bad = 0
            if cancel.is_set():  # closed from another thread during the answer
                return
            answered += 1
            timings = {**timings, **_staleness(frame, started)}
            result = WatchAnswer(
                frame.index,
                frame.timestamp,
                text,
                frame.skipped,
                [index for index, _ in window],
                timings,
                error,
            )
            if error is not None or not changes_only or _normal(text) != last_text:
                yield result  # an error is news, whatever the last answer said
            if error is None:
                last_text = _normal(text)
            if max_frames is not None and answered >= max_frames:
                return
    finally:
        stream.close()


def _fits_with_the_next(pipe: Any, error: Exception, held: int, frames: int) -> bool:
    """Whether a frame too long for a prompt of the `held` frames (itself among them) stays for
    the next answers: on LLaVA-OneVision, which tiles a frame only while it is its prompt's one
    image and reads each of several untiled, in a fixed number of tokens, a frame too long alone
    fits with the frames that follow it, as many as `frames` (images_that_fit counted them)."""
    return (
        isinstance(error, PromptTooLong) and held < frames and untiles_several(pipe.manifest.image)
    )


def _staleness(frame: Frame, started: float) -> dict[str, float]:
    """How old the (newest) frame was when its answer began (its wait for the answerer) and
    when the answer was ready (what a robot acting on it must allow for)."""
    return {
        "frame_age_ms": round((started - frame.received) * 1e3, 3),
        "lag_ms": round((time.monotonic() - frame.received) * 1e3, 3),
    }


def _normal(text: str) -> str:
    """Answers that differ only in case, spacing or a final full stop are the same answer."""
    return " ".join(text.split()).rstrip(".").lower()
