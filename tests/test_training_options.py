"""train's options checked before any work, an earlier run's checkpoints kept until training
starts, checkpoint rotation, and merge-lora refusing adapters that do not fit their base."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
from conftest import one_line_error

from llava_edge.cli import main as cli
from llava_edge.training.synth import synthesize
from llava_edge.training.train import train

EARLIER = "checkpoint-99"  # an earlier run's checkpoint, numbered past any of the new run's


def earlier_run(out: Path) -> Path:
    """`out` as an earlier run left it: a resumable checkpoint in its trainer dir."""
    checkpoint = out / "checkpoints" / EARLIER
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 99}')
    return checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return synthesize(tmp_path_factory.mktemp("data"), train=4, test=0, seed=1)


# ---- train: option values --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (["--lr", "-1"], "--lr must be 0 or more, not -1.0"),
        (["--projector-lr", "nan"], "--projector-lr must be 0 or more"),
        (["--projector-lr", "1e-4"], "--projector-lr is for stage 2; stage 1 trains only the"),
        (["--workers", "-1"], "--workers must be at least 0, not -1"),
        (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
        (["--per-device-batch-size", "0"], "--per-device-batch-size must be at least 1, not 0"),
        (["--epochs", "0"], "--epochs must be above 0, not 0.0"),
        (["--epochs", "inf"], "--epochs must be a finite number, not inf"),
        (["--lr", "inf"], "--lr must be a finite number, not inf"),
        (["--stage", "2", "--projector-lr", "inf"], "--projector-lr must be a finite number"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number, not -?inf"),
        (["--max-steps", "0"], "--max-steps must be at least 1, not 0"),
        (["--save-steps", "0"], "--save-steps must be at least 1"),
        (["--save-total-limit", "-1"], "--save-total-limit must be at least 0"),
        (["--logging-steps", "0"], "--logging-steps must be at least 1"),
        (["--max-length", "0"], "--max-length must be at least 1"),
        (["--warmup-ratio", "1"], "--warmup-ratio must be at least 0 and below 1, not 1.0"),
        (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
        (["--report-to", "foo"], "--report-to: 'foo' is not a logger.*; choose from none, all, "),
        (["--report-to", "none,wandb"], "--report-to: 'none' is not a logger, or not one to list"),
        (["--fsdp", "{tmp}/missing.json"], "--fsdp .*missing.json: no such file"),
        (["--fsdp", "{tmp}/list.json"], "--fsdp .*list.json holds no JSON object"),
        (["--deepspeed", "{tmp}/broken.json"], "--deepspeed .*broken.json: not a readable JSON"),
        (["--deepspeed", "{tmp}/ds.json", "--fsdp", "{tmp}/ds.json"], "choose one"),
        (["--fsdp", "{tmp}/ds.json"], "--fsdp shards a model across GPUs, and this machine has"),
        (["--stage", "2", "--lora", "--lora-rank", "0"], "--lora-rank must be at least 1, not 0"),
        (["--stage", "2", "--lora", "--lora-dropout", "1"], "--lora-dropout must be at least 0"),
        (["--stage", "2", "--keep-adapters"], "--keep-adapters: LoRA options, for stage 2 with"),
        (
            ["--stage", "2", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1"],
            "--lora-rank, --lora-alpha, --lora-dropout: LoRA options, for stage 2 with --lora",
        ),
        (["--stage", "2", "--lora-dropout", "0"], "--lora-dropout: LoRA options, for stage 2"),
        (["--precision", "fp16"], "--precision fp16 needs a GPU"),
        (["--resume"], "--resume goes on from OUT's checkpoints and --force starts over; choose"),
    ],
)
def test_an_option_out_of_range_is_refused_before_any_work(
    options, message, tmp_path, monkeypatch, capsys
):
    import re

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # fp16 fails as on the CPU
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "ds.json").write_text("{}")
    checkpoint = earlier_run(tmp_path / "out")
    # The model and data do not exist: the option must be refused before either is looked at.
    argv = ["train", "--stage", "1", "--model", str(tmp_path / "no-model"), "--force"]
    argv += ["--data", str(tmp_path / "no-data.json"), "--out", str(tmp_path / "out")]
    argv += [option.format(tmp=tmp_path) for option in options]
    assert cli(argv) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("llava-edge train: error: ")
    assert re.search(message, line), line
    assert checkpoint.is_dir()


def deepspeed_refusal(tmp_path, monkeypatch, capsys, installed: bool) -> str:
    """train --deepspeed's one-line error, with deepspeed installed or not as far as asked."""
    find_spec = importlib.util.find_spec

    def spec(name, *args):
        if name == "deepspeed":  # installed, as far as asked, or not
            return find_spec("json", *args) if installed else None
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", spec)
    (tmp_path / "zero2.json").write_text("{}")
    argv = ["train", "--stage", "1", "--model", str(tmp_path), "--data", str(tmp_path / "d.json")]
    argv += ["--out", str(tmp_path / "out"), "--deepspeed", str(tmp_path / "zero2.json")]
    assert cli(argv) == 1
    return one_line_error(capsys.readouterr().err)


def test_deepspeed_without_its_package_is_refused(tmp_path, monkeypatch, capsys):
    assert deepspeed_refusal(tmp_path, monkeypatch, capsys, installed=False).endswith(
        "--deepspeed needs the deepspeed package; pip install deepspeed"
    )


def test_deepspeed_on_the_cpu_is_refused(tmp_path, monkeypatch, capsys):
    """accelerate drops a DeepSpeed config on the CPU, as it drops an FSDP one."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert deepspeed_refusal(tmp_path, monkeypatch, capsys, installed=True).endswith(
        "--deepspeed shards a model across GPUs, and this machine has none (on the CPU the "
        "trainer would ignore it); leave --deepspeed out"
    )


def test_a_logger_that_is_not_installed_is_refused(tmp_path, monkeypatch, capsys):
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: [])
    argv = ["train", "--stage", "1", "--model", str(tmp_path), "--data", str(tmp_path / "d.json")]
    assert cli([*argv, "--out", str(tmp_path / "out"), "--report-to", "tensorboard"]) == 1
    assert one_line_error(capsys.readouterr().err).endswith(
        "--report-to tensorboard: the tensorboard package is not installed"
    )


def test_a_run_without_matplotlib_is_refused_before_it_trains(
    tiny_checkpoint, data, tmp_path, monkeypatch, capsys
):
    """loss.png needs matplotlib, which only the train extra brings: found missing when the
    trained model is saved, it would end a run of hours with nothing installed."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "out"
    argv = ["train", "--stage", "1", "--model", str(tiny_checkpoint), "--out", str(out)]
    argv += ["--data", str(data["captions"]), "--images", str(data["images"]), "--max-steps", "1"]
    assert cli(argv) == 1
    assert one_line_error(capsys.readouterr().err) == (
        "llava-edge train: error: `llava-edge train` needs the train extra (matplotlib is "
        "missing): pip install 'llava-edge[train]'"
    )
    assert not out.exists()


# ---- train: the earlier run's checkpoints -----------------------------------------------------


def test_a_failing_force_run_keeps_the_earlier_checkpoints(tiny_checkpoint, data, tmp_path, capsys):
    out = tmp_path / "out"
    checkpoint = earlier_run(out)
    argv = ["train", "--stage", "1", "--model", str(tiny_checkpoint), "--out", str(out)]
    argv += ["--images", str(data["images"]), "--max-steps", "1", "--force"]
    # Fails on its data file; then, with the model loaded, on a batch plan that cannot be made.
    assert cli([*argv, "--data", str(tmp_path / "typo.json")]) == 1
    assert "typo.json does not exist" in capsys.readouterr().err
    assert checkpoint.is_dir()
    plan = ["--batch-size", "3", "--per-device-batch-size", "2"]
    assert cli([*argv, "--data", str(data["captions"]), *plan]) == 1
    assert "not a multiple" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (checkpoint / "trainer_state.json").read_text() == '{"global_step": 99}'


def test_a_piped_data_file_is_named_as_a_pipe(tiny_checkpoint, data, tmp_path, capsys) -> None:
    """`--data <(jq ... data.json)` names a pipe, which the data's two readings (indexed, then
    record by record) cannot take: it was said not to exist."""
    import os

    piped = tmp_path / "63"  # what <(...) names: /dev/fd/63
    os.mkfifo(piped)
    out = tmp_path / "out"
    argv = ["train", "--stage", "1", "--model", str(tiny_checkpoint), "--out", str(out)]
    argv += ["--data", str(piped), "--images", str(data["images"]), "--max-steps", "1"]
    assert cli(argv) == 1
    assert one_line_error(capsys.readouterr().err) == (
        f"llava-edge train: error: data file {piped} is not a file (a pipe, as <(...) gives?); "
        "save the data to a file and pass that"
    )
    assert not out.exists()


@pytest.mark.parametrize("limit", [None, 2, 0])
def test_save_total_limit_keeps_exactly_that_many_checkpoints(
    limit, tiny_checkpoint, data, tmp_path
):
    out = tmp_path / "out"
    earlier_run(out)  # --force: an earlier run's checkpoints go once training starts
    options = dict(max_steps=4, global_batch_size=2, save_steps=1, warmup_ratio=0.0)
    options |= dict(gradient_checkpointing=False, progress=False, force=True)
    if limit is not None:
        options["save_total_limit"] = limit
    train(1, tiny_checkpoint, data["captions"], out, images=data["images"], **options)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    expected = {None: [4], 2: [3, 4], 0: [1, 2, 3, 4]}[limit]  # the default 1; 0 keeps all
    assert kept == [f"checkpoint-{step}" for step in expected]
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


# ---- merge-lora: adapters that do not fit their base ------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory) -> Path:
    """Adapters of every language-model Linear of the tiny checkpoint, with non-zero B (so that
    merging them changes the weights), saved as `train --keep-adapters` saves them."""
    import torch

    from llava_edge.modeling import load_model
    from llava_edge.training.lora import add_lora

    model = add_lora(load_model(tiny_checkpoint, dtype=torch.float32), 2, 4, 0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    out = tmp_path_factory.mktemp("adapters") / "adapter"
    model.save_pretrained(out)
    return out


def merge(argv: list[str], capsys) -> tuple[int, str]:
    code = cli(["merge-lora", *argv])
    return code, capsys.readouterr().err


def test_adapters_merge_into_their_base(adapters, tiny_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = merge([str(adapters), str(tmp_path / "merged")], capsys)
    assert code == 0, err
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]  # peft's noise
    before = load_file(str(tiny_checkpoint / "model.safetensors"))
    after = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(before) == set(after)
    assert not all(before[k].equal(after[k]) for k in before if k.endswith("q_proj.weight"))


@pytest.mark.parametrize(
    "kept, out",
    [("base", "b/base"), ("base", "b/base/inside"), ("base", "b"), ("adapters", "a/adapters"),
     ("adapters", "a/adapters/inside"), ("adapters", "a")],
)  # fmt: skip
def test_the_merged_checkpoint_goes_outside_its_base_and_adapters(
    kept, out, adapters, tiny_checkpoint, tmp_path, capsys
):
    base = Path(shutil.copytree(tiny_checkpoint, tmp_path / "b" / "base"))
    adapters = Path(shutil.copytree(adapters, tmp_path / "a" / "adapters"))
    before = {p: p.read_bytes() for p in [*base.iterdir(), *adapters.iterdir()] if p.is_file()}
    code, err = merge([str(adapters), str(tmp_path / out), "--base", str(base), "--force"], capsys)
    assert code == 1
    name = {"base": "the base checkpoint", "adapters": "the adapters"}[kept]
    assert name in one_line_error(err)
    assert {p: p.read_bytes() for p in before} == before


def test_a_base_of_other_widths_is_refused(adapters, tmp_path, capsys):
    from llava_edge.training.checkpoint import init_checkpoint

    wide = init_checkpoint(tmp_path / "wide", preset="tiny", text={"intermediate_size": 96})
    code, err = merge([str(adapters), str(tmp_path / "m"), "--base", str(wide)], capsys)
    line = one_line_error(err)
    assert code == 1 and "do not fit the base checkpoint" in line and "size mismatch" in line
    assert not (tmp_path / "m").exists()


def test_a_base_with_fewer_layers_is_refused(adapters, tmp_path, capsys):
    from llava_edge.training.checkpoint import init_checkpoint

    shallow = init_checkpoint(tmp_path / "shallow", preset="tiny", layers=1)
    code, err = merge([str(adapters), str(tmp_path / "m"), "--base", str(shallow)], capsys)
    line = one_line_error(err)
    assert code == 1 and "do not fit the base checkpoint" in line
    assert "have no module to go into, e.g. " in line and "layers.1." in line
    assert not (tmp_path / "m").exists()


def test_adapters_missing_a_layer_are_refused(adapters, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(adapters, partial)
    weights = load_file(str(adapters / "adapter_model.safetensors"))
    kept = {k: v for k, v in weights.items() if ".layers.1." not in k}
    assert len(kept) < len(weights)
    save_file(kept, str(partial / "adapter_model.safetensors"))
    code, err = merge([str(partial), str(tmp_path / "m")], capsys)
    line = one_line_error(err)
    assert code == 1 and "they lack" in line and "layers.1." in line


@pytest.mark.parametrize(
    "file, damage, message",
    [
        ("adapter_config.json", "{", "cannot read .*adapter_config.json: Expecting"),
        ("adapter_config.json", '{"peft_type": "NOPE"}', "cannot read .*adapter_config.json"),
        ("adapter_model.safetensors", None, "cannot read the adapter weights in "),
    ],
)
def test_broken_adapter_files_are_named(adapters, file, damage, message, tmp_path, capsys):
    import re

    broken = tmp_path / "broken"
    shutil.copytree(adapters, broken)
    if damage is None:  # truncated
        (broken / file).write_bytes((adapters / file).read_bytes()[:5000])
    else:
        (broken / file).write_text(damage)
    code, err = merge([str(broken), str(tmp_path / "m")], capsys)
    line = one_line_error(err)
    assert code == 1 and re.search(message, line), line
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "lost, what",
    [
        ("model.safetensors", "the base checkpoint"),
        ("config.json", "the processor of the base checkpoint"),
        ("tokenizer.json", "the processor of the base checkpoint"),
    ],
)
def test_a_base_merge_cannot_load_is_named(adapters, tiny_checkpoint, lost, what, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    if lost == "config.json":
        (base / lost).write_text("{")
    else:
        (base / lost).unlink()
    code, err = merge([str(adapters), str(tmp_path / "m"), "--base", str(base)], capsys)
    line = one_line_error(err)
    assert code == 1 and f"cannot load {what} {base}: " in line, line
    assert not (tmp_path / "m").exists()


# ---- the learning-rate schedule ---------------------------------------------------------------


def step_rates(tiny_checkpoint, data, out: Path, **options) -> tuple[list[float], dict[str, bool]]:
    """The learning rate each optimizer step took, and the projector before and after."""
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    rates = []

    class Rates(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            rates.append(optimizer.param_groups[0]["lr"])

    options = dict(global_batch_size=2, gradient_checkpointing=False, progress=False) | options
    train(1, tiny_checkpoint, data["captions"], out, data["images"], [Rates()], **options)
    before, after = (load_file(str(p / "model.safetensors")) for p in (tiny_checkpoint, out))
    projector = [
        k for k in before if "multi_modal_projector" in k and before[k].is_floating_point()
    ]
    moved = {k: not torch.equal(before[k], after[k].to(before[k].dtype)) for k in projector}
    return rates, moved


def test_the_first_warmup_step_already_trains(tiny_checkpoint, data, tmp_path):
    # 3 % warmup of a short run is one step: at lr 0 a one-step run would train nothing
    rates, moved = step_rates(tiny_checkpoint, data, tmp_path / "one", max_steps=1)
    assert rates[0] > 0 and all(moved.values()), (rates, moved)
    rates, _ = step_rates(
        tiny_checkpoint, data, tmp_path / "ramp", max_steps=4, warmup_ratio=0.5, learning_rate=3e-3
    )
    # 2 warmup steps climb to the peak, reached on the third step; cosine from there
    assert rates[:3] == pytest.approx([1e-3, 2e-3, 3e-3]) and 0 < rates[3] < 3e-3, rates


# ---- --seed ------------------------------------------------------------------------------------


def test_a_lora_run_is_repeated_exactly_by_its_seed(tiny_checkpoint, data, tmp_path):
    # The adapters' random initial weights too come from --seed, not from whatever the process
    # drew before (a second run in one process, a sweep in a notebook)
    import torch
    from safetensors.torch import load_file

    options = dict(global_batch_size=2, max_steps=2, learning_rate=1e-2, lora=True, lora_rank=2)
    options |= dict(lora_alpha=4, keep_adapters=True, gradient_checkpointing=False, progress=False)
    runs = []
    for name in ("first", "again"):
        torch.rand(7)  # the process's random state moves on between the runs
        out = tmp_path / name
        train(2, tiny_checkpoint, data["train"], out, images=data["images"], **options)
        runs.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], atol=0, rtol=0, msg=key)
