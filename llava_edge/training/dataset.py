"""The torch side of the data: a checked, lazily read training set and its batch collator."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llava_edge.errors import LlavaEdgeError, TooLarge
from llava_edge.runtime.image import check_image_file, load_image
from llava_edge.runtime.template import IMAGE_PLACEHOLDER
from llava_edge.training.data import (
    BadSample,
    Sample,
    SampleFile,
    check_image_dir,
    image_path,
    parse_sample,
)
from llava_edge.training.labels import IGNORE, Labeler

SKIP_HINT = "; fix it, or pass --skip-bad to leave such samples out"
FINGERPRINT_SPAN = 4096  # bytes hashed at each end of a picture: a block each


def picture_fingerprint(path: Path) -> str:
    """What tells a picture from another: its size and a hash of its first and last 4 KiB. A
    picture replaced, re-encoded, resized or cropped changes its size (compressed data almost
    never keeps its length) or its ends (headers and tables, the first and last rows'
    compressed data). Reading two blocks a file keeps a run's start near the cost of the header
    check it does anyway: hashing LLaVA's 600k pictures whole would read tens of GB each start.
    Neither path nor modification time counts, so a copy to another machine keeps it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        digest.update(f.read(FINGERPRINT_SPAN))
        if size > FINGERPRINT_SPAN:
            f.seek(max(FINGERPRINT_SPAN, size - FINGERPRINT_SPAN))
            digest.update(f.read())
    return f"{size}:{digest.hexdigest()[:16]}"


def count_image_tokens(processor: Any) -> int:
    """How many ids the processor expands `<image>` to (one fact, asked of the processor)."""
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    side = int(crop.get("height", 0) or 224)
    out = processor(text=IMAGE_PLACEHOLDER, images=Image.new("RGB", (side, side)))
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return sum(1 for t in out["input_ids"][0] if t == image_id)


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class TrainingSet(torch.utils.data.Dataset):
    """LLaVA samples as model inputs. Construction checks every sample once (shape, image file
    and header, tokenization, truncation); a bad one raises BadSample, or with `skip_bad` is left
    out and counted in `skipped`. Images are decoded when the trainer asks for a sample;
    `pictures` holds each kept sample's picture (named as the data names it) and its
    fingerprint, which tells a resumed run whether its pictures are those it was trained on.
    `truncated` counts the kept samples longer than the labeler's max_length (cut at their end),
    `longest` is the longest kept sample's length before that cut.

    `images_only`: a sample without an image is bad (stage 1 trains the projector alone, which
    only images reach: a batch of text would have no gradient)."""

    def __init__(
        self,
        data: str | Path,
        image_root: str | Path | None,
        labeler: Labeler,
        image_processor: Any,
        skip_bad: bool = False,
        progress: bool = True,
        log: Callable[[str], None] = stderr,
        images_only: bool = False,
    ):
        self.images_only = images_only
        self.image_root = Path(image_root) if image_root is not None else None
        check_image_dir(self.image_root)
        self.labeler = labeler
        self.image_processor = image_processor
        self.skip_bad = skip_bad
        self.log = log
        self.skipped: list[BadSample] = []
        self.dropped_first_turns = 0  # kept samples that opened with a gpt turn, left out
        self.has_text_only = False
        self.truncated = 0
        self.longest = 0
        self.pictures: dict[str, str] = {}
        self.file = SampleFile(data, keep=self._check, progress=progress)
        if not len(self.file) and self.skipped:
            raise LlavaEdgeError(
                f"every sample of {data} was left out as bad; the first: {self.skipped[0]}"
            )
        if not len(self.file):
            raise LlavaEdgeError(f"{data} has no sample left to train on")

    def _check(self, position: int, record: Any) -> bool:
        try:
            sample = parse_sample(record, position)
            if sample.image is not None:
                path = self._check_image(sample)
            elif self.images_only:
                raise BadSample(
                    sample.id,
                    "has no image; stage 1 trains only the projector, which only images reach: "
                    "train on text-only samples in stage 2",
                )
            else:
                self.has_text_only = True
            encoded = self.labeler.encode(sample)
            if sample.image is not None:
                self.pictures[sample.image] = self._fingerprint(sample, path)
            self.dropped_first_turns += sample.dropped_first_turn
            self.truncated += encoded.full_length > len(encoded.input_ids)
            self.longest = max(self.longest, encoded.full_length)
            return True
        except BadSample as e:
            if not self.skip_bad:
                raise BadSample(e.sample_id, e.problem + SKIP_HINT) from None
            self.skipped.append(e)
            return False

    @staticmethod
    def _fingerprint(sample: Sample, path: Path) -> str:
        try:
            return picture_fingerprint(path)
        except OSError as e:
            raise BadSample(sample.id, f"image {path} cannot be read ({e})") from None

    def _check_image(self, sample: Sample) -> Path:
        """Exists and has an image header; decoding every image up front would take hours on
        LLaVA's 665k, so a file broken past its header is found when it is loaded."""
        if self.image_root is None and not Path(sample.image).is_absolute():
            # the run's fault, not the sample's: --skip-bad must not leave them all out
            raise LlavaEdgeError(
                f"sample {sample.id}'s image {sample.image} is relative: pass --images DIR, "
                "the dir it is under"
            )
        path = image_path(sample, self.image_root)
        if not path.is_file():
            raise BadSample(sample.id, f"image {path} does not exist")
        try:
            check_image_file(path)
        except TooLarge:
            raise BadSample(
                sample.id,
                f"image {path} has more pixels than PIL's decompression-bomb limit "
                f"({Image.MAX_IMAGE_PIXELS}); downscale it",
            ) from None
        except Exception as e:  # PIL raises many types for unreadable files
            raise BadSample(sample.id, f"image {path} cannot be read ({e})") from None
        return path

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """The sample at `index`; with `skip_bad`, one found unreadable now (an image broken past
        its header) is named and the next readable sample takes its place, so that a batch stays
        whole (a batch of one would be left empty)."""
        for offset in range(len(self)):
            item = self._item((index + offset) % len(self))
            if item is not None:
                return item
        raise LlavaEdgeError(f"no sample of {self.file.path} is readable; check the images")

    def _item(self, index: int) -> dict[str, torch.Tensor] | None:
        sample = parse_sample(self.file.record(index), int(self.file.positions[index]))
        try:
            encoded = self.labeler.encode(sample)
            item = {
                "input_ids": torch.tensor(encoded.input_ids),
                "labels": torch.tensor(encoded.labels),
            }
            if sample.image is not None:
                try:
                    image = load_image(image_path(sample, self.image_root))
                except LlavaEdgeError as e:
                    raise BadSample(sample.id, str(e)) from None
                pixels = self.image_processor(image, return_tensors="pt")["pixel_values"]
                item["pixel_values"] = pixels[0]
            return item
        except BadSample as e:
            if not self.skip_bad:
                # A plain LlavaEdgeError: a loader worker can re-raise it in the main process
                # (torch rebuilds exceptions from their message alone).
                raise LlavaEdgeError(f"{e}{SKIP_HINT}") from None
            self.log(f"skipped {e}")
            return None


class Collator:
    """Right-pads a batch; images of the samples that have one are stacked in order (the model
    puts them at the image tokens, row by row).

    Padding is masked out (attention 0, label IGNORE), so where the tokenizer names no padding
    token (Llama's has none) any id does: its EOS, as transformers falls back, else 0."""

    def __init__(self, pad_token_id: int | None, eos_token_id: int | None = None):
        self.pad_token_id = next((i for i in (pad_token_id, eos_token_id) if i is not None), 0)

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch
