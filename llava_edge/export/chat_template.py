"""A checkpoint's own chat template, as the manifest's plain strings.

A checkpoint carries its prompt format as a Jinja chat template (its processor's, else its
tokenizer's). The runtime holds no Jinja: the manifest keeps strings (system, user, image,
assistant, answer_prefix, answer_end) joined in one fixed order (llava_edge.runtime.template).
They are read off the template by rendering probe conversations whose texts are sentinels, and
then checked by rendering a three-turn conversation with an image both ways; probes whose texts
carry outer whitespace say whether and how the template strips it; a past answer may follow
another header than a new one (llava-hf's OneVision template: TemplateSpec.answered_assistant).
A template the strings cannot express (an image after the question, a header that changes from
turn to turn, a system prompt that moves) is refused with a clear message rather than
approximated.

Which template a model dir gets:
- `llava_edge.json` names one (training writes it): that one, after checking that the
  checkpoint's chat template, if any, renders the same prompts;
- else the checkpoint's chat template, read as above;
- else (no template at all) the Hugging Face LLaVA-1.5 prompt; export says so, and warns when
  the tokenizer has the special tokens of another known format (ChatML's `<|im_start|>`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import (
    CHECKPOINT_INFO_FILE,
    TRIM_MODES,
    TemplateSpec,
    read_checkpoint_template,
)
from llava_edge.runtime.template import (
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    render,
    with_image_markers,
    with_system,
)

DEFAULT = "llava_1_5"  # for checkpoints that carry no chat template
# Special tokens that only a language model trained on another known format has: a checkpoint
# of one that gets the default prompt is probably prompted wrong.
FORMAT_TOKENS = {
    "<|im_start|>": "qwen_1_5 or chatml_direct",
    "<|start_header_id|>": "llama_3",
    "<|assistant|>": "phi_3",
    "[INST]": "mistral_instruct",  # a control token from Mistral's v3 tokenizer on
    "<start_of_turn>": "gemma",
}
# What a chat template calls to write the date it renders a prompt on (transformers gives it).
DATED = "strftime_now"
# Texts no template writes itself, so each one's place in a rendered prompt is unambiguous (not
# "SYSTEM_PROMPT": Mistral's templates write their [SYSTEM_PROMPT] control token).
Q1, Q2, Q3 = "QUESTION_ONE", "QUESTION_TWO", "QUESTION_THREE"
A1, A2 = "ANSWER_ONE", "ANSWER_TWO"
SYSTEM = "SYSTEM_ONE"
PROBE = [(Q1, A1), (Q2, A2), (Q3, None)]

Turns = list[tuple[str, str | None]]
# An image with the first question (True) or none (False), or the turns that have one.
Images = bool | tuple[int, ...]
# Outer whitespace of the trim probes: all of it is what Python's str.strip (Jinja's `trim`) takes.
PAD = " \t\n\u00a0\u3000"


class CheckpointChat:
    """Renders conversations with a checkpoint's own chat template, as transformers does."""

    def __init__(self, processor: Any, jinja: str, string_content: bool):
        self.processor, self.jinja, self.string_content = processor, jinja, string_content
        self.bos = processor.tokenizer.bos_token

    @classmethod
    def of(cls, processor: Any) -> CheckpointChat | None:
        """The checkpoint's chat template, or None if it has none.

        Multimodal templates take message contents as lists of {"type": "image"} and
        {"type": "text"} parts; a language model's template (ChatML, Mistral's [INST]) takes a
        string, where LLaVA's convention puts the image as `<image>\\n` before the question. So
        does one that writes an image part as its own model's mark (Gemma 3's
        <start_of_image>), which transformers' LLaVA processor reads as no image.
        """
        jinja = getattr(processor, "chat_template", None) or getattr(
            processor.tokenizer, "chat_template", None
        )
        if isinstance(jinja, dict):
            jinja = jinja.get("default")
        if not jinja:
            return None
        errors, rendering = [], []
        for string_content in (False, True):
            chat = cls(processor, jinja, string_content)
            try:
                text = chat.text([(Q1, None)], image=True)
            except Exception as e:  # Jinja and the template's own raise_exception
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if text.count(Q1) == 1 and "{'type'" not in text:
                if IMAGE_PLACEHOLDER in text:
                    return chat
                rendering.append(chat)
        if rendering:  # neither form wrote the image: derive_template says so
            return rendering[0]
        raise LlavaEdgeError(
            "the checkpoint's chat template cannot render a question about an image "
            f"({errors[-1] if errors else 'the question does not appear in the prompt'}); "
            f"name a template in {CHECKPOINT_INFO_FILE} or fix the chat template"
        )

    def messages(
        self, turns: Turns, image: Images, system: str | None = None
    ) -> list[dict[str, Any]]:
        """Chat messages for `turns`, after a system message if given; an image goes with the
        first question (image True) or with each turn `image` lists."""
        messages = []
        if system is not None:
            text = system if self.string_content else [{"type": "text", "text": system}]
            messages.append({"role": "system", "content": text})
        for i, (question, answer) in enumerate(turns):
            with_image = i in _image_turns(image)
            if self.string_content:
                content: Any = (IMAGE_PLACEHOLDER + "\n" if with_image else "") + question
            else:
                content = [{"type": "image"}] if with_image else []
                content.append({"type": "text", "text": question})
            messages.append({"role": "user", "content": content})
            if answer is not None:
                text = answer if self.string_content else [{"type": "text", "text": answer}]
                messages.append({"role": "assistant", "content": text})
        return messages

    def text(self, turns: Turns, image: Images, system: str | None = None) -> str:
        """The prompt text; open for an answer when the last turn has none."""
        return self.processor.apply_chat_template(
            self.messages(turns, image, system),
            chat_template=self.jinja,
            add_generation_prompt=turns[-1][1] is None,
            tokenize=False,
        )

    def inputs(self, turns: Turns, image: Any) -> Any:
        """Token ids (and pixel values) as `processor.apply_chat_template(tokenize=True)` makes
        them: no second BOS where the template writes one itself."""
        text = self.text(turns, image is not None)
        add_special = not (self.bos and text.startswith(self.bos))
        return self.processor(
            text=text,
            images=image,
            add_special_tokens=add_special,
            return_tensors="pt",
        )


@dataclasses.dataclass(frozen=True)
class TemplateChoice:
    template: TemplateSpec
    why: str  # one line for export's log: which template, and where it came from


def choose_template(
    checkpoint: Path, processor: Any, eos_texts: list[str], image_markers: bool = False
) -> TemplateChoice:
    """The template a model dir of this checkpoint gets (see the module docstring), and why.

    image_markers: the checkpoint's config sets `mm_use_im_start_end` (LLaVA v1): a named
    template writes its image as `<im_start><image><im_end>`.

    A template that writes the BOS token itself keeps it in `system`: transformers' processor
    then tokenizes the prompt without adding one, and so must the runtime (the manifest's
    `add_bos`), since BOS as text and BOS as an id can tokenize what follows differently.
    """
    named = _named_template(checkpoint)
    info = checkpoint / CHECKPOINT_INFO_FILE
    chat = CheckpointChat.of(processor)
    if chat is None:
        template = _marked(TEMPLATES[named or DEFAULT], image_markers)
        if named:
            return TemplateChoice(template, f"prompt template: {named} (named in {info})")
        return TemplateChoice(template, _default_note(processor.tokenizer, info))
    if named:
        template = _marked(TEMPLATES[named], image_markers)
        expected, got = chat.text(PROBE, image=True), _render(template, PROBE)
        if expected != got:
            raise LlavaEdgeError(
                f"{checkpoint / CHECKPOINT_INFO_FILE} names template '{named}', but the "
                f"checkpoint's chat template renders prompts differently ({_difference(expected, got)}); "
                "make them agree, or delete the file to use the chat template"
            )
        return TemplateChoice(template, f"prompt template: {named} (named in {info})")
    template = derive_template(chat, eos_texts)
    line = f"prompt template: {template.name} (read off the checkpoint's chat template)"
    if DATED in chat.jinja:
        line = (
            f"warning: {line}, which writes the date a prompt is made on ({DATED}, as Llama "
            "3.2's 'Today Date' does): the model dir's prompts keep today's, where transformers "
            "writes the day's; re-export to move it on"
        )
    return TemplateChoice(template, line)


def _default_note(tokenizer: Any, info: Path) -> str:
    """The line that says the default was taken, and how to name another; a warning when the
    tokenizer's special tokens belong to another format."""
    how = (
        f'to name another, write {{"template": NAME}} to {info} '
        f"(known: {', '.join(sorted(TEMPLATES))}) or give the checkpoint a chat template"
    )
    why = f"the checkpoint has no chat template and no {CHECKPOINT_INFO_FILE}"
    vocab = tokenizer.get_vocab()
    for token, names in FORMAT_TOKENS.items():
        if token in vocab:
            return (
                f"warning: prompt template {DEFAULT} by default ({why}), but the tokenizer has "
                f"{token}, so its language model was probably trained on {names}; {how}"
            )
    return f"prompt template: {DEFAULT} (the default: {why}; {how})"


def _marked(template: TemplateSpec, image_markers: bool) -> TemplateSpec:
    return with_image_markers(template) if image_markers else template


def derive_template(chat: CheckpointChat, eos_texts: list[str]) -> TemplateSpec:
    """Read the strings off the checkpoint's template; refuse one they cannot express."""

    def split(text: str, sentinel: str) -> tuple[str, str]:
        head, _, tail = text.partition(sentinel)
        return head, tail

    def refuse(what: str) -> LlavaEdgeError:
        return LlavaEdgeError(
            f"the checkpoint's chat template cannot be written as llava-edge's template strings: "
            f"{what}; name a template in {CHECKPOINT_INFO_FILE} (see llava_edge/runtime/template.py)"
        )

    text_only = chat.text([(Q1, None)], image=False)
    with_image = chat.text([(Q1, None)], image=True)
    two_turns = chat.text([(Q1, A1), (Q2, None)], image=True)
    if not all(two_turns.count(s) == 1 for s in (Q1, A1, Q2)) or text_only.count(Q1) != 1:
        raise refuse("a question or answer does not appear exactly once in the prompt")
    first_head, assistant = split(text_only, Q1)  # system + user, assistant
    image_head, image_tail = split(with_image, Q1)
    prefix = _question_prefix(first_head, image_head)
    if prefix is None or image_tail != assistant:
        raise refuse("the image is not placed just before the question")
    first_head = first_head[: len(first_head) - len(prefix)]
    image = image_head[len(first_head) : len(image_head) - len(prefix)]
    # transformers' processor wants as many images as the prompt has marks
    if IMAGE_PLACEHOLDER in text_only:
        raise refuse(f"a question without an image gets an {IMAGE_PLACEHOLDER!r} mark")
    if with_image.count(IMAGE_PLACEHOLDER) != 1:
        marks = with_image.count(IMAGE_PLACEHOLDER)
        raise refuse(f"an image is written as {marks} {IMAGE_PLACEHOLDER!r} marks, not one")
    answered_assistant = None
    if two_turns.startswith(with_image):
        answer_prefix, rest = split(two_turns[len(with_image) :], A1)
    elif two_turns.startswith(image_head + Q1):
        # a past answer's header is not a new one's (llava-hf's OneVision template writes
        # "assistant \n" before the one, "assistant\n" before the other)
        answered_assistant, rest = split(two_turns[len(image_head + Q1) :], A1)
        answer_prefix = ""
    else:
        raise refuse("the first turn renders differently once the conversation goes on")
    between, tail = split(rest, Q2)  # answer_end + user + question_prefix
    if tail != assistant:
        raise refuse("the second question is followed by something other than the first's header")
    if not between.endswith(prefix):
        raise refuse(f"the second question is not preceded by {prefix!r} as the first is")
    between = between[: len(between) - len(prefix)]
    user = _user_header(between, first_head, eos_texts, _special_texts(chat))
    template = TemplateSpec(
        name="checkpoint",
        system=first_head[: len(first_head) - len(user)],
        user=user,
        assistant=assistant,
        answer_prefix=answer_prefix,
        answer_end=between[: len(between) - len(user)],
        image=image,
        question_prefix=prefix,
        answered_assistant=answered_assistant,
    )
    expected, got = chat.text(PROBE, image=True), _render(template, PROBE)
    if expected != got:
        raise refuse(_difference(expected, got))
    template = _with_trim(chat, _with_system_format(chat, template))
    for known in TEMPLATES.values():  # say so when it is a template llava-edge knows
        if dataclasses.replace(known, name="checkpoint", system_format=None) == dataclasses.replace(
            template, system_format=None
        ):
            return dataclasses.replace(known, system_format=template.system_format)
    return template


def _question_prefix(text_head: str, image_head: str) -> str | None:
    """What the template writes before a question, after its image, given what comes before a
    question without an image and with one: "" where the image text goes just before the
    question (LLaVA's "<image>\n"), else the shortest text both end with once an image mark
    comes before it (llava-hf's Llama 3 LLaVA-NeXT: "<image>" then "\n" + the question); None
    where the image is written anywhere else."""
    if image_head.startswith(text_head):
        return ""
    for size in range(1, len(text_head) + 1):
        prefix, head = text_head[len(text_head) - size :], text_head[: len(text_head) - size]
        image = image_head[len(head) : len(image_head) - size]
        if (
            image_head.endswith(prefix)
            and image_head.startswith(head)
            and IMAGE_PLACEHOLDER in image
        ):
            return prefix
    return None


def _with_system_format(chat: CheckpointChat, template: TemplateSpec) -> TemplateSpec:
    """The template with the way the checkpoint's template writes a system message
    (TemplateSpec.system_format), read off a probe as the other strings are.

    Most templates write it in place of their default system prompt, before the first user
    header. Llama 2's writes it inside the first turn's header (`<s>[INST] <<SYS>>\n{system}
    \n<</SYS>>\n\n`): the whole first head is then `system`, and the first turn has no header
    of its own (`first_user` ""). None where it takes none (Mistral's raises) or writes one
    neither way: a system prompt given at run time then takes `system`'s place as plain text."""
    # Where the template takes none, a BOS it writes itself stays first (as the plain form would
    # drop it with the rest of `system`).
    bos = chat.bos if chat.bos and template.system.startswith(chat.bos) else ""
    fallback = dataclasses.replace(template, system_format=bos + "{system} " if bos else None)
    try:
        text = chat.text(PROBE, image=True, system=SYSTEM)
    except Exception:  # Jinja and the template's own raise_exception
        return fallback
    head = text.partition(template.image + template.question_prefix + Q1)[0]  # system + user
    if head.count(SYSTEM) != 1 or "{system}" in head:
        return fallback
    written = head.replace(SYSTEM, "{system}")
    candidates = [
        dataclasses.replace(
            template,
            system=template.system + template.user,
            first_user="",
            system_format=written,
        )
    ]
    if head.endswith(template.user):
        in_place = written[: len(written) - len(template.user)]
        candidates.insert(0, dataclasses.replace(template, system_format=in_place))
    for candidate in candidates:
        if _render(with_system(candidate, SYSTEM), PROBE) == text:
            return candidate
    return fallback


def _with_trim(chat: CheckpointChat, template: TemplateSpec) -> TemplateSpec:
    """The template with the way the checkpoint's template strips outer whitespace off what a
    message says (TemplateSpec.trim_user, trim_assistant, trim_system), read off probe
    conversations whose texts carry outer whitespace: the first way of stripping that renders
    them as the checkpoint's template does, with images on the first or a later turn, then with
    a system prompt. Stripping nothing where no way does, as where the template strips nothing;
    a run-time system prompt is not stripped where no way renders the probes with one as the
    template does (Mistral v0.3 writes it into the last question, not where the runtime does)."""
    padded = [(PAD + q + PAD, None if a is None else PAD + a + PAD) for q, a in PROBE]
    question = [(padded[0][0], None)]
    conversations: list[tuple[Turns, Images]] = [
        (question, False),
        (question, True),
        (padded, True),
        (padded, (1,)),
        (padded, False),
    ]

    def probes(system: str | None) -> list[tuple[Turns, Images, str | None, str]]:
        rendered = []
        for turns, image in conversations:
            try:
                rendered.append((turns, image, system, chat.text(turns, image, system)))
            except Exception:  # Jinja and the template's own raise_exception
                continue
        return rendered

    def first_fitting(candidates: list[TemplateSpec], rendered: list) -> TemplateSpec | None:
        return next(
            (
                candidate
                for candidate in candidates
                if all(_render_with(candidate, *probe[:3]) == probe[3] for probe in rendered)
            ),
            None,
        )

    chosen = first_fitting(
        [
            dataclasses.replace(template, trim_user=user, trim_assistant=assistant)
            for user in TRIM_MODES
            for assistant in (False, True)
        ],
        probes(None),
    )
    if chosen is None:
        return template
    if template.system_format is None:
        return chosen
    with_system = first_fitting(
        [dataclasses.replace(chosen, trim_system=trim) for trim in (False, True)],
        probes(PAD + SYSTEM + PAD),
    )
    return chosen if with_system is None else with_system


def _render_with(template: TemplateSpec, turns: Turns, image: Images, system: str | None) -> str:
    """A conversation as the runtime renders it (Pipeline.conversation_ids)."""
    if system is not None:
        template = with_system(template, system)
    return _render(template, turns, image)


def _image_turns(image: Images) -> tuple[int, ...]:
    if isinstance(image, bool):
        return (0,) if image else ()
    return image


def _user_header(
    between: str, first_head: str, eos_texts: list[str], specials: tuple[str, ...] = ()
) -> str:
    """Split what comes between an answer and the next question into answer_end + user.

    The user header must end both that and the first turn's head (system + user). Where an
    end-of-sequence token closes the answer, answer_end ends with it: the model writes it and
    training supervises it, and what follows belongs to the next user turn. Otherwise the user
    header is the longest text the two share that cuts neither through one of the tokenizer's
    special tokens (`specials`): "<s><|start_header_id|>" and "<|eot_id|><|start_header_id|>"
    share a ">" that belongs to BOS in one of them.
    """
    for eos in eos_texts:
        at = between.rfind(eos) if eos else -1
        if at >= 0 and first_head.endswith(between[at + len(eos) :]):
            return between[at + len(eos) :]
    shared = 0
    while shared < min(len(between), len(first_head)) and (
        between[len(between) - shared - 1] == first_head[len(first_head) - shared - 1]
    ):
        shared += 1
    while shared and any(
        _cuts(text, len(text) - shared, specials) for text in (between, first_head)
    ):
        shared -= 1
    return between[len(between) - shared :]


def _cuts(text: str, at: int, tokens: tuple[str, ...]) -> bool:
    """Does position `at` of `text` fall inside an occurrence of one of `tokens`?"""
    for token in tokens:
        start = text.find(token, max(0, at - len(token) + 1))
        if 0 <= start < at < start + len(token):
            return True
    return False


def _special_texts(chat: CheckpointChat) -> tuple[str, ...]:
    """The texts the tokenizer reads as one token whole (BOS, EOS, added tokens)."""
    tokenizer = chat.processor.tokenizer
    added = getattr(tokenizer, "get_added_vocab", dict)()
    return tuple(t for t in {*added, *tokenizer.all_special_tokens} if len(t) > 1)


def _named_template(checkpoint: Path) -> str | None:
    name = read_checkpoint_template(checkpoint)
    if name is not None and name not in TEMPLATES:
        raise LlavaEdgeError(
            f"{checkpoint / CHECKPOINT_INFO_FILE} names template {name!r}, which this llava-edge "
            f"does not know (known: {', '.join(sorted(TEMPLATES))})"
        )
    return name


def _render(template: TemplateSpec, turns: Turns, image: Images = True) -> str:
    return "".join(text for text, _ in render(template, turns, image))


def _difference(expected: str, got: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
    at = min(len(expected), len(got)) if at is None else at
    return f"from character {at}: the chat template gives {expected[at : at + 30]!r}, the strings give {got[at : at + 30]!r}"
