"""The runtime's answers equal transformers' on the same weights (fp32, greedy), for single
questions, batches, multi-turn chat and a cached image; sampling and streaming behave."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Limits, Pipeline
from llava_edge.runtime.pipeline import BATCH_ROWS
from llava_edge.runtime.template import user_turn
from llava_edge.training.synth import Scene, draw

NEW = 24


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32
    ).eval()
    return model, AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    with Pipeline.load(tiny_model_dir, threads=1) as p:
        yield p


def picture(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    import random

    scene = Scene(
        color=["red", "blue", "green"][seed % 3],
        shape="circle",
        count=1 + seed % 3,
        position="left",
    )
    return draw(scene, random.Random(seed)).resize(size)


def hf_generate(reference, images, prompts, new=NEW, input_ids=None):
    model, processor = reference
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    if input_ids is not None:
        inputs["input_ids"] = torch.tensor([input_ids])
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False)
    return inputs, out[:, inputs["input_ids"].shape[1] :].tolist()


def until_eos(tokens, eos):
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def test_single_answer_equals_transformers(pipe, reference):
    image = picture(1)
    prompt = user_turn(pipe.manifest.template, "What is in the picture?", image=True, first=True)
    inputs, (ref,) = hf_generate(reference, image, prompt)
    answer = pipe.answer(image, "What is in the picture?", max_new_tokens=NEW)
    assert answer.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert answer.token_ids == until_eos(ref, pipe.manifest.tokens.eos_token_ids)


def test_text_only_prompt_equals_transformers(pipe, reference):
    model, processor = reference
    prompt = user_turn(pipe.manifest.template, "Say something.", image=False, first=True)
    ids = processor.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**ids, max_new_tokens=NEW, do_sample=False)[
            0, ids["input_ids"].shape[1] :
        ]
    assert pipe.answer(None, "Say something.", max_new_tokens=NEW).token_ids == until_eos(
        ref.tolist(), pipe.manifest.tokens.eos_token_ids
    )


def prefill_logits(pipe, images, prompt: str):
    """The last position's logits of our prefill of `prompt` about `images`."""
    import numpy as np

    from llava_edge.runtime.generate import embed

    pixels = [pipe.image_pixels(image) for image in images]
    ids = np.asarray([pipe.prompt_ids(prompt, pixels)])
    features = [pipe.pixel_features(pixels)]
    embeds = embed(pipe.table, ids, pipe.manifest.tokens.image_token_id, features)
    mask = np.ones_like(ids)
    logits = pipe.backend.decode(embeds, mask, np.cumsum(mask, 1) - 1, pipe.backend.new_cache(1))
    return logits[0]


def test_several_images_in_one_prompt_equal_transformers(pipe, reference):
    """Each placeholder gets its own image's features, in order, as LlavaForConditionalGeneration
    fills them; the chat template puts one image text per image, as the checkpoint's does."""
    model, processor = reference
    images = [picture(5), picture(6, size=(64, 120)), picture(7, size=(50, 50))]
    question = "What changed between the pictures?"
    chat = [
        {"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text", "text": question}]}
    ]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert prompt == user_turn(pipe.manifest.template, question, image=3, first=True)
    inputs, (ref,) = hf_generate(reference, images, prompt)
    answer = pipe.answer(images, question, max_new_tokens=NEW)
    assert answer.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert answer.token_ids == until_eos(ref, pipe.manifest.tokens.eos_token_ids)
    with torch.no_grad():
        theirs = model(**inputs).logits[0, -1].numpy()
    ours = prefill_logits(pipe, images, question)
    swapped = prefill_logits(pipe, images[::-1], question)
    gap = abs(ours - theirs).max()
    assert gap < 1e-4 and abs(swapped - theirs).max() > 10 * gap  # the order of features counts
    # Placeholders where the user puts them; every entry point takes the list.
    raw = "USER: First <image> then <image>\nand last <image>\nWhat changed? ASSISTANT:"
    inputs, (ref,) = hf_generate(reference, images, raw)
    eos = pipe.manifest.tokens.eos_token_ids
    assert pipe.answer(images, raw, raw=True, max_new_tokens=NEW).token_ids == until_eos(ref, eos)
    (batched, _) = pipe.generate_batch([(images, question), (None, "Hi")], max_new_tokens=NEW)
    assert batched.token_ids == answer.token_ids
    chat = pipe.chat(images)
    assert chat.ask(question, max_new_tokens=NEW) == answer.text


def test_images_and_placeholders_must_agree(pipe):
    images = [picture(5), picture(6)]
    with pytest.raises(LlavaEdgeError, match="2 image.*1 <image> placeholder"):
        pipe.answer(images, "<image> What changed?")
    with pytest.raises(LlavaEdgeError, match="2 <image> placeholder.*1 image"):
        pipe.answer(images[:1], "<image> and <image>?")
    with pytest.raises(LlavaEdgeError, match="2 image.*no <image> placeholder"):
        pipe.answer(images, "USER: What? ASSISTANT:", raw=True)
    limits = Limits(max_image_pixels=100)  # each image is held to the limit
    with (
        Pipeline.load(pipe.model_dir, limits=limits) as limited,
        pytest.raises(LlavaEdgeError, match="pixels"),
    ):
        limited.answer([picture(8, size=(4, 4)), images[0]], "What?")


def test_batch_equals_transformers_batch(pipe, reference):
    images = [picture(2), picture(3, size=(64, 120))]
    questions = ["What colour?", "How many shapes are there in this picture, and where are they?"]
    prompts = [user_turn(pipe.manifest.template, q, image=True, first=True) for q in questions]
    _, ref = hf_generate(reference, images, prompts)
    answers = pipe.generate_batch(list(zip(images, questions, strict=True)), max_new_tokens=NEW)
    eos = pipe.manifest.tokens.eos_token_ids
    assert [a.token_ids for a in answers] == [until_eos(r, eos) for r in ref]
    # A row of the batch answers as it would alone.
    assert (
        answers[1].token_ids == pipe.answer(images[1], questions[1], max_new_tokens=NEW).token_ids
    )


def test_a_large_batch_holds_a_bounded_number_of_rows(pipe, monkeypatch):
    """Every row of a batch's KV cache is as long as its longest conversation: a batch of a
    minute of camera frames given one row each held a minute's KV cache at once. The rows past
    the bound wait for a free one, and every answer is still its answer alone."""
    rows, new_cache = [], pipe.backend.new_cache
    monkeypatch.setattr(pipe.backend, "new_cache", lambda n: rows.append(n) or new_cache(n))
    requests = [(None, f"Question number {i}?") for i in range(BATCH_ROWS + 2)]
    answers = pipe.generate_batch(requests, max_new_tokens=3, ignore_eos=True)
    assert rows == [BATCH_ROWS]
    alone = [pipe.answer(None, q, max_new_tokens=3, ignore_eos=True) for _, q in requests]
    assert [a.token_ids for a in answers] == [a.token_ids for a in alone]


def test_multi_turn_chat_reuses_cache_and_equals_transformers(pipe, reference):
    image = picture(4)
    chat = pipe.chat(image, max_new_tokens=8)
    chat.ask("What is this?")
    runs_before = pipe.stats["vision_runs"]
    history = list(chat.ids)
    fed_before = chat.fed
    second = "And what colour is it?"
    streamed = "".join(chat.stream(second))
    assert pipe.stats["vision_runs"] == runs_before  # the image was not encoded again
    assert fed_before == len(history) - 1  # the cache held the whole first turn
    template = pipe.manifest.template
    continuation = user_turn(template, second, image=False, first=False)
    if history[-1] not in pipe.manifest.tokens.eos_token_ids:
        continuation = template.answer_end + continuation
    new_ids = pipe.codec.encode(continuation, first=False)
    prompt = user_turn(template, "What is this?", image=True, first=True)
    _, (ref,) = hf_generate(reference, image, prompt, new=8, input_ids=history + new_ids)
    turn_ids = chat.ids[len(history) + len(new_ids) :]
    assert turn_ids == until_eos(ref, pipe.manifest.tokens.eos_token_ids)
    assert streamed == pipe.codec.decode([t for t in turn_ids])


def test_cached_image_second_question_equals_transformers(pipe, reference):
    image = picture(5)
    pipe.generate(image, "First question?", max_new_tokens=2)
    runs, hits = pipe.stats["vision_runs"], pipe.stats["feature_cache_hits"]
    second = "A different question about the same picture?"
    answer = pipe.answer(image.copy(), second, max_new_tokens=NEW)
    assert pipe.stats["vision_runs"] == runs and pipe.stats["feature_cache_hits"] == hits + 1
    prompt = user_turn(pipe.manifest.template, second, image=True, first=True)
    _, (ref,) = hf_generate(reference, image, prompt)
    assert answer.token_ids == until_eos(ref, pipe.manifest.tokens.eos_token_ids)


def test_features_handed_out_cannot_change_the_cache(pipe):
    """image_features returns the cached array: scaling it in place (normalising it for a
    similarity search) changed every later answer about the same image."""
    image = picture(7)
    before = pipe.answer(image, "What is it?", max_new_tokens=6).token_ids
    features = pipe.image_features(image)
    with pytest.raises(ValueError, match="read-only"):
        features *= 0
    assert pipe.answer(image, "What is it?", max_new_tokens=6).token_ids == before


def test_sampling_is_reproducible_with_a_seed(pipe):
    image = picture(6)
    options = dict(
        max_new_tokens=16,
        temperature=0.9,
        top_k=50,
        top_p=0.95,
        repetition_penalty=1.1,
        ignore_eos=True,
    )
    first = pipe.answer(image, "Describe it.", seed=123, **options).token_ids
    again = pipe.answer(image, "Describe it.", seed=123, **options).token_ids
    other = pipe.answer(image, "Describe it.", seed=7, **options).token_ids
    greedy = pipe.answer(image, "Describe it.", max_new_tokens=16, ignore_eos=True).token_ids
    assert first == again
    assert first != other
    assert first != greedy


def test_top_p_zero_samples_the_greedy_answer(pipe):
    """top_p 0 (OpenAI's range is [0, 1]) keeps only the most probable token at every step, so
    a sampled answer is the greedy one, whatever the seed."""
    image = picture(6)
    greedy = pipe.answer(image, "Describe it.", max_new_tokens=12, ignore_eos=True).token_ids
    for seed in (1, 2, 3):
        sampled = pipe.answer(
            image,
            "Describe it.",
            max_new_tokens=12,
            ignore_eos=True,
            temperature=2.0,
            top_p=0,
            seed=seed,
        )
        assert sampled.token_ids == greedy


def test_stream_joins_to_generate(pipe):
    image = picture(7)
    streamed = list(pipe.stream(image, "Tell me about it.", max_new_tokens=20))
    assert "".join(streamed) == pipe.generate(image, "Tell me about it.", max_new_tokens=20)


def test_stop_strings_cut_the_answer(pipe):
    image = picture(8)
    full = pipe.answer(image, "Go on.", max_new_tokens=20, ignore_eos=True)
    if len(full.text) < 4:
        pytest.skip("the random model's answer has too little text to cut")  # pragma: no cover
    stop = full.text[2:4]
    cut = pipe.answer(image, "Go on.", max_new_tokens=20, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert (
        "".join(pipe.stream(image, "Go on.", max_new_tokens=20, ignore_eos=True, stop=[stop]))
        == cut.text
    )


def test_max_new_tokens_and_finish_reason(pipe):
    answer = pipe.answer(picture(9), "Count.", max_new_tokens=5, ignore_eos=True)
    assert len(answer.token_ids) == 5 and answer.finish_reason == "length"
    assert answer.timings["first_token_ms"] > 0


def test_threads_share_one_pipeline(pipe):
    from concurrent.futures import ThreadPoolExecutor

    requests = [(picture(i), f"Question number {i}?") for i in range(8)]
    alone = [pipe.answer(image, q, max_new_tokens=12).token_ids for image, q in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda r: pipe.answer(r[0], r[1], max_new_tokens=12).token_ids, requests * 2)
        )
    assert together == alone * 2


def test_closed_pipeline_refuses_requests(tiny_model_dir):
    from llava_edge.errors import LlavaEdgeError

    with Pipeline.load(tiny_model_dir) as p:
        p.generate(None, "Hi", max_new_tokens=2)
    with pytest.raises(LlavaEdgeError, match="closed"):
        p.generate(None, "Hi", max_new_tokens=2)
