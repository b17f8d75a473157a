"""Questions, answers and system prompts with outer whitespace: many chat templates strip it
(Llama 2's `.strip()`, Llama 3's and Gemma's `| trim`), and the runtime's prompt ids are those
transformers' processor makes with the checkpoint's own template, token for token, in a one-shot
question, a conversation (an image on the first or a later turn, with and without a system
prompt) and a chat session going on from a history.

The templates are real ones (tests/chat_templates.py), put on the tiny model, whose tokenizer
reads every kind of whitespace as tokens of its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from chat_templates import (
    GEMMA,
    LLAMA3,
    LLAMA31,
    MISTRAL_SYSTEM,
    MISTRAL_V01,
    MISTRAL_V03,
    QWEN2,
    VICUNA,
)
from conftest import quiet
from test_export_templates import LLAMA2, LLAMA3_HEADERS, LLAVA_HF, processor_ids

from llava_edge.export.exporter import export_checkpoint
from llava_edge.manifest import CHECKPOINT_INFO_FILE, MANIFEST_NAME, Manifest
from llava_edge.runtime import Pipeline

LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Written to render as llava-hf/llama3-llava-next-8b-hf's prompts render: a message's images as
# `<image>`, then "\n" + its text (so "\n" before a question without an image, a system prompt
# and an answer too).
LLAMA3_NEXT_HF = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# name: (chat template, special tokens of its language model, its end-of-answer token (None: the
# tokenizer's own), whether contents are strings (else lists of parts), whether a system prompt
# is written where the template writes one)
TEMPLATES = {
    "llama-2": (LLAMA2, [], None, True, True),
    "llama-3": (LLAMA3, LLAMA3_TOKENS, "<|eot_id|>", True, True),
    "llama-3.1": (LLAMA31, LLAMA3_TOKENS, "<|eot_id|>", True, True),
    "llama-3-llava-next": (LLAMA3_HEADERS, LLAMA3_TOKENS, "<|eot_id|>", False, True),
    "llama-3-llava-next-hf": (LLAMA3_NEXT_HF, LLAMA3_TOKENS, "<|eot_id|>", False, True),
    "mistral-v0.1": (MISTRAL_V01, [], None, True, False),
    "mistral-v0.2": (MISTRAL_SYSTEM, [], None, True, True),
    "mistral-v0.3": (MISTRAL_V03, ["[INST]", "[/INST]"], None, True, False),
    "vicuna": (VICUNA, [], None, True, True),
    "llava-1.5-hf": (LLAVA_HF, [], None, False, True),
    "qwen2": (QWEN2, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", True, True),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", True, False),
}
# (before, after) each text: spaces, newlines, tabs and Unicode whitespace (no-break space,
# ideographic space, em space), all of which str.strip and Jinja's trim remove
PADS = [(" ", " "), ("\n", "\n\n"), ("\t ", "\t"), ("\u00a0", "\u3000"), ("", " \u2003")]
IMAGE = np.random.default_rng(7).integers(0, 256, (40, 56, 3), np.uint8)


def padded(text: str, pad: tuple[str, str]) -> str:
    return pad[0] + text + pad[1]


def conversation(pad: tuple[str, str]) -> list[tuple[str, str | None]]:
    questions = ("What is in the picture?", "Where is it?", "And its colour?")
    answers = ("A red circle.", "Top left.", None)
    return [
        (padded(q, pad), None if a is None else padded(a, pad))
        for q, a in zip(questions, answers, strict=True)
    ]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """name -> (checkpoint, model dir) of the tiny model with that template, exported once."""
    from transformers import AutoProcessor

    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            jinja, specials, eos, _, _ = TEMPLATES[name]
            root = tmp_path_factory.mktemp(name)
            checkpoint = root / "checkpoint"
            shutil.copytree(tiny_checkpoint, checkpoint)
            (checkpoint / CHECKPOINT_INFO_FILE).unlink()
            processor = AutoProcessor.from_pretrained(checkpoint)
            processor.chat_template = jinja
            if specials:
                processor.tokenizer.add_special_tokens({"additional_special_tokens": specials})
            if eos is not None:
                processor.tokenizer.eos_token = eos
                generation = json.loads((checkpoint / "generation_config.json").read_text())
                generation["eos_token_id"] = processor.tokenizer.eos_token_id
                (checkpoint / "generation_config.json").write_text(json.dumps(generation))
            processor.save_pretrained(checkpoint)
            export_checkpoint(checkpoint, root / "model", verify=False, fused=False, log=quiet)
            made[name] = checkpoint, root / "model"
        return made[name]

    return get


class Reference:
    """The ids transformers' processor makes for a conversation with the checkpoint's template:
    LLaVA's `<image>\\n` before the question in a string content, an image part in a list."""

    def __init__(self, checkpoint: Path, name: str):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.strings = TEMPLATES[name][3]

    def content(self, text: str, image: bool = False) -> str | list[dict]:
        if self.strings:
            return ("<image>\n" if image else "") + text
        return ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]

    def ids(
        self,
        turns: list[tuple[str, str | None]],
        image_turns: tuple[int, ...],
        system: str | None = None,
    ) -> list[int]:
        messages = [] if system is None else [{"role": "system", "content": self.content(system)}]
        for i, (question, answer) in enumerate(turns):
            messages.append({"role": "user", "content": self.content(question, i in image_turns)})
            if answer is not None:
                messages.append({"role": "assistant", "content": self.content(answer)})
        images = [IMAGE] * len(image_turns)
        return processor_ids(self.processor, messages, images)


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_question_with_outer_whitespace_is_prompted_as_the_checkpoints_template(
    name: str, exported
) -> None:
    checkpoint, model_dir = exported(name)
    hf, takes_system = Reference(checkpoint, name), TEMPLATES[name][4]
    with Pipeline.load(model_dir) as pipe:
        pixels = pipe.image_pixels(IMAGE)
        for pad in PADS:
            turns = [(padded("What is in the picture?", pad), None)]
            assert pipe.prompt_ids(turns[0][0], [pixels]) == hf.ids(turns, (0,))
            assert pipe.prompt_ids(turns[0][0], []) == hf.ids(turns, ())
            if takes_system:
                system = padded("You are a robot.", pad)
                ids = pipe.prompt_ids(turns[0][0], [pixels], system=system)
                assert ids == hf.ids(turns, (0,), system)


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_conversation_with_outer_whitespace_is_prompted_as_the_checkpoints_template(
    name: str, exported
) -> None:
    checkpoint, model_dir = exported(name)
    hf, takes_system = Reference(checkpoint, name), TEMPLATES[name][4]
    with Pipeline.load(model_dir) as pipe:
        pixels = pipe.image_pixels(IMAGE)
        for pad in PADS:
            turns = conversation(pad)
            system = padded("You are a robot.", pad) if takes_system else None
            for image_turn in (0, 1):
                ids = pipe.conversation_ids(turns, [pixels], image_turn)
                assert ids == hf.ids(turns, (image_turn,))
                if system is not None:
                    ids = pipe.conversation_ids(turns, [pixels], image_turn, system=system)
                    assert ids == hf.ids(turns, (image_turn,), system)
                ids = pipe.conversation_ids(turns, [pixels], image_turn, system=system)
                assert ids == hf.ids(turns, (image_turn,), system)
            # a chat session going on from the first two turns
            chat = pipe.chat(IMAGE, history=turns[:2], system=system)
            stream = chat.stream(turns[2][0], max_new_tokens=1)
            "".join(stream)
            assert stream.answer.prompt_token_ids == hf.ids(turns, (0,), system)


def test_each_template_strips_as_the_checkpoints_does(exported) -> None:
    """What makes the tests above able to fail: the templates that strip a question, an answer
    or a system prompt, and how, as export reads it off their Jinja."""
    trims = {}
    for name in TEMPLATES:
        template = Manifest.load(exported(name)[1]).template
        trims[name] = (template.trim_user, template.trim_assistant, template.trim_system)
    assert trims == {
        "llama-2": ("content", True, False),  # its system prompt inside the first content
        "llama-3": ("content", True, True),
        "llama-3.1": ("content", True, True),
        "llama-3-llava-next": ("text", True, True),
        "llama-3-llava-next-hf": ("", False, False),
        "mistral-v0.1": ("", False, False),
        "mistral-v0.2": ("", False, False),
        "mistral-v0.3": ("", True, False),
        "vicuna": ("content", False, True),
        "llava-1.5-hf": ("", False, False),
        "qwen2": ("", False, False),
        "gemma": ("content", True, False),
    }


def test_a_dir_whose_template_strips_or_writes_a_prefix_is_format_3(exported) -> None:
    """An older llava-edge reads no trim_* or question_prefix and would prompt such a dir without
    them, silently: those dirs say format 3, which it refuses; others keep the oldest format."""
    versions = {}
    for name in ("llama-3", "llama-3-llava-next-hf", "llava-1.5-hf"):
        versions[name] = Manifest.load(exported(name)[1]).format_version
    assert versions == {"llama-3": 3, "llama-3-llava-next-hf": 3, "llava-1.5-hf": 1}
    data = json.loads((exported("llama-3-llava-next-hf")[1] / MANIFEST_NAME).read_text())
    with pytest.raises(Exception, match=r"format_version 2 is older than .* needs \(3\)"):
        Manifest.from_dict({**data, "format_version": 2})


def test_a_manifest_from_before_trimming_loads_stripping_nothing(tiny_model_dir: Path) -> None:
    data = json.loads((tiny_model_dir / MANIFEST_NAME).read_text())
    for key in ("trim_user", "trim_assistant", "trim_system"):
        del data["template"][key]
    template = Manifest.from_dict(data).template
    assert (template.trim_user, template.trim_assistant, template.trim_system) == ("", False, False)
    data["template"]["trim_user"] = "both"
    with pytest.raises(Exception, match="trim_user 'both' is none of"):
        Manifest.from_dict(data)
