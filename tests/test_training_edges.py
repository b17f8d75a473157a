"""train, merge-lora and init at their edges: samples a stage cannot learn from, adapters merged
onto the wrong base, init's options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_edge.cli import main as cli
from llava_edge.training.synth import synthesize

TEXT_ONLY = {
    "id": "text-only",
    "conversations": [
        {"from": "human", "value": "Say hello."},
        {"from": "gpt", "value": "Hello."},
    ],
}


def last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return synthesize(tmp_path_factory.mktemp("data"), train=2, test=0, seed=1)


def test_stage_1_refuses_text_only_samples(tiny_checkpoint, data, tmp_path, capsys):
    """Stage 1 trains the projector alone, which a sample without an image never reaches: a
    batch of them has no gradient (a traceback without gradient checkpointing, silently nothing
    trained with it)."""
    samples = [*json.loads(data["train"].read_text()), TEXT_ONLY]
    (tmp_path / "mixed.json").write_text(json.dumps(samples))
    argv = ["train", "--stage", "1", "--template", "vicuna_v1", "--model", str(tiny_checkpoint)]
    argv += ["--data", str(tmp_path / "mixed.json"), "--images", str(data["images"])]
    argv += ["--out", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "1"]
    argv += ["--no-gradient-checkpointing"]
    assert cli(argv) == 1
    assert last_line(capsys.readouterr().err).startswith(
        "llava-edge train: error: sample text-only: has no image; stage 1 trains only the "
        "projector, which only images reach"
    )
    assert not (tmp_path / "out").exists()
    assert cli([*argv, "--skip-bad"]) == 0
    assert "1 bad sample(s) skipped" in capsys.readouterr().out


@pytest.mark.parametrize("shape", [["--preset", "tiny"], ["--preset", "demo"], ["--layers", "1"]])
def test_init_from_parts_refuses_any_preset_shape_given(shape, tmp_path, capsys):
    """--preset tiny is the default preset, but given with --vision/--llm it is as ignored as
    any other: refused, not dropped unsaid."""
    argv = ["init", str(tmp_path / "out"), "--vision", "clip", "--llm", "lm", *shape]
    assert cli(argv) == 1
    assert last_line(capsys.readouterr().err).startswith(
        "llava-edge init: error: --preset and --layers shape a random checkpoint"
    )
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def clip_tower(tmp_path_factory) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=8,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("clip") / "clip"
    CLIPVisionModel(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("llm, kind", [("clip", "clip_vision_model"), ("llava", "llava")])
def test_an_llm_that_is_no_causal_lm_is_named(
    llm, kind, clip_tower, tiny_checkpoint, tmp_path, capsys
):
    """A vision tower or a whole LLaVA given as --llm is named as such, not as transformers'
    "Unrecognized configuration class" of an unnamed one of the two."""
    path = {"clip": clip_tower, "llava": tiny_checkpoint}[llm]
    argv = ["init", str(tmp_path / "out"), "--vision", str(clip_tower), "--llm", str(path)]
    assert cli(argv) == 1
    assert last_line(capsys.readouterr().err) == (
        f"llava-edge init: error: --llm {path} is a '{kind}' model, not a causal language model "
        "(one AutoModelForCausalLM loads, such as Llama, Mistral or Qwen2)"
    )
    assert not (tmp_path / "out").exists()


LONGROPE = {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}


@pytest.mark.parametrize(
    ("config", "said"),
    [
        # Gemma 2: a language model export does not take
        (
            {"model_type": "gemma2"},
            "is a 'gemma2' language model, which export does not take (it takes llama, "
            "mistral, qwen2, qwen3, gemma, phi3): choose one of those",
        ),
        # Phi-3-mini-128k's longrope, in either key
        (
            {"model_type": "phi3", "rope_scaling": LONGROPE},
            "has rope type 'longrope', which export does not take (its frequencies switch",
        ),
        (
            {"model_type": "phi3", "rope_parameters": LONGROPE},
            "has rope type 'longrope', which export does not take (its frequencies switch",
        ),
    ],
    ids=["gemma2", "longrope-rope_scaling", "longrope-rope_parameters"],
)
def test_an_llm_export_does_not_take_is_refused_before_loading(
    config, said, clip_tower, tmp_path, capsys
):
    """Its LLaVA would train for hours, then never export: refused at init, before any loading
    (the dir holds no weights)."""
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps(config))
    argv = ["init", str(tmp_path / "out"), "--vision", str(clip_tower), "--llm", str(llm)]
    assert cli(argv) == 1
    assert last_line(capsys.readouterr().err).startswith(
        f"llava-edge init: error: --llm {llm} {said}"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["adapter", "checkpoints/checkpoint-2"])
def test_merging_adapters_onto_the_run_that_merged_them_is_refused(
    where, tiny_checkpoint, tmp_path, capsys
):
    """`train --lora` writes OUT with its adapters merged in, and keeps them in OUT/adapter and
    OUT/checkpoints: OUT as --base would add them twice."""
    import shutil

    import torch

    from llava_edge.modeling import load_model
    from llava_edge.training.lora import add_lora

    out = Path(shutil.copytree(tiny_checkpoint, tmp_path / "out"))
    add_lora(load_model(tiny_checkpoint, dtype=torch.float32), 2, 4, 0.0).save_pretrained(
        out / where
    )
    argv = ["merge-lora", str(out / where), str(tmp_path / "merged"), "--base", str(out)]
    assert cli(argv) == 1
    assert last_line(capsys.readouterr().err).startswith(
        f"llava-edge merge-lora: error: --base {out} is the checkpoint these adapters were "
        "merged into when they were trained"
    )
    assert not (tmp_path / "merged").exists()
    assert cli(argv[:-2]) == 0  # onto the checkpoint they were trained from


def test_adapters_onto_another_base_of_their_shape_are_refused(
    tiny_checkpoint, data, tmp_path, capsys
):
    """Another model of the adapters' shape (another init, a stage-1 run redone at the path
    the adapters name) takes them without a size mismatch; `train` names the base its adapters
    (OUT/adapter, OUT/checkpoints) were trained from, and merge-lora refuses any other. A copy
    of the base elsewhere is that base."""
    import shutil

    from llava_edge.training.checkpoint import init_checkpoint
    from llava_edge.training.train import train

    base = Path(shutil.copytree(tiny_checkpoint, tmp_path / "base"))
    out = tmp_path / "out"
    train(2, base, data["train"], out, images=data["images"], lora=True, lora_rank=2,
          lora_alpha=4, keep_adapters=True, max_steps=1, global_batch_size=2, save_steps=1,
          gradient_checkpointing=False, progress=False)  # fmt: skip
    other = init_checkpoint(tmp_path / "other", preset="tiny", seed=1)
    copy = shutil.copytree(base, tmp_path / "copy")
    merged = tmp_path / "merged"
    for adapters in (out / "adapter", out / "checkpoints" / "checkpoint-1"):
        assert cli(["merge-lora", str(adapters), str(merged), "--base", str(other)]) == 1
        assert last_line(capsys.readouterr().err) == (
            f"llava-edge merge-lora: error: the adapters in {adapters} were trained from "
            f"--model {base}, not {other} (their projector, token embeddings or shape differ): "
            "merged there they would make a model nobody trained; give --base the checkpoint "
            "they were trained from"
        )
        assert not merged.exists()
    assert cli(["merge-lora", str(out / "adapter"), str(merged), "--base", str(copy)]) == 0
    init_checkpoint(base, preset="tiny", seed=1, force=True)  # redone where the adapters point
    assert cli(["merge-lora", str(out / "adapter"), str(tmp_path / "again")]) == 1
    assert last_line(capsys.readouterr().err) == (  # not "trained from --model X, not X"
        f"llava-edge merge-lora: error: the base checkpoint {base} was written over since the "
        f"adapters in {out / 'adapter'} were trained from it (its projector, token embeddings or "
        "shape differ): merged there they would make a model nobody trained; give --base a copy "
        "of the checkpoint they were trained from"
    )


def test_adapters_given_as_a_checkpoint_are_sent_to_merge_lora(
    tiny_checkpoint, data, tmp_path, capsys
):
    """OUT/adapter or a LoRA run's trainer checkpoint given to export or train (to export an
    intermediate checkpoint, or train on from it) is named as adapters, with the command that
    makes a checkpoint of them."""
    import torch

    from llava_edge.modeling import load_model
    from llava_edge.training.lora import add_lora

    adapters = tmp_path / "adapter"
    add_lora(load_model(tiny_checkpoint, dtype=torch.float32), 2, 4, 0.0).save_pretrained(adapters)
    out = tmp_path / "out"
    train = ["train", "--stage", "2", "--data", str(data["train"]), "--out", str(out)]
    for argv, what in (
        (["export", str(adapters), str(out)], "checkpoint"),
        ([*train, "--model", str(adapters), "--images", str(data["images"])], "--model"),
    ):
        assert cli(argv) == 1
        assert last_line(capsys.readouterr().err).endswith(
            f"error: {what} {adapters} holds LoRA adapters, not a checkpoint; merge them into "
            f"one with `llava-edge merge-lora {adapters} OUT_DIR` and give OUT_DIR"
        )
    assert not out.exists()


@pytest.mark.parametrize("save_steps", ["1", "1000"])
def test_a_run_whose_weights_go_nan_stops_and_says_so(
    save_steps, tiny_checkpoint, data, tmp_path, capsys
):
    """A learning rate far too high takes the weights to NaN, from which no step recovers: the
    run stops there in one line (at the logged step that shows it, not the next checkpoint),
    with no checkpoint of NaN weights and no OUT (the trainer's NaN filter logged such a loss as
    0.0, and the run saved a NaN model, "final loss 0.0000")."""
    import re

    from safetensors.torch import load_file

    out = tmp_path / "out"
    argv = ["train", "--stage", "2", "--model", str(tiny_checkpoint), "--out", str(out)]
    argv += ["--data", str(data["train"]), "--images", str(data["images"]), "--lr", "1e8"]
    argv += ["--warmup-ratio", "0", "--batch-size", "1", "--max-steps", "8"]
    assert cli([*argv, "--save-steps", save_steps, "--no-gradient-checkpointing"]) == 1
    line = last_line(capsys.readouterr().err)
    found = re.fullmatch(
        r"llava-edge train: error: training diverged by step (\d+): the trained weights hold "
        r"NaN or infinity, which no later step undoes; start over \(--force\) with a lower "
        r"learning rate than 1e\+08 \(--lr\) or a longer warmup than --warmup-ratio 0",
        line,
    )
    assert found, line
    assert int(found[1]) < 8
    assert not (out / "model.safetensors").exists()
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == (int(found[1]) - 1 if save_steps == "1" else 0)
    for checkpoint in checkpoints:
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert all(w.isfinite().all() for w in weights.values()), checkpoint.name


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("projector_lr", [None, 2e-5])
def test_a_diverged_run_names_the_options_that_steady_it(fp16, projector_lr):
    """Besides --lr, the run's warmup, the projector's own rate where it has one and fp16's
    precision are what a diverged run can change; each is named where it applies, by its
    option and the value the run had."""
    import types

    import torch

    from llava_edge.errors import LlavaEdgeError
    from llava_edge.training.train import _check_not_diverged

    layer = torch.nn.Linear(2, 2)
    args = types.SimpleNamespace(learning_rate=2e-4, warmup_steps=0.03, fp16=fp16)
    _check_not_diverged(layer, 3, args, projector_lr)  # finite: the run goes on
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(LlavaEdgeError) as raised:
        _check_not_diverged(layer, 3, args, projector_lr)
    message = str(raised.value)
    assert "lower learning rate than 0.0002 (--lr)" in message
    assert "longer warmup than --warmup-ratio 0.03" in message
    assert ("the projector's 2e-05 (--projector-lr)" in message) == (projector_lr is not None)
    assert ("--precision bf16 or fp32 in place of fp16" in message) == fp16


def test_out_a_symlink_gets_the_checkpoint_where_it_points(tiny_checkpoint, data, tmp_path):
    """The trainer writes its checkpoints through a symlink at OUT (a link to a larger disk):
    the final checkpoint goes there too, the link left pointing at it. Built beside the link,
    it replaced the link, left the checkpoints behind in the target, and from another
    filesystem failed to take them along (EXDEV, a traceback after the whole run)."""
    from llava_edge.training.train import train

    target = tmp_path / "disk" / "run"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    result = train(2, tiny_checkpoint, data["train"], link, images=data["images"], max_steps=1,
                   global_batch_size=2, gradient_checkpointing=False, progress=False)  # fmt: skip
    assert result.out_dir == link
    assert link.is_symlink() and link.resolve() == target
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in (target / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out"]  # nothing left beside


def test_adapters_lost_or_without_weights_are_named(tiny_checkpoint, tmp_path, capsys):
    import torch

    from llava_edge.modeling import load_model
    from llava_edge.training.lora import add_lora

    adapters = tmp_path / "adapters"
    add_lora(load_model(tiny_checkpoint, dtype=torch.float32), 2, 4, 0.0).save_pretrained(adapters)
    (adapters / "adapter_model.safetensors").unlink()  # copied without its weights
    out = str(tmp_path / "merged")
    assert cli(["merge-lora", str(adapters), out]) == 1
    assert last_line(capsys.readouterr().err) == (
        f"llava-edge merge-lora: error: {adapters} has adapter_config.json but no adapter "
        "weights (adapter_model.safetensors or adapter_model.bin); copy them there too"
    )
    assert cli(["merge-lora", str(tmp_path / "gone"), out]) == 1
    assert last_line(capsys.readouterr().err) == (
        f"llava-edge merge-lora: error: adapter dir {tmp_path / 'gone'} does not exist"
    )
    assert not (tmp_path / "merged").exists()


def test_the_logged_learning_rate_is_lrs_not_the_projectors(tiny_checkpoint, data, tmp_path):
    """With a projector rate of its own (LoRA's default 2e-5), the logs and the progress bar
    show --lr's schedule, the one the user set, not the projector's."""
    from transformers import TrainerCallback

    from llava_edge.training.train import train

    class Logs(TrainerCallback):
        rates: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "learning_rate" in logs:
                self.rates.append(logs["learning_rate"])

    train(
        2, tiny_checkpoint, data["train"], tmp_path / "out", images=data["images"],
        lora=True, lora_rank=2, lora_alpha=4, learning_rate=5e-2, warmup_ratio=0.0,
        max_steps=1, global_batch_size=2, gradient_checkpointing=False, save_steps=1000,
        progress=False, callbacks=[Logs()],
    )  # fmt: skip
    assert Logs.rates == [pytest.approx(5e-2)]


def test_a_base_given_that_is_no_checkpoint_is_named_as_given(tiny_checkpoint, tmp_path, capsys):
    """A --base given is named as the option, not answered with "pass --base"."""
    import torch

    from llava_edge.modeling import load_model
    from llava_edge.training.lora import add_lora

    adapters = tmp_path / "adapters"
    add_lora(load_model(tiny_checkpoint, dtype=torch.float32), 2, 4, 0.0).save_pretrained(adapters)
    argv = ["merge-lora", str(adapters), str(tmp_path / "merged"), "--base", str(tmp_path)]
    assert cli(argv) == 1
    assert last_line(capsys.readouterr().err) == (
        f"llava-edge merge-lora: error: --base {tmp_path} is not a checkpoint dir (it has no "
        "config.json); give the checkpoint the adapters were trained from"
    )


def test_a_picture_over_pils_pixel_limit_is_bad_before_training(tiny_checkpoint, data, monkeypatch):
    """Between PIL's decompression-bomb limit and twice it, opening a file only warns, while
    loading it for a batch (load_image) refuses it: the check before training must refuse it
    too, or the run stops when it reaches that picture, hours in."""
    from PIL import Image
    from transformers import AutoProcessor

    from llava_edge.runtime.template import get_template
    from llava_edge.training.data import BadSample
    from llava_edge.training.dataset import TrainingSet, count_image_tokens
    from llava_edge.training.labels import Labeler

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    labeler = Labeler(
        processor.tokenizer,
        get_template("vicuna_v1"),
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
        num_image_tokens=count_image_tokens(processor),
        max_length=1024,
    )
    with Image.open(next(data["images"].iterdir())) as picture:
        pixels = picture.width * picture.height
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels - 1)
    with pytest.raises(BadSample, match=r"sample train-0: image \S+ has more pixels than PIL's"):
        TrainingSet(
            data["train"], data["images"], labeler, processor.image_processor, progress=False
        )


def test_resume_into_a_mount_point_is_refused_before_training(
    tiny_checkpoint, data, tmp_path, monkeypatch, capsys
):
    """--resume onto an OUT that is a mount point (the run's dir bind-mounted into a container)
    is refused before any step, as a new run there is: the trained checkpoint, built beside OUT,
    could not be renamed into its place, and the run failed only once it had trained. A new
    run's advice, a new dir inside it, would hold no checkpoint: the message says where to move
    the run's checkpoints, and the run resumes from there."""
    import os

    out = tmp_path / "out"
    argv = ["train", "--stage", "2", "--model", str(tiny_checkpoint), "--out", str(out)]
    argv += ["--data", str(data["train"]), "--images", str(data["images"]), "--batch-size", "1"]
    argv += ["--save-steps", "1", "--no-gradient-checkpointing"]
    assert cli([*argv, "--max-steps", "1"]) == 0
    capsys.readouterr()
    ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or ismount(p))
    assert cli([*argv, "--max-steps", "2", "--resume"]) == 1
    assert last_line(capsys.readouterr().err) == (
        f"llava-edge train: error: output dir {out} is a mount point, which the trained "
        "checkpoint, built beside it and renamed into its place, cannot replace; move "
        f"{out / 'checkpoints'} to {out / 'run' / 'checkpoints'} and resume with --out {out / 'run'}"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    (out / "run").mkdir()  # as the message says: the run goes on from its checkpoint
    (out / "checkpoints").rename(out / "run" / "checkpoints")
    argv[argv.index(str(out))] = str(out / "run")
    assert cli([*argv, "--max-steps", "2", "--resume"]) == 0
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_a_step_whose_loss_alone_is_not_finite_spoils_only_its_own_log(
    tiny_checkpoint, data, tmp_path, monkeypatch
):
    """A step whose loss is not finite but whose weights stay finite (fp16's loss scaling
    skips it) is logged as NaN, and the run goes on: the losses logged after it are the steps'
    own, not NaN to the end (the trainer zeroes its running loss by subtracting it from
    itself, which NaN survives)."""
    import math

    import torch
    from transformers import LlavaForConditionalGeneration

    from llava_edge.training.train import train

    forward = LlavaForConditionalGeneration.forward
    calls = []

    def nan_loss_on_the_second_step(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2 and output.loss is not None:  # NaN in value, its gradient finite
            output.loss = output.loss + torch.tensor(float("nan"))
        return output

    monkeypatch.setattr(LlavaForConditionalGeneration, "forward", nan_loss_on_the_second_step)
    result = train(2, tiny_checkpoint, data["train"], tmp_path / "out", images=data["images"],
                   max_steps=4, global_batch_size=1, logging_steps=1, save_steps=1000,
                   gradient_checkpointing=False, progress=False)  # fmt: skip
    assert [step for step, _ in result.losses] == [1, 2, 3, 4]
    assert [math.isfinite(loss) for _, loss in result.losses] == [True, False, True, True]


def test_a_dir_without_adapters_is_refused_naming_where_they_are(tmp_path, capsys):
    """merge-lora given a `train --lora` OUT (adapters merged in, kept in OUT/adapter) says so
    and names OUT/adapter; given another dir, it says what to give."""
    out = tmp_path / "ft"
    (out / "adapter").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "adapter" / "adapter_config.json").write_text("{}")
    merged = str(tmp_path / "merged")
    assert cli(["merge-lora", str(out), merged]) == 1
    assert last_line(capsys.readouterr().err) == (
        f"llava-edge merge-lora: error: {out} has no adapter_config.json: it holds no LoRA "
        f"adapters; {out} is a checkpoint with them merged in already (use it as it is), and "
        f"{out / 'adapter'} holds them"
    )
    assert cli(["merge-lora", str(tmp_path), merged]) == 1
    assert last_line(capsys.readouterr().err) == (
        f"llava-edge merge-lora: error: {tmp_path} has no adapter_config.json: it holds no LoRA "
        "adapters; give the dir that holds adapter_config.json (`train --lora --keep-adapters` "
        "keeps OUT/adapter)"
    )
    assert not (tmp_path / "merged").exists()


def test_merge_lora_help_names_the_dirs_that_hold_adapters(capsys):
    """ADAPTER_DIR is OUT/adapter or a trainer checkpoint, not the plain checkpoint a LoRA run
    writes as OUT (refused above)."""
    with pytest.raises(SystemExit):
        cli(["merge-lora", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "OUT/adapter of `train --lora --keep-adapters`, or a trainer checkpoint of a LoRA run "
        "(OUT/checkpoints/checkpoint-N)" in help_text
    )
