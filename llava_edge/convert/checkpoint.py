"""`llava-edge convert`: an original-format LLaVA checkpoint -> an ordinary checkpoint dir.

The result is what transformers' LLaVA port holds (LlavaForConditionalGeneration, or
LlavaNextForConditionalGeneration for AnyRes checkpoints), as its conversion script makes it: the
tokenizer gains `<image>` and `<pad>`, embeddings grow to a multiple of 64 with new rows drawn
around the mean of the old ones (transformers' `resize_token_embeddings`), the processor pads to a
square where the original padded, and `llava_edge.json` names the conversation template the
original was trained with. Projectors transformers has no class for (LLaVA v1's linear one) and
v1's `<im_start>`/`<im_end>` markers are kept as the original's config keys `mm_projector_type`
and `mm_use_im_start_end`, which llava_edge.modeling and export read. `llava-edge export` then
takes the dir like any other; it never sees the original format.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from llava_edge import logs
from llava_edge.convert.original import (
    TOKENIZER_FILES,
    VISION_PREFIX,
    Original,
    adapter_base_name,
    checkpoint_kind,
    read_config,
    read_original,
    read_settings,
    strip_peft_prefix,
    text_config_dict,
)
from llava_edge.convert.vision import (
    Tower,
    check_tower,
    clip_config,
    config_in_weights,
    find_vision_dir,
    load_tower,
    missing_tower,
    unreadable_config,
)
from llava_edge.convert.weights import read_weights, refuse_lfs_pointer, weight_names
from llava_edge.errors import LlavaEdgeError, first_line
from llava_edge.files import check_output_dir, replace_dir
from llava_edge.manifest import write_checkpoint_info
from llava_edge.runtime.template import (
    IMAGE_END,
    IMAGE_PLACEHOLDER,
    IMAGE_START,
    TEMPLATES,
    hf_chat_template,
    with_image_markers,
)

# The special tokens Llama 3's chat format is written in. Every Llama 3 tokenizer has them (base
# and Instruct, 3 to 3.2): they tell its language model by what its prompts are made of, where
# rope_theta or the vocabulary size are numbers another model may share or a fine-tune change.
LLAMA_3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
IMAGE_PATCH = "<im_patch>"  # the original adds it to the tokenizer; no prompt uses it
PAD = "<pad>"
VOCAB_MULTIPLE = 64  # the Hugging Face LLaVA port pads its vocabulary to a multiple of 64


def convert_checkpoint(
    original: str | os.PathLike,
    out_dir: str | os.PathLike,
    vision: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    template: str | None = None,
    force: bool = False,
    log: Any = print,
) -> Path:
    """Convert `original` into `out_dir`.

    vision: the CLIP checkpoint dir the original names in `mm_vision_tower` (default: a local
    dir of that name). base: the language model a LoRA or stage-1 output was trained on.
    template: the conversation template, when the one read off the checkpoint is not it.
    """
    import torch
    from transformers import CLIPVisionModel

    source, out = Path(original), Path(out_dir)
    inputs = {
        "the original checkpoint": source,
        "the --base model": base,
        "the --vision tower": vision,
    }
    for name, path in inputs.items():  # --force replaces the output, never an input
        if path is not None:
            check_output_dir(out, force, keep=Path(path), keep_name=name)
    if template is not None and template not in TEMPLATES:
        raise LlavaEdgeError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    with logs.quiet_loading("huggingface_hub"):  # a conversion prints its own one line
        _check_tower_at_hand(source, base, vision, out, force)
        parts = read_original(source, Path(base) if base is not None else None)
        settings = parts.settings
        _projector_weights(parts)  # a mismatch is one line before the models are built
        if parts.kind == "lora":
            _note_adapter_base(source, Path(base), log)
        if parts.kind != "full" and parts.config.get("quantization_config"):
            log(
                f"note: {source} was trained over its language model quantized by bitsandbytes "
                f"(QLoRA: quantization_config in its config.json); what it trained is merged into "
                f"--base {base} in full precision, as QLoRA merges are, so its answers can differ "
                "slightly from the quantized model's"
            )
        vision_dir = find_vision_dir(
            settings.vision_tower, source, Path(vision) if vision is not None else None
        )
        tower = load_tower(settings.vision_tower, vision_dir, parts.vision, log)
        check_tower(tower, settings.vision_tower, settings.vision_width)
        _check_tower_settings(parts, tower)
        dtype = _dtype(parts.text)
        tokenizer = _tokenizer(parts)
        language_model = _language_model(parts, dtype)
        parts.text.clear()  # loaded: no second copy of the weights held from here on
        clip = _load(CLIPVisionModel, tower.config, tower.weights, dtype, "vision tower")
        tower.weights.clear()
        config = _llava_config(parts, tower, language_model.config, tokenizer)
        model = _llava_model(config, language_model, clip, parts, dtype)
        del language_model, clip
        _fit_vocabulary(model, tokenizer, torch)
        model.config.text_config.pad_token_id = tokenizer.pad_token_id
        name = template or infer_template(parts, tokenizer)
        spec = with_image_markers(TEMPLATES[name]) if settings.im_start_end else TEMPLATES[name]
        model.generation_config = _generation_config(tokenizer, spec.answer_end)
        processor = _processor(parts, tower, config, tokenizer, hf_chat_template(spec))
        with replace_dir(out) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            write_checkpoint_info(tmp, name)
    kind = {"full": "checkpoint", "lora": "LoRA output, merged", "stage1": "stage-1 projector"}
    log(
        f"converted {source} ({settings.text_model}, {kind[parts.kind]}, {settings.projector} "
        f"projector{', AnyRes' if settings.anyres else ''}; vision tower from {tower.source}) "
        f"-> {out} ({type(model).__name__}, template {name})"
    )
    return out


def _check_tower_at_hand(source: Path, base: Any, vision: Any, out: Path, force: bool) -> None:
    """A tower dir that is not the one the original was trained with, or a checkpoint with no
    tower in its weights and none on disk, fails before the weights are read (gigabytes); so
    does an output that is the tower dir found by name (--force never replaces an input)."""
    if not (source / "config.json").is_file():
        return  # read_original says what is wrong
    settings = read_settings(read_config(source), source)
    name = settings.vision_tower
    directory = find_vision_dir(name, source, Path(vision) if vision is not None else None)
    if directory is not None:
        if vision is None:
            check_output_dir(out, force, keep=directory, keep_name="the vision tower")
        check_tower(
            Tower(clip_config(directory), {}, None, str(directory)), name, settings.vision_width
        )
        return
    if not config_in_weights(name):
        raise unreadable_config(name)
    # Where their names say it: a full checkpoint's own, or a stage-1 output's --base (its
    # projector file never holds a tower), or a LoRA output's --base and the names in its
    # non_lora_trainables.bin (a small file, and mapped, not read, by torch.load).
    kind = checkpoint_kind(source)
    names = weight_names(source if kind == "full" or base is None else Path(base))
    extra = source / "non_lora_trainables.bin"
    if names is not None and kind == "lora" and extra.is_file():
        names |= set(strip_peft_prefix(read_weights(extra)))
    if names is not None and not any(n.startswith(VISION_PREFIX) for n in names):
        raise missing_tower(name)


def _note_adapter_base(source: Path, base: Path, log: Any) -> None:
    """Adapters merged into another model of the same shape run and answer wrong, and nothing in
    the weights tells; names are all there is, and a local copy may be named anything: a note,
    not a refusal, where --base's name is not the one adapter_config.json was trained on."""
    named = adapter_base_name(source)
    if named is None:
        return
    ours = {Path(os.path.abspath(base)).name}
    with contextlib.suppress(LlavaEdgeError, AttributeError):
        ours.add(Path(str(read_config(base).get("_name_or_path") or "")).name)
    if Path(named.rstrip("/")).name not in ours:
        log(
            f"note: {source}/adapter_config.json was trained on {named}; merged into --base "
            f"{base}, which must be that model (another of its shape converts and answers wrong)"
        )


def infer_template(parts: Original, tokenizer: Any) -> str:
    """The template the original's own scripts use for such a model (llava/eval, scripts/)."""
    if parts.kind == "stage1":
        return "plain"
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab:
        return "chatml_direct"  # LLaVA-1.6 Yi-34B
    if all(token in vocab for token in LLAMA_3_TOKENS):
        return "llava_llama_3"  # LLaVA-NeXT's Llama 3 checkpoints
    if parts.settings.text_model == "mistral":
        return "mistral_instruct"
    if _named_llama_2(parts.directory):
        return "llava_llama_2"
    return "llava_v1" if parts.settings.anyres else "vicuna_v1"


def _named_llama_2(directory: Path) -> bool:
    """Whether the checkpoint is named as a Llama-2-chat LLaVA ("llava-llama-2-13b-chat-..."),
    which is how the original's scripts choose its conv_llava_llama_2: nothing in its weights or
    config tells it from LLaVA-1.5, whose Vicuna v1.5 is a Llama 2 too. A trainer checkpoint
    ("checkpoint-5000") goes by its run's dir, as the original names it."""
    path = Path(os.path.abspath(directory))
    names = [path.name, path.parent.name] if path.name.startswith("checkpoint-") else [path.name]
    return any("llama-2" in name.lower() for name in names)


# ---- the parts ---------------------------------------------------------------------------------


def _dtype(state: dict[str, Any]) -> Any:
    """The dtype the language model's weights were saved in; everything is converted in it."""
    found = next((v.dtype for v in state.values() if v.is_floating_point()), None)
    if found is None:
        raise LlavaEdgeError(
            "the language model's weights hold no floating-point tensor (a quantized save?); "
            "convert takes full-precision ones (fp32, fp16 or bf16)"
        )
    return found


def _tokenizer(parts: Original) -> Any:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    directory = parts.tokenizer_dir
    slow_only = not (directory / "tokenizer.json").is_file()
    if slow_only and (directory / "tokenizer.model").is_file() and not _has("sentencepiece"):
        raise LlavaEdgeError(
            f"the tokenizer in {parts.tokenizer_dir} is SentencePiece's (tokenizer.model): "
            "pip install 'llava-edge[convert]' (sentencepiece)"
        )
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            refuse_lfs_pointer(directory / name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **_as_the_original_read_it(directory))
    except Exception as e:  # a damaged file fails anywhere in transformers (KeyError...)
        raise LlavaEdgeError(f"cannot load the tokenizer in {directory}: {first_line(e)}") from None

    def add(*tokens: str) -> None:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True
        )

    settings = parts.settings
    # What the original's model builder adds before it runs the model, in its order.
    if settings.im_patch_token:
        add(IMAGE_PATCH)
    if settings.im_start_end:
        add(IMAGE_START, IMAGE_END)
        rows = _rows(parts)
        for token in (IMAGE_START, IMAGE_END):
            if tokenizer.convert_tokens_to_ids(token) >= rows:
                raise LlavaEdgeError(
                    f"{parts.directory} uses {IMAGE_START}/{IMAGE_END} (mm_use_im_start_end) but "
                    f"its embeddings have no trained row for {token}: the checkpoint is incomplete"
                )
    _drop_rows_past(parts, len(tokenizer))
    # What the Hugging Face port adds: the image placeholder, and a padding token.
    add(IMAGE_PLACEHOLDER)
    if PAD not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": PAD})
    else:
        tokenizer.pad_token = PAD
    if settings.max_length:
        tokenizer.model_max_length = settings.max_length
    return tokenizer


def _drop_rows_past(parts: Original, vocab: int) -> None:
    """The original's loader resizes the embeddings to its tokenizer (resize_token_embeddings(
    len(tokenizer))): rows past it (a base padded to a multiple) are never scored there; kept,
    one could be the greedy pick, an id with no token."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weight = parts.text.get(key)
        if weight is not None and weight.shape[0] > vocab:
            parts.text[key] = weight[:vocab]


def _as_the_original_read_it(directory: Path) -> dict[str, Any]:
    """How the transformers the original ran with (4.x) read a Llama tokenizer_config.json
    without `legacy`: as legacy=True, SentencePiece's dummy prefix before every run of text
    (the one after an image or `</s>` included), where transformers 5 reads it as False."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # AutoTokenizer says what is wrong with it
    if not isinstance(config, dict):
        return {}
    llama = str(config.get("tokenizer_class", "")).startswith("LlamaTokenizer")
    return {"legacy": True} if llama and config.get("legacy") is None else {}


def _rows(parts: Original) -> int:
    embed = parts.text.get("model.embed_tokens.weight")
    if embed is None:
        raise LlavaEdgeError(f"{parts.directory}: no model.embed_tokens.weight")
    return int(embed.shape[0])


def _language_model(parts: Original, dtype: Any) -> Any:
    """The causal LM with the original's text weights (a LoRA output's adapters merged in)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    settings = parts.settings
    try:
        config = AutoConfig.for_model(
            **text_config_dict(parts.config, settings), vocab_size=_rows(parts)
        )
    except (ValueError, TypeError, StrictDataclassError) as e:
        first = first_line(e)
        raise LlavaEdgeError(f"{parts.directory}/config.json: {first}") from None
    _check_text_shape(config, parts)
    model = _load(
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], config, parts.text, dtype, "language model"
    )
    if parts.kind == "lora":
        model = _merge_lora(model, parts)
    return model


def _check_text_shape(config: Any, parts: Original) -> None:
    """Width and depth against the weights before the model is built: a config.json without
    them builds Llama's defaults (7B parameters in float32), which can take the machine's
    memory before the weights are found not to fit."""
    width = int(parts.text["model.embed_tokens.weight"].shape[1])
    depth = len({k.split(".")[2] for k in parts.text if k.startswith("model.layers.")})
    for key, weights in (("hidden_size", width), ("num_hidden_layers", depth)):
        if getattr(config, key) != weights:
            raise LlavaEdgeError(
                f"{parts.directory}/config.json: {key} {getattr(config, key)} (or its default, "
                f"where it is absent) does not fit the language model weights, which have "
                f"{weights}"
            )


def _merge_lora(model: Any, parts: Original) -> Any:
    """Fold the original's LoRA adapters into the language model, with peft.

    The adapters were trained on the original's LlavaLlamaForCausalLM, whose language model
    modules have the causal LM's names (`model.layers.N.self_attn.q_proj`), so peft wraps the
    causal LM alone and finds every one of them.
    """
    if not _has("peft"):
        raise LlavaEdgeError("merging a LoRA output needs peft: pip install 'llava-edge[convert]'")
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    if not parts.lora:
        raise LlavaEdgeError(f"{parts.directory} has adapter_config.json but no adapter_model.*")
    try:
        config = LoraConfig.from_pretrained(str(parts.directory))
    except (OSError, ValueError, TypeError) as e:
        raise LlavaEdgeError(f"cannot read {parts.directory}/adapter_config.json: {e}") from None
    config.inference_mode = True
    unfit = f"{parts.directory}: the adapter weights do not fit the language model"
    try:  # peft raises its own errors (modules not found, rank against shapes)
        wrapped = get_peft_model(model, config)
        result = set_peft_model_state_dict(wrapped, parts.lora)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines()]
        detail = next((line for line in lines if line.startswith("size mismatch")), first_line(e))
        raise LlavaEdgeError(f"{unfit}: {detail}") from None
    lora_keys = [k for k in wrapped.state_dict() if "lora_" in k]
    missing = sorted(k for k in result.missing_keys if k in lora_keys)
    if result.unexpected_keys:
        unexpected = sorted(result.unexpected_keys)
        raise LlavaEdgeError(f"{unfit} ({len(unexpected)} unexpected, e.g. {unexpected[0]})")
    if missing:
        raise LlavaEdgeError(f"{unfit} ({len(missing)} missing, e.g. {missing[0]})")
    return wrapped.merge_and_unload()


def _load(cls: type, config: Any, state: dict[str, Any], dtype: Any, what: str) -> Any:
    """from_pretrained on in-memory weights; every parameter must come from them."""
    try:
        model, info = cls.from_pretrained(
            None,
            config=config,
            state_dict=state,
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, naming the tensor
        )
    except (RuntimeError, ValueError) as e:
        raise LlavaEdgeError(f"the {what} weights do not fit its config: {e}") from None
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info["missing_keys"]) - tied)
    if missing:
        raise LlavaEdgeError(
            f"the {what} weights do not fit its config ({len(missing)} missing, e.g. {missing[0]})"
        )
    if info["mismatched_keys"]:
        name, saved, wanted = sorted(info["mismatched_keys"])[0]
        raise LlavaEdgeError(
            f"the {what} weights do not fit its config ({len(info['mismatched_keys'])} of "
            f"another shape, e.g. {name}: {list(saved)} in the weights, {list(wanted)} by the "
            "config)"
        )
    return model.eval()


def _llava_config(parts: Original, tower: Tower, text_config: Any, tokenizer: Any) -> Any:
    from transformers import LlavaConfig, LlavaNextConfig

    from llava_edge.modeling import DEFAULT_PROJECTOR, PROJECTOR_KEY

    settings = parts.settings
    strategy = "default" if settings.select_feature == "patch" else "full"
    common = dict(
        vision_config=tower.config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        # hidden_states[0], the patch embeddings, is the list [0] to transformers: it reads
        # an int 0 as asking the tower for no hidden states.
        vision_feature_layer=settings.select_layer or [0],
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=any(k.endswith("bias") for k in parts.projector),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    if settings.anyres:
        # The original lists [width, height] pairs; transformers [height, width].
        pinpoints = [[height, width] for width, height in settings.grid_pinpoints]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
    else:
        patches = (tower.config.image_size // tower.config.patch_size) ** 2
        config = LlavaConfig(**common, image_seq_length=patches + (strategy == "full"))
    if settings.projector != DEFAULT_PROJECTOR:
        setattr(config, PROJECTOR_KEY, settings.projector)
    if settings.im_start_end:
        config.mm_use_im_start_end = True
    return config


def _check_tower_settings(parts: Original, tower: Tower) -> None:
    """What the tower's config alone says the settings cannot be, before the models are built."""
    settings = parts.settings
    layers = tower.config.num_hidden_layers
    if not -(layers + 1) <= settings.select_layer <= layers:
        raise LlavaEdgeError(
            f"{parts.directory}: mm_vision_select_layer {settings.select_layer} is outside the "
            f"vision tower's {layers} layers (from {-(layers + 1)} to {layers})"
        )
    tile = tower.config.image_size  # both the original and transformers cut whole tiles
    for width, height in settings.grid_pinpoints:  # anyres only
        if width % tile or height % tile:
            raise LlavaEdgeError(
                f"{parts.directory}: image_grid_pinpoints [{width}, {height}] is not a whole "
                f"number of the vision tower's {tile}-pixel tiles"
            )


def _projector_weights(parts: Original) -> dict[str, Any]:
    """The original's nn.Sequential (Linear, GELU, Linear...) or Linear -> linear_1, linear_2..."""
    from llava_edge.modeling import projector_depth

    kind = parts.settings.projector
    depth = projector_depth(kind)
    if kind == "linear":
        names = {"weight": "linear_1.weight", "bias": "linear_1.bias"}
    else:
        names = {
            f"{2 * i}.{p}": f"linear_{i + 1}.{p}" for i in range(depth) for p in ("weight", "bias")
        }
    weights = {k for k in names if k.endswith("weight")}  # every layer's; biases all or none
    if not set(parts.projector) <= set(names) or not weights <= set(parts.projector):
        raise LlavaEdgeError(
            f"{parts.directory}: projector weights {sorted(parts.projector)} do not match its "
            f"mm_projector_type '{kind}'"
        )
    return {names[k]: v for k, v in parts.projector.items()}


def _llava_model(config: Any, language_model: Any, clip: Any, parts: Original, dtype: Any) -> Any:
    from llava_edge.modeling import model_class

    state = {
        f"model.language_model.{k}": v for k, v in language_model.base_model.state_dict().items()
    }
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = language_model.get_output_embeddings().weight
    state.update({f"model.vision_tower.{k}": v for k, v in clip.state_dict().items()})
    state.update(
        {f"model.multi_modal_projector.{k}": v for k, v in _projector_weights(parts).items()}
    )
    if parts.settings.anyres:
        if parts.newline is None:
            raise LlavaEdgeError(
                f"{parts.directory}: an anyres checkpoint needs model.image_newline"
            )
        state["model.image_newline"] = parts.newline
    return _load(model_class(config), config, state, dtype, "LLaVA")


def _fit_vocabulary(model: Any, tokenizer: Any, torch: Any) -> None:
    """Grow the embeddings to cover the added tokens, to a multiple of 64, as the Hugging Face
    conversion does; new rows are drawn around the old rows' mean (seeded: conversion is
    repeatable), so a new output row scores about the mean logit and is never the greedy pick."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        torch.manual_seed(0)
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE)


def _generation_config(tokenizer: Any, answer_end: str) -> Any:
    """Stop at EOS, and at the template's end-of-answer token where it is one (ChatML's
    <|im_end|>), as the original stops at the template's separator."""
    from transformers import GenerationConfig

    eos = [tokenizer.eos_token_id]
    end = answer_end.strip()
    if end and end in tokenizer.get_vocab() and tokenizer.convert_tokens_to_ids(end) not in eos:
        eos.append(tokenizer.convert_tokens_to_ids(end))
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=tokenizer.pad_token_id,
    )


def _processor(parts: Original, tower: Tower, config: Any, tokenizer: Any, chat: str) -> Any:
    from transformers import (
        CLIPImageProcessor,
        LlavaImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    clip = tower.image_processor
    settings = dict(
        size={k: v for k, v in dict(clip.size).items() if v is not None},
        crop_size={k: v for k, v in dict(clip.crop_size).items() if v is not None},
        do_resize=clip.do_resize,
        do_center_crop=clip.do_center_crop,
        do_rescale=clip.do_rescale,
        rescale_factor=clip.rescale_factor,
        do_normalize=clip.do_normalize,
        image_mean=list(clip.image_mean),
        image_std=list(clip.image_std),
        resample=clip.resample,
    )
    if parts.settings.anyres:
        image_processor = LlavaNextImageProcessor(
            **settings, image_grid_pinpoints=config.image_grid_pinpoints
        )
    elif parts.settings.aspect_ratio == "pad":  # the original pads to a square with the mean
        image_processor = LlavaImageProcessor(**settings, do_pad=True)
    else:
        image_processor = CLIPImageProcessor(**settings)
    cls = LlavaNextProcessor if parts.settings.anyres else LlavaProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=chat,
    )


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
