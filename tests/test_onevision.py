"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration, llava-hf's
llava-onevision-qwen2-0.5b-ov-hf at tiny dims): export holds the graphs to transformers through
its own verification (both graph forms, the verification's picture large enough that its tile
features are shrunk), the runtime reproduces transformers' greedy tokens on images whose
features are shrunk and on ones whose are not, its packing equals
LlavaOnevisionModel.pack_image_features and its token counts LlavaOnevisionProcessor's; llava-hf's
template, whose past answers follow another header than a new one, holds in chats; several
images per prompt, each of which OneVision reads untiled, answer as transformers' generate() on
the whole conversation, on every entry point.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import quiet
from hf_checkpoints import (
    INTERLEAVE_TEMPLATE,
    ONEVISION_TEMPLATE,
    onevision_qwen,
    write_checkpoint,
)
from PIL import Image
from test_anyres import picture

from llava_edge.errors import ChatFull, LlavaEdgeError
from llava_edge.manifest import Manifest
from llava_edge.runtime import Limits, Pipeline, anyres
from llava_edge.runtime.anyres import (
    feature_count,
    image_embeds,
    max_feature_count,
    pixel_batch,
    prompt_forms,
)

QUESTION = "What is in the picture?"
NEW_TOKENS = 12
# (height, width) -> the grid of tiles it gets, and whether its features are shrunk
# (anyres_max_2: more than about 2 tiles' features are)
IMAGES = {
    "large": (150, 170),  # 3 x 3 tiles, 10 x 12 features after unpadding: shrunk to 5 x 6
    "tall": (130, 40),  # 3 x 1 tiles, 12 x 4 features: shrunk to 9 x 3
    "small": (50, 100),  # 1 x 2 tiles, 4 x 8 features: kept
}


@dataclass
class Exported:
    checkpoint: Path
    model_dir: Path
    model: Any
    processor: Any


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Exported with its own verification against transformers (both forms, on a 400 x 320
    picture whose 3 x 3 tiles' features are shrunk): a mismatch fails here."""
    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.modeling import load_model, load_processor

    root = tmp_path_factory.mktemp("onevision")
    checkpoint = write_checkpoint(
        root / "checkpoint", onevision_qwen(), chat_template=ONEVISION_TEMPLATE, seed=5
    )
    model_dir = root / "model"
    report = export_checkpoint(checkpoint, model_dir, log=quiet)
    assert set(report["forms"]) == {"standard", "fused"}
    assert all(form["greedy_tokens_matched"] == 32 for form in report["forms"].values())
    assert report["chat_ids_equal"] is True
    model = load_model(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    return Exported(checkpoint, model_dir, model, load_processor(checkpoint))


def _hf_ids(exported: Exported, turns: list, image: Image.Image) -> dict:
    from llava_edge.export.chat_template import CheckpointChat

    return CheckpointChat.of(exported.processor).inputs(turns, image)


def _unshrunk_count(manifest: Manifest, image: Image.Image) -> int:
    import dataclasses

    anyres = dataclasses.replace(manifest.image.anyres, max_patches=None)
    spec = dataclasses.replace(manifest.image, anyres=anyres)
    return feature_count(image.size, spec, manifest.num_image_tokens)


@pytest.mark.parametrize("form", ["standard", "fused"])
@pytest.mark.parametrize("shape", list(IMAGES))
def test_greedy_tokens_equal_transformers(exported: Exported, shape: str, form: str) -> None:
    image = picture(*IMAGES[shape], seed=len(shape))
    inputs = _hf_ids(exported, [(QUESTION, None)], image)
    with torch.no_grad():
        reference = exported.model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )[0, inputs["input_ids"].shape[1] :].tolist()
    with Pipeline.load(exported.model_dir, graph_form=form) as pipe:
        answer = pipe.answer(image, QUESTION, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        manifest = pipe.manifest
    assert answer.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert answer.token_ids == reference
    tokens = answer.prompt_token_ids.count(manifest.tokens.image_token_id)
    shrunk = tokens < _unshrunk_count(manifest, image)
    assert shrunk == (shape != "small")  # both branches of pack_image_features are taken


def test_manifest_records_the_shrinking_and_a_newer_format(exported: Exported) -> None:
    manifest = Manifest.load(exported.model_dir)
    anyres = manifest.image.anyres
    assert anyres.max_patches == 2 and anyres.several_images is False
    assert manifest.template.answered_assistant == "<|im_end|>\n<|im_start|>assistant \n"
    assert manifest.template.assistant == "<|im_end|>\n<|im_start|>assistant\n"
    assert manifest.format_version == 4
    assert manifest.tokens.video_token_id == exported.processor.video_token_id is not None
    # a runtime of format 3 would read none of these and answer otherwise, without a word
    with pytest.raises(LlavaEdgeError, match=r"format_version 3 is older than .* needs \(4\)"):
        Manifest.from_dict({**manifest.to_dict(), "format_version": 3})


SIZES = [(150, 170), (130, 40), (50, 100), (60, 60), (179, 181), (3, 2), (1, 120), (200, 33)]


def test_pixels_packing_and_counts_equal_transformers(exported: Exported) -> None:
    """Pixels as LlavaOnevisionImageProcessor's, the packing (unpadding, bilinear shrinking,
    newlines) as LlavaOnevisionModel.pack_image_features, and as many features as
    LlavaOnevisionProcessor puts image tokens in the prompt, for sizes shrunk and not."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    manifest = Manifest.load(exported.model_dir)
    spec, config, processor = manifest.image, exported.model.config, exported.processor
    rng = np.random.default_rng(0)
    hidden = manifest.text.hidden_size
    newline = rng.standard_normal(hidden).astype(np.float32)
    counts = []
    for height, width in SIZES:
        image = picture(height, width)
        pixels = pixel_batch(image, spec)
        theirs = processor.image_processor(images=image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(pixels, theirs, rtol=0, atol=1e-5)
        features = rng.standard_normal((len(pixels), spec.anyres.tile_features**2, hidden))
        features = features.astype(np.float32)
        ours = image_embeds(features, image.size, spec, newline)
        (packed,), _ = LlavaOnevisionModel.pack_image_features(
            SimpleNamespace(config=config),
            [torch.from_numpy(features)],
            torch.tensor([[height, width]]),
            torch.from_numpy(newline),
            config.vision_aspect_ratio,
        )
        assert ours.shape == packed.shape, (height, width)
        np.testing.assert_allclose(ours, packed.numpy(), rtol=0, atol=1e-5)
        count = processor._get_number_of_features(height, width, 60, 60)
        assert len(ours) == count == feature_count(image.size, spec, 16), (height, width)
        counts.append(count)
    assert max(counts) <= max_feature_count(manifest)


def test_packing_at_the_published_geometry() -> None:
    """llava-onevision-qwen2-0.5b-ov-hf's own numbers (384 px tiles of 27 x 27 features, 1 to 6
    tiles a side, anyres_max_9): the packing of camera-sized pictures equals transformers', as
    many features as LlavaOnevisionProcessor counts, none past max_feature_count."""
    from hf_checkpoints import ONEVISION_QWEN, VIDEO, qwen_tokenizer
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from llava_edge.manifest import AnyResSpec, ImageSpec
    from llava_edge.modeling import OnevisionProcessorWithoutVideo
    from llava_edge.runtime.anyres import max_tiles, select_resolution

    pinpoints = ONEVISION_QWEN["image_grid_pinpoints"]
    anyres = AnyResSpec(pinpoints, 384, [384, 384], 27, "image_newline.npy", 9, False)
    spec = ImageSpec(384, 384, None, 3, False, 1 / 255, True, [0.5] * 3, [0.5] * 3, False, anyres)
    processor = OnevisionProcessorWithoutVideo(
        image_processor=LlavaOnevisionImageProcessorPil(image_grid_pinpoints=pinpoints),
        tokenizer=qwen_tokenizer((VIDEO,)),
        num_image_tokens=27 * 27,
        vision_feature_select_strategy="full",
    )
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=384, patch_size=14), image_grid_pinpoints=pinpoints
    )
    manifest = SimpleNamespace(image=spec, num_image_tokens=27 * 27)
    rng = np.random.default_rng(0)
    newline = rng.standard_normal(4).astype(np.float32)
    for height, width in [(480, 640), (720, 1280), (1080, 1920), (3000, 4000), (100, 3000)]:
        target_h, target_w = select_resolution(height, width, pinpoints)
        tiles = 1 + (target_h // 384) * (target_w // 384)
        assert tiles <= max_tiles(anyres)
        features = rng.standard_normal((tiles, 27 * 27, 4)).astype(np.float32)
        ours = image_embeds(features, (width, height), spec, newline)
        (packed,), _ = LlavaOnevisionModel.pack_image_features(
            SimpleNamespace(config=config),
            [torch.from_numpy(features)],
            torch.tensor([[height, width]]),
            torch.from_numpy(newline),
            "anyres_max_9",
        )
        np.testing.assert_allclose(ours, packed.numpy(), rtol=0, atol=1e-5)
        count = processor._get_number_of_features(height, width, 384, 384)
        assert (
            len(ours)
            == count
            == feature_count((width, height), spec, 729)
            <= max_feature_count(manifest)
        )


def test_chat_turns_follow_the_templates_past_answer_header(exported: Exported) -> None:
    """llava-hf's template writes a past answer after "assistant \\n" and a new one after
    "assistant\\n": a chat's later turn is the conversation as the template renders it, as
    serve and transformers feed it, and answers as transformers does on it."""
    image = picture(*IMAGES["small"])
    with Pipeline.load(exported.model_dir) as pipe:
        chat = pipe.chat(image, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        first = chat.ask(QUESTION)
        stream = chat.stream("Which one is bigger?")
        list(stream)
        second = stream.answer
        turns = [(QUESTION, first), ("Which one is bigger?", None)]
        whole = pipe.conversation_ids(turns, pipe.image_pixels(image), image_turn=0)
        again = pipe.chat(image, history=turns[:1], max_new_tokens=NEW_TOKENS, ignore_eos=True)
        resumed = again.stream("Which one is bigger?")
        list(resumed)
    inputs = _hf_ids(exported, turns, image)
    assert second.prompt_token_ids == whole == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        reference = exported.model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )[0, inputs["input_ids"].shape[1] :].tolist()
    assert second.token_ids == resumed.answer.token_ids == reference


def test_run_and_serve_answer_as_the_pipeline(exported: Exported, tmp_path: Path, capsys) -> None:
    """`llava-edge run` on an image file, and a served conversation with a past answer, whose
    prompt is the template's (the past answer after its own header)."""
    import base64
    import io
    import time

    from starlette.testclient import TestClient

    from llava_edge.cli import main
    from llava_edge.serve import ServeOptions, create_app

    image = picture(*IMAGES["tall"])
    path = tmp_path / "tall.png"
    image.save(path)
    with Pipeline.load(exported.model_dir) as pipe:
        want = pipe.generate(image, QUESTION, max_new_tokens=6)
        later = pipe.answer(image, QUESTION, max_new_tokens=6)
    capsys.readouterr()
    command = ["run", str(exported.model_dir), "--image", str(path), "--prompt", QUESTION]
    assert main([*command, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    turns = [(QUESTION, "A red circle."), ("Which one is bigger?", None)]
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, QUESTION]},
        {"role": "assistant", "content": turns[0][1]},
        {"role": "user", "content": turns[1][0]},
    ]
    messages[0]["content"][1] = {"type": "text", "text": QUESTION}
    body = {"model": "m", "messages": messages, "max_tokens": 4}
    with TestClient(create_app(ServeOptions(exported.model_dir, model_name="m"))) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    inputs = _hf_ids(exported, turns, image)
    with torch.no_grad():
        reference = exported.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    reference = reference[0, inputs["input_ids"].shape[1] :].tolist()
    text = exported.processor.tokenizer.decode(reference, skip_special_tokens=True)
    assert reply.json()["choices"][0]["message"]["content"] == text
    prompt_tokens = reply.json()["usage"]["prompt_tokens"]
    assert prompt_tokens == inputs["input_ids"].shape[1] > len(later.prompt_token_ids)


def _hf_several(
    exported: Exported, turns: list, images: list[Image.Image], image_turns: list[int]
) -> dict:
    """transformers' inputs for a conversation of several images, each with the turn
    `image_turns` names: the images of one conversation as one sample's, as
    apply_chat_template(tokenize=True) passes them (a flat list reads as one image a sample)."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "image"} for turn in image_turns if turn == i]
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    text = exported.processor.apply_chat_template(
        messages, add_generation_prompt=turns[-1][1] is None, tokenize=False
    )
    return exported.processor(text=text, images=[images], return_tensors="pt")


def _hf_generate(exported: Exported, inputs: dict, new: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = exported.model.generate(
            **inputs, max_new_tokens=new, do_sample=False, eos_token_id=None
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _hf_logits(exported: Exported, inputs: dict) -> np.ndarray:
    """transformers' logits of the prompt's next token: this tiny model answers much the same
    tokens whatever the images, its logits differ."""
    with torch.no_grad():
        return exported.model(**inputs).logits[0, -1].numpy()


@pytest.fixture
def first_logits(monkeypatch) -> list[np.ndarray]:
    """The logits each answer's first token is picked from, as the runtime's samplers (of a
    request alone and of a batch) see them, one per answer in order."""
    import llava_edge.runtime.batching as batching
    import llava_edge.runtime.generate as generate

    seen: list[np.ndarray] = []

    class Recording(generate.Sampler):
        def __call__(self, logits, ids):
            if not getattr(self, "recorded", False):
                seen.append(np.array(logits[0], dtype=np.float32))
                self.recorded = True
            return super().__call__(logits, ids)

    monkeypatch.setattr(generate, "Sampler", Recording)
    monkeypatch.setattr(batching, "Sampler", Recording)
    return seen


def _close(ours: np.ndarray, theirs: np.ndarray) -> None:
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


SEVERAL = {"two": ["large", "tall"], "three": ["small", "large", "tall"]}


@pytest.mark.parametrize("form", ["standard", "fused"])
@pytest.mark.parametrize("several", list(SEVERAL))
def test_several_images_equal_transformers(
    exported: Exported, several: str, form: str, first_logits: list
) -> None:
    """Each of a prompt's several images is padded to a square, untiled, its base features and
    one newline, as transformers' OneVision reads them: the same prompt ids and greedy tokens;
    an image asked about alone first keeps its tiled features apart from its untiled ones."""
    images = [picture(*IMAGES[name], seed=i) for i, name in enumerate(SEVERAL[several])]
    inputs = _hf_several(exported, [(QUESTION, None)], images, [0] * len(images))
    reference = _hf_generate(exported, inputs)
    with Pipeline.load(exported.model_dir, graph_form=form) as pipe:
        alone = pipe.answer(images[0], QUESTION, max_new_tokens=2)
        runs = pipe.stats["vision_runs"]
        answer = pipe.answer(images, QUESTION, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert pipe.stats["vision_runs"] - runs == len(images)  # the tiled one is not taken
        again = pipe.answer(images[0], QUESTION, max_new_tokens=2)
        spec = pipe.manifest.image
        pixels = prompt_forms([pipe.image_pixels(one) for one in images])
    assert answer.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert answer.token_ids == reference
    _close(first_logits[1], _hf_logits(exported, inputs))
    assert again.prompt_token_ids == alone.prompt_token_ids
    np.testing.assert_array_equal(first_logits[2], first_logits[0])
    image_id = exported.processor.image_token_id
    each = spec.anyres.tile_features**2 + 1
    assert answer.prompt_token_ids.count(image_id) == each * len(images)
    theirs = inputs["pixel_values"].numpy()[:, 0]  # each image's one input, the rest padding
    np.testing.assert_allclose(np.concatenate([p.pixels for p in pixels]), theirs, atol=1e-5)


def test_batch_rows_read_their_own_images(exported: Exported, first_logits: list) -> None:
    """generate_batch: a row of several images reads them untiled, a row of one tiles it, the
    same picture in both, as each row alone does."""
    large, tall = picture(*IMAGES["large"]), picture(*IMAGES["tall"], seed=1)
    requests = [([large, tall], QUESTION), (large, QUESTION), ([tall, large, tall], "Same?")]
    options = {"max_new_tokens": 3, "ignore_eos": True}
    with Pipeline.load(exported.model_dir) as pipe:
        rows = pipe.generate_batch(requests, **options)
        batched = list(first_logits)
        alone = [pipe.answer(image, question, **options) for image, question in requests]
    for row, one, seen, was in zip(rows, alone, batched, first_logits[3:], strict=True):
        assert row.prompt_token_ids == one.prompt_token_ids
        _close(seen, was)
    inputs = _hf_several(exported, [(QUESTION, None)], [large, tall], [0, 0])
    assert rows[0].prompt_token_ids == inputs["input_ids"][0].tolist()
    _close(batched[0], _hf_logits(exported, inputs))


def test_a_conversations_images_read_as_one_samples(exported: Exported) -> None:
    """What _hf_several rests on: apply_chat_template passes a conversation's images as one
    sample's (untiled), where a flat list would read as one image a sample (each tiled)."""
    images = [picture(*IMAGES["large"]), picture(*IMAGES["tall"], seed=1)]
    content = [{"type": "image", "image": one} for one in images]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]
    processor = exported.processor
    whole = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ours = _hf_several(exported, [(QUESTION, None)], images, [0, 0])
    assert whole["input_ids"].tolist() == ours["input_ids"].tolist()
    assert torch.equal(whole["pixel_values"], ours["pixel_values"])
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    flat = processor(text=text, images=images)
    assert len(flat["input_ids"][0]) > len(ours["input_ids"][0])


def test_a_chat_that_brings_a_second_image_equals_transformers(
    exported: Exported, first_logits: list
) -> None:
    """A chat's first image is tiled while it is the only one; once a later turn brings a
    second, the conversation reads both untiled, as transformers' generate reads the whole
    conversation (and serve, fed it whole): the turn after it too. The first image is read
    untiled as it was given, though the app has drawn into its own image since."""
    first, second = picture(*IMAGES["large"]), picture(*IMAGES["small"], seed=1)
    drawn = first.copy()  # the app's image, a camera's buffer
    turns = [(QUESTION, None)]
    with Pipeline.load(exported.model_dir) as pipe:
        chat = pipe.chat(drawn, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        turns[0] = (QUESTION, chat.ask(QUESTION))
        drawn.paste((0, 0, 0), (0, 0, *drawn.size))  # the next frame, drawn into it
        stream = chat.stream("And this one?", image=second)
        list(stream)
        added = stream.answer
        turns.append(("And this one?", added.text))
        stream = chat.stream("Which one is bigger?")
        list(stream)
        after = stream.answer
        pixels = [pipe.image_pixels(first), pipe.image_pixels(second)]
        whole = pipe.conversation_ids(turns[:1] + [("And this one?", None)], pixels, [0, 1])
    inputs = _hf_several(exported, turns[:1] + [("And this one?", None)], [first, second], [0, 1])
    assert added.prompt_token_ids == whole == inputs["input_ids"][0].tolist()
    assert added.token_ids == _hf_generate(exported, inputs)
    _close(first_logits[1], _hf_logits(exported, inputs))
    inputs = _hf_several(
        exported, [*turns, ("Which one is bigger?", None)], [first, second], [0, 1]
    )
    assert after.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert after.token_ids == _hf_generate(exported, inputs)
    _close(first_logits[2], _hf_logits(exported, inputs))


def test_a_chat_of_several_images_keeps_only_their_untiled_pixels(exported: Exported) -> None:
    """Once a chat holds several images it reads each untiled, whatever comes next: it keeps
    their untiled pixels alone, not their tiles (tens of MB a camera frame at the published
    geometry), so a long chat's images take what their untiled forms do."""
    first, second = picture(*IMAGES["large"]), picture(*IMAGES["tall"], seed=1)
    options = {"max_new_tokens": 2, "ignore_eos": True}
    with Pipeline.load(exported.model_dir) as pipe:
        spec = pipe.manifest.image
        untiled = 3 * spec.height * spec.width * 4  # one float32 input
        chat = pipe.chat(first, **options)
        chat.ask(QUESTION)
        assert sum(one.pixels.nbytes for one in chat.pixels) > untiled  # alone: tiled
        chat.ask("And this one?", image=second)
        assert sum(one.pixels.nbytes for one in chat.pixels) == 2 * untiled
        chat.ask("Which one is bigger?", image=first)
        assert sum(one.pixels.nbytes for one in chat.pixels) == 3 * untiled


def test_chats_of_two_images_from_the_start_and_after_a_history(
    exported: Exported, first_logits: list
) -> None:
    """A chat about two images from its first question, and one resumed from a history about
    one image whose next question brings a second, answer as transformers on the whole
    conversation."""
    first, second = picture(*IMAGES["tall"]), picture(*IMAGES["large"], seed=3)
    history = [(QUESTION, "A red circle.")]
    options = {"max_new_tokens": 2, "ignore_eos": True}
    with Pipeline.load(exported.model_dir) as pipe:
        both = pipe.chat([first, second], **options).stream(QUESTION)
        list(both)
        resumed = pipe.chat(first, history=history, **options).stream("And?", image=second)
        list(resumed)
    inputs = _hf_several(exported, [(QUESTION, None)], [first, second], [0, 0])
    assert both.answer.prompt_token_ids == inputs["input_ids"][0].tolist()
    _close(first_logits[0], _hf_logits(exported, inputs))
    inputs = _hf_several(exported, [*history, ("And?", None)], [first, second], [0, 1])
    assert resumed.answer.prompt_token_ids == inputs["input_ids"][0].tolist()
    _close(first_logits[1], _hf_logits(exported, inputs))


def test_a_chat_turn_bringing_a_second_image_rolls_back_whole(
    exported: Exported, first_logits: list
) -> None:
    """A turn that would have read the chat's image untiled, abandoned, leaves the chat about
    its one image, tiled: the next question answers as transformers on that conversation."""
    image, other = picture(*IMAGES["large"]), picture(*IMAGES["small"], seed=1)
    options = {"max_new_tokens": 3, "ignore_eos": True}
    with Pipeline.load(exported.model_dir) as pipe:
        chat = pipe.chat(image, **options)
        turns = [(QUESTION, chat.ask(QUESTION))]
        abandoned = chat.stream("And this one?", image=other)
        next(abandoned)
        abandoned.close()
        stream = chat.stream("Which one is bigger?")
        list(stream)
    inputs = _hf_ids(exported, [*turns, ("Which one is bigger?", None)], image)
    assert stream.answer.prompt_token_ids == inputs["input_ids"][0].tolist()
    _close(first_logits[-1], _hf_logits(exported, inputs))


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A OneVision dir whose template writes a past answer's header as a new one's (ChatML, as
    a fine-tuned checkpoint may bring): its chats keep each answer as generated."""
    from llava_edge.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("onevision_chatml")
    checkpoint = write_checkpoint(
        root / "checkpoint", onevision_qwen(), chat_template=INTERLEAVE_TEMPLATE, seed=5
    )
    export_checkpoint(checkpoint, root / "model", verify=False, log=quiet)
    return root / "model"


@pytest.mark.parametrize("ending", ["abandoned", "timed out", "too long"])
def test_a_failed_turn_bringing_a_second_image_leaves_the_images_features(
    chatml_dir: Path, ending: str, first_logits: list
) -> None:
    """A turn bringing a second image cuts the cache back before the first image to read it
    untiled; rolled back (abandoned, timed out, refused for length), the next question feeds the
    first image's tiled features again: it answers as the chat that never asked that turn."""
    from llava_edge.errors import PromptTooLong, TimedOut

    image, other = picture(*IMAGES["large"]), picture(*IMAGES["small"], seed=1)
    options = {"max_new_tokens": 3, "ignore_eos": True}
    with Pipeline.load(chatml_dir) as pipe:
        assert pipe.manifest.template.answered_assistant is None
        chats = [pipe.chat(image, **options) for _ in range(2)]
        for chat in chats:
            chat.ask(QUESTION)
        failed = chats[1]
        if ending == "abandoned":
            stream = failed.stream("And this one?", image=other)
            next(stream)
            stream.close()
        elif ending == "timed out":
            with pytest.raises(TimedOut):
                failed.ask("And this one?", image=other, timeout_s=1e-9)
        else:
            with pytest.raises(PromptTooLong):
                failed.ask("And this one? " * pipe.max_context, image=other)
        for chat in chats:
            chat.ask("Which one is bigger?")
    _close(first_logits[-1], first_logits[-2])


def test_a_second_image_turn_refused_for_its_length_leaves_the_cache(exported: Exported) -> None:
    """A turn bringing a second image re-reads the first untiled and feeds the conversation again
    from before it; refused before it runs (over the prompt limit), it gave up that part of the
    cache all the same, which the next turn then fed again."""
    first, second = picture(*IMAGES["small"]), picture(*IMAGES["tall"], seed=1)
    options = {"max_new_tokens": 2, "ignore_eos": True}
    with Pipeline.load(exported.model_dir) as pipe:
        chat = pipe.chat(first, **options)
        chat.ask(QUESTION)
        turn = chat.stream(QUESTION * 4, image=second)
        "".join(turn)
        whole = len(turn.answer.prompt_token_ids)
    with Pipeline.load(exported.model_dir, limits=Limits(max_prompt_tokens=whole - 1)) as pipe:
        chat = pipe.chat(first, **options)
        chat.ask(QUESTION)
        held = chat.cache.length
        with pytest.raises(ChatFull):
            chat.ask(QUESTION * 4, image=second)
        assert chat.cache.length == chat.fed == held


def test_limits_count_each_of_several_images_untiled(exported: Exported) -> None:
    """The context and the prompt limit count each of several images' untiled tokens, fewer
    than one large image's tiled ones: max_images_per_prompt and images_that_fit hold as many
    as fit, one more is refused naming the prompt's length as rendered."""
    from llava_edge.errors import PromptTooLong

    image = picture(*IMAGES["large"])
    with Pipeline.load(exported.model_dir) as pipe:
        each = pipe.manifest.image.anyres.tile_features**2 + 1
        assert pipe.max_images_per_prompt == pipe.max_context // each > 1
        pixels = pipe.image_pixels(image)
        fit = pipe.images_that_fit(QUESTION)
        assert fit == pipe.images_that_fit(QUESTION, smallest=True) > 2
        longest = len(pipe.prompt_ids(QUESTION, [pixels] * fit))
        longer = len(pipe.prompt_ids(QUESTION, [pixels] * (fit + 1)))
        assert longest < pipe.max_context <= longer
        said = f"the prompt is {longer} tokens .* fewer images, or a smaller one alone"
        with pytest.raises(PromptTooLong, match=said):
            pipe.answer([image] * (fit + 1), QUESTION)
        two = len(pipe.prompt_ids(QUESTION, [pixels] * 2))
        alone = len(pipe.prompt_ids(QUESTION, pixels))
    assert alone > two  # one large image takes more tokens tiled than two untiled
    limits = Limits(max_prompt_tokens=two)
    with Pipeline.load(exported.model_dir, limits=limits) as pipe:
        # one large image alone does not fit, so no count of large images does, though two,
        # each untiled, do: smallest=True's count holds them
        fit = pipe.images_that_fit(QUESTION), pipe.images_that_fit(QUESTION, smallest=True)
        assert fit == (0, 2)
        assert pipe.answer([image, image], QUESTION, max_new_tokens=1).prompt_token_ids
        with pytest.raises(PromptTooLong, match=f"the prompt is {alone} tokens"):
            pipe.answer(image, QUESTION, max_new_tokens=1)


def test_a_prompt_of_several_images_never_tiles_them(exported: Exported, monkeypatch) -> None:
    """Each of several images is read untiled: its tiles (about 200 ms for a 1080p frame at the
    published geometry) are made only for a prompt that reads it alone."""
    from llava_edge.runtime import anyres

    tiled = []
    tile = anyres.pixel_batch
    monkeypatch.setattr(anyres, "pixel_batch", lambda *args: tiled.append(1) or tile(*args))
    first, second = picture(*IMAGES["large"]), picture(*IMAGES["tall"], seed=1)
    with Pipeline.load(exported.model_dir) as pipe:
        pipe.answer([first, second], QUESTION, max_new_tokens=1)
        pipe.chat([first, second]).ask(QUESTION, max_new_tokens=1)
        assert tiled == []
        pipe.answer(first, QUESTION, max_new_tokens=1)
        assert len(tiled) == 1


def _made_meanwhile(method: Any, finish: Any) -> Any:
    """A trace that runs `finish` (another thread making the same pixels) between the first
    and the second line of `method`, which a thread switch may interleave there."""
    lines = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            lines.append(frame.f_lineno)
            if len(lines) == 2:
                finish()
        return local

    return lambda frame, event, arg: local if frame.f_code is method.__code__ else None


@pytest.mark.parametrize("form", ["pixels", "square"])
def test_an_images_forms_made_by_two_threads_at_once(form: str) -> None:
    """Two threads reading an image's lazily made pixels (or untiled form) at once, as threads
    submitting one prepared frame (BatchEngine.submit_ids) may, each get them, whichever makes
    them first."""
    from llava_edge.runtime.anyres import ImagePixels

    array = np.ones((1, 3, 2, 2), np.float32)
    untiled = ImagePixels(array, (2, 2), "untiled k", untiled=True)
    image = ImagePixels(lambda: array, (2, 2), "tiled k", lambda: untiled)
    method = ImagePixels.pixels.fget if form == "pixels" else ImagePixels.square
    other = {"pixels": lambda: image.pixels, "square": image.square}[form]
    sys.settrace(_made_meanwhile(method, other))
    try:
        got = method(image)
    finally:
        sys.settrace(None)
    assert got is (array if form == "pixels" else untiled)


def test_the_feature_cache_holds_a_contexts_worth_of_tiled_pictures(exported: Exported) -> None:
    """Pictures asked about alone, each tiled, are cached up to the context's worth of features,
    not as many as the context holds untiled; a prompt of as many pictures as fit, each
    untiled, is still encoded once."""
    pictures = [picture(*IMAGES["large"], seed=i) for i in range(30)]
    with Pipeline.load(exported.model_dir) as pipe:
        for one in pictures:
            pipe.image_features(one)
        assert sum(map(len, pipe._features.values())) <= pipe.max_context
        many = [pipe.image_pixels(one) for one in pictures[: pipe.images_that_fit(QUESTION)]]
        assert len(many) > 2
        pipe.pixel_features(many)
        runs = pipe.stats["vision_runs"]
        pipe.pixel_features(many)
        assert pipe.stats["vision_runs"] == runs


def test_watch_asks_about_the_last_frames_untiled(
    exported: Exported, tmp_path: Path, first_logits: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`watch --frames 2`: the first answer is about its one frame, tiled; each later one about
    two, untiled, as transformers reads a prompt of two images. Each frame's untiled input is
    made once, though two answers read it."""
    images = [picture(*IMAGES[name], seed=i) for i, name in enumerate(["large", "tall", "small"])]
    for i, image in enumerate(images):
        image.save(tmp_path / f"frame_{i}.png")
    made: list[str] = []
    tiled, untiled = anyres.pixel_batch, anyres._untiled
    monkeypatch.setattr(anyres, "pixel_batch", lambda *a: made.append("tiled") or tiled(*a))
    monkeypatch.setattr(anyres, "_untiled", lambda *a: made.append("untiled") or untiled(*a))
    with (
        Pipeline.load(exported.model_dir) as pipe,
        pipe.watch(tmp_path, QUESTION, frames=2, max_new_tokens=1) as answers,
    ):
        frames = [answer.frames for answer in answers]
    assert frames == [[0], [0, 1], [1, 2]]
    assert sorted(made) == ["tiled"] + ["untiled"] * 3  # frame 0's tiles for the first answer
    _close(first_logits[0], _hf_logits(exported, _hf_ids(exported, [(QUESTION, None)], images[0])))
    for seen, pair in zip(first_logits[1:], [images[:2], images[1:]], strict=True):
        _close(seen, _hf_logits(exported, _hf_several(exported, [(QUESTION, None)], pair, [0, 0])))


def test_watch_keeps_a_frame_too_long_alone_for_the_next_frames(
    exported: Exported, tmp_path: Path
) -> None:
    """Under a prompt limit that two untiled frames fit and one large frame, tiled, does not,
    `watch --frames 2` tells the first frame did not fit and asks about it with the next."""
    images = [picture(*IMAGES["large"], seed=i) for i in range(3)]
    for i, image in enumerate(images):
        image.save(tmp_path / f"frame_{i}.png")
    with Pipeline.load(exported.model_dir) as pipe:
        pixels = [pipe.image_pixels(one) for one in images[:2]]
        two = len(pipe.prompt_ids(QUESTION, pixels))
        assert len(pipe.prompt_ids(QUESTION, pixels[0])) > two
    with (
        Pipeline.load(exported.model_dir, limits=Limits(max_prompt_tokens=two)) as pipe,
        pipe.watch(tmp_path, QUESTION, frames=2, max_new_tokens=1) as answers,
    ):
        answers = list(answers)
    assert [answer.frames for answer in answers] == [[], [0, 1], [1, 2]]
    assert "frame 0 did not fit" in answers[0].error
    assert [answer.error for answer in answers[1:]] == [None, None]


def test_watch_skips_a_frame_too_far_from_square_to_read_with_others(
    exported: Exported, tmp_path: Path
) -> None:
    """`watch --frames 2`: a strip OneVision tiles alone but cannot pad to a square, untiled, is
    reported and skipped as a frame that cannot be read, not kept to fail every frame after it."""
    Image.new("RGB", (9000, 1), (10, 20, 30)).save(tmp_path / "frame_0.png")
    for i in range(1, 4):
        picture(*IMAGES["small"], seed=i).save(tmp_path / f"frame_{i}.png")
    with (
        Pipeline.load(exported.model_dir) as pipe,
        pipe.watch(tmp_path, QUESTION, frames=2, max_new_tokens=1) as answers,
    ):
        answers = list(answers)
    assert [answer.frames for answer in answers] == [[], [1], [1, 2], [2, 3]]
    assert "frame 0 could not be read: image is 9000x1" in answers[0].error
    assert [answer.error for answer in answers[1:]] == [None, None, None]


def test_a_chat_of_a_picture_too_far_from_square_and_another_fails_at_once(
    exported: Exported, tmp_path: Path
) -> None:
    """A strip OneVision tiles alone cannot pad to a square, untiled, as a chat of it and
    another image reads it: `chat --image strip --image photo` fails before its greeting, as a
    bad image does, not at every question after it; `/add photo` in a chat of the strip says so
    at once."""
    from llava_edge.errors import TooLarge
    from llava_edge.runtime.interactive import chat_loop

    strip, photo = tmp_path / "strip.png", tmp_path / "photo.png"
    Image.new("RGB", (9000, 1), (10, 20, 30)).save(strip)
    picture(*IMAGES["small"]).save(photo)
    out, lines = io.StringIO(), iter(["Hi"])

    def read(_prompt: str) -> str:
        for line in lines:
            return line
        raise EOFError  # the chat ends

    with Pipeline.load(exported.model_dir) as pipe:
        with pytest.raises(TooLarge, match="image is 9000x1"):
            chat_loop(pipe, [str(strip), str(photo)], {}, read=read, out=out)
        assert out.getvalue() == ""
        assert pipe.chat(str(strip)).ask(QUESTION, max_new_tokens=1) is not None  # alone: tiled
        lines = iter([f"/add {photo}"])  # the chat's strip, with a second image: said at once
        chat_loop(pipe, str(strip), {}, read=read, out=out)
    assert "error: image is 9000x1" in out.getvalue()
    assert "the next question brings" not in out.getvalue()


def test_a_video_placeholder_is_refused(exported: Exported) -> None:
    """A prompt may not hold the video placeholder, which transformers' processor refuses
    without a video and the runtime has no input for."""
    said = "'<video>', the model's video placeholder"
    with Pipeline.load(exported.model_dir) as pipe, pytest.raises(LlavaEdgeError, match=said):
        pipe.answer(picture(50, 100), "What happens in <video>?")


def test_chat_command_add_brings_a_second_image(exported: Exported, tmp_path) -> None:
    """`llava-edge chat`'s /add of a second image: the next question is asked about both, as
    the chat's own turn bringing it answers."""
    import io

    from llava_edge.runtime.interactive import chat_loop

    image, other = picture(50, 100), tmp_path / "other.png"
    picture(60, 60, seed=1).save(other)
    lines = iter([QUESTION, f"/add {other}", "Which one is bigger?", "/quit"])
    out = io.StringIO()
    options = {"max_new_tokens": 4, "ignore_eos": True}
    with Pipeline.load(exported.model_dir) as pipe:
        chat_loop(pipe, image, options, read=lambda _prompt: next(lines), out=out)
        chat = pipe.chat(image, **options)
        first = chat.ask(QUESTION)
        stream = chat.stream("Which one is bigger?", image=Image.open(other))
        second = "".join(stream)
        each = pipe.manifest.image.anyres.tile_features**2 + 1  # untiled, with its newline
    image_id = exported.processor.image_token_id
    assert stream.answer.prompt_token_ids.count(image_id) == 2 * each
    brought = f"(the next question brings {other})"
    assert out.getvalue().endswith(f"{first}\n{brought}\n{second}\n")


def test_a_chat_answer_that_spells_the_video_placeholder_counts(
    exported: Exported, monkeypatch
) -> None:
    """A OneVision chat re-renders every finished turn (its past answers' own header), where an
    answer spelling "<video>" in ordinary tokens would read back as the video placeholder,
    which a prompt may not hold: the turn failed after its whole answer was shown. It is held
    as generated, and the chat goes on."""
    import llava_edge.runtime.generate as generate

    image = picture(50, 100)
    with Pipeline.load(exported.model_dir) as pipe:
        tokenizer = pipe.codec.tokenizer
        script = [i for part in ("See <vid", "eo>.") for i in tokenizer.encode(part).ids]
        assert pipe.manifest.tokens.video_token_id not in script  # spelled, not the token

        class Scripted(generate.Sampler):
            def __call__(self, logits, seen):
                self.at = getattr(self, "at", -1) + 1
                return np.array([script[self.at % len(script)]])

        monkeypatch.setattr(generate, "Sampler", Scripted)
        chat = pipe.chat(image, max_new_tokens=len(script))
        stream = chat.stream(QUESTION)
        assert "".join(stream) == "See <video>."
        assert chat.turns == [(QUESTION, "See <video>.")]
        assert chat.ids == stream.answer.prompt_token_ids + stream.answer.token_ids
        assert chat.ask("And then?") == "See <video>."
        assert len(chat.turns) == 2


def test_serve_answers_about_two_images_as_transformers(
    exported: Exported, first_logits: list
) -> None:
    import base64
    import io
    import time

    from starlette.testclient import TestClient

    from llava_edge.serve import ServeOptions, create_app

    images = [picture(*IMAGES["tall"]), picture(*IMAGES["small"], seed=2)]
    parts = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        parts.append({"type": "image_url", "image_url": {"url": url}})
    message = {"role": "user", "content": [*parts, {"type": "text", "text": "Same?"}]}
    body = {"model": "m", "messages": [message], "max_tokens": 6}
    with TestClient(create_app(ServeOptions(exported.model_dir, model_name="m"))) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    inputs = _hf_several(exported, [("Same?", None)], images, [0, 0])
    with torch.no_grad():
        reference = exported.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    reference = reference[0, inputs["input_ids"].shape[1] :].tolist()
    text = exported.processor.tokenizer.decode(reference, skip_special_tokens=True)
    assert reply.json()["choices"][0]["message"]["content"] == text
    assert reply.json()["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    _close(first_logits[-1], _hf_logits(exported, inputs))


def test_the_server_names_the_message_that_holds_the_video_placeholder(
    exported: Exported,
) -> None:
    """As a message holding the image placeholder's text is refused naming where it is (param),
    so is one holding the video placeholder's, in a question, a text part or a past answer."""
    import time

    from starlette.testclient import TestClient

    from llava_edge.serve import ServeOptions, create_app

    text = {"type": "text", "text": "What happens in <video>?"}
    cases = {
        "messages[0].content": [{"role": "user", "content": "What happens in <video>?"}],
        "messages[1].content[0].text": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [text]},
        ],
        "messages[1].content": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "See <video>."},
            {"role": "user", "content": "And then?"},
        ],
    }
    with TestClient(create_app(ServeOptions(exported.model_dir, model_name="m"))) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        for param, messages in cases.items():
            body = {"model": "m", "messages": messages, "max_tokens": 2}
            refused = client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 400
            error = refused.json()["error"]
            assert error["param"] == param
            assert "'<video>', the model's video placeholder" in error["message"]
            # several frames go in one request, as image_url parts
            assert "(send its frames as image_url parts)" in error["message"]
        body = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_quantize_and_plan_take_the_dir(exported: Exported, tmp_path: Path, capsys) -> None:
    from llava_edge.calib.quantize import quantize_model
    from llava_edge.cli import main

    out = tmp_path / "fp16"
    quantize_model(exported.model_dir, out, precision="fp16", log=quiet)
    manifest = Manifest.load(out)
    assert manifest.image.anyres.max_patches == 2 and manifest.format_version == 4
    image = picture(*IMAGES["large"])
    with Pipeline.load(out) as pipe, Pipeline.load(exported.model_dir) as reference:
        answer = pipe.answer(image, QUESTION, max_new_tokens=4, ignore_eos=True)
        want = reference.answer(image, QUESTION, max_new_tokens=4, ignore_eos=True)
    assert answer.prompt_token_ids == want.prompt_token_ids
    capsys.readouterr()
    assert main(["plan", str(out)]) == 0
    assert capsys.readouterr().out.strip()


def test_train_refuses_the_checkpoint_and_says_export_takes_it(
    exported: Exported, tmp_path: Path, capsys
) -> None:
    """train fine-tunes LlavaForConditionalGeneration only: a OneVision checkpoint is refused
    in one line that names it and what takes it, not `convert`, which has nothing to convert."""
    from llava_edge.cli import main

    out = tmp_path / "out"
    argv = ["train", "--stage", "2", "--model", str(exported.checkpoint), "--out", str(out)]
    capsys.readouterr()
    assert main([*argv, "--data", str(tmp_path / "data.json"), "--max-steps", "1"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is a LLaVA-OneVision checkpoint" in line and "`llava-edge export` it" in line
    assert "convert" not in line and not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vision_aspect_ratio": "anyres"}, "vision_aspect_ratio 'anyres' is not 'anyres_max_N'"),
        ({"processor": {"vision_aspect_ratio": "anyres_max_4"}}, "differs from config.json's"),
        (
            {"processor": {"vision_feature_select_strategy": "default"}},
            "vision_feature_select_strategy 'default' differs from config.json's 'full'",
        ),
        ({"processor": {"num_image_tokens": 9}}, "num_image_tokens 9 is not the vision tower's 16"),
    ],
    ids=["not-anyres-max", "processor-ratio", "processor-strategy", "processor-tokens"],
)
def test_settings_transformers_cannot_run_are_refused_before_loading(
    exported: Exported, tmp_path: Path, capsys, change: dict, message: str
) -> None:
    from llava_edge.cli import main

    checkpoint = Path(shutil.copytree(exported.checkpoint, tmp_path / "checkpoint"))
    for name, settings in (
        ("config.json", {k: v for k, v in change.items() if k != "processor"}),
        ("processor_config.json", change.get("processor", {})),
    ):
        saved = json.loads((checkpoint / name).read_text())
        (checkpoint / name).write_text(json.dumps({**saved, **settings}))
    (checkpoint / "model.safetensors").unlink()  # refused before the weights are read
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(tmp_path / "model")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line
    assert not (tmp_path / "model").exists()
