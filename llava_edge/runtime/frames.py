"""Frame sources: video files, V4L2 cameras, RTSP/HTTP streams, pipes, image folders and picture
files, as RGB frames, and the frames an app's own camera driver hands over.

Video is decoded with PyAV (FFmpeg's libraries in a wheel, `pip install 'llava-edge[video]'`),
imported only when a video source is opened, so `import llava_edge.runtime` never loads it. We
chose PyAV over OpenCV's headless build because it gives each frame's presentation timestamp
exactly (OpenCV only estimates positions), takes open and read timeouts for network streams (an
OpenCV capture can block forever on a dead RTSP server), and reads V4L2 devices and files with the
same calls. An image folder or a picture file needs only Pillow.

Two ways to read a source:

- *Offline* (files, folders): every frame is decoded in order and sampled by its timestamp, one
  every `every_s` seconds of media time (from the start again where the timestamps jump back, as
  in recordings joined end to end). Nothing is dropped: a slow answerer just takes longer.
- *Live* (cameras, streams, pipes, an app's frames, or a file replayed at its own pace with
  `live=True`): a reader thread decodes continuously and keeps only the newest frame due for an
  answer. While an answer is being generated, newer frames replace the waiting one (counted in
  `Frame.skipped`), so the next answer is about what the camera sees now, never a queue of stale
  frames. Frames are due every `every_s` seconds of this machine's clock, as they arrive, and
  their timestamps are their arrival since the first frame's: a stream's own may be made up (MJPEG
  over HTTP counts 25 a second whatever the camera's rate), missing, or jump back when the sender
  restarts.

Every way a source can go wrong ends in a `LlavaEdgeError` of one line or a clean end: a missing
file or device, a file that is not video, one that breaks mid-way, a stream that stalls longer
than `timeout_s` (while opening or between frames). A camera or a network stream read live
never ends cleanly: its end is an error (see `_never_ending`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import numbers
import os
import queue
import re
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError, first_line
from llava_edge.runtime.image import VIDEO_HEAD, is_animation, video_format

VIDEO_HINT = "install the video extra: pip install 'llava-edge[video]' (PyAV)"
# The picture files a folder of images is read for (watch's frames, quantize's calibration).
# PNM (.pgm, .ppm, .pnm): what depth and machine-vision cameras save their 16-bit frames as.
IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".pgm", ".ppm", ".pnm"
)  # fmt: skip
# A URL, whatever its protocol (rtsp, http, udp, rtp, srt ...): FFmpeg opens it or says why not.
# A file:// URL names a file, which is read offline, not as a stream.
URL = re.compile(r"(?!file://)[A-Za-z][A-Za-z0-9+.-]*://", re.IGNORECASE)
STANDARD_INPUT = ("/dev/stdin", "/dev/fd/0", "/proc/self/fd/0")  # a character device: no camera
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_FOLDER_FPS = 1.0  # an image folder's slideshow: one image a second
KIND_NAMES = {
    "file": "a video file",
    "picture": "a picture file",
    "device": "a camera",
    "stream": "a stream",
}
# Picture files that may be animations, which FFmpeg plays as the videos they are (it decodes
# no animated WebP: such a file is a picture, its first frame as load_image reads it).
PLAYED_SUFFIXES = (".gif", ".png")
APP_SOURCE = "the app's frames"  # how errors name an iterable source
CANCEL_POLL_S = 0.05  # how soon a wait for a frame sees a cancel
OPEN_GRACE_S = 2.0  # what a stream read offline may take past its timeout to open
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.5, 5.0  # the pauses between tries to reopen a source
FOLLOW_POLL_S = 0.1  # how often a followed folder is listed for new pictures


@dataclass
class Frame:
    """One frame: its image, where it sits in the source, and what was dropped before."""

    pixels: Any  # what `image` gives, or a video frame that `image` converts
    index: int  # position in the source, counting from 0
    timestamp: float  # seconds since the source's first frame
    skipped: int = 0  # frames due for an answer that a newer one replaced (live sources)
    received: float = field(default_factory=time.monotonic)  # when it arrived (time.monotonic)

    @property
    def image(self) -> Any:
        """What `load_image` takes: (H, W, 3) uint8 RGB from a video, the file of a folder's
        image, an app's frame as it gave it. Video is converted to RGB (and an image file read)
        only for the frames answered, not as they arrive: most of a camera's are dropped."""
        if isinstance(self.pixels, VideoPixels):
            self.pixels = self.pixels.rgb()
        return self.pixels


class VideoPixels:
    """A decoded video frame in the decoder's own pixel format (YUV, mostly)."""

    def __init__(self, frame: Any, source: str):
        self.frame, self.source = frame, source

    def rgb(self) -> np.ndarray:
        """(H, W, 3) RGB, upright as a player shows it: a phone's portrait video is stored on its
        side with a display rotation (counterclockwise, in degrees), as a photo's EXIF
        orientation is, and is turned by it."""
        try:
            array = self.frame.to_ndarray(format="rgb24")
            turns = round(self.frame.rotation / 90) % 4
        except Exception as e:  # PyAV's errors, and ValueError for a format it cannot convert
            raise LlavaEdgeError(
                f"cannot convert a frame of {self.source} to RGB: {first_line(e)}"
            ) from None
        return np.ascontiguousarray(np.rot90(array, turns)) if turns else array


def source_kind(source: str | os.PathLike) -> str:
    """'folder', 'device', 'stream' or 'file', from the source's name. A URL or a named pipe (or
    /dev/stdin fed by one) is a stream: its frames come as they are made, and can stop coming.
    A character device is a camera wherever its path (a link to one outside /dev too)."""
    text = os.fspath(source)
    mode = _mode(text)
    if (URL.match(text) and not mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "stream"
    if stat.S_ISCHR(mode) or (text.startswith("/dev/") and not stat.S_ISREG(mode)):
        return "device"  # a missing /dev/videoN too, for its error; /dev/stdin may be a file
    return "folder" if stat.S_ISDIR(mode) else "file"


def shown(source: str) -> str:
    """How errors name a source: a URL's password (rtsp://user:password@camera/, as IP cameras
    are addressed) left out, so that it stays out of a robot's logs."""
    scheme, _, rest = source.partition("://")
    if not rest or not URL.match(source):
        return source
    authority, slash, path = rest.partition("/")
    user, at, host = authority.rpartition("@")
    if not at or ":" not in user:
        return source
    return f"{scheme}://{user.split(':', 1)[0]}:***@{host}{slash}{path}"


def _mode(path: str) -> int:
    """The file type bits of what `path` names (links followed), 0 for nothing there."""
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return 0


def open_frames(
    source: str | os.PathLike | Iterable[Any],
    every_s: float = 1.0,
    live: bool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    folder_fps: float | None = None,
    cancel: threading.Event | None = None,
    reconnect_s: float = 0.0,
    follow: bool = False,
) -> Iterator[Frame]:
    """The frames of `source` due for an answer, one per `every_s` seconds.

    source: a path or URL, or an iterable of images (in any form `load_image` takes: arrays,
    PIL images, encoded bytes) that an app's camera driver yields, read in a thread as a
    camera is; a None from it means no new frame yet. live: None decides from the source
    (cameras, streams, pipes and an app's frames are live, files and folders not); True replays a
    file at its own pace, as a camera would deliver it; False is refused for a camera and an
    app's frames, which come as they are made. timeout_s: how long to wait for a stream
    to open or for its next frame before giving up. folder_fps: an image folder is a slideshow at
    this rate (None: 1 image a second), its images in name order (frame_9 before frame_10);
    other sources keep their own pace and refuse it. cancel: set from another thread, a live
    source's iterator stops waiting for a frame and ends. reconnect_s: a camera or network
    stream read live that drops (ends, breaks, stalls) is opened again, with a growing pause
    between tries, until it sends again or `reconnect_s` seconds have passed (0: never); its
    frames go on counting, and a stall is given up after `timeout_s + reconnect_s`. follow: an
    image folder is read live, its pictures as they come (see `_followed`), or a picture file,
    each version a camera daemon writes; one that gets no new picture for `timeout_s` has
    stalled.
    Closing the iterator stops the reader and closes the source (an app's iterator too); a
    reader stuck in a read that stalled (FFmpeg's V4L2 read, an app driver's own read: neither
    can be interrupted) closes it when that read returns, while the answers end at the timeout.
    """
    every_s = _check_number("every_s (--every)", every_s, "0 or more seconds", minimum=0.0)
    timeout_s = _check_number(
        "the source's timeout_s (--source-timeout)", timeout_s, "a positive number of seconds"
    )
    reconnect_s = _check_number(
        "reconnect_s (--reconnect)", reconnect_s, "0 or more seconds", minimum=0.0
    )
    if not isinstance(source, str | os.PathLike):
        _no_folder_fps(folder_fps, "an app's frames")
        _no_reconnect(reconnect_s, APP_SOURCE)
        if live is False:
            raise LlavaEdgeError("an app's frames are live: they cannot be read with live=False")
        images = _app_source(source)
        frames = live_frames(_app_frames(images), every_s, timeout_s, APP_SOURCE, cancel)
        return AppFrames(frames, images)
    source = _file_url_path(source)
    kind = source_kind(source)
    if kind == "file" and _picture_file(os.fspath(source)):
        kind = "picture"
    if follow:
        return _follow(source, kind, every_s, live, timeout_s, folder_fps, cancel, reconnect_s)
    if kind == "device" and live is False:
        # offline, the answers would trail the camera by the frames its driver queues
        raise LlavaEdgeError(
            f"camera {os.fspath(source)} is live: it cannot be read with live=False"
        )
    if kind == "folder":
        folder_fps = DEFAULT_FOLDER_FPS if folder_fps is None else folder_fps
        folder_fps = _check_number(
            "folder_fps (--folder-fps)", folder_fps, "a positive number of images a second"
        )
        decoded = _folder_frames(Path(source), folder_fps)
    else:
        _no_folder_fps(folder_fps, f"{shown(os.fspath(source))} ({KIND_NAMES[kind]})")
        if kind == "picture":
            decoded = _picture_frames(Path(source))
        else:
            decoded = _video_frames(os.fspath(source), kind, timeout_s)
    if live is None:
        live = kind in ("device", "stream")
    text, name = os.fspath(source), shown(os.fspath(source))
    connected = live and (kind == "device" or bool(URL.match(text)))
    if not connected:
        _no_reconnect(reconnect_s, name if live else f"{name} read with live=False")
    if live:
        stop = threading.Event()
        if kind in ("file", "picture", "folder"):
            decoded = _paced(decoded)
        elif connected:
            decoded = _never_ending(decoded, kind, name)
            if reconnect_s > 0:

                def reopen() -> Iterator[Frame]:
                    yield from _never_ending(_video_frames(text, kind, timeout_s), kind, name)

                decoded = _reconnecting(decoded, reopen, reconnect_s, stop)
        # a stream's open has FFmpeg's own timeout, whose error says more than a stall would
        grace = OPEN_GRACE_S if kind == "stream" else 0.0
        waits = timeout_s + reconnect_s
        return live_frames(decoded, every_s, waits, name, cancel, grace, stop)
    if kind == "stream":
        decoded = _read_ahead(decoded, timeout_s, shown(os.fspath(source)), cancel)
    return _sampled(decoded, every_s)


def _follow(
    source: str | os.PathLike,
    kind: str,
    every_s: float,
    live: bool | None,
    timeout_s: float,
    folder_fps: float | None,
    cancel: threading.Event | None,
    reconnect_s: float,
) -> Iterator[Frame]:
    """A followed image folder's or picture file's frames, read live as a camera's are."""
    name = os.fspath(source)
    if kind == "file" and not os.path.exists(name):
        raise LlavaEdgeError(
            f"{name} does not exist; follow (--follow) watches an image folder or a picture file"
        )
    if kind not in ("folder", "picture"):
        raise LlavaEdgeError(
            f"follow (--follow) watches an image folder for new pictures, or a picture file for "
            f"its rewrites; {shown(name)} is {KIND_NAMES[kind]}: drop it"
        )
    followed = "folder" if kind == "folder" else "picture"
    if live is False:
        raise LlavaEdgeError(
            f"a followed {followed} is live: {name} cannot be read with live=False"
        )
    _no_folder_fps(folder_fps, f"a followed {followed}")
    _no_reconnect(reconnect_s, f"{followed} {name}")
    stop = threading.Event()
    if kind == "folder":
        frames = _followed_folder(Path(source), stop)
    else:
        frames = _followed_picture(Path(source), stop)
    return live_frames(frames, every_s, timeout_s, name, cancel, stop=stop)


def _file_url_path(source: str | os.PathLike) -> str | os.PathLike:
    """The path a file:// URL names (%-escapes decoded), read as that path is: a video file, a
    folder of images, a camera."""
    text = os.fspath(source)
    if not text.lower().startswith("file://"):
        return source
    url = urllib.parse.urlsplit(text)
    if url.netloc not in ("", "localhost"):
        raise LlavaEdgeError(
            f"{text} names a file on another machine ({url.netloc}); give a path on this one"
        )
    return urllib.parse.unquote(url.path)


def _no_folder_fps(folder_fps: float | None, what: str) -> None:
    """A folder's pace given for a source that keeps its own would do nothing."""
    if folder_fps is not None:
        raise LlavaEdgeError(
            f"folder_fps (--folder-fps) paces an image folder; {what} keeps its own pace: drop it"
        )


def _no_reconnect(reconnect_s: float, what: str) -> None:
    """Only a camera or a network stream read live has a connection to open again."""
    if reconnect_s:
        raise LlavaEdgeError(
            f"reconnect_s (--reconnect) opens a camera or a network stream again; {what} has "
            "no connection to open again: drop it"
        )


class AppFrames(Iterator[Frame]):
    """An app's frames, as `open_frames` gives them; closing them closes the app's iterator even
    before a frame was asked for (a generator closed before it starts runs no cleanup, and
    the app's camera would stay open)."""

    def __init__(self, frames: Generator[Frame, None, None], images: Iterator[Any]):
        self._frames, self._images = frames, images

    def __next__(self) -> Frame:
        return next(self._frames)

    def close(self) -> None:
        unstarted = inspect.getgeneratorstate(self._frames) == inspect.GEN_CREATED
        self._frames.close()
        close = getattr(self._images, "close", None)
        if unstarted and close is not None:
            close()


def _app_source(source: object) -> Iterator[Any]:
    if isinstance(source, np.ndarray | bytes | bytearray | memoryview) or not isinstance(
        source, Iterable
    ):
        hint = f" (a camera is a device path: /dev/video{source})" if type(source) is int else ""
        raise LlavaEdgeError(
            "a source is a video file, an image folder, a camera, a stream URL or an iterable of "
            f"frames, got {type(source).__name__}{hint}"
        )
    return iter(source)


def _app_frames(images: Iterator[Any]) -> Iterator[Frame | None]:
    """An app's frames (timed by the reader as they arrive, as every live frame is). A None
    passes through as 'nothing new', so that the reader can stop while a driver has no frame,
    and a driver that gives only None stalls under the timeout as a silent camera does."""
    index = 0
    try:
        for image in images:
            if image is None:
                yield None
                continue
            # a driver may fill the same buffer with its next frame
            if isinstance(image, np.ndarray):
                image = image.copy()
            elif isinstance(image, bytearray | memoryview):
                image = bytes(image)
            yield Frame(image, index, 0.0)
            index += 1
    finally:
        close = getattr(images, "close", None)
        if close is not None:
            close()  # the app's generator releases its camera


def _check_number(name: str, value: object, what: str, minimum: float | None = None) -> float:
    """`value` as a float: a finite number of any real type (robot code holds numpy's), at least
    `minimum` (above 0 without one): an infinite timeout would overflow the wait and a NaN one
    never expire, a NaN interval would answer one frame only."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    if (
        not number
        or not math.isfinite(value)
        or (value < minimum if minimum is not None else value <= 0)
    ):
        raise LlavaEdgeError(f"{name} must be {what}, got {value!r}")
    return float(value)


# ---- sampling ------------------------------------------------------------------------------


def _sampled(frames: Iterator[Frame], every_s: float) -> Iterator[Frame]:
    """Offline: the first frame at or after each due time, in order, on a grid of `every_s` from
    the first (as live frames are due: a count from each sampled frame would drift later where
    the interval is no whole number of frames). A timestamp before the last sampled frame's
    starts the count again: recordings joined end to end (`cat a.ts b.ts`) each count from
    their own start."""
    last = origin = due = -math.inf
    try:
        for frame in frames:
            if frame.timestamp < last:
                due = -math.inf
            if frame.timestamp + 1e-9 >= due:
                if due == -math.inf:
                    origin = frame.timestamp
                last = frame.timestamp
                if every_s > 0:
                    ticks = math.floor((last - origin) / every_s + 1e-6) + 1
                    due = origin + ticks * every_s
                yield frame
    finally:
        frames.close()


def _paced(frames: Iterator[Frame]) -> Iterator[Frame]:
    """A file or folder replayed as a camera delivers it: no frame before its time (a timestamp
    that jumps back starts the clock again, as `_sampled` counts)."""
    start: float | None = None
    last = -math.inf
    try:
        for frame in frames:
            now = time.monotonic()
            if start is None or frame.timestamp < last:
                start = now - frame.timestamp
            last = frame.timestamp
            due = start + frame.timestamp
            if due > now:
                time.sleep(due - now)
            frame.received = max(due, now)  # it arrives on time, or as late as it was decoded
            yield frame
    finally:
        frames.close()


def live_frames(
    frames: Iterator[Frame | None],
    every_s: float,
    timeout_s: float,
    name: str,
    cancel: threading.Event | None = None,
    open_grace_s: float = 0.0,
    stop: threading.Event | None = None,
) -> Iterator[Frame]:
    """Live: a reader thread keeps the newest due frame of `frames`; each `next` takes it. The
    first frame may take `open_grace_s` past the timeout: what the open may take to fail.
    `stop` is set when the reader is asked to finish (`frames` may wait on it)."""
    latest = LatestFrame(frames, every_s, stop)
    try:
        latest.start()  # in the try: a Ctrl-C while it starts still stops the reader
        while True:
            frame = latest.take(timeout_s, name, cancel, open_grace_s)
            if frame is None:
                return
            yield frame
    finally:
        latest.stop()


class LatestFrame:
    """A one-frame mailbox between a reader thread and the answerer.

    The reader puts every frame due for an answer into the box, replacing one that is still
    waiting; `take` empties it. Nothing ever queues. A None from `frames` is nothing new. Frames
    are due on a grid of `every_s` from the first one taken's arrival: the first to arrive at or
    after the grid's next tick past the last one taken (so that the jitter of each arrival does
    not push the next tick later).
    """

    def __init__(
        self,
        frames: Iterator[Frame | None],
        every_s: float,
        stop: threading.Event | None = None,
    ):
        self.frames = frames
        self.every_s = every_s
        self._box: Frame | None = None
        self._skipped = 0
        self._due = -math.inf  # the grid's next tick, on time.monotonic's clock
        self._origin: float | None = None  # the grid's first tick
        self._arrived = -math.inf  # when the last frame arrived, due or not
        self._first: float | None = None  # when the first frame arrived
        self._done = False
        self._error: BaseException | None = None
        self._stop = threading.Event() if stop is None else stop
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="llava-edge-frames", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        try:
            for frame in self.frames:
                if frame is not None:
                    with self._changed:
                        self._arrived = frame.received
                        self._first = frame.received if self._first is None else self._first
                        frame.timestamp = frame.received - self._first
                        if frame.received >= self._due - 1e-9:
                            if self._box is not None:
                                self._skipped += 1
                            self._box = frame
                        self._changed.notify_all()
                if self._stop.is_set():
                    break
        except BaseException as e:  # handed to the answerer's thread, which raises it
            with self._changed:
                self._error = e
        finally:
            self.frames.close()
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def take(
        self,
        timeout_s: float,
        name: str,
        cancel: threading.Event | None = None,
        open_grace_s: float = 0.0,
    ) -> Frame | None:
        """The newest due frame; None once the source has ended and nothing waits, or once
        `cancel` is set. The source has stalled when no frame at all (due or not) has arrived
        for `timeout_s` (`open_grace_s` more before the first): a frame may be due far later
        than that (every_s longer than the timeout)."""
        asked = time.monotonic()
        with self._changed:
            while self._box is None and not self._done:
                if cancel is not None and cancel.is_set():
                    return None
                grace = open_grace_s if self._first is None else 0.0
                left = max(asked, self._arrived) + timeout_s + grace - time.monotonic()
                if left <= 0:
                    raise _stalled(name, timeout_s)
                # a cancel is set from another thread, without the condition: look at it often
                self._changed.wait(left if cancel is None else min(left, CANCEL_POLL_S))
            if self._box is None:
                if self._error is not None:
                    raise _as_error(self._error, name)
                return None
            frame, self._box = self._box, None
            frame.skipped, self._skipped = self._skipped, 0
            if self.every_s > 0:
                origin = self._origin = frame.received if self._origin is None else self._origin
                ticks = math.floor((frame.received - origin) / self.every_s + 1e-6) + 1
                self._due = origin + ticks * self.every_s
            return frame

    def stop(self) -> None:
        """Ask the reader to finish; it is a daemon, so a read blocked in FFmpeg cannot hang exit."""
        self._stop.set()
        _join(self._thread)


def _join(reader: threading.Thread) -> None:
    """Wait a second at most for a reader told to stop. One whose start was interrupted (a
    Ctrl-C while `start` waits for it) may not count as started yet, which `join` refuses: it
    has been told to stop, and ends at its next frame."""
    with contextlib.suppress(RuntimeError):
        reader.join(timeout=1.0)


def _stalled(name: str, timeout_s: float) -> LlavaEdgeError:
    return LlavaEdgeError(
        f"no frame from {name} for {timeout_s:g} s: the source stalled (check that it still "
        "sends, or raise the source's timeout: --source-timeout, or watch's timeout_s)"
    )


def _as_error(error: BaseException, name: str) -> LlavaEdgeError:
    if isinstance(error, LlavaEdgeError):
        return error
    return LlavaEdgeError(f"reading {name} failed: {first_line(error)}")


def _never_ending(frames: Iterator[Frame], kind: str, name: str) -> Iterator[Frame]:
    """A camera or a network stream read live does not end while all is well: its end (the
    sender stopped, the connection closed) is an error, which a robot's supervisor must see. A
    pipe ends when its writer does, whose own exit says why, and a file or folder at its end."""
    count = 0
    try:
        for frame in frames:
            count += 1
            yield frame
    finally:
        frames.close()
    what = "camera" if kind == "device" else "stream"
    raise LlavaEdgeError(
        f"{what} {name} ended after {count} frames: a live source does not end while it works; "
        f"check the {'camera' if kind == 'device' else 'sender and the network'}"
    )


def _reconnecting(
    frames: Iterator[Frame],
    reopen: Callable[[], Iterator[Frame]],
    window_s: float,
    stop: threading.Event,
) -> Iterator[Frame]:
    """`frames`, and once they drop (a camera's or stream's end or error), `reopen()`'s, tried
    after a pause that doubles from RECONNECT_FIRST_S up to RECONNECT_MAX_S, until one sends a
    frame or `window_s` seconds have passed since the drop (then the drop's error, and the last
    try's). A Wi-Fi camera's second of silence does not end a robot's watch. The frames count
    on from the last; `stop` (the reader's) ends the pauses, so no camera is opened again after
    the watch ends."""
    index = 0
    dropped: LlavaEdgeError | None = None
    deadline = pause = 0.0
    while True:
        try:
            for frame in frames:
                frame.index, index = index, index + 1
                dropped = None
                yield frame
            return  # an end without an error is no drop
        except LlavaEdgeError as e:
            error = e
        finally:
            frames.close()
        now = time.monotonic()
        if dropped is None:
            dropped, deadline, pause = error, now + window_s, RECONNECT_FIRST_S
        elif now >= deadline:
            raise LlavaEdgeError(
                f"{dropped}; not back after reconnecting for {window_s:g} s (the last try: {error})"
            )
        if stop.wait(min(pause, max(deadline - now, 0.0))):
            return
        pause = min(2 * pause, RECONNECT_MAX_S)
        frames = reopen()


def _read_ahead(
    frames: Iterator[Frame], timeout_s: float, name: str, cancel: threading.Event | None = None
) -> Iterator[Frame]:
    """A stream's frames read offline, every one kept, in a reader thread: a pipe's read blocks
    while its writer sends nothing (FFmpeg's timeout reaches only its network reads), so the
    answerer waits on the thread, for `timeout_s` at most, and ends at a `cancel`."""
    handed: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def hand(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                handed.put(item, timeout=CANCEL_POLL_S)
                return True
        return False

    def read() -> None:
        try:
            for frame in frames:
                if not hand(("frame", frame)):
                    return
            hand(("end", None))
        except BaseException as e:  # handed to the answerer's thread, which raises it
            hand(("error", e))
        finally:
            frames.close()

    thread = threading.Thread(target=read, name="llava-edge-frames", daemon=True)
    # The first frame waits out the open too: a network stream's open has FFmpeg's own timeout
    # of timeout_s, whose error ('no answer') says more than a stall would.
    grace = OPEN_GRACE_S
    try:
        thread.start()  # in the try: a Ctrl-C while it starts still stops the reader
        while True:
            waited = time.monotonic()
            while True:
                if cancel is not None and cancel.is_set():
                    return
                with contextlib.suppress(queue.Empty):
                    what, item = handed.get(timeout=CANCEL_POLL_S)
                    break
                if time.monotonic() - waited > timeout_s + grace:
                    raise _stalled(name, timeout_s)
            grace = 0.0
            if what == "end":
                return
            if what == "error":
                raise _as_error(item, name)
            yield item
    finally:
        stop.set()
        _join(thread)  # a daemon: a read blocked on the pipe cannot hang exit


# ---- pictures and image folders --------------------------------------------------------------


def _picture_file(path: str) -> bool:
    """Whether a file is one picture (named as a folder's pictures are, IMAGE_SUFFIXES), read
    as `run --image` reads it, by load_image (transparency over white, EXIF orientation, PIL's
    colours), not decoded by FFmpeg as a video of one frame; an animated GIF or PNG is the video
    FFmpeg plays, as is a video named as a picture (clip.png holding an MP4)."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_SUFFIXES or not os.path.isfile(path):
        return False
    with contextlib.suppress(OSError), open(path, "rb") as file:  # unreadable: load_image says
        if video_format(file.read(VIDEO_HEAD)) is not None:
            return False
    return suffix not in PLAYED_SUFFIXES or not is_animation(path)


def _picture_frames(path: Path) -> Iterator[Frame]:
    """A picture file's one frame, read when it is answered (as a folder's pictures are)."""
    yield Frame(path, 0, 0.0)


def _folder_images(folder: Path) -> list[Path]:
    """The folder's images in name order."""
    try:
        return sorted(
            (
                p
                for p in folder.iterdir()
                # hidden files are no frames: macOS leaves a ._NAME beside each image it copies
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
            ),
            key=_name_order,
        )
    except OSError as e:  # another user's capture folder, a stale network mount
        raise LlavaEdgeError(f"cannot list image folder {folder}: {e.strerror or e}") from None


def _folder_frames(folder: Path, fps: float) -> Iterator[Frame]:
    paths = _folder_images(folder)
    if not paths:
        raise LlavaEdgeError(
            f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return (Frame(path, index, index / fps) for index, path in enumerate(paths))


def _followed_folder(folder: Path, stop: threading.Event) -> Iterator[Frame | None]:
    """A folder's pictures as they come, as `_followed` hands them over."""
    return _followed(lambda: _folder_images(folder), stop)


def _followed_picture(path: Path, stop: threading.Event) -> Iterator[Frame | None]:
    """A picture file's versions as a camera daemon writes them (latest.jpg, rewritten in place
    or renamed over), as `_followed` hands a folder's pictures over; while it is gone (deleted
    before it is written again) nothing is handed over."""
    return _followed(lambda: [path], stop)


def _followed(listing: Callable[[], list[Path]], stop: threading.Event) -> Iterator[Frame | None]:
    """The pictures `listing` gives as they come (a folder's, which a robot's capture script
    drops in), read live: they are listed every FOLLOW_POLL_S, and an image new or rewritten
    since it was handed over (another file, size or modification time) is handed over, in name
    order, once two listings in a row find it the same, so that a picture still being written is
    not read half; or at once where another file has taken its name since the last listing,
    renamed into place whole (a camera daemon renaming each frame over latest.jpg, faster than
    the listings, is never listed the same twice), told by its inode number: ext4 gives a new
    file the number the last one freed, so two renames between listings read as a rewrite. The
    images there at the start come first. Only the pictures still there are remembered: a
    capture script that deletes old pictures as it adds new ones (a ring buffer) may run for
    days."""
    handed: dict[Path, tuple[int, int, int]] = {}
    seen: dict[Path, tuple[int, int, int]] = {}
    index = 0
    while True:
        listed: dict[Path, tuple[int, int, int]] = {}
        for path in listing():
            with contextlib.suppress(OSError):  # gone since the listing
                st = path.stat()
                listed[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
        handed = {path: handed[path] for path in listed if path in handed}
        for path, state in listed.items():
            last = seen.get(path)
            whole = last == state or (last is not None and last[0] != state[0])
            if state[1] and whole and handed.get(path) != state:
                handed[path] = state
                yield Frame(path, index, 0.0)
                index += 1
        seen = listed
        yield None  # nothing more for now
        if stop.wait(FOLLOW_POLL_S):
            return


def _name_order(path: Path) -> tuple[list[str | int], str]:
    """Name order with the numbers in a name counted by value: a capture script's frame_9.png
    comes before its frame_10.png (zero-padded names keep their order)."""
    parts = re.split(r"(\d+)", path.name)
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], path.name


# ---- video through PyAV ----------------------------------------------------------------------


def import_av() -> Any:
    """PyAV, or a LlavaEdgeError saying how to install it."""
    try:
        return importlib.import_module("av")
    except ImportError:
        raise LlavaEdgeError(f"reading video needs PyAV; {VIDEO_HINT}") from None


def _check_local(path: str, kind: str) -> None:
    """Clear errors for local sources before FFmpeg sees them."""
    if kind == "device":
        if path in STANDARD_INPUT and os.path.exists(path):
            raise LlavaEdgeError(
                f"standard input ({path}) holds no video (a terminal or /dev/null): pipe one "
                "into it, as `ffmpeg ... -f matroska - | llava-edge watch ... --source -`"
            )
        if not os.path.exists(path):
            raise LlavaEdgeError(
                f"camera {path} does not exist (no such V4L2 device); list cameras with "
                "`ls /dev/video*` or `v4l2-ctl --list-devices`"
            )
        if not stat.S_ISCHR(os.stat(path).st_mode):
            raise LlavaEdgeError(f"{path} is not a camera device (not a character device)")
        if not os.access(path, os.R_OK):
            raise LlavaEdgeError(
                f"no permission to read camera {path}; add your user to the 'video' group"
            )
    elif kind == "file":
        if not os.path.exists(path):
            # OpenCV names cameras by index: say what this one takes
            hint = f"; a camera is a device path: /dev/video{path}" if path.isdigit() else ""
            what = "picture file" if Path(path).suffix.lower() in IMAGE_SUFFIXES else "video file"
            raise LlavaEdgeError(f"{what} {path} does not exist{hint}")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise LlavaEdgeError(f"video file {path} is empty")


def _video_frames(source: str, kind: str, timeout_s: float) -> Iterator[Frame]:
    """Decode the first video stream of a file, camera or network stream.

    The container is opened on first `next`, so that for live sources the open (which can block
    on a network) happens in the reader thread, under the answerer's timeout.
    """
    _check_local(source, kind)
    av = import_av()
    name = shown(source)

    def frames() -> Iterator[Frame]:
        container = _open_container(av, source, kind, timeout_s)
        try:
            if not container.streams.video:
                raise LlavaEdgeError(f"{name} has no video stream")
            stream = container.streams.video[0]
            # Frame threads decode several frames at once, each frame out one per thread late:
            # a camera's or stream's newest frame would trail it. Slice threads add no delay.
            stream.thread_type = "SLICE" if kind in ("device", "stream") else "AUTO"
            first: float | None = None
            rate = float(stream.average_rate) if stream.average_rate else 0.0
            decoded = _decode(av, container, stream, name, kind, timeout_s)
            for index, frame in enumerate(decoded):
                media = frame.time if frame.time is not None else (index / rate if rate else 0.0)
                first = media if first is None else first
                yield Frame(VideoPixels(frame, name), index, media - first)
        finally:
            container.close()

    return frames()


def _open_container(av: Any, source: str, kind: str, timeout_s: float) -> Any:
    options: dict[str, str] = {}
    if source.startswith(("rtsp://", "rtsps://")):
        options["rtsp_transport"] = "tcp"  # UDP loses packets on Wi-Fi; TCP is what most want
    try:
        return av.open(
            source,
            format="v4l2" if kind == "device" else None,
            options=options,
            timeout=(timeout_s, timeout_s) if kind == "stream" else None,
        )
    except av.error.FFmpegError as e:
        what = {"device": "camera", "stream": "stream", "file": "video file"}[kind]
        reason = _ffmpeg_reason(e)
        if isinstance(e, av.error.ExitError):  # FFmpeg's timeout ends the open this way
            reason = f"no answer for {timeout_s:g} s (check the address, or raise the timeout)"
        raise LlavaEdgeError(f"cannot open {what} {shown(source)}: {reason}") from None


def _decode(
    av: Any, container: Any, stream: Any, source: str, kind: str, timeout_s: float
) -> Iterator[Any]:
    index = 0
    try:
        for frame in container.decode(stream):
            yield frame
            index += 1
    except av.error.EOFError:
        return
    except av.error.ExitError:  # FFmpeg's timeout: nothing came for timeout_s
        raise _stalled(source, timeout_s) from None
    except av.error.FFmpegError as e:
        reason = _ffmpeg_reason(e)
        if kind == "device":  # V4L2 reads fail with ENODEV once the camera is gone
            raise LlavaEdgeError(
                f"camera {source} stopped after {index} frames ({reason}): it was unplugged or "
                "failed; check it and its cable"
            ) from None
        why = (
            "the stream failed or sent corrupt data"
            if kind == "stream"
            else "the file is truncated or corrupt"
        )
        raise LlavaEdgeError(f"{source} broke after {index} frames ({reason}): {why}") from None


def _ffmpeg_reason(error: Exception) -> str:
    """FFmpeg's message without the errno prefix PyAV adds."""
    text = getattr(error, "strerror", None) or first_line(error)
    return str(text).rstrip(".")
