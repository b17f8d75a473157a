"""What annotators (or a detector) say about each image, and how the LLM is shown it.

Two inputs are read:
- COCO-style JSON (`images`, `annotations`, `categories`): annotations with a `caption` are
  captions, annotations with a `bbox` ([x, y, width, height] in pixels) and a `category_id` are
  boxes. COCO keeps captions and instances in separate files; several files are merged by image
  file name.
- JSONL, one image a line: `{"image": "a.jpg", "captions": [...], "boxes": [{"label": "cup",
  "box": [x_min, y_min, x_max, y_max]}], "width": W, "height": H}`, boxes in pixels; width and
  height may be left out (they are then read from the image file's header, upright).

The LLM sees an image only as this text: its captions, then each box as its label and
[x_min, y_min, x_max, y_max] in fractions of the image's width and height, three decimals, as
the LLaVA paper renders them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError
from llava_edge.logs import terminal_bar


@dataclass(frozen=True)
class Box:
    label: str
    x_min: float  # fractions of the image's width and height, 0 = left / top edge
    y_min: float
    x_max: float
    y_max: float

    def numbers(self) -> list[str]:
        return [f"{v:.3f}" for v in (self.x_min, self.y_min, self.x_max, self.y_max)]


@dataclass(frozen=True)
class ImageNotes:
    image: str  # path relative to the image dir, as the LLaVA JSON will name it
    captions: tuple[str, ...]
    boxes: tuple[Box, ...]

    def render(self) -> str:
        """The text the LLM is shown instead of the image."""
        return render(list(self.captions), self.boxes)

    def coordinates(self) -> set[str]:
        """Every number the rendered boxes show; one of them in an answer is a leak."""
        return {n for box in self.boxes for n in box.numbers()}


@dataclass
class _Draft:
    """An image's notes while files are read: boxes in pixels until the size is known."""

    image: str
    width: float | None = None
    height: float | None = None
    captions: list[str] = field(default_factory=list)
    boxes: list[tuple[str, list[float]]] = field(default_factory=list)  # label, xyxy pixels


def render(captions: list[str], boxes: tuple[Box, ...] | list[Box]) -> str:
    lines = []
    if captions:
        lines.append("Captions:")
        lines += [f"- {c}" for c in captions]
    if boxes:
        if lines:
            lines.append("")
        lines.append(
            "Objects (label: [x_min, y_min, x_max, y_max], as fractions of the image's width "
            "and height):"
        )
        lines += [f"- {b.label}: [{', '.join(b.numbers())}]" for b in boxes]
    return "\n".join(lines)


def read_annotations(
    paths: list[str | Path], images: str | Path, progress: bool = False
) -> tuple[list[ImageNotes], list[tuple[str, str]]]:
    """Read and merge annotation files; returns the usable images in file order, and the images
    left out with the reason (no file in `images`, nothing to describe).

    progress: a bar, on a terminal only, while each image's header is read for its size (COCO's
    118k pictures, on a cold disk, take minutes)."""
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise LlavaEdgeError(f"image dir {image_dir} does not exist")
    if not paths:
        raise LlavaEdgeError("no annotation file given (--annotations FILE)")
    drafts: dict[str, _Draft] = {}
    for path in paths:
        _read_file(Path(path), drafts)
    notes, skipped = [], []
    for draft in terminal_bar(drafts.values(), progress, desc="checking images", unit=" images"):
        file = image_dir / draft.image
        if not file.is_file():
            skipped.append((draft.image, f"no file {file}"))
            continue
        try:
            size = _upright_size(file)
        except Exception as e:  # PIL raises many types for unreadable files
            skipped.append((draft.image, f"cannot be read ({e})"))  # training could not either
            continue
        finished = _finish(draft, size)
        try:
            finished.render().encode("utf-8")
        except UnicodeEncodeError:  # a "\ud83d" escape in the file: no request can carry it
            raise LlavaEdgeError(
                f"{draft.image}: its captions or labels hold half of a UTF-16 pair (a lone "
                "surrogate, half of an emoji); fix the text"
            ) from None
        if finished.captions or finished.boxes:
            notes.append(finished)
        else:
            skipped.append((draft.image, "no caption and no box to describe"))
    if not notes:
        raise LlavaEdgeError(_none_usable(paths, len(drafts), skipped))
    return notes, skipped


def _none_usable(paths: list[str | Path], annotated: int, skipped: list[tuple[str, str]]) -> str:
    """Why no image can be asked about, and where to look: --images only where the files are
    missing."""
    if not annotated:
        return f"{', '.join(map(str, paths))}: no image is annotated; check the annotation files"
    why = skipped[0][1]
    if why.startswith("no file"):
        fix = "check --images"
    elif why.startswith("cannot be read"):
        fix = "check the image files"
    else:
        fix = "give each image a caption or a box"
    return f"none of the {annotated} annotated images is usable ({why}); {fix}"


def _read_file(path: Path, drafts: dict[str, _Draft]) -> None:
    if not path.is_file():
        raise LlavaEdgeError(f"annotation file {path} does not exist")
    text = read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None  # not one JSON document: JSONL, or broken (said line by line below)
    if isinstance(document, dict) and "images" in document:
        _read_coco(path, document, drafts)
    elif isinstance(document, list) or (isinstance(document, dict) and "image" not in document):
        raise LlavaEdgeError(
            f"{path} is neither COCO annotations (a JSON object with 'images' and "
            "'annotations') nor JSONL of {image, captions, boxes}"
        )
    else:
        _read_jsonl(path, text, drafts)


def read_text(path: Path) -> str:
    """A JSON or JSONL file's text (UTF-8, with or without a byte-order mark)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LlavaEdgeError(
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at {e.start}); JSON is "
            "UTF-8: save it as UTF-8"
        ) from None
    except OSError as e:
        raise LlavaEdgeError(f"cannot read {path}: {e.strerror}") from None


def _read_coco(path: Path, document: dict, drafts: dict[str, _Draft]) -> None:
    def bad(problem: str) -> LlavaEdgeError:
        return LlavaEdgeError(f"{path}: {problem} (COCO annotations expected)")

    images, annotations = document.get("images"), document.get("annotations", [])
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise bad("'images' and 'annotations' must be lists")
    categories = {}
    for category in document.get("categories") or []:
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise bad("a category has no 'id' or 'name'")
        categories[category["id"]] = str(category["name"])
    by_id: dict[Any, _Draft] = {}
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise bad(f"image #{i} has no 'id' or 'file_name'")
        draft = drafts.setdefault(str(entry["file_name"]), _Draft(str(entry["file_name"])))
        other = by_id.get(entry["id"])
        if other is not None and other is not draft:
            raise bad(
                f"image id {entry['id']!r} names both {other.image!r} and {draft.image!r}; "
                "each image needs its own id"
            )
        draft.width = _size(entry.get("width")) or draft.width
        draft.height = _size(entry.get("height")) or draft.height
        by_id[entry["id"]] = draft
    for i, entry in enumerate(annotations):
        if not isinstance(entry, dict) or entry.get("image_id") not in by_id:
            raise bad(f"annotation #{i} names no image of the file ('image_id')")
        draft = by_id[entry["image_id"]]
        if isinstance(entry.get("caption"), str) and entry["caption"].strip():
            draft.captions.append(entry["caption"].strip())
        if "bbox" in entry:
            if entry.get("category_id") not in categories:
                raise bad(f"annotation #{i} has a category_id that 'categories' does not name")
            x, y, w, h = _numbers(entry["bbox"], 4, f"annotation #{i}'s bbox", path)
            draft.boxes.append((categories[entry["category_id"]], [x, y, x + w, y + h]))


def _read_jsonl(path: Path, text: str, drafts: dict[str, _Draft]) -> None:
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is text
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlavaEdgeError(
                f"{where}: not valid JSON ({e.msg}); expected COCO annotations or JSONL of "
                "{image, captions, boxes}"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise LlavaEdgeError(f"{where}: expected an object with an 'image' file name")
        draft = drafts.setdefault(record["image"], _Draft(record["image"]))
        draft.width = _size(record.get("width")) or draft.width
        draft.height = _size(record.get("height")) or draft.height
        captions = record.get("captions", [])
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise LlavaEdgeError(f"{where}: 'captions' must be a list of strings")
        draft.captions += [c.strip() for c in captions if c.strip()]
        boxes = record.get("boxes", [])
        if not isinstance(boxes, list):
            raise LlavaEdgeError(f"{where}: 'boxes' must be a list of {{label, box}}")
        for box in boxes:
            if not isinstance(box, dict) or not isinstance(box.get("label"), str):
                raise LlavaEdgeError(f"{where}: each box needs a 'label' and a 'box'")
            draft.boxes.append((box["label"], _numbers(box.get("box"), 4, "a box", where)))


def _numbers(value: Any, count: int, what: str, where: Path | str) -> list[float]:
    if (
        not isinstance(value, list)
        or len(value) != count
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    ):
        raise LlavaEdgeError(f"{where}: {what} must be {count} numbers")
    return [float(v) for v in value]


def _size(value: Any) -> float | None:
    """An annotated width or height; anything but a positive number means: read the file."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def _upright_size(file: Path) -> tuple[int, int]:
    """The picture's width and height from its header, upright: stored turned a quarter, it is
    shown upright by labelling tools, training and the runtime (EXIF orientation applied)."""
    from PIL import Image

    from llava_edge.runtime.image import upright_size

    with Image.open(file) as image:
        return upright_size(image)


def _finish(draft: _Draft, size: tuple[int, int]) -> ImageNotes:
    """Normalise the boxes by the image size (the file's when not annotated)."""
    width, height = (draft.width, draft.height) if draft.width and draft.height else size
    boxes = []
    for label, (x0, y0, x1, y1) in draft.boxes:
        if (
            x0 != x1
            and y0 != y1
            and (
                min(x0, x1) >= width
                or max(x0, x1) <= 0
                or min(y0, y1) >= height
                or max(y0, y1) <= 0
            )
        ):  # not a box cut by the edge: wrong sizes, or boxes of another image
            raise LlavaEdgeError(
                f"{draft.image}: the {label!r} box {[x0, y0, x1, y1]} (x_min, y_min, x_max, "
                f"y_max in pixels) lies wholly outside the {width:g} x {height:g} image; check "
                "the box and the image's width and height (left out, they are read from the file)"
            )
        box = Box(
            label.strip(),
            _clamp(min(x0, x1) / width),
            _clamp(min(y0, y1) / height),
            _clamp(max(x0, x1) / width),
            _clamp(max(y0, y1) / height),
        )
        if box.x_max > box.x_min and box.y_max > box.y_min and box.label:
            boxes.append(box)  # empty boxes (zero area after clamping) say nothing
    # The same label in two files (a file given twice, a detector's output beside the labelling
    # tool's) is one object: twice, the LLM would see two forklifts where there is one.
    captions = tuple(dict.fromkeys(draft.captions))
    return ImageNotes(draft.image, captions, tuple(dict.fromkeys(boxes)))


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))
