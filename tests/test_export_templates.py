"""Checkpoints that bring their own chat template: export reads the manifest's template strings
off it, and the runtime's prompts are then token for token what transformers' processor makes
with that template. Templates the strings cannot express, or that contradict llava_edge.json,
are refused with one line.

The templates are real ones (as published with the checkpoints named), put on the tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import date
from pathlib import Path

import pytest
from chat_templates import GEMMA3, LLAMA31, LLAMA32, MISTRAL_SMALL, MISTRAL_SMALL_31
from conftest import quiet
from hf_checkpoints import ONEVISION_TEMPLATE as ONEVISION

from llava_edge.cli import main
from llava_edge.export.exporter import export_checkpoint
from llava_edge.manifest import CHECKPOINT_INFO_FILE, Manifest
from llava_edge.runtime import Pipeline
from llava_edge.runtime.template import TEMPLATES, render

# llava-hf/llava-1.5-7b-hf: multimodal message parts, no system prompt, answers end in a space.
LLAVA_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# mistralai/Mistral-7B-Instruct-v0.2: string contents, BOS written by the template, EOS after
# each answer.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)
# meta-llama/Llama-2-7b-chat-hf: string contents, BOS written before every [INST], a system
# prompt inside the first [INST] in <<SYS>>, no default one, no generation prompt of its own.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# Qwen2-style ChatML with its default system prompt, images as `<image>\n` before the text.
CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# microsoft/Phi-3-mini-4k-instruct: string contents, each message closed by <|end|> and a newline.
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Llama 3's headers, on a tokenizer whose end token is not the template's <|eot_id|>: the answer
# end and the next header ("<|eot_id|><|start_header_id|>") and the first head
# ("<s><|start_header_id|>") share a ">" that belongs to neither header.
LLAMA3_HEADERS = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] | trim }}{% endfor %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHAT = [
    ("What is in the picture?", "A red circle."),
    ("Where is it?", "Top left."),
    ("And what colour is the background?", None),
]


# The special tokens of a template's model, the last ending answers (its end-of-sequence token).
SPECIALS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "phi-3": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
}


def with_template(
    tiny_checkpoint: Path, out: Path, template: str, specials: list[str] | None = None
) -> Path:
    """The tiny checkpoint with another chat template and no llava_edge.json, and the special
    tokens of its model, the last ending answers (the model's end-of-sequence token)."""
    from transformers import AutoProcessor

    shutil.copytree(tiny_checkpoint, out)
    (out / CHECKPOINT_INFO_FILE).unlink()
    processor = AutoProcessor.from_pretrained(out)
    processor.chat_template = template
    if specials:
        tokenizer = processor.tokenizer
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
        tokenizer.eos_token = specials[-1]
        generation = json.loads((out / "generation_config.json").read_text())
        generation["eos_token_id"] = tokenizer.eos_token_id
        (out / "generation_config.json").write_text(json.dumps(generation))
    processor.save_pretrained(out)
    return out


def hf_ids(checkpoint: Path, turns: list, image, system: str | None = None) -> list[int]:
    """The ids transformers' processor makes for `turns` (after a system message, if given) with
    the checkpoint's template."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    strings = any(
        f in processor.chat_template for f in ("message['content'] +", "+ message['content']")
    )
    messages = []
    if system is not None:
        content = system if strings else [{"type": "text", "text": system}]
        messages.append({"role": "system", "content": content})
    for i, (question, answer) in enumerate(turns):
        if strings:
            content = ("<image>\n" if i == 0 else "") + question
        else:
            content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            text = answer if strings else [{"type": "text", "text": answer}]
            messages.append({"role": "assistant", "content": text})
    return processor_ids(processor, messages, [image])


def processor_ids(processor, messages: list[dict], images: list) -> list[int]:
    """The ids of `processor.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=True)` with `images`, made as that path makes them on every transformers the
    [export] extra takes (its `processor_kwargs=` is newer than the floor): the rendered prompt
    through the processor, without a second BOS where the template writes one."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    specials = {"add_special_tokens": False} if bos is not None and text.startswith(bos) else {}
    inputs = processor(images=images or None, text=text, **specials)
    return list(inputs["input_ids"][0])


@pytest.mark.parametrize(
    "name", ["llava-1.5-hf", "mistral-instruct", "chatml", "phi-3", "llama-2", "onevision"]
)
def test_the_runtime_prompts_as_the_checkpoints_own_template(
    name: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from llava_edge.export.verify import sample_image

    jinja = {
        "llava-1.5-hf": LLAVA_HF,
        "mistral-instruct": MISTRAL,
        "chatml": CHATML,
        "llama-2": LLAMA2,
        # past answers after "assistant \n", a new one after "assistant\n"
        "onevision": ONEVISION,
    }
    template = {**jinja, "phi-3": PHI3}[name]
    specials = SPECIALS.get("chatml" if name == "onevision" else name)
    checkpoint = with_template(tiny_checkpoint, tmp_path / "ckpt", template, specials)
    report = export_checkpoint(checkpoint, tmp_path / "model", log=quiet)  # verification on
    image = sample_image(120)
    with Pipeline.load(tmp_path / "model") as pipe:
        answer = pipe.answer(image, CHAT[0][0], max_new_tokens=1)
        assert answer.prompt_token_ids == hf_ids(checkpoint, [(CHAT[0][0], None)], image)
        text = "".join(t for t, _ in render(pipe.manifest.template, CHAT, image=True))
        assert pipe.codec.encode(text) == hf_ids(checkpoint, CHAT, image)
        template = pipe.manifest.template
        # a system prompt is written as the template writes one: ChatML's in its own block
        system = "You are a robot."
        ids = pipe.conversation_ids(CHAT, pipe.image_pixels(image), 0, system=system)
        if name != "mistral-instruct":
            assert ids == hf_ids(checkpoint, CHAT, image, system=system)
        else:  # whose template refuses one: it comes after the BOS the template writes
            assert ids[0] == pipe.manifest.tokens.bos_token_id and ids.count(ids[0]) == 1
    # verification compared the same with the checkpoint's own template, and said so
    assert report["passed"] and report["chat_ids_equal"] and report["prompt_ids_equal"]
    if name == "chatml":  # the model's end token closes an answer; training supervises it
        assert template.answer_end == "<|im_end|>" and template.user.endswith("<|im_start|>user\n")
    # the built-in templates for fine-tuning these language models are their own formats
    builtin = {"chatml": "qwen_1_5", "phi-3": "phi_3"}.get(name)
    if builtin is not None:
        assert dataclasses.replace(template, name=builtin) == TEMPLATES[builtin]
    if name == "mistral-instruct":  # BOS written by the template, as text, never twice
        assert template.system == "<s>" and template.answer_end == "</s>"
    if name == "onevision":  # the past answer's header is its own
        assert template.answered_assistant == "<|im_end|>\n<|im_start|>assistant \n"


def test_a_header_is_never_cut_out_of_a_special_token(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The user header starts after BOS, not inside it: BOS stays the system prompt's (written by
    the template, never added a second time) and the prompts are transformers' token for token."""
    from llava_edge.export.verify import sample_image

    checkpoint = with_template(tiny_checkpoint, tmp_path / "ckpt", LLAMA3_HEADERS)
    assert main(["export", str(checkpoint), str(tmp_path / "model"), "--no-verify"]) == 0
    image = sample_image(120)
    with Pipeline.load(tmp_path / "model") as pipe:
        template = pipe.manifest.template
        assert template.system == "<s>" and template.answer_end == "<|eot_id|>"
        answer = pipe.answer(image, CHAT[0][0], max_new_tokens=1)
        assert answer.prompt_token_ids == hf_ids(checkpoint, [(CHAT[0][0], None)], image)
        text = "".join(t for t, _ in render(template, CHAT, image=True))
        assert pipe.codec.encode(text) == hf_ids(checkpoint, CHAT, image)


# An image written as two <image> marks: transformers' processor then wants two images.
TWO_MARKS = LLAVA_HF.replace("{{ '<image>\n' }}", "{{ '<image>\n<image>\n' }}")
# The image after the question: the strings write images before it.
IMAGE_AFTER = (
    "{% for message in messages %}{{ message['role'].upper() + ': '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '\n<image>' }}{% endfor %}{{ ' ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, why",
    [
        (TWO_MARKS, "an image is written as 2 '<image>' marks"),
        (IMAGE_AFTER, "the image is not placed just before the question"),
    ],
    ids=["two-image-marks", "image-after-question"],
)
def test_a_template_the_strings_cannot_express_is_refused(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, template: str, why: str
) -> None:
    checkpoint = with_template(tiny_checkpoint, tmp_path / "ckpt", template)
    assert main(["export", str(checkpoint), str(tmp_path / "model"), "--no-verify"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "chat template cannot be written as llava-edge's template strings" in line
    assert why in line and CHECKPOINT_INFO_FILE in line
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model.*"))


@pytest.mark.parametrize("named", ["vicuna_v1", "no_such_template"])
def test_a_named_template_must_exist_and_agree_with_the_chat_template(
    named: str, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = with_template(tiny_checkpoint, tmp_path / "ckpt", LLAVA_HF)
    (checkpoint / CHECKPOINT_INFO_FILE).write_text(json.dumps({"template": named}))
    assert main(["export", str(checkpoint), str(tmp_path / "model"), "--no-verify"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert named in line
    assert ("renders prompts differently" if named == "vicuna_v1" else "does not know") in line
    assert not (tmp_path / "model").exists()


def test_templates_llava_edge_knows_keep_their_name(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint from `llava-edge init` whose llava_edge.json was lost: its chat template is
    recognised as the llava_1_5 template it was written from, split as that one is."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / CHECKPOINT_INFO_FILE).unlink()
    export_checkpoint(checkpoint, tmp_path / "model", verify=False, log=quiet)
    assert Manifest.load(tmp_path / "model").template.name == "llava_1_5"


def without_template(tiny_checkpoint: Path, out: Path, specials: list[str]) -> Path:
    """The tiny checkpoint with no chat template, no llava_edge.json, and `specials` added to
    its tokenizer."""
    from transformers import AutoProcessor

    shutil.copytree(tiny_checkpoint, out)
    (out / CHECKPOINT_INFO_FILE).unlink()
    processor = AutoProcessor.from_pretrained(out)
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    if specials:
        processor.tokenizer.add_special_tokens({"additional_special_tokens": specials})
    processor.save_pretrained(out)
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    return out


@pytest.mark.parametrize(
    "specials, warned",
    [
        ([], None),
        (["<|im_start|>", "<|im_end|>"], "qwen_1_5"),
        (["<|start_header_id|>"], "llama_3"),
        (["[INST]"], "mistral_instruct"),
        (["<start_of_turn>", "<end_of_turn>"], "gemma"),
    ],
)
def test_export_says_which_template_it_fell_back_to(
    tiny_checkpoint: Path, tmp_path: Path, specials: list[str], warned: str | None
) -> None:
    checkpoint = without_template(tiny_checkpoint, tmp_path / "checkpoint", specials)
    lines: list[str] = []
    export_checkpoint(checkpoint, tmp_path / "model", verify=False, fused=False, log=lines.append)
    said = [line for line in lines if "llava_1_5" in line]
    assert len(said) == 1, lines
    assert CHECKPOINT_INFO_FILE in said[0] and '"template"' in said[0]  # how to name another
    assert Manifest.load(tmp_path / "model").template.name == "llava_1_5"
    if warned is None:
        assert "warning" not in said[0]
    else:
        assert said[0].startswith("warning:") and warned in said[0] and specials[0] in said[0]


def test_export_says_which_template_it_was_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    export_checkpoint(
        tiny_checkpoint, tmp_path / "model", verify=False, fused=False, log=lines.append
    )
    name = json.loads((tiny_checkpoint / CHECKPOINT_INFO_FILE).read_text())["template"]
    assert [line for line in lines if line.startswith("prompt template:")] == [
        f"prompt template: {name} (named in {tiny_checkpoint / CHECKPOINT_INFO_FILE})"
    ]


@pytest.mark.parametrize("name", ["llama-3.1", "llama-3.2"])
def test_export_warns_of_a_chat_template_that_writes_the_day(
    name: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Llama 3.2's template writes the day a prompt is made (transformers' strftime_now), which
    the manifest's strings cannot follow: export says the model dir keeps the day of export.
    Llama 3.1's writes a fixed date, which they hold."""
    template = {"llama-3.1": LLAMA31, "llama-3.2": LLAMA32}[name]
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    checkpoint = with_template(tiny_checkpoint, tmp_path / "ckpt", template, specials)
    lines: list[str] = []
    before = date.today()
    export_checkpoint(checkpoint, tmp_path / "model", verify=False, fused=False, log=lines.append)
    days = {day.strftime("%d %b %Y") for day in (before, date.today())}
    (said,) = [line for line in lines if "prompt template:" in line]
    system = Manifest.load(tmp_path / "model").template.system
    if name == "llama-3.2":
        assert said.startswith("warning:") and "strftime_now" in said
        assert any(f"Today Date: {day}" in system for day in days)
    else:
        assert "warning" not in said and "Today Date: 26 Jul 2024" in system


@pytest.mark.parametrize("name", ["mistral-instruct", "llava-1.5-hf"])
def test_a_raw_prompt_gets_the_bos_transformers_processor_gives_it(
    name: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A raw prompt is sent without the template, as `processor(text=prompt, images=...)` takes
    one (the model cards' way): the tokenizer's BOS goes first, on a dir whose template writes
    BOS itself (Mistral's) too, where templated prompts and a chat get it from the template
    alone."""
    from transformers import AutoProcessor

    from llava_edge.export.verify import sample_image

    template = {"mistral-instruct": MISTRAL, "llava-1.5-hf": LLAVA_HF}[name]
    checkpoint = with_template(tiny_checkpoint, tmp_path / "ckpt", template)
    export_checkpoint(checkpoint, tmp_path / "model", verify=False, fused=False, log=quiet)
    processor = AutoProcessor.from_pretrained(checkpoint)
    image = sample_image(120)
    with Pipeline.load(tmp_path / "model") as pipe:
        for prompt, images in [("[INST] <image>\nWhat is it? [/INST]", [image]), ("Hi.", [])]:
            ids = pipe.answer(images or None, prompt, raw=True, max_new_tokens=1).prompt_token_ids
            reference = processor(text=prompt, images=images or None)["input_ids"][0]
            assert ids == list(reference)
        question = hf_ids(checkpoint, [(CHAT[0][0], None)], image)
        assert pipe.answer(image, CHAT[0][0], max_new_tokens=1).prompt_token_ids == question
        stream = pipe.chat(image).stream(CHAT[0][0], max_new_tokens=1)
        "".join(stream)
        assert stream.answer.prompt_token_ids == question


def test_a_template_that_marks_images_its_own_way_takes_llavas_image_in_a_string(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Gemma 3's template writes an image part as its own model's <start_of_image>, which
    transformers' LLaVA processor does not read as an image: a LLaVA checkpoint on its language
    model is prompted as the processor takes it, LLaVA's `<image>\\n` before the question in a
    string, and a system prompt goes inside the first turn, where the template writes it."""
    from transformers import AutoProcessor

    from llava_edge.export.verify import sample_image

    specials = ["<start_of_turn>", "<start_of_image>", "<end_of_turn>"]
    checkpoint = with_template(tiny_checkpoint, tmp_path / "ckpt", GEMMA3, specials)
    export_checkpoint(checkpoint, tmp_path / "model", verify=False, fused=False, log=quiet)
    processor = AutoProcessor.from_pretrained(checkpoint)
    image = sample_image(120)
    system = "You are a robot."
    messages = [{"role": "system", "content": system}]
    for i, (question, answer) in enumerate(CHAT):
        messages.append({"role": "user", "content": ("<image>\n" if i == 0 else "") + question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    with Pipeline.load(tmp_path / "model") as pipe:
        pixels = pipe.image_pixels(image)
        ids = pipe.conversation_ids(CHAT, pixels, 0, system=system)
        assert ids == processor_ids(processor, messages, [image])
        first = [messages[1]]
        answer = pipe.answer(image, CHAT[0][0], max_new_tokens=1)
        assert answer.prompt_token_ids == processor_ids(processor, first, [image])


def test_a_system_prompt_between_control_tokens_named_system_prompt_is_written_in_them(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Mistral Small 3's template writes a system message between its [SYSTEM_PROMPT] and
    [/SYSTEM_PROMPT] control tokens, after BOS: a system prompt given at run time goes there,
    as transformers writes it, not in place of all of it (BOS too)."""
    from llava_edge.export.verify import sample_image

    specials = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "</s>"]
    checkpoint = with_template(tiny_checkpoint, tmp_path / "ckpt", MISTRAL_SMALL, specials)
    export_checkpoint(checkpoint, tmp_path / "model", verify=False, fused=False, log=quiet)
    image = sample_image(120)
    with Pipeline.load(tmp_path / "model") as pipe:
        system = "You are a robot."
        ids = pipe.conversation_ids(CHAT, pipe.image_pixels(image), 0, system=system)
        assert ids == hf_ids(checkpoint, CHAT, image, system=system)


def test_a_system_prompt_the_template_cannot_take_keeps_the_bos_it_writes(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Mistral Small 3.1's template writes BOS, then its default system message, and fails on a
    system message in a string: a system prompt given at run time takes the default's place
    as plain text, after that BOS, which the runtime adds to no templated prompt."""
    from llava_edge.export.verify import sample_image

    specials = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "</s>"]
    checkpoint = with_template(tiny_checkpoint, tmp_path / "ckpt", MISTRAL_SMALL_31, specials)
    export_checkpoint(checkpoint, tmp_path / "model", verify=False, fused=False, log=quiet)
    image = sample_image(120)
    with Pipeline.load(tmp_path / "model") as pipe:
        bos = pipe.manifest.tokens.bos_token_id
        ids = pipe.answer(image, CHAT[0][0], max_new_tokens=1, system="Be brief.").prompt_token_ids
        assert ids[0] == bos and ids.count(bos) == 1
        assert pipe.codec.decode(ids).startswith("Be brief. ")
        plain = pipe.answer(image, CHAT[0][0], max_new_tokens=1).prompt_token_ids
        assert plain == hf_ids(checkpoint, [(CHAT[0][0], None)], image)
