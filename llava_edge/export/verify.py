"""Check an exported model dir against transformers on the same weights.

The runtime (onnxruntime on the CPU) and LlavaForConditionalGeneration answer the same question
about the same image. The reference side is transformers' own code throughout: its processor
(prompt ids from the checkpoint's own chat template, pixel values), `get_image_features` and
`generate`. Compared are the prompt ids of one question and of a three-turn chat, the pixel
values, the image features, the prefill logits and 32 greedy tokens (fewer where the context holds
fewer after the prompt), which must be identical in fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest
from llava_edge.runtime import Pipeline
from llava_edge.runtime.anyres import image_embeds, pixel_batch
from llava_edge.runtime.generate import embed
from llava_edge.runtime.template import render, user_turn
from llava_edge.runtime.tokenizer import common_prefix

QUESTION = "What is shown in this image?"
CHAT = [
    ("What is in the picture?", "A red circle and a blue box."),
    ("Which one is bigger?", "The box."),
    ("What colour is the background?", None),
]
NEW_TOKENS = 32
# fp32 graphs differ from PyTorch only in summation order: max |diff| / max |reference|.
FP32_REL_TOLERANCE = 1e-4
# generate() takes its defaults from the checkpoint's generation_config.json, some of which change
# which token greedy decoding picks (or search beams instead). The graphs are held to plain
# greedy decoding, the runtime's: these switch them off (its pad id still applies; generate()
# stops at the manifest's end-of-sequence ids, as the runtime does).
PLAIN_GREEDY = dict(
    do_sample=False,
    num_beams=1,
    repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    bad_words_ids=None,
    sequence_bias=None,
    min_length=0,
    min_new_tokens=None,
    forced_bos_token_id=None,
    forced_eos_token_id=None,
    suppress_tokens=None,
    begin_suppress_tokens=None,
    exponential_decay_length_penalty=None,
    guidance_scale=None,
    stop_strings=None,
    max_time=None,
)


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
    """Compare; log a short report; raise VerificationError on a mismatch.

    Every graph form the model dir holds is checked (the standard form TensorRT builds from, and
    onnxruntime's fused forms where export wrote them); the report's figures are the worse form's
    (the one with fewer matching greedy tokens, the standard form on a tie), and `forms` holds
    each form's own.
    """
    manifest = Manifest.load(model_dir)
    forms = ["standard"]
    if any(g.fused for g in manifest.graphs.values()):
        forms.append("fused")
    reports = {}
    for form in forms:
        reports[form] = _verify_form(loaded, model_dir, form)
        log(_format(reports[form], form if len(forms) > 1 else None))
    worst = min(reports.values(), key=lambda r: (r["passed"], r["greedy_tokens_matched"]))
    fp32 = manifest.text.dtype == "float32"
    if not all(r["passed"] for r in reports.values()):
        failures = [
            (f"{form} form: " if len(forms) > 1 else "") + failure
            for form, r in reports.items()
            if not r["passed"]
            for failure in _failures(r, fp32)
            or [f"greedy tokens differ ({r['greedy_divergence']})"]
        ]
        raise VerificationError(
            "verification failed: the exported graphs do not reproduce transformers "
            f"({'; '.join(failures)}); the output was not written"
        )
    return {**worst, "forms": reports}


def _verify_form(loaded: Any, model_dir: Path, form: str) -> dict[str, Any]:
    """One graph form's report against transformers, with a progress bar: on a 7B model each
    side's prefill and 32 tokens take minutes on a CPU."""
    from tqdm import tqdm

    with tqdm(total=3, desc=f"verify {form} form", unit="step", leave=True) as bar:
        return _compare_form(loaded, model_dir, form, bar)


def _compare_form(loaded: Any, model_dir: Path, form: str, bar: Any) -> dict[str, Any]:
    import torch

    from llava_edge.export.chat_template import CheckpointChat

    model, processor = loaded.model, loaded.processor
    image = sample_image()
    chat = CheckpointChat.of(processor)
    bar.set_postfix_str("loading the graphs")
    with Pipeline.load(model_dir, graph_form=form) as pipe:
        manifest = pipe.manifest
        inputs = reference_inputs(processor, manifest.template, image)
        chat_ids = None if chat is None else chat.inputs(CHAT, image)["input_ids"][0].tolist()
        hf_ids = inputs["input_ids"][0].tolist()
        new_tokens = _answer_room(len(hf_ids), manifest.text.max_context, image)
        pixels = pixel_batch(image, manifest.image)
        # One image: [1, 3, H, W], or LLaVA-NeXT's [1, tiles, 3, H, W] -> [tiles, 3, H, W]
        ref_pixels = inputs["pixel_values"].reshape(-1, *pixels.shape[1:])
        # Feed transformers' pixels to both sides from here on, so each check tests one thing.
        hf_pixels = ref_pixels.numpy().astype(
            manifest.graphs["vision_encoder"].inputs["pixel_values"].dtype
        )
        projected = image_embeds(
            pipe.backend.encode_image(hf_pixels), image.size, manifest.image, pipe.newline
        )
        count = len(projected)  # AnyRes: as many image tokens as the image's size gives
        ours_ids = pipe.codec.encode(
            user_turn(manifest.template, QUESTION, image=True, first=True), image_tokens=count
        )
        ours_chat = pipe.codec.encode(
            "".join(t for t, _ in render(manifest.template, CHAT, True)), image_tokens=count
        )
        bar.update()
        bar.set_postfix_str("transformers")
        with torch.no_grad():
            sizes = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
            ref_features = model.get_image_features(pixel_values=inputs["pixel_values"], **sizes)
            ref_features = ref_features.pooler_output[0].float().numpy()
            ref_logits = model(**inputs).logits[0, -1].float().numpy()
            # the runtime stops at generation_config.json's eos ids, else at the tokenizer's
            # eos token, where generate() would run on: both stop at the same ids
            ref_tokens = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                eos_token_id=manifest.tokens.eos_token_ids,
                **PLAIN_GREEDY,
            )[0, len(hf_ids) :].tolist()
        bar.update()
        bar.set_postfix_str("the graphs")
        cache = pipe.backend.new_cache(1)
        ids = np.asarray([hf_ids])
        embeds = embed(pipe.table, ids, manifest.tokens.image_token_id, [projected])
        logits = pipe.backend.decode(
            embeds, np.ones_like(ids), np.arange(ids.shape[1])[None], cache
        )[0]
        answer = pipe.answer(image, QUESTION, max_new_tokens=new_tokens)
        ref_pixels = ref_pixels.numpy()
        bar.update()
    fp32 = manifest.text.dtype == "float32"
    matched = common_prefix(answer.token_ids, ref_tokens)
    projected = projected.astype(np.float32)
    report = {
        "template": manifest.template.name,
        "template_source": "the checkpoint's chat template" if chat else "llava-edge's default",
        "prompt_ids_equal": ours_ids == hf_ids,
        "chat_ids_equal": None if chat_ids is None else ours_chat == chat_ids,
        "pixel_max_abs_diff": (
            float(np.abs(pixels - ref_pixels).max())
            if pixels.shape == ref_pixels.shape
            else float("inf")  # another number of AnyRes tiles
        ),
        "image_features_max_abs_diff": float(np.abs(projected - ref_features).max()),
        "image_features_rel_diff": _relative(projected, ref_features),
        "prefill_logits_max_abs_diff": float(np.abs(logits - ref_logits).max()),
        "prefill_logits_rel_diff": _relative(logits, ref_logits),
        "prefill_logits_cosine": _cosine(logits, ref_logits),
        "greedy_tokens_matched": matched,
        "greedy_tokens_total": len(ref_tokens),
        "greedy_divergence": _divergence(answer.token_ids, ref_tokens, processor.tokenizer),
    }
    report["passed"] = _passed(report, fp32, answer.token_ids, ref_tokens)
    return report


def reference_inputs(processor: Any, template: Any, image: Image.Image) -> Any:
    """transformers' inputs of the verification's question about `image`: the prompt as the
    checkpoint's users build it, by its own chat template; without one, by `template`
    (llava-edge's default, all there is to follow)."""
    from llava_edge.export.chat_template import CheckpointChat

    chat = CheckpointChat.of(processor)
    if chat is not None:
        return chat.inputs([(QUESTION, None)], image)
    prompt = user_turn(template, QUESTION, image=True, first=True)
    return processor(images=image, text=prompt, return_tensors="pt")


def check_answer_room(loaded: Any, max_context: int) -> None:
    """Refuse, before any graph is written, a context the verification's prompt fills."""
    image = sample_image()
    prompt = reference_inputs(loaded.processor, loaded.template, image)["input_ids"].shape[1]
    _answer_room(int(prompt), max_context, image)


def _answer_room(prompt: int, context: int, image: Image.Image) -> int:
    """The greedy tokens to compare: NEW_TOKENS, or as many as the context holds after the
    prompt (a short --max-context, or a chat template with a long system prompt)."""
    room = min(NEW_TOKENS, context - prompt)
    if room < 1:
        raise LlavaEdgeError(
            f"the verification's prompt (a {image.width}x{image.height} image, the chat "
            f"template and a question) takes {prompt} tokens, which leaves no room for an answer "
            f"in the exported context of {context}; export with a longer --max-context where "
            "the model's own context allows one, or without verification (--no-verify)"
        )
    return room


def _passed(report: dict, fp32: bool, ours: list[int], ref: list[int]) -> bool:
    return not _failures(report, fp32) and (ours == ref or not fp32)


def _failures(report: dict, fp32: bool) -> list[str]:
    failures = []
    if not report["prompt_ids_equal"]:
        failures.append("prompt token ids differ from the checkpoint's chat template")
    if report["chat_ids_equal"] is False:
        failures.append("a three-turn chat's token ids differ from the checkpoint's chat template")
    if report["pixel_max_abs_diff"] > 1e-4:
        failures.append(f"pixel values differ by {report['pixel_max_abs_diff']:.2g}")
    if fp32:
        # Tokens alone are a weak test on random weights (argmax often survives a wrong graph,
        # e.g. GQA heads paired with the wrong KV head): the numbers must agree too.
        for key, what in (
            ("image_features_rel_diff", "image features"),
            ("prefill_logits_rel_diff", "prefill logits"),
        ):
            if report[key] > FP32_REL_TOLERANCE:
                failures.append(f"{what} differ by {report[key]:.2g} of their range")
        if report["greedy_tokens_matched"] != report["greedy_tokens_total"]:
            failures.append(
                f"greedy tokens diverge after {report['greedy_tokens_matched']} of "
                f"{report['greedy_tokens_total']} ({report['greedy_divergence']})"
            )
    elif report["prefill_logits_cosine"] < 0.99:
        failures.append(f"fp16 prefill logits cosine {report['prefill_logits_cosine']:.4f} < 0.99")
    return failures


def _divergence(ours: list[int], reference: list[int], tokenizer: Any) -> str | None:
    """The first greedy step at which the graphs' tokens and transformers' differ, both tokens
    as id and text (None where they are the same)."""
    if ours == reference:
        return None
    step = common_prefix(ours, reference)

    def token(ids: list[int]) -> str:
        if step >= len(ids):
            return "the end of the answer"
        return f"{ids[step]} {tokenizer.decode([ids[step]], skip_special_tokens=False)!r}"

    return f"token {step + 1}: ours {token(ours)}, transformers {token(reference)}"


def _format(report: dict, form: str | None = None) -> str:
    status = "PASSED" if report["passed"] else "FAILED"
    return (
        f"verify vs transformers{f' ({form} form)' if form else ''}: {status}\n"
        f"  template               {report['template']} (from {report['template_source']})\n"
        f"  prompt ids equal       {report['prompt_ids_equal']}\n"
        f"  chat ids equal         {report['chat_ids_equal']}\n"
        f"  pixel values           max |diff| {report['pixel_max_abs_diff']:.2e}\n"
        f"  image features         max |diff| {report['image_features_max_abs_diff']:.2e}\n"
        f"  prefill logits         max |diff| {report['prefill_logits_max_abs_diff']:.2e}, "
        f"cosine {report['prefill_logits_cosine']:.6f}\n"
        f"  greedy tokens          {report['greedy_tokens_matched']}/{report['greedy_tokens_total']} identical"
    )


def _relative(ours: np.ndarray, reference: np.ndarray) -> float:
    ours, reference = ours.astype(np.float64), reference.astype(np.float64)
    return float(np.abs(ours - reference).max() / (np.abs(reference).max() + 1e-30))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
