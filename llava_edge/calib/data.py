"""Calibration data: which (image, prompt) pairs to run, and what each graph is fed when the fp32
model answers them.

Quantizers need the tensors a graph really sees. Rather than synthesise them, the fp32 model dir
is run through the runtime (the same preprocessing, template, KV cache and decode loop that serve
users): the vision encoder gets preprocessed pixels, the projector the vision features, and the
decoder the prefill embeddings (image features in place) followed by a few greedy decode steps.
Every graph call is recorded as it happens, so the feeds are exactly what production feeds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime.frames import IMAGE_SUFFIXES
from llava_edge.runtime.template import IMAGE_PLACEHOLDER

# Asked about every picture of an image folder (no questions come with one).
DEFAULT_PROMPT = "Describe the image."
# Greedy decode steps recorded after each prefill: decode-shaped calls (one token, a long past)
# exercise the decoder differently from prefill, and TensorRT runs both with the same scales.
DECODE_STEPS = 4


@dataclass(frozen=True)
class Sample:
    """One calibration or held-out input: an image (or none) and the user's prompt."""

    image: Path | None
    prompt: str
    # Where it comes from, for messages ("FILE sample N", or the image file); not part of it.
    origin: str = field(default="", compare=False)


@dataclass(frozen=True)
class BadSample:
    """A sample calibration cannot use, and why (the message names the sample)."""

    message: str

    def __str__(self) -> str:
        return self.message


def load_samples(
    calib: str | os.PathLike | None,
    images: str | os.PathLike | None,
    bad: list[BadSample] | None = None,
) -> list[Sample]:
    """Samples from a LLaVA JSON or JSONL file (images under `images`, else beside it), or from an
    image folder (`calib` or `images` naming a dir) asked DEFAULT_PROMPT; a sample the data
    repeats comes once (it would count twice toward --samples, or be held out for the report
    while calibrated on).

    Raises LlavaEdgeError for a missing, empty or unreadable source, and for a bad sample (no
    question, several pictures, a picture not found) unless `bad` is given: it is then left out
    and added there, as `train --skip-bad` leaves such samples out.
    """
    return list(dict.fromkeys(_load(calib, images, bad)))


def _load(
    calib: str | os.PathLike | None,
    images: str | os.PathLike | None,
    bad: list[BadSample] | None,
) -> list[Sample]:
    if calib is None and images is None:
        raise LlavaEdgeError(
            "no calibration data: pass --calib LLAVA_JSON (with --images DIR) or --images DIR"
        )
    if calib is not None:
        source = Path(calib)
        if not source.exists():
            raise LlavaEdgeError(f"calibration source {source} does not exist")
        if source.is_dir():
            if images is not None:
                raise LlavaEdgeError(
                    f"--calib {source} is a folder of images; --images only goes with a LLaVA JSON file"
                )
            return _image_folder(source)
        return _llava_json(source, Path(images) if images is not None else None, bad)
    folder = Path(images)  # type: ignore[arg-type]
    if not folder.is_dir():
        raise LlavaEdgeError(f"--images {folder} is not a folder of images")
    return _image_folder(folder)


def check_samples(
    model_dir: str | os.PathLike,
    samples: list[Sample],
    decode_steps: int = DECODE_STEPS,
    bad: list[BadSample] | None = None,
) -> list[Sample]:
    """Find before any work, naming the sample, where the runtime would refuse one when
    calibration or the report reaches it: a picture it cannot read or over its pixel limit, a
    prompt that does not fit the context with `decode_steps` tokens after it. Raises
    LlavaEdgeError for the first, or with `bad` given adds each there; returns the good ones.

    A Pipeline without a backend does this: it preprocesses and tokenizes as the loaded one
    does, and loads no graph.
    """
    from llava_edge.manifest import Manifest
    from llava_edge.runtime import Pipeline

    model_dir = Path(model_dir)
    pipe = Pipeline(model_dir, Manifest.load(model_dir), backend=None)
    good = []
    for sample in samples:
        problem = _problem(pipe, sample, decode_steps)
        if problem is None:
            good.append(sample)
            continue
        where, why = problem
        if bad is None:
            raise LlavaEdgeError(f"calibration data{f', {where}' if where else ''}: {why}")
        bad.append(BadSample(f"{where}: {why}" if where else why))
    return good


def _problem(pipe: Any, sample: Sample, decode_steps: int) -> tuple[str, str] | None:
    """Why the runtime would refuse `sample`, and the sample's name where the reason does not
    say it already; None where it would take it."""
    try:
        pixels = [pipe.image_pixels(sample.image)] if sample.image else []
        tokens = len(pipe.prompt_ids(sample.prompt, pixels))
    except LlavaEdgeError as e:
        return ("" if sample.origin in str(e) else sample.origin), str(e)
    if tokens + decode_steps > pipe.max_context:
        return sample.origin or "a sample", (
            f"its prompt is {tokens} tokens, which leaves no room for {decode_steps} more in "
            f"the model's context of {pipe.max_context}; shorten it or leave it out"
        )
    return None


def _image_folder(folder: Path) -> list[Sample]:
    # Files only: a named pipe (a camera's feed) would block the run on its first read.
    files = sorted(p for p in folder.iterdir() if _is_picture(p) and p.is_file())
    if not files:
        raise LlavaEdgeError(
            f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}){_nested(folder)}"
        )
    return [Sample(path, DEFAULT_PROMPT, str(path)) for path in files]


def _is_picture(path: Path) -> bool:
    # Hidden files are not pictures: "._x.png" is the AppleDouble metadata a copy from a Mac
    # leaves beside x.png.
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _nested(folder: Path) -> str:
    """What to do about a folder without pictures of its own: where its subfolders hold some
    (one per class, as image datasets are laid out), say so, as only its own files are read.
    One level down only: a folder such as a home dir may hold any number of levels."""
    below = sorted(
        {
            p.parent
            for p in folder.glob("*/*")
            if _is_picture(p) and not p.parent.name.startswith(".")
        }
    )
    if not below:
        return "; give a folder of pictures like the ones the model will see"
    named = ", ".join(p.name for p in below[:3])
    more = f" and {len(below) - 3} more" if len(below) > 3 else ""
    return (
        f" of its own, only in its subfolders ({named}{more}), which calibration does not "
        "read: give one of them, or a folder holding the pictures themselves"
    )


def _llava_json(
    path: Path, image_root: Path | None, bad: list[BadSample] | None = None
) -> list[Sample]:
    """A LLaVA JSON or JSONL file, read as `train --data` reads it (training.data.SampleFile)."""
    from llava_edge.training.data import SampleFile

    data: list[Any] = []

    def collect(position: int, record: Any) -> bool:
        data.append(record)
        return False  # nothing to index: every record is held here

    try:
        SampleFile(path, keep=collect)
    except OSError as e:
        raise LlavaEdgeError(f"cannot read calibration file {path}: {e.strerror}") from None
    except LlavaEdgeError as e:
        raise LlavaEdgeError(f"cannot read calibration file: {e}") from None
    if not data:
        raise LlavaEdgeError(
            f"{path} holds no samples: expected a LLaVA JSON list of "
            '{"image": ..., "conversations": [{"from": "human", "value": ...}, ...]}'
        )
    roots = [image_root] if image_root is not None else [path.parent, path.parent / "images"]
    samples = []
    for index, item in enumerate(data):
        try:
            samples.append(_llava_sample(path, index, item, roots))
        except LlavaEdgeError as e:
            if bad is None:
                raise
            bad.append(BadSample(str(e)))
    return samples


def _llava_sample(path: Path, index: int, item: Any, roots: list[Path]) -> Sample:
    prompt = _first_question(item)
    if prompt is None:
        raise LlavaEdgeError(
            f"{path}: sample {index} has no human turn in 'conversations'; "
            "is this a LLaVA JSON file?"
        )
    if not isinstance(prompt, str):  # what would be asked is its Python repr
        raise LlavaEdgeError(
            f"{path}: sample {index}'s first human turn holds no text ('value' is a "
            f"{type(prompt).__name__}); LLaVA's 'value' is the question's text"
        )
    image = None
    if isinstance(item.get("image"), list) and len(item["image"]) == 1:
        item = {**item, "image": item["image"][0]}  # multi-image data's form of one picture
    if item.get("image") and not isinstance(item["image"], str):
        raise LlavaEdgeError(
            f"{path}: sample {index}'s image is {item['image']!r}; give one file name "
            "(a sample with several pictures is not supported for calibration)"
        )
    if item.get("image"):
        image = _find_image(item["image"], roots)
        if image is None:
            where = " or ".join(str(r) for r in roots)
            raise LlavaEdgeError(
                f"{path}: image {item['image']} of sample {index} is not under {where}; "
                "pass --images DIR naming the folder the JSON's image paths start from"
            )
    else:  # a text-only sample must not ask for an image
        prompt = prompt.replace(IMAGE_PLACEHOLDER, "").strip()
    return Sample(image, prompt, f"{path} sample {index}")


def _first_question(item: Any) -> Any:
    """The first human turn's value, as the data holds it (None where there is none)."""
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        return None
    for turn in item["conversations"]:
        if isinstance(turn, dict) and turn.get("from") == "human" and turn.get("value"):
            return turn["value"]
    return None


def _find_image(name: str, roots: list[Path]) -> Path | None:
    for root in roots:
        if (root / name).is_file():
            return root / name
    return None


@dataclass
class Capture:
    """One graph call: the inputs it was fed and the outputs the fp32 graph gave."""

    graph: str
    feeds: dict[str, np.ndarray]
    outputs: list[np.ndarray]
    output_names: list[str]


class _Recorder:
    """Stands in for an onnxruntime session: runs it and keeps a copy of each call."""

    def __init__(self, graph: str, session: Any, sink: list[Capture]):
        self.graph, self.session, self.sink = graph, session, sink

    def run(self, output_names: Any, feeds: dict[str, np.ndarray], *args: Any, **kw: Any) -> Any:
        outputs = self.session.run(output_names, feeds, *args, **kw)
        # The runtime's KV cache reuses its buffers: copy, and drop the unused slots at the end
        # of the preallocated past (masked out, so they change nothing the graph computes).
        names = list(output_names or [o.name for o in self.session.get_outputs()])
        copies = [np.array(o) for o in outputs]
        self.sink.append(Capture(self.graph, _trim_past(feeds), copies, names))
        return outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def _trim_past(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "attention_mask" not in feeds or "inputs_embeds" not in feeds:
        return {k: np.array(v) for k, v in feeds.items()}
    mask = feeds["attention_mask"]
    seq = feeds["inputs_embeds"].shape[1]
    past = mask.shape[1] - seq
    used = np.flatnonzero(mask[:, :past].any(axis=0))
    keep = int(used[-1]) + 1 if used.size else 0
    out = {}
    for name, value in feeds.items():
        if name == "attention_mask":
            value = np.concatenate([value[:, :keep], value[:, past:]], axis=1)
        elif value.ndim == 4 and value.shape[2] == past and name not in ("inputs_embeds",):
            value = value[:, :, :keep]
        out[name] = np.array(value)
    return out


class Activations:
    """Runs an fp32 model dir over samples and yields what each graph is fed, lazily.

    Lazily because a decoder feed holds the whole past keys/values: only a few are alive at once.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        samples: list[Sample],
        decode_steps: int = DECODE_STEPS,
        threads: int | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.samples = samples
        self.decode_steps = decode_steps
        self.threads = threads

    def captures(self, graph: str, desc: str | None = None) -> Iterator[Capture]:
        """Every call of `graph` while the fp32 model handles the samples, with a progress bar."""
        from tqdm import tqdm

        from llava_edge.runtime import Pipeline

        sink: list[Capture] = []
        # The standard decoder form: its feeds are what the quantized standard graphs take. No
        # session-cache entries: the CPU runs the fused forms, so an entry of these would cost
        # twice the fp32 weights on disk (and a second copy in memory while written) for nothing.
        with Pipeline.load(
            self.model_dir, threads=self.threads, graph_form="standard", session_cache=False
        ) as pipe:
            backend = pipe.backend
            backend.swap_session(graph, _Recorder(graph, backend.sessions[graph], sink))
            bar = tqdm(self.samples, desc=desc or f"fp32 {graph}", unit="sample", leave=False)
            for sample in bar:
                if graph == "decoder":
                    stream = pipe.stream(
                        str(sample.image) if sample.image else None,
                        sample.prompt,
                        max_new_tokens=self.decode_steps + 1,
                        ignore_eos=True,
                    )
                    for _ in stream:
                        yield from _drain(sink)
                elif sample.image is not None:  # a repeated picture comes from the cache
                    pipe.image_features(str(sample.image))
                yield from _drain(sink)
            bar.close()


def _drain(sink: list[Capture]) -> Iterator[Capture]:
    while sink:
        yield sink.pop(0)


class FeedReader:
    """An onnxruntime.quantization CalibrationDataReader over captured feeds."""

    def __init__(self, captures: Iterator[Capture]):
        self._captures = captures
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        capture = next(self._captures, None)
        if capture is None:
            return None
        self.count += 1
        return capture.feeds

    def __iter__(self) -> FeedReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds
