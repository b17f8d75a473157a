"""Chat templates as plain strings, shared by training (which masks labels with them) and the
runtime (which builds prompts with them), so both always agree.

A conversation renders as

    system + user + [image] + question + assistant + answer_prefix + answer + answer_end + user + ...

which gives LLaVA's `vicuna_v1` (`SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: ...`), the Hugging
Face llava-1.5 prompt (`USER: <image>\\nQ ASSISTANT:`) and the stage-1 `plain` template (`<image>`
then the caption). Only `answer_prefix + answer + answer_end` is ever supervised in training.
"""

from __future__ import annotations

import json
from dataclasses import replace

from llava_edge.manifest import TemplateSpec

IMAGE_PLACEHOLDER = "<image>"
SHORT_ANSWER = "Answer the question using a single word or phrase."

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
# LLaVA v1's image markers around the image features (`mm_use_im_start_end` in a config).
IMAGE_START, IMAGE_END = "<im_start>", "<im_end>"

TEMPLATES: dict[str, TemplateSpec] = {
    # The Hugging Face port of LLaVA-1.5 (llava-hf/llava-1.5-*-hf): no system prompt.
    "llava_1_5": TemplateSpec(name="llava_1_5"),
    # LLaVA-1.5's stage-2 template (haotian-liu/LLaVA, conversation.py conv_vicuna_v1).
    "vicuna_v1": TemplateSpec(name="vicuna_v1", system=VICUNA_SYSTEM),
    # LLaVA's stage-1 template (conv_llava_plain): the image, then the caption.
    "plain": TemplateSpec(
        name="plain",
        user="",
        assistant="",
        answer_prefix="",
        answer_end="\n",
        image=IMAGE_PLACEHOLDER,
    ),
    # The templates of the original LLaVA's conversation.py that its v1.5 and v1.6 checkpoints
    # were trained with: conv_llava_v1 (v1.6 Vicuna), conv_mistral_instruct (v1.6 Mistral,
    # `[INST] ... [/INST]`) and conv_chatml_direct (v1.6 Yi-34B).
    "llava_v1": TemplateSpec(name="llava_v1", system=LLAVA_V1_SYSTEM),
    "mistral_instruct": TemplateSpec(
        name="mistral_instruct",
        user="[INST] ",
        assistant=" [/INST]",
        answer_prefix=" ",
        answer_end=" </s>",
    ),
    "chatml_direct": TemplateSpec(
        name="chatml_direct",
        system="<|im_start|>system\nAnswer the questions.<|im_end|>",
        system_format="<|im_start|>system\n{system}<|im_end|>",
        user="<|im_start|>user\n",
        assistant="<|im_end|><|im_start|>assistant\n",
        answer_prefix="",
        answer_end="<|im_end|>",
    ),
    # The original LLaVA's conv_llava_llama_2 (its LLaVA-Llama-2-chat checkpoints): Llama 2's
    # chat format, the system prompt wrapped in <<SYS>> inside the first [INST]; each answer
    # ends " </s>" and each later turn starts with "<s>" (BOS), as the original joins them.
    "llava_llama_2": TemplateSpec(
        name="llava_llama_2",
        system=f"[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n",
        system_format="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n",
        user="<s>[INST] ",
        first_user="",
        assistant=" [/INST]",
        answer_prefix=" ",
        answer_end=" </s>",
    ),
    # Meta's Llama 3 Instruct format (llama.meta.com, prompt formats), for fine-tuning a Llama 3
    # language model: its turns end with <|eot_id|>, which its generation config stops at.
    # No default system prompt; the tokenizer adds <|begin_of_text|> (BOS).
    "llama_3": TemplateSpec(
        name="llama_3",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        answer_prefix="",
        answer_end="<|eot_id|>",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    ),
    # LLaVA-NeXT's conv_llava_llama_3 (its Llama 3 checkpoints, lmms-lab/llama3-llava-next-8b):
    # Llama 3's format with the fork's default system prompt, as its training
    # (train.py preprocess_llama3: Meta's chat template, one message at a time) writes it. Its
    # inference code and llava-hf's example prompt write the user header's
    # <|start_header_id|> twice; the weights were trained with it once.
    "llava_llama_3": TemplateSpec(
        name="llava_llama_3",
        system=f"<|start_header_id|>system<|end_header_id|>\n\n{LLAVA_LLAMA_2_SYSTEM}<|eot_id|>",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        answer_prefix="",
        answer_end="<|eot_id|>",
    ),
    # LLaVA-NeXT's conv_qwen, for Qwen language models (LLaVA-OneVision and LLaVA-Interleave
    # were trained with it): ChatML with a newline after each turn's end and Qwen's default
    # system prompt, as Qwen's own chat template writes them. No BOS.
    "qwen_1_5": TemplateSpec(
        name="qwen_1_5",
        system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>",
        system_format="<|im_start|>system\n{system}<|im_end|>",
        user="\n<|im_start|>user\n",
        assistant="<|im_end|>\n<|im_start|>assistant\n",
        answer_prefix="",
        answer_end="<|im_end|>",
    ),
    # Microsoft's Phi-3 Instruct format (its model card), for fine-tuning a Phi-3 language
    # model: each message ends with <|end|> and a newline; generation stops at <|end|>. No
    # default system prompt; the tokenizer adds <s> (BOS).
    "phi_3": TemplateSpec(
        name="phi_3",
        system_format="<|system|>\n{system}<|end|>\n",
        user="<|user|>\n",
        assistant="<|end|>\n<|assistant|>\n",
        answer_prefix="",
        answer_end="<|end|>\n",
    ),
    # Google's Gemma instruction format (its chat template), for fine-tuning a Gemma language
    # model: each turn ends with <end_of_turn> and a newline; generation stops at <end_of_turn>.
    # Gemma's own template refuses a system role: a system prompt given at run time is plain
    # text after BOS, which the tokenizer adds.
    "gemma": TemplateSpec(
        name="gemma",
        user="<start_of_turn>user\n",
        assistant="<end_of_turn>\n<start_of_turn>model\n",
        answer_prefix="",
        answer_end="<end_of_turn>\n",
    ),
}


def get_template(name: str) -> TemplateSpec:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown chat template {name!r}; choose from {sorted(TEMPLATES)}"
        ) from None


def with_system(template: TemplateSpec, system: str) -> TemplateSpec:
    """The template with `system` as its system prompt, written as the template writes one (a
    plain one ends in a space, as LLaVA's conversation templates and the llava-hf one join it;
    stripped of outer whitespace where the template strips it)."""
    if template.system_format is not None:
        if template.trim_system:
            system = system.strip()
        return replace(template, system=template.system_format.replace("{system}", system))
    if system and not system[-1].isspace():
        system += " "
    return replace(template, system=system)


def with_image_markers(template: TemplateSpec) -> TemplateSpec:
    """The template with LLaVA v1's `<im_start>`/`<im_end>` around the image."""
    image = template.image.replace(IMAGE_PLACEHOLDER, IMAGE_START + IMAGE_PLACEHOLDER + IMAGE_END)
    return TemplateSpec(**{**template.__dict__, "image": image})


def hf_chat_template(template: TemplateSpec) -> str:
    """The template as Jinja for transformers' apply_chat_template (same strings as ours)."""

    def lit(s: str) -> str:
        return json.dumps(s)

    if template.system_format is not None:
        before, _, after = template.system_format.partition("{system}")
        given_system = "{{ " + lit(before) + " + s + " + lit(after) + " }}"
    else:  # as with_system writes a plain one
        given_system = "{{ s }}{% if s and not s[-1].isspace() %}{{ ' ' }}{% endif %}"
    user_header, user_text = "", "{{ " + lit(template.user) + " }}"
    if template.first_user is not None:  # the first user turn's header is its own
        user_header = "{% set turn = namespace(first=true) %}"
        user_text = (
            "{% if turn.first %}{{ " + lit(template.first_user) + " }}"
            "{% set turn.first = false %}{% else %}" + user_text + "{% endif %}"
        )
    return (
        "{% set first = messages[0] if messages else none %}"
        "{% if first and first['role'] == 'system' %}"
        "{% set s = first['content'] if first['content'] is string else "
        "(first['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
        + given_system
        + "{% else %}{{ "
        + lit(template.system)
        + " }}{% endif %}"
        + user_header
        + "{% for m in messages %}"
        "{% set texts = m['content'] if m['content'] is string else "
        "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
        "{% if m['role'] == 'user' %}" + user_text + "{% if m['content'] is not string %}"
        "{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ " + lit(template.image) + " }}{% endfor %}{% endif %}"
        "{{ " + lit(template.question_prefix) + " }}"
        "{{ texts }}{% if not loop.last or add_generation_prompt %}{{ "
        + lit(template.assistant)
        + " }}"
        "{% endif %}"
        "{% elif m['role'] == 'assistant' %}"
        "{{ " + lit(template.answer_prefix) + " }}{{ texts }}{{ " + lit(template.answer_end) + " }}"
        "{% endif %}{% endfor %}"
    )


def user_turn(
    template: TemplateSpec, question: str, image: bool | int, first: bool, answered: bool = False
) -> str:
    """The text of one user turn up to where the assistant starts answering.

    image: whether the turn has an image, or how many. A question that already holds image
    placeholders keeps them where the user put them; else the template's image text goes first,
    once per image (as transformers' LLaVA chat templates render several images). The question
    is stripped of outer whitespace as the template strips it (TemplateSpec.trim_user).
    answered: the conversation holds this turn's answer (a past turn), which some templates
    introduce otherwise than a new one (TemplateSpec.answered_assistant).
    """
    if template.trim_user == "text":
        question = question.strip()
    question = template.question_prefix + question
    if image and IMAGE_PLACEHOLDER not in question:
        question = template.image * int(image) + question
    if template.trim_user == "content":
        question = question.strip() if _opens_content(template, first) else question.rstrip()
    head = template.user
    if first:
        head = template.system + (
            template.user if template.first_user is None else template.first_user
        )
    assistant = template.assistant
    if answered and template.answered_assistant is not None:
        assistant = template.answered_assistant
    return head + question + assistant


def _opens_content(template: TemplateSpec, first: bool) -> bool:
    """Whether a question (with its image text) starts its message's content, so a template
    that strips the content strips its leading whitespace. It does on every turn but the first
    of a template that writes its system prompt inside that turn's content (Llama 2's
    `[INST] <<SYS>>\n{system}\n<</SYS>>\n\n`), where it follows the system prompt when there
    is one: `system` is then more than the user header."""
    if not first or template.first_user != "":
        return True
    return template.system.endswith(template.user)


def answer_text(template: TemplateSpec, answer: str) -> str:
    """What the assistant says in one turn, with the end marker that closes it (the answer
    stripped of outer whitespace where the template strips it)."""
    if template.trim_assistant:
        answer = answer.strip()
    return template.answer_prefix + answer + template.answer_end


def render(
    template: TemplateSpec, turns: list[tuple[str, str | None]], image: bool | tuple[int, ...]
) -> list[tuple[str, bool]]:
    """Render (question, answer) turns as (text, supervised) segments.

    image: whether the first question has an image, or the turns that have one each. A final
    answer of None leaves the prompt open for the model to answer (what inference wants).
    """
    at = ((0,) if image else ()) if isinstance(image, bool) else image
    segments: list[tuple[str, bool]] = []
    for i, (question, answer) in enumerate(turns):
        turn = user_turn(template, question, i in at, first=i == 0, answered=answer is not None)
        segments.append((turn, False))
        if answer is not None:
            segments.append((answer_text(template, answer), True))
    return segments
