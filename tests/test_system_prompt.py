"""A system prompt from the Python API and the CLI: the prompt a robot app sets (its role, the
answer format it parses) goes where the chat template writes one, as `serve` writes an OpenAI
system message, on every entry point."""

from __future__ import annotations

import numpy as np
import pytest

from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import BatchEngine, Pipeline

SYSTEM = "You are the vision module of a mobile robot. Answer in one word."
IMAGE = np.full((24, 32, 3), 90, dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    with Pipeline.load(tiny_model_dir) as pipe:
        yield pipe


def served(pipe, turns, system=SYSTEM):
    """The ids `serve` gives the same conversation (it renders with conversation_ids)."""
    return pipe.conversation_ids(turns, [pipe.image_pixels(IMAGE)], 0, system=system)


def test_a_one_shot_answer_takes_the_system_prompt_as_serve_writes_it(pipe):
    ids = pipe.answer(IMAGE, "What is it?", max_new_tokens=2, system=SYSTEM).prompt_token_ids
    assert ids == served(pipe, [("What is it?", None)])
    assert ids != pipe.answer(IMAGE, "What is it?", max_new_tokens=2).prompt_token_ids
    streamed = pipe.stream(IMAGE, "What is it?", max_new_tokens=2, system=SYSTEM)
    list(streamed)
    assert streamed.answer.prompt_token_ids == ids


def test_every_turn_of_a_chat_keeps_its_system_prompt(pipe):
    chat = pipe.chat(IMAGE, system=SYSTEM, max_new_tokens=3)
    first = chat.stream("What is it?")
    list(first)
    assert first.answer.prompt_token_ids == served(pipe, [("What is it?", None)])
    second = chat.stream("And its colour?")
    list(second)
    held = first.answer.prompt_token_ids + first.answer.token_ids  # cut short: no end marker
    assert second.answer.prompt_token_ids[: len(held)] == held
    # a chat going on from a history renders it whole, as serve does
    turns = [("What is it?", first.answer.text), ("And its colour?", None)]
    resumed = pipe.chat(IMAGE, history=turns[:1], system=SYSTEM, max_new_tokens=3)
    again = resumed.stream("And its colour?")
    list(again)
    assert again.answer.prompt_token_ids == served(pipe, turns)
    assert served(pipe, turns) != served(pipe, turns, system=None)


def test_batched_requests_take_the_system_prompt(pipe):
    want = served(pipe, [("What is it?", None)])
    (answer,) = pipe.generate_batch([(IMAGE, "What is it?")], max_new_tokens=2, system=SYSTEM)
    assert answer.prompt_token_ids == want
    with BatchEngine(pipe, max_batch=2) as engine:
        request = engine.submit(IMAGE, "What is it?", max_new_tokens=2, system=SYSTEM)
        assert request.result().prompt_token_ids == want


@pytest.mark.parametrize(
    "options, message",
    [
        ({"system": SYSTEM, "raw": True}, "raw=True leaves out"),
        ({"system": "look at <image>"}, "placeholder"),
        ({"system": 3}, "system prompt must be text"),
    ],
)
def test_a_system_prompt_that_cannot_be_written_is_refused_on_every_entry_point(
    pipe, options, message
):
    prompt = "<image> What is it?" if options.get("raw") else "What is it?"
    calls = [
        lambda: pipe.answer(IMAGE, prompt, **options),
        lambda: pipe.generate_batch([(IMAGE, prompt)], **options),
    ]
    if not options.get("raw"):
        calls.append(lambda: pipe.chat(IMAGE, **options))
    for call in calls:
        with pytest.raises(LlavaEdgeError, match=message):
            call()


def test_a_chat_turn_cut_by_a_stop_string_is_held_with_the_system_prompt(pipe):
    """A stop-cut answer is held as shown, the conversation rendered again: with its system
    prompt, as serve renders the same turns sent back."""
    said = pipe.answer(IMAGE, "What is it?", max_new_tokens=6, system=SYSTEM).text
    stop = said.strip()[-2:]
    assert len(stop) == 2, said  # the tiny model says something of a few characters
    chat = pipe.chat(IMAGE, system=SYSTEM, max_new_tokens=6, stop=[stop])
    shown = chat.ask("What is it?")
    following = chat.stream("And its colour?")
    list(following)
    turns = [("What is it?", shown), ("And its colour?", None)]
    assert following.answer.prompt_token_ids == served(pipe, turns)
