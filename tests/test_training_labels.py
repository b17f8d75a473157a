"""Labels: exactly the assistant's answers (and their end marker) are supervised."""

from __future__ import annotations

import pytest
from PIL import Image

from llava_edge.manifest import TemplateSpec
from llava_edge.runtime.template import TEMPLATES, get_template, render
from llava_edge.training.data import BadSample, Sample
from llava_edge.training.dataset import count_image_tokens
from llava_edge.training.labels import IGNORE, Labeler

TURNS = [
    ("What color are the shapes?\nAnswer the question using a single word or phrase.", "red"),
    ("How many shapes are there?", "two circles"),
    ("Where are the shapes?", "on the left"),
]


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_checkpoint)


def labeler(processor, template: str | TemplateSpec, max_length: int = 2048) -> Labeler:
    tokenizer = processor.tokenizer
    return Labeler(
        tokenizer,
        get_template(template) if isinstance(template, str) else template,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_image_tokens=count_image_tokens(processor),
        max_length=max_length,
    )


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of supervised positions."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


# plain (stage 1) takes one image and its caption, and drops the human turn's text.
CAPTION = [("", "two red circles on the left.")]


@pytest.mark.parametrize(
    "template, image, turns",
    [("plain", True, CAPTION), ("vicuna_v1", True, TURNS), ("vicuna_v1", False, TURNS)],
)
def test_labels_cover_exactly_the_answers(processor, template, image, turns):
    spec = get_template(template)
    sample = Sample("multi", "x.png" if image else None, turns)
    encoded = labeler(processor, template).encode(sample)
    text = "".join(s for s, _ in render(spec, turns, image=image))

    # The ids are what transformers' processor makes of the rendered conversation (image
    # placeholder expanded), i.e. what the model sees at inference.
    if image:
        expected = processor(text=text, images=Image.new("RGB", (64, 64)))["input_ids"][0]
    else:
        expected = processor.tokenizer(text)["input_ids"]
    assert encoded.input_ids == list(expected)

    # One supervised run per answer; each decodes to the answer and its end marker.
    runs = spans(encoded.labels)
    assert len(runs) == len(turns)
    tokenizer = processor.tokenizer
    for (start, end), (_, answer) in zip(runs, turns, strict=True):
        assert encoded.labels[start:end] == encoded.input_ids[start:end]
        decoded = tokenizer.decode(encoded.input_ids[start:end])
        assert decoded.strip() == (spec.answer_prefix + answer + spec.answer_end).strip()
        # The token before an answer belongs to the prompt.
        assert not tokenizer.decode(encoded.input_ids[start - 1 : start]).strip().endswith(answer)
    if template == "vicuna_v1":
        eos = tokenizer.eos_token_id
        assert [encoded.input_ids[end - 1] for _, end in runs] == [eos] * len(TURNS)

    # BOS, system prompt, user turns and every image token are ignored.
    assert encoded.labels[0] == IGNORE and encoded.input_ids[0] == tokenizer.bos_token_id
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    image_positions = [i for i, t in enumerate(encoded.input_ids) if t == image_id]
    assert len(image_positions) == (count_image_tokens(processor) if image else 0)
    assert all(encoded.labels[i] == IGNORE for i in image_positions)
    if image:
        assert encoded.image_span == (image_positions[0], image_positions[-1] + 1)
    supervised = sum(end - start for start, end in runs)
    prompt_only = sum(1 for label in encoded.labels if label == IGNORE)
    assert supervised + prompt_only == len(encoded.input_ids)


def test_a_token_across_prompt_and_answer_is_a_named_mismatch(processor):
    # This tokenizer has one token for "shapes?\nAnswer": with a template of no role strings the
    # question ends at "shapes?" and the answer starts with "\nAnswer", so that token crosses the
    # border.
    assert "▁shapes?\nAnswer" in processor.tokenizer.get_vocab()
    bare = TemplateSpec("bare", user="", assistant="", answer_prefix="", answer_end="\n")
    sample = Sample("crossing", None, [("Where are the shapes?", "\nAnswer the question")])
    with pytest.raises(BadSample, match="sample crossing: tokenization mismatch"):
        labeler(processor, bare).encode(sample)


def test_plain_is_the_image_then_the_caption_as_in_llava_stage_1(processor):
    # LLaVA-1.5's caption data holds an instruction in the human turn; stage 1 drops it.
    question = "Render a clear and concise summary of the photo."
    sample = Sample("558k", "x.png", [(question, "two red circles on the left.")])
    encoded = labeler(processor, "plain").encode(sample)
    assert encoded == labeler(processor, "plain").encode(Sample("558k", "x.png", CAPTION))
    tokenizer = processor.tokenizer
    start, end = encoded.image_span
    assert encoded.input_ids[:start] == [tokenizer.bos_token_id]
    assert tokenizer.decode(encoded.input_ids[end:]) == "two red circles on the left.\n"
    assert encoded.labels[end:] == encoded.input_ids[end:]

    for bad, found in [
        (Sample("qa", "x.png", TURNS), "has 3 rounds"),
        (Sample("text", None, CAPTION), "has no image"),
    ]:
        with pytest.raises(BadSample, match=f"sample {bad.id}: {found}; the plain template"):
            labeler(processor, "plain").encode(bad)


def test_truncation_keeps_the_image_whole(processor):
    n_image = count_image_tokens(processor)
    full = labeler(processor, "vicuna_v1").encode(Sample("long", "x.png", TURNS))
    cut_at = full.image_span[1] + 20
    cut = labeler(processor, "vicuna_v1", max_length=cut_at).encode(Sample("long", "x.png", TURNS))
    assert cut.input_ids == full.input_ids[:cut_at] and cut.labels == full.labels[:cut_at]
    assert any(label != IGNORE for label in cut.labels)

    with pytest.raises(BadSample, match="sample long: its image tokens end at position"):
        labeler(processor, "vicuna_v1", max_length=full.image_span[0] + n_image // 2).encode(
            Sample("long", "x.png", TURNS)
        )
    with pytest.raises(BadSample, match="sample long: no answer token is left"):
        labeler(processor, "vicuna_v1", max_length=full.image_span[1] + 2).encode(
            Sample("long", "x.png", TURNS)
        )


def test_a_tokenizer_no_template_ends_answers_for_is_refused_in_one_line():
    """A tokenizer whose end token no built-in template writes (Qwen's tokens, `<|endoftext|>`
    as its EOS): every chat template is refused, plain (stage 1) is not."""
    from hf_checkpoints import qwen_tokenizer

    from llava_edge.errors import LlavaEdgeError
    from llava_edge.runtime.template import get_template
    from llava_edge.training.labels import check_answer_end

    tokenizer = qwen_tokenizer()
    eos = {tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    check_answer_end(get_template("plain"), tokenizer, eos)
    with pytest.raises(LlavaEdgeError, match="no built-in template ends answers in it"):
        check_answer_end(get_template("chatml_direct"), tokenizer, eos)
    check_answer_end(
        get_template("chatml_direct"), tokenizer, {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    )
    with pytest.raises(LlavaEdgeError, match="names no end-of-sequence token"):
        check_answer_end(get_template("chatml_direct"), tokenizer, set())


def test_a_llama_3_tokenizer_is_pointed_to_the_llama_3_template():
    """A Llama 3 language model (turns end with <|eot_id|>) trains to chat with llama_3."""
    from hf_checkpoints import qwen_tokenizer

    from llava_edge.errors import LlavaEdgeError
    from llava_edge.runtime.template import get_template
    from llava_edge.training.labels import check_answer_end

    tokenizer = qwen_tokenizer()
    headers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": headers})
    eos = {tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    with pytest.raises(LlavaEdgeError, match="pass --template llama_3 or llava_llama_3,"):
        check_answer_end(get_template("vicuna_v1"), tokenizer, eos)
    check_answer_end(get_template("llama_3"), tokenizer, eos)


def test_phi_3s_newline_after_its_end_token_still_ends_in_it():
    """phi_3 closes an answer with "<|end|>" and a newline: generation stops at <|end|>, so the
    template fits a Phi-3 tokenizer; the newline alone would not."""
    from hf_checkpoints import qwen_tokenizer

    from llava_edge.errors import LlavaEdgeError
    from llava_edge.runtime.template import get_template
    from llava_edge.training.labels import check_answer_end

    tokenizer = qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|end|>"]})
    check_answer_end(get_template("phi_3"), tokenizer, {tokenizer.convert_tokens_to_ids("<|end|>")})
    newline = {tokenizer("\n", add_special_tokens=False)["input_ids"][-1]}
    with pytest.raises(LlavaEdgeError, match="no built-in template ends answers in it"):
        check_answer_end(get_template("phi_3"), tokenizer, newline)


def test_gemma_renders_as_gemmas_own_chat_template(tiny_checkpoint):
    """The built-in gemma template writes a conversation as Gemma's own chat template does (after
    the BOS that template writes and the tokenizer adds here), and its answers end in
    <end_of_turn>, which a Gemma tokenizer stops at."""
    from chat_templates import GEMMA
    from transformers import AutoTokenizer

    from llava_edge.runtime.template import get_template, render
    from llava_edge.training.labels import check_answer_end

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    )
    turns = [("What is it?", "A red circle."), ("Where is it?", "Top left."), ("And?", None)]
    messages = [{"role": "user", "content": "<image>\n" + turns[0][0]}]
    for (_, answer), (question, _) in zip(turns, turns[1:], strict=False):
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": question},
        ]
    expected = tokenizer.apply_chat_template(
        messages, chat_template=GEMMA, tokenize=False, add_generation_prompt=True
    )
    template = get_template("gemma")
    text = "".join(t for t, _ in render(template, turns, image=True))
    assert tokenizer.bos_token + text == expected
    check_answer_end(template, tokenizer, {tokenizer.convert_tokens_to_ids("<end_of_turn>")})


MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MARKERS += ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def marked_processor(tiny_checkpoint):
    """The tiny processor with every template's role markers as special tokens, as the
    language models those templates are for have them."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    return processor


@pytest.mark.parametrize("template", sorted(set(TEMPLATES) - {"plain"}))
@pytest.mark.parametrize("image", [True, False])
def test_every_template_supervises_exactly_its_answers_and_end_tokens(
    marked_processor, template, image
):
    spec = get_template(template)
    tokenizer = marked_processor.tokenizer
    encoded = labeler(marked_processor, template).encode(
        Sample("multi", "x.png" if image else None, TURNS[:2])
    )
    text = "".join(s for s, _ in render(spec, TURNS[:2], image=image))
    expected = tokenizer(text)["input_ids"]
    n_image = count_image_tokens(marked_processor)
    if image:  # the processor's expansion of <image>
        at = expected.index(tokenizer.convert_tokens_to_ids("<image>"))
        expected[at : at + 1] = expected[at : at + 1] * n_image
    assert encoded.input_ids == expected

    end_id = tokenizer(spec.answer_end.rstrip(), add_special_tokens=False)["input_ids"][-1]
    runs = spans(encoded.labels)
    assert len(runs) == 2
    for (start, end), (_, answer) in zip(runs, TURNS[:2], strict=True):
        assert encoded.labels[start:end] == encoded.input_ids[start:end]
        # the answer and its end marker, and nothing of the prompt
        assert tokenizer.decode(encoded.input_ids[start:end]).strip() == (
            (spec.answer_prefix + answer + spec.answer_end).strip()
        )
        assert end_id in encoded.input_ids[start:end]
