"""`llava-edge init --vision CLIP --llm CAUSAL_LM`: a new LLaVA from two pretrained parts."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from llava_edge.cli import main as cli


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny CLIP (full model: text tower included, as openai/clip-* are) and a tiny Llama whose
    tokenizer has neither `<image>` nor a padding token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (
        CLIPConfig,
        CLIPModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
            ),
            projection_dim=16,
        )
    )
    clip.save_pretrained(root / "clip")

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    bpe.train_from_iterator(["What color are the shapes? red green blue one two three"], trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(root / "llm")
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=2,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    llm.save_pretrained(root / "llm")
    return {"clip": clip, "llm": llm, "tokenizer": tokenizer, "root": root}


def test_compose_builds_a_trainable_exportable_llava(parts, tmp_path, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "llava"
    argv = ["init", str(out), "--vision", str(parts["root"] / "clip")]
    assert cli([*argv, "--llm", str(parts["root"] / "llm")]) == 0
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    old_vocab = len(parts["tokenizer"])

    # <image> and <pad> were added; the embeddings grew to a multiple of 64 that covers them.
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == model.config.image_token_id == old_vocab
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id > old_vocab - 1
    vocab = model.config.text_config.vocab_size
    assert vocab % 64 == 0 and vocab >= len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == vocab

    # The parts' weights are carried over unchanged.
    tower = parts["clip"].vision_model.state_dict()
    for key, tensor in model.model.vision_tower.state_dict().items():
        torch.testing.assert_close(tensor, tower[key], atol=0, rtol=0)
    lm = parts["llm"].state_dict()
    language = model.model.language_model.state_dict()
    for key, tensor in language.items():
        if key == "embed_tokens.weight":
            torch.testing.assert_close(tensor[:old_vocab], lm["model." + key], atol=0, rtol=0)
        else:
            torch.testing.assert_close(tensor, lm["model." + key], atol=0, rtol=0)
    torch.testing.assert_close(model.lm_head.weight[:old_vocab], lm["lm_head.weight"])

    # A fresh mlp2x_gelu projector from CLIP's width to the LM's; features from layer -2.
    projector = model.model.multi_modal_projector
    assert projector.linear_1.weight.shape == (48, 32) and projector.linear_2.weight.shape == (
        48,
        48,
    )
    assert model.config.vision_feature_layer == -2 and model.config.projector_hidden_act == "gelu"
    assert json.loads((out / "llava_edge.json").read_text()) == {"template": "llava_1_5"}

    # The processor expands <image> to one id per patch (CLS dropped), and a forward pass with
    # labels gives a finite loss.
    from PIL import Image

    inputs = processor(
        text="USER: <image>\nWhat color? ASSISTANT: red",
        images=Image.new("RGB", (40, 30), (200, 30, 30)),
        return_tensors="pt",
    )
    assert int((inputs["input_ids"] == image_id).sum()) == (32 // 8) ** 2
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)

    # And it goes on through export, verified against transformers.
    capsys.readouterr()
    assert cli(["export", str(out), str(tmp_path / "model")]) == 0


def test_vision_and_llm_go_together(parts, tmp_path, capsys):
    assert cli(["init", str(tmp_path / "x"), "--vision", str(parts["root"] / "clip")]) == 1
    assert "--vision and --llm go together" in capsys.readouterr().err
    argv = [
        "init",
        str(tmp_path / "y"),
        "--vision",
        str(tmp_path),
        "--llm",
        str(parts["root"] / "llm"),
    ]
    assert cli(argv) == 1
    assert "is not a Hugging Face checkpoint dir" in capsys.readouterr().err


def test_a_truncated_tower_is_named_in_one_line(parts, tmp_path, capsys):
    llm = tmp_path / "llm"
    shutil.copytree(parts["root"] / "llm", llm)
    with open(llm / "model.safetensors", "r+b") as weights:
        weights.truncate(2000)
    argv = ["init", str(tmp_path / "out"), "--vision", str(parts["root"] / "clip")]
    assert cli([*argv, "--llm", str(llm)]) == 1
    err = capsys.readouterr().err
    assert f"cannot read the weights in {llm}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_compose_takes_the_projector_asked_for(parts, tmp_path):
    """--projector linear builds LLaVA v1's projector over the two parts."""
    from llava_edge.modeling import load_model

    out = tmp_path / "v1"
    argv = ["init", str(out), "--vision", str(parts["root"] / "clip")]
    assert cli([*argv, "--llm", str(parts["root"] / "llm"), "--projector", "linear"]) == 0
    model = load_model(out)
    assert json.loads((out / "config.json").read_text())["mm_projector_type"] == "linear"
    assert [n for n, _ in model.model.multi_modal_projector.named_children()] == ["linear_1", "act"]


@pytest.fixture(scope="module")
def siglip_qwen(tmp_path_factory):
    """A bare SigLIP vision model (no preprocessor_config.json) and a tiny Qwen2 with tied
    embeddings whose tokenizer already has `<image>` and a padding token."""
    from hf_checkpoints import qwen_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("siglip_qwen")
    torch.manual_seed(1)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
    tower = SiglipVisionModel(SiglipVisionConfig(**vision, image_size=28, patch_size=14))
    tower.save_pretrained(root / "siglip")
    tokenizer = qwen_tokenizer()
    tokenizer.save_pretrained(root / "qwen")
    ids = tokenizer.convert_tokens_to_ids
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer) + 20,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
        )
    ).save_pretrained(root / "qwen")
    return {"root": root, "tokenizer": tokenizer}


def test_compose_from_a_siglip_tower_keeps_every_patch(siglip_qwen, tmp_path, capsys):
    """SigLIP has no CLS token: LLaVA takes all its patches ('full'), the processor counts no
    extra token, and export reproduces transformers' tokens on the result."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root = siglip_qwen["root"]
    out = tmp_path / "llava"
    assert (
        cli(["init", str(out), "--vision", str(root / "siglip"), "--llm", str(root / "qwen")]) == 0
    )
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.vision_feature_select_strategy == "full"
    assert processor.vision_feature_select_strategy == "full"
    assert processor.num_additional_image_tokens == 0
    assert type(processor.image_processor).__name__.startswith("SiglipImageProcessor")
    # The tokenizer's own <image> is used; nothing is added to it, and the LM's embeddings (rows
    # past the tokenizer's, as Qwen's) are kept as they are, neither cut nor padded.
    assert len(processor.tokenizer) == len(siglip_qwen["tokenizer"])
    rows = len(siglip_qwen["tokenizer"]) + 20
    assert model.config.text_config.vocab_size == rows
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert model.config.image_token_id == siglip_qwen["tokenizer"].convert_tokens_to_ids("<image>")
    # Tied embeddings stay tied.
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    inputs = processor(
        text="<image>\nWhat?", images=Image.new("RGB", (30, 20), (9, 99, 199)), return_tensors="pt"
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == (28 // 14) ** 2
    assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)

    capsys.readouterr()
    assert cli(["export", str(out), str(tmp_path / "model")]) == 0


def test_compose_refuses_a_tower_it_does_not_know(siglip_qwen, tmp_path, capsys):
    root = siglip_qwen["root"]
    argv = [
        "init",
        str(tmp_path / "x"),
        "--vision",
        str(root / "qwen"),
        "--llm",
        str(root / "qwen"),
    ]
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert "is a 'qwen2' model" in err and "CLIP or SigLIP" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_training_a_chatml_lm_takes_a_template_ending_in_its_eos(siglip_qwen, tmp_path, capsys):
    """vicuna_v1's `</s>` is plain text to a Qwen tokenizer (turns end with `<|im_end|>`): trained
    on it the model would never stop, so train refuses and names a template that fits."""
    from PIL import Image

    from llava_edge.training.checkpoint import compose_checkpoint

    root = siglip_qwen["root"]
    model = compose_checkpoint(tmp_path / "llava", root / "siglip", root / "qwen")
    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "red.png")
    sample = {
        "id": "s0",
        "image": "red.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A red box."},
        ],
    }
    (tmp_path / "data.json").write_text(json.dumps([sample]))
    argv = ["train", "--stage", "2", "--model", str(model), "--data", str(tmp_path / "data.json")]
    argv += ["--images", str(tmp_path), "--max-steps", "1", "--batch-size", "1"]
    capsys.readouterr()
    assert cli([*argv, "--out", str(tmp_path / "vicuna")]) == 1
    err = capsys.readouterr().err
    assert "ends each answer with '</s>'" in err and "'<|im_end|>'" in err
    assert "pass --template chatml_direct or qwen_1_5, whose answers end in it" in err
    assert "Traceback" not in err
    assert not (tmp_path / "vicuna").exists()

    lora = ["--lora", "--lora-rank", "2", "--template", "chatml_direct"]
    assert cli([*argv, *lora, "--out", str(tmp_path / "chatml")]) == 0


def _saved_dtypes(checkpoint) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (no dict)


def test_compose_is_repeated_exactly_by_its_seed(parts, tmp_path):
    """init --seed sets every random weight of a composed checkpoint: the projector and the
    embedding rows grown for <image> and <pad>, whatever the process drew before."""
    from safetensors.torch import load_file

    argv = ["--vision", str(parts["root"] / "clip"), "--llm", str(parts["root"] / "llm")]
    for name in ("one", "two"):
        torch.rand(3)  # the process's random state moves on between the runs
        assert cli(["init", str(tmp_path / name), *argv, "--seed", "5"]) == 0
    one, two = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    assert one.keys() == two.keys()
    assert [k for k in one if not torch.equal(one[k], two[k])] == []


def test_compose_keeps_the_llms_dtype_unless_asked(parts, tmp_path, capsys):
    """A bf16 LM composes into a bf16 checkpoint (its weights bit for bit), not one twice its
    size in fp32; --dtype asks for another."""
    llm = tmp_path / "llm"
    copy.deepcopy(parts["llm"]).to(torch.bfloat16).save_pretrained(llm)
    parts["tokenizer"].save_pretrained(llm)
    argv = ["init", str(tmp_path / "bf16"), "--vision", str(parts["root"] / "clip")]
    assert cli([*argv, "--llm", str(llm)]) == 0
    assert _saved_dtypes(tmp_path / "bf16") == {"BF16"}
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    from llava_edge.modeling import load_model

    model = load_model(tmp_path / "bf16", dtype=torch.bfloat16)
    lm = parts["llm"].state_dict()
    torch.testing.assert_close(
        model.model.language_model.layers[0].mlp.up_proj.weight,
        lm["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16),
        atol=0,
        rtol=0,
    )

    argv = ["init", str(tmp_path / "fp32"), "--vision", str(parts["root"] / "clip")]
    assert cli([*argv, "--llm", str(llm), "--dtype", "float32"]) == 0
    assert _saved_dtypes(tmp_path / "fp32") == {"F32"}


class _Payload:
    """Unpickling this runs code: it would create the file named."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (type(self.path).touch, (self.path,))


def test_compose_takes_pickled_weights_with_tensors_only(parts, tmp_path, capsys):
    """lmsys/vicuna-7b-v1.5, LLaVA-1.5's LM, ships pytorch_model-*.bin only: composing from it
    works (read with torch.load(weights_only=True)), and a .bin holding a Python object is
    refused in one line without running it."""
    from safetensors.torch import load_file

    llm = tmp_path / "llm"
    shutil.copytree(parts["root"] / "llm", llm)
    state = load_file(str(llm / "model.safetensors"))
    (llm / "model.safetensors").unlink()
    torch.save(state, llm / "pytorch_model.bin")
    argv = ["init", str(tmp_path / "out"), "--vision", str(parts["root"] / "clip"), "--llm"]
    assert cli([*argv, str(llm)]) == 0
    from llava_edge.modeling import load_model

    model = load_model(tmp_path / "out")
    torch.testing.assert_close(
        model.model.language_model.norm.weight, state["model.norm.weight"], atol=0, rtol=0
    )

    marker = tmp_path / "payload-ran"
    torch.save({**state, "evil": _Payload(marker)}, llm / "pytorch_model.bin")
    capsys.readouterr()
    argv[1] = str(tmp_path / "evil")
    assert cli([*argv, str(llm)]) == 1
    err = capsys.readouterr().err
    assert f"cannot read the weights in {llm}" in err and "pickled Python objects" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "evil").exists()


def test_a_sentencepiece_tokenizer_without_sentencepiece_names_it(
    parts, tmp_path, capsys, monkeypatch
):
    """Vicuna ships tokenizer.model alone; without sentencepiece transformers said that
    `tiktoken` is required."""
    import sys

    from original_format import SENTENCEPIECE_CONFIG, sentencepiece_model

    llm = tmp_path / "llm"
    shutil.copytree(parts["root"] / "llm", llm)
    (llm / "tokenizer.json").unlink()
    (llm / "tokenizer.model").write_bytes(sentencepiece_model())
    (llm / "tokenizer_config.json").write_text(json.dumps(SENTENCEPIECE_CONFIG))
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # not installed
    argv = ["init", str(tmp_path / "out"), "--vision", str(parts["root"] / "clip")]
    assert cli([*argv, "--llm", str(llm)]) == 1
    err = capsys.readouterr().err
    assert "SentencePiece" in err and "pip install sentencepiece" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("onto", ["--llm", "--vision", "a dir above --llm"])
def test_force_never_replaces_an_input(parts, tmp_path, capsys, onto):
    """`init OUT --vision CLIP --llm OUT --force` replaced the LM with the composed checkpoint."""
    root = tmp_path / "inputs"
    shutil.copytree(parts["root"], root)
    out = {"--llm": root / "llm", "--vision": root / "clip", "a dir above --llm": root}[onto]
    before = sorted(p.name for p in out.iterdir())
    argv = ["init", str(out), "--vision", str(root / "clip"), "--llm", str(root / "llm")]
    assert cli([*argv, "--force"]) == 1
    err = capsys.readouterr().err
    assert "which replacing it would delete" in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("part", ["llm", "clip"])
def test_a_quantized_part_is_refused_before_loading(parts, tmp_path, capsys, part):
    """A bitsandbytes/GPTQ/AWQ upload: transformers raised an ImportError traceback asking for
    the quantizer's package."""
    root = tmp_path / "inputs"
    shutil.copytree(parts["root"], root)
    config = json.loads((root / part / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (root / part / "config.json").write_text(json.dumps(config))
    argv = ["init", str(tmp_path / "out"), "--vision", str(root / "clip")]
    assert cli([*argv, "--llm", str(root / "llm")]) == 1
    err = capsys.readouterr().err
    assert "holds bitsandbytes weights" in err and str(root / part) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_compose_prints_no_notes(parts, tmp_path):
    """A run that works prints its one line and nothing on stderr (transformers' notes that
    torchvision is absent, which it does not need, came out on every composition)."""
    import subprocess
    import sys

    argv = ["init", str(tmp_path / "out"), "--vision", str(parts["root"] / "clip")]
    argv += ["--llm", str(parts["root"] / "llm")]
    run = subprocess.run(
        [sys.executable, "-m", "llava_edge.cli", *argv], capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.startswith("wrote a LLaVA checkpoint")
