"""Synthetic LLaVA data: pictures of coloured shapes with captions and short-answer questions.

Model weights and data sets cannot be downloaded where this project is built and tested, so the
demo trains on pictures it draws itself. Each picture holds 1-3 shapes of one colour and kind,
placed in one part of the canvas; every fact a question asks about is visible in the pixels.
"""

from __future__ import annotations

import json
import numbers
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from llava_edge.errors import LlavaEdgeError
from llava_edge.files import check_output_dir, replace_dir
from llava_edge.runtime.template import IMAGE_PLACEHOLDER, SHORT_ANSWER

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITIONS = ("left", "right", "top", "bottom")
BACKGROUND = (245, 245, 240)
CANVAS = 96

QUESTIONS = {
    "color": "What color are the shapes?",
    "shape": "What kind of shape is shown?",
    "count": "How many shapes are there?",
    "position": "Where are the shapes?",
}


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    count: int
    position: str

    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.color} {noun} on the {self.position}."

    def answer(self, kind: str) -> str:
        return {
            "color": self.color,
            "shape": self.shape,
            "count": str(self.count),
            "position": self.position,
        }[kind]


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        color=rng.choice(list(COLORS)),
        shape=rng.choice(SHAPES),
        count=rng.randint(1, 3),
        position=rng.choice(POSITIONS),
    )


def draw(scene: Scene, rng: random.Random, size: int = CANVAS) -> Image.Image:
    """Draw the scene's shapes side by side inside its half of the canvas."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    half = size // 2
    box = {
        "left": (0, 0, half, size),
        "right": (half, 0, size, size),
        "top": (0, 0, size, half),
        "bottom": (0, half, size, size),
    }[scene.position]
    x0, y0, x1, y1 = box
    horizontal = (x1 - x0) >= (y1 - y0)
    cells = scene.count
    span = ((x1 - x0) if horizontal else (y1 - y0)) // cells
    # Shapes fill most of their cell, so that a circle, a square and a triangle still differ
    # after the resize to a small vision tower's input (64 px for the demo model).
    radius = max(4, min(span, (y1 - y0) if horizontal else (x1 - x0)) * 2 // 5)
    for i in range(cells):
        if horizontal:
            cx, cy = x0 + span * i + span // 2, (y0 + y1) // 2
        else:
            cx, cy = (x0 + x1) // 2, y0 + span * i + span // 2
        cx += rng.randint(-2, 2)
        cy += rng.randint(-2, 2)
        fill = COLORS[scene.color]
        if scene.shape == "circle":
            pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif scene.shape == "square":
            pen.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            pen.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                fill=fill,
            )
    return image


def caption_sample(sample_id: str, image: str, scene: Scene) -> dict:
    """A stage-1 sample: LLaVA's pretraining data puts only the image in the human turn."""
    return {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": IMAGE_PLACEHOLDER},
            {"from": "gpt", "value": scene.caption()},
        ],
    }


def question_sample(sample_id: str, image: str, scene: Scene, kinds: list[str]) -> dict:
    """A stage-2 sample: several short-answer questions about one image, as LLaVA-1.5 mixes them."""
    conversations = []
    for i, kind in enumerate(kinds):
        question = f"{QUESTIONS[kind]}\n{SHORT_ANSWER}"
        if i == 0:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        conversations.append({"from": "human", "value": question})
        conversations.append({"from": "gpt", "value": scene.answer(kind)})
    return {"id": sample_id, "image": image, "conversations": conversations}


def synthesize(
    out_dir: str | Path, train: int, test: int, seed: int = 0, force: bool = False
) -> dict[str, Path]:
    """Write images/ and the LLaVA JSON files; returns the paths written.

    captions.json (stage 1) and train.json (stage 2) describe the training pictures; test.json
    asks one question per held-out picture, with the answer to score against. The dir is
    written whole or not at all (files.replace_dir); force: replace a non-empty `out_dir`.
    """
    for name, count, least in (("train", train, 1), ("test", test, 0)):
        if not isinstance(count, numbers.Integral) or count < least:
            raise LlavaEdgeError(
                f"--{name} must be a whole number of at least {least}, got {count!r}"
            )
    out = Path(out_dir)
    check_output_dir(out, force)
    with replace_dir(out) as tmp:
        _write(tmp, train, test, seed)
    return {
        "captions": out / "captions.json",
        "train": out / "train.json",
        "test": out / "test.json",
        "images": out / "images",
    }


def _write(out: Path, train: int, test: int, seed: int) -> None:
    (out / "images").mkdir()
    rng = random.Random(seed)
    captions, questions, tests = [], [], []
    kinds = list(QUESTIONS)
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            scene = random_scene(rng)
            name = f"{split}_{i:05d}.png"
            draw(scene, rng).save(out / "images" / name)
            sample_id = f"{split}-{i}"
            if split == "train":
                captions.append(caption_sample(sample_id, name, scene))
                questions.append(
                    question_sample(sample_id, name, scene, rng.sample(kinds, len(kinds)))
                )
            else:
                tests.append(question_sample(sample_id, name, scene, [kinds[i % len(kinds)]]))
    for name, data in (("captions", captions), ("train", questions), ("test", tests)):
        (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def corpus() -> list[str]:
    """Every string the synthetic data and the chat templates produce, for training a tokenizer."""
    rng = random.Random(0)
    lines = [QUESTIONS[k] + "\n" + SHORT_ANSWER for k in QUESTIONS]
    lines += [random_scene(rng).caption() for _ in range(200)]
    lines += list(COLORS) + list(SHAPES) + list(POSITIONS) + [str(n) for n in COUNT_WORDS]
    return lines
