"""`Pipeline.watch` and `llava-edge watch` on video files made here with PyAV, image folders,
live (paced) replays with a slow answerer, and sources that are missing, broken or stalled.

Each generated frame is grey at level 6 x its index (up to 42 frames), so the frame an answer was given can be read
back from its pixels."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av  # the video extra, in dev
import numpy as np
import pytest
from conftest import write_pgm16
from PIL import Image

from llava_edge import cli
from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Answer, Limits, Pipeline, TimedOut, anyres
from llava_edge.runtime.anyres import ImagePixels
from llava_edge.runtime.frames import (
    Frame,
    LatestFrame,
    VideoPixels,
    _followed_folder,
    live_frames,
)
from llava_edge.runtime.image import load_image
from llava_edge.runtime.watch import WatchAnswer
from llava_edge.training.checkpoint import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

STEP = 6


def make_video(path: Path, frames: int, fps: int, codec: str = "ffv1") -> Path:
    """`frames` grey frames at `fps`; frame i has level STEP * i and timestamp i / fps."""
    pix_fmt = {"ffv1": "yuv420p", "mjpeg": "yuvj420p", "mpeg4": "yuv420p"}[codec]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), STEP * i, np.uint8), "rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def level(image) -> int:
    """Which generated frame this is (an array, a folder's image file, or a frame as the tiny
    model's vision encoder takes it: the red value at its centre, its normalization undone)."""
    if isinstance(image, ImagePixels):
        pixels = image.pixels
        centre = float(pixels[0, 0, pixels.shape[2] // 2, pixels.shape[3] // 2])
        return round((centre * OPENAI_CLIP_STD[0] + OPENAI_CLIP_MEAN[0]) * 255 / STEP)
    return round(float(np.asarray(load_image(image)).mean()) / STEP)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path):
    with Pipeline.load(tiny_model_dir) as p:
        yield p


class Recorder:
    """Stands in for `pipe._answer_prepared`, which a watch asks with: records which frames each
    prompt got; answers from them."""

    def __init__(self, delay_s: float = 0.0, text=lambda levels: f"frame {levels[-1]}"):
        self.delay_s, self.text = delay_s, text
        self.seen: list[list[int]] = []

    def __call__(self, images: list[ImagePixels], prompt: str, timer, **options) -> Answer:
        levels = [level(i) for i in images]
        self.seen.append(levels)
        time.sleep(self.delay_s)
        return Answer(self.text(levels), [], [], "eos", {"total_ms": 1.0})


@pytest.fixture
def recorder(pipe, monkeypatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(pipe, "_answer_prepared", rec)
    return rec


def test_a_file_is_sampled_by_its_timestamps(pipe, recorder, tmp_path) -> None:
    video = make_video(tmp_path / "clip.mkv", frames=30, fps=10)
    answers = list(pipe.watch(video, "What is there?", every_s=0.5))
    assert [a.index for a in answers] == [0, 5, 10, 15, 20, 25]
    assert [a.timestamp for a in answers] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert recorder.seen == [[0], [5], [10], [15], [20], [25]]  # the frame at that time
    assert [a.text for a in answers] == [f"frame {i}" for i in (0, 5, 10, 15, 20, 25)]
    assert all(a.skipped == 0 for a in answers)  # offline: nothing is dropped
    two = list(pipe.watch(video, "What?", every_s=0.25, max_frames=2))
    assert [a.timestamp for a in two] == pytest.approx([0.0, 0.3])  # first frame at or after


def test_recordings_joined_end_to_end_are_sampled_to_the_end(pipe, recorder, tmp_path) -> None:
    """MPEG-TS segments joined with `cat` (as dashcams and recorders split them): the second
    segment's timestamps start again from 0, and its frames are sampled as the first's."""
    joined = joined_segments(tmp_path, frames=20, fps=10)
    answers = list(pipe.watch(joined, "What is there?", every_s=0.5))
    assert [a.index for a in answers] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert [a.timestamp for a in answers] == pytest.approx([0, 0.5, 1, 1.5] * 2)
    assert recorder.seen == [[0], [5], [10], [15]] * 2


def test_a_live_replay_of_joined_recordings_paces_each(pipe, recorder, tmp_path) -> None:
    joined = joined_segments(tmp_path, frames=10, fps=20)  # 2 x 0.5 s
    start = time.monotonic()
    answers = list(pipe.watch(joined, "Now?", every_s=0.0, live=True))
    assert time.monotonic() - start >= 0.9  # the second segment is not read all at once
    assert answers[-1].index == 19 and sum(a.skipped for a in answers) + len(answers) == 20


def joined_segments(tmp_path: Path, frames: int, fps: int) -> Path:
    """Two identical MPEG-TS segments joined with `cat`: the second's timestamps start again."""
    segment = tmp_path / "segment.ts"
    with av.open(str(segment), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), STEP * i, np.uint8), "rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(segment.read_bytes() * 2)
    return joined


def test_an_image_folder_is_a_slideshow(pipe, recorder, tmp_path) -> None:
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 30, 3), STEP * i, np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    answers = list(pipe.watch(folder, "Anything new?", every_s=1.0, folder_fps=2.0))
    assert [(a.index, a.timestamp) for a in answers] == [(0, 0.0), (2, 1.0)]
    assert recorder.seen == [[0], [2]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LlavaEdgeError, match="holds no images"):
        pipe.watch(empty, "?")


def test_a_picture_file_is_one_frame_read_as_run_reads_it(pipe, monkeypatch, tmp_path) -> None:
    """`watch --source photo.png` was decoded by FFmpeg as a one-frame video: transparency
    dropped (not over white, as load_image composites it), a JPEG's colours some levels off and
    its EXIF orientation not applied, and PyAV needed. A picture file is one frame, whose pixels
    are `run --image`'s; an animated GIF or PNG stays the video FFmpeg plays."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (40, 48, 4), np.uint8)
    rgba[:20, :, 3] = 0  # transparent over random colours: white in load_image
    Image.fromarray(rgba).save(tmp_path / "photo.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgba[..., :3]).save(tmp_path / "side.jpg", exif=exif, quality=90)
    given: list[np.ndarray] = []

    def answer(images, prompt, timer, **options) -> Answer:
        given.append(images[-1].pixels)
        return Answer("ok", [], [], "eos", {"total_ms": 1.0})

    monkeypatch.setattr(pipe, "_answer_prepared", answer)

    def no_pyav():
        raise AssertionError("a picture is no video")

    monkeypatch.setattr("llava_edge.runtime.frames.import_av", no_pyav)
    for name in ("photo.png", "side.jpg"):
        answers = list(pipe.watch(tmp_path / name, "?", every_s=0))
        assert [(a.index, a.timestamp, a.error) for a in answers] == [(0, 0.0, None)]
        np.testing.assert_array_equal(given.pop(), pipe.image_pixels(tmp_path / name).pixels)
    monkeypatch.undo()
    frames = [Image.fromarray(np.full((20, 30, 3), STEP * i, np.uint8)) for i in range(4)]
    for suffix in (".gif", ".png", ".webp"):
        animation = tmp_path / f"anim{suffix}"
        frames[0].save(
            animation, save_all=True, append_images=frames[1:], duration=100, lossless=True
        )
        answers = list(pipe.watch(animation, "?", every_s=0))
        # FFmpeg decodes no animated WebP: its first frame, as run reads it
        played = [0.0] if suffix == ".webp" else [0.0, 0.1, 0.2, 0.3]
        assert [a.timestamp for a in answers] == pytest.approx(played)


def test_a_video_named_as_a_picture_plays_as_its_video(pipe, recorder, tmp_path) -> None:
    """A video whose name ends as a picture's (clip.png holding an MP4) is the video FFmpeg
    plays, not one picture that load_image refuses as a video, telling to watch it."""
    video = make_video(tmp_path / "clip.mp4", frames=5, fps=10, codec="mpeg4")
    named = video.rename(tmp_path / "clip.png")
    answers = list(pipe.watch(named, "?", every_s=0))
    assert [(a.index, a.error) for a in answers] == [(i, None) for i in range(5)]


def test_a_watchs_seconds_and_rates_may_be_numpy_numbers(pipe, recorder, tmp_path) -> None:
    """Robot code holds its settings in numpy (a ROS parameter read into an array, a rate
    computed from a camera's timestamps): every_s, folder_fps, timeout_s and reconnect_s take
    numpy's numbers as they take Python's, and give the same frames."""
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 30, 3), STEP * i, np.uint8)).save(folder / f"{i:03d}.png")
    options = {"every_s": np.float32(1.0), "folder_fps": np.int64(2), "timeout_s": np.int32(5)}
    answers = list(pipe.watch(folder, "Anything new?", reconnect_s=np.float64(0), **options))
    assert [(a.index, a.timestamp) for a in answers] == [(0, 0.0), (2, 1.0)]
    frames = [np.zeros((8, 8, 3), np.uint8)] * 2
    assert len(list(pipe.watch(frames, "?", every_s=np.int64(0), timeout_s=np.float32(5)))) >= 1
    with pytest.raises(LlavaEdgeError, match=r"every_s \(--every\) must be 0 or more seconds"):
        pipe.watch(folder, "?", every_s=np.float32(-1))


def test_a_folder_of_sixteen_bit_pgm_depth_frames_is_read(tmp_path) -> None:
    """Depth and machine-vision cameras save 16-bit PGM (PNM) frames, which load_image reads;
    hidden files (the AppleDouble files macOS leaves beside each image) and folders are not
    frames."""
    from llava_edge.runtime.frames import open_frames

    folder = tmp_path / "depth"
    folder.mkdir()
    depth = np.linspace(0, 65535, 20 * 30).reshape(20, 30).astype(np.uint16)
    write_pgm16(folder / "000.pgm", depth)
    for i, suffix in enumerate((".PPM", ".pnm"), start=1):
        Image.fromarray((depth >> 8).astype(np.uint8)).save(
            folder / f"{i:03d}{suffix}", format="PPM"
        )
    (folder / "._000.pgm").write_bytes(b"\x00\x05\x16\x07")  # macOS's AppleDouble on a USB stick
    (folder / "subdir.png").mkdir()
    frames = list(open_frames(folder, every_s=0))
    assert [frame.image.name for frame in frames] == ["000.pgm", "001.PPM", "002.pnm"]
    assert np.array_equal(np.asarray(load_image(frames[0].image)), np.asarray(load_image(depth)))


def shots(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.full((20, 30, 3), STEP * i, np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_a_followed_folder_answers_its_pictures_as_they_come(
    pipe, recorder, monkeypatch, tmp_path
) -> None:
    """--follow: a robot's capture script drops pictures into a folder. Those there at the start
    come first, as a camera's frames do, then each new or rewritten one once it is whole (one
    written slowly is never read half), and a folder that gets no picture for the source
    timeout has stalled."""
    monkeypatch.setattr("llava_edge.runtime.frames.FOLLOW_POLL_S", 0.25)  # 5 pieces a listing
    folder = shots(tmp_path / "shots", 3)
    picture = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), STEP * 10, np.uint8)).save(picture, "BMP")

    def capture() -> None:
        with open(folder / "010.bmp", "wb", buffering=0) as file:  # 10 pieces over 0.5 s
            data = picture.getvalue()
            for i in range(10):
                file.write(data[i * len(data) // 10 : (i + 1) * len(data) // 10])
                time.sleep(0.05)
        time.sleep(0.4)
        Image.fromarray(np.full((20, 30, 3), STEP * 20, np.uint8)).save(folder / "000.png")

    writer = threading.Thread(target=capture)
    writer.start()
    answers = []
    with pytest.raises(LlavaEdgeError, match="no frame from .*shots for 1 s"):
        for answer in pipe.watch(folder, "?", every_s=0.0, follow=True, timeout_s=1.0):
            answers.append(answer)
    writer.join()
    assert all(a.error is None for a in answers)
    assert recorder.seen[-3:] == [[2], [10], [20]]  # the last there at the start, then the new
    assert [a.index for a in answers][-3:] == [2, 3, 4]
    assert sum(a.skipped for a in answers) + len(answers) == 5


def test_a_picture_renamed_into_place_faster_than_the_listings_is_answered(
    pipe, recorder, tmp_path
) -> None:
    """A camera daemon writes each frame under a hidden name and renames it over latest.png,
    several times a listing: a name that never lists the same twice was never read (the watch
    stalled). Another file under the name since the last listing was moved there whole: it is
    read at once."""
    folder = shots(tmp_path / "shots", 0)
    stop = threading.Event()

    def daemon() -> None:
        for i in range(1, 40):
            if stop.is_set():
                return
            Image.fromarray(np.full((20, 30, 3), STEP * i, np.uint8)).save(folder / ".next.png")
            os.replace(folder / ".next.png", folder / "latest.png")
            time.sleep(0.03)

    Image.fromarray(np.full((20, 30, 3), 0, np.uint8)).save(folder / "latest.png")
    writer = threading.Thread(target=daemon)
    writer.start()
    try:
        with pytest.raises(LlavaEdgeError, match="no frame from"):
            for _ in pipe.watch(folder, "?", every_s=0.0, follow=True, timeout_s=0.5):
                pass
    finally:
        stop.set()
        writer.join()
    levels = [seen[0] for seen in recorder.seen]
    assert len(levels) >= 3 and levels == sorted(levels) and levels[-1] > 0


def test_a_followed_folder_remembers_only_the_pictures_still_there(monkeypatch, tmp_path) -> None:
    """A capture script that deletes old pictures as it adds new ones runs for days: the
    follower forgets a picture once it has left the folder (it held every name it had ever
    handed over), so one moved out and back (the same file) is a picture that came again."""
    monkeypatch.setattr("llava_edge.runtime.frames.FOLLOW_POLL_S", 0.0)
    folder = shots(tmp_path / "shots", 2)
    aside = tmp_path / "aside.png"
    frames = _followed_folder(folder, threading.Event())

    def listing() -> list[str]:  # what one listing hands over
        return [frame.image.name for frame in iter(lambda: next(frames), None)]

    assert listing() == [] and listing() == ["000.png", "001.png"]
    (folder / "000.png").rename(aside)
    assert listing() == []
    aside.rename(folder / "000.png")  # the same file: inode, size and modification time
    assert listing() == [] and listing() == ["000.png"]
    assert listing() == []
    frames.close()


def test_a_followed_picture_file_answers_each_rewrite(pipe, recorder, monkeypatch, tmp_path):
    """`watch --source /tmp/latest.jpg --follow`: a camera daemon rewrites one picture, in place
    or by renaming a new one over it. Each version is answered once it is whole, and a picture
    not rewritten for the source timeout has stalled, as a followed folder's."""
    monkeypatch.setattr("llava_edge.runtime.frames.FOLLOW_POLL_S", 0.05)
    latest = tmp_path / "latest.png"

    def picture(i: int, path: Path = latest) -> None:
        Image.fromarray(np.full((20, 30, 3), STEP * i, np.uint8)).save(path)

    def daemon() -> None:
        time.sleep(0.4)
        picture(10)  # in place
        time.sleep(0.4)
        picture(20, tmp_path / ".next.png")
        os.replace(tmp_path / ".next.png", latest)

    picture(0)
    writer = threading.Thread(target=daemon)
    writer.start()
    answers = []
    with pytest.raises(LlavaEdgeError, match="no frame from .*latest.png for 1 s"):
        for answer in pipe.watch(latest, "?", every_s=0.0, follow=True, timeout_s=1.0):
            answers.append(answer)
    writer.join()
    assert recorder.seen == [[0], [10], [20]]
    assert [a.index for a in answers] == [0, 1, 2] and all(a.error is None for a in answers)
    with pytest.raises(LlavaEdgeError, match="does not exist"):
        pipe.watch(tmp_path / "none.png", "?", follow=True)
    for options in ({"live": False}, {"folder_fps": 2.0}, {"reconnect_s": 1.0}):
        with pytest.raises(LlavaEdgeError, match="followed picture|no connection"):
            pipe.watch(latest, "?", follow=True, **options)


def test_follow_is_refused_where_there_is_no_folder_to_follow(pipe, tmp_path) -> None:
    video = make_video(tmp_path / "clip.mkv", frames=4, fps=10)
    folder = shots(tmp_path / "shots", 2)
    with pytest.raises(LlavaEdgeError, match=r"follow \(--follow\) .*a video file: drop it"):
        pipe.watch(video, "?", follow=True)
    for options in ({"live": False}, {"folder_fps": 2.0}, {"reconnect_s": 1.0}):
        with pytest.raises(LlavaEdgeError, match="followed folder|no connection"):
            pipe.watch(folder, "?", follow=True, **options)


def test_a_live_folder_is_replayed_at_its_rate(pipe, recorder, tmp_path) -> None:
    folder = shots(tmp_path / "shots", 8)  # 0.8 s at 10 images a second
    start = time.monotonic()
    answers = list(pipe.watch(folder, "Now?", every_s=0.2, live=True, folder_fps=10))
    assert time.monotonic() - start >= 0.7 - 0.05  # paced: not read all at once
    assert [a.index for a in answers] == [0, 2, 4, 6]  # each due frame in its time, none lost
    assert all(a.skipped == 0 for a in answers)


def test_every_frame_of_the_largest_window_that_fits_is_answered(pipe, tmp_path) -> None:
    question = "What changed?"
    fit = pipe.images_that_fit(question)
    folder = shots(tmp_path / "shots", fit + 2)
    runs = pipe.stats["vision_runs"]
    answers = list(pipe.watch(folder, question, every_s=0, frames=fit, max_new_tokens=1))
    assert [a.index for a in answers] == list(range(fit + 2))
    assert answers[-1].frames == list(range(2, fit + 2))
    assert pipe.stats["vision_runs"] - runs <= fit + 2  # each frame encoded once: none evicted
    long_question = question + " Look closely." * 40  # longer: fewer frames fit
    assert pipe.images_that_fit(long_question) < fit
    with pytest.raises(LlavaEdgeError, match="--frames"):
        pipe.watch(folder, long_question, frames=fit)


def test_a_slow_answerer_skips_stale_frames_instead_of_queueing(pipe, monkeypatch, tmp_path):
    video = make_video(tmp_path / "live.mkv", frames=40, fps=20)  # 2 s, replayed in real time
    slow = Recorder(delay_s=0.2)  # four frames arrive during each answer
    monkeypatch.setattr(pipe, "_answer_prepared", slow)
    answers = list(pipe.watch(video, "Now?", every_s=0.0, live=True))
    indices = [a.index for a in answers]
    assert slow.seen == [[i] for i in indices]  # each answer got the frame it reports
    assert indices == sorted(indices) and len(answers) < 20
    assert any(a.skipped > 0 for a in answers)
    # every frame was either answered or counted as skipped: none waits in a queue
    assert sum(a.skipped for a in answers) + len(answers) == 40
    for before, after in zip(answers, answers[1:], strict=False):
        assert after.skipped == after.index - before.index - 1
    assert indices[-1] == 39  # the source's last frame is answered, then the watch ends


def test_only_the_frames_answered_are_converted_to_rgb(pipe, monkeypatch, tmp_path) -> None:
    """Most of a camera's frames are dropped: converting each from the decoder's YUV as it
    arrives would spend the reader's CPU on pixels nobody looks at."""
    converted = []
    convert = VideoPixels.rgb
    monkeypatch.setattr(VideoPixels, "rgb", lambda self: converted.append(self) or convert(self))
    monkeypatch.setattr(pipe, "_answer_prepared", Recorder(delay_s=0.2))
    video = make_video(tmp_path / "clip.mkv", frames=30, fps=20)
    answers = list(pipe.watch(video, "Now?", every_s=0.5))  # offline: 3 of 30
    assert len(converted) == len(answers) == 3
    converted.clear()
    answers = list(pipe.watch(video, "Now?", every_s=0.0, live=True))  # 1.5 s, 0.2 s answers
    assert len(converted) == len(answers) < 30


def test_a_folders_images_are_read_only_when_answered(pipe, recorder, tmp_path) -> None:
    folder = shots(tmp_path / "shots", 4)
    (folder / "001.png").write_bytes(b"not a png")  # never sampled: never read
    answers = list(pipe.watch(folder, "Now?", every_s=1.0, folder_fps=2.0))
    assert [a.index for a in answers] == [0, 2] and recorder.seen == [[0], [2]]


def test_live_sampling_keeps_the_interval(pipe, recorder, tmp_path) -> None:
    video = make_video(tmp_path / "live.mkv", frames=20, fps=20)
    answers = list(pipe.watch(video, "Now?", every_s=0.3, live=True))
    times = [a.timestamp for a in answers]  # due by arrival: within a frame of the interval
    assert all(b - a >= 0.3 - 0.05 - 1e-6 for a, b in zip(times, times[1:], strict=False))
    assert 3 <= len(answers) <= 4  # 0.0, 0.3, 0.6, 0.9 (if the answerer kept up)


def test_changes_only_reports_when_the_answer_changes(pipe, monkeypatch, tmp_path) -> None:
    video = make_video(tmp_path / "door.mkv", frames=30, fps=10)
    rec = Recorder(text=lambda levels: "The door is closed." if levels[0] < 15 else "Door open")
    monkeypatch.setattr(pipe, "_answer_prepared", rec)
    answers = list(pipe.watch(video, "Is the door open?", every_s=0.1, changes_only=True))
    assert [(a.index, a.text) for a in answers] == [(0, "The door is closed."), (15, "Door open")]
    assert len(rec.seen) == 30  # every frame was asked about, two answers reported


def test_several_frames_per_prompt(pipe, monkeypatch, tmp_path) -> None:
    video = make_video(tmp_path / "clip.mkv", frames=20, fps=10)
    limit = pipe.images_that_fit("What changed?")
    assert 3 <= limit <= pipe.max_images_per_prompt
    with pytest.raises(
        LlavaEdgeError, match=f"holds {limit} frames and an answer.*--frames {limit}"
    ):
        pipe.watch(video, "What changed?", frames=limit + 1)
    real = list(pipe.watch(video, "What changed?", every_s=0.5, frames=2, max_new_tokens=2))
    assert [a.frames for a in real] == [[0], [0, 5], [5, 10], [10, 15]]
    rec = Recorder()
    monkeypatch.setattr(pipe, "_answer_prepared", rec)
    answers = list(pipe.watch(video, "What changed?", every_s=0.5, frames=3))
    assert rec.seen == [[0], [0, 5], [0, 5, 10], [5, 10, 15]]
    assert answers[-1].frames == [5, 10, 15]


def test_each_frame_is_prepared_once_however_many_answers_it_is_in(
    pipe, monkeypatch, tmp_path
) -> None:
    """`frames=3` asks about each frame in up to three answers: it is read and prepared for the
    vision encoder once (resizing, normalizing and hashing a 1080p frame take about 30 ms), and
    each answer is the one `answer` gives about the same frames, token for token."""
    folder = tmp_path / "shots"
    folder.mkdir()
    rng = np.random.default_rng(3)
    pictures = [rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for _ in range(5)]
    for i, one in enumerate(pictures):
        Image.fromarray(one).save(folder / f"{i}.png")
    options = dict(max_new_tokens=4, ignore_eos=True)
    windows = [pictures[max(0, i - 2) : i + 1] for i in range(len(pictures))]
    expected = [pipe.answer(window, "What changed?", **options) for window in windows]
    prepared, answers = [], []
    batch = anyres.pixel_batch
    monkeypatch.setattr(anyres, "pixel_batch", lambda *a: prepared.append(a) or batch(*a))
    real = pipe._answer_prepared
    monkeypatch.setattr(
        pipe, "_answer_prepared", lambda *a, **o: answers.append(real(*a, **o)) or answers[-1]
    )
    watched = list(pipe.watch(folder, "What changed?", every_s=0, frames=3, **options))
    assert len(prepared) == len(pictures)  # one each, not 1 + 2 + 3 + 3 + 3
    assert [a.frames for a in watched][-1] == [2, 3, 4]
    assert [(a.prompt_token_ids, a.token_ids) for a in answers] == [
        (a.prompt_token_ids, a.token_ids) for a in expected
    ]


def test_real_answers_through_the_cli(tiny_model_dir, tmp_path, capsys) -> None:
    video = make_video(tmp_path / "clip.mkv", frames=10, fps=10)
    argv = ["watch", str(tiny_model_dir), "--source", str(video), "--prompt", "What is it?"]
    argv += ["--every", "0.5", "--max-new-tokens", "3"]
    assert cli.main([*argv, "--jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["index"], x["timestamp"], x["frames"]) for x in lines] == [
        (0, 0.0, [0]),
        (5, 0.5, [5]),
    ]
    assert all(isinstance(x["text"], str) for x in lines)
    assert all(x["timings"]["lag_ms"] >= x["timings"]["frame_age_ms"] >= 0 for x in lines)
    assert cli.main([*argv, "--max-frames", "1"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 1 and text[0].strip().startswith("0.00s  frame 0:")


def test_the_cli_prints_each_answer_on_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """An answer's newlines and escape sequences are shown escaped, one frame a line."""
    answers = Recorder(text=lambda levels: f"frame {levels[-1]}\nnext\x1b[2J\r\u00e9")
    monkeypatch.setattr(Pipeline, "_answer_prepared", answers)
    video = make_video(tmp_path / "clip.mkv", frames=10, fps=10)
    argv = ["watch", str(tiny_model_dir), "--source", str(video), "--prompt", "What is it?"]
    assert cli.main([*argv, "--every", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        f"frame {n}\\nnext\\x1b[2J\\r\u00e9" for n in (0, 5)
    ]


# ---- sources that go wrong -------------------------------------------------------------------


def test_missing_broken_and_truncated_sources_give_one_line_errors(
    pipe, tmp_path, capsys, monkeypatch
):
    with pytest.raises(LlavaEdgeError, match=r"camera /dev/video97 does not exist.*ls /dev/video"):
        pipe.watch("/dev/video97", "?")
    with pytest.raises(LlavaEdgeError, match="video file .*nowhere.mp4 does not exist"):
        pipe.watch(tmp_path / "nowhere.mp4", "?")
    with monkeypatch.context() as without_pyav:  # a picture needs no PyAV
        without_pyav.setattr("llava_edge.runtime.frames.import_av", lambda: 1 / 0)
        with pytest.raises(LlavaEdgeError, match="^picture file .*nowhere.JPG does not exist$"):
            pipe.watch(tmp_path / "nowhere.JPG", "?")
    with pytest.raises(LlavaEdgeError, match="a camera is a device path: /dev/video0"):
        pipe.watch("0", "?")  # a camera index, as OpenCV takes one
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video " * 100)
    with pytest.raises(LlavaEdgeError, match="cannot open video file .*junk.mp4: Invalid data"):
        list(pipe.watch(junk, "?"))
    mp4 = make_video(tmp_path / "clip.mp4", frames=20, fps=10, codec="mpeg4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])  # its index is at the end
    with pytest.raises(LlavaEdgeError, match="cannot open video file .*cut.mp4"):
        list(pipe.watch(cut, "?"))
    avi = make_video(tmp_path / "clip.avi", frames=20, fps=10, codec="mjpeg")
    broken = tmp_path / "broken.avi"
    broken.write_bytes(avi.read_bytes()[: avi.stat().st_size // 2])
    with pytest.raises(LlavaEdgeError, match=r"broken.avi broke after \d+ frames"):
        list(pipe.watch(broken, "?", every_s=0.0, max_new_tokens=1))
    for argv in (["--source", "/dev/video97"], ["--source", str(broken), "--every", "0"]):
        code = cli.main(["watch", str(Path(pipe.model_dir)), "--prompt", "?", *argv])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_stream_that_never_delivers_times_out(pipe, tmp_path) -> None:
    """A named pipe that nobody feeds times out, read live or offline."""
    fifo = tmp_path / "stream.ts"
    os.mkfifo(fifo)  # nobody writes: opening it for reading blocks, as a dead server would
    for live in (True, None, False):
        outcome: list[BaseException | None] = []

        def watch(live=live, outcome=outcome) -> None:
            try:
                list(pipe.watch(fifo, "?", live=live, timeout_s=0.5))
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        worker = threading.Thread(target=watch, daemon=True)
        worker.start()
        worker.join(timeout=5)
        with open(fifo, "wb"):  # unblock the reader: it sees an empty stream and ends
            pass
        worker.join(timeout=5)
        assert len(outcome) == 1 and isinstance(outcome[0], LlavaEdgeError), (live, outcome)
        assert "no frame from" in str(outcome[0]) and "for 0.5 s: the source stalled" in str(
            outcome[0]
        )


def test_a_live_stream_is_decoded_without_frame_delay(tmp_path) -> None:
    """H.264 decoded with frame threads gives each frame out one thread late (several frames on
    a board with many cores): for a camera or a stream the newest frame decoded must be the
    newest sent. A pipe fed one packet every 25 ms; raw H.264 is delimited by the next packet's
    start, so a frame comes out when the packet after it is in."""
    from fractions import Fraction

    from llava_edge.runtime.frames import _video_frames

    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
    encoder.time_base, encoder.framerate = Fraction(1, 40), Fraction(40)
    encoder.options = {"tune": "zerolatency", "preset": "ultrafast"}
    packets = []
    for i in range(110):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), "rgb24")
        frame.pts = i
        packets += [bytes(p) for p in encoder.encode(frame)]
    packets += [bytes(p) for p in encoder.encode(None)]
    fifo = tmp_path / "camera.h264"
    os.mkfifo(fifo)
    written, sent = [0], threading.Event()

    def send() -> None:
        with open(fifo, "wb", buffering=0) as pipe:
            for packet in packets:
                pipe.write(packet)
                written[0] += 1
                time.sleep(0.025)
        sent.set()

    threading.Thread(target=send, daemon=True).start()
    lags = []  # packets sent beyond the frame just decoded, while the sender still sends
    for frame in _video_frames(str(fifo), "stream", timeout_s=10.0):
        if not sent.is_set() and frame.index >= 60:  # past the packets FFmpeg probes at open
            lags.append(written[0] - frame.index - 1)
    assert lags and min(lags) <= 1, lags


def test_video_on_standard_input_is_watched(tiny_model_dir, tmp_path) -> None:
    """`ffmpeg ... | llava-edge watch --source /dev/stdin` (or `-`): standard input fed by a
    pipe, or redirected from a file."""
    video = make_video(tmp_path / "clip.mkv", frames=10, fps=10)
    argv = [sys.executable, "-m", "llava_edge.cli", "watch", str(tiny_model_dir)]
    argv += ["--source", "/dev/stdin", "--prompt", "?", "--every", "0", "--jsonl"]
    argv += ["--max-new-tokens", "1"]
    run = subprocess.run(argv, input=video.read_bytes(), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    assert answers and answers[-1]["index"] == 9
    assert sum(a["skipped"] for a in answers) + len(answers) == 10  # live: stale frames dropped
    argv[argv.index("/dev/stdin")] = "-"  # as most tools name standard input
    with open(video, "rb") as file:  # `< clip.mkv`: standard input is the file itself
        run = subprocess.run(argv, stdin=file, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    assert [a["index"] for a in answers] == list(range(10))  # a file: every frame, in order


def test_a_source_that_stalls_mid_way_times_out_and_a_clean_end_is_not_an_error() -> None:
    release = threading.Event()

    def frames():
        for i in range(2):
            yield Frame(np.zeros((2, 2, 3), np.uint8), i, i * 0.1)
        release.wait()  # the camera stops sending

    latest = LatestFrame(frames(), every_s=0.0)
    latest.start()
    time.sleep(0.2)
    assert latest.take(1.0, "cam").index == 1
    with pytest.raises(LlavaEdgeError, match="no frame from cam for 0.3 s"):
        latest.take(0.3, "cam")
    release.set()  # the generator ends: a clean end
    assert latest.take(1.0, "cam") is None
    latest.stop()

    def broken():
        yield Frame(np.zeros((2, 2, 3), np.uint8), 0, 0.0)
        raise OSError("connection reset by peer")

    stream = live_frames(broken(), 0.0, 1.0, "rtsp://cam")
    got = [next(stream).index]
    with pytest.raises(LlavaEdgeError, match="reading rtsp://cam failed: connection reset"):
        next(stream)
    assert got == [0]


def camera(timestamps: list[float], fps: float = 20.0):
    """A live source delivering a frame every 1 / fps seconds, with the timestamps given."""
    for i, timestamp in enumerate(timestamps):
        time.sleep(1 / fps)
        yield Frame(np.zeros((2, 2, 3), np.uint8), i, timestamp)


@pytest.mark.parametrize(
    "timestamps",
    [
        [0.0] * 24,  # none (a stream without timestamps)
        [i * 0.01 for i in range(24)],  # made up: a clock 5x slower than the camera's
        [5 + i * 0.05 for i in range(4)] + [i * 0.05 for i in range(20)],  # restarted
    ],
    ids=["none", "made-up", "restarted"],
)
def test_a_live_source_is_sampled_as_its_frames_arrive(timestamps) -> None:
    """MJPEG over HTTP stamps 25 frames a second whatever the camera's rate; other streams
    carry none, or start again from 0 when the sender restarts. A live watch still answers a
    frame every `every_s` seconds of this machine's clock, and says when it arrived."""
    taken = list(live_frames(camera(timestamps), every_s=0.2, timeout_s=2.0, name="cam"))
    ticks = [math.floor((f.received - taken[0].received) / 0.2 + 1e-6) for f in taken]
    assert len(taken) >= 4  # 1.2 s of frames, one due every 0.2 s
    assert ticks == sorted(set(ticks))  # at most one frame each 0.2 s of arrival
    assert taken[-1].timestamp >= 1.0 - 1e-6  # seconds since the first frame, as they arrived


def test_an_interval_longer_than_the_timeout_is_not_a_stall() -> None:
    """`--every 30` on a camera that sends all the while: only a source that sends nothing for
    the timeout has stalled."""
    sending = camera([i * 0.05 for i in range(24)])  # 20 frames a second for 1.2 s
    taken = list(live_frames(sending, every_s=0.5, timeout_s=0.2, name="cam"))
    assert 2 <= len(taken) <= 3  # 1.2 s of frames, one due every 0.5 s


def test_the_runtime_does_not_import_the_decoder() -> None:
    code = "import sys, llava_edge.runtime, llava_edge.runtime.watch; print('av' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_http_stream_is_live(pipe, recorder, tmp_path) -> None:
    """A stream served on this machine's loopback: read by the reader thread, through FFmpeg's
    network code with its timeouts; a live stream does not end while it works, so its end ends
    the watch with an error, after the answers about the frames it sent."""
    import functools
    import http.server

    make_video(tmp_path / "cam.mkv", frames=20, fps=10)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cam.mkv"
        answers = []
        with pytest.raises(LlavaEdgeError, match=r"stream http://.*cam.mkv ended after 20 frames"):
            for answer in pipe.watch(url, "Anyone?", every_s=0.0, timeout_s=5):
                answers.append(answer)
        indices = [a.index for a in answers]
        assert indices and indices == sorted(indices) and indices[-1] == 19
        assert sum(a.skipped for a in answers) + len(answers) == 20
        assert recorder.seen == [[i] for i in indices]
        missing = f"http://127.0.0.1:{server.server_address[1]}/nothing.mkv"
        with pytest.raises(LlavaEdgeError, match="cannot open stream .*nothing.mkv"):
            list(pipe.watch(missing, "?", timeout_s=5))
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "option, value",
    [
        ("timeout_s", float("inf")),
        ("timeout_s", float("nan")),
        ("timeout_s", 0),
        ("every_s", float("nan")),
        ("every_s", float("inf")),
        ("every_s", -1.0),
        ("every_s", "2"),
        ("folder_fps", float("nan")),
        ("folder_fps", 0),
    ],
)
def test_intervals_and_timeouts_must_be_finite_numbers(pipe, tmp_path, option, value) -> None:
    folder = shots(tmp_path / "shots", 2)
    with pytest.raises(LlavaEdgeError, match=rf"{option} \(--[a-z-]+\) must be"):
        pipe.watch(folder, "?", **{option: value})


@pytest.mark.parametrize("max_frames", [0, 1.5, "3", True])
def test_max_frames_must_be_a_whole_number(pipe, tmp_path, max_frames) -> None:
    folder = shots(tmp_path / "shots", 2)
    with pytest.raises(LlavaEdgeError, match="max_frames must be a whole number, at least 1"):
        pipe.watch(folder, "?", max_frames=max_frames)


def test_an_infinite_source_timeout_is_refused_by_the_cli(tiny_model_dir, tmp_path, capsys):
    video = make_video(tmp_path / "clip.mkv", frames=4, fps=10)
    argv = ["watch", str(tiny_model_dir), "--source", str(video), "--prompt", "?", "--live"]
    assert cli.main([*argv, "--source-timeout", "inf"]) == 1
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "timeout_s (--source-timeout) must be a positive number of seconds" in err
    )


def test_a_folder_rate_is_refused_for_what_is_not_a_folder(tiny_model_dir, tmp_path, capsys):
    """--folder-fps paces an image folder's slideshow; a video, a camera or an app's frames
    have their own pace, so the option would do nothing there: one line, not ignored."""
    video = make_video(tmp_path / "clip.mkv", frames=4, fps=10)
    argv = ["watch", str(tiny_model_dir), "--source", str(video), "--prompt", "?"]
    assert cli.main([*argv, "--folder-fps", "5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--folder-fps" in err and "image folder" in err, err
    with Pipeline.load(tiny_model_dir) as pipe:
        with pytest.raises(LlavaEdgeError, match=r"folder_fps \(--folder-fps\)"):
            pipe.watch(iter([np.zeros((8, 8, 3), np.uint8)]), "?", folder_fps=2.0)
        folder = shots(tmp_path / "shots", 2)  # its default pace, given or not
        with pipe.watch(folder, "?", folder_fps=1.0, max_new_tokens=1) as answers:
            assert [a.timestamp for a in answers] == [0.0, 1.0]


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llava-edge-frames" and t.is_alive()]


def test_leaving_a_watch_stops_its_reader_at_once(pipe, recorder, tmp_path) -> None:
    """A robot's handler that raises, or an app that closes its watch, stops the camera's reader
    there and then, though the answers are still bound to a name (the camera must be free for
    the next watch)."""
    video = make_video(tmp_path / "live.mkv", frames=40, fps=4)  # 10 s, replayed live
    before = len(readers())
    answers = pipe.watch(video, "Now?", every_s=0.0, live=True)
    with pytest.raises(RuntimeError, match="the handler failed"), answers:
        for _answer in answers:
            assert len(readers()) == before + 1
            raise RuntimeError("the handler failed")
    assert len(readers()) == before
    with pytest.raises(StopIteration):
        next(answers)
    answers = pipe.watch(video, "Now?", every_s=0.0, live=True)
    assert next(answers).index == 0 and len(readers()) == before + 1
    answers.close()
    assert len(readers()) == before


class InterruptedStart(threading.Thread):
    """A reader thread that starts, but whose starter gets Ctrl-C while `start` waits for it."""

    def start(self) -> None:
        super().start()
        raise KeyboardInterrupt


@pytest.mark.parametrize("source", ["app", "pipe"])
def test_a_ctrl_c_as_the_reader_starts_stops_it(pipe, recorder, monkeypatch, source) -> None:
    """Ctrl-C lands while the watch's first frame starts the reader (Thread.start waits for the
    thread, and on a loaded board that takes milliseconds): leaving the `with` block stopped
    nothing, and the reader went on reading the camera, which stayed open, for good."""
    from llava_edge.runtime import frames as frames_module

    opened = []

    def camera() -> Iterator[np.ndarray]:
        opened.append(True)
        try:
            while True:
                time.sleep(0.01)
                yield np.zeros((8, 8, 3), np.uint8)
        finally:
            opened.pop()

    def read_ahead() -> Iterator[Frame]:
        for i, image in enumerate(camera()):
            yield Frame(image, i, float(i))

    before = len(readers())
    monkeypatch.setattr(frames_module.threading, "Thread", InterruptedStart)
    with pytest.raises(KeyboardInterrupt):
        if source == "app":
            with pipe.watch(camera(), "Is the door open?", every_s=0.0) as answers:
                next(answers)
        else:
            next(frames_module._read_ahead(read_ahead(), 5.0, "a pipe"))
    monkeypatch.undo()
    deadline = time.monotonic() + 5
    while (opened or len(readers()) > before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not opened and len(readers()) == before


@pytest.mark.parametrize(
    "prompt, options, problem",
    [
        ("<image>\n<image>\nWhat changed?", {"frames": 2}, "leave the placeholders out"),
        ("<image>\nWhat changed?", {"frames": 2}, "each answer is about 1 to 2 frames"),
        ("<image>\n<image>\nWhat is it?", {}, "each answer is about one frame"),
        ("USER: What is it? ASSISTANT:", {"raw": True}, "this one holds 0"),
        ("USER: <image>\n<image>\nWhat? ASSISTANT:", {"raw": True, "frames": 2}, "frames=1"),
        ("<image>\nWhat is it?", {"raw": "false"}, "raw must be True or False"),
    ],
)
def test_placeholders_that_the_frames_cannot_fill_are_refused_at_once(
    pipe, tmp_path, prompt, options, problem
) -> None:
    """While the last K frames fill up, the first answers have fewer than K: a question with
    placeholders for K frames (or a raw prompt without its one) is refused before the source
    opens, not after the first answer."""
    video = make_video(tmp_path / "clip.mkv", frames=10, fps=10)
    with pytest.raises(LlavaEdgeError, match=problem):
        pipe.watch(video, prompt, every_s=0.5, max_new_tokens=2, **options)
    assert len(list(pipe.watch(video, "<image>\nWhat is it?", max_new_tokens=2))) == 1


@pytest.mark.parametrize(
    "option, value",
    [("changes_only", "false"), ("follow", "no"), ("live", "false"), ("live", 0)],
)
def test_a_watchs_switches_refuse_what_is_not_true_or_false(pipe, tmp_path, option, value) -> None:
    """A switch read from a config file as a string ("false") would read as true: a file would
    be replayed live, answers dropped as unchanged. It is refused, as `raw` is; numpy's bools
    pass."""
    video = make_video(tmp_path / "clip.mkv", frames=10, fps=10)
    with pytest.raises(LlavaEdgeError, match=f"{option} must be True or False"):
        pipe.watch(video, "What is it?", **{option: value})
    answers = pipe.watch(video, "?", changes_only=np.bool_(False), live=np.bool_(False))
    assert len(list(answers)) == 1


def test_the_cli_refuses_placeholders_for_several_frames(tiny_model_dir, tmp_path, capsys):
    video = make_video(tmp_path / "clip.mkv", frames=10, fps=10)
    argv = ["watch", str(tiny_model_dir), "--source", str(video), "--frames", "2"]
    assert cli.main([*argv, "--prompt", "<image>\n<image>\nWhat changed?"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leave the placeholders out" in err


# ---- an app's own frames ---------------------------------------------------------------------


def test_an_apps_fast_camera_is_answered_about_its_newest_frame(pipe, monkeypatch) -> None:
    """A driver filling one buffer 100 times a second, an answerer taking 0.1 s: stale frames
    are dropped, never queued, and each answer is about the pixels of the frame it reports."""
    released = threading.Event()

    def driver():
        buffer = np.zeros((24, 32, 3), np.uint8)
        try:
            for i in range(40):
                buffer[:] = STEP * i  # the same buffer, refilled
                yield buffer
                time.sleep(0.01)
        finally:
            released.set()

    slow = Recorder(delay_s=0.1)
    monkeypatch.setattr(pipe, "_answer_prepared", slow)
    answers = list(pipe.watch(driver(), "Now?", every_s=0.0))
    indices = [a.index for a in answers]
    assert slow.seen == [[i] for i in indices]  # not the buffer's later contents
    assert len(answers) < 40 and indices[-1] == 39
    assert sum(a.skipped for a in answers) + len(answers) == 40
    assert released.is_set()


def test_each_answer_says_how_stale_it_is_when_ready(pipe, monkeypatch) -> None:
    """A robot acts on an answer when it is ready: it must see how old the frame was then (the
    frame's wait for the answerer, plus the answer's own time), not only when the answer began."""
    taken = threading.Event()

    def driver():
        yield np.zeros((24, 32, 3), np.uint8)
        taken.wait(5)  # no newer frame while the answer runs

    monkeypatch.setattr(pipe, "_answer_prepared", Recorder(delay_s=0.3))
    with pipe.watch(driver(), "Now?", every_s=0.0, max_frames=1) as answers:
        answer = next(answers)
        taken.set()
    waited, lag = answer.timings["frame_age_ms"], answer.timings["lag_ms"]
    assert waited >= 0 and lag >= waited + 300
    assert answer.to_dict()["timings"]["lag_ms"] == lag


def test_an_apps_camera_that_gives_none_raises_or_stops(pipe, recorder) -> None:
    released = threading.Event()

    def flaky():
        try:
            for _ in range(5):
                time.sleep(0.01)
                yield None  # no frame yet
            yield np.full((8, 8, 3), STEP * 3, np.uint8)
            time.sleep(0.05)
            raise OSError("camera unplugged")
        finally:
            released.set()

    answers = pipe.watch(flaky(), "?", every_s=0.0)
    assert next(answers).index == 0 and recorder.seen == [[3]]  # None is not a frame
    with pytest.raises(LlavaEdgeError, match="reading the app's frames failed: camera unplugged"):
        next(answers)
    assert released.is_set()

    def silent():
        while True:
            time.sleep(0.01)
            yield None

    before = len(readers())
    with pytest.raises(LlavaEdgeError, match="no frame from the app's frames for 0.3 s"):
        list(pipe.watch(silent(), "?", timeout_s=0.3))
    time.sleep(0.1)
    assert len(readers()) == before  # the reader stopped between two Nones


def test_an_apps_frames_of_any_size_dtype_and_mode_answer_as_alone(pipe, monkeypatch) -> None:
    """Frames as drivers give them (grey, RGBA, float, 16-bit, PIL, changing size): each answer
    equals the answer to that frame alone. The driver waits for each answer (nothing dropped);
    frames that keep being no image end the watch with a one-line error and release the driver."""
    rng = np.random.default_rng(0)
    frames = [
        rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
        rng.integers(0, 256, (40, 10), dtype=np.uint8),
        rng.integers(0, 256, (16, 16, 4), dtype=np.uint8),
        rng.random((12, 18, 3), dtype=np.float32),
        rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16),
        Image.fromarray(rng.integers(0, 256, (10, 20), dtype=np.uint8), "L"),
    ]
    options = dict(max_new_tokens=3, ignore_eos=True)
    alone = [pipe.answer(frame, "What is it?", **options).text for frame in frames]
    real, answered, released = pipe._answer_prepared, threading.Event(), threading.Event()

    def answer(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        finally:
            answered.set()

    def driver(frames):
        try:
            for frame in frames:
                answered.clear()
                yield frame
                answered.wait(10)
        finally:
            released.set()

    monkeypatch.setattr(pipe, "_answer_prepared", answer)
    answers = list(pipe.watch(driver(frames), "What is it?", every_s=0.0, **options))
    assert [a.text for a in answers] == alone
    assert [a.index for a in answers] == list(range(len(frames)))
    released.clear()

    def broken():  # a good frame, then only frames that are no image
        try:
            yield frames[0]
            while True:
                yield np.zeros((10, 10, 5), np.uint8)
        finally:
            released.set()

    with pytest.raises(LlavaEdgeError, match="5 frames in a row could not be read") as error:
        list(pipe.watch(broken(), "What is it?", every_s=0.0, **options))
    assert "\n" not in str(error.value) and released.wait(2)


def test_an_apps_frames_are_refused_where_they_cannot_be_watched(pipe) -> None:
    with pytest.raises(LlavaEdgeError, match="an iterable of frames, got ndarray"):
        pipe.watch(np.zeros((8, 8, 3), np.uint8), "?")  # one image: ask pipe.answer
    with pytest.raises(LlavaEdgeError, match=r"camera is a device path: /dev/video0\)"):
        pipe.watch(0, "?")
    with pytest.raises(LlavaEdgeError, match="an app's frames are live"):
        pipe.watch(iter([]), "?", live=False)
    assert list(pipe.watch(iter([]), "?")) == []  # a driver with nothing to give: a clean end


def test_a_watch_closed_from_another_thread_ends_there(pipe, monkeypatch, tmp_path) -> None:
    """A robot's shutdown handler closes the watch while its worker thread is in an answer, or
    waits for a camera that sends nothing: close returns at once, the worker's loop ends without
    an error and the reader stops."""
    monkeypatch.setattr(pipe, "_answer_prepared", Recorder(delay_s=0.3))
    before = len(readers())
    quiet = threading.Event()

    def silent_camera():
        yield np.zeros((8, 8, 3), np.uint8)
        quiet.wait(10)  # then nothing, for longer than the test waits

    video = make_video(tmp_path / "live.mkv", frames=40, fps=10)
    for source in (video, silent_camera()):
        answers = pipe.watch(source, "Now?", every_s=0.0, live=True, timeout_s=5)
        got: list[Any] = []
        worker = threading.Thread(target=lambda answers=answers, got=got: got.extend(answers))
        worker.start()
        time.sleep(0.5)  # in the second answer (video), or waiting for a frame (camera)
        start = time.monotonic()
        answers.close()
        assert time.monotonic() - start < 0.1  # it does not wait for the worker
        worker.join(timeout=2)
        assert not worker.is_alive()  # ended, without an error
        assert 1 <= len(got) <= (3 if source == video else 1)  # 13 had it run to the end
        assert all(isinstance(answer, WatchAnswer) for answer in got)
    quiet.set()
    time.sleep(0.1)
    assert len(readers()) == before


def test_a_watch_closed_while_an_apps_read_is_blocked_closes_it_when_the_read_returns(
    pipe, monkeypatch
) -> None:
    """An app's camera read cannot be interrupted: closed from another thread, the watch returns
    at once; the iterating thread's wait ends a second at most later (how long it waits for the
    reader), and the app's iterator is closed when its read returns, not before."""
    monkeypatch.setattr(pipe, "_answer_prepared", Recorder())
    release, closed = threading.Event(), threading.Event()

    def camera():
        try:
            yield np.zeros((8, 8, 3), np.uint8)
            release.wait(10)  # a driver's read that blocks
            while True:
                yield np.zeros((8, 8, 3), np.uint8)
        finally:
            closed.set()

    answers = pipe.watch(camera(), "Now?", every_s=0.0, timeout_s=5)
    got: list[Any] = []
    worker = threading.Thread(target=lambda: got.extend(answers))
    worker.start()
    time.sleep(0.5)  # the first frame answered, the reader blocked in the driver's read
    start = time.monotonic()
    answers.close()
    assert time.monotonic() - start < 0.1
    worker.join(timeout=3)
    assert not worker.is_alive() and len(got) == 1
    assert time.monotonic() - start < 1.5
    assert not closed.is_set()  # its read is still blocked
    release.set()
    assert closed.wait(2)  # closed, not read on


def test_an_answer_interrupted_mid_way_leaves_the_next_watch_right(
    pipe, monkeypatch, tmp_path
) -> None:
    """Ctrl-C in the middle of an answer's tokens: the watch ends with the KeyboardInterrupt, its
    reader stops, and the next watch answers as the first would have."""
    video = make_video(tmp_path / "clip.mkv", frames=10, fps=10)
    options = dict(every_s=0.5, max_new_tokens=8, ignore_eos=True)
    expected = [a.text for a in pipe.watch(video, "What is it?", **options)]

    def interrupted(images, prompt, timer, **kwargs):
        pieces = pipe._stream(None, prompt, kwargs, prepared=images, timer=timer)
        next(pieces), next(pieces)
        raise KeyboardInterrupt

    before = len(readers())
    monkeypatch.setattr(pipe, "_answer_prepared", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(pipe.watch(video, "What is it?", live=True, **options))
    monkeypatch.undo()
    assert len(readers()) == before
    assert [a.text for a in pipe.watch(video, "What is it?", **options)] == expected


def test_an_answer_past_its_time_limit_is_reported_and_the_watch_goes_on(
    pipe, monkeypatch, tmp_path
) -> None:
    """One slow answer (a hiccup of the device) does not end a robot's watch: that frame is
    reported without an answer, with the reason, even under changes_only, and the next is
    answered."""
    video = make_video(tmp_path / "door.mkv", frames=30, fps=10)
    rec = Recorder(text=lambda levels: "Closed")

    def slow_on_frame_ten(images, prompt, timer, **options):
        answer = rec(images, prompt, timer, **options)
        if len(rec.seen) == 11:
            raise TimedOut("the request ran past its time limit of 1 s")
        return answer

    monkeypatch.setattr(pipe, "_answer_prepared", slow_on_frame_ten)
    answers = list(pipe.watch(video, "Is the door open?", every_s=0.1, changes_only=True))
    assert [(a.index, a.text, a.error) for a in answers] == [
        (0, "Closed", None),
        (10, "", "the request ran past its time limit of 1 s"),
    ]
    assert len(rec.seen) == 30  # every frame after the slow one was asked about too
    assert answers[1].to_dict()["error"] and answers[0].to_dict()["error"] is None


def test_the_pipelines_time_limit_raises_timed_out(tiny_model_dir) -> None:
    """What watch (and an app) catch to tell a slow answer from a broken one."""
    slow = Pipeline.load(tiny_model_dir, limits=Limits(timeout_s=1e-9))
    with slow, pytest.raises(TimedOut, match="time limit"):
        slow.answer(None, "Hi", max_new_tokens=4, ignore_eos=True)


def test_a_camera_is_refused_for_offline_reading(pipe) -> None:
    """A camera's frames come as they are made, as an app's do: offline, the answers would trail
    it by the frames its driver queues."""
    with pytest.raises(LlavaEdgeError, match="camera /dev/null is live"):
        pipe.watch("/dev/null", "?", live=False)  # a character device, as a camera is


@pytest.mark.parametrize("view", [lambda b: b, memoryview], ids=["bytearray", "memoryview"])
def test_an_apps_encoded_frames_in_a_reused_buffer_are_kept(view) -> None:
    """A driver handing over each JPEG or BMP in the one buffer it refills, as it does an
    array: the frame answered is the one handed over, not what the buffer holds later."""
    from llava_edge.runtime.frames import open_frames

    def encoded(level_: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), STEP * level_, np.uint8)).save(buffer, "BMP")
        return buffer.getvalue()

    refilled = threading.Event()

    def driver():
        buffer = bytearray(encoded(1))
        yield view(buffer)
        buffer[:] = encoded(2)  # the next frame, in the same buffer
        refilled.set()
        while True:
            yield None

    with contextlib.closing(open_frames(driver(), every_s=0.0, timeout_s=2.0)) as frames:
        frame = next(frames)
        assert refilled.wait(2)
        assert level(frame.image) == 1


def test_a_stream_that_stalls_read_offline_says_it_stalled(tmp_path) -> None:
    """Read offline, a stream's stall ends in FFmpeg's own timeout ('Immediate exit requested'):
    it is a stall, said as the live reader says it, not a corrupt file."""
    import http.server

    from llava_edge.runtime.frames import open_frames

    video = make_video(tmp_path / "cam.mkv", frames=40, fps=10).read_bytes()
    done = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/half.mkv":  # half the video, then nothing
                self.send_response(200)
                self.end_headers()
                self.wfile.write(video[: len(video) // 2])
                self.wfile.flush()
            done.wait(10)  # /silent.mkv: not even a response

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        frames = open_frames(f"{base}/half.mkv", every_s=0.0, live=False, timeout_s=0.5)
        with pytest.raises(LlavaEdgeError, match="half.mkv for 0.5 s: the source stalled"):
            for _ in frames:
                pass
        frames = open_frames(f"{base}/silent.mkv", every_s=0.0, live=False, timeout_s=0.5)
        with pytest.raises(LlavaEdgeError, match="silent.mkv: no answer for 0.5 s"):
            next(frames)
    finally:
        done.set()
        server.shutdown()
        server.server_close()


def test_a_camera_is_a_camera_by_any_path(tmp_path) -> None:
    """A udev-style link to a camera kept outside /dev (a robot's cams/front) is read as the
    camera it names: live, through V4L2, not probed as a video file."""
    from llava_edge.runtime.frames import source_kind

    link = tmp_path / "front"
    link.symlink_to("/dev/null")  # a character device, as a camera is
    assert source_kind(link) == source_kind("/dev/null") == "device"
    assert source_kind(tmp_path) == "folder" and source_kind(tmp_path / "clip.mp4") == "file"


def test_a_camera_unplugged_mid_way_says_so(pipe, recorder, monkeypatch) -> None:
    """V4L2's read fails with ENODEV once the camera is gone: the watch ends with that said of a
    camera (not of a truncated file), after the frames it sent, and the camera is closed."""
    import errno

    closed = threading.Event()

    class Unplugged:
        streams = type("Streams", (), {"video": [type("Stream", (), {"average_rate": 0})()]})()

        def decode(self, stream):
            for i in range(2):
                yield av.VideoFrame.from_ndarray(np.full((8, 8, 3), STEP * i, np.uint8), "rgb24")
            av.error.err_check(-errno.ENODEV)

        def close(self) -> None:
            closed.set()

    fake = type("av", (), {"open": staticmethod(lambda *a, **k: Unplugged()), "error": av.error})
    monkeypatch.setattr("llava_edge.runtime.frames.import_av", lambda: fake)
    answers = []
    with pytest.raises(LlavaEdgeError) as raised:
        for answer in pipe.watch("/dev/null", "?", every_s=0.0):  # a character device
            answers.append(answer.index)
    assert answers and answers[-1] == 1
    assert str(raised.value) == (
        "camera /dev/null stopped after 2 frames (No such device): it was unplugged or failed; "
        "check it and its cable"
    )
    assert closed.is_set()


def fake_camera(monkeypatch, frames: int) -> threading.Event:
    """/dev/null (a character device, as a camera is) read through a fake PyAV whose camera
    sends `frames` frames and then ends its stream without an error; the event: closed."""
    closed = threading.Event()

    class Ending:
        streams = type("Streams", (), {"video": [type("Stream", (), {"average_rate": 0})()]})()

        def decode(self, stream):
            for i in range(frames):
                time.sleep(0.01)
                yield av.VideoFrame.from_ndarray(np.full((8, 8, 3), STEP * i, np.uint8), "rgb24")

        def close(self) -> None:
            closed.set()

    fake = type("av", (), {"open": staticmethod(lambda *a, **k: Ending()), "error": av.error})
    monkeypatch.setattr("llava_edge.runtime.frames.import_av", lambda: fake)
    return closed


def test_a_camera_that_ends_its_stream_ends_the_watch_with_an_error(
    tiny_model_dir, pipe, recorder, monkeypatch, capsys
) -> None:
    """A camera does not end while it works: a supervisor (systemd, a robot's launch file) must
    see its end as a failure, one line and a non-zero exit, not a watch that finished."""
    closed = fake_camera(monkeypatch, frames=3)
    answers = []
    with pytest.raises(LlavaEdgeError, match=r"camera /dev/null ended after 3 frames"):
        for answer in pipe.watch("/dev/null", "?", every_s=0.0):
            answers.append(answer.index)
    assert answers and answers[-1] == 2 and closed.is_set()
    argv = ["watch", str(tiny_model_dir), "--source", "/dev/null", "--prompt", "?"]
    assert cli.main([*argv, "--every", "0", "--max-new-tokens", "1", "--jsonl"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() and captured.err.count("\n") == 1
    assert captured.err.startswith("llava-edge watch: error: camera /dev/null ended after 3")


class Reconnecting:
    """A fake PyAV whose camera, opened again and again, does what `plan` says of each opening:
    a number of frames sent before its stream ends, or None for an open that fails."""

    def __init__(self, monkeypatch, plan: list[int | None]):
        self.plan, self.opens, self.sent = plan, 0, 0
        monkeypatch.setattr("llava_edge.runtime.frames.import_av", lambda: self.av)
        self.av = type("av", (), {"open": staticmethod(self.open), "error": av.error})

    def open(self, *args, **kwargs):
        frames = self.plan[self.opens] if self.opens < len(self.plan) else None
        self.opens += 1
        if frames is None:
            av.error.err_check(-errno.ECONNREFUSED)
        fake = self

        class Connection:
            streams = type("Streams", (), {"video": [type("Stream", (), {"average_rate": 0})()]})

            def decode(self, stream):
                for _ in range(frames):
                    time.sleep(0.01)
                    fake.sent += 1
                    level = STEP * fake.sent
                    yield av.VideoFrame.from_ndarray(np.full((8, 8, 3), level, np.uint8), "rgb24")

            def close(self) -> None:
                pass

        return Connection()


def test_a_camera_that_drops_is_opened_again_within_the_reconnect_window(
    pipe, recorder, monkeypatch
) -> None:
    """--reconnect: a camera that drops (its stream ends, an open fails) is opened again, its
    frames counting on, until it stays away past the window: then the drop's error."""
    camera = Reconnecting(monkeypatch, [3, None, 3])
    answers = []
    with pytest.raises(LlavaEdgeError) as raised:
        for answer in pipe.watch("/dev/null", "?", every_s=0.0, reconnect_s=1.0):
            answers.append(answer)
    indices = [a.index for a in answers]
    assert indices == sorted(indices) and indices[-1] == 5
    assert sum(a.skipped for a in answers) + len(answers) == 6
    assert recorder.seen == [[i + 1] for i in indices]  # each frame's own pixels
    assert camera.opens == 5  # 3 frames, a failed open, 3 frames, two failed opens
    message = str(raised.value)
    assert message.startswith("camera /dev/null ended after 3 frames") and "\n" not in message
    assert "not back after reconnecting for 1 s" in message and "refused" in message


def test_a_watch_that_ends_while_its_camera_reconnects_opens_it_no_more(pipe, monkeypatch) -> None:
    """The camera must be free for the next watch: the pauses between tries end with the watch."""
    camera = Reconnecting(monkeypatch, [2, 2])
    monkeypatch.setattr(
        pipe, "_answer_prepared", Recorder(delay_s=0.05)
    )  # the camera drops meanwhile
    answers = list(pipe.watch("/dev/null", "?", every_s=0.0, reconnect_s=5, max_frames=2))
    assert len(answers) == 2
    time.sleep(0.8)  # past the first pause (0.5 s)
    assert camera.opens == 1


def test_reconnecting_is_refused_where_there_is_nothing_to_reconnect(pipe, tmp_path) -> None:
    folder = shots(tmp_path / "shots", 2)
    video = make_video(tmp_path / "clip.mkv", frames=4, fps=10)
    for source, live in ((folder, None), (video, True), (iter([]), None)):
        with pytest.raises(LlavaEdgeError, match=r"reconnect_s \(--reconnect\) .*: drop it"):
            pipe.watch(source, "?", reconnect_s=1.0, live=live)
    with pytest.raises(LlavaEdgeError, match=r"reconnect_s \(--reconnect\) must be 0 or more"):
        pipe.watch("/dev/null", "?", reconnect_s=-1.0)


def set_display_rotation(path: Path, degrees: int) -> None:
    """Give a QuickTime file's one track a display rotation (counterclockwise), as a phone's
    camera does: in its track header's matrix, which FFmpeg reads as the rotation. Written into
    the file: PyAV's VideoStream.set_display_rotation is newer than pyproject's av floor (16.0)."""
    data = bytearray(path.read_bytes())
    at = data.rindex(b"tkhd") + 4  # the movie header (moov) follows the frames (mdat)
    assert data[at] == 0, "a version 0 track header"
    cos, sin = (round(f(math.radians(degrees))) << 16 for f in (math.cos, math.sin))
    data[at + 40 : at + 60] = struct.pack(">5i", cos, -sin, 0, sin, cos)  # a, b, u, c, d
    path.write_bytes(data)


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_a_rotated_recording_is_answered_upright(tmp_path, degrees) -> None:
    """A phone's portrait video is stored landscape with a display rotation, as a photo's EXIF
    orientation is: its frames are answered as a player shows them (rotated counterclockwise
    by it), not on their side."""
    from llava_edge.runtime.frames import open_frames

    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = 255  # the left half white
    path = tmp_path / "portrait.mov"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, "rgb24")))
        container.mux(stream.encode())
    set_display_rotation(path, degrees)
    (frame,) = open_frames(path, every_s=0.0)
    shown = np.rot90(stored, degrees // 90)  # numpy turns counterclockwise, as players do
    np.testing.assert_array_equal(frame.image, shown)


def test_a_pipe_read_offline_that_stalls_times_out(tmp_path) -> None:
    """Offline, every frame of a pipe is answered; a writer that stops sending (its end still
    open) ends the frames after the timeout, as live: FFmpeg's timeout does not reach a read
    blocked on a pipe."""
    from llava_edge.runtime.frames import open_frames

    video = make_video(tmp_path / "clip.mkv", frames=40, fps=10).read_bytes()
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    done = threading.Event()

    def writer() -> None:
        with open(fifo, "wb") as pipe_:
            pipe_.write(video[: len(video) // 2])
            pipe_.flush()
            done.wait(20)  # then nothing, the pipe still open

    threading.Thread(target=writer, daemon=True).start()
    outcome: list[Any] = []

    def read() -> None:
        try:
            outcome.extend(
                f.index for f in open_frames(fifo, every_s=0.0, live=False, timeout_s=0.5)
            )
        except LlavaEdgeError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    done.set()
    assert not reader.is_alive(), "the offline read of a silent pipe hung"
    assert outcome[:-1] == list(range(len(outcome) - 1)) and len(outcome) > 5  # every frame
    assert outcome[-1].endswith(
        "for 0.5 s: the source stalled (check that it still sends, or raise the source's "
        "timeout: --source-timeout, or watch's timeout_s)"
    )


def test_a_cancel_ends_an_offline_wait_on_a_silent_pipe(tmp_path) -> None:
    from llava_edge.runtime.frames import open_frames

    fifo = tmp_path / "feed"
    os.mkfifo(fifo)  # nobody writes
    cancel, outcome = threading.Event(), []
    frames = open_frames(fifo, every_s=0.0, live=False, timeout_s=30.0, cancel=cancel)
    reader = threading.Thread(target=lambda: outcome.append(list(frames)), daemon=True)
    reader.start()
    time.sleep(0.2)
    cancel.set()
    reader.join(3)
    with open(fifo, "wb"):  # unblock the open in the reader thread
        pass
    assert outcome == [[]], "a cancel did not end the wait"


def test_a_watch_closed_before_its_first_frame_closes_the_apps_camera(pipe) -> None:
    """A watch left before its loop asks for a frame (an error first, a shutdown) still closes
    the app's camera iterator: a generator not yet started runs no cleanup when closed."""

    class Camera:
        closed = 0

        def __iter__(self):
            return self

        def __next__(self):
            return np.zeros((8, 8, 3), np.uint8)

        def close(self) -> None:
            Camera.closed += 1

    with pipe.watch(Camera(), "?"):
        pass
    answers = pipe.watch(Camera(), "?")
    answers.close()
    answers.close()
    assert Camera.closed == 2


def test_each_answer_of_a_watch_may_have_its_own_time_limit(pipe) -> None:
    """answer_timeout_s is each answer's time limit (the pipeline has none): an answer past it
    is reported and the watch goes on; the source's timeout_s stays the source's."""
    frames = [np.full((8, 8, 3), STEP * i, np.uint8) for i in range(3)]
    with pipe.watch(frames, "?", every_s=0.0, answer_timeout_s=1e-9, timeout_s=5) as answers:
        got = list(answers)
    assert len(got) >= 1 and all("time limit of 1e-09 s" in a.error for a in got)
    with pipe.watch(frames, "?", every_s=0.0, answer_timeout_s=60, max_new_tokens=2) as answers:
        assert all(a.error is None for a in answers)
    with pytest.raises(LlavaEdgeError, match="timeout_s must be a positive number"):
        pipe.watch(frames, "?", answer_timeout_s=0)


def test_an_unreadable_frame_is_reported_and_the_watch_goes_on(pipe, recorder, tmp_path) -> None:
    """One corrupt image among good ones (a JPEG cut short, a bad array from a driver) is
    reported as that frame's error, as a slow answer is, and the next frame is answered."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), STEP * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "1.png").write_bytes(b"not a png")
    answers = list(pipe.watch(folder, "?", every_s=0.0))
    assert [(a.index, a.text, a.error is not None) for a in answers] == [
        (0, "frame 0", False),
        (1, "", True),
        (2, "frame 2", False),
        (3, "frame 3", False),
    ]
    assert "frame 1 could not be read" in answers[1].error and "not an image" in answers[1].error
    # max_frames counts it, as it counts an answer past its time limit: frames the watch took
    assert [a.index for a in pipe.watch(folder, "?", every_s=0.0, max_frames=2)] == [0, 1]

    def driver():
        for image in [b"garbage", np.zeros((8, 8, 5), np.uint8), np.full((8, 8, 3), 18, np.uint8)]:
            yield image
            time.sleep(0.1)

    with pipe.watch(driver(), "?", every_s=0.0, timeout_s=5) as answers:
        got = list(answers)
    assert got[-1].text == "frame 3" and all(a.error for a in got[:-1])


def test_a_frame_too_far_from_square_is_reported_and_the_watch_goes_on(pipe, tmp_path) -> None:
    """A strip of a frame (a driver's buffer read as one row) is under the pixel limit, but the
    vision encoder's input cannot be made from it: that frame is reported, as an unreadable one
    is, and left out of the later prompts, and the next frame is answered."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), STEP * i, np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(np.zeros((1, 307_200, 3), np.uint8)).save(folder / "1.png")
    answers = list(pipe.watch(folder, "?", every_s=0.0, frames=2, max_new_tokens=1))
    assert [(a.index, a.frames, a.error is None) for a in answers] == [
        (0, [0], True),
        (1, [], False),
        (2, [0, 2], True),
    ]
    assert "frame 1 could not be read" in answers[1].error and "crop it" in answers[1].error


def test_frames_that_keep_failing_end_the_watch_with_the_reason(pipe, recorder) -> None:
    """A source whose every frame is unreadable (a driver handing over the wrong thing) ends
    the watch with a clear error, instead of reporting bad frames for ever."""

    def driver():
        yield np.full((8, 8, 3), 6, np.uint8)
        while True:
            yield np.zeros((8, 8, 5), np.uint8)

    with (
        pipe.watch(driver(), "?", every_s=0.0, timeout_s=5) as answers,
        pytest.raises(LlavaEdgeError, match=r"5 frames in a row .*shape \(8, 8, 5\)"),
    ):
        for _ in answers:
            pass


def test_a_stream_read_offline_lets_its_open_say_why_it_failed() -> None:
    """FFmpeg's open of a silent server ends at the same timeout the reader waits for a frame:
    its error ('no answer') must come, not a stall that raced it."""
    from llava_edge.runtime.frames import _read_ahead

    def opening() -> Iterator[Any]:
        time.sleep(0.8)  # past the 0.5 s timeout, as FFmpeg's own timeout ends a little late
        raise LlavaEdgeError("cannot open stream http://cam: no answer for 0.5 s")
        yield  # a generator

    with pytest.raises(LlavaEdgeError, match="no answer for 0.5 s"):
        next(_read_ahead(opening(), 0.5, "http://cam"))


def test_a_cameras_password_in_its_url_stays_out_of_the_errors(pipe) -> None:
    """rtsp://user:password@camera/ is how IP cameras are addressed: an error (into a robot's
    logs) names the camera without its password."""
    import socket

    with socket.socket() as closed:  # a port where nothing listens: the open is refused
        closed.bind(("127.0.0.1", 0))
        refused = closed.getsockname()[1]
    with socket.socket() as silent:  # connections queue, and nothing ever answers them
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        for url, live in (
            (f"http://admin:s3cret@127.0.0.1:{refused}/cam.mkv", None),
            (f"http://admin:s3cret@127.0.0.1:{port}/cam.mkv", None),
            (f"http://admin:s3cret@127.0.0.1:{port}/cam.mkv", False),
        ):
            with pytest.raises(LlavaEdgeError) as raised:
                list(pipe.watch(url, "?", live=live, timeout_s=0.5))
            assert "s3cret" not in str(raised.value)
            assert f"http://admin:***@127.0.0.1:{url.split(':')[3]}" in str(raised.value)


def test_a_folders_frames_numbered_without_padding_play_in_their_order(pipe, recorder, tmp_path):
    """A capture script's frame_9.png, frame_10.png: numbers in names count by value, as the
    camera wrote them, not character by character (frame_10 before frame_2)."""
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((20, 30, 3), STEP * i, np.uint8)).save(folder / f"frame_{i}.png")
    answers = list(pipe.watch(folder, "Now?", every_s=0, folder_fps=10))
    assert recorder.seen == [[i] for i in range(12)]
    assert [a.timestamp for a in answers] == pytest.approx([i / 10 for i in range(12)])


def test_a_live_stream_lets_its_open_say_why_it_failed() -> None:
    """An address that never answers, read live (a stream's default): FFmpeg's open ends at the
    timeout the reader waits for a frame, and its error ('no answer', check the address) must
    come, not a stall that raced it."""
    import socket

    from llava_edge.runtime.frames import open_frames

    with socket.socket() as silent:  # connections queue, and nothing ever answers them
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/cam.mkv"
        with pytest.raises(LlavaEdgeError, match=r"cannot open stream .*no answer for 0.5 s"):
            next(open_frames(url, timeout_s=0.5))


def test_a_file_is_sampled_on_a_grid_of_the_interval(pipe, recorder, tmp_path) -> None:
    """`--every 0.1` on a 25 fps recording: the first frame at or after each tenth of a second
    (0, 0.12, 0.2, 0.32, 0.4 ...), ten answers a second as asked, not one every 0.12 s as a
    count from each answered frame drifts to."""
    video = make_video(tmp_path / "pal.mkv", frames=26, fps=25)  # 1.04 s
    answers = list(pipe.watch(video, "What is there?", every_s=0.1))
    due = [i / 10 for i in range(11)]
    expected = [math.ceil(t * 25 - 1e-6) / 25 for t in due]  # the first frame at or after each
    assert [a.timestamp for a in answers] == pytest.approx(expected)


def test_any_url_is_a_stream(pipe) -> None:
    """rtp:// (a GStreamer pipeline's udpsink), srt://, rtmps:// ...: whatever FFmpeg's
    protocols, a URL is a stream that FFmpeg opens and names the failure of, not a video file
    that 'does not exist'."""
    from llava_edge.runtime.frames import source_kind

    assert [source_kind(u) for u in ("rtp://0.0.0.0:5004", "srt://cam:9000", "rtmps://a/b")] == [
        "stream"
    ] * 3
    assert source_kind("file:///clip.mp4") == "file"
    with pytest.raises(LlavaEdgeError, match=r"cannot open stream srt://127\.0\.0\.1:1"):
        list(pipe.watch("srt://127.0.0.1:1", "?", timeout_s=2))


def test_a_file_url_is_read_as_the_path_it_names(pipe, recorder, tmp_path) -> None:
    """file:///data/run%201.mp4, as a file manager or a launch file writes a path: the file (or
    folder) it names, %-escapes decoded, not a video file 'file:///...' that does not exist."""
    folder = shots(tmp_path / "run 1", 2)
    video = make_video(folder.parent / "clip 1.mkv", frames=10, fps=10)
    by_path = [a.index for a in pipe.watch(video, "?", every_s=0.5)]
    assert [a.index for a in pipe.watch(video.as_uri(), "?", every_s=0.5)] == by_path == [0, 5]
    assert [a.timestamp for a in pipe.watch(folder.as_uri(), "?")] == [0.0, 1.0]
    with pytest.raises(LlavaEdgeError, match="names a file on another machine"):
        pipe.watch("file://nas/clip.mp4", "?")


def test_standard_input_with_no_video_piped_in_says_so(tiny_model_dir) -> None:
    """`llava-edge watch MODEL --source -` typed at a terminal, or run with no input: standard
    input is a character device there, and no camera."""
    argv = [sys.executable, "-m", "llava_edge.cli", "watch", str(tiny_model_dir), "--prompt", "?"]
    run = subprocess.run(
        [*argv, "--source", "-"], stdin=subprocess.DEVNULL, capture_output=True, timeout=120
    )
    assert run.returncode == 1 and run.stdout == b""
    assert run.stderr.decode().splitlines() == [
        "llava-edge watch: error: standard input (/dev/stdin) holds no video (a terminal or "
        "/dev/null): pipe one into it, as `ffmpeg ... -f matroska - | llava-edge watch ... "
        "--source -`"
    ]


def test_a_folder_that_cannot_be_listed_is_a_one_line_error(pipe, tmp_path, monkeypatch) -> None:
    """A capture folder another user owns (mode 700): no traceback, the reason and the folder."""
    folder = shots(tmp_path / "shots", 2)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(
        LlavaEdgeError, match=r"cannot list image folder .*shots: Permission denied"
    ):
        pipe.watch(folder, "?")
