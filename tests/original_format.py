"""Original-format LLaVA checkpoints for tests, made from random Hugging Face models.

`make_source` writes a random LLaVA (or LLaVA-NeXT) checkpoint in Hugging Face's layout shaped as
the Hugging Face conversion leaves one: the original tokenizer (optionally with LLaVA v1's
`<im_start>`/`<im_end>`), then `<image>` and `<pad>`, the vocabulary padded to a multiple of 64,
and the rows the conversion adds scoring the mean logit (as its mean-initialised rows do), so the
original vocabulary holds every token the model can pick. `to_original` is the inverse of the
conversion: it writes that model the way the original LLaVA code saves it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llava_edge.manifest import write_checkpoint_info
from llava_edge.runtime.template import TEMPLATES, hf_chat_template, with_image_markers

TOWER_NAME = "openai/clip-test"  # what the original config names; tests put it on disk or not
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


@dataclass
class Source:
    """How the random source model is shaped."""

    backbone: str = "llama"
    projector: str = "mlp2x_gelu"  # linear, mlpNx_gelu
    im_start_end: bool = False
    select_layer: int = -2
    select_feature: str = "patch"  # or cls_patch
    aspect_ratio: str = "pad"  # pad, square, anyres
    pinpoints: list[list[int]] | None = None  # [height, width] (transformers' order)
    vision: dict[str, Any] = field(default_factory=dict)  # CLIPVisionConfig overrides
    text: dict[str, Any] = field(default_factory=dict)  # text config overrides
    template: str = "vicuna_v1"
    sentencepiece: bool = False  # the original ships tokenizer.model only, as LLaVA's releases do
    llama3: bool = False  # Llama 3's byte-level tokenizer and special tokens (LLaVA-NeXT's fork)
    seed: int = 0


VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
TEXT = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
)


@functools.cache
def sentencepiece_model() -> bytes:
    """A small SentencePiece BPE of Llama's kind: byte fallback, <unk> <s> </s> at 0 1 2, a
    dummy prefix, and text taken as it is (no normalization, spaces kept)."""
    import io

    import sentencepiece

    from llava_edge.training.synth import corpus

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus() * 3),
        model_writer=model,
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


SENTENCEPIECE_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
}


def _sentencepiece_backend() -> Any:
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(sentencepiece_model())
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(SENTENCEPIECE_CONFIG))
        return AutoTokenizer.from_pretrained(tmp).backend_tokenizer


# Llama 3's special tokens in its order (ids 128000-128009 of its vocabulary), after the text's.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(4)),
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
]
# What Meta-Llama-3-8B-Instruct's tokenizer_config.json names (as first released: EOS the base
# model's <|end_of_text|>, so nothing but the chat template's own end stops at <|eot_id|>).
LLAMA3_NAMES = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
SENTENCEPIECE_NAMES = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def llama3_tokenizer_json() -> str:
    """A small byte-level BPE of Llama 3's kind, built with `tokenizers`: no dummy prefix, its
    special tokens after the text's vocabulary, <|begin_of_text|> put before every text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    from llava_edge.training.synth import corpus

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS]
    )
    bos = LLAMA3_SPECIALS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tokenizer.token_to_id(bos))],
    )
    return tokenizer.to_str()


def original_tokenizer(spec: Source) -> Any:
    """The tokenizer an original checkpoint ships: no `<image>`, no `<pad>`."""
    from tokenizers import AddedToken, Tokenizer

    from llava_edge.training.tokenizer import build_tokenizer

    if spec.llama3:
        return Tokenizer.from_str(llama3_tokenizer_json())
    if spec.sentencepiece:
        tokenizer = _sentencepiece_backend()
    else:
        data = json.loads(build_tokenizer(512).to_str())
        data["added_tokens"] = [
            t for t in data["added_tokens"] if t["content"] not in ("<image>", "<pad>")
        ]
        tokenizer = Tokenizer.from_str(json.dumps(data))
    if spec.im_start_end:
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in ("<im_start>", "<im_end>")]
        )
    return tokenizer


def hf_tokenizer(backend: Any, pad: str | None, llama3: bool = False) -> Any:
    from transformers import PreTrainedTokenizerFast

    names = LLAMA3_NAMES if llama3 else SENTENCEPIECE_NAMES
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, **names, pad_token=pad, padding_side="left"
    )


def make_source(out: Path, spec: Source) -> Path:
    """A random Hugging Face LLaVA checkpoint as the conversion of an original one would be."""
    from tokenizers import AddedToken
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaImageProcessor,
        LlavaNextConfig,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
        MistralConfig,
    )

    from llava_edge.modeling import model_class

    backend = original_tokenizer(spec)
    original_vocab = backend.get_vocab_size()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<image>", "<pad>")]
    )
    tokenizer = hf_tokenizer(backend, "<pad>", spec.llama3)
    vision = CLIPVisionConfig(**{**VISION, **spec.vision})
    text_cls = MistralConfig if spec.backbone == "mistral" else LlamaConfig
    text = text_cls(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TEXT, **spec.text},
    )
    strategy = "default" if spec.select_feature == "patch" else "full"
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=spec.select_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    anyres = spec.aspect_ratio == "anyres"
    if anyres:
        config = LlavaNextConfig(**common, image_grid_pinpoints=spec.pinpoints)
    else:
        patches = (vision.image_size // vision.patch_size) ** 2
        config = LlavaConfig(**common, image_seq_length=patches + (strategy == "full"))
    if spec.projector != "mlp2x_gelu":
        config.mm_projector_type = spec.projector
    if spec.im_start_end:
        config.mm_use_im_start_end = True
    torch.manual_seed(spec.seed)
    model = model_class(config)(config).eval()
    with torch.no_grad():  # rows the conversion adds score the mean logit: never picked
        head = model.lm_head.weight
        head[original_vocab:] = head[:original_vocab].mean(0)
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
    )
    size = vision.image_size
    settings = dict(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    template = TEMPLATES[spec.template]
    template = with_image_markers(template) if spec.im_start_end else template
    if anyres:
        image_processor = LlavaNextImageProcessor(**settings, image_grid_pinpoints=spec.pinpoints)
    elif spec.aspect_ratio == "pad":
        image_processor = LlavaImageProcessor(**settings, do_pad=True)
    else:
        image_processor = CLIPImageProcessor(**settings)
    processor = (LlavaNextProcessor if anyres else LlavaProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=hf_chat_template(template),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_checkpoint_info(out, spec.template)
    return out


@dataclass
class Layout:
    """How to_original writes the model."""

    weights: str = "safetensors"  # or "bin"
    shards: int = 1
    vision_weights: bool = False  # the tower inside the checkpoint
    projector_key: bool = True  # write mm_projector_type (LLaVA v1 did not: linear then)
    pinpoints_as_text: bool = False  # image_grid_pinpoints as Python source: "[(336, 672), ...]"


def to_original(source: Path, out: Path, spec: Source, layout: Layout) -> dict[str, Any]:
    """Write `source` as the original LLaVA code saves a model; returns its state dict."""
    from llava_edge.modeling import load_model

    model = load_model(source, dtype=torch.float32)
    vocab = original_tokenizer(spec).get_vocab_size()
    state = original_state(model, spec, vocab, layout.vision_weights)
    out.mkdir(parents=True)
    write_state(out, state, layout)
    (out / "config.json").write_text(json.dumps(original_config(model.config, spec, vocab, layout)))
    save_original_tokenizer(spec, out)
    return state


def save_original_tokenizer(spec: Source, out: Path) -> None:
    """As the original saves it: tokenizers' JSON, or SentencePiece's tokenizer.model alone."""
    if spec.sentencepiece and not spec.im_start_end:
        (out / "tokenizer.model").write_bytes(sentencepiece_model())
        (out / "tokenizer_config.json").write_text(json.dumps(SENTENCEPIECE_CONFIG))
    else:
        pad = None if spec.llama3 else "<unk>"  # Llama 3 has neither
        hf_tokenizer(original_tokenizer(spec), pad, spec.llama3).save_pretrained(out)


def original_state(model: Any, spec: Source, vocab: int, vision: bool) -> dict[str, Any]:
    language = model.model.language_model.state_dict()
    state = {f"model.{k}": v.clone() for k, v in language.items()}
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:vocab].clone()
    state["lm_head.weight"] = model.lm_head.weight[:vocab].detach().clone()
    projector = model.model.multi_modal_projector.state_dict()
    for key, value in projector.items():
        layer, param = key.split(".")
        index = int(layer.split("_")[1]) - 1
        name = param if spec.projector == "linear" else f"{2 * index}.{param}"
        state[f"model.mm_projector.{name}"] = value.clone()
    if vision:
        for key, value in model.model.vision_tower.state_dict().items():
            state[VISION_PREFIX + key] = value.clone()
    if hasattr(model.model, "image_newline"):
        state["model.image_newline"] = model.model.image_newline.detach().clone()
    return state


def original_config(config: Any, spec: Source, vocab: int, layout: Layout) -> dict[str, Any]:
    text = config.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    text.update(vocab_size=vocab, torch_dtype="float32", pad_token_id=0)
    rope = text.pop("rope_parameters", None) or {}
    if rope.get("rope_type", "default") == "default":  # as transformers 4 wrote it
        text["rope_theta"] = rope.get("rope_theta", 10000.0)
    else:
        text["rope_parameters"] = rope
    llava = {
        "architectures": [
            "LlavaMistralForCausalLM" if spec.backbone == "mistral" else "LlavaLlamaForCausalLM"
        ],
        "model_type": "llava_mistral" if spec.backbone == "mistral" else "llava_llama",
        "mm_vision_tower": TOWER_NAME,
        "mm_hidden_size": config.vision_config.hidden_size,
        "mm_vision_select_layer": spec.select_layer,
        "mm_vision_select_feature": spec.select_feature,
        "mm_use_im_start_end": spec.im_start_end,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": spec.aspect_ratio,
        "tokenizer_model_max_length": 2048,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    if layout.projector_key:
        llava["mm_projector_type"] = spec.projector
    if spec.aspect_ratio == "anyres":  # the original lists [width, height]
        pinpoints = [[w, h] for h, w in spec.pinpoints]
        llava["image_grid_pinpoints"] = (
            str([tuple(p) for p in pinpoints]) if layout.pinpoints_as_text else pinpoints
        )
        llava["mm_patch_merge_type"] = "spatial_unpad"
    return {**text, **llava}


def write_state(out: Path, state: dict[str, Any], layout: Layout, stem: str = "model") -> None:
    """Save as one file or shards with an index, in safetensors or pickled .bin files."""
    from safetensors.torch import save_file

    names = sorted(state)
    groups = [names[i :: layout.shards] for i in range(layout.shards)]
    bin_stem = "pytorch_model" if stem == "model" else stem
    weight_map = {}
    for i, group in enumerate(groups, 1):
        if layout.weights == "safetensors":
            name = (
                f"{stem}.safetensors"
                if layout.shards == 1
                else f"{stem}-{i:05d}-of-{layout.shards:05d}.safetensors"
            )
            save_file({k: state[k].contiguous() for k in group}, str(out / name))
        else:
            name = (
                f"{bin_stem}.bin"
                if layout.shards == 1
                else f"{bin_stem}-{i:05d}-of-{layout.shards:05d}.bin"
            )
            torch.save({k: state[k] for k in group}, out / name)
        weight_map.update({k: name for k in group})
    if layout.shards > 1:
        index = (
            f"{stem}.safetensors.index.json"
            if layout.weights == "safetensors"
            else f"{bin_stem}.bin.index.json"
        )
        (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_tower(model: Any, out: Path, full: bool = False) -> Path:
    """The CLIP tower as a Hugging Face CLIPVisionModel dir (what `--vision` takes), or with
    `full` as a whole CLIPModel (a text tower beside it, as openai/clip-* are)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    vision = model.config.vision_config
    if full:
        text = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
        clip = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text))
        clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
        clip.save_pretrained(out)
    else:
        tower = CLIPVisionModel(vision)
        tower.load_state_dict(model.model.vision_tower.state_dict())
        tower.save_pretrained(out)
    size = model.config.vision_config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(out)
    return out
