"""A conversation's token ids are those of its whole text encoded at once, as training encodes
it, on every path: a chat session's later turns, a history given to a session, and the
conversations the server renders. The built-in tokenizer, like Llama's, reads a turn's first
word differently at the start of a text ("▁USER:") and after "</s>" ("USER", ":"), so encoding
each turn alone gives other ids than the model was trained on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Pipeline
from llava_edge.runtime.template import render, user_turn

FIRST, SECOND = "What is in the picture?", "And its colour?"


@pytest.fixture(scope="module")
def pipe(context_model_dir):
    with Pipeline.load(context_model_dir, threads=1) as p:
        yield p


def frame() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (40, 56, 3), np.uint8)


def whole(pipe: Pipeline, turns: list[tuple[str, str | None]]) -> list[int]:
    """The conversation rendered and encoded as training does (one text, one encode)."""
    text = "".join(segment for segment, _ in render(pipe.manifest.template, turns, image=True))
    return pipe.codec.encode(text, first=True, image_tokens=pipe.manifest.num_image_tokens)


class EndsAt:
    """The pipeline's backend, with the end-of-sequence token forced at decoder call `call`."""

    def __init__(self, backend, eos: int, call: int):
        self.backend, self.eos, self.call, self.calls = backend, eos, call, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def decode(self, *args):
        logits = self.backend.decode(*args)
        self.calls += 1
        if self.calls == self.call:
            logits = logits.copy()
            logits[..., -1, self.eos] = 1e9
        return logits


def test_the_tokenizer_reads_a_turn_differently_alone_and_in_the_conversation(pipe):
    """What makes the other tests able to fail."""
    alone = pipe.codec.encode(user_turn(pipe.manifest.template, SECOND, False, False), first=False)
    turns = [(FIRST, "A red square."), (SECOND, None)]
    eos = pipe.manifest.tokens.eos_token_ids[0]
    ids = whole(pipe, turns)
    assert ids[ids.index(eos) + 1 :] != alone


def test_conversation_ids_are_the_whole_conversation_encoded(pipe):
    turns = [(FIRST, "A red square."), (SECOND, None)]
    pixels = pipe.image_pixels(frame())
    assert pipe.conversation_ids(turns, pixels, image_turn=0) == whole(pipe, turns)
    briefed = pipe.conversation_ids(turns, pixels, image_turn=0, system="Be brief.")
    assert pipe.codec.decode(briefed).startswith("Be brief. ")
    with pytest.raises(LlavaEdgeError, match="not the last"):
        pipe.conversation_ids([("Q1", None), ("Q2", None)])
    with pytest.raises(LlavaEdgeError, match="placeholder"):
        pipe.conversation_ids([("<image> Q1", None)])
    with pytest.raises(LlavaEdgeError, match="together"):
        pipe.conversation_ids(turns, pixels)


def test_conversation_ids_take_a_numpy_turn_index(pipe):
    """image_turn is an int, and robot code holds numpy's (an index from np.argmax over its
    frames): one counts as the int it holds, for every image."""
    turns = [(FIRST, "A red square."), (SECOND, None)]
    pixels = [pipe.image_pixels(frame())] * 2
    expected = pipe.conversation_ids(turns, pixels, image_turn=1)
    assert pipe.conversation_ids(turns, pixels, image_turn=np.int64(1)) == expected
    with pytest.raises(LlavaEdgeError, match="together"):
        pipe.conversation_ids(turns, None, image_turn=np.int32(0))


# llava-hf's LLaVA-1.5 template ends an answer with a space, which the tokenizer reads together
# with the next turn's "USER:" ("▁USER:"), not as a token of its own.
ANSWER_ENDS = ["</s>", " "]


@pytest.mark.parametrize("answer_end", ANSWER_ENDS)
def test_a_turn_after_a_history_is_encoded_with_it(pipe, answer_end, monkeypatch):
    template = dataclasses.replace(pipe.manifest.template, answer_end=answer_end)
    monkeypatch.setattr(pipe.manifest, "template", template)
    turns = [(FIRST, "A red square."), (SECOND, None)]
    chat = pipe.chat(frame(), history=turns[:1])
    stream = chat.stream(SECOND, max_new_tokens=2)
    "".join(stream)
    assert stream.answer.prompt_token_ids == whole(pipe, turns)
    # and a turn after an answer cut by a stop string, which the chat holds as shown
    said = stream.answer.text
    assert said.strip(), "the tiny model says something"
    stopped = pipe.chat(frame(), history=turns[:1], stop=[said.strip()[-1]])
    cut = stopped.stream(SECOND, max_new_tokens=2)
    "".join(cut)
    assert cut.answer.finish_reason == "stop"
    following = stopped.stream(FIRST, max_new_tokens=1)
    "".join(following)
    third = [*turns[:1], (SECOND, cut.answer.text), (FIRST, None)]
    assert following.answer.prompt_token_ids == whole(pipe, third)


def test_a_turn_after_an_answer_that_ended_follows_it_as_in_the_whole_conversation(
    pipe, monkeypatch
):
    """Where the template's end of an answer is no end-of-sequence token (llava-hf's space),
    the model's EOS stands for none of it: what follows the answer in the whole conversation
    follows the EOS."""
    template = dataclasses.replace(pipe.manifest.template, answer_end=" ")
    monkeypatch.setattr(pipe.manifest, "template", template)
    eos = pipe.manifest.tokens.eos_token_ids[0]
    monkeypatch.setattr(pipe, "backend", EndsAt(pipe.backend, eos, call=3))
    chat = pipe.chat(frame())
    first = chat.stream(FIRST, max_new_tokens=8)
    "".join(first)
    assert first.answer.token_ids[-1] == eos
    second = chat.stream(SECOND, max_new_tokens=2)
    "".join(second)
    reference = whole(pipe, [(FIRST, "Anything."), (SECOND, None)])
    answered = pipe.codec.encode(
        user_turn(template, FIRST, image=True, first=True) + template.answer_prefix + "Anything.",
        image_tokens=pipe.manifest.num_image_tokens,
    )
    assert reference[: len(answered)] == answered  # the answer ends at a token boundary
    held = first.answer.prompt_token_ids + first.answer.token_ids
    assert second.answer.prompt_token_ids == held + reference[len(answered) :]


@pytest.mark.parametrize("answer_end", ["</s>", "</s>\n"])
def test_a_turn_after_an_answer_that_ended_is_encoded_as_in_the_whole_conversation(
    pipe, answer_end, monkeypatch
):
    """After the model's end-of-sequence token, the next turn's ids are what follow it in the
    whole conversation; with a ChatML-like end marker ("<|im_end|>\\n") that includes the text
    after the token, which the model never generates."""
    template = dataclasses.replace(pipe.manifest.template, answer_end=answer_end)
    monkeypatch.setattr(pipe.manifest, "template", template)
    eos = pipe.manifest.tokens.eos_token_ids[0]
    monkeypatch.setattr(pipe, "backend", EndsAt(pipe.backend, eos, call=3))
    chat = pipe.chat(frame())
    first = chat.stream(FIRST, max_new_tokens=8)
    "".join(first)
    assert first.answer.token_ids[-1] == eos and first.answer.finish_reason == "eos"
    second = chat.stream(SECOND, max_new_tokens=2)
    "".join(second)
    reference = whole(pipe, [(FIRST, "Anything."), (SECOND, None)])
    after_eos = reference[reference.index(eos) + 1 :]
    held = first.answer.prompt_token_ids + first.answer.token_ids
    assert second.answer.prompt_token_ids == held + after_eos


def test_a_turn_after_an_answer_cut_short_closes_it(pipe):
    chat = pipe.chat(frame())
    first = chat.stream(FIRST, max_new_tokens=3, ignore_eos=True)
    "".join(first)
    assert first.answer.finish_reason == "length"
    second = chat.stream(SECOND, max_new_tokens=2)
    "".join(second)
    eos = pipe.manifest.tokens.eos_token_ids[0]
    reference = whole(pipe, [(FIRST, "Anything."), (SECOND, None)])
    closing = reference[reference.index(eos) :]  # the end marker, then the next turn
    held = first.answer.prompt_token_ids + first.answer.token_ids
    assert second.answer.prompt_token_ids == held + closing
