"""Training stages on the tiny model: what trains, what stays frozen, LoRA merging, resuming,
two processes, bad input, and that the result exports and evaluates through the runtime."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_edge.cli import main as cli
from llava_edge.training.synth import synthesize
from llava_edge.training.train import train

# A few steps, no checkpoints along the way, no progress bars.
FAST = dict(
    max_steps=2,
    global_batch_size=4,
    learning_rate=1e-2,
    warmup_ratio=0.0,
    gradient_checkpointing=False,
    save_steps=1000,
    progress=False,
)
# Key prefixes as transformers saves LLaVA (the llava-hf layout).
VISION = "vision_tower."
PROJECTOR = "multi_modal_projector."
LANGUAGE = "language_model."


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def changed(before: dict, after: dict, prefixes: tuple[str, ...] | str) -> dict[str, bool]:
    keys = [k for k in before if k.startswith(prefixes)]
    assert keys
    return {k: not torch.equal(before[k], after[k]) for k in keys}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return synthesize(tmp_path_factory.mktemp("data"), train=8, test=4, seed=1)


@pytest.fixture(scope="module")
def stage1(tiny_checkpoint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "out"
    # Gradient checkpointing on (LLaVA's default) with a frozen language model.
    options = {**FAST, "gradient_checkpointing": True}
    return train(1, tiny_checkpoint, data["captions"], out, images=data["images"], **options)


@pytest.fixture(scope="module")
def stage2(stage1, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2") / "out"
    return train(2, stage1.out_dir, data["train"], out, images=data["images"], **FAST)


@pytest.fixture(scope="module")
def lora(stage1, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    return train(
        2,
        stage1.out_dir,
        data["train"],
        out,
        images=data["images"],
        lora=True,
        keep_adapters=True,
        lora_rank=4,
        lora_alpha=8,
        **{**FAST, "learning_rate": 5e-2},
    )


def test_stage1_trains_the_projector_only(tiny_checkpoint, stage1):
    from transformers import LlavaForConditionalGeneration

    before, after = weights(tiny_checkpoint), weights(stage1.out_dir)
    assert not any(changed(before, after, VISION).values())
    assert not any(changed(before, after, LANGUAGE).values())
    assert all(changed(before, after, PROJECTOR).values())
    out = stage1.out_dir
    assert json.loads((out / "llava_edge.json").read_text()) == {"template": "plain"}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stage1.steps == 2 and [step for step, _ in stage1.losses] == [1, 2]
    LlavaForConditionalGeneration.from_pretrained(out)  # loads as a plain LLaVA checkpoint


def test_stage2_trains_projector_and_language_model(stage1, stage2):
    before, after = weights(stage1.out_dir), weights(stage2.out_dir)
    assert not any(changed(before, after, VISION).values())
    assert all(changed(before, after, PROJECTOR).values())
    language = changed(before, after, LANGUAGE)
    assert all(v for k, v in language.items() if ".layers." in k), language
    assert language["language_model.lm_head.weight"]
    assert language["language_model.model.embed_tokens.weight"]
    assert json.loads((stage2.out_dir / "llava_edge.json").read_text()) == {"template": "vicuna_v1"}
    from transformers import AutoProcessor

    # The processor's chat template now prompts the way the model was trained.
    processor = AutoProcessor.from_pretrained(stage2.out_dir)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
        add_generation_prompt=True,
    )
    assert prompt.startswith("A chat between") and prompt.endswith("USER: <image>\nQ? ASSISTANT:")


def _logits(model, data) -> torch.Tensor:
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(data["checkpoint"])
    image = Image.open(data["images"] / "train_00000.png")
    inputs = processor(
        text="USER: <image>\nWhat color? ASSISTANT:", images=image, return_tensors="pt"
    )
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_merged_lora_checkpoint_equals_base_plus_adapters(stage1, lora, data, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    inputs = {**data, "checkpoint": lora.out_dir}
    base = LlavaForConditionalGeneration.from_pretrained(stage1.out_dir)
    base_logits = _logits(base, inputs)
    adapted = PeftModel.from_pretrained(base, lora.out_dir / "adapter")
    adapted_logits = _logits(adapted, inputs)
    merged = LlavaForConditionalGeneration.from_pretrained(lora.out_dir)
    merged_logits = _logits(merged, inputs)
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)

    # LoRA touched the language model's Linear layers and the projector, nothing else.
    before, after = weights(stage1.out_dir), weights(lora.out_dir)
    assert set(before) == set(after)  # a plain checkpoint: no lora_ or modules_to_save keys
    assert not any(changed(before, after, VISION).values())
    assert all(changed(before, after, PROJECTOR).values())
    language = changed(before, after, LANGUAGE)
    linear = ("_proj.weight",)
    assert all(v for k, v in language.items() if k.endswith(linear))
    assert not any(v for k, v in language.items() if not k.endswith(linear))

    # merge-lora on the kept adapters gives the same checkpoint.
    assert cli(["merge-lora", str(lora.out_dir / "adapter"), str(tmp_path / "merged")]) == 0
    again = weights(tmp_path / "merged")
    for key, tensor in after.items():
        torch.testing.assert_close(again[key], tensor, atol=1e-6, rtol=1e-6)
    assert (
        json.loads((tmp_path / "merged" / "llava_edge.json").read_text())["template"] == "vicuna_v1"
    )


class Crash(Exception):
    pass


def test_resume_after_an_interruption_reaches_the_same_loss(stage1, data, tmp_path):
    from transformers import TrainerCallback

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Crash

    options = {
        **FAST,
        "max_steps": 4,
        "global_batch_size": 2,
        "save_steps": 2,
        "save_total_limit": 2,
    }
    options["learning_rate"] = 1e-3
    args = (2, stage1.out_dir, data["train"])
    whole = train(*args, tmp_path / "whole", images=data["images"], **options)
    with pytest.raises(Crash):
        train(
            *args, tmp_path / "cut", images=data["images"], callbacks=[CrashAfterSave()], **options
        )
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = train(*args, tmp_path / "cut", images=data["images"], resume=True, **options)
    assert resumed.steps == whole.steps == 4
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4]  # the log history comes back too
    assert resumed.final_loss == pytest.approx(whole.final_loss, abs=1e-6)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_two_processes_end_with_identical_weights(stage1, data, tmp_path, cpu_only):
    reports = tmp_path / "reports"
    reports.mkdir()
    (tmp_path / "tmp").mkdir()  # torchrun leaves a dir of its own in the temporary dir
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    command = [
        shutil.which("torchrun", path=str(Path(sys.executable).parent)),
        "--standalone",  # a free local port for the rendezvous
        "--nproc_per_node",
        "2",
        str(Path(__file__).with_name("two_ranks.py")),
        str(stage1.out_dir),
        str(data["train"]),
        str(data["images"]),
        str(tmp_path / "out"),
        str(reports),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["backend"] == "gloo"
    assert ranks[0]["steps"] == ranks[1]["steps"] == 1
    assert ranks[0]["digest"] == ranks[1]["digest"]
    # ... and they did train: the saved result differs from where they started.
    before, after = weights(stage1.out_dir), weights(tmp_path / "out")
    assert any(changed(before, after, LANGUAGE).values())


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def _sample(sample_id: str, image: str | None = "train_00000.png", turns: int = 1) -> dict:
    conversations = []
    for i in range(turns):
        conversations.append(
            {"from": "human", "value": ("<image>\n" if image and not i else "") + "What color?"}
        )
        conversations.append({"from": "gpt", "value": "red"})
    record = {"id": sample_id, "conversations": conversations}
    if image:
        record["image"] = image
    return record


@pytest.fixture(scope="module")
def bad_images(data) -> Path:
    root = data["images"]
    (root / "garbage.png").write_bytes(b"this is not a picture")
    good = (root / "train_00001.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def _alternation_broken() -> dict:
    record = _sample("talks-twice", turns=2)
    record["conversations"][2]["from"] = "gpt"
    return record


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            _sample("no-file", image="missing.png"),
            "sample no-file: image .*missing.png does not exist",
        ),
        (
            {"id": "no-talk", "image": "train_00000.png"},
            "sample no-talk: has no 'conversations' list",
        ),
        (_alternation_broken(), "sample talks-twice: the conversation does not alternate"),
        (
            _sample("garbage", image="garbage.png"),
            "sample garbage: image .*garbage.png cannot be read",
        ),
        (
            _sample("truncated", image="truncated.png"),
            "sample truncated: image .*truncated.png is corrupt",
        ),
    ],
)
def test_bad_samples_stop_training_with_their_id(
    bad, message, stage1, data, bad_images, tmp_path, capsys
):
    records = [_sample(f"good-{i}") for i in range(3)] + [bad]
    path = _write(tmp_path / "bad.json", records)
    argv = ["train", "--stage", "2", "--model", str(stage1.out_dir), "--data", str(path)]
    argv += ["--images", str(bad_images), "--out", str(tmp_path / "out"), "--max-steps", "1"]
    argv += ["--batch-size", "4", "--no-gradient-checkpointing", "--save-steps", "1000"]
    # A loader worker: an image broken past its header fails there, in another process.
    argv += ["--workers", "1"]
    assert cli(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("llava-edge train: error: "), err
    assert err.strip().endswith(errors[0]) and "Traceback" not in err
    assert re.search(message, errors[0]), errors[0]
    assert "--skip-bad" in errors[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_skip_bad_keeps_a_batch_of_one_whole(stage1, data, bad_images, tmp_path, capsys, cpu_only):
    """An image broken past its header, alone in its batch (--per-device-batch-size 1, as a
    small GPU trains): the next sample takes its place, rather than an empty batch ending the
    run hours in."""
    records = [_sample("good-0"), _sample("truncated", image="truncated.png"), _sample("good-1")]
    path = _write(tmp_path / "bad.json", records)
    argv = ["train", "--stage", "2", "--model", str(stage1.out_dir), "--data", str(path)]
    argv += ["--images", str(bad_images), "--out", str(tmp_path / "out"), "--batch-size", "1"]
    argv += ["--no-gradient-checkpointing", "--skip-bad", "--save-steps", "1000"]
    assert cli(argv) == 0, capsys.readouterr().err[-2000:]
    captured = capsys.readouterr()
    assert "trained stage 2 for 3 steps" in captured.out
    assert captured.err.count("skipped sample truncated: image") == 1


def test_a_data_file_of_the_wrong_shape_is_named(stage1, data, tmp_path, capsys):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"samples": [_sample("a")]}))
    argv = ["train", "--stage", "2", "--model", str(stage1.out_dir), "--data", str(path)]
    assert cli([*argv, "--images", str(data["images"]), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llava-edge train: error: ") and "holds one JSON object" in err[-1]
    assert str(path) in err[-1]


def test_skip_bad_leaves_bad_samples_out_and_counts_them(
    stage1, data, bad_images, tmp_path, capsys, cpu_only
):
    records = [_sample(f"good-{i}") for i in range(4)]
    records += [_sample("no-file", image="missing.png"), {"id": "no-talk"}, _alternation_broken()]
    records += [_sample("garbage", image="garbage.png"), _sample("text-only", image=None)]
    # Its header reads, so only loading it in training finds it broken: replaced in its batch.
    records += [_sample("truncated", image="truncated.png")]
    path = _write(tmp_path / "bad.json", records)
    argv = ["train", "--stage", "2", "--model", str(stage1.out_dir), "--data", str(path)]
    argv += ["--images", str(bad_images), "--out", str(tmp_path / "out"), "--max-steps", "1"]
    argv += ["--batch-size", "6", "--no-gradient-checkpointing", "--skip-bad"]
    assert cli([*argv, "--save-steps", "1000"]) == 0
    captured = capsys.readouterr()
    assert "skipped 4 bad sample(s)" in captured.err
    assert "4 bad sample(s) skipped" in captured.out
    assert "skipped sample truncated: image" in captured.err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_samples_opening_with_a_gpt_turn_train_without_it_and_are_counted_once(
    stage1, data, tmp_path, capsys
):
    """As LLaVA's preprocess does; the count is in the summary line, not a line a sample."""
    records = [_sample(f"good-{i}") for i in range(4)]
    for record in records[1:3]:
        record["conversations"].insert(0, {"from": "gpt", "value": "Hello!"})
    path = _write(tmp_path / "greeted.json", records)
    argv = ["train", "--stage", "2", "--model", str(stage1.out_dir), "--data", str(path)]
    argv += ["--images", str(data["images"]), "--out", str(tmp_path / "out"), "--max-steps", "1"]
    argv += ["--batch-size", "4", "--no-gradient-checkpointing", "--save-steps", "1000"]
    assert cli(argv) == 0, capsys.readouterr().err[-2000:]
    captured = capsys.readouterr()
    (line,) = captured.out.strip().splitlines()
    assert line.startswith("trained stage 2 for 1 steps")
    assert "the opening gpt turn of 2 sample(s) left out" in line
    assert "good-1" not in captured.err and "good-2" not in captured.err


def test_trained_checkpoint_exports_and_evaluates(stage2, data, tmp_path, capsys):
    assert cli(["export", str(stage2.out_dir), str(tmp_path / "model")]) == 0  # verified export
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["template"]["name"] == "vicuna_v1"
    answers = tmp_path / "answers.jsonl"
    argv = ["eval", str(tmp_path / "model"), "--data", str(data["test"])]
    assert cli([*argv, "--images", str(data["images"]), "--answers", str(answers)]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    tests = json.loads(data["test"].read_text())
    assert [r["id"] for r in rows] == [t["id"] for t in tests]
    assert [r["answer"] for r in rows] == [t["conversations"][1]["value"] for t in tests]
    assert all(r["correct"] == (r["prediction"].strip().lower() == r["answer"]) for r in rows)
    correct = sum(r["correct"] for r in rows)
    assert f"({correct}/{len(rows)})" in out

    # A missing image names its sample; --skip-bad scores the rest.
    bad = _write(tmp_path / "bad.json", [*tests, _sample("lost", image="lost.png")])
    argv = ["eval", str(tmp_path / "model"), "--data", str(bad), "--images", str(data["images"])]
    assert cli(argv) == 1
    assert "sample lost: image" in capsys.readouterr().err
    assert cli([*argv, "--skip-bad"]) == 0
    assert f"/{len(rows)}) (1 bad sample(s) skipped)" in capsys.readouterr().out
    assert (tmp_path / "bad.answers.jsonl").is_file()  # beside the data by default


@pytest.mark.parametrize(
    "global_batch, per_device, processes, plan",
    [(128, 16, 1, (16, 8)), (128, 16, 8, (16, 1)), (256, 32, 2, (32, 4)), (4, 16, 2, (2, 1))],
)
def test_gradient_accumulation_makes_up_the_global_batch(global_batch, per_device, processes, plan):
    from llava_edge.training.train import batch_plan

    assert batch_plan(global_batch, per_device, processes) == plan


def test_uneven_global_batch_is_refused():
    from llava_edge.errors import LlavaEdgeError
    from llava_edge.training.train import batch_plan

    with pytest.raises(LlavaEdgeError, match="not a multiple"):
        batch_plan(100, 16, 8)


@pytest.mark.parametrize("stage, lora, lr", [(1, False, 1e-3), (2, False, 2e-5), (2, True, 2e-4)])
def test_defaults_are_llava_1_5s(stage, lora, lr, tmp_path):
    from llava_edge.training.train import STAGES, TrainOptions, _training_args

    args = _training_args(tmp_path, stage, TrainOptions(lora=lora), STAGES[stage], False)
    assert args.learning_rate == lr
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert global_batch == (256 if stage == 1 else 128)
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.03
    assert args.num_train_epochs == 1 and args.weight_decay == 0.0
    assert args.gradient_checkpointing  # also set under its newer name, where there is one


def test_checkpointing_takes_the_name_this_transformers_knows(tmp_path):
    """transformers 5.17's TrainingArguments has only `gradient_checkpointing`; newer 5.x
    renamed it `activation_checkpointing` and keeps the old name as a deprecated alias."""
    from transformers import TrainingArguments

    from llava_edge.training.train import checkpointing_arguments

    @dataclasses.dataclass
    class OlderArguments:
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    older = checkpointing_arguments(OlderArguments, True)
    assert OlderArguments(**older).gradient_checkpointing
    assert older["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    for on in (True, False):
        args = TrainingArguments(
            output_dir=str(tmp_path), **checkpointing_arguments(TrainingArguments, on)
        )
        assert args.gradient_checkpointing is on
