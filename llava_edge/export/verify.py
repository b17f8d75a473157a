"""Check an exported model dir against transformers on the same weights.

The runtime (onnxruntime on the CPU) and LlavaForConditionalGeneration see the same image and
prompt; compared are the prompt ids, pixel values, vision features, prefill logits and 32 greedy
tokens, which must be identical in fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Pipeline
from llava_edge.runtime.anyres import image_embeds, pixel_batch
from llava_edge.runtime.generate import embed
from llava_edge.runtime.template import user_turn

QUESTION = "What is shown in this image?"
NEW_TOKENS = 32
# fp32 graphs differ from PyTorch only in summation order: max |diff| / max |reference|.
FP32_REL_TOLERANCE = 1e-4


class VerificationError(LlavaEdgeError):
    """The exported graphs disagree with transformers."""


def sample_image(size: int = 320) -> Image.Image:
    """A picture with colour, edges and shapes, wider than tall to exercise resize and crop."""
    y, x = np.mgrid[0:size, 0 : size * 5 // 4]
    array = np.stack([x * 255 // x.max(), y * 255 // y.max(), (x + y) * 255 // (x + y).max()], -1)
    image = Image.fromarray(array.astype(np.uint8))
    pen = ImageDraw.Draw(image)
    pen.ellipse((size // 5, size // 5, size // 2, size // 2), fill=(220, 40, 40))
    pen.rectangle((size * 3 // 5, size // 2, size, size * 4 // 5), fill=(40, 80, 220))
    return image


def verify_model_dir(loaded: Any, model_dir: Path, log: Any = print) -> dict[str, Any]:
    """Compare; log a short report; raise VerificationError on a mismatch."""
    import torch

    model, processor = loaded.model, loaded.processor
    image = sample_image()
    with Pipeline.load(model_dir) as pipe:
        manifest = pipe.manifest
        prompt = user_turn(manifest.template, QUESTION, image=True, first=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        hf_ids = inputs["input_ids"][0].tolist()
        pixels = pixel_batch(image, manifest.image)
        # One image: [1, 3, H, W], or LLaVA-NeXT's [1, tiles, 3, H, W] -> [tiles, 3, H, W]
        ref_pixels = inputs["pixel_values"].reshape(-1, *pixels.shape[1:])
        # Feed transformers' pixels to both sides from here on, so each check tests one thing.
        hf_pixels = ref_pixels.numpy().astype(
            manifest.graphs["vision_encoder"].inputs["pixel_values"].dtype
        )
        features = pipe.backend.sessions["vision_encoder"].run(None, {"pixel_values": hf_pixels})[0]
        with torch.no_grad():
            ref_features = _reference_features(model, ref_pixels)
            ref_logits = model(**inputs).logits[0, -1].float().numpy()
            ref_tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[
                0, len(hf_ids) :
            ].tolist()
        cache = pipe.backend.new_cache(1)
        ids = np.asarray([hf_ids])
        projected = image_embeds(
            pipe.backend.encode_image(hf_pixels), image.size, manifest.image, pipe.newline
        )
        ours_ids = pipe.codec.encode(prompt, image_tokens=len(projected))
        embeds = embed(pipe.table, ids, manifest.tokens.image_token_id, [projected])
        logits = pipe.backend.decode(
            embeds, np.ones_like(ids), np.arange(ids.shape[1])[None], cache
        )[0]
        answer = pipe.answer(image, QUESTION, max_new_tokens=NEW_TOKENS)
        ref_pixels = ref_pixels.numpy()
    fp32 = manifest.text.dtype == "float32"
    matched = _common_prefix(answer.token_ids, ref_tokens)
    report = {
        "prompt_ids_equal": ours_ids == hf_ids,
        "pixel_max_abs_diff": (
            float(np.abs(pixels - ref_pixels).max())
            if pixels.shape == ref_pixels.shape
            else float("inf")  # another number of AnyRes tiles
        ),
        "vision_max_abs_diff": float(np.abs(features.astype(np.float32) - ref_features).max()),
        "vision_rel_diff": _relative(features, ref_features),
        "prefill_logits_max_abs_diff": float(np.abs(logits - ref_logits).max()),
        "prefill_logits_rel_diff": _relative(logits, ref_logits),
        "prefill_logits_cosine": _cosine(logits, ref_logits),
        "greedy_tokens_matched": matched,
        "greedy_tokens_total": len(ref_tokens),
    }
    report["passed"] = _passed(report, fp32, answer.token_ids, ref_tokens)
    log(_format(report))
    if not report["passed"]:
        raise VerificationError(
            "verification failed: the exported graphs do not reproduce transformers "
            f"({'; '.join(_failures(report, fp32))}); the output was not written"
        )
    return report


def _reference_features(model: Any, pixel_values: Any) -> np.ndarray:
    """What LlavaModel feeds its projector: the selected layer(s), CLS dropped for 'default',
    for each image of the batch (LLaVA-NeXT: the base image and each tile)."""
    config = model.config
    hidden = model.model.vision_tower(pixel_values.float(), output_hidden_states=True).hidden_states
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else layers
    drop = config.vision_feature_select_strategy == "default"
    selected = [hidden[i][:, 1:] if drop else hidden[i] for i in layers]
    return np.concatenate([s.numpy() for s in selected], axis=-1)


def _passed(report: dict, fp32: bool, ours: list[int], ref: list[int]) -> bool:
    return not _failures(report, fp32) and (ours == ref or not fp32)


def _failures(report: dict, fp32: bool) -> list[str]:
    failures = []
    if not report["prompt_ids_equal"]:
        failures.append("prompt token ids differ")
    if report["pixel_max_abs_diff"] > 1e-4:
        failures.append(f"pixel values differ by {report['pixel_max_abs_diff']:.2g}")
    if fp32:
        # Tokens alone are a weak test on random weights (argmax often survives a wrong graph,
        # e.g. GQA heads paired with the wrong KV head): the numbers must agree too.
        for key, what in (
            ("vision_rel_diff", "vision features"),
            ("prefill_logits_rel_diff", "prefill logits"),
        ):
            if report[key] > FP32_REL_TOLERANCE:
                failures.append(f"{what} differ by {report[key]:.2g} of their range")
        if report["greedy_tokens_matched"] != report["greedy_tokens_total"]:
            failures.append(
                f"greedy tokens diverge after {report['greedy_tokens_matched']} of {report['greedy_tokens_total']}"
            )
    elif report["prefill_logits_cosine"] < 0.99:
        failures.append(f"fp16 prefill logits cosine {report['prefill_logits_cosine']:.4f} < 0.99")
    return failures


def _format(report: dict) -> str:
    status = "PASSED" if report["passed"] else "FAILED"
    return (
        f"verify vs transformers: {status}\n"
        f"  prompt ids equal       {report['prompt_ids_equal']}\n"
        f"  pixel values           max |diff| {report['pixel_max_abs_diff']:.2e}\n"
        f"  vision features        max |diff| {report['vision_max_abs_diff']:.2e}\n"
        f"  prefill logits         max |diff| {report['prefill_logits_max_abs_diff']:.2e}, "
        f"cosine {report['prefill_logits_cosine']:.6f}\n"
        f"  greedy tokens          {report['greedy_tokens_matched']}/{report['greedy_tokens_total']} identical"
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _relative(ours: np.ndarray, reference: np.ndarray) -> float:
    ours, reference = ours.astype(np.float64), reference.astype(np.float64)
    return float(np.abs(ours - reference).max() / (np.abs(reference).max() + 1e-30))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
