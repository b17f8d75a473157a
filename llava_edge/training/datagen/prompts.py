"""What the LLM is asked: a system prompt and worked examples for each kind of data.

The three kinds follow the LLaVA paper: multi-turn conversations about what is in the image,
detailed descriptions, and complex reasoning that goes beyond recognition. The LLM never sees
pixels: it is told that the captions and boxes are what it sees and that it must write as if
looking at the picture, never mentioning the captions, boxes or their numbers. Each kind answers
in JSON of its own schema (see `replies`); the examples show the schema filled in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from llava_edge.training.datagen.annotations import Box, render

KINDS = ("conversation", "detail", "reasoning")

_SEEING = """\
You are helping to build training data for a visual assistant. You cannot see the image. \
Instead you are given what was written about it: a few captions, each describing the whole \
picture, and a list of labelled objects, each with its box as [x_min, y_min, x_max, y_max] in \
fractions of the image's width and height (0 is the left or top edge, 1 the right or bottom \
edge). Take this as what you see, and write as someone looking at the picture. Use the boxes \
only to understand where things are, how large they are, how many there are and how they relate \
(left of, in front of, next to, on top of). Never mention captions, labels, boxes, coordinates \
or any of their numbers, and do not invent details that the captions and objects do not \
support."""

SYSTEM = {
    "conversation": _SEEING
    + """

Write a conversation about this image between a person who asks and an assistant who answers. \
Ask varied questions: which objects are there, how many, what they look like, what people or \
machines are doing, where things are relative to each other. Only ask what can be answered with \
confidence from what you are given; leave out anything uncertain. Answers are natural and \
direct, one to three sentences, in the voice of an assistant looking at the image. Write 3 to 6 \
turns.

Reply with a JSON object and nothing else: \
{"turns": [{"question": "...", "answer": "..."}, ...]}""",
    "detail": _SEEING
    + """

Write a rich, detailed description of the image: the setting, the main objects and people, what \
they are doing, where they are relative to each other, and the overall impression the scene \
gives. Write one or two paragraphs of flowing prose, as someone describing the picture in front \
of them.

Reply with a JSON object and nothing else: {"description": "..."}""",
    "reasoning": _SEEING
    + """

Write one question about the image that takes more than recognising objects to answer: why \
something is as it is, what may happen next, what a person or a robot should do, what could go \
wrong, or what the scene suggests. Then answer it with clear reasoning in a few sentences, \
grounding each step in what is visible and using general knowledge where it helps. The question \
must be answerable from the image alone.

Reply with a JSON object and nothing else: {"question": "...", "answer": "..."}""",
}

# The human turn of a "detail" sample: one of these, picked by the sample's key (the LLM writes
# only the description).
DETAIL_QUESTIONS = (
    "Describe this image in detail.",
    "Give a thorough description of what the picture shows.",
    "What is going on in this image? Explain in detail.",
    "Walk me through everything you can see in this image.",
    "Write a detailed account of the scene in the photo.",
    "Describe the contents of this image as completely as you can.",
    "Tell me about this picture in as much detail as possible.",
    "Provide an elaborate description of the image.",
)


@dataclass(frozen=True)
class Example:
    captions: tuple[str, ...]
    boxes: tuple[Box, ...]
    replies: dict  # kind -> the JSON reply a good answer would be


def _boxes(*rows: tuple) -> tuple[Box, ...]:
    return tuple(Box(label, *coords) for label, *coords in rows)


EXAMPLES = (
    Example(
        captions=(
            "A forklift carries a stack of pallets down a warehouse aisle.",
            "A worker in a yellow vest walks beside tall metal shelves.",
            "Boxes are stored on shelves on both sides of an aisle in a large storage building.",
        ),
        boxes=_boxes(
            ("forklift", 0.412, 0.388, 0.705, 0.912),
            ("pallet", 0.455, 0.301, 0.690, 0.532),
            ("person", 0.118, 0.402, 0.231, 0.947),
            ("shelf", 0.000, 0.054, 0.338, 0.986),
            ("shelf", 0.742, 0.031, 1.000, 0.978),
            ("box", 0.021, 0.112, 0.147, 0.264),
            ("box", 0.803, 0.208, 0.938, 0.355),
        ),
        replies={
            "conversation": {
                "turns": [
                    {
                        "question": "What vehicle is moving through the aisle?",
                        "answer": "A forklift is driving down the aisle with a stack of pallets "
                        "raised on its forks.",
                    },
                    {
                        "question": "Is anyone else in the aisle?",
                        "answer": "Yes, a worker in a yellow high-visibility vest is walking "
                        "along the left side, close to the shelves.",
                    },
                    {
                        "question": "Where is the worker relative to the forklift?",
                        "answer": "The worker is to the left of the forklift, keeping near the "
                        "shelving on the left-hand side of the aisle.",
                    },
                    {
                        "question": "What is stored on the shelves?",
                        "answer": "Cardboard boxes, stacked on several levels on both sides "
                        "of the aisle.",
                    },
                ]
            },
            "detail": {
                "description": "The picture looks down a long aisle inside a warehouse, lined "
                "with tall metal shelving on both sides. The shelves hold cardboard boxes on "
                "several levels. In the middle of the aisle, a little right of center, a "
                "forklift is driving away from the camera with a stack of wooden pallets lifted "
                "on its forks. On the left, close to the shelves, a worker in a yellow safety "
                "vest is walking in the same stretch of aisle, keeping to the edge. It looks "
                "like an ordinary working day in a busy storage building."
            },
            "reasoning": {
                "question": "What should the forklift driver and the worker each watch out for "
                "here?",
                "answer": "They share a narrow aisle. The forklift carries a tall stack of "
                "pallets, which can block the driver's view and become unstable in a sharp "
                "turn, so the driver should go slowly and keep track of the person on the left. "
                "The worker is doing the right thing by wearing a high-visibility vest and "
                "staying close to the shelves, out of the forklift's path, but should not step "
                "into the middle of the aisle until the vehicle has passed.",
            },
        },
    ),
    Example(
        captions=(
            "A robot arm reaches toward a red mug on a kitchen counter.",
            "A white counter with a mug, a cutting board and a bowl of apples.",
        ),
        boxes=_boxes(
            ("robot arm", 0.602, 0.000, 0.955, 0.581),
            ("cup", 0.488, 0.512, 0.571, 0.660),
            ("cutting board", 0.095, 0.598, 0.420, 0.801),
            ("bowl", 0.701, 0.552, 0.902, 0.733),
            ("apple", 0.731, 0.540, 0.790, 0.612),
            ("apple", 0.802, 0.548, 0.861, 0.618),
        ),
        replies={
            "conversation": {
                "turns": [
                    {
                        "question": "What is the robot arm doing?",
                        "answer": "It is reaching down toward a red mug on the counter, as if "
                        "about to pick it up.",
                    },
                    {"question": "What color is the mug?", "answer": "The mug is red."},
                    {
                        "question": "How many apples are in the bowl?",
                        "answer": "There are two apples in the bowl on the right side of the "
                        "counter.",
                    },
                    {
                        "question": "Where is the cutting board?",
                        "answer": "On the left side of the counter, to the left of the mug and "
                        "a little closer to the camera.",
                    },
                ]
            },
            "detail": {
                "description": "A white kitchen counter fills the lower half of the image. A "
                "robot arm comes in from the top right and reaches down toward a red mug "
                "standing near the middle of the counter. To the left, near the front edge, "
                "lies a cutting board, and on the right sits a bowl holding two apples. The "
                "counter is otherwise clear, which makes the mug stand out as the arm's target."
            },
            "reasoning": {
                "question": "What could go wrong if the robot arm moves quickly toward the mug, "
                "and how can it avoid that?",
                "answer": "The mug stands near the middle of the counter with the bowl of "
                "apples just to its right. A fast, sweeping approach could knock the mug over, "
                "spilling whatever is in it, or bump the bowl. Coming down slowly from above, "
                "closing the gripper around the mug, and lifting it straight up before moving "
                "sideways keeps it clear of both the bowl and the cutting board.",
            },
        },
    ),
)


def messages(kind: str, context: str) -> list[dict]:
    """The chat messages for one request: system prompt, worked examples, then the image."""
    chat = [{"role": "system", "content": SYSTEM[kind]}]
    for example in EXAMPLES:
        chat.append({"role": "user", "content": render(list(example.captions), example.boxes)})
        chat.append({"role": "assistant", "content": json.dumps(example.replies[kind])})
    chat.append({"role": "user", "content": context})
    return chat


def request_seed(seed: int, image: str, kind: str, index: int) -> int:
    """The sampling seed of one request: stable across runs, different for each sample, so that
    `--per-image N` asks for N different samples and a resumed run asks what the first would."""
    return _hash(f"{seed}\0{image}\0{kind}\0{index}") % (1 << 31)


def detail_question(image: str, index: int) -> str:
    return DETAIL_QUESTIONS[_hash(f"{image}\0{index}") % len(DETAIL_QUESTIONS)]


def prompts_version() -> str:
    """A digest of every prompt and example: a journal written with other prompts is not
    resumed with these."""
    text = json.dumps([DETAIL_QUESTIONS, [messages(kind, "") for kind in KINDS]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
