"""Token ids and labels of one sample: only the assistant's answers are supervised.

The conversation is rendered with the same template strings the runtime prompts with
(llava_edge.runtime.template.render) and tokenized in one piece with the checkpoint's tokenizer,
exactly as the model will see it (with `plain`, LLaVA's stage 1: the image and the caption
only). Each token is labelled by where its characters fall: inside an answer segment (answer
prefix, answer, end marker) it is supervised; anywhere else (system prompt, user turns, BOS, the
image) it is IGNORE. A token that spans the border between a prompt and an answer means the
tokenizer merged across the template: training would not match inference, so the sample is
reported by id (LLaVA's "tokenization mismatch", which the original code silently masks).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import TemplateSpec
from llava_edge.runtime.template import render
from llava_edge.training.data import BadSample, Sample

IGNORE = -100
PLAIN = "plain"  # the stage-1 template: image, caption


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image_span: tuple[int, int] | None  # [start, end) of the image token ids
    full_length: int  # the sample's length before truncation to max_length


def caption_only(sample: Sample) -> list[tuple[str, str]]:
    """The `plain` template's one round, as LLaVA's stage 1 builds it (preprocess_plain): the
    image, then the caption. The human turn's text is dropped (LLaVA-1.5's caption data asks
    "<image>\nRender a clear and concise summary of the photo." and the like): with no role
    strings around it, it would run into the caption."""
    if sample.image is None or len(sample.turns) != 1:
        found = "no image" if sample.image is None else f"{len(sample.turns)} rounds"
        raise BadSample(
            sample.id,
            f"has {found}; the plain template (stage 1) takes an image and its caption (one "
            "human turn with <image>, one gpt turn): train on caption data, or pass --template",
        )
    return [("", sample.turns[0][1])]


class Labeler:
    """Turns Samples into (input_ids, labels) for one tokenizer, template and image size."""

    def __init__(
        self,
        tokenizer: Any,
        template: TemplateSpec,
        image_token_id: int,
        num_image_tokens: int,
        max_length: int,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length

    def encode(self, sample: Sample) -> Encoded:
        turns = caption_only(sample) if self.template.name == PLAIN else sample.turns
        segments = render(self.template, turns, image=sample.image is not None)
        text = "".join(s for s, _ in segments)
        bounds, supervised, end = [], [], 0  # segment i covers chars [bounds[i-1], bounds[i])
        for segment, is_answer in segments:
            end += len(segment)
            bounds.append(end)
            supervised.append(is_answer)
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids: list[int] = []
        labels: list[int] = []
        image_span = None
        for token_id, (start, stop) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if token_id == self.image_token_id:
                if image_span is not None or sample.image is None:
                    raise BadSample(sample.id, "the image token appears more than once")
                image_span = (len(ids), len(ids) + self.num_image_tokens)
                ids += [token_id] * self.num_image_tokens
                labels += [IGNORE] * self.num_image_tokens
                continue
            ids.append(token_id)
            labels.append(
                token_id
                if self._supervised(sample, text, bounds, supervised, start, stop)
                else IGNORE
            )
        if sample.image is not None and image_span is None:
            raise BadSample(sample.id, "the tokenizer does not keep the image placeholder whole")
        return self._truncate(sample, Encoded(ids, labels, image_span, len(ids)))

    def _supervised(
        self,
        sample: Sample,
        text: str,
        bounds: list[int],
        supervised: list[bool],
        start: int,
        stop: int,
    ) -> bool:
        if stop <= start:  # added special tokens (BOS) cover no text
            return False
        first = bisect.bisect_right(bounds, start)
        last = bisect.bisect_right(bounds, stop - 1)
        kinds = {
            supervised[i]
            for i in range(first, last + 1)
            if bounds[i] > (bounds[i - 1] if i else 0)  # empty segments hold no characters
        }
        if len(kinds) > 1:
            raise BadSample(
                sample.id,
                f"tokenization mismatch: the token {text[start:stop]!r} spans the border between "
                "a prompt and an answer, so training would not see what inference sees; change "
                "the text at that border or the tokenizer",
            )
        return kinds.pop()

    def _truncate(self, sample: Sample, encoded: Encoded) -> Encoded:
        """Cut to max_length, never through the image tokens, and keep at least one answer token."""
        limit = self.max_length
        if len(encoded.input_ids) <= limit:
            if all(label == IGNORE for label in encoded.labels):
                raise BadSample(sample.id, "has no answer tokens to learn from")
            return encoded
        if encoded.image_span is not None and encoded.image_span[1] > limit:
            raise BadSample(
                sample.id,
                f"its image tokens end at position {encoded.image_span[1]}, past --max-length "
                f"{limit}; raise --max-length",
            )
        labels = encoded.labels[:limit]
        if all(label == IGNORE for label in labels):
            raise BadSample(
                sample.id, f"no answer token is left after truncation to --max-length {limit}"
            )
        return Encoded(encoded.input_ids[:limit], labels, encoded.image_span, encoded.full_length)


def check_answer_end(template: TemplateSpec, tokenizer: Any, eos_ids: set[int]) -> None:
    """Refuse a chat template whose answers do not end in an end-of-sequence token of this
    tokenizer (vicuna_v1's `</s>` is plain text to Qwen's tokenizer, whose turns end with
    `<|im_end|>`): the model would learn to write the marker as text and, as generation stops
    only at an end-of-sequence token, never stop. The `plain` template (stage 1) ends captions
    with a newline, as LLaVA's does: it is not for chat."""
    from llava_edge.runtime.template import TEMPLATES

    if template.name == PLAIN or _ends_in(template, tokenizer, eos_ids):
        return
    if not eos_ids:
        raise LlavaEdgeError(
            "the checkpoint names no end-of-sequence token (tokenizer or generation_config.json):"
            " a model trained to chat would never stop; set the tokenizer's eos_token"
        )
    names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(eos_ids))
    fitting = [
        name
        for name, spec in TEMPLATES.items()
        if name != PLAIN and _ends_in(spec, tokenizer, eos_ids)
    ]
    hint = (
        f"pass --template {' or '.join(fitting)}, whose answers end in it"
        if fitting
        else "no built-in template ends answers in it, so this language model cannot be trained "
        "to chat here yet"
    )
    raise LlavaEdgeError(
        f"the {template.name} template ends each answer with {template.answer_end.strip()!r}, "
        f"which this tokenizer does not read as its end-of-sequence token ({names}): the "
        f"trained model would never stop; {hint}"
    )


def _ends_in(template: TemplateSpec, tokenizer: Any, eos_ids: set[int]) -> bool:
    """Whitespace after the end token is allowed (phi_3's "<|end|>\n"): generation stops at
    the token, and the runtime feeds what follows it before the next turn."""
    ids = tokenizer(template.answer_end.rstrip(), add_special_tokens=False)["input_ids"]
    return bool(ids) and ids[-1] in eos_ids
