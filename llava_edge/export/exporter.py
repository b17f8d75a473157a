"""`llava-edge export`: a LLaVA checkpoint -> a model dir of three ONNX graphs and a manifest.

Everything is written to a temporary dir beside the output and moved into place only after it is
complete (and verified), so an interrupted or failed export never leaves a dir that looks valid.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llava_edge import __version__
from llava_edge.errors import LlavaEdgeError, first_line
from llava_edge.files import check_output_dir, replace_dir, save_graph, scratch_beside
from llava_edge.logs import quiet
from llava_edge.manifest import (
    AnyResSpec,
    GraphSpec,
    ImageSpec,
    Manifest,
    TemplateSpec,
    TensorSpec,
    TextSpec,
    TokenSpec,
)
from llava_edge.runtime.template import IMAGE_PLACEHOLDER

DEFAULT_OPSET = 17  # TensorRT 10.3 (JetPack 6) parses opsets 9-20; 17 has LayerNormalization
# The decoder's dynamic Slice needs opset 10, quantize's per-channel Q/DQ (its TensorRT forms) 13.
MIN_OPSET = 13
EMBEDDINGS_FILE = "embed_tokens.npy"
NEWLINE_FILE = "image_newline.npy"  # LLaVA-NeXT's image_newline, for the runtime's AnyRes
# --max-context must hold one image and this many tokens of question and answer.
MIN_TEXT_ROOM = 64
# Loader and tracer chatter that says nothing to a user: transformers' notes, the hub client's
# "Retrying in 2s" per attempt, torch.onnx's tracer warnings.
LOADER_LOGGERS = ("transformers", "huggingface_hub", "torch.onnx")


@dataclass
class LoadedCheckpoint:
    model: Any  # LlavaForConditionalGeneration
    processor: Any  # LlavaProcessor
    source: str
    template: TemplateSpec  # the prompt format (llava_edge.export.chat_template)
    template_why: str = ""  # the line that says which template, and why


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    max_context: int | None = None,
    force: bool = False,
    verify: bool = True,
    trust_remote_code: bool = False,
    fused: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Export `checkpoint` into `out_dir`; returns the verification report (empty without it).

    fused: also write onnxruntime's fused forms of the decoder and the vision encoder
    (llava_edge.export.fused), which the onnxruntime backend runs on the CPU; they double the
    graphs' size on disk.

    Raises LlavaEdgeError for bad input and VerificationError when the graphs disagree with
    transformers (the output is then not installed).
    """

    if dtype not in ("fp32", "fp16"):
        raise LlavaEdgeError(f"--dtype must be fp32 or fp16, got {dtype}")
    if not MIN_OPSET <= opset <= 20:
        raise LlavaEdgeError(
            f"--opset {opset} is outside {MIN_OPSET}-20: {MIN_OPSET} is the first with the "
            "per-channel Q/DQ that quantize writes, 20 the last TensorRT 10.x's ONNX parser reads"
        )
    out = Path(out_dir)
    check_output_dir(out, force, keep=Path(checkpoint), keep_name="the checkpoint")
    start = time.perf_counter()
    config = checkpoint_config(checkpoint, trust_remote_code=trust_remote_code)
    max_context = _max_context(config, max_context)  # fail before loading weights
    loaded = load_checkpoint(checkpoint, trust_remote_code=trust_remote_code)
    log(loaded.template_why)
    if verify:
        from llava_edge.export.verify import check_answer_room

        check_answer_room(loaded, max_context)
    # onnxruntime's graph optimizer (the fused forms) writes graph-sized copies through tempfile
    with scratch_beside(out), replace_dir(out) as tmp:
        if dtype == "fp16":
            _half(loaded.model)
        manifest = build_manifest(loaded, dtype, max_context)
        manifest.source["opset"] = opset
        _write_graphs(loaded.model, manifest, tmp, opset, log)
        if fused:
            _write_fused(loaded.model, manifest, tmp, opset, log)
        _write_text_files(loaded, manifest, tmp)
        manifest.num_image_tokens = _num_image_tokens(tmp / manifest.graphs["vision_encoder"].file)
        manifest.record_files(tmp)
        manifest.save(tmp)
        report: dict[str, Any] = {}
        if verify:
            from llava_edge.export.verify import verify_model_dir

            if dtype == "fp16":  # the reference is always the checkpoint's weights in fp32
                del loaded  # the fp16 weights are written: not held beside the fp32 ones
                loaded = load_checkpoint(checkpoint, trust_remote_code=trust_remote_code)
            report = verify_model_dir(loaded, tmp, log=log)
    manifest.mark_verified(out)  # just hashed by record_files: no need to hash on first load
    log(
        f"exported {loaded.source} -> {out} ({_forms_written(manifest, fused)}) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return report


def _forms_written(manifest: Manifest, fused: bool) -> str:
    """The graph forms a model dir holds, in words (why a graph has none is logged as it is
    written)."""
    names = [name for name, graph in manifest.graphs.items() if graph.fused is not None]
    if names:
        return f"standard graphs and fused {' and '.join(names)} form{'s' * (len(names) > 1)}"
    return "standard graphs only" + ("" if fused else " (--no-fused)")


def _half(model: Any) -> None:
    """model.half(), but rope's inverse frequencies (inv_freq and its copies) stay float32, as
    transformers keeps them in a model it loads in fp16: rounded to fp16, the angle between
    tokens p apart is off by up to p * 5e-4 rad."""
    kept = {
        name: buffer.clone()
        for name, buffer in model.named_buffers()
        if name.endswith("inv_freq") and buffer.is_floating_point()
    }
    model.half()
    for name, buffer in kept.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buffer)


def load_checkpoint(
    checkpoint: str | os.PathLike, trust_remote_code: bool = False
) -> LoadedCheckpoint:
    """Load a LLaVA checkpoint in fp32 with eager attention, or say clearly why not.

    The prompt format is settled before the weights load: a template export cannot use fails
    in seconds, not after minutes of loading a 7B model.
    """
    import torch
    from transformers import GenerationConfig

    from llava_edge.export.chat_template import choose_template
    from llava_edge.modeling import check_processor, load_model, load_processor

    config = checkpoint_config(checkpoint, trust_remote_code)
    source = str(checkpoint)
    _check_tokenizer_files(Path(source))
    _check_processor_files(Path(source))
    _check_weight_files(Path(source))
    try:
        with quiet(*LOADER_LOGGERS):
            processor = load_processor(source, trust_remote_code)
            try:
                generation = GenerationConfig.from_pretrained(source)
            except OSError:  # no generation_config.json: what from_pretrained derives then
                generation = GenerationConfig.from_model_config(config)
            check_processor(processor, config, source)
            eos = _eos_ids(generation, processor.tokenizer)
            _check_tokens(config, processor.tokenizer, eos)
            _check_image_settings(processor.image_processor, config, source)
            _check_image_tokens(processor, config, source)  # the image token is <image> now
            eos_texts = [processor.tokenizer.decode([i], skip_special_tokens=False) for i in eos]
            choice = choose_template(
                Path(source),
                processor,
                eos_texts,
                image_markers=bool(getattr(config, "mm_use_im_start_end", False)),
            )
            model = load_model(
                source,
                config=config,
                dtype=torch.float32,
                attn_implementation="eager",
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
            )
    except ValueError as e:
        if not trust_remote_code and "trust_remote_code" in str(e):  # transformers' refusal
            raise LlavaEdgeError(
                f"{source} loads its processor or tokenizer with its own Python code (an "
                "auto_map in its settings); pass --trust-remote-code to run it, if you trust the "
                "checkpoint"
            ) from None
        raise LlavaEdgeError(f"cannot load checkpoint {source}: {first_line(e)}") from None
    except OSError as e:  # missing weights or tokenizer files
        raise LlavaEdgeError(f"cannot load checkpoint {source}: {first_line(e)}") from None
    return LoadedCheckpoint(model.eval(), processor, source, choice.template, choice.why)


# Files a tokenizer's vocabulary is read from (tokenizer_config.json alone holds none).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
)


def _check_tokenizer_files(local: Path) -> None:
    """A checkpoint saved with the model's save_pretrained alone has no tokenizer; transformers
    then says only that it could not build one from a list of sources."""
    if not local.is_dir():
        return  # a hub id
    if any((local / name).is_file() for name in TOKENIZER_FILES) or any(local.glob("*.tiktoken")):
        return
    raise LlavaEdgeError(
        f"{local} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])} or another vocabulary "
        "file); save the processor (or tokenizer) it was trained with into it: "
        "processor.save_pretrained(DIR)"
    )


# Files an image processor's settings are read from.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _check_processor_files(local: Path) -> None:
    """A checkpoint saved with its tokenizer but not its processor has no image settings;
    transformers then asks whether a hub repo of the dir's name was meant."""
    if not local.is_dir() or any((local / name).is_file() for name in PROCESSOR_FILES):
        return  # a hub id, or settings to read
    raise LlavaEdgeError(
        f"{local} has no image processor ({' or '.join(PROCESSOR_FILES)}); save the processor "
        "it was trained with into it: processor.save_pretrained(DIR)"
    )


SHARD_INDEX = "model.safetensors.index.json"


def _check_weight_files(local: Path) -> None:
    """A sharded checkpoint lists its shards in its index; transformers names neither the index
    it cannot parse nor the shard it cannot read. Each file is named here (headers only are
    read), so that the one damaged file is copied again."""
    from safetensors import SafetensorError, safe_open

    from llava_edge.modeling import unreadable_weights

    index = local / SHARD_INDEX
    if not local.is_dir() or not index.is_file():
        return  # a hub id, or one model.safetensors (load_model says if it is unreadable)
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LlavaEdgeError(
            f"{index} is not valid JSON with a weight_map ({type(e).__name__}: {first_line(e)}); "
            "copy it from the checkpoint again"
        ) from None
    for name in shards:
        shard = local / name
        if not shard.is_file():
            raise LlavaEdgeError(
                f"{local}: {shard.name}, one of the weight shards {index.name} lists, is "
                "missing; copy it from the checkpoint again"
            )
        try:
            with safe_open(str(shard), framework="pt"):
                pass
        except SafetensorError as e:
            raise unreadable_weights(shard, e) from None


# PIL's resampling filters, by the numbers an image processor's resample holds.
RESAMPLE_NUMBERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _check_image_settings(settings: Any, config: Any, source: str) -> None:
    """Image settings transformers cannot run as written, refused before the weights load (the
    runtime would fail on them at its first image). transformers' normalize takes a mean and
    std of one number or one per channel; its PIL backend resizes (with do_resize, and AnyRes
    tiles always) with one of PIL's filter numbers, and with bilinear in place of anything else
    (its torchvision backend refuses that)."""
    from llava_edge.modeling import ANYRES_CLASSES

    where = f"{_processor_file(source)}'s"
    if getattr(settings, "do_resize", False) or config.model_type in ANYRES_CLASSES:
        resample = getattr(settings, "resample", None)
        if resample is not None and (
            not isinstance(resample, int)
            or isinstance(resample, bool)
            or resample not in RESAMPLE_NUMBERS
        ):
            numbers = ", ".join(f"{n} {name}" for n, name in RESAMPLE_NUMBERS.items())
            named = {name: n for n, name in RESAMPLE_NUMBERS.items()}
            key = resample.strip().lower() if isinstance(resample, str) else None
            hint = f": write {named[key]} for {resample!r}" if key in named else ""
            raise LlavaEdgeError(
                f"{source}: {where} resample {resample!r} must be one of PIL's filter numbers "
                f"({numbers}){hint}; transformers resizes with bilinear in its place"
            )
    used = {
        "image_mean": getattr(settings, "do_normalize", False)
        or getattr(settings, "do_pad", False),
        "image_std": getattr(settings, "do_normalize", False),
    }
    for key, use in used.items():
        value = getattr(settings, key, None)
        if use and not _one_or_three_numbers(value):
            shown = list(value) if isinstance(value, tuple) else value  # as the file writes it
            raise LlavaEdgeError(
                f"{source}: {where} {key} {shown!r} must be one number or 3 (one per RGB "
                "channel), as transformers' normalize takes it"
            )


def _one_or_three_numbers(value: Any) -> bool:
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if isinstance(value, (list, tuple)):
        return len(value) == 3 and all(number(x) for x in value)
    return number(value)


def _processor_file(source: str) -> str:
    """The file a local checkpoint's image settings are read from, as errors name it."""
    for name in PROCESSOR_FILES:
        if (Path(source) / name).is_file():
            return name
    return PROCESSOR_FILES[0]


def _check_image_tokens(processor: Any, config: Any, source: str) -> None:
    """transformers' LLaVA wants pixel values of its tower's input size (any image's: a
    non-square crop_size, or a shortest-edge resize without a crop, fails in the tower) and as
    many image tokens in the prompt as the model makes features: a processor that counts
    otherwise (processor_config.json's num_additional_image_tokens and
    vision_feature_select_strategy) makes a checkpoint transformers cannot run either."""
    from PIL import Image

    from llava_edge.modeling import CLASS_TOKENS

    if config.model_type != "llava":  # LLaVA-NeXT's count depends on the image; verify checks it
        _check_processor_pinpoints(processor, config, source)
        if config.model_type == "llava_onevision":
            _check_onevision_processor(processor, config, source)
        return
    try:
        inputs = processor(
            images=Image.new("RGB", (48, 40)), text=IMAGE_PLACEHOLDER, return_tensors="np"
        )
    except Exception as e:  # a setting transformers' processor cannot run with (any exception)
        raise LlavaEdgeError(
            f"{source}: its processor fails on a 48x40 image ({type(e).__name__}: "
            f"{first_line(e)}); transformers cannot run it either: fix processor_config.json"
        ) from None
    marks = int((inputs["input_ids"] == int(config.image_token_id)).sum())
    vision = config.vision_config
    height, width = inputs["pixel_values"].shape[-2:]
    if (height, width) != (vision.image_size, vision.image_size):  # the probe is not square
        settings = processor.image_processor
        size, crop = _set(settings.size), _set(getattr(settings, "crop_size", None))
        raise LlavaEdgeError(
            f"{source}: its image processor makes {width}x{height} pixel values of a 48x40 "
            f"image (processor_config.json's size {size}, do_center_crop "
            f"{getattr(settings, 'do_center_crop', None)}, crop_size {crop}), its vision "
            f"tower takes {vision.image_size}x{vision.image_size} (config.json's "
            "vision_config.image_size); transformers cannot run it either: fix "
            "processor_config.json"
        )
    features = (height // vision.patch_size) * (width // vision.patch_size)
    features += CLASS_TOKENS[vision.model_type]  # CLIP's CLS token
    features -= int(config.vision_feature_select_strategy == "default")  # the first one dropped
    if marks != features:
        raise LlavaEdgeError(
            f"{source}: its processor puts {marks} image tokens in the prompt per image, its "
            f"model makes {features} (processor_config.json's patch_size, num_additional_image_tokens "
            "and vision_feature_select_strategy against config.json's); transformers cannot run it "
            "either: fix processor_config.json"
        )


def _check_processor_pinpoints(processor: Any, config: Any, source: str) -> None:
    """transformers' LLaVA-NeXT tiles an image by its processor's image_grid_pinpoints and
    packs the features by config.json's: where they differ, an image they place on other grids
    is packed from tiles of another grid than its own (the runtime follows config.json's)."""
    tiled = getattr(processor.image_processor, "image_grid_pinpoints", None)
    packed = config.image_grid_pinpoints
    if tiled is not None and [list(map(int, p)) for p in tiled] != [
        list(map(int, p)) for p in packed
    ]:
        raise LlavaEdgeError(
            f"{source}: processor_config.json's image_grid_pinpoints {[list(p) for p in tiled]} "
            f"differ from config.json's {[list(p) for p in packed]}: transformers tiles an image "
            "by the one and packs its features by the other; make them the same"
        )


def _check_onevision_processor(processor: Any, config: Any, source: str) -> None:
    """LlavaOnevisionProcessor counts an image's tokens by its own num_image_tokens,
    vision_aspect_ratio and vision_feature_select_strategy, LlavaOnevisionModel packs its
    features by the tower's grid and config.json's: where they differ, transformers' prompt and
    features disagree. With 'default' the processor counts one token less than num_image_tokens
    (CLIP's CLS token, which the model drops), so num_image_tokens holds the patches and it."""
    for key in ("vision_aspect_ratio", "vision_feature_select_strategy"):
        counted, packed = getattr(processor, key, None), getattr(config, key)
        if counted is not None and counted != packed:
            raise LlavaEdgeError(
                f"{source}: processor_config.json's {key} {counted!r} differs from "
                f"config.json's {packed!r}: transformers counts an image's tokens by the one and "
                "packs its features by the other; make them the same"
            )
    vision = config.vision_config
    grid = (vision.image_size // vision.patch_size) ** 2
    dropped = int(getattr(processor, "vision_feature_select_strategy", None) == "default")
    counted = getattr(processor, "num_image_tokens", None)
    if counted is not None and int(counted) != grid + dropped:
        cls = " and its CLS token, which 'default' counts there and drops" if dropped else ""
        raise LlavaEdgeError(
            f"{source}: processor_config.json's num_image_tokens {counted} is not the vision "
            f"tower's {grid} patches{cls} ({grid + dropped}: config.json's vision_config "
            "image_size / patch_size, squared); transformers cannot run it either: fix "
            "processor_config.json"
        )


def _set(size: Any) -> dict[str, Any]:
    """An image processor's size or crop_size, as the keys it sets."""
    return {k: v for k, v in dict(size or {}).items() if v is not None}


def _check_tokens(config: Any, tokenizer: Any, eos_ids: list[int]) -> None:
    """Tokens the runtime relies on, checked before the weights load."""
    if not eos_ids:
        raise LlavaEdgeError(
            "the checkpoint names no end-of-sequence token (generation_config.json's "
            "eos_token_id, or the tokenizer's eos_token), so no answer could end; set one"
        )
    appended = _appended_tokens(tokenizer)
    if appended:
        raise LlavaEdgeError(
            f"the tokenizer ends every text it encodes with {''.join(appended)!r} (its "
            "add_eos_token, or its tokenizer.json's post-processor), so transformers' prompts "
            "end the turn before the model answers, which the runtime's do not; set "
            '"add_eos_token": false in tokenizer_config.json and save the tokenizer again'
        )
    image_id = int(config.image_token_id)
    image_token = (
        tokenizer.convert_ids_to_tokens(image_id) if 0 <= image_id < len(tokenizer) else None
    )
    if image_token is None:
        raise LlavaEdgeError(
            f"config.json's image_token_index {image_id} is not in the tokenizer's vocabulary "
            f"({len(tokenizer)} tokens); set it to the id of the tokenizer's "
            f"{IMAGE_PLACEHOLDER!r} token"
        )
    if image_token != IMAGE_PLACEHOLDER:
        raise LlavaEdgeError(
            f"the checkpoint's image token is {image_token!r} (config.json's image_token_index "
            f"{image_id}); llava-edge's prompts mark images with {IMAGE_PLACEHOLDER!r}, as every "
            "llava-hf checkpoint does"
        )
    rows = int(config.text_config.vocab_size)
    if len(tokenizer) > rows:  # the runtime would embed such ids as row 0: a wrong answer
        raise LlavaEdgeError(
            f"the tokenizer has {len(tokenizer)} tokens, the text model's embedding table "
            f"{rows} rows (config.json's text_config.vocab_size): ids from {rows} up have no "
            "embedding, and transformers fails on them too; resize the embeddings to the "
            "tokenizer (model.resize_token_embeddings(len(tokenizer))) and save the checkpoint again"
        )


def checkpoint_config(checkpoint: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """The checkpoint's LlavaConfig, once it is known to be a LLaVA export takes (no weights)."""
    from llava_edge.export.graphs import SUPPORTED_TEXT_MODELS, SUPPORTED_VISION_TOWERS
    from llava_edge.modeling import (
        ANYRES_CLASSES,
        check_full_precision,
        no_checkpoint,
        read_config,
    )

    source = str(checkpoint)
    local = Path(source)
    if not local.exists():
        # "org/name" may be a hub id, unless "org" is a local dir: then it is a mistyped path.
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or local.parent.is_dir():
            raise LlavaEdgeError(f"checkpoint {source} does not exist")
        _check_hub_reachable(source)
    elif not local.is_dir():
        raise LlavaEdgeError(f"checkpoint {source} is a file; give the checkpoint's directory")
    elif not (local / "config.json").is_file():
        raise no_checkpoint(source, "checkpoint")
    elif _original_format(local / "config.json"):
        raise LlavaEdgeError(
            f"{source} is a checkpoint of the original LLaVA code; convert it first: "
            f"`llava-edge convert {source} CONVERTED_DIR`"
        )
    with quiet(*LOADER_LOGGERS):
        config = read_config(source, "checkpoint", trust_remote_code)
    if config.model_type not in ("llava", *ANYRES_CLASSES):
        raise LlavaEdgeError(
            f"{source} is a '{config.model_type}' checkpoint, not LLaVA "
            "(LlavaForConditionalGeneration, LlavaNextForConditionalGeneration or "
            "LlavaOnevisionForConditionalGeneration); export takes LLaVA checkpoints only"
        )
    tower = config.vision_config.model_type
    if tower not in SUPPORTED_VISION_TOWERS:
        raise LlavaEdgeError(
            f"{source}: vision tower '{tower}' is not supported "
            f"(supported: {', '.join(SUPPORTED_VISION_TOWERS)})"
        )
    if config.model_type in ANYRES_CLASSES:
        _check_tile_features(source, config)
    check_full_precision(
        config,
        source,
        "export the checkpoint they were quantized from, then `llava-edge quantize` the model dir",
    )
    if config.model_type in ANYRES_CLASSES:
        _check_pinpoints(source, config)
    if config.model_type == "llava_onevision":
        max_patches(source, config)
    _check_feature_layers(source, config)
    text_type = config.text_config.model_type
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise LlavaEdgeError(
            f"{source}: text model '{text_type}' is not supported yet "
            f"(supported: {', '.join(SUPPORTED_TEXT_MODELS)})"
        )
    heads = int(config.text_config.num_attention_heads)
    kv_heads = config.text_config.num_key_value_heads
    kv_heads = heads if kv_heads is None else int(kv_heads)
    if kv_heads <= 0 or heads % kv_heads:  # each KV head serves a whole group of query heads
        raise LlavaEdgeError(
            f"{source}: text_config's num_attention_heads {heads} is not a multiple of its "
            f"num_key_value_heads {kv_heads}; transformers cannot run it either: fix config.json"
        )
    _check_known_names(source, config)
    rope = rope_type(config.text_config)
    if rope in UNSUPPORTED_ROPE:
        raise LlavaEdgeError(
            f"{source}: text_config rope type '{rope}' is not supported ({UNSUPPORTED_ROPE[rope]}); "
            "export takes the default, linear, dynamic, yarn and llama3 rope types"
        )
    return config


def _check_hub_reachable(repo_id: str) -> None:
    """A hub id not in the hub's local cache is downloaded; with no network, the hub client
    retries each file for about half a minute before transformers says it "couldn't connect".
    One request, not retried, says at once whether the hub can be reached."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    if try_to_load_from_cache(repo_id, "config.json") is not None:
        return  # the hub client falls back to the cached copy
    try:
        HfApi().model_info(repo_id, timeout=10)
    except HfHubHTTPError:
        return  # the hub answered: transformers says what it said (no such repo, gated...)
    except Exception as e:  # the HTTP client's own connection and timeout errors
        raise LlavaEdgeError(
            f"cannot reach the Hugging Face hub to download {repo_id} ({type(e).__name__}: "
            f"{first_line(e)}), and it is not in the local cache; connect to the network, or "
            f"download it where there is one (`hf download {repo_id} --local-dir DIR`) and "
            "export DIR"
        ) from None


def _check_tile_features(source: str, config: Any) -> None:
    """LLaVA-NeXT lays each tile's features out as the tower's patch grid: CLIP's once its CLS
    token is dropped ('default'), SigLIP's as they are ('full'). Any other selection breaks the
    grid in transformers' LlavaNextModel too."""
    from llava_edge.modeling import patch_strategy

    tower = config.vision_config.model_type
    wanted = patch_strategy(tower)
    strategy = config.vision_feature_select_strategy
    if strategy != wanted:
        why = "SigLIP has no CLS token to drop" if wanted == "full" else "it drops CLIP's CLS token"
        raise LlavaEdgeError(
            f"{source}: {_family(config)} with a {tower} tower and vision_feature_select_strategy "
            f"'{strategy}' is not supported: its tiles' feature grids are the tower's patches, "
            f"which only '{wanted}' selects ({why})"
        )


def _family(config: Any) -> str:
    """An AnyRes checkpoint's family, as its refusals name it: LLaVA-NeXT or LLaVA-OneVision."""
    from llava_edge.modeling import ANYRES_CLASSES

    return ANYRES_CLASSES[config.model_type][0]


def _check_known_names(source: str, config: Any) -> None:
    """Activations and a rope type transformers has no code for fail with a KeyError as the
    model is built, after the config passed."""
    from transformers.activations import ACT2FN
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for field, owner in (
        ("text_config.hidden_act", config.text_config),
        ("projector_hidden_act", config),
        ("vision_config.hidden_act", config.vision_config),
    ):
        act = getattr(owner, field.rpartition(".")[2], None)
        if isinstance(act, str) and act not in ACT2FN:
            raise LlavaEdgeError(
                f"{source}: config.json's {field} {act!r} is no activation transformers knows; "
                "transformers cannot load it either: fix config.json"
            )
    rope = rope_type(config.text_config)
    if rope != "default" and rope not in ROPE_INIT_FUNCTIONS:
        raise LlavaEdgeError(
            f"{source}: text_config rope type {rope!r} is unknown to transformers (it knows "
            f"default, {', '.join(ROPE_INIT_FUNCTIONS)}); transformers cannot load it either"
        )


def max_patches(source: str, config: Any) -> int:
    """LLaVA-OneVision's `vision_aspect_ratio` `anyres_max_N` as N, the most tiles' features an
    image keeps before they are shrunk. transformers reads N off the string with
    `int(ratio.strip("anyres_max_"))`, which fails on anything else (LLaVA-NeXT's plain `anyres`
    included)."""
    ratio = config.vision_aspect_ratio
    found = re.fullmatch(r"anyres_max_([1-9][0-9]*)", str(ratio))
    if found is None:
        raise LlavaEdgeError(
            f"{source}: vision_aspect_ratio {ratio!r} is not 'anyres_max_N' (N a whole number "
            "of tiles, LLaVA-OneVision's anyres_max_9); transformers cannot run another either: "
            "fix config.json"
        )
    return int(found.group(1))


def _check_pinpoints(source: str, config: Any) -> None:
    """AnyRes grids are whole tiles of the vision tower's input: LlavaNextImageProcessor and
    LlavaNextModel disagree on the feature grid of any other size, so such a model dir would
    fail at its first image."""
    tile = config.vision_config.image_size
    if not config.image_grid_pinpoints:
        raise LlavaEdgeError(
            f"{source}: {_family(config)}'s image_grid_pinpoints is empty: no AnyRes grid to "
            f"tile an image into; list them in config.json (each a whole number of {tile} px "
            "tiles)"
        )
    for pinpoint in config.image_grid_pinpoints:
        if len(pinpoint) != 2 or any(int(side) <= 0 or int(side) % tile for side in pinpoint):
            raise LlavaEdgeError(
                f"{source}: image_grid_pinpoints {list(pinpoint)} is not a whole number of "
                f"{tile} px tiles (the vision tower's input) on each side; fix the config's "
                "image_grid_pinpoints"
            )


def _check_feature_layers(source: str, config: Any) -> None:
    """vision_feature_layer indexes the tower's hidden states (the embeddings, then each layer's
    output): one past them fails in tracing, and an int 0 in transformers' own LLaVA, which reads
    the selection as output_hidden_states and so asks the tower for none."""
    layers = config.vision_feature_layer
    states = int(config.vision_config.num_hidden_layers) + 1
    if not isinstance(layers, int) and not list(layers):
        raise LlavaEdgeError(
            f"{source}: vision_feature_layer is an empty list: no features to project; name the "
            "layer(s), as LLaVA's -2"
        )
    for layer in [layers] if isinstance(layers, int) else list(layers):
        if not -states <= int(layer) < states:
            raise LlavaEdgeError(
                f"{source}: vision_feature_layer {layer} is outside the vision tower's hidden "
                f"states ({-states} to {states - 1}); fix the config's vision_feature_layer"
            )
    if layers == 0:
        raise LlavaEdgeError(
            f"{source}: vision_feature_layer 0 (the patch embeddings) is not supported: "
            "transformers' LLaVA then asks the vision tower for no hidden states and fails, so "
            "there is no reference to export against; write it as [0], which selects the same"
        )


# Rope types the graphs cannot hold, and why.
UNSUPPORTED_ROPE = {
    "longrope": "its frequencies switch from short to long factors with the sequence length, "
    "inside the traced graph",
}


def rope_type(text_config: Any) -> str:
    """The text model's rope type ('default' without scaling), from transformers' rope_parameters
    (or the rope_scaling of configs older transformers wrote)."""
    rope = getattr(text_config, "rope_parameters", None) or getattr(
        text_config, "rope_scaling", None
    )
    if not isinstance(rope, dict):
        return "default"
    return str(rope.get("rope_type", rope.get("type", "default")))


def _original_format(config_file: Path) -> bool:
    """A config of the original LLaVA code (which `llava-edge convert` takes)?"""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # AutoConfig says what is wrong with it
    return isinstance(config, dict) and "mm_vision_tower" in config and "text_config" not in config


def build_manifest(loaded: LoadedCheckpoint, dtype: str, max_context: int) -> Manifest:
    """Every fact the runtime needs, read from the checkpoint's config and processor."""
    import transformers

    from llava_edge.modeling import projector_type

    config = loaded.model.config
    text = config.text_config
    np_dtype = "float16" if dtype == "fp16" else "float32"
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = text.num_key_value_heads or text.num_attention_heads
    spec = TextSpec(
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        max_context=max_context,
        dtype=np_dtype,
    )
    image = _image_spec(loaded.processor.image_processor, config)
    tokens = _token_spec(loaded)
    bos = loaded.processor.tokenizer.bos_token
    if bos and loaded.template.system.startswith(bos):
        tokens.add_bos = False  # the template writes it (see choose_template)
    vision_dim = config.vision_config.hidden_size * (
        1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    )
    graphs = {
        "vision_encoder": GraphSpec(
            file="vision_encoder.onnx",
            inputs={"pixel_values": TensorSpec(np_dtype, ["batch", 3, image.height, image.width])},
            outputs={"image_features": TensorSpec(np_dtype, ["batch", "image_tokens", vision_dim])},
            precision=dtype,
        ),
        "projector": GraphSpec(
            file="projector.onnx",
            inputs={"image_features": TensorSpec(np_dtype, ["batch", "image_tokens", vision_dim])},
            outputs={
                "image_embeds": TensorSpec(np_dtype, ["batch", "image_tokens", text.hidden_size])
            },
            precision=dtype,
        ),
        "decoder": _decoder_spec(spec, dtype),
    }
    manifest = Manifest(
        graphs=graphs,
        image=image,
        num_image_tokens=0,  # measured from the exported vision graph
        text=spec,
        tokens=tokens,
        template=TemplateSpec(**dataclasses.asdict(loaded.template)),  # the manifest's own copy
        embeddings=EMBEDDINGS_FILE,
        source={
            "checkpoint": loaded.source,
            "text_model_type": text.model_type,
            "vision_model_type": config.vision_config.model_type,
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "projector": projector_type(config),
            "llava_edge": __version__,
            "transformers": transformers.__version__,
        },
    )
    manifest.format_version = manifest.required_version()
    return manifest


def _decoder_spec(text: TextSpec, precision: str) -> GraphSpec:
    kv = ["batch", text.num_kv_heads, "past", text.head_dim]
    new = ["batch", text.num_kv_heads, "seq", text.head_dim]
    inputs = {
        "inputs_embeds": TensorSpec(text.dtype, ["batch", "seq", text.hidden_size]),
        "attention_mask": TensorSpec("int64", ["batch", "past+seq"]),
        "position_ids": TensorSpec("int64", ["batch", "seq"]),
    }
    outputs = {"logits": TensorSpec("float32", ["batch", text.vocab_size])}
    manifest_kv = Manifest.__dataclass_fields__["kv"].default_factory()
    for i in range(text.num_layers):
        inputs[manifest_kv.past_key.format(i=i)] = TensorSpec(text.dtype, kv)
        inputs[manifest_kv.past_value.format(i=i)] = TensorSpec(text.dtype, kv)
        outputs[manifest_kv.present_key.format(i=i)] = TensorSpec(text.dtype, new)
        outputs[manifest_kv.present_value.format(i=i)] = TensorSpec(text.dtype, new)
    return GraphSpec(file="decoder.onnx", inputs=inputs, outputs=outputs, precision=precision)


def _image_spec(processor: Any, config: Any) -> ImageSpec:
    from llava_edge.modeling import ANYRES_CLASSES

    vision_config = config.vision_config
    size = dict(processor.size) if processor.do_resize else None
    size = {k: v for k, v in (size or {}).items() if v is not None} or None
    if size and not ("shortest_edge" in size or {"height", "width"} <= set(size)):
        raise LlavaEdgeError(f"unsupported image processor size {size}")
    crop = dict(processor.crop_size) if processor.do_center_crop else None
    if crop:
        height, width = crop["height"], crop["width"]
    elif size and "height" in size:
        height, width = size["height"], size["width"]
    else:
        height = width = vision_config.image_size
    anyres = config.model_type in ANYRES_CLASSES
    resample = processor.resample if processor.resample is not None else 3
    mean = (
        processor.image_mean
        if isinstance(processor.image_mean, (list, tuple))
        else [processor.image_mean] * 3
    )
    std = (
        processor.image_std
        if isinstance(processor.image_std, (list, tuple))
        else [processor.image_std] * 3
    )
    return ImageSpec(
        height=int(height),
        width=int(width),
        resize=size,
        # read where an image is resized (_check_image_settings refuses another value there)
        resample=int(resample) if size or anyres else 3,
        center_crop=bool(processor.do_center_crop),
        rescale_factor=float(processor.rescale_factor) if processor.do_rescale else 1.0,
        normalize=bool(processor.do_normalize),
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        # LlavaNextImageProcessor's do_pad pads a batch's tile counts, not the image
        pad_to_square=bool(getattr(processor, "do_pad", False)) and not anyres,
        anyres=_anyres_spec(processor, config, int(height)) if anyres else None,
    )


def _anyres_spec(processor: Any, config: Any, height: int) -> AnyResSpec:
    """LlavaNextImageProcessor's tiling, as numbers (what LlavaNextModel assumes is checked)."""
    size = {k: v for k, v in dict(processor.size).items() if v is not None}
    crop = {k: v for k, v in dict(processor.crop_size or {}).items() if v is not None}
    if "height" in size and "width" in size:
        base = [int(size["height"]), int(size["width"])]
    else:
        base = [int(size["shortest_edge"])] * 2
    tile = int(crop.get("height") or size.get("height") or size["shortest_edge"])
    vision = config.vision_config
    if not tile == height == vision.image_size:
        raise LlavaEdgeError(
            f"this {_family(config)} checkpoint's tiles are {tile} px, its processor's output "
            f"{height} px and its vision tower's input {vision.image_size} px; they must be one "
            "size"
        )
    onevision = config.model_type == "llava_onevision"
    return AnyResSpec(
        grid_pinpoints=[[int(h), int(w)] for h, w in config.image_grid_pinpoints],
        tile_size=tile,
        base_size=base,
        tile_features=vision.image_size // vision.patch_size,
        newline=NEWLINE_FILE,
        max_patches=max_patches("", config) if onevision else None,
        several_images=not onevision,
    )


def _token_spec(loaded: LoadedCheckpoint) -> TokenSpec:
    tokenizer = loaded.processor.tokenizer
    model = loaded.model
    eos_ids = _eos_ids(model.generation_config, tokenizer)
    bos = tokenizer.bos_token_id
    probe = tokenizer("a").input_ids
    if bos is None and probe[1:] == tokenizer("a", add_special_tokens=False).input_ids:
        # a tokenizer.json whose post-processor writes BOS, without a tokenizer_config.json
        # naming it: transformers' processor adds it to every prompt, so must the runtime
        bos = probe[0]
    adds_bos = bool(bos is not None and probe and probe[0] == bos)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = model.generation_config.pad_token_id
    # LLaVA-OneVision's processor refuses a prompt with its video placeholder and no video
    video = getattr(loaded.processor, "video_token_id", None)
    return TokenSpec(
        image_token_id=int(model.config.image_token_id),
        eos_token_ids=eos_ids,
        bos_token_id=None if bos is None else int(bos),
        pad_token_id=None if pad is None else int(pad),
        add_bos=adds_bos,
        raw_bos=adds_bos,
        video_token_id=None if video is None else int(video),
    )


def _appended_tokens(tokenizer: Any) -> list[str]:
    """The tokens the tokenizer puts after every text it encodes (none for a LLaVA one)."""
    probe = tokenizer("a").input_ids
    bare = tokenizer("a", add_special_tokens=False).input_ids
    for at in range(len(probe) - len(bare) + 1 if bare else 0):
        if probe[at : at + len(bare)] == bare:
            return tokenizer.convert_ids_to_tokens(probe[at + len(bare) :])
    return []


def _eos_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


# The text models whose attention reads a sliding_window (Qwen2 and Qwen3 in the layers their
# layer_types name); Llama and Gemma attend to every token, whatever window their config holds.
SLIDING_TEXT_MODELS = ("mistral", "phi3", "qwen2", "qwen3")


def _max_context(config: Any, requested: int | None) -> int:
    """--max-context, or the model's own context when none is given; either must hold one image
    and MIN_TEXT_ROOM tokens (the verification's prompt and answer need about that too)."""
    text_config = config.text_config
    limit = int(getattr(text_config, "max_position_embeddings", 4096) or 4096)
    source = "max_position_embeddings"
    window = getattr(text_config, "sliding_window", None)
    use = getattr(text_config, "use_sliding_window", True)
    use = use and text_config.model_type in SLIDING_TEXT_MODELS
    # Qwen2 slides in its layers from max_window_layers on (transformers' layer_types): where
    # that is none of them, the window is never used
    kinds = getattr(text_config, "layer_types", None)
    use = use and (kinds is None or "sliding_attention" in kinds)
    if window is not None and use and int(window) < limit:  # a window of 0 is refused below
        # the graphs attend to everything: stay inside the window
        limit, source = int(window), "sliding_window"
    image_tokens, image = _one_image_tokens(config)
    least = image_tokens + MIN_TEXT_ROOM
    if limit < least:
        raise LlavaEdgeError(
            f"this model's context of {limit} tokens (its {source}) cannot hold {image} and "
            f"{MIN_TEXT_ROOM} tokens of question and answer ({least} tokens); export needs a "
            "longer context"
        )
    if requested is None:
        return limit
    if requested < least or requested > limit:
        raise LlavaEdgeError(
            f"--max-context must be between {least} ({image} and {MIN_TEXT_ROOM} tokens of "
            f"question and answer) and {limit} (the model's {source}), got {requested}"
        )
    return requested


def _one_image_tokens(config: Any) -> tuple[int, str]:
    """The tokens one image takes, and what that image is, in words.

    LLaVA's is its patch grid. A LLaVA-NeXT or OneVision image's count grows with its size (its
    tiles' features come after the base grid): it is the verification's picture's, so that the
    check that the graphs reproduce transformers has room for it.
    """
    from llava_edge.export.verify import sample_image
    from llava_edge.modeling import ANYRES_CLASSES
    from llava_edge.runtime.anyres import anyres_feature_count

    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    if config.model_type not in ANYRES_CLASSES:
        return side * side, "one image"
    anyres = AnyResSpec(
        grid_pinpoints=[[int(h), int(w)] for h, w in config.image_grid_pinpoints],
        tile_size=int(vision.image_size),
        base_size=[int(vision.image_size)] * 2,
        tile_features=side,
        newline=NEWLINE_FILE,
        max_patches=max_patches("", config) if config.model_type == "llava_onevision" else None,
    )
    size = sample_image().size
    count = anyres_feature_count(size, anyres)
    return count, f"one {size[0]}x{size[1]} image ({count} tokens with its AnyRes tiles)"


# ---- writing -----------------------------------------------------------------------------------


def _write_graphs(model: Any, manifest: Manifest, out: Path, opset: int, log: Any) -> None:
    import onnx
    import torch
    from tqdm import tqdm

    from llava_edge.export.graphs import Decoder, Projector, VisionEncoder

    dtype = next(model.parameters()).dtype
    graph_dtype = str(dtype).removeprefix("torch.")  # float32 or float16, as numpy names them
    image = manifest.image
    pixel_values = torch.randn(2, 3, image.height, image.width, dtype=dtype)
    with torch.no_grad():
        features = VisionEncoder(model)(pixel_values)
    text = manifest.text
    batch, seq, past = 2, 3, 5
    past_kv = [
        torch.randn(batch, text.num_kv_heads, past, text.head_dim, dtype=dtype)
        for _ in range(2 * text.num_layers)
    ]
    decoder_args = (
        torch.randn(batch, seq, text.hidden_size, dtype=dtype),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).repeat(batch, 1),
        *past_kv,
    )
    jobs = [
        ("vision_encoder", VisionEncoder(model), (pixel_values,)),
        ("projector", Projector(model), (features,)),
        ("decoder", Decoder(model), decoder_args),
    ]
    for name, module, args in jobs:
        graph = manifest.graphs[name]
        with tqdm(total=3, desc=f"export {name}", unit="step", leave=True) as bar:
            scratch = out / f".{name}.scratch"
            scratch.mkdir()
            bar.set_postfix_str("tracing")
            _torch_export(module, args, scratch / "graph.onnx", graph, opset)
            bar.update()
            bar.set_postfix_str("saving")
            traced = onnx.load(str(scratch / "graph.onnx"))
            save_graph(decompose_gelus(traced, np.dtype(graph_dtype)), out / graph.file)
            shutil.rmtree(scratch)
            bar.update()
            graph.details["opset"] = opset
            bar.update()


def decompose_gelus(model: Any, dtype: np.dtype) -> Any:
    """`model` with each ONNX Gelu (the one-op GELU torch.onnx writes from opset 20) as the Erf or
    Tanh ops torch.onnx writes at opsets before 20: the standard graphs are the form TensorRT
    builds, and TensorRT 10.3's ONNX parser is not documented to import Gelu
    (llava_edge.calib.trt_check), so every opset export offers gives a graph it takes.
    onnxruntime's CPU provider fuses the fp32 erf pattern back into one Gelu kernel at load; the
    tanh one stays as its ops in the standard graph and is FastGelu in the fused vision form
    (llava_edge.export.fused). dtype: the graph's floats."""
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
            nodes += _gelu_nodes(model, node, dtype)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _gelu_nodes(model: Any, gelu: Any, dtype: np.dtype) -> list[Any]:
    """One Gelu node's function in the ops, order and constants of torch.onnx's GELU before
    opset 20 (torch.onnx.symbolic_opset9.gelu); its constants go to the initializers."""
    from onnx import helper, numpy_helper

    x, y = gelu.input[0], gelu.output[0]
    made: list[Any] = []

    def op(kind: str, *inputs: str | float, out: str | None = None) -> str:
        name = out or f"{y}/gelu_{len(made)}"
        names = []
        for i, value in enumerate(inputs):
            if isinstance(value, float):
                constant = numpy_helper.from_array(np.asarray(value, dtype), f"{name}_c{i}")
                model.graph.initializer.append(constant)
                value = constant.name
            names.append(value)
        made.append(helper.make_node(kind, names, [name], name=name))
        return name

    if any(a.name == "approximate" and a.s == b"tanh" for a in gelu.attribute):
        cube = op("Mul", x, op("Mul", x, x))
        inner = op("Mul", float(np.sqrt(2 / np.pi)), op("Add", x, op("Mul", 0.044715, cube)))
        op("Mul", 0.5, op("Mul", x, op("Add", 1.0, op("Tanh", inner))), out=y)
    else:
        erf = op("Erf", op("Div", x, 1.4142135623730951))
        op("Mul", op("Mul", x, op("Add", erf, 1.0)), 0.5, out=y)
    return made


def _write_fused(model: Any, manifest: Manifest, out: Path, opset: int, log: Any) -> None:
    """onnxruntime's fused forms beside the standard graphs, at the standard graphs' opset: the
    decoder's and the vision encoder's (where their shapes allow; see llava_edge.export.fused)."""
    from tqdm import tqdm

    from llava_edge.export.fused import (
        can_fuse,
        fused_spec,
        write_fused_decoder,
        write_fused_vision,
    )

    said: list[str] = []  # logged once the bar is done, not through it
    with tqdm(total=2, desc="export fused forms", unit="graph", leave=True) as bar:
        bar.set_postfix_str("vision_encoder")
        vision = manifest.graphs["vision_encoder"]
        vision.fused, reason = write_fused_vision(
            out / vision.file, vision, model.config.vision_config, out
        )
        if reason:
            said.append(_no_fused_form(vision, "vision encoder", reason))
        bar.update()
        bar.set_postfix_str("decoder")
        graph = manifest.graphs["decoder"]
        reason = can_fuse(model.config.text_config)
        if reason:
            said.append(_no_fused_form(graph, "decoder", reason))
        else:
            spec = fused_spec(manifest.text, graph.precision)
            write_fused_decoder(model, manifest.text, out / spec.file, opset)
            spec.details["opset"] = opset
            graph.fused = spec
        bar.update()
    for line in said:
        log(line)


def _no_fused_form(graph: GraphSpec, name: str, reason: str) -> str:
    """Record why a graph has no fused form in the manifest (`details`); the line for the log."""
    graph.details["no_fused_form"] = reason
    return f"no fused {name} form: {reason}; onnxruntime runs the standard form"


def _torch_export(module: Any, args: tuple, path: Path, graph: GraphSpec, opset: int) -> None:
    import torch

    inputs, outputs = list(graph.inputs), list(graph.outputs)
    dynamic = {
        name: {axis: dim for axis, dim in enumerate(spec.shape) if isinstance(dim, str)}
        for name, spec in {**graph.inputs, **graph.outputs}.items()
    }
    with torch.no_grad(), quiet(*LOADER_LOGGERS):
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _write_text_files(loaded: LoadedCheckpoint, manifest: Manifest, out: Path) -> None:
    """The tokenizer (tokenizers' JSON) and the text embedding table."""
    tokenizer = loaded.processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is None:
        raise LlavaEdgeError(
            "the checkpoint's tokenizer has no fast (tokenizers) version to export"
        )
    backend.save(str(out / manifest.tokenizer))
    np.save(out / manifest.embeddings, _embedding_table(loaded.model, manifest.text.dtype))
    anyres = manifest.image.anyres
    if anyres is not None and anyres.newline:
        newline = loaded.model.model.image_newline.detach().float().numpy()
        np.save(out / anyres.newline, newline.astype(manifest.text.dtype))


def _embedding_table(model: Any, dtype: str) -> np.ndarray:
    """Every token's input embedding as the text model's embedding module gives it: Gemma's
    module scales its rows by sqrt(hidden_size), which image features never get."""
    import torch

    embedding = model.get_input_embeddings()
    rows = embedding.weight.shape[0]
    table = np.empty((rows, embedding.weight.shape[1]), dtype=dtype)
    with torch.no_grad():
        for start in range(0, rows, 8192):  # in chunks: no second whole copy of the table
            ids = torch.arange(start, min(start + 8192, rows))
            table[start : start + len(ids)] = embedding(ids).float().numpy()
    return table


def _num_image_tokens(vision_graph: Path) -> int:
    """Image tokens per image, as the exported graph produces them."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(vision_graph), providers=["CPUExecutionProvider"])
    (shape,) = [i.shape for i in session.get_outputs()]
    if isinstance(shape[1], int):
        return shape[1]
    spec = session.get_inputs()[0]
    dtype = np.float16 if "float16" in spec.type else np.float32
    dummy = np.zeros([1] + list(spec.shape[1:]), dtype=dtype)
    return int(session.run(None, {spec.name: dummy})[0].shape[1])
