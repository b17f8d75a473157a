"""Tiny stand-ins for published Hugging Face LLaVA checkpoints, for tests.

Each is the checkpoint's config.json as published with its dims shrunk, a tokenizer of the same
kind (byte-level BPE with Qwen's special tokens for a Qwen2 text model), the processor's settings
and chat template as published, and seeded random weights. Weights transformers initialises to
constants (biases at zero, norms at one) are drawn at random too, so a bias or norm weight put in
the wrong place changes the numbers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

# llava-hf/llava-interleave-qwen-0.5b-hf's config.json (model and processor), dims as published.
INTERLEAVE_QWEN = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "ignore_index": -100,
    "image_token_index": 151646,
    "image_seq_length": 729,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "vocab_size": 152000,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "layer_norm_eps": 1e-6,
        "num_attention_heads": 16,
        "num_hidden_layers": 26,
        "patch_size": 14,
        "vision_use_head": False,
    },
}
# Its processor: SiglipImageProcessor (a 384x384 bicubic resize, no crop, mean and std 0.5).
SIGLIP_PROCESSOR = {
    "do_resize": True,
    "size": {"height": 384, "width": 384},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
# Its prompt format as the model card writes it (`<|im_start|>user <image>\nQ<|im_end|>
# <|im_start|>assistant`): ChatML with a space after the role, images before the text.
INTERLEAVE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant' }}{% endif %}"
)
# llava-hf's OneVision-family template (llava-hf/llava-onevision-qwen2-0.5b-ov-hf): "\n" before
# every question, after its images, and a past answer follows "assistant \n" where a new one
# follows "assistant\n" (TemplateSpec.answered_assistant).
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
IMAGE = "<image>"
VIDEO = "<video>"

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf's config.json: a SigLIP tower at 384 px, Qwen2-0.5B,
# AnyRes on 1 to 6 x 1 to 6 tiles whose features shrink past 9 tiles' (anyres_max_9).
ONEVISION_QWEN = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"],
    "model_type": "llava_onevision",
    "image_token_index": 151646,
    "video_token_index": 151647,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "vision_aspect_ratio": "anyres_max_9",
    "tie_word_embeddings": True,
    "image_grid_pinpoints": [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)],
    "text_config": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "vocab_size": 152000,
    },
    "vision_config": {**INTERLEAVE_QWEN["vision_config"]},
}

# Small enough for a test, shaped like the real ones: GQA, 60 px images in 14 px patches (as 384
# is no multiple of 14), more embedding rows than tokens (as Qwen pads its vocabulary).
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "sliding_window": 1024,
}
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 60,
    "patch_size": 14,
}


def interleave_qwen(**changes: Any) -> dict[str, Any]:
    """llava-interleave-qwen-0.5b-hf's config at tiny dims; `text={...}`, `vision={...}` and
    top-level keys change it further."""
    config = copy.deepcopy(INTERLEAVE_QWEN)
    config["text_config"].update(TINY_TEXT)
    config["text_config"].update(changes.pop("text", {}))
    config["vision_config"].update(TINY_VISION)
    config["vision_config"].update(changes.pop("vision", {}))
    config.update(changes)
    return config


def onevision_qwen(max_patches: int = 2, **changes: Any) -> dict[str, Any]:
    """llava-onevision-qwen2-0.5b-ov-hf's config at the tiny dims of `interleave_qwen` (60 px
    tiles of 4 x 4 features), on 1 to 3 x 1 to 3 tiles whose features shrink past
    `max_patches` tiles' (a 3 x 3 grid's 144 features shrink with the default 2; 1 x 2 tiles'
    32 do not)."""
    config = copy.deepcopy(ONEVISION_QWEN)
    config["text_config"].update(TINY_TEXT)
    config["text_config"].update(changes.pop("text", {}))
    config["vision_config"].update(TINY_VISION)
    config["vision_config"].update(changes.pop("vision", {}))
    tile = config["vision_config"]["image_size"]
    config["image_grid_pinpoints"] = [[tile * h, tile * w] for h in (1, 2, 3) for w in (1, 2, 3)]
    config["vision_aspect_ratio"] = f"anyres_max_{max_patches}"
    config.update(changes)
    return config


def qwen_tokenizer(extra: tuple[str, ...] = ()) -> Any:
    """A byte-level BPE like Qwen2's (no BOS; `<|im_end|>` ends a turn), trained on a few
    sentences, with `<image>` (and `extra`, OneVision's `<video>`) added after the specials as
    llava-hf adds them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (
        "What is shown in this image? What is in the picture? A red circle and a blue box. "
        "Which one is bigger? The box. What colour is the background? user assistant system"
    )
    tokenizer.train_from_iterator([text] * 4, trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (*QWEN_SPECIALS, IMAGE, *extra)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE},
    )


def write_checkpoint(
    out: Path,
    config: dict[str, Any],
    processor: dict[str, Any] | None = None,
    chat_template: str = INTERLEAVE_TEMPLATE,
    seed: int = 0,
) -> Path:
    """A checkpoint dir of `config` (a config.json's dict) with a Qwen-style tokenizer, a SigLIP
    or CLIP image processor (by the vision tower's type) and seeded random weights."""
    from llava_edge.modeling import model_class

    onevision = config["model_type"] == "llava_onevision"
    tokenizer = qwen_tokenizer((VIDEO,) if onevision else ())
    config = copy.deepcopy(config)
    ids = tokenizer.convert_tokens_to_ids
    config["image_token_index"] = ids(IMAGE)
    if onevision:
        config["video_token_index"] = ids(VIDEO)
    text = config["text_config"]
    text.update(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"))
    text["vocab_size"] = len(tokenizer) + 20  # rows past the tokenizer's, as Qwen's 152000
    vision = config["vision_config"]
    config["image_seq_length"] = (vision["image_size"] // vision["patch_size"]) ** 2
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    from transformers import AutoConfig, GenerationConfig

    llava_config = AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    model = model_class(llava_config)(llava_config).eval()
    _randomise_constants(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=text["bos_token_id"],
        eos_token_id=text["eos_token_id"],
        pad_token_id=ids("<|endoftext|>"),
    )
    model.save_pretrained(out, safe_serialization=True)
    _processor(llava_config, tokenizer, processor, chat_template).save_pretrained(out)
    if onevision:  # saved without its video processor (see llava_edge.modeling), named as published
        saved = json.loads((out / "processor_config.json").read_text())
        saved["processor_class"] = "LlavaOnevisionProcessor"
        (out / "processor_config.json").write_text(json.dumps(saved))
    return out


def _processor(
    config: Any, tokenizer: Any, settings: dict[str, Any] | None, chat_template: str
) -> Any:
    from transformers import LlavaNextProcessor, LlavaProcessor

    vision = config.vision_config
    if config.model_type == "llava_onevision":
        return _onevision_processor(config, tokenizer, chat_template)
    if config.model_type == "llava_next":  # LlavaNextImageProcessor: the tower's size, tiled
        from transformers.models.llava_next.image_processing_pil_llava_next import (
            LlavaNextImageProcessorPil,
        )

        size = vision.image_size
        siglip = vision.model_type == "siglip_vision_model"
        image_processor = LlavaNextImageProcessorPil(
            size={"height": size, "width": size} if siglip else {"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_center_crop=not siglip,
            image_grid_pinpoints=config.image_grid_pinpoints,
            **({"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if siglip else {}),
        )
        extra = 0 if siglip else 1  # SigLIP has no CLS token
    elif vision.model_type == "siglip_vision_model":
        from transformers.models.siglip.image_processing_pil_siglip import (
            SiglipImageProcessorPil,
        )

        settings = settings or SIGLIP_PROCESSOR
        settings = {**settings, "size": {"height": vision.image_size, "width": vision.image_size}}
        image_processor = SiglipImageProcessorPil(**settings)
        extra = 0  # no CLS token
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        size = vision.image_size
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        extra = 1
    processor_class = LlavaNextProcessor if config.model_type == "llava_next" else LlavaProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=extra,
        chat_template=chat_template,
    )


def _onevision_processor(config: Any, tokenizer: Any, chat_template: str) -> Any:
    """LlavaOnevisionProcessor as llava-hf's 0.5b-ov-hf saves it: its image processor resizes
    to the tower's size, no crop, SigLIP's mean and std of 0.5 (its video processor needs
    torchvision, which the tests do without); num_image_tokens counts a CLIP tower's CLS token,
    which 'default' drops."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from llava_edge.modeling import OnevisionProcessorWithoutVideo

    vision = config.vision_config
    size = vision.image_size
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    cls_token = int(config.vision_feature_select_strategy == "default")  # counted, then dropped
    return OnevisionProcessorWithoutVideo(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(size // vision.patch_size) ** 2 + cls_token,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=chat_template,
    )


def _randomise_constants(model: Any, seed: int) -> None:
    """Norm weights around one, biases around zero: not the constants transformers starts from."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 1:
                continue
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
