"""`llava-edge convert`: original-format LLaVA checkpoints, built here from random Hugging Face
models by the inverse of the conversion, convert, export and reproduce the source model's greedy
tokens exactly in fp32.

Seven cases cover: safetensors and pickled .bin weights, one file and shards; MLP (2 and 3 layers)
and LLaVA v1's linear projector (named, and implied by an absent mm_projector_type); v1's
<im_start>/<im_end>; the tower from --vision, from a local dir named like mm_vision_tower, and
from the checkpoint's own weights (with and without a config dir); Llama and Mistral (GQA);
CLS dropped and kept; 'pad', centre-crop and AnyRes (LLaVA-1.6) preprocessing; LLaVA-NeXT's
Llama 3 (its tokenizer, rope_theta and template); a LoRA output over --base; a stage-1 projector
over --base and --vision.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from original_format import (
    TOWER_NAME,
    Layout,
    Source,
    make_source,
    original_state,
    original_tokenizer,
    save_original_tokenizer,
    save_tower,
    to_original,
    write_state,
)
from PIL import Image

from llava_edge.cli import main as cli
from llava_edge.convert import convert_checkpoint
from llava_edge.modeling import load_model
from llava_edge.runtime import Pipeline

QUESTION = "What is in the picture?"
NEW_TOKENS = 24


def quiet(*_args, **_kwargs) -> None:
    pass


@dataclass
class Case:
    spec: Source
    layout: Layout
    kind: str = "full"  # full, lora, stage1
    vision: str = "flag"  # flag: --vision; local: a dir named like the tower; none
    full_clip: bool = False  # the --vision dir is a whole CLIPModel, text tower included


CASES: dict[str, Case] = {
    # LLaVA-1.5 as released: mlp2x_gelu, pad to square, safetensors shards, tower by --vision.
    "v1.5-safetensors-shards": Case(Source(seed=1), Layout(shards=2)),
    # LLaVA v1: no mm_projector_type (linear), <im_start>/<im_end>, centre crop, .bin shards,
    # the tower only in the checkpoint (its config read off the weights: 64-wide heads).
    "v1-linear-bin-shards-tower-inside": Case(
        Source(
            projector="linear",
            im_start_end=True,
            aspect_ratio="square",
            select_layer=-1,
            vision=dict(hidden_size=64, num_attention_heads=1, intermediate_size=96),
            seed=2,
        ),
        Layout(weights="bin", shards=3, vision_weights=True, projector_key=False),
        vision="none",
    ),
    # Mistral with GQA, a 3-layer MLP, CLS kept; one .bin; a SentencePiece tokenizer.model alone;
    # the tower's weights in the checkpoint and its config from a local dir named like
    # mm_vision_tower (whose weights differ).
    "mistral-mlp3x-cls-bin": Case(
        Source(
            sentencepiece=True,
            backbone="mistral",
            projector="mlp3x_gelu",
            select_feature="cls_patch",
            text={"num_key_value_heads": 2},
            template="mistral_instruct",
            seed=3,
        ),
        Layout(weights="bin", vision_weights=True),
        vision="local",
    ),
    # LLaVA-1.6 (AnyRes, spatial_unpad, image_newline) with its fine-tuned tower inside; the
    # pinpoints have no transposes, so the original's [width, height] order must be honoured;
    # they are written as Python source, as some releases write them.
    "v1.6-anyres": Case(
        Source(aspect_ratio="anyres", pinpoints=[[32, 64], [96, 32]], template="llava_v1", seed=6),
        Layout(vision_weights=True, pinpoints_as_text=True),
    ),
    # LLaVA-NeXT's fork on Llama 3 (lmms-lab/llama3-llava-next-8b): Llama 3's byte-level
    # tokenizer and special tokens, rope_theta 500000 at the top of config.json, GQA, AnyRes.
    "llama3-next": Case(
        Source(
            llama3=True,
            aspect_ratio="anyres",
            pinpoints=[[64, 32], [32, 96]],
            text={"rope_theta": 500000.0, "num_key_value_heads": 2},
            template="llava_llama_3",
            seed=7,
        ),
        Layout(vision_weights=True),
    ),
    # A LoRA output whose non_lora_trainables.bin also holds a trained lm_head and the tower
    # (the local dir named like mm_vision_tower has other weights: the checkpoint's must win).
    "lora": Case(Source(seed=4), Layout(), kind="lora", vision="local"),
    "stage1": Case(Source(template="plain", seed=5), Layout(), kind="stage1", full_clip=True),
}


@dataclass
class Converted:
    case: Case
    source: Path  # the Hugging Face model the original was made from: the reference
    original: Path
    checkpoint: Path  # what convert wrote
    model_dir: Path  # what export made of it
    state: dict[str, Any]  # the original's weights


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def converted(request: pytest.FixtureRequest, tmp_path_factory) -> Converted:
    from llava_edge.export.exporter import export_checkpoint

    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    source = make_source(root / "source", case.spec)
    tower = save_tower(load_model(source), root / "clip", full=case.full_clip)
    original, base = root / "original", None
    if case.kind == "full":
        state = to_original(source, original, case.spec, case.layout)
    elif case.kind == "lora":
        source, base, state = make_lora_output(source, original, root, case.spec)
    else:
        base, state = make_stage1_output(source, original, root, case.spec)
    if case.vision == "local":  # beside the checkpoint, under the tower's last name
        local = original.parent / TOWER_NAME.split("/")[-1]
        shutil.copytree(tower, local)
        _scramble_weights(local)  # the checkpoint's own tower weights must win
    checkpoint = root / "converted"
    convert_checkpoint(
        original,
        checkpoint,
        vision=tower if case.vision == "flag" else None,
        base=base,
        log=quiet,
    )
    model_dir = root / "model"
    export_checkpoint(checkpoint, model_dir, verify=False, log=quiet)
    return Converted(case, source, original, checkpoint, model_dir, state)


def test_greedy_tokens_equal_the_source_model(converted: Converted) -> None:
    """Runtime over the exported conversion == the source model's generate(), id for id (its
    pixels from the PIL backend the runtime replays, also where torchvision is installed)."""
    from llava_edge.modeling import load_processor

    model = load_model(converted.source, dtype=torch.float32, attn_implementation="eager").eval()
    processor = load_processor(converted.source)
    image = picture(converted.case.spec.seed)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        reference = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )[0, inputs["input_ids"].shape[1] :].tolist()
    with Pipeline.load(converted.model_dir) as pipe:
        answer = pipe.answer(image, QUESTION, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert answer.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert len(reference) == NEW_TOKENS
    assert answer.token_ids == reference


def test_weights_are_the_source_models(converted: Converted) -> None:
    """Every tensor is the source's, but the rows the conversion adds to the vocabulary."""
    source = load_model(converted.source, dtype=torch.float32).state_dict()
    ours = load_model(converted.checkpoint, dtype=torch.float32).state_dict()
    assert source.keys() == ours.keys()
    vocab = original_tokenizer(converted.case.spec).get_vocab_size()
    for key, value in source.items():
        if key in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
            assert ours[key].shape == value.shape
            value, mine = value[:vocab], ours[key][:vocab]
        else:
            mine = ours[key]
        assert torch.equal(mine, value), key


def test_projector_is_the_originals_math(converted: Converted) -> None:
    """The converted projector, and the exported projector graph, compute what the original's
    nn.Linear / nn.Sequential(Linear, GELU, Linear, ...) computes from its own weights."""
    import onnxruntime as ort

    state = converted.state
    names = sorted(
        {k.split("mm_projector.")[1].split(".")[0] for k in state if "mm_projector." in k}
    )
    model = load_model(converted.checkpoint, dtype=torch.float32)
    width = model.config.vision_config.hidden_size
    features = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(0))
    if names == ["bias", "weight"]:  # nn.Linear
        expected = torch.nn.functional.linear(
            features, state["model.mm_projector.weight"], state["model.mm_projector.bias"]
        )
    else:  # nn.Sequential: Linear at even indices, GELU between
        hidden = features
        for i, index in enumerate(sorted(int(n) for n in names)):
            if i:
                hidden = torch.nn.functional.gelu(hidden)
            weight = state[f"model.mm_projector.{index}.weight"]
            hidden = torch.nn.functional.linear(
                hidden, weight, state[f"model.mm_projector.{index}.bias"]
            )
        expected = hidden
    with torch.no_grad():
        ours = model.model.multi_modal_projector(features)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    session = ort.InferenceSession(
        str(converted.model_dir / "projector.onnx"), providers=["CPUExecutionProvider"]
    )
    (graph,) = session.run(None, {"image_features": features.numpy()})
    np.testing.assert_allclose(graph, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_conversion_records_what_the_original_used(converted: Converted) -> None:
    from llava_edge.manifest import Manifest

    spec = converted.case.spec
    config = json.loads((converted.checkpoint / "config.json").read_text())
    info = json.loads((converted.checkpoint / "llava_edge.json").read_text())
    manifest = Manifest.load(converted.model_dir)
    assert info["template"] == spec.template  # inferred from the checkpoint
    assert config.get("mm_projector_type", "mlp2x_gelu") == spec.projector
    assert manifest.source["projector"] == spec.projector
    assert manifest.image.pad_to_square == (spec.aspect_ratio == "pad")
    assert (manifest.image.anyres is not None) == (spec.aspect_ratio == "anyres")
    assert ("<im_start><image><im_end>" in manifest.template.image) == spec.im_start_end
    assert config["text_config"]["vocab_size"] % 64 == 0


# ---- the other outputs of the original's training ----------------------------------------------


def make_lora_output(source: Path, out: Path, root: Path, spec: Source) -> tuple:
    """A LoRA output (adapter_model + non_lora_trainables.bin) and its base language model.

    The source's language model becomes base + B @ A * alpha / r (as peft merges it), so the
    source is exactly what merging the adapters into the base gives.
    """
    from safetensors.torch import save_file

    model = load_model(source, dtype=torch.float32)
    vocab = original_tokenizer(spec).get_vocab_size()
    base_state = original_state(model, spec, vocab, vision=False)
    rank, alpha = 4, 8
    generator = torch.Generator().manual_seed(spec.seed)
    adapters = {}
    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        for group, name in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")):
            linear = getattr(getattr(layer, group), name)
            out_features, in_features = linear.weight.shape
            a = torch.randn(rank, in_features, generator=generator) * 0.3
            b = torch.randn(out_features, rank, generator=generator) * 0.3
            key = f"base_model.model.model.layers.{i}.{group}.{name}"
            adapters[f"{key}.lora_A.weight"], adapters[f"{key}.lora_B.weight"] = a, b
            with torch.no_grad():
                linear.weight += (b @ a) * (alpha / rank)
    with torch.no_grad():  # a trained lm_head, saved beside the projector (original vocab)
        head = model.lm_head.weight
        head[:vocab] += torch.randn(head[:vocab].shape, generator=generator) * 0.3
        head[vocab:] = head[:vocab].mean(0)
    merged = root / "source-merged"
    model.save_pretrained(merged)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "llava_edge.json",
    ):
        shutil.copy(source / name, merged / name)
    base = write_base_model(
        model, base_state, root / "vicuna", Layout(weights="bin", shards=2), spec
    )
    out.mkdir()
    save_file(adapters, str(out / "adapter_model.safetensors"))
    trained = {
        k: v
        for k, v in original_state(model, spec, vocab, vision=True).items()
        if "mm_projector" in k or "vision_tower" in k or k == "lm_head.weight"
    }
    torch.save(
        {f"base_model.model.{k}": v for k, v in trained.items()}, out / "non_lora_trainables.bin"
    )
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": alpha,
                "lora_dropout": 0.05,
                "bias": "none",
                "target_modules": ["q_proj", "v_proj", "down_proj"],
                "base_model_name_or_path": "lmsys/vicuna-7b-v1.5",
                "fan_in_fan_out": False,
                "inference_mode": True,
            }
        )
    )
    from original_format import original_config

    (out / "config.json").write_text(
        json.dumps(original_config(model.config, spec, vocab, Layout()))
    )
    return merged, base, {**base_state, **trained}


def make_stage1_output(source: Path, out: Path, root: Path, spec: Source) -> tuple:
    """mm_projector.bin and the config, as pretraining (tune_mm_mlp_adapter) leaves them."""
    from original_format import original_config

    model = load_model(source, dtype=torch.float32)
    vocab = original_tokenizer(spec).get_vocab_size()
    state = original_state(model, spec, vocab, vision=False)
    base = write_base_model(model, state, root / "vicuna", Layout(), spec)
    out.mkdir()
    torch.save({k: v for k, v in state.items() if "mm_projector" in k}, out / "mm_projector.bin")
    config = original_config(model.config, spec, vocab, Layout())
    (out / "config.json").write_text(json.dumps({**config, "tune_mm_mlp_adapter": True}))
    return base, state


def write_base_model(model: Any, state: dict, out: Path, layout: Layout, spec: Source) -> Path:
    """The language model alone, as a Hugging Face causal LM dir (what --base takes)."""
    out.mkdir()
    text = {k: v for k, v in state.items() if "mm_projector" not in k and "vision_tower" not in k}
    write_state(out, text, layout)
    config = model.config.text_config.to_dict()
    config.update(vocab_size=text["model.embed_tokens.weight"].shape[0], pad_token_id=0)
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config))
    save_original_tokenizer(spec, out)
    return out


def picture(seed: int) -> Image.Image:
    """Noise with a bright block, wider than tall (padding and cropping both act)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    array[10:30, 20:50] = (230, 40, 40)
    return Image.fromarray(array)


def _scramble_weights(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(str(path))
    save_file({k: torch.randn_like(v) for k, v in state.items()}, str(path))


# ---- what convert refuses ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_original(tmp_path_factory) -> dict[str, Path]:
    """A small original checkpoint in .bin shards, with its tower beside it as --vision."""
    root = tmp_path_factory.mktemp("plain")
    spec = Source(seed=7)
    source = make_source(root / "source", spec)
    to_original(source, root / "original", spec, Layout(weights="bin", shards=2))
    return {"original": root / "original", "clip": save_tower(load_model(source), root / "clip")}


def _copy(plain: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(plain["original"], tmp_path / "original"))


class Payload:
    """Unpickling this runs code: it would create the file named."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pickled_object_is_refused_and_never_run(plain_original, tmp_path, capsys) -> None:
    original = _copy(plain_original, tmp_path)
    shard = sorted(original.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    marker = tmp_path / "payload-ran"
    torch.save({**state, "model.evil": Payload(marker)}, shard)
    out = tmp_path / "out"
    code = cli(["convert", str(original), str(out), "--vision", str(plain_original["clip"])])
    err = capsys.readouterr().err
    assert code == 1
    assert "pickled Python objects besides tensors" in err and shard.name in err
    assert "weights_only=True" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists()


def test_training_args_beside_the_weights_are_never_opened(plain_original, tmp_path) -> None:
    """The original's output dirs hold training_args.bin, a pickled Python object."""
    original = _copy(plain_original, tmp_path)
    marker = tmp_path / "payload-ran"
    torch.save(Payload(marker), original / "training_args.bin")
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), "--vision", str(plain_original["clip"])]) == 0
    assert not marker.exists() and (out / "model.safetensors").is_file()


def test_a_pickled_file_with_non_tensors_is_refused(plain_original, tmp_path, capsys) -> None:
    original = _copy(plain_original, tmp_path)
    shard = sorted(original.glob("pytorch_model-*.bin"))[0]
    torch.save({**torch.load(shard, weights_only=True), "step": 100}, shard)
    code = cli(
        ["convert", str(original), str(tmp_path / "out"), "--vision", str(plain_original["clip"])]
    )
    assert code == 1
    assert "something other than a dict of named tensors" in capsys.readouterr().err


@pytest.mark.parametrize("weights", ["bin shards with an index", "safetensors"])
def test_a_missing_vision_tower_names_what_to_fetch(
    plain_original, tmp_path, capsys, monkeypatch, weights
) -> None:
    """Said before a weight is read: the names in the index or in the safetensors' headers
    show there is no tower (it used to come after reading every shard, gigabytes)."""
    from safetensors.torch import save_file

    import llava_edge.convert.original as original_module

    original = _copy(plain_original, tmp_path)
    if weights == "safetensors":
        state = {}
        for shard in original.glob("pytorch_model*"):
            if shard.suffix == ".bin":
                state.update(torch.load(shard, weights_only=True))
            shard.unlink()
        save_file(state, str(original / "model.safetensors"))

    def never(*_args, **_kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(original_module, "read_sharded", never)
    code = cli(["convert", str(original), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"does not hold its vision tower {TOWER_NAME}" in err and "--vision" in err, err


@pytest.mark.parametrize(
    "tower", ["laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "/data/CLIP-ViT-L-14-laion2B-s32B-b82K"]
)
def test_a_laion_tower_held_without_its_config_is_refused(
    tmp_path, capsys, monkeypatch, tower
) -> None:
    """A LAION OpenCLIP tower (GELU, and wider heads in ViT-H) held in the checkpoint with no dir
    at hand: OpenAI's conventions read off its weights made another tower (quick GELU, 64-wide
    heads), a model that ran and answered wrong. Refused before a weight is read."""
    import llava_edge.convert.original as original_module

    vision = dict(hidden_size=64, num_attention_heads=2, intermediate_size=96, hidden_act="gelu")
    spec = Source(vision=vision, seed=8)
    source = make_source(tmp_path / "source", spec)
    original = tmp_path / "original"
    to_original(source, original, spec, Layout(vision_weights=True))
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "mm_vision_tower": tower}))

    def never(*_args, **_kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(original_module, "read_sharded", never)
    capsys.readouterr()  # what building the checkpoint printed
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out)]) == 1
    err = capsys.readouterr().err
    assert f"the vision tower {tower} is LAION's OpenCLIP" in err and "--vision" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_the_tower_beside_a_checkpoint_given_as_dot_is_found(
    plain_original, tmp_path, monkeypatch
) -> None:
    """`llava-edge convert . OUT` from inside the checkpoint: the tower saved beside it (under
    mm_vision_tower's last name) is found, as it is when the checkpoint is named by its path."""
    original = _copy(plain_original, tmp_path)
    shutil.copytree(plain_original["clip"], tmp_path / TOWER_NAME.split("/")[-1])
    monkeypatch.chdir(original)
    assert cli(["convert", ".", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_missing_local_tower_is_not_sent_to_the_hub(plain_original, tmp_path, capsys) -> None:
    """mm_vision_tower is often a dir on the training machine; `hf download /home/...` would
    fail: the error names the dir to copy and --vision."""
    original = _copy(plain_original, tmp_path)
    config = json.loads((original / "config.json").read_text())
    tower = "/home/train/checkpoints/clip-vit-large-patch14-336"
    (original / "config.json").write_text(json.dumps({**config, "mm_vision_tower": tower}))
    assert cli(["convert", str(original), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "hf download" not in err and tower in err and "--vision" in err, err
    assert "clip-vit-large-patch14-336" in err.split(tower, 1)[1], err
    assert len(err.strip().splitlines()) == 1


def test_lora_and_stage1_outputs_need_base(plain_original, tmp_path, capsys) -> None:
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    shutil.copy(plain_original["original"] / "config.json", stage1)
    torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2)}, stage1 / "mm_projector.bin")
    code = cli(
        ["convert", str(stage1), str(tmp_path / "out"), "--vision", str(plain_original["clip"])]
    )
    assert code == 1
    assert "stage-1 projector output: pass --base" in capsys.readouterr().err


def _stage1_over_base(plain: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, dict]:
    """A stage-1 output of the plain original's projector, with bare names ("0.weight"), and
    its language model as a safetensors --base; returns (stage1, base, projector)."""
    from safetensors.torch import save_file

    from llava_edge.convert.weights import read_sharded

    state = read_sharded(plain["original"])
    config = json.loads((plain["original"] / "config.json").read_text())
    base = tmp_path / "base"
    base.mkdir()
    text_state = {k: v for k, v in state.items() if "mm_projector" not in k}
    save_file(text_state, str(base / "model.safetensors"))
    text = {k: v for k, v in config.items() if not k.startswith(("mm_", "image_", "tokenizer_"))}
    (base / "config.json").write_text(json.dumps({**text, "model_type": "llama"}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(plain["original"] / name, base / name)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_text(json.dumps(config))
    projector = {k.split("mm_projector.")[1]: v for k, v in state.items() if "mm_projector" in k}
    torch.save(projector, stage1 / "mm_projector.bin")
    return stage1, base, projector


def test_a_stage1_projector_with_bare_names_converts(plain_original, tmp_path) -> None:
    """mm_projector.bin holds the projector alone: its tensors may be named as the original's
    nn.Sequential names them ("0.weight"), without `model.mm_projector.`; they were taken for
    language model weights and convert found no projector."""
    from safetensors.torch import load_file

    stage1, base, projector = _stage1_over_base(plain_original, tmp_path)
    out = tmp_path / "out"
    args = ["convert", str(stage1), str(out), "--base", str(base)]
    assert cli([*args, "--vision", str(plain_original["clip"])]) == 0
    converted = load_file(str(out / "model.safetensors"))
    for i, layer in ((1, "0"), (2, "2")):
        for part in ("weight", "bias"):
            name = f"model.multi_modal_projector.linear_{i}.{part}"
            assert torch.equal(converted[name], projector[f"{layer}.{part}"])


def test_a_stage1_output_without_a_tower_says_so_before_reading_base(
    plain_original, tmp_path, capsys, monkeypatch
) -> None:
    """A stage-1 projector never holds the tower, and the --base headers show whether it does:
    the missing tower was reported only after the base's weights (gigabytes) were read."""
    import llava_edge.convert.original as original_module

    stage1, base, _ = _stage1_over_base(plain_original, tmp_path)

    def never(*_args, **_kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(original_module, "read_sharded", never)
    assert cli(["convert", str(stage1), str(tmp_path / "out"), "--base", str(base)]) == 1
    err = capsys.readouterr().err
    assert f"does not hold its vision tower {TOWER_NAME}" in err and "--vision" in err, err


def test_a_hugging_face_checkpoint_is_sent_to_export(tiny_checkpoint, tmp_path, capsys) -> None:
    assert cli(["convert", str(tiny_checkpoint), str(tmp_path / "out")]) == 1
    assert "already a Hugging Face LLaVA checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["linear", "mlp3x_gelu"])
def test_projector_weights_must_match_the_projector_type(
    plain_original, tmp_path, capsys, monkeypatch, kind
) -> None:
    """Weights of two layers under a type of one, or of three (which blamed 'the LLaVA weights'
    for missing linear_3); said before the language model is built (a 7B one, in memory beside
    its weights, could take the machine's memory before the one line came)."""
    import llava_edge.convert.checkpoint as checkpoint_module

    def never(*_args, **_kwargs):
        raise AssertionError("the language model was built")

    monkeypatch.setattr(checkpoint_module, "_language_model", never)
    original = _copy(plain_original, tmp_path)
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "mm_projector_type": kind}))
    code = cli(
        ["convert", str(original), str(tmp_path / "out"), "--vision", str(plain_original["clip"])]
    )
    assert code == 1
    assert f"do not match its mm_projector_type '{kind}'" in capsys.readouterr().err


PROJECTORS_REFUSED = {
    kind: ({"mm_projector_type": kind}, f"unknown projector type '{kind}'")
    for kind in ("identity", "mlp1000x_gelu", "mlp2x_relu")
}
PROJECTORS_REFUSED["anyres linear"] = (
    {
        "mm_projector_type": "linear",
        "image_aspect_ratio": "anyres",
        "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": [[32, 64]],
    },
    "anyres with mm_projector_type 'linear' has no Hugging Face class",
)


@pytest.mark.parametrize("kind", list(PROJECTORS_REFUSED))
def test_a_projector_convert_cannot_build_is_refused_before_the_weights_are_read(
    plain_original, tmp_path, capsys, monkeypatch, kind
) -> None:
    """Named in one line before a weight is read (it came after reading every shard, gigabytes;
    an identity projector, which has no weights, was reported as a checkpoint without its
    projector's)."""
    import llava_edge.convert.original as original_module

    edit, message = PROJECTORS_REFUSED[kind]
    original = _copy(plain_original, tmp_path)
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, **edit}))

    def never(*_args, **_kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(original_module, "read_sharded", never)
    args = [
        "convert",
        str(original),
        str(tmp_path / "out"),
        "--vision",
        str(plain_original["clip"]),
    ]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert message in err and "config.json" in err, err
    assert len(err.strip().splitlines()) == 1


ANYRES = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}
BAD_CONFIGS = {
    "flat pinpoints": (
        {**ANYRES, "image_grid_pinpoints": [336, 672]},
        "anyres needs image_grid_pinpoints as [width, height] pairs, got [336, 672]",
    ),
    "pinpoints as text": (
        {**ANYRES, "image_grid_pinpoints": "(1x1),...,(3x3)"},
        "anyres needs image_grid_pinpoints as [width, height] pairs",
    ),
    "pinpoints that cut partial tiles": (
        {**ANYRES, "image_grid_pinpoints": "[(32, 64), (64, 50)]"},
        "image_grid_pinpoints [64, 50] is not a whole number of the vision tower's 32-pixel tiles",
    ),
    "anyres with the CLS token": (
        {**ANYRES, "image_grid_pinpoints": [[32, 64]], "mm_vision_select_feature": "cls_patch"},
        "anyres with mm_vision_select_feature 'cls_patch' has no feature grid",
    ),
    "a Qwen2 LLaVA-NeXT": (
        {"model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"]},
        "model_type 'llava_qwen' is not one convert takes (the original LLaVA's Llama and "
        "Mistral models",
    ),
    "an S2 multi-scale tower": ({"s2": True, "s2_scales": "336,672"}, "S2 multi-scale"),
    # With a CLIP dir as --vision it converted with a tower it was not trained with; without,
    # it was sent to download the SigLIP (`hf download`), which --vision then refused.
    "a SigLIP tower": (
        {"mm_vision_tower": "google/siglip-so400m-patch14-384"},
        "the vision tower google/siglip-so400m-patch14-384 is a SigLIP one",
    ),
    "select layer past the tower": (
        {"mm_vision_select_layer": -7},
        "mm_vision_select_layer -7 is outside the vision tower's 2 layers (from -3 to 2)",
    ),
    "max length not a number": (
        {"tokenizer_model_max_length": "2k"},
        "tokenizer_model_max_length '2k' is not an integer",
    ),
    # These were rounded, or taken as 1, or kept as a negative length: never a number the
    # original's config could mean.
    "select layer not whole": (
        {"mm_vision_select_layer": -2.5},
        "mm_vision_select_layer -2.5 is not an integer",
    ),
    "select layer a boolean": (
        {"mm_vision_select_layer": True},
        "mm_vision_select_layer True is not an integer",
    ),
    "max length not positive": (
        {"tokenizer_model_max_length": -5},
        "tokenizer_model_max_length -5 is not a positive integer",
    ),
    "text config against its weights": (
        {"intermediate_size": 200},
        "language model weights do not fit its config (6 of another shape, e.g. "
        "model.layers.0.mlp.down_proj.weight: [48, 96] in the weights, [48, 200] by the config)",
    ),
}


@pytest.mark.parametrize("bad", list(BAD_CONFIGS))
def test_a_config_convert_cannot_honour_is_one_line(plain_original, tmp_path, capsys, bad) -> None:
    """Refused before anything is written, in one line naming the key; never a traceback, and
    never a checkpoint that export or the runtime would then fail on."""
    edit, message = BAD_CONFIGS[bad]
    original = _copy(plain_original, tmp_path)
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, **edit}))
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), "--vision", str(plain_original["clip"])]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("bad", ["pinpoints that cut partial tiles", "select layer past the tower"])
def test_a_setting_the_tower_cannot_take_is_said_before_building(
    plain_original, tmp_path, capsys, monkeypatch, bad
) -> None:
    """Known once the tower's config is: they came after the language model (7B) was built."""
    import llava_edge.convert.checkpoint as checkpoint_module

    def never(*_args, **_kwargs):
        raise AssertionError("the language model was built")

    monkeypatch.setattr(checkpoint_module, "_language_model", never)
    test_a_config_convert_cannot_honour_is_one_line(plain_original, tmp_path, capsys, bad)


def test_optional_keys_may_be_absent_or_null(plain_original, tmp_path) -> None:
    """The original's defaults apply where its config leaves a key out or writes null."""
    original = _copy(plain_original, tmp_path)
    config = json.loads((original / "config.json").read_text())
    for key in ("mm_vision_select_feature", "mm_use_im_start_end", "image_aspect_ratio"):
        del config[key]
    config.update(mm_vision_select_layer=None, tokenizer_model_max_length=None, vocab_size=None)
    config.update(mm_hidden_size=32.0)  # a whole float is an integer
    (original / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), "--vision", str(plain_original["clip"])]) == 0
    converted = json.loads((out / "config.json").read_text())
    assert converted["vision_feature_layer"] == -1  # the original's default
    assert converted["vision_feature_select_strategy"] == "default"


def test_the_patch_embeddings_as_select_layer_are_the_originals(plain_original, tmp_path) -> None:
    """mm_vision_select_layer 0 is the original's hidden_states[0], the patch embeddings. Written
    as the int 0, transformers' LLaVA asks the tower for no hidden states and fails, and export
    refuses the checkpoint; the list [0] selects the same."""
    from transformers import CLIPVisionModel

    from llava_edge.convert.weights import read_sharded

    original = _copy(plain_original, tmp_path)
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "mm_vision_select_layer": 0}))
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), "--vision", str(plain_original["clip"])]) == 0
    model = load_model(out, dtype=torch.float32)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.model.get_image_features(pixels).pooler_output[0]
        tower = CLIPVisionModel.from_pretrained(plain_original["clip"]).eval()
        patches = tower(pixels, output_hidden_states=True).hidden_states[0][0, 1:]
        state = read_sharded(original)
        hidden = torch.nn.functional.linear(
            patches, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"]
        )
        expected = torch.nn.functional.linear(
            torch.nn.functional.gelu(hidden),
            state["model.mm_projector.2.weight"],
            state["model.mm_projector.2.bias"],
        )
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_embedding_rows_past_the_tokenizer_are_dropped_as_the_original_drops_them(
    plain_original, tmp_path
) -> None:
    """The original's loader resizes the embeddings to its tokenizer (resize_token_embeddings(
    len(tokenizer))), so rows past it (a base padded to a multiple) are never scored. Kept, such
    a row could outscore every token and greedy decoding pick an id that has no token: the
    conversion equals that of the checkpoint without them."""
    from safetensors.torch import load_file

    padded = _copy(plain_original, tmp_path)
    for shard in padded.glob("pytorch_model-*.bin"):
        state = torch.load(shard, weights_only=True)
        for key in set(state) & {"model.embed_tokens.weight", "lm_head.weight"}:
            extra = torch.full((8, state[key].shape[1]), 5.0, dtype=state[key].dtype)
            state[key] = torch.cat([state[key], extra])
        torch.save(state, shard)
    outs = {}
    for name, original in (("plain", plain_original["original"]), ("padded", padded)):
        outs[name] = tmp_path / name
        convert_checkpoint(original, outs[name], vision=plain_original["clip"], log=quiet)
    plain, ours = (load_file(str(outs[n] / "model.safetensors")) for n in ("plain", "padded"))
    assert plain.keys() == ours.keys()
    for key, value in plain.items():
        assert torch.equal(ours[key], value), key


def test_a_full_output_dir_is_kept_without_force(plain_original, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [
        "convert",
        str(plain_original["original"]),
        str(out),
        "--vision",
        str(plain_original["clip"]),
    ]
    assert cli(args) == 1
    assert "pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli([*args, "--force", "--template", "llava_v1"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / "llava_edge.json").read_text())["template"] == "llava_v1"


LLAVA_LLAMA_2_SYSTEM = (  # the original's conv_llava_llama_2
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)


def llava_llama_2_prompt(turns: list[tuple[str, str | None]], image: bool) -> str:
    """The original's conv_llava_llama_2 prompt (its LLAMA_2 separator style): every user turn
    `<s>[INST] Q [/INST]`, the system prompt in <<SYS>> inside the first, each answer
    ` A </s>`, and the first `<s>` left to the tokenizer's BOS."""
    text = ""
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            question = f"<<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n" + (
                f"<image>\n{question}" if image else question
            )
        text += f"<s>[INST] {question} [/INST]"
        if answer is not None:
            text += f" {answer} </s>"
    return text.removeprefix("<s>")


def test_conversion_is_repeatable(plain_original, tmp_path) -> None:
    """The embedding rows convert adds are drawn at random, from a fixed seed: converting the
    same original twice, whatever the process drew before, gives the same weights."""
    import torch
    from safetensors.torch import load_file

    args = ["convert", str(plain_original["original"])]
    for name in ("one", "two"):
        torch.rand(3)  # the process's random state moves on between the runs
        assert cli([*args, str(tmp_path / name), "--vision", str(plain_original["clip"])]) == 0
    one, two = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_a_chatml_original_is_prompted_and_stopped_as_chatml(tiny_checkpoint) -> None:
    """docs/checkpoints.md: a tokenizer with <|im_start|> (LLaVA-1.6 Yi-34B) gets chatml_direct,
    and generation stops at its <|im_end|> as well as at EOS; a Vicuna's stops at EOS alone."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from llava_edge.convert.checkpoint import _generation_config, infer_template
    from llava_edge.runtime.template import TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    full = SimpleNamespace(kind="full", settings=SimpleNamespace(text_model="llama", anyres=False))
    full.directory = Path("llava-v1.5-7b")
    assert infer_template(full, tokenizer) == "vicuna_v1"
    eos = tokenizer.eos_token_id
    assert _generation_config(tokenizer, TEMPLATES["vicuna_v1"].answer_end).eos_token_id == eos
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert infer_template(full, tokenizer) == "chatml_direct"
    config = _generation_config(tokenizer, TEMPLATES["chatml_direct"].answer_end)
    assert config.eos_token_id == [eos, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_a_llama_2_chat_llava_is_prompted_as_the_original(plain_original, tmp_path) -> None:
    """The original names its Llama-2-chat LLaVA checkpoints `llava-llama-2-...` and prompts
    them in Llama 2's format (conv_llava_llama_2), not Vicuna's: convert chooses that template
    by the name, and the processor's chat template and the runtime's ids are the original's,
    token for token (a later turn's `<s>` is the BOS token, as the original's tokenizer reads
    it)."""
    from transformers import AutoProcessor

    from llava_edge.export.exporter import export_checkpoint

    original = Path(
        shutil.copytree(plain_original["original"], tmp_path / "llava-llama-2-7b-chat-preview")
    )
    checkpoint = tmp_path / "converted"
    convert_checkpoint(original, checkpoint, vision=plain_original["clip"], log=quiet)
    assert json.loads((checkpoint / "llava_edge.json").read_text())["template"] == "llava_llama_2"
    turns = [("What is it?", "A cat."), ("Which colour?", "Grey."), ("Is it asleep?", None)]
    messages = []
    for i, (question, answer) in enumerate(turns):
        image = [{"type": "image"}] if i == 0 else []
        messages.append({"role": "user", "content": [*image, {"type": "text", "text": question}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    processor = AutoProcessor.from_pretrained(checkpoint)
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == llava_llama_2_prompt(turns, image=True)

    model_dir = tmp_path / "model"
    export_checkpoint(checkpoint, model_dir, verify=False, log=quiet)
    with Pipeline.load(model_dir) as pipe:
        ids = pipe.conversation_ids(turns)
    want = processor.tokenizer(llava_llama_2_prompt(turns, image=False))["input_ids"]
    assert ids == want
    bos = processor.tokenizer.bos_token_id
    assert ids.count(bos) == 3 and ids[0] == bos  # the first turn's, then each later turn's
    assert ids.count(processor.tokenizer.eos_token_id) == 2  # each answer's


def fork_llama3_ids(
    tokenizer: Any, turns: list[tuple[str, str | None]], image: bool, system: str
) -> list[int]:
    """The ids LLaVA-NeXT's fork trains its Llama 3 checkpoints on (train.py preprocess_llama3):
    Meta's chat template applied to the system message alone (BOS first), then to each message
    alone with its BOS dropped, the image as `<image>\\n` before the first question; the prompt
    left open for an answer with the assistant's header, as Meta's template opens it."""
    from chat_templates import LLAMA3

    def encode(message: dict[str, str], generation: bool = False) -> list[int]:
        return tokenizer.apply_chat_template(
            [message],
            chat_template=LLAMA3,
            tokenize=True,
            add_generation_prompt=generation,
            return_dict=True,
        )["input_ids"]

    ids = list(encode({"role": "system", "content": system}))
    for i, (question, answer) in enumerate(turns):
        content = f"<image>\n{question}" if image and i == 0 else question
        ids += encode({"role": "user", "content": content})[1:]
        if answer is not None:
            ids += encode({"role": "assistant", "content": answer})[1:]
    header = encode({"role": "user", "content": ""}, generation=True)
    return ids + header[len(encode({"role": "user", "content": ""})) :]


@pytest.mark.parametrize("converted", ["llama3-next"], indirect=True)
def test_a_llama_3_next_is_prompted_and_stopped_as_the_fork_trained_it(converted) -> None:
    """LLaVA-NeXT's Llama 3 checkpoints (lmms-lab/llama3-llava-next-8b) were trained with the
    fork's conv_llava_llama_3: Llama 3's headers, its default system prompt, turns closed by
    <|eot_id|>. Convert picks it by the tokenizer's Llama 3 tokens; the processor's chat template
    and the runtime make the fork's ids, token for token, with and without an image and with a
    system prompt given; generation stops at <|eot_id|> as well as at EOS."""
    from transformers import AutoProcessor

    from llava_edge.manifest import Manifest
    from llava_edge.runtime.template import LLAVA_LLAMA_2_SYSTEM as DEFAULT_SYSTEM

    turns = [("What is it?", "A cat."), ("Which colour?", "Grey."), ("Is it asleep?", None)]
    processor = AutoProcessor.from_pretrained(converted.checkpoint)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    for i, (question, answer) in enumerate(turns):
        image = [{"type": "image"}] if i == 0 else []
        messages.append({"role": "user", "content": [*image, {"type": "text", "text": question}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    for system, given in ((DEFAULT_SYSTEM, messages[1:]), ("Be brief.", messages)):
        rendered = processor.apply_chat_template(given, add_generation_prompt=True)
        assert tokenizer(rendered)["input_ids"] == fork_llama3_ids(tokenizer, turns, True, system)

    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in Manifest.load(converted.model_dir).tokens.eos_token_ids
    with Pipeline.load(converted.model_dir) as pipe:
        pixels = pipe.image_pixels(picture(0))
        for system in (None, "Be brief."):
            fork_system = system or DEFAULT_SYSTEM
            ids = pipe.conversation_ids(turns, system=system)
            assert ids == fork_llama3_ids(tokenizer, turns, False, fork_system)
            ids = pipe.conversation_ids(turns, pixels, image_turn=0, system=system)
            one_image = [t for i, t in enumerate(ids) if t != image_id or ids[i - 1] != image_id]
            assert one_image == fork_llama3_ids(tokenizer, turns, True, fork_system)


def test_force_never_replaces_an_input(plain_original, tmp_path, capsys, monkeypatch) -> None:
    """--force replaces the output dir; an output that is the original, --base, --vision or the
    tower found beside the original is an input, and refused before anything is written, and before a
    weight is read (the tower found by name was refused only after reading them all)."""
    import llava_edge.convert.original as original_module

    def never(*_args, **_kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(original_module, "read_sharded", never)
    original = _copy(plain_original, tmp_path)
    clip = Path(shutil.copytree(plain_original["clip"], tmp_path / "clip"))
    local = Path(shutil.copytree(plain_original["clip"], tmp_path / TOWER_NAME.split("/")[-1]))
    base = Path(shutil.copytree(plain_original["original"], tmp_path / "base"))
    runs = {
        "the original checkpoint": [str(original), "--vision", str(clip)],
        "the --base model": [str(base), "--base", str(base), "--vision", str(clip)],
        "the --vision tower": [str(clip), "--vision", str(clip)],
        "the vision tower": [str(local)],  # found by mm_vision_tower's name
    }
    for name, args in runs.items():
        before = sorted(p.name for p in Path(args[0]).iterdir())
        assert cli(["convert", str(original), *args, "--force"]) == 1
        err = capsys.readouterr().err
        assert f"holds {name} " in err and "choose another output dir" in err, err
        assert sorted(p.name for p in Path(args[0]).iterdir()) == before


def original_legacy_ids(prompt: str, image_id: int) -> list[int]:
    """A prompt's ids as the original computes them with a SentencePiece tokenizer read as
    legacy (what transformers 4, which it ran with, made of a tokenizer_config.json without
    `legacy`): its tokenizer_image_token cuts the prompt at each <image> and tokenizes each
    piece alone, and the legacy LlamaTokenizer gives every run of text between special tokens
    SentencePiece's dummy prefix."""
    import sentencepiece
    from original_format import sentencepiece_model

    model = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model())
    ids = [model.bos_id()]
    for i, chunk in enumerate(prompt.split("<image>")):
        ids += [image_id] if i else []
        for j, text in enumerate(chunk.split("</s>")):
            ids += [model.eos_id()] if j else []
            ids += model.encode(text) if text else []
    return ids


@pytest.mark.parametrize("legacy", ["absent", "null"])
def test_a_tokenizer_config_without_legacy_tokenizes_as_the_original(
    plain_original, tmp_path, legacy
) -> None:
    """Older originals have a tokenizer_config.json without `legacy` (or with `legacy: null`),
    which the original's transformers read as legacy=True and transformers 5 as False: the text
    after the image and after each `</s>` lost its dummy prefix, and the model saw another
    prompt than the one it was trained on."""
    from original_format import SENTENCEPIECE_CONFIG, sentencepiece_model
    from tokenizers import Tokenizer
    from transformers import AutoProcessor

    original = _copy(plain_original, tmp_path)
    (original / "tokenizer.json").unlink()
    (original / "tokenizer.model").write_bytes(sentencepiece_model())
    config = {k: v for k, v in SENTENCEPIECE_CONFIG.items() if k != "legacy"}
    if legacy == "null":
        config["legacy"] = None
    (original / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    convert_checkpoint(original, out, vision=plain_original["clip"], log=quiet)
    prompt = (
        "A chat between a curious user and an artificial intelligence assistant. USER: "
        "<image>\nWhat is it? ASSISTANT: A cat.</s>USER: Which colour? ASSISTANT:"
    )
    processor = AutoProcessor.from_pretrained(out)
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    want = original_legacy_ids(prompt, image)
    runtime = Tokenizer.from_file(str(out / "tokenizer.json"))  # what the runtime encodes with
    assert [1, *runtime.encode(prompt, add_special_tokens=False).ids] == want
    assert processor.tokenizer(prompt)["input_ids"] == want


def test_missing_extras_are_named(plain_original, tmp_path, monkeypatch, capsys) -> None:
    """A SentencePiece-only tokenizer without sentencepiece, a LoRA output without peft."""
    from original_format import SENTENCEPIECE_CONFIG, sentencepiece_model

    import llava_edge.convert.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_has", lambda module: False)
    original = _copy(plain_original, tmp_path)
    (original / "tokenizer.json").unlink()
    (original / "tokenizer.model").write_bytes(sentencepiece_model())
    (original / "tokenizer_config.json").write_text(json.dumps(SENTENCEPIECE_CONFIG))
    args = [
        "convert",
        str(original),
        str(tmp_path / "out"),
        "--vision",
        str(plain_original["clip"]),
    ]
    assert cli(args) == 1
    assert "pip install 'llava-edge[convert]' (sentencepiece)" in capsys.readouterr().err
    lora = tmp_path / "lora"
    lora.mkdir()
    shutil.copy(plain_original["original"] / "config.json", lora)
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    torch.save(
        {"base_model.model.model.mm_projector.0.weight": torch.zeros(1)}, lora / "adapter_model.bin"
    )
    args = ["convert", str(lora), str(tmp_path / "out2"), "--base", str(plain_original["original"])]
    assert cli([*args, "--vision", str(plain_original["clip"])]) == 1
    assert "merging a LoRA output needs peft" in capsys.readouterr().err


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 9976576152\n"
)
DAMAGED_SHARDS = {
    # A clone made without Git LFS: its .bin text used to be read as a pickle of Python objects.
    "a Git LFS pointer": (LFS_POINTER, "is a Git LFS pointer, not the file: fetch the files"),
    # Not a pickle at all: torch's weights-only unpickler raised a KeyError traceback.
    "a text file": ("hello\n", "as PyTorch weights: not a file torch.save wrote, or a damaged one"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_SHARDS))
def test_a_shard_that_is_not_weights_is_named(plain_original, tmp_path, capsys, damage) -> None:
    text, message = DAMAGED_SHARDS[damage]
    original = _copy(plain_original, tmp_path)
    shard = sorted(original.glob("pytorch_model-*.bin"))[0]
    shard.write_text(text)
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), "--vision", str(plain_original["clip"])]) == 1
    err = capsys.readouterr().err
    assert f"{shard}" in err and message in err and len(err.strip().splitlines()) == 1, err
    assert "pickled Python objects" not in err and not out.exists()


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_a_half_downloaded_set_of_shards_names_the_missing_one(
    plain_original, tmp_path, capsys, weights
) -> None:
    """Shards fetched one by one, the index and one shard not yet there: the shards' own names
    say how many there are (it was 'no model.embed_tokens.weight', or a list of missing
    tensors; without --vision, a tower the missing shard may hold was reported as not in the
    checkpoint)."""
    from safetensors.torch import save_file

    original = _copy(plain_original, tmp_path)
    (original / "pytorch_model.bin.index.json").unlink()
    (original / "pytorch_model-00002-of-00002.bin").unlink()
    vision = ["--vision", str(plain_original["clip"])]
    missing = "pytorch_model-00002-of-00002.bin"
    if weights == "safetensors":
        shard = original / "pytorch_model-00001-of-00002.bin"
        save_file(
            torch.load(shard, weights_only=True), original / "model-00001-of-00002.safetensors"
        )
        shard.unlink()
        vision, missing = [], "model-00002-of-00002.safetensors"
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), *vision]) == 1
    err = capsys.readouterr().err
    assert f"{missing} is missing" in err and "download is incomplete" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_lfs_pointer_for_safetensors_is_named(tmp_path) -> None:
    from llava_edge.convert.weights import read_weights
    from llava_edge.errors import LlavaEdgeError

    path = tmp_path / "model.safetensors"
    path.write_text(LFS_POINTER)
    with pytest.raises(LlavaEdgeError, match="is a Git LFS pointer"):
        read_weights(path)


@pytest.mark.parametrize("name", [3, "../elsewhere.bin", "/abs/model.bin"])
def test_an_index_names_only_files_beside_it(tmp_path, name) -> None:
    """A weight_map value that is not a file name in the index's dir is refused by name (a
    number raised a TypeError traceback; '../x' was read from outside the checkpoint)."""
    from llava_edge.convert.weights import read_sharded
    from llava_edge.errors import LlavaEdgeError

    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": name}})
    )
    with pytest.raises(LlavaEdgeError, match="an index names files beside it"):
        read_sharded(tmp_path)


def _clip(out: Path, **overrides: Any) -> Path:
    from original_format import VISION
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**{**VISION, **overrides})).save_pretrained(out)
    return out


WRONG_TOWERS = {
    # Wider than the projector's input: the error blamed "the LLaVA weights" and its own config.
    "another hidden size": (
        {},
        {"hidden_size": 64},
        "has hidden size 64; the checkpoint's projector takes 32 (mm_hidden_size)",
    ),
    # A 48-pixel CLIP for a model trained on a 32-pixel one converted, and then answered from
    # 36 image features where it was trained on 16.
    "another image size": (
        {"mm_vision_tower": "openai/clip-vit-tiny-patch8-32"},
        {"image_size": 48},
        "takes 48-pixel images in 8-pixel patches; openai/clip-vit-tiny-patch8-32 takes "
        "32-pixel images in 8-pixel patches",
    ),
    # OpenAI's names without a size are 224-pixel towers (LLaVA v1's clip-vit-large-patch14).
    "an OpenAI name without a size": (
        {"mm_vision_tower": "openai/clip-vit-large-patch8"},
        {},
        "takes 32-pixel images in 8-pixel patches; openai/clip-vit-large-patch8 takes "
        "224-pixel images",
    ),
}


@pytest.mark.parametrize("wrong", list(WRONG_TOWERS))
def test_a_vision_tower_it_was_not_trained_with_is_refused(
    plain_original, tmp_path, capsys, wrong
) -> None:
    edit, tower, message = WRONG_TOWERS[wrong]
    original = _copy(plain_original, tmp_path)
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, **edit}))
    clip = _clip(tmp_path / "clip", **tower)
    capsys.readouterr()  # saving it reports progress
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), "--vision", str(clip)]) == 1
    err = capsys.readouterr().err
    assert message in err and "pass --vision with the CLIP checkpoint" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_tower_whose_name_states_its_size_converts(plain_original, tmp_path) -> None:
    original = _copy(plain_original, tmp_path)
    config = json.loads((original / "config.json").read_text())
    tower = "./checkpoints/clip-vit-tiny-patch8-32"  # a local path, as the original allows
    (original / "config.json").write_text(json.dumps({**config, "mm_vision_tower": tower}))
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), "--vision", str(plain_original["clip"])]) == 0


def test_a_llava_checkpoint_as_vision_is_refused(plain_original, tiny_checkpoint, tmp_path, capsys):
    """CLIPVisionConfig reads a LLaVA dir's vision_config; its weights then did not fit (39
    missing): the dir is named for what it is."""
    out = tmp_path / "out"
    args = ["convert", str(plain_original["original"]), str(out), "--vision", str(tiny_checkpoint)]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert "is a 'llava' model; LLaVA's vision tower is CLIP" in err and not out.exists()


def test_a_base_it_was_not_trained_on_is_refused(plain_original, tmp_path, capsys) -> None:
    """A CLIP dir as --base was 'has no tokenizer files; pass --base with the tokenizer'; a
    base of another width blamed the output's own config for 20 tensors of another shape."""
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    config = json.loads((plain_original["original"] / "config.json").read_text())
    (stage1 / "config.json").write_text(json.dumps(config))
    torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2)}, stage1 / "mm_projector.bin")
    wider = Path(shutil.copytree(plain_original["original"], tmp_path / "wider"))
    (wider / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    bases = {
        plain_original["clip"]: "is a 'clip_vision_model' model, not a Llama or Mistral language "
        "model: pass the language model it was trained on",
        wider: f"--base {wider} has hidden_size 64; {stage1} was trained on one of 48",
    }
    for base, message in bases.items():
        out = tmp_path / "out"
        args = ["convert", str(stage1), str(out), "--base", str(base)]
        assert cli([*args, "--vision", str(plain_original["clip"])]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_base_for_a_full_checkpoint_is_refused_or_its_tokenizer(plain_original, tmp_path, capsys):
    """--base was ignored without a word where the checkpoint holds everything; where it lacks
    a tokenizer, --base gives it."""
    original = _copy(plain_original, tmp_path)
    vision = ["--vision", str(plain_original["clip"])]
    base = Path(shutil.copytree(original, tmp_path / "base"))
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), "--base", str(base), *vision]) == 1
    assert "is a full checkpoint with its own language model and tokenizer: drop --base" in (
        capsys.readouterr().err
    )
    assert not out.exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (original / name).unlink()
    assert cli(["convert", str(original), str(out), "--base", str(base), *vision]) == 0
    assert (out / "tokenizer.json").is_file()


def test_a_wrong_tower_is_refused_before_the_weights_are_read(
    plain_original, tmp_path, capsys, monkeypatch
) -> None:
    import llava_edge.convert.original as original_module

    def never(*_args, **_kwargs):
        raise AssertionError("the weights were read")

    clip = _clip(tmp_path / "clip", hidden_size=64)
    capsys.readouterr()
    monkeypatch.setattr(original_module, "read_sharded", never)
    args = ["convert", str(plain_original["original"]), str(tmp_path / "out")]
    assert cli([*args, "--vision", str(clip)]) == 1
    assert "has hidden size 64; the checkpoint's projector takes 32" in capsys.readouterr().err


BROKEN_TOKENIZERS = {
    # Was a ten-line ValueError from transformers; now --base's tokenizer would be used.
    "tokenizer_config.json alone": ({}, "has no tokenizer files; pass --base with the tokenizer"),
    # Was a KeyError traceback from transformers.
    "a tokenizer.json without its parts": (
        {"tokenizer.json": '{"version": "1.0"}'},
        "cannot load the tokenizer in",
    ),
    # Was "`tiktoken` is required to read a `tiktoken` file".
    "an LFS pointer for tokenizer.model": (
        {"tokenizer.model": LFS_POINTER},
        "tokenizer.model is a Git LFS pointer, not the file",
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN_TOKENIZERS))
def test_a_broken_tokenizer_is_one_line(plain_original, tmp_path, capsys, broken) -> None:
    files, message = BROKEN_TOKENIZERS[broken]
    original = _copy(plain_original, tmp_path)
    (original / "tokenizer.json").unlink()
    for name, text in files.items():
        (original / name).write_text(text)
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), "--vision", str(plain_original["clip"])]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


BROKEN_TOWERS = {
    # Each was a traceback from transformers or huggingface_hub.
    "a value of another type": (
        {"config.json": {"model_type": "clip_vision_model", "hidden_size": "x"}},
        "cannot read the CLIP config in",
    ),
    "heads that do not divide the width": (
        {"config.json": {"model_type": "clip_vision_model", "num_attention_heads": 3}},
        "cannot read the CLIP config in",
    ),
    "an invalid preprocessor_config.json": (
        {"preprocessor_config.json": "{bad"},
        "cannot read",
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN_TOWERS))
def test_a_broken_tower_dir_is_one_line(plain_original, tmp_path, capsys, broken) -> None:
    files, message = BROKEN_TOWERS[broken]
    clip = Path(shutil.copytree(plain_original["clip"], tmp_path / "clip"))
    for name, content in files.items():
        if isinstance(content, dict):
            config = json.loads((clip / name).read_text())
            content = json.dumps({**config, **content})
        (clip / name).write_text(content)
    out = tmp_path / "out"
    assert cli(["convert", str(plain_original["original"]), str(out), "--vision", str(clip)]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_config_without_the_text_shape_is_refused_before_building(
    plain_original, tmp_path, capsys
) -> None:
    """A config.json with LLaVA's keys only built Llama's default 7B model before finding its
    weights did not fit, and was killed for memory."""
    original = _copy(plain_original, tmp_path)
    config = json.loads((original / "config.json").read_text())
    kept = {k: v for k, v in config.items() if k.startswith(("mm_", "image_")) or k == "model_type"}
    (original / "config.json").write_text(json.dumps(kept))
    out = tmp_path / "out"
    assert cli(["convert", str(original), str(out), "--vision", str(plain_original["clip"])]) == 1
    err = capsys.readouterr().err
    assert "hidden_size 4096 (or its default, where it is absent) does not fit" in err, err
    assert "which have 48" in err and not out.exists()


UNFIT_ADAPTERS = {
    # Both were tracebacks from peft.
    "another rank than adapter_config.json's": (
        {"r": 2, "target_modules": ["q_proj"]},
        "size mismatch for base_model.model.model.layers.0.self_attn.q_proj.lora_A",
    ),
    "target modules the model lacks": (
        {"r": 4, "target_modules": ["qkv_proj"]},
        "Target modules {'qkv_proj'} not found in the base model",
    ),
}


@pytest.mark.parametrize("unfit", list(UNFIT_ADAPTERS))
def test_adapters_that_do_not_fit_are_one_line(plain_original, tmp_path, capsys, unfit) -> None:
    from safetensors.torch import save_file

    adapter, message = UNFIT_ADAPTERS[unfit]
    lora = tmp_path / "lora"
    lora.mkdir()
    shutil.copy(plain_original["original"] / "config.json", lora)
    (lora / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_alpha": 8, **adapter})
    )
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{key}.lora_A.weight": torch.zeros(4, 48), f"{key}.lora_B.weight": torch.zeros(48, 4)},
        str(lora / "adapter_model.safetensors"),
    )
    out = tmp_path / "out"
    args = ["convert", str(lora), str(out), "--base", str(plain_original["original"])]
    assert cli([*args, "--vision", str(plain_original["clip"])]) == 1
    err = capsys.readouterr().err
    assert "the adapter weights do not fit the language model" in err and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def _lora_over_base(plain: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A LoRA output of the plain original (zero adapters, its projector in
    non_lora_trainables.bin) over its language model as --base; returns (lora, base)."""
    from safetensors.torch import save_file

    _, base, projector = _stage1_over_base(plain, tmp_path)
    lora = tmp_path / "lora"
    lora.mkdir()
    shutil.copy(plain["original"] / "config.json", lora)
    adapter = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    adapter["base_model_name_or_path"] = "lmsys/vicuna-7b-v1.5"
    (lora / "adapter_config.json").write_text(json.dumps(adapter))
    adapters = {}
    for i in range(json.loads((lora / "config.json").read_text())["num_hidden_layers"]):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        adapters[f"{key}.lora_A.weight"] = torch.zeros(4, 48)
        adapters[f"{key}.lora_B.weight"] = torch.zeros(48, 4)
    save_file(adapters, str(lora / "adapter_model.safetensors"))
    trainables = {f"base_model.model.model.mm_projector.{k}": v for k, v in projector.items()}
    torch.save(trainables, lora / "non_lora_trainables.bin")
    return lora, base


def test_a_lora_output_without_its_non_lora_trainables_names_the_file(
    plain_original, tmp_path, capsys
) -> None:
    """The projector of a LoRA run is in non_lora_trainables.bin; a copy of the output without
    it was told only that there are no model.mm_projector.* weights."""
    lora, base = _lora_over_base(plain_original, tmp_path)
    (lora / "non_lora_trainables.bin").unlink()
    args = ["convert", str(lora), str(tmp_path / "out"), "--base", str(base)]
    assert cli([*args, "--vision", str(plain_original["clip"])]) == 1
    err = capsys.readouterr().err
    assert "non_lora_trainables.bin" in err and len(err.strip().splitlines()) == 1, err


def test_a_lora_output_without_a_tower_says_so_before_reading_base(
    plain_original, tmp_path, capsys, monkeypatch
) -> None:
    """Neither the --base headers nor non_lora_trainables.bin hold a tower: the missing tower
    was reported only after the base's weights (gigabytes) were read."""
    import llava_edge.convert.original as original_module

    lora, base = _lora_over_base(plain_original, tmp_path)

    def never(*_args, **_kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(original_module, "read_sharded", never)
    assert cli(["convert", str(lora), str(tmp_path / "out"), "--base", str(base)]) == 1
    err = capsys.readouterr().err
    assert f"does not hold its vision tower {TOWER_NAME}" in err and "--vision" in err, err


@pytest.mark.parametrize("kind", ["lora", "stage1"])
def test_a_qlora_output_is_applied_to_its_float_base(plain_original, tmp_path, capsys, kind):
    """A LoRA or stage-1 run of the original with --bits 4/8 (QLoRA) leaves float adapters or a
    float projector, and a config.json with the quantization_config its language model was
    loaded with: it was refused as quantized weights and told to convert "the checkpoint they
    were quantized from", which there is none of. What it trained goes over the float --base."""
    from safetensors.torch import load_file

    if kind == "lora":
        output, base = _lora_over_base(plain_original, tmp_path)
    else:
        output, base, _ = _stage1_over_base(plain_original, tmp_path)
    config = json.loads((output / "config.json").read_text())
    quantization = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config.update(quantization_config=quantization, _pre_quantization_dtype="float32")
    (output / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    args = ["convert", str(output), str(out), "--base", str(base)]
    assert cli([*args, "--vision", str(plain_original["clip"])]) == 0
    assert "trained over its language model quantized by bitsandbytes" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((out / "config.json").read_text())["text_config"]
    converted = load_file(str(out / "model.safetensors"))
    layers = {
        k: v for k, v in load_file(str(base / "model.safetensors")).items() if ".layers." in k
    }
    assert layers
    for name, value in layers.items():  # the adapters are zero: the base's own weights
        assert torch.equal(converted[f"model.language_model.{name[len('model.') :]}"], value)


@pytest.mark.parametrize("kind", ["lora", "stage1"])
def test_a_quantized_base_is_refused_before_its_weights_are_read(
    plain_original, tmp_path, capsys, monkeypatch, kind
) -> None:
    """A bitsandbytes save as --base (packed uint8 weights) was read whole, then refused as
    weights of another shape than its config's, after the note on the adapters' base name."""
    import llava_edge.convert.original as original_module

    if kind == "lora":
        output, base = _lora_over_base(plain_original, tmp_path)
    else:
        output, base, _ = _stage1_over_base(plain_original, tmp_path)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))

    def never(*_args, **_kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(original_module, "read_sharded", never)
    out = tmp_path / "out"
    args = ["convert", str(output), str(out), "--base", str(base)]
    assert cli([*args, "--vision", str(plain_original["clip"])]) == 1
    err = capsys.readouterr().err
    assert f"--base {base} holds bitsandbytes weights" in err and "full-precision" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_base_of_another_name_than_the_adapters_is_noted(plain_original, tmp_path) -> None:
    """Adapters merged into another model of the same shape run and answer wrong, and nothing
    in the weights can tell: the log names the base adapter_config.json was trained on."""
    lora, base = _lora_over_base(plain_original, tmp_path)
    lines: list[str] = []
    vision = plain_original["clip"]
    convert_checkpoint(lora, tmp_path / "out", vision=vision, base=base, log=lines.append)
    assert any("lmsys/vicuna-7b-v1.5" in line and str(base) in line for line in lines), lines
    (tmp_path / "vicuna-7b-v1.5").mkdir()
    for path in base.iterdir():  # a local copy under the adapters' base name: nothing to note
        shutil.copy(path, tmp_path / "vicuna-7b-v1.5" / path.name)
    lines.clear()
    base = tmp_path / "vicuna-7b-v1.5"
    convert_checkpoint(lora, tmp_path / "out2", vision=vision, base=base, log=lines.append)
    assert len(lines) == 1 and "vicuna-7b-v1.5" not in lines[0].split("->")[0], lines


@pytest.mark.parametrize("tower", ["--vision", "no tower at hand"])
def test_a_quantized_save_is_refused_before_its_weights_are_read(
    plain_original, tmp_path, capsys, monkeypatch, tower
) -> None:
    """The original trains with --bits 4/8 (bitsandbytes): such a save holds no float language
    model, and converting it ended in a StopIteration traceback. Without a tower at hand it was
    first sent to download one (gigabytes), then refused."""
    import llava_edge.convert.original as original_module

    original = _copy(plain_original, tmp_path)
    config = json.loads((original / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (original / "config.json").write_text(json.dumps(config))

    def read_nothing(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(original_module, "read_sharded", read_nothing)
    out = tmp_path / "out"
    vision = ["--vision", str(plain_original["clip"])] if tower == "--vision" else []
    assert cli(["convert", str(original), str(out), *vision]) == 1
    err = capsys.readouterr().err
    assert "holds bitsandbytes weights (quantization_config" in err and not out.exists(), err


def test_a_language_model_without_float_weights_is_one_line() -> None:
    """int8 weights saved without their quantization_config: a StopIteration traceback before."""
    import torch

    from llava_edge.convert.checkpoint import _dtype
    from llava_edge.errors import LlavaEdgeError

    assert _dtype({"a": torch.zeros(2, dtype=torch.int8), "b": torch.zeros(2)}) == torch.float32
    with pytest.raises(LlavaEdgeError, match="no floating-point tensor"):
        _dtype({"a": torch.zeros(2, dtype=torch.int8)})


def test_converting_leaves_the_callers_progress_bar_setting_as_it_was() -> None:
    """An application that turned transformers' progress bars off had them turned back on by
    convert and by init (composing), which silence their own loads."""
    from functools import partial

    from transformers.utils import logging as hf_logging

    from llava_edge.logs import quiet_loading

    converting = partial(quiet_loading, "huggingface_hub")
    for quiet in (converting, quiet_loading):
        for enabled in (False, True):
            (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
            with quiet():
                assert not hf_logging.is_progress_bar_enabled()
            assert hf_logging.is_progress_bar_enabled() == enabled, quiet


# ---- memory ------------------------------------------------------------------------------------

# Run in a fresh process: the peak of its anonymous memory (the weights an original's safetensors
# or zip .bin files hold are mapped from the file, not copied) while convert runs, over the
# process's own before it.
PEAK_SCRIPT = """
import sys, threading, time
from pathlib import Path
from llava_edge.convert import convert_checkpoint
from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

def anonymous():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

before, peak, done = anonymous(), [0], threading.Event()

def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.001)

watcher = threading.Thread(target=watch)
watcher.start()
root = Path(sys.argv[1])
convert_checkpoint(root / "original", root / "out", vision=root / "clip", log=lambda *a: None)
done.set()
watcher.join()
print(max(peak[0], anonymous()) - before)
"""


def test_convert_holds_one_copy_of_the_weights(tmp_path) -> None:
    """A 13B original is 26 GB in fp16: the language model, the assembled LLaVA model and the
    saved file share one copy of the weights (from_pretrained assigns the tensors it is given;
    the original's files are memory-mapped), so a machine converts a model near its memory's
    size. A copy anywhere (a clone, a dtype cast, a state dict copied into a freshly initialised
    model) would show as a peak of the weights' size."""
    import subprocess
    import sys

    spec = Source(seed=8, text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8))
    source = make_source(tmp_path / "source", spec)
    to_original(source, tmp_path / "original", spec, Layout())
    save_tower(load_model(source), tmp_path / "clip")
    weights = sum(p.stat().st_size for p in (tmp_path / "original").glob("*.safetensors"))
    assert weights > 90e6  # large enough for a copy to stand out of the interpreter's own noise
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    peak = int(run.stdout.split()[-1])
    assert peak < 0.5 * weights, f"{peak / 2**20:.0f} MiB over {weights / 2**20:.0f} MiB of weights"
