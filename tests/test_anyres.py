"""AnyRes (LLaVA-NeXT): LlavaNextForConditionalGeneration checkpoints built from config export
and reproduce transformers' greedy tokens exactly in fp32 on square, wide, tall and tiny images;
the runtime's tiling equals LlavaNextImageProcessor within 1e-5 and its feature packing equals
LlavaNextModel.pack_image_features; the template comes from the checkpoint's chat template (no
llava_edge.json, as llava-hf's); the feature cache, limits, chat, bench and the TensorRT profiles (through the stand-in) take the
variable number of image tokens and the tile batch.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from original_format import Source, hf_tokenizer, make_source, original_tokenizer
from PIL import Image

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest
from llava_edge.runtime import Limits, Pipeline
from llava_edge.runtime.anyres import feature_count, image_embeds, max_tiles, pixel_batch

QUESTION = "What is in the picture?"
NEW_TOKENS = 16

# Two grid pinpoint sets ([height, width], tiles of 32 px): LLaVA-NeXT's own shape (1x2, 2x1,
# 2x2), and a wider one with a single tile, 1x3, 3x1 and 2x3.
PINPOINTS = {
    "next": [[32, 64], [64, 32], [64, 64]],
    "wide": [[32, 32], [32, 96], [96, 32], [64, 64], [64, 96]],
}
MODELS = {
    "llama-vicuna": Source(
        aspect_ratio="anyres", pinpoints=PINPOINTS["next"], template="llava_v1", seed=11
    ),
    "mistral-gqa": Source(
        aspect_ratio="anyres",
        pinpoints=PINPOINTS["wide"],
        backbone="mistral",
        text={"num_key_value_heads": 2},
        template="mistral_instruct",
        seed=12,
    ),
}
# (height, width): square, wide, tall, and tiny (fewer pixels than one feature cell)
IMAGES = {"square": (40, 40), "wide": (30, 100), "tall": (90, 25), "tiny": (3, 2)}


def quiet(*_args, **_kwargs) -> None:
    pass


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    array[height // 4 : height // 2, width // 4 : width // 2] = (30, 200, 60)
    return Image.fromarray(array)


@dataclass
class Exported:
    name: str
    checkpoint: Path
    model_dir: Path
    model: Any
    processor: Any


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def exported(request, tmp_path_factory) -> Exported:
    from transformers import AutoProcessor

    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.modeling import load_model

    root = tmp_path_factory.mktemp(request.param)
    checkpoint = make_source(root / "checkpoint", MODELS[request.param])
    (checkpoint / "llava_edge.json").unlink()  # as llava-hf's: the template is its chat template
    model_dir = root / "model"
    # The Llama model goes through export's own verification against transformers too.
    export_checkpoint(checkpoint, model_dir, verify=request.param == "llama-vicuna", log=quiet)
    model = load_model(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    return Exported(request.param, checkpoint, model_dir, model, processor)


def _hf_inputs(processor: Any, image: Image.Image) -> dict:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


@pytest.mark.parametrize("shape", list(IMAGES))
def test_greedy_tokens_equal_transformers(exported: Exported, shape: str) -> None:
    image = picture(*IMAGES[shape], seed=len(shape))
    inputs = _hf_inputs(exported.processor, image)
    with torch.no_grad():
        reference = exported.model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )[0, inputs["input_ids"].shape[1] :].tolist()
    with Pipeline.load(exported.model_dir) as pipe:
        answer = pipe.answer(image, QUESTION, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert answer.prompt_token_ids == inputs["input_ids"][0].tolist()  # as many image tokens
    assert answer.token_ids == reference


def test_manifest_holds_the_tiling_and_the_template(exported: Exported) -> None:
    manifest = Manifest.load(exported.model_dir)
    spec = MODELS[exported.name]
    anyres = manifest.image.anyres
    assert anyres is not None and manifest.format_version == 2
    assert anyres.grid_pinpoints == spec.pinpoints and anyres.tile_size == 32
    assert anyres.tile_features**2 == manifest.num_image_tokens == 16
    assert not manifest.image.pad_to_square
    assert manifest.template.name == spec.template  # read off the chat template
    newline = np.load(exported.model_dir / anyres.newline)
    np.testing.assert_array_equal(newline, exported.model.model.image_newline.detach().numpy())
    # A runtime that predates AnyRes (format 1) must never be handed one as format 1.
    data = manifest.to_dict()
    with pytest.raises(LlavaEdgeError, match=r"format_version 1 is older than .* needs \(2\)"):
        Manifest.from_dict({**data, "format_version": 1})


def test_chat_cache_and_limits_take_the_variable_image_tokens(exported: Exported) -> None:
    wide, tall = picture(30, 100), picture(90, 25)
    with Pipeline.load(exported.model_dir) as pipe:
        one = pipe.answer(wide, QUESTION, max_new_tokens=4, ignore_eos=True)
        image_id = pipe.manifest.tokens.image_token_id
        count = one.prompt_token_ids.count(image_id)
        assert count == len(pipe.image_features(wide)) > pipe.manifest.num_image_tokens
        assert pipe.stats == {"vision_runs": 1, "feature_cache_hits": 1}
        assert len(pipe.image_features(tall)) != count  # another size, another count
        chat = pipe.chat(wide, max_new_tokens=4, ignore_eos=True)
        stream = chat.stream(QUESTION)
        list(stream)
        assert stream.answer.token_ids == one.token_ids
        chat.ask("And then?")
    limit = len(one.prompt_token_ids) - 1
    with Pipeline.load(exported.model_dir, limits=Limits(max_prompt_tokens=limit)) as pipe:
        with pytest.raises(LlavaEdgeError, match=f"over this deployment's limit of {limit}"):
            pipe.answer(wide, QUESTION)
        assert pipe.answer(None, QUESTION, max_new_tokens=2).text is not None


def test_batched_requests_and_conversations_take_each_images_token_count(
    exported: Exported,
) -> None:
    """The batch engine (and so the server) renders a prompt before the image is encoded: from
    the image's size alone it must give as many image tokens as the features it gets."""
    images = [picture(*IMAGES[shape], seed=i) for i, shape in enumerate(("wide", "tall"))]
    options = dict(max_new_tokens=6, ignore_eos=True)
    with Pipeline.load(exported.model_dir) as pipe:
        alone = [pipe.answer(image, QUESTION, **options) for image in images]
        together = pipe.generate_batch([(image, QUESTION) for image in images], **options)
        assert [a.token_ids for a in together] == [a.token_ids for a in alone]
        assert [a.prompt_token_ids for a in together] == [a.prompt_token_ids for a in alone]
        pixels = pipe.image_pixels(images[0])
        ids = pipe.conversation_ids([(QUESTION, None)], pixels, image_turn=0)
        assert ids == alone[0].prompt_token_ids


def test_the_server_takes_as_many_images_as_the_context_holds(exported: Exported) -> None:
    """An AnyRes image takes as many tokens as its size gives: the server refused, before
    fetching them, a conversation of more images than fit at the largest size, though smaller
    ones (a robot's wide frames) fit; it refuses only what cannot fit at any size."""
    import base64
    import io
    import time

    from starlette.testclient import TestClient

    from llava_edge.serve import ServeOptions, create_app

    def uri(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    with Pipeline.load(exported.model_dir) as pipe:
        count = pipe.max_images_per_prompt + 1
        images = [picture(*IMAGES["wide"], seed=i) for i in range(count)]
        want = pipe.answer(images, QUESTION, max_new_tokens=4)
    parts = [{"type": "image_url", "image_url": {"url": uri(image)}} for image in images]
    message = {"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}
    body = {"model": "m", "messages": [message], "max_tokens": 4}
    with TestClient(create_app(ServeOptions(exported.model_dir, model_name="m"))) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
        assert reply.json()["choices"][0]["message"]["content"] == want.text
        nowhere = {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}
        crowded = {"role": "user", "content": [nowhere] * (pipe.max_context + 1)}
        refused = client.post("/v1/chat/completions", json={**body, "messages": [crowded]})
        assert refused.status_code == 400 and "holds at most" in refused.json()["error"]["message"]


def test_bench_runs_the_tiles(exported: Exported) -> None:
    """bench's runtime side and its transformers baseline see the same prompt, image tokens
    included."""
    from functools import partial

    from llava_edge.export.baseline import TransformersRunner
    from llava_edge.runtime.bench import Workload, benchmark

    workload = Workload(question_tokens=4, new_tokens=3, runs=1)
    report = benchmark(
        exported.model_dir, workload, baseline=partial(TransformersRunner, exported.checkpoint)
    )
    ours, theirs = report["llava_edge"], report["transformers"]
    assert ours["prompt_tokens"] > Manifest.load(exported.model_dir).num_image_tokens * 2
    assert ours["prompt_tokens"] == theirs["prompt_tokens"]
    assert ours["vision_ms"] > 0


def test_tensorrt_engines_take_the_tile_batch(exported: Exported, tmp_path, monkeypatch) -> None:
    """Through the TensorRT and CUDA stand-ins: profiles cover base image + tiles of max_batch
    images, and a wide image's tiles reach the same answer as onnxruntime's."""
    import cudart_stub
    import tensorrt_stub

    from llava_edge.runtime.tensorrt import cuda, gpu
    from llava_edge.runtime.tensorrt.backend import TensorRTBackend
    from llava_edge.runtime.tensorrt.build import build_engines
    from llava_edge.runtime.tensorrt.profiles import (
        EngineLimits,
        graph_profiles,
        ort_tensorrt_profiles,
    )

    model = Path(shutil.copytree(exported.model_dir, tmp_path / "model"))
    manifest = Manifest.load(model)
    tiles = max_tiles(manifest.image.anyres)
    assert tiles == {"llama-vicuna": 5, "mistral-gqa": 7}[exported.name]
    (vision,) = graph_profiles(manifest, "vision_encoder", EngineLimits(max_batch=2))
    assert vision.dims["batch"] == (1, tiles, 2 * tiles)
    ort = ort_tensorrt_profiles(manifest, "projector", max_batch=2)
    assert ort["trt_profile_max_shapes"] == f"image_features:{2 * tiles}x16x32"
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_stub)
    stub_gpu = gpu.GpuInfo(0, "Stub Orin", "8.7", 8 << 30, 6 << 30, True, "12.6")
    monkeypatch.setattr(gpu, "probe_gpu", lambda index=0: stub_gpu)
    monkeypatch.setattr(cuda, "import_cudart", lambda: cudart_stub)
    cudart_stub.reset()
    build_engines(model, log=quiet)
    reference = Pipeline.load(model)
    trt = Pipeline(model, reference.manifest, TensorRTBackend(model, Manifest.load(model)))
    image = picture(30, 100)
    expected = reference.answer(image, QUESTION, max_new_tokens=8, ignore_eos=True)
    got = trt.answer(image, QUESTION, max_new_tokens=8, ignore_eos=True)
    assert got.token_ids == expected.token_ids
    reference.close()
    trt.close()


# ---- preprocessing and packing, against transformers ----------------------------------------


SIZES = [(40, 40), (30, 100), (90, 25), (3, 2), (1, 1), (1, 120), (77, 33), (200, 150), (64, 64)]


@pytest.mark.parametrize("pinpoints", list(PINPOINTS))
@pytest.mark.parametrize("size_style", ["shortest_edge", "height_width"])
def test_tiles_equal_llava_next_image_processor(pinpoints: str, size_style: str) -> None:
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextImageProcessor

    from llava_edge.export.exporter import _image_spec

    if size_style == "shortest_edge":
        settings = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        # (its tiles still take crop_size's height, as LlavaNextImageProcessor's do)
        settings = dict(
            size={"height": 32, "width": 32},
            crop_size={"height": 32, "width": 32},
            do_center_crop=False,
        )
    processor = LlavaNextImageProcessor(**settings, image_grid_pinpoints=PINPOINTS[pinpoints])
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8),
        image_grid_pinpoints=PINPOINTS[pinpoints],
    )
    spec = _image_spec(processor, config)
    for i, (height, width) in enumerate(SIZES):
        image = picture(height, width, seed=i)
        ours = pixel_batch(image, spec)
        theirs = processor(images=image, return_tensors="np")
        np.testing.assert_array_equal(theirs["image_sizes"][0], [height, width])
        assert ours.shape == theirs["pixel_values"][0].shape, (height, width)
        np.testing.assert_allclose(ours, theirs["pixel_values"][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pinpoints", list(PINPOINTS))
def test_packing_equals_pack_image_features(pinpoints: str) -> None:
    """Base + unpadded grid + image_newline, as LlavaNextModel arranges them; and as many
    features as LlavaNextProcessor puts image tokens in the prompt."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextImageProcessor
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    from llava_edge.export.exporter import _image_spec

    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8),
        image_grid_pinpoints=PINPOINTS[pinpoints],
    )
    processor = LlavaNextImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=PINPOINTS[pinpoints],
    )
    spec = _image_spec(processor, config)
    counter = LlavaNextProcessor(
        image_processor=processor,
        tokenizer=hf_tokenizer(original_tokenizer(Source()), "<unk>"),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    rng = np.random.default_rng(0)
    newline = rng.standard_normal(6).astype(np.float32)
    for height, width in SIZES:
        tiles = len(pixel_batch(picture(height, width), spec))
        features = rng.standard_normal((tiles, 16, 6)).astype(np.float32)
        ours = image_embeds(features, (width, height), spec, newline)
        (theirs,), _ = LlavaNextModel.pack_image_features(
            SimpleNamespace(config=config),
            [torch.from_numpy(features)],
            torch.tensor([[height, width]]),
            "default",
            torch.from_numpy(newline),
        )
        np.testing.assert_array_equal(ours, theirs.numpy())
        count = counter._get_number_of_features(height, width, 32, 32) - 1
        assert len(ours) == count, (height, width)
        assert feature_count((width, height), spec, num_image_tokens=0) == count, (height, width)


def test_quantized_copy_keeps_the_anyres_files(exported: Exported, tmp_path) -> None:
    from llava_edge.calib.quantize import quantize_model

    out = tmp_path / "fp16"
    quantize_model(exported.model_dir, out, precision="fp16", log=quiet)
    with Pipeline.load(out) as pipe:
        answer = pipe.answer(picture(30, 100), QUESTION, max_new_tokens=4, ignore_eos=True)
    assert answer.prompt_token_ids.count(pipe.manifest.tokens.image_token_id) > 16
    assert (out / Manifest.load(out).image.anyres.newline).is_file()
    # The quality report runs the copy against the original on AnyRes prompts too.
    from llava_edge.calib.data import Sample
    from llava_edge.calib.report import greedy_agreement

    image = tmp_path / "wide.png"
    picture(30, 100).save(image)
    agreement = greedy_agreement(exported.model_dir, out, [Sample(image, QUESTION)], tokens=4)
    assert agreement["teacher_forced_top1"] >= 0.75, agreement


def test_pinpoints_that_are_not_whole_tiles_are_refused_before_loading(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A grid the tiles do not fill exported, then failed at the first image."""
    import json

    from llava_edge.cli import main

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(exported.checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["image_grid_pinpoints"] = [[32, 64], [48, 64]]
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert main(["export", str(checkpoint), str(tmp_path / "model"), "--no-verify"]) == 1
    err = capsys.readouterr().err
    assert "image_grid_pinpoints [48, 64] is not a whole number of 32 px tiles" in err
    assert not (tmp_path / "model").exists()


def test_watch_skips_a_frame_too_large_for_the_limit_and_answers_the_others(
    exported: Exported, tmp_path: Path
) -> None:
    """An AnyRes frame's tokens grow with its size: a limit that holds a small frame's prompt
    but not a large one's answers the small frames and reports the large one, as it reports an
    unreadable frame; it does not refuse the whole watch for the largest size a frame could
    have."""
    small, large = picture(30, 40), picture(120, 100)
    for i, frame in enumerate([small, large, small]):
        frame.save(tmp_path / f"{i}.png")
    with Pipeline.load(exported.model_dir) as pipe:
        fits = len(pipe.answer(small, QUESTION, max_new_tokens=1).prompt_token_ids)
        assert len(pipe.answer(large, QUESTION, max_new_tokens=1).prompt_token_ids) > fits
    with Pipeline.load(exported.model_dir, limits=Limits(max_prompt_tokens=fits)) as pipe:
        watched = pipe.watch(tmp_path, QUESTION, every_s=0.0)
        answers = list(watched)
    assert [a.index for a in answers] == [0, 1, 2]
    assert answers[0].error is None and answers[2].error is None
    assert answers[1].error.startswith("frame 1 did not fit: the prompt is")


def test_a_prompt_too_long_for_its_image_says_a_smaller_image_takes_fewer(
    exported: Exported, tiny_model_dir: Path
) -> None:
    """An AnyRes image's tokens grow with its size: a refusal says how many its images take,
    where "shorten it" alone would send the user to shorten a question of a few words. A model
    whose images take a fixed count says nothing of them."""
    from llava_edge.errors import PromptTooLong

    large = picture(120, 100)
    hint = r"\((\d+) of them its images': a smaller image takes fewer\)"
    with Pipeline.load(exported.model_dir) as pipe:
        ids = pipe.answer(large, QUESTION, max_new_tokens=1).prompt_token_ids
        taken = ids.count(pipe.manifest.tokens.image_token_id)
        pipe.backend.max_context = len(ids)  # the context holds the prompt, not an answer
        with pytest.raises(PromptTooLong, match=f"the prompt is {len(ids)} tokens {hint}") as e:
            pipe.answer(large, QUESTION)
        assert f"({taken} of them" in str(e.value)
    with Pipeline.load(exported.model_dir, limits=Limits(max_prompt_tokens=len(ids) - 1)) as pipe:
        for ask in (
            lambda: pipe.answer(large, QUESTION),
            lambda: pipe.generate_batch([(large, QUESTION)]),
            lambda: pipe.chat(large).ask(QUESTION),
        ):
            with pytest.raises(LlavaEdgeError, match=f"{len(ids)} tokens {hint}, over"):
                ask()
    with Pipeline.load(tiny_model_dir, limits=Limits(max_prompt_tokens=5)) as pipe:
        with pytest.raises(PromptTooLong) as e:
            pipe.answer(large, QUESTION)
        assert "of them" not in str(e.value)
