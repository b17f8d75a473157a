"""train and eval used as a robotics engineer would: inputs an output dir must not swallow,
resuming a run with other options, an interrupted final save, LLaVA's stage-1 input, the
model's context as the longest sample."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import record_syncs_and_renames

from llava_edge.cli import main as cli
from llava_edge.training.synth import synthesize

GOOD_TURNS = [
    {"from": "human", "value": "Say hello."},
    {"from": "gpt", "value": "Hello."},
]


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return synthesize(tmp_path / "data", train=4, test=0, seed=1)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("out", ["data", "data/images"])
def test_out_holding_the_data_or_images_is_refused(out, tiny_checkpoint, data, tmp_path, capsys):
    before = snapshot(tmp_path / "data")
    argv = ["train", "--stage", "1", "--model", str(tiny_checkpoint), "--out", str(tmp_path / out)]
    argv += ["--data", str(data["captions"]), "--images", str(data["images"]), "--force"]
    assert cli([*argv, "--max-steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("which the trained checkpoint would replace; choose another output dir")
    assert "--data file" in err or "--images dir" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert snapshot(tmp_path / "data") == before


@pytest.mark.parametrize("out", ["runs/model", "runs"])
def test_out_that_is_or_holds_the_model_is_refused_even_with_force(
    out, tiny_checkpoint, data, tmp_path, capsys
):
    model = tmp_path / "runs" / "model"
    shutil.copytree(tiny_checkpoint, model)
    before = snapshot(model)
    argv = ["train", "--stage", "1", "--model", str(model), "--out", str(tmp_path / out)]
    argv += ["--data", str(data["captions"]), "--images", str(data["images"]), "--force"]
    assert cli([*argv, "--max-steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "the --model checkpoint" in err and "choose another output dir" in err, err
    assert snapshot(model) == before


FAST = dict(
    global_batch_size=2,
    warmup_ratio=0.0,
    gradient_checkpointing=False,
    progress=False,
    force=True,
)


def test_an_interrupted_final_save_keeps_the_checkpoints(
    tiny_checkpoint, data, tmp_path, monkeypatch
):
    import llava_edge.files as files
    from llava_edge.training.train import train

    out = tmp_path / "out"
    sync_tree = files.sync_tree

    def interrupted(root: Path) -> None:  # Ctrl-C while the new OUT goes to disk
        if Path(root).name.startswith(f".{out.name}.partial-"):
            raise KeyboardInterrupt
        sync_tree(root)

    monkeypatch.setattr(files, "sync_tree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(1, tiny_checkpoint, data["captions"], out, images=data["images"], max_steps=2, **FAST)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "model.safetensors").is_file()
    monkeypatch.setattr(files, "sync_tree", sync_tree)
    options = {**FAST, "force": False, "resume": True}
    result = train(
        1, tiny_checkpoint, data["captions"], out, images=data["images"], max_steps=2, **options
    )
    assert result.steps == 2 and (out / "model.safetensors").is_file()
    assert (out / "checkpoints" / "checkpoint-2" / "optimizer.pt").is_file()


@pytest.mark.parametrize("save", ["checkpoint", "final"])
def test_ctrl_c_mid_save_leaves_no_half_written_checkpoint(
    tiny_checkpoint, data, tmp_path, monkeypatch, save
):
    """A trainer checkpoint or the final model (each as large as the model, its optimizer state
    twice that) is written under a staging name: Ctrl-C half-way removes it, rather than
    leaving it on the disk until the next run."""
    from transformers import Trainer

    from llava_edge.training.train import train

    if save == "checkpoint":
        monkeypatch.setattr(Trainer, "_save_rng_state", _interrupted)
    else:
        real = Trainer.save_model

        def save_model(self, output_dir=None, *args, **kwargs):
            real(self, output_dir, *args, **kwargs)  # the weights are there, the rest is not
            if Path(output_dir).name == "final-tmp":
                raise KeyboardInterrupt

        monkeypatch.setattr(Trainer, "save_model", save_model)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(1, tiny_checkpoint, data["captions"], out, images=data["images"], max_steps=2,
              save_steps=2, **FAST)  # fmt: skip
    left = [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("checkpoint-")]
    assert left == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


def _interrupted(*_args, **_kwargs) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "save, error",
    [
        # torch.save's zip writer on a full disk says nothing of the disk
        ("checkpoint", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")),
        ("final", RuntimeError("I/O error: No space left on device (os error 28)")),  # safetensors
    ],
)
def test_a_full_disk_while_saving_is_one_line(
    tiny_checkpoint, data, tmp_path, monkeypatch, capsys, save, error
):
    import shutil as shutil_module

    from transformers import Trainer

    def full(self, output_dir=None, *args, **kwargs):
        raise error

    if save == "checkpoint":
        monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full)
    else:
        real = Trainer.save_model
        monkeypatch.setattr(
            Trainer,
            "save_model",
            lambda self, output_dir=None, *a, **k: (
                full(self)
                if Path(output_dir).name == "final-tmp"
                else real(self, output_dir, *a, **k)
            ),
        )
    usage = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(path)._replace(free=0))
    out = tmp_path / "out"
    argv = ["train", "--stage", "1", "--model", str(tiny_checkpoint), "--out", str(out),
            "--data", str(data["captions"]), "--images", str(data["images"]), "--max-steps", "2",
            "--save-steps", "2", "--batch-size", "2", "--no-gradient-checkpointing"]  # fmt: skip
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"llava-edge train: error: no space left on the device writing {out}; free some space "
        "or write to another disk"
    )
    left = [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("checkpoint-")]
    assert left == []


def test_a_trainer_checkpoint_is_on_disk_before_its_name_is(
    tiny_checkpoint, data, tmp_path, monkeypatch
):
    """Power loss: a checkpoint is written as tmp-checkpoint-N, each of its files flushed, then
    renamed checkpoint-N and its dir flushed, so --resume never finds a checkpoint-N whose files
    never reached the disk."""
    from llava_edge.training.train import train

    events = record_syncs_and_renames(monkeypatch)
    out = tmp_path / "out"
    train(1, tiny_checkpoint, data["captions"], out, images=data["images"], max_steps=1, **FAST)
    # the trainer's dir as it was before OUT was installed (its checkpoints went along with it)
    final = next(
        path for kind, path in events if kind == "rename" and path.endswith("/checkpoint-1")
    )
    run_dir = Path(final).parent
    staging = run_dir / "tmp-checkpoint-1"
    renamed = events.index(("rename", final))
    synced = {path for kind, path in events[:renamed] if kind == "fsync"}
    written = sorted(p.relative_to(out / "checkpoints" / "checkpoint-1") for p in
                     (out / "checkpoints" / "checkpoint-1").rglob("*") if p.is_file())  # fmt: skip
    assert written and {str(staging / name) for name in written} <= synced
    assert ("fsync", str(run_dir)) in events[renamed:]


@pytest.fixture(scope="module")
def saved_runs(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """OUT dirs of a stage-1 run and a stage-2 LoRA run, each with a trainer checkpoint."""
    from llava_edge.training.train import train

    root = tmp_path_factory.mktemp("runs")
    data = synthesize(root / "data", train=2, test=0, seed=1)
    runs = {"images": data["images"]}
    for name, stage, samples, extra in [
        ("stage1", 1, data["captions"], {}),
        ("lora", 2, data["train"], dict(lora=True, lora_rank=2, lora_alpha=4)),
    ]:
        runs[name], runs[f"{name} data"] = root / name, samples
        train(stage, tiny_checkpoint, samples, runs[name], images=data["images"],
              max_steps=1, save_steps=1, **FAST, **extra)  # fmt: skip
    return runs


def test_merge_lora_of_the_last_trainer_checkpoint_is_the_runs_result(saved_runs, tmp_path):
    """docs/training.md: merge-lora merges adapters saved earlier, a trainer checkpoint's too
    (their base found from adapter_config.json); merged from the last one, the projector
    trained beside them included, they give the checkpoint the run wrote."""
    import torch
    from safetensors.torch import load_file

    run = saved_runs["lora"]
    checkpoint = run / "checkpoints" / "checkpoint-1"
    assert cli(["merge-lora", str(checkpoint), str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    result = load_file(str(run / "model.safetensors"))
    assert merged.keys() == result.keys()
    for key in result:
        torch.testing.assert_close(merged[key], result[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "run, options, message",
    [
        ("lora", ["--stage", "2"], "was saved by a run with --lora; resume with the options"),
        ("stage1", ["--stage", "2", "--lora"], "was saved by a run without --lora; resume with"),
        (
            "lora",
            ["--stage", "2", "--lora", "--lora-rank", "4"],
            "adapters of --lora-rank 2, not 4",
        ),
        ("stage1", ["--stage", "2"], "was trained with the plain template, not vicuna_v1; resume"),
        (
            "stage1",
            ["--stage", "2", "--template", "plain"],
            "holds the optimizer of a run that trained other parameters",
        ),
        # the saved optimizer would bring back its own rate and decay, unsaid
        (
            "stage1",
            ["--stage", "1", "--lr", "0.05"],
            "was trained at learning rate 0.001, not 0.05",
        ),
        (
            "lora",
            [
                "--stage",
                "2",
                "--lora",
                "--lora-rank",
                "2",
                "--lora-alpha",
                "4",
                "--weight-decay",
                "0.1",
            ],
            "was trained at weight decay 0, not 0.1 (--weight-decay); resume with the options",
        ),
    ],
)
def test_resuming_with_other_options_is_refused_in_one_line(
    run, options, message, saved_runs, tiny_checkpoint, capsys
):
    out = saved_runs[run]
    before = snapshot(out)
    argv = ["train", *options, "--model", str(tiny_checkpoint), "--out", str(out), "--resume"]
    argv += ["--data", str(saved_runs[f"{run} data"]), "--images", str(saved_runs["images"])]
    argv += ["--batch-size", "2"]  # the saved runs' (another is refused: other samples a step)
    assert cli([*argv, "--max-steps", "2", "--no-gradient-checkpointing"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1], err[-2000:]
    assert "pass --force to start over" in err
    assert snapshot(out) == before


def _stage_2(checkpoint: Path, out: Path, data: Path) -> list[str]:
    """train's arguments for a stage-2 run of `checkpoint` on `data` into `out`."""
    return [
        "train",
        "--stage",
        "2",
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--data",
        str(data),
    ]


def test_samples_stay_within_the_models_context(tiny_checkpoint, tmp_path, capsys):
    # The tiny preset's context is 1024 tokens; LLaVA-1.5's default --max-length is 2048.
    long = {"id": "long", "conversations": [
        {"from": "human", "value": "the " * 1100},
        {"from": "gpt", "value": "yes"},
    ]}  # fmt: skip
    (tmp_path / "long.json").write_text(json.dumps([long]))
    argv = [
        *_stage_2(tiny_checkpoint, tmp_path / "out", tmp_path / "long.json"),
        "--max-steps",
        "1",
    ]
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "sample long: no answer token is left after truncation to --max-length 1024" in err
    assert cli([*argv, "--max-length", "2048"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("--max-length 2048 is past the language model's context of 1024 tokens "
                        "(max_position_embeddings); give at most 1024")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_samples_cut_by_max_length_are_counted_once_before_training(
    tiny_checkpoint, tmp_path, capsys
):
    """A sample past --max-length loses the end of its answer: the run says how many, the
    longest and the flag to raise, in one line at its start, not one per sample."""
    from transformers import AutoProcessor

    from llava_edge.runtime.template import get_template
    from llava_edge.training.dataset import TrainingSet, count_image_tokens
    from llava_edge.training.labels import Labeler

    def said(text: str) -> dict:
        return {"id": text[:8], "conversations": [
            {"from": "human", "value": "Say it."}, {"from": "gpt", "value": text},
        ]}  # fmt: skip

    records = [said("words " * 300), said("more words " * 200), said("short."), said("brief.")]
    (tmp_path / "long.json").write_text(json.dumps(records))
    argv = [
        *_stage_2(tiny_checkpoint, tmp_path / "out", tmp_path / "long.json"),
        "--max-steps",
        "1",
        "--batch-size",
        "1",
    ]
    assert cli([*argv, "--max-length", "128", "--no-gradient-checkpointing"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "--max-length" in line]
    assert len(notes) == 1, notes
    found = re.fullmatch(
        r"2 of 4 sample\(s\) are longer than --max-length 128 tokens \(the longest: (\d+)\) and "
        r"are cut at their end; raise --max-length \(up to the language model's context of "
        r"1024\) to keep more",
        notes[0],
    )
    assert found, notes[0]
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)

    def cut(max_length: int) -> int:
        labeler = Labeler(
            processor.tokenizer,
            get_template("vicuna_v1"),
            image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
            num_image_tokens=count_image_tokens(processor),
            max_length=max_length,
        )
        read = TrainingSet(tmp_path / "long.json", None, labeler, None, progress=False)
        return read.truncated

    longest = int(found.group(1))
    assert (cut(longest - 1), cut(longest)) == (1, 0)


def test_absolute_image_paths_need_no_image_dir(
    tiny_checkpoint, tiny_model_dir, data, tmp_path, capsys
):
    from llava_edge.training.evaluate import evaluate

    samples = json.loads(data["train"].read_text())
    for sample in samples:
        sample["image"] = str((data["images"] / sample["image"]).resolve())
    absolute = tmp_path / "absolute.json"
    absolute.write_text(json.dumps(samples))
    out = tmp_path / "out"
    argv = ["train", "--stage", "2", "--model", str(tiny_checkpoint), "--data", str(absolute)]
    assert cli([*argv, "--out", str(out), "--max-steps", "1", "--no-gradient-checkpointing"]) == 0
    assert (out / "model.safetensors").is_file()
    result = evaluate(tiny_model_dir, absolute, answers=tmp_path / "answers.jsonl", progress=False)
    assert result.total == sum(len(s["conversations"]) // 2 for s in samples)


@pytest.mark.parametrize(
    "swap, message",
    [
        ("data", "data file {images} is a directory; give a LLaVA JSON or JSONL file"),
        ("images", "image dir {data} is a file; give the dir the images are in"),
    ],
)
def test_a_dir_for_a_file_and_a_file_for_a_dir_are_named(
    swap, message, tiny_checkpoint, data, tmp_path, capsys
):
    paths = {"data": data["train"], "images": data["images"]}
    given = {**paths, swap: paths["images" if swap == "data" else "data"]}
    argv = ["train", "--stage", "2", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o")]
    assert cli([*argv, "--data", str(given["data"]), "--images", str(given["images"])]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(message.format(**{k: str(v) for k, v in paths.items()}))


def broken_model(kind: str, tiny_checkpoint: Path, path: Path) -> Path:
    if kind == "llama":
        from transformers import LlamaConfig

        LlamaConfig(num_hidden_layers=1).save_pretrained(path)
        return path
    shutil.copytree(tiny_checkpoint, path)
    if kind == "broken config":
        (path / "config.json").write_text("{")
    elif kind == "no patch size":
        processor = json.loads((path / "processor_config.json").read_text())
        del processor["patch_size"]
        (path / "processor_config.json").write_text(json.dumps(processor))
    elif kind == "no weights":
        (path / "model.safetensors").unlink()
    elif kind == "quantized":  # a hub's 4-bit upload: loading it needs bitsandbytes
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        (path / "config.json").write_text(json.dumps(config))
    else:  # no processor
        for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink()
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("broken config", "cannot load --model .*: It looks like the config file"),
        ("no weights", "cannot load --model .*: .*no file named model.safetensors"),
        ("no processor", "cannot load --model .*: Can't load image processor"),
        ("llama", "--model .* is a 'llama' checkpoint; train takes LLaVA"),
        ("no patch size", 'add "patch_size": 8 to processor_config.json \\(a new file'),
        ("quantized", "--model .* holds bitsandbytes weights .* full-precision"),
    ],
)
def test_a_model_dir_train_cannot_load_is_named_in_one_line(
    kind, message, tiny_checkpoint, data, tmp_path, capsys
):
    model = broken_model(kind, tiny_checkpoint, tmp_path / "model")
    argv = ["train", "--stage", "2", "--model", str(model), "--out", str(tmp_path / "out")]
    argv += ["--data", str(data["train"]), "--images", str(data["images"]), "--max-steps", "1"]
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(message, err.strip().splitlines()[-1]), err[-1500:]


def test_out_holding_the_working_directory_is_refused(
    tiny_checkpoint, data, tmp_path, monkeypatch, capsys
):
    # Replaced whole at the end, the working directory cannot be renamed: a traceback after all
    # the training, and the result lost.
    work = tmp_path / "run" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    argv = ["train", "--stage", "2", "--model", str(tiny_checkpoint), "--data", str(data["train"])]
    for out in (".", ".."):
        assert cli([*argv, "--images", str(data["images"]), "--out", out, "--force"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.endswith(
            f"--out {out} holds the working directory {work}, which the trained checkpoint would "
            "replace; choose another output dir"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["work"] and not any(work.iterdir())


def test_the_logged_loss_is_transformers_loss_of_the_global_batch(
    tiny_checkpoint, data, tmp_path, cpu_only
):
    """Over gradient accumulation (2 x 2 samples) the logged loss of a step is the mean over
    every supervised token of the global batch, as LlavaForConditionalGeneration computes it on
    the whole batch at once (transformers' semantics; lr 0 leaves the weights as they were)."""
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from llava_edge.modeling import prompt_template
    from llava_edge.training.dataset import Collator, TrainingSet, count_image_tokens
    from llava_edge.training.labels import Labeler
    from llava_edge.training.train import train

    options = {**FAST, "global_batch_size": 4, "per_device_batch_size": 2, "learning_rate": 0.0}
    result = train(2, tiny_checkpoint, data["train"], tmp_path / "out", images=data["images"],
                   max_steps=1, **options)  # fmt: skip

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    labeler = Labeler(processor.tokenizer, prompt_template("vicuna_v1", config),
                      config.image_token_id, count_image_tokens(processor), 1024)  # fmt: skip
    samples = TrainingSet(data["train"], data["images"], labeler, processor.image_processor,
                          progress=False)  # fmt: skip
    batch = Collator(processor.tokenizer.pad_token_id)([samples[i] for i in range(4)])
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert result.losses == [(1, pytest.approx(expected, rel=1e-5))]


@pytest.mark.parametrize("links", [True, False])
def test_checkpoints_join_the_new_out_as_links_or_else_moved(links, tmp_path, monkeypatch):
    import os

    from llava_edge.training.train import _link_tree

    source, target = tmp_path / "out" / "checkpoints", tmp_path / "new" / "checkpoints"
    (source / "checkpoint-2").mkdir(parents=True)
    (source / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    target.parent.mkdir()
    if not links:  # FAT, exFAT: no hard links

        def no_link(*_args, **_kwargs):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    _link_tree(source, target)
    assert (target / "checkpoint-2" / "optimizer.pt").read_bytes() == b"state"
    assert source.exists() == links
    if links:
        assert os.path.samefile(
            source / "checkpoint-2" / "optimizer.pt", target / "checkpoint-2" / "optimizer.pt"
        )


def test_lora_adapters_resume_only_on_their_base(saved_runs, tiny_checkpoint, tmp_path, capsys):
    """peft loads adapters onto any base of their shape: resumed on another --model (another
    fine-tune, another stage-1 projector) they would train on, unsaid. The same base copied
    elsewhere resumes."""
    from llava_edge.training.checkpoint import init_checkpoint

    other = init_checkpoint(tmp_path / "other", preset="tiny", seed=1)
    out = Path(shutil.copytree(saved_runs["lora"], tmp_path / "out"))
    argv = ["train", "--stage", "2", "--lora", "--lora-rank", "2", "--lora-alpha", "4", "--resume"]
    argv += ["--out", str(out), "--max-steps", "2", "--batch-size", "2"]
    argv += ["--data", str(saved_runs["lora data"]), "--images", str(saved_runs["images"])]
    before = snapshot(out)
    assert cli([*argv, "--model", str(other)]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert f"was trained from --model {tiny_checkpoint}, not --model {other}" in last, err
    assert last.endswith("resume with that --model, or pass --force to start over")
    assert snapshot(out) == before
    copy = Path(shutil.copytree(tiny_checkpoint, tmp_path / "copy"))
    assert cli([*argv, "--model", str(copy), "--no-gradient-checkpointing"]) == 0


@pytest.mark.parametrize(
    "damaged, message",
    [
        ("adapter_model.safetensors", "cannot read .*adapter_model.safetensors \\(Error while"),
        ("trainer_state.json", "cannot read .*trainer_state.json \\(Expecting"),
    ],
)
def test_a_damaged_checkpoint_is_named_before_resuming(
    damaged, message, saved_runs, tiny_checkpoint, tmp_path, capsys
):
    out = Path(shutil.copytree(saved_runs["lora"], tmp_path / "out"))
    path = out / "checkpoints" / "checkpoint-1" / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a copy cut short
    argv = ["train", "--stage", "2", "--lora", "--lora-rank", "2", "--lora-alpha", "4", "--resume"]
    argv += ["--model", str(tiny_checkpoint), "--out", str(out), "--max-steps", "2"]
    argv += ["--data", str(saved_runs["lora data"]), "--images", str(saved_runs["images"])]
    assert cli(argv) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and re.search(message, last), err[-1500:]
    assert last.endswith("the checkpoint is damaged: delete it to resume from an earlier one, "
                         "or pass --force to start over")  # fmt: skip


def test_relative_images_without_an_image_dir_stop_the_run_even_with_skip_bad(
    tiny_checkpoint, data, tmp_path, capsys
):
    """The missing --images is the run's fault, not the samples': --skip-bad must not leave
    every image sample out and train on the text-only rest (eval refuses it the same way)."""
    samples = json.loads(data["train"].read_text())
    text_only = {"id": "text", "conversations": [GOOD_TURNS[0], GOOD_TURNS[1]]}
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([*samples, text_only, {**text_only, "id": "text2"}]))
    out = tmp_path / "out"
    argv = ["train", "--stage", "2", "--model", str(tiny_checkpoint), "--data", str(mixed)]
    argv += ["--out", str(out), "--max-steps", "1", "--no-gradient-checkpointing", "--skip-bad"]
    assert cli(argv) == 1  # no --images
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "llava-edge train: error: sample train-0's image train_00000.png is relative: pass "
        "--images DIR, the dir it is under"
    )
    assert not out.exists()


def test_a_tokenizer_without_a_padding_token_trains(tiny_checkpoint, data, tmp_path):
    # Llama's tokenizer names no padding token; padding is masked out, so any id does.
    from transformers import AutoTokenizer

    from llava_edge.training.train import train

    model = Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(model).pad_token_id is None
    result = train(2, model, data["train"], tmp_path / "out", images=data["images"],
                   max_steps=1, **FAST)  # fmt: skip
    assert result.steps == 1 and (tmp_path / "out" / "model.safetensors").is_file()
