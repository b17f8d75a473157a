"""LLaVA's two training stages on transformers' Trainer (and so accelerate, DeepSpeed, FSDP).

Stage 1 trains the projector alone on image-caption pairs (`plain` template); stage 2 trains the
projector and the language model on conversations (`vicuna_v1`), fully or with LoRA. The vision
tower never trains. Defaults are LLaVA-1.5's (scripts/v1_5): the same command runs on this CPU
with a few flags changed and on 8 GPUs with none, since the global batch is fixed and gradient
accumulation makes up for fewer devices.

The output dir is a checkpoint that llava_edge.modeling.load_model loads and
`llava-edge export` exports, with llava_edge.json naming the template it was trained with. The
trainer's own checkpoints (for --resume) live in its `checkpoints/` subdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError, first_line
from llava_edge.runtime.template import TEMPLATES

TRAINER_DIR = "checkpoints"
STAGING_PREFIX = "tmp-checkpoint"  # a trainer checkpoint while it is being written
LOSS_PLOT = "loss.png"


@dataclass(frozen=True)
class StageDefaults:
    template: str
    learning_rate: float
    global_batch_size: int
    per_device_batch_size: int


# LLaVA-1.5: pretrain.sh (8 GPUs x 32) and finetune.sh (8 x 16); finetune_lora.sh for LoRA.
STAGES = {
    1: StageDefaults("plain", 1e-3, 256, 32),
    2: StageDefaults("vicuna_v1", 2e-5, 128, 16),
}
LORA_LEARNING_RATE = 2e-4
LORA_PROJECTOR_LR = 2e-5


@dataclass
class TrainOptions:
    """Everything but the stage and the paths; None means the stage's LLaVA-1.5 default."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 stops after this many optimizer steps (overrides epochs)
    learning_rate: float | None = None
    projector_lr: float | None = None  # a separate rate for the projector (LoRA: 2e-5)
    global_batch_size: int | None = None
    per_device_batch_size: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 2048
    template: str | None = None
    lora: bool = False
    lora_rank: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    keep_adapters: bool = False
    precision: str = "auto"  # auto: bf16 (or fp16) on a GPU, fp32 on the CPU
    gradient_checkpointing: bool = True
    save_steps: int = 500
    save_total_limit: int | None = 1
    logging_steps: int = 1
    workers: int | None = None  # data loader processes; None: 4 on a GPU, 0 on the CPU
    seed: int = 42
    deepspeed: str | None = None  # a DeepSpeed JSON config (see configs/)
    fsdp: str | None = None  # an FSDP JSON config for Trainer (see configs/)
    skip_bad: bool = False
    resume: bool = False
    force: bool = False
    report_to: str = "none"
    progress: bool = True


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float | None  # the last logged training loss
    losses: list[tuple[int, float]]  # (step, loss) as logged
    skipped: int  # bad samples skip_bad left out before training (not those found while loading)
    dropped_first_turns: int  # samples trained on without the gpt turn they opened with
    model: Any = field(repr=False)  # the trained model (merged if LoRA), on this process


def train(
    stage: int,
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    images: str | os.PathLike | None = None,
    callbacks: Sequence[Any] = (),
    **options: Any,
) -> TrainResult:
    """Train `model` (a LLaVA checkpoint dir) on `data` and write the result to `out`.

    options: TrainOptions' fields. callbacks: extra transformers TrainerCallbacks.
    """
    try:
        opts = TrainOptions(**options)
    except TypeError as e:
        raise LlavaEdgeError(f"train: {e}") from None
    check_options(stage, opts, given=options)
    _check_plotting()
    given_out = Path(out)
    out = _written_through(given_out)
    model_path = Path(model).resolve()
    if not (model_path / "config.json").is_file():
        from llava_edge.modeling import no_checkpoint

        raise no_checkpoint(model, "--model")
    inputs = {"--data file": data, "--images dir": images, "working directory": os.getcwd()}
    inputs |= {"--deepspeed config": opts.deepspeed, "--fsdp config": opts.fsdp}
    _check_out_spares_inputs(out, inputs)
    template_name = opts.template or STAGES[stage].template
    resume_from = _check_out_dir(out, model_path, opts, template_name)

    import torch

    from llava_edge.modeling import load_model, prompt_template
    from llava_edge.training.checkpoint import hf_chat_template, saved_dtype
    from llava_edge.training.dataset import TrainingSet, count_image_tokens, stderr
    from llava_edge.training.labels import Labeler, check_answer_end

    defaults = STAGES[stage]
    main_process = int(os.environ.get("RANK", "0")) == 0
    processor, config = _load_processor_and_config(model, model_path)
    base = _base_record(model, model_path)  # a model checked loadable, before the data is read
    was: dict[str, Any] = {}  # the run record resume_from was saved with
    if resume_from is not None:
        was = _saved_run_record(resume_from)
        _check_same_base(resume_from, was, base)
    template = prompt_template(template_name, config)  # LLaVA v1: <im_start> image <im_end>
    processor.chat_template = hf_chat_template(template)
    check_answer_end(template, processor.tokenizer, _eos_ids(model_path, processor.tokenizer))
    labeler = Labeler(
        processor.tokenizer,
        template,
        image_token_id=config.image_token_id,
        num_image_tokens=count_image_tokens(processor),
        max_length=longest_sample(opts.max_length, "max_length" in options, config),
    )
    dataset = TrainingSet(
        data,
        images,
        labeler,
        processor.image_processor,
        skip_bad=opts.skip_bad,
        progress=opts.progress and main_process,
        images_only=stage == 1,
    )
    if dataset.skipped and main_process:
        stderr(
            f"skipped {len(dataset.skipped)} bad sample(s) of {data}; the first: {dataset.skipped[0]}"
        )
    if dataset.truncated and main_process:
        stderr(_truncation_note(dataset, labeler.max_length, config))
    global_batch = opts.global_batch_size or defaults.global_batch_size
    run = _run_record(data, len(dataset), labeler.max_length, opts.seed, global_batch)
    run |= {"pictures_sha256": _pictures_digest(dataset.pictures), **base}
    if resume_from is not None:
        _check_same_samples(resume_from, was, run)
        _check_same_pictures(resume_from, was, run, dataset.pictures)

    # A full run resumes by building the model from its checkpoint: building it from --model and
    # then loading the checkpoint would hold two models (28 GB more at 7B in fp32).
    weights = _plain_weights(resume_from, opts) or model_path
    try:
        llava = load_model(weights, dtype=torch.float32, use_safetensors=True)
    except OSError as e:  # no weights file
        source = f"--model {model}" if weights == model_path else f"--resume checkpoint {weights}"
        raise LlavaEdgeError(f"cannot load {source}: {first_line(e)}") from None
    freeze_for_stage(llava, stage)
    trained = add_lora_if(llava, opts)
    args = _training_args(out / TRAINER_DIR, stage, opts, defaults, dataset.has_text_only)
    projector_lr = opts.projector_lr
    if projector_lr is None and opts.lora:
        projector_lr = LORA_PROJECTOR_LR
    trainer = _make_trainer(
        trained,
        args,
        dataset,
        processor,
        projector_lr,
        template_name,
        callbacks,
        opts.progress,
        built_from=weights,
        run=run,
        pictures=dataset.pictures,
    )
    # Only now, with every input read and the model loaded, may an earlier run's checkpoints go.
    if trainer.is_world_process_zero():
        _clear_trainer_dir(out / TRAINER_DIR, keep_checkpoints=resume_from is not None)
    trainer.accelerator.wait_for_everyone()
    with _full_disk_named(out, _checkpoint_bytes(trained)):
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except BaseException as e:
            _close_progress_bars(trainer)  # the error then starts on a line of its own
            if isinstance(e, LlavaEdgeError):
                raise LlavaEdgeError(_last_line(e)) from None
            raise

        losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
        title = f"stage {stage}{' LoRA' if opts.lora else ''}"
        final = _save(
            trainer,
            out,
            processor,
            template_name,
            opts,
            saved_dtype(model_path),
            (losses, title),
            run,
        )
    return TrainResult(
        out_dir=given_out,
        steps=trainer.state.global_step,
        final_loss=losses[-1][1] if losses else None,
        losses=losses,
        skipped=len(dataset.skipped),
        dropped_first_turns=dataset.dropped_first_turns,
        model=final,
    )


def _written_through(out: Path) -> Path:
    """OUT, or the dir a symlink at OUT points to: the trainer writes its checkpoints through
    the link, so the final checkpoint is built beside the link's target and renamed into its
    place too. Built beside the link instead, it would replace the link, leave the checkpoints
    behind in the target, and on another filesystem (the link to a larger disk) fail to take
    them along at all, after the whole run."""
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def _plain_weights(checkpoint: Path | None, opts: TrainOptions) -> Path | None:
    """The trainer checkpoint whose full weights the model can be built from, or None (no resume;
    adapters, which load onto the base; DeepSpeed and FSDP, which load their own sharded way)."""
    if checkpoint is None or opts.lora or opts.deepspeed or opts.fsdp:
        return None
    return checkpoint if (checkpoint / "config.json").is_file() else None


def _load_processor_and_config(model: str | os.PathLike, path: Path) -> tuple[Any, Any]:
    """The checkpoint's processor and config, once it is known to be a LLaVA checkpoint (LLaVA-NeXT's
    tiles would need labels and batches of their own)."""
    from llava_edge.logs import quiet_loading
    from llava_edge.modeling import (
        ANYRES_CLASSES,
        check_full_precision,
        check_processor,
        load_processor,
        read_config,
    )

    try:
        with quiet_loading():
            config = read_config(path, "--model")
            if config.model_type in ANYRES_CLASSES:
                raise LlavaEdgeError(
                    f"--model {model} is a {ANYRES_CLASSES[config.model_type][0]} checkpoint, "
                    "whose images are AnyRes tiles, which train does not fine-tune (it takes "
                    "LlavaForConditionalGeneration): `llava-edge export` it as it is"
                )
            if config.model_type != "llava":
                raise LlavaEdgeError(
                    f"--model {model} is a '{config.model_type}' checkpoint; train takes LLaVA "
                    "(LlavaForConditionalGeneration): `llava-edge convert` an original LLaVA one, "
                    "or `llava-edge init --vision CLIP --llm LM` one from parts"
                )
            processor = load_processor(path)
    except (OSError, ValueError) as e:  # a broken config.json, missing processor files
        raise LlavaEdgeError(f"cannot load --model {model}: {first_line(e)}") from None
    check_full_precision(
        config, f"--model {model}", "train from the checkpoint it was quantized from"
    )
    check_processor(processor, config, f"--model {model}")
    return processor, config


def _eos_ids(path: Path, tokenizer: Any) -> set[int]:
    """The ids generation stops at: the checkpoint's generation config's, and the tokenizer's."""
    from transformers import GenerationConfig

    from llava_edge.logs import quiet_loading

    try:
        with quiet_loading():
            eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return {int(i) for i in (*eos, tokenizer.eos_token_id) if i is not None}


LORA_ONLY = {
    "lora_rank": "--lora-rank",
    "lora_alpha": "--lora-alpha",
    "lora_dropout": "--lora-dropout",
    "keep_adapters": "--keep-adapters",
}


def check_options(stage: int, opts: TrainOptions, given: Mapping[str, Any] | None = None) -> None:
    """Refuse, in one line and before any work, an option value that would fail late (after the
    model has loaded) or train something other than what was asked. `given`: the options passed
    explicitly, for those that only mean something with others."""
    if stage not in STAGES:
        raise LlavaEdgeError(f"--stage must be 1 or 2, not {stage}")
    if opts.lora and stage == 1:
        raise LlavaEdgeError("--lora is for stage 2; stage 1 trains only the projector")
    lora_only = [  # `is not`: --lora-dropout 0 is given too
        flag
        for name, flag in LORA_ONLY.items()
        if (given or {}).get(name) is not None and (given or {}).get(name) is not False
    ]
    if lora_only and not opts.lora:
        raise LlavaEdgeError(f"{', '.join(lora_only)}: LoRA options, for stage 2 with --lora")
    if opts.resume and opts.force:
        raise LlavaEdgeError(
            "--resume goes on from OUT's checkpoints and --force starts over; choose one"
        )
    if opts.template is not None and opts.template not in TEMPLATES:
        raise LlavaEdgeError(f"unknown template {opts.template!r}; choose from {sorted(TEMPLATES)}")
    at_least = {
        "--batch-size": (opts.global_batch_size, 1),
        "--per-device-batch-size": (opts.per_device_batch_size, 1),
        "--workers": (opts.workers, 0),
        "--max-length": (opts.max_length, 1),
        "--save-steps": (opts.save_steps, 1),
        "--save-total-limit": (opts.save_total_limit, 0),
        "--logging-steps": (opts.logging_steps, 1),
        "--seed": (opts.seed, 0),
        "--lora-rank": (opts.lora_rank, 1),
        "--lora-alpha": (opts.lora_alpha, 1),
    }
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            raise LlavaEdgeError(f"{flag} must be at least {low}, not {value}")
    for flag, value in (
        ("--epochs", opts.epochs),
        ("--lr", opts.learning_rate),
        ("--projector-lr", opts.projector_lr),
        ("--weight-decay", opts.weight_decay),
    ):
        if value is not None and math.isinf(value):  # the run would overflow or train to NaN
            raise LlavaEdgeError(f"{flag} must be a finite number, not {value}")
    if opts.max_steps != -1 and opts.max_steps < 1:  # -1: no limit, train for --epochs
        raise LlavaEdgeError(f"--max-steps must be at least 1, not {opts.max_steps}")
    if not opts.epochs > 0:
        raise LlavaEdgeError(f"--epochs must be above 0, not {opts.epochs}")
    for flag, value in (("--lr", opts.learning_rate), ("--projector-lr", opts.projector_lr)):
        if value is not None and not value >= 0:
            raise LlavaEdgeError(f"{flag} must be 0 or more, not {value}")
    if stage == 1 and opts.projector_lr is not None:  # it would leave --lr nothing to set
        raise LlavaEdgeError(
            "--projector-lr is for stage 2; stage 1 trains only the projector, at --lr"
        )
    if not opts.weight_decay >= 0:
        raise LlavaEdgeError(f"--weight-decay must be 0 or more, not {opts.weight_decay}")
    for flag, value in (
        ("--warmup-ratio", opts.warmup_ratio),
        ("--lora-dropout", opts.lora_dropout),
    ):
        if not 0 <= value < 1:
            raise LlavaEdgeError(f"{flag} must be at least 0 and below 1, not {value}")
    _precision(opts.precision)
    _check_report_to(opts.report_to)
    _check_parallel_configs(opts.deepspeed, opts.fsdp)


def _check_report_to(report_to: str) -> None:
    """Each of the comma-separated trainer loggers is one transformers knows and is installed."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = [name.strip() for name in report_to.split(",")]
    if names in (["none"], ["all"]):
        return
    choices = ", ".join(["none", "all", *INTEGRATION_TO_CALLBACK])
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise LlavaEdgeError(
                f"--report-to: {name!r} is not a logger, or not one to list with others; "
                f"choose from {choices}"
            )
    installed = get_available_reporting_integrations()
    for name in names:
        if name not in installed:
            raise LlavaEdgeError(f"--report-to {name}: the {name} package is not installed")


def _check_parallel_configs(deepspeed: str | None, fsdp: str | None) -> None:
    if deepspeed and fsdp:
        raise LlavaEdgeError("--deepspeed and --fsdp are two ways to shard; choose one")
    for flag, path in (("--deepspeed", deepspeed), ("--fsdp", fsdp)):
        if not path:
            continue
        try:
            config = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise LlavaEdgeError(f"{flag} {path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LlavaEdgeError(f"{flag} {path}: not a readable JSON config: {e}") from None
        if not isinstance(config, dict):
            raise LlavaEdgeError(
                f"{flag} {path} holds no JSON object; give a config like those in "
                "llava_edge/training/configs/"
            )
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise LlavaEdgeError("--deepspeed needs the deepspeed package; pip install deepspeed")
    import torch

    # accelerate shards only across GPUs: on the CPU it drops either config and runs plain data
    # parallel, so the option would do nothing.
    flag = "--deepspeed" if deepspeed else "--fsdp"
    if (deepspeed or fsdp) and not torch.cuda.is_available():
        raise LlavaEdgeError(
            f"{flag} shards a model across GPUs, and this machine has none (on the CPU the "
            f"trainer would ignore it); leave {flag} out"
        )


def longest_sample(requested: int, given: bool, config: Any) -> int:
    """The longest sample, within the language model's context (max_position_embeddings): past
    it, a model with learned positions fails mid-run, and one with rotary positions learns
    positions that no export of it reaches. The default (LLaVA-1.5's 2048) shrinks to fit; a
    value given past it is refused."""
    context = int(getattr(config.text_config, "max_position_embeddings", 0) or 0)
    if not context or requested <= context:
        return requested
    if given:
        raise LlavaEdgeError(
            f"--max-length {requested} is past the language model's context of {context} tokens "
            f"(max_position_embeddings); give at most {context}"
        )
    return context


def _truncation_note(dataset: Any, limit: int, config: Any) -> str:
    """One line for the samples of a TrainingSet that --max-length cuts at their end: the model
    never learns the part of their answers that is cut off."""
    context = int(getattr(config.text_config, "max_position_embeddings", 0) or 0)
    if context and limit >= context:
        fix = f"the language model's context of {context} tokens holds no more: shorten them"
    elif context:
        fix = f"raise --max-length (up to the language model's context of {context}) to keep more"
    else:
        fix = "raise --max-length to keep more"
    return (
        f"{dataset.truncated} of {len(dataset)} sample(s) are longer than --max-length {limit} "
        f"tokens (the longest: {dataset.longest}) and are cut at their end; {fix}"
    )


def freeze_for_stage(model: Any, stage: int) -> None:
    """Stage 1: projector only. Stage 2: projector and the whole language model. Never the
    vision tower."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == 2:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)


def add_lora_if(model: Any, opts: TrainOptions) -> Any:
    if not opts.lora:
        return model
    from transformers import set_seed

    from llava_edge.training.lora import add_lora

    # The adapters' random initial weights come from --seed too (Trainer seeds only once it is
    # built), so that one seed repeats a run whatever the process drew before.
    set_seed(opts.seed)
    return add_lora(model, opts.lora_rank, opts.lora_alpha, opts.lora_dropout)


def batch_plan(global_batch: int, per_device: int, processes: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) that make up the global batch on `processes`."""
    per_device = min(per_device, max(1, global_batch // processes))
    if global_batch % (per_device * processes):
        raise LlavaEdgeError(
            f"the global batch {global_batch} is not a multiple of the per-device batch "
            f"{per_device} x {processes} process(es); change --batch-size or --per-device-batch-size"
        )
    return per_device, global_batch // (per_device * processes)


def _check_out_dir(out: Path, model: Path, opts: TrainOptions, template: str) -> Path | None:
    """The checkpoint to resume from, or None; refuses to train over an earlier result.

    Deletes nothing: an earlier run's checkpoints stay until training starts
    (_clear_trainer_dir), so a run that fails on its inputs leaves them resumable."""
    from transformers.trainer_utils import get_last_checkpoint

    from llava_edge.files import check_output_dir, is_mount_point

    trainer_dir = out / TRAINER_DIR
    if opts.resume:
        if is_mount_point(out):  # check_output_dir's advice, a new dir, would hold no checkpoint
            moved = out / "run"
            raise LlavaEdgeError(
                f"output dir {out} is a mount point, which the trained checkpoint, built beside "
                f"it and renamed into its place, cannot replace; move {trainer_dir} to "
                f"{moved / TRAINER_DIR} and resume with --out {moved}"
            )
        # A resumed run installs its checkpoint as OUT as a new one does: the same checks.
        check_output_dir(out, force=True, keep=model, keep_name="the --model checkpoint")
        last = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
        if last is None:
            raise LlavaEdgeError(f"--resume: {trainer_dir} holds no checkpoint to resume from")
        _check_resumable(Path(last), opts, template)
        return Path(last)
    if out.is_dir() and any(out.iterdir()) and not opts.force:
        raise LlavaEdgeError(
            f"{out} is not empty; pass --resume to go on from its checkpoints or --force to start over"
        )
    check_output_dir(out, force=True, keep=model, keep_name="the --model checkpoint")
    return None


RESUME_HINT = "resume with the options its run was started with, or pass --force to start over"


def _check_resumable(checkpoint: Path, opts: TrainOptions, template: str) -> None:
    """Refuse a checkpoint of another kind of run (LoRA or not, other adapter sizes, another
    template) before any work: Trainer would load it only to fail with a traceback, or train on
    with prompts other than those of the steps before. Other trained parameters (another stage)
    are found when the optimizer's state loads (LlavaTrainer)."""
    from llava_edge.manifest import read_checkpoint_template
    from llava_edge.training.lora import CONFIG_NAME

    step = _check_whole(checkpoint).get("global_step", 0)
    if opts.max_steps > 0 and step > opts.max_steps:
        raise past_the_end(checkpoint, step, f"--max-steps {opts.max_steps}")
    config = checkpoint / CONFIG_NAME
    if config.is_file() != opts.lora:
        kind = "with" if config.is_file() else "without"
        raise LlavaEdgeError(
            f"--resume: {checkpoint} was saved by a run {kind} --lora; {RESUME_HINT}"
        )
    saved_template = read_checkpoint_template(checkpoint)
    if saved_template is not None and saved_template != template:
        raise LlavaEdgeError(
            f"--resume: {checkpoint} was trained with the {saved_template} template, not "
            f"{template}; {RESUME_HINT}"
        )
    if not opts.lora:
        return
    try:
        saved = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlavaEdgeError(
            f"--resume: cannot read {config} ({first_line(e)}); pass --force to start over"
        ) from None
    for key, flag, value in (
        ("r", "--lora-rank", opts.lora_rank),
        ("lora_alpha", "--lora-alpha", opts.lora_alpha),
    ):
        if saved.get(key) != value:
            raise LlavaEdgeError(
                f"--resume: {checkpoint} holds adapters of {flag} {saved.get(key)}, not {value}; "
                + RESUME_HINT
            )


RUN_FILE = "llava_edge_run.json"  # in each trainer checkpoint: the samples its steps went through
RUN_SETTINGS = {  # a run record's key: its option, what another value changes
    "max_length": ("--max-length", "samples truncated otherwise"),
    "seed": ("--seed", "another order of the samples"),
    "batch_size": ("--batch-size", "other samples in each step"),
}


def _run_record(
    data: str | os.PathLike, samples: int, max_length: int, seed: int, batch_size: int
) -> dict[str, Any]:
    """What a checkpoint's step count refers to: that many global batches of these samples, in
    this order. The data is known by its content, not its path or modification time, which a
    move or a copy to another machine changes (hashing costs a second a GB, beside parsing it)."""
    from llava_edge.manifest import sha256

    return {
        "data": str(data),
        "data_sha256": sha256(data),
        "samples": samples,
        "max_length": max_length,
        "seed": seed,
        "batch_size": batch_size,
    }


def _saved_run_record(checkpoint: Path) -> dict[str, Any]:
    """The run record a checkpoint was saved with; {} for one saved without (nothing of it is
    then checked)."""
    try:
        return json.loads((checkpoint / RUN_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlavaEdgeError(
            f"--resume: cannot read {checkpoint / RUN_FILE} ({first_line(e)}); pass --force to "
            "start over"
        ) from None


def _check_same_samples(checkpoint: Path, was: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuse to resume on samples other than those the checkpoint's step count refers to:
    Trainer would skip that many batches of the new ones, training some twice and others never."""
    if was.get("data_sha256") not in (None, now["data_sha256"]):
        raise LlavaEdgeError(
            f"--resume: {checkpoint} was trained on --data {was.get('data')} of sha256 "
            f"{was['data_sha256'][:12]}, not {now['data']} of sha256 {now['data_sha256'][:12]} "
            "(its step count refers to that file's samples); resume with that data, or pass "
            "--force to start over"
        )
    if was.get("samples") not in (None, now["samples"]):
        raise LlavaEdgeError(
            f"--resume: {checkpoint} was trained on {was['samples']} samples of --data "
            f"{now['data']}, not the {now['samples']} kept now (--skip-bad finds other samples "
            "bad: images gone or unreadable since); bring those images back, or pass --force to "
            "start over"
        )
    for key, (flag, why) in RUN_SETTINGS.items():
        if was.get(key) not in (None, now[key]):
            raise LlavaEdgeError(
                f"--resume: {checkpoint} was trained with {flag} {was[key]}, not {now[key]} "
                f"({why}: its step count would skip other batches than those it trained); "
                + RESUME_HINT
            )


def _base_record(model: str | os.PathLike, path: Path) -> dict[str, str]:
    """What a run is trained from (checkpoint.base_fingerprint), for its run record: it goes on
    only from that --model."""
    from llava_edge.training.checkpoint import base_fingerprint

    return {"base": str(model), "base_sha256": base_fingerprint(path)}


def _check_same_base(checkpoint: Path, was: Mapping[str, Any], now: Mapping[str, str]) -> None:
    """Refuse to resume from another --model than the run started from: peft would load a LoRA
    run's adapters onto any base of their shape and train on, unsaid; a full run, whose weights
    come from the checkpoint, would go on with the other model's tokenizer and processor (and
    write them into OUT)."""
    if was.get("base_sha256") in (None, now["base_sha256"]):
        return
    raise LlavaEdgeError(
        f"--resume: {checkpoint} was trained from --model {was.get('base')}, not --model "
        f"{now['base']} (their projector, token embeddings or shape differ); resume with that "
        "--model, or pass --force to start over"
    )


PICTURES_FILE = "llava_edge_pictures.json"  # in each trainer checkpoint: picture -> fingerprint


def _pictures_digest(pictures: Mapping[str, str]) -> str:
    """One digest of every picture's fingerprint, for the run record."""
    import hashlib

    return hashlib.sha256(json.dumps(sorted(pictures.items())).encode()).hexdigest()


def _check_same_pictures(
    checkpoint: Path, was: Mapping[str, Any], now: Mapping[str, Any], pictures: Mapping[str, str]
) -> None:
    """Refuse to resume on pictures other than those trained on (the same data file naming
    files changed on disk since): the run would go on on other samples than its step count's.
    Named in one line by the first picture that differs. Checkpoints saved without fingerprints
    are not checked."""
    if was.get("pictures_sha256") in (None, now["pictures_sha256"]):
        return
    try:
        saved = json.loads((checkpoint / PICTURES_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = {}
    changed = next((name for name, kept in pictures.items() if saved.get(name) != kept), None)
    if changed is None:
        changed = next((name for name in saved if name not in pictures), None)
    which = f"the picture {changed}" if changed is not None else "a picture"
    raise LlavaEdgeError(
        f"--resume: {which} of --data {now['data']} is not the one {checkpoint} was trained on "
        "(changed on disk since; its step count refers to those pictures); put back the pictures "
        "it was trained on, or pass --force to start over"
    )


def past_the_end(checkpoint: Path | str, step: int, end: str) -> LlavaEdgeError:
    return LlavaEdgeError(
        f"--resume: {checkpoint} is at step {step}, past {end}; give --max-steps {step} or more, "
        "or pass --force to start over"
    )


def _check_whole(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's trainer state. A checkpoint whose state or weights cannot be read
    (truncated by a copy that did not finish, damaged on disk) is named before any work; Trainer
    would fail on it with a traceback once the model had loaded."""
    from safetensors import SafetensorError, safe_open

    damaged = (
        "; the checkpoint is damaged: delete it to resume from an earlier one, or pass --force "
        "to start over"
    )
    state = checkpoint / "trainer_state.json"
    try:
        saved = json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlavaEdgeError(f"--resume: cannot read {state} ({first_line(e)}){damaged}") from None
    for weights in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):  # the header, checked against the file's size
                pass
        except (SafetensorError, OSError) as e:
            raise LlavaEdgeError(
                f"--resume: cannot read {weights} ({first_line(e)}){damaged}"
            ) from None
    return saved if isinstance(saved, dict) else {}


def _check_out_spares_inputs(out: Path, inputs: Mapping[str, Any]) -> None:
    """Refuse an OUT that is, or holds, one of the run's inputs: the trained checkpoint replaces
    OUT whole at the end (and --force clears it), which would delete them."""
    target = out.resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source == target or target in source.parents:
            raise LlavaEdgeError(
                f"--out {out} holds the {name} {path}, which the trained checkpoint would "
                "replace; choose another output dir"
            )


def _clear_trainer_dir(trainer_dir: Path, keep_checkpoints: bool) -> None:
    """Remove the checkpoints a killed save left half-written and, unless resuming, the earlier
    run's whole trainer dir (its checkpoints are not to be resumed)."""
    if not keep_checkpoints:
        shutil.rmtree(trainer_dir, ignore_errors=True)
        return
    for partial in trainer_dir.glob(f"{STAGING_PREFIX}-*"):
        shutil.rmtree(partial, ignore_errors=True)


def _rotate(run_dir: Path, limit: int | None, best: str | None) -> None:
    """transformers' rotation (the oldest checkpoints go; the newest and the best stay, at most
    `limit` in all), each checkpoint renamed out of the checkpoint-N names before it is deleted:
    killed in the delete, it would stay half-deleted among those the count and --resume read.
    Renamed, it is a tmp-checkpoint-*, which _clear_trainer_dir removes."""
    from transformers.trainer_utils import sort_checkpoints

    if not limit or limit <= 0:
        return
    checkpoints = sort_checkpoints(str(run_dir))
    protected = {checkpoints[-1], *([str(Path(best))] if best else [])}
    extra = len(checkpoints) - max(limit, len(protected))
    for old in [c for c in checkpoints if c not in protected][: max(extra, 0)]:
        dropped = run_dir / f"{STAGING_PREFIX}-dropped-{Path(old).name}"
        os.replace(old, dropped)
        shutil.rmtree(dropped, ignore_errors=True)


def _precision(name: str) -> dict[str, bool]:
    import torch

    cuda = torch.cuda.is_available()
    if name == "auto":
        name = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise LlavaEdgeError(f"--precision must be auto, fp32, bf16 or fp16, not {name!r}")
    if name == "fp16" and not cuda:
        raise LlavaEdgeError("--precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return {"bf16": name == "bf16", "fp16": name == "fp16"}


def checkpointing_arguments(arguments_class: type, on: bool) -> dict[str, Any]:
    """TrainingArguments' switch for activation checkpointing under the name this transformers
    takes: `activation_checkpointing` in recent 5.x, `gradient_checkpointing` before (5.17 knows
    only that one). Non-reentrant checkpointing needs no input that requires grad (the embeddings
    are frozen in stage 1 and under LoRA)."""
    names = {f.name for f in dataclasses.fields(arguments_class)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {
        f"{prefix}_checkpointing": on,
        f"{prefix}_checkpointing_kwargs": {"use_reentrant": False},
    }


def _training_args(
    trainer_dir: Path,
    stage: int,
    opts: TrainOptions,
    defaults: StageDefaults,
    text_only_samples: bool,
) -> Any:
    import torch
    from transformers import TrainingArguments

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch, per_device = opts.global_batch_size, opts.per_device_batch_size
    per_device, accumulation = batch_plan(
        defaults.global_batch_size if global_batch is None else global_batch,
        defaults.per_device_batch_size if per_device is None else per_device,
        processes,
    )
    if opts.learning_rate is not None:
        learning_rate = opts.learning_rate
    else:
        learning_rate = LORA_LEARNING_RATE if opts.lora else defaults.learning_rate
    cuda = torch.cuda.is_available()
    arguments = dict(
        output_dir=str(trainer_dir),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=learning_rate,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps,
        lr_scheduler_type="cosine",  # LlavaTrainer's own (warmup_cosine) in its place
        warmup_steps=opts.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=opts.weight_decay,
        **checkpointing_arguments(TrainingArguments, opts.gradient_checkpointing),
        logging_steps=opts.logging_steps,
        # A loss gone NaN is logged as NaN, not replaced by the mean of those before it (0 where
        # it is the first since the last log): the curve shows the run as it went, and the
        # Diverged callback sees it.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=opts.save_total_limit,
        report_to=[name.strip() for name in opts.report_to.split(",")],
        seed=opts.seed,
        remove_unused_columns=False,
        dataloader_num_workers=opts.workers if opts.workers is not None else (4 if cuda else 0),
        # A batch without images leaves the projector unused; DDP must be told to expect that.
        ddp_find_unused_parameters=text_only_samples,
        deepspeed=opts.deepspeed,
        fsdp=bool(opts.fsdp),
        fsdp_config=opts.fsdp,
        disable_tqdm=not opts.progress,
        use_cpu=not cuda,
        **_precision(opts.precision),
    )
    try:
        return TrainingArguments(**arguments)
    except ValueError as e:  # a combination check_options does not know of
        raise LlavaEdgeError(f"train: {first_line(e)}") from None


def _make_trainer(
    model: Any,
    args: Any,
    dataset: Any,
    processor: Any,
    projector_lr: float | None,
    template_name: str,
    callbacks: Sequence[Any],
    progress: bool,
    built_from: Path,
    run: Mapping[str, Any],
    pictures: Mapping[str, str],
) -> Any:
    """built_from: the dir the model's weights were loaded from (--model, or the checkpoint a
    full run resumes from). run: what each checkpoint's step count refers to (_run_record);
    pictures: the fingerprints of its samples' pictures (TrainingSet.pictures)."""
    from transformers import ProgressCallback, Trainer, TrainerCallback

    from llava_edge.files import fsync_path, sync_tree
    from llava_edge.training.checkpoint import write_llava_edge_file
    from llava_edge.training.dataset import Collator
    from llava_edge.training.lora import PROJECTOR

    class LlavaTrainer(Trainer):
        """Trainer with an optional learning rate of its own for the projector (LLaVA's
        mm_projector_lr, used with LoRA), whose logs each show their own steps' loss."""

        def create_optimizer(self, model: Any = None) -> Any:
            if projector_lr is None or self.optimizer is not None:
                return super().create_optimizer(model)
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[bool, bool], list] = {}
            for name, param in model.named_parameters():
                if param.requires_grad:
                    groups.setdefault((PROJECTOR in name, name in decay), []).append(param)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = cls(
                [
                    {
                        "params": params,
                        "weight_decay": self.args.weight_decay if decayed else 0.0,
                        **({"lr": projector_lr} if projector else {}),
                    }
                    # the projector's last: Trainer logs the first group's rate, --lr's
                    for (projector, decayed), params in sorted(groups.items())
                ],
                **kwargs,
            )
            return self.optimizer

        def _maybe_log_save_evaluate(self, tr_loss: Any, *args: Any, **kwargs: Any) -> None:
            # A log zeroes the running loss as `tr_loss -= tr_loss`, which leaves a NaN or
            # infinite one NaN: every later log would show NaN for one step's loss (a step
            # fp16's loss scaling skipped, which the Diverged callback lets the run go on from).
            logged = self._globalstep_last_logged
            super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)
            if self._globalstep_last_logged != logged:
                tr_loss.zero_()

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                from torch.optim.lr_scheduler import LambdaLR

                warmup = self.args.get_warmup_steps(num_training_steps)
                self.lr_scheduler = LambdaLR(
                    self.optimizer if optimizer is None else optimizer,
                    functools.partial(warmup_cosine, warmup=warmup, total=num_training_steps),
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            asked = _group_settings(self.optimizer)
            try:
                super()._load_optimizer_and_scheduler(checkpoint)
            except ValueError as e:  # torch: the saved parameter groups are not these
                raise LlavaEdgeError(
                    f"--resume: {checkpoint} holds the optimizer of a run that trained other "
                    f"parameters (another --stage or --projector-lr: {first_line(e)}); "
                    + RESUME_HINT
                ) from None
            # The saved state brings back its run's rates and decay, which would silently
            # override those asked for now.
            if checkpoint is not None:
                _check_same_settings(checkpoint, _group_settings(self.optimizer), asked)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            # Trainer writes checkpoint-N in place: killed half-way, it leaves a checkpoint that
            # --resume would pick and fail on (or silently half-load). Have it write
            # tmp-checkpoint-N instead (its folder prefix is a module constant), name the
            # template there too, then rename: checkpoint-N exists only when it is whole.
            import transformers.trainer as hf_trainer

            step = self.state.global_step
            _check_not_diverged(self.model, step, self.args, projector_lr)
            run_dir = Path(self._get_output_dir(trial=trial))
            staging = run_dir / f"{STAGING_PREFIX}-{step}"
            prefix, rotate = hf_trainer.PREFIX_CHECKPOINT_DIR, hf_trainer.rotate_checkpoints
            main = self.is_world_process_zero()
            with _removed_unless_finished(staging, main):
                # and rotate here, once it is whole, not in Trainer's rmtree (_rotate)
                hf_trainer.PREFIX_CHECKPOINT_DIR = STAGING_PREFIX
                hf_trainer.rotate_checkpoints = lambda *args, **kwargs: None
                try:
                    super()._save_checkpoint(model, trial)
                finally:
                    hf_trainer.PREFIX_CHECKPOINT_DIR = prefix
                    hf_trainer.rotate_checkpoints = rotate
                self.accelerator.wait_for_everyone()
                if main:
                    write_llava_edge_file(staging, template_name)
                    (staging / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
                    (staging / PICTURES_FILE).write_text(json.dumps(pictures))
                    final = run_dir / f"{prefix}-{step}"
                    shutil.rmtree(final, ignore_errors=True)
                    sync_tree(staging)  # on disk before its name says it is whole
                    os.replace(staging, final)
                    fsync_path(run_dir)
            if main:
                _rotate(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
            self.accelerator.wait_for_everyone()

        def _load_scaler(self, checkpoint: str | None) -> None:
            # A run saved under --precision fp16 keeps its loss scale; resumed in bf16 or fp32
            # there is no scaler to take it (Trainer would fail on None), nor a use for it.
            if self.accelerator.scaler is not None:
                super()._load_scaler(checkpoint)

        def _init_training_state(
            self, max_steps: int, per_epoch: int, epochs: int, checkpoint: Any, trial: Any
        ) -> tuple[int, int]:
            epochs_trained, batches_trained = super()._init_training_state(
                max_steps, per_epoch, epochs, checkpoint, trial
            )
            # A checkpoint at the last step (a run killed while writing OUT) has nothing left to
            # train; Trainer would take one step more where the run ends mid-epoch. One past the
            # end (fewer --epochs now) is refused; --max-steps is checked before any work.
            step = self.state.global_step
            if checkpoint is not None and step > max_steps:
                epochs_asked = f"--epochs {self.args.num_train_epochs:g}"
                raise past_the_end(checkpoint, step, f"the {max_steps} steps of {epochs_asked}")
            if checkpoint is not None and step == max_steps:
                return epochs, 0
            return epochs_trained, batches_trained

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            # transformers 5 saves LLaVA in the llava-hf key layout, but Trainer reloads a
            # checkpoint with a plain load_state_dict that matches none of those keys and only
            # warns: the run would go on from the starting weights. train() builds a full run's
            # model from the checkpoint instead (from_pretrained knows the layout), which leaves
            # nothing to load here. Adapters, FSDP and DeepSpeed checkpoints load their own way.
            if Path(resume_from_checkpoint) != built_from:
                super()._load_from_checkpoint(resume_from_checkpoint, model)

    class Progress(ProgressCallback):
        """The loss and learning rate on the progress bar instead of a printed line a step."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {k: f"{logs[k]:.4g}" for k in ("loss", "learning_rate") if k in logs}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

    class Diverged(TrainerCallback):
        """Looks at the weights (_check_not_diverged) when a logged loss or gradient norm is not
        finite, so that the run stops at the step it diverged, not at its next checkpoint."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            values = [(logs or {}).get(key) for key in ("loss", "grad_norm")]
            if kw.get("model") is not None and any(
                v is not None and not math.isfinite(v) for v in values
            ):
                _check_not_diverged(kw["model"], state.global_step, args, projector_lr)

    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(processor.tokenizer.pad_token_id, processor.tokenizer.eos_token_id),
        processing_class=processor,
        callbacks=[Diverged(), *callbacks],
    )
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(Progress())
    return trainer


def _check_not_diverged(model: Any, step: int, args: Any, projector_lr: float | None) -> None:
    """Stop a run whose trained weights have gone NaN or infinite (a learning rate too high for
    the model, too short a warmup, fp16's narrow range): no later step brings them back, and the
    run would go on for hours to save a model that answers nothing. Checked before each
    checkpoint is saved (the run's end too), and when a logged loss or gradient norm is not
    finite; a step fp16's loss scaling skips leaves the weights finite, and the run goes on.
    `args`: the run's TrainingArguments, whose settings the message names as options to change."""
    if all(p.isfinite().all() for p in model.parameters() if p.requires_grad):
        return
    rates = f"{args.learning_rate:g} (--lr)"
    if projector_lr is not None:
        rates += f" or the projector's {projector_lr:g} (--projector-lr)"
    levers = [
        f"a lower learning rate than {rates}",
        f"a longer warmup than --warmup-ratio {args.warmup_steps:g}",
    ]
    if args.fp16:
        levers.append("--precision bf16 or fp32 in place of fp16, whose range overflows")
    raise LlavaEdgeError(
        "training diverged by step "
        f"{step}: the trained weights hold NaN or infinity, which no later step undoes; start "
        f"over (--force) with {', '.join(levers[:-1])} or {levers[-1]}"
    )


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning rate's factor at optimizer step `step` (from 0): a linear warmup to the peak,
    reached at step `warmup`, then a cosine to 0 at `total`, as transformers' "cosine" schedule
    does, but for the warmup's first step: transformers' starts at 0, which wastes the first
    step (3 % warmup of a run under 34 steps is that one step) and leaves a one-step run
    untrained. Here warmup step i takes (i + 1) / (warmup + 1) of the peak."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


OPTIMIZER_SETTINGS = {  # a parameter group's key: what it is, the options that set it
    "initial_lr": ("learning rate", "--lr, --projector-lr"),
    "weight_decay": ("weight decay", "--weight-decay"),
}


def _group_settings(optimizer: Any) -> list[dict[str, float]]:
    """Each parameter group's peak learning rate (the scheduler's `initial_lr`) and decay."""
    if optimizer is None:
        return []
    return [
        {"initial_lr": g.get("initial_lr", g.get("lr")), "weight_decay": g.get("weight_decay")}
        for g in optimizer.param_groups
    ]


def _check_same_settings(
    checkpoint: str, saved: list[dict[str, float]], asked: list[dict[str, float]]
) -> None:
    for was, now in zip(saved, asked, strict=False):
        for key, (what, flags) in OPTIMIZER_SETTINGS.items():
            if None not in (was[key], now[key]) and was[key] != now[key]:
                raise LlavaEdgeError(
                    f"--resume: {checkpoint} was trained at {what} {was[key]:g}, not "
                    f"{now[key]:g} ({flags}); {RESUME_HINT}"
                )


def _save(
    trainer: Any,
    out: Path,
    processor: Any,
    template_name: str,
    opts: TrainOptions,
    dtype: str,
    curve: tuple[list[tuple[int, float]], str],
    run: Mapping[str, Any],
) -> Any:
    """Write the final checkpoint as `out`, whole (llava_edge.files.replace_dir); the trainer's
    checkpoints go along (_link_tree). Returns the trained model (merged if LoRA). Kept
    adapters carry the run record, as trainer checkpoints do: merge-lora reads there the base
    they were trained from.

    Plain training saves through the Trainer, which gathers sharded weights (DeepSpeed ZeRO-3,
    FSDP) and must run on every process; LoRA adapters are merged on the main process.
    """
    import torch

    from llava_edge.files import replace_dir
    from llava_edge.training.checkpoint import write_llava_edge_file
    from llava_edge.training.lora import ADAPTER_DIR

    model = trainer.model
    main = trainer.is_world_process_zero()
    staging = Path(trainer.args.output_dir) / "final-tmp"
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that died while saving
    trainer.accelerator.wait_for_everyone()
    with _removed_unless_finished(staging, main):
        if opts.lora:
            if main:
                if opts.keep_adapters:
                    model.save_pretrained(staging / ADAPTER_DIR)
                    processor.save_pretrained(staging / ADAPTER_DIR)
                    write_llava_edge_file(staging / ADAPTER_DIR, template_name)
                    (staging / ADAPTER_DIR / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
                model = model.merge_and_unload()
                model.to(getattr(torch, dtype)).save_pretrained(staging)
        else:
            if dtype != "float32" and not (opts.deepspeed or opts.fsdp):
                model.to(getattr(torch, dtype))
            trainer.save_model(str(staging))
        if main:
            with replace_dir(out) as tmp:
                for entry in staging.iterdir():
                    entry.replace(tmp / entry.name)
                processor.save_pretrained(tmp)
                write_llava_edge_file(tmp, template_name)
                (tmp / "training_args.bin").unlink(missing_ok=True)
                plot_losses(*curve, tmp / LOSS_PLOT)
                staging.rmdir()
                if (out / TRAINER_DIR).is_dir():
                    _link_tree(out / TRAINER_DIR, tmp / TRAINER_DIR)
    trainer.accelerator.wait_for_everyone()
    return model


@contextlib.contextmanager
def _full_disk_named(out: Path, needed: int) -> Iterator[None]:
    """A checkpoint or the final model that does not fit on the disk is the CLI's one line on a
    full disk, whatever the writer raised (safetensors and torch.save have error types of their
    own); `needed`: the bytes of a checkpoint, which cannot fit in less free space."""
    from llava_edge.files import disk_full

    try:
        yield
    except OSError:
        raise
    except Exception as e:
        if isinstance(e, LlavaEdgeError) or not disk_full(e, out, needed):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from None


def _checkpoint_bytes(model: Any) -> int:
    """About what a trainer checkpoint takes on the disk: the weights, and the optimizer's two
    fp32 moments (AdamW's) of every trained one."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def _removed_unless_finished(staging: Path, main: bool) -> Iterator[None]:
    """Remove the staging dir of a save that does not finish (an error, Ctrl-C, SIGTERM): half
    a checkpoint, as large as the model and its optimizer state, is of no use to a later run and
    would stay on the disk until one cleared it."""
    try:
        yield
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_tree(source: Path, target: Path) -> None:
    """`source` again at `target`, as hard links: no data is copied, and the checkpoints stay in
    OUT until the new OUT is installed (moved into the new dir instead, an interrupted install
    would delete them with it). Where the filesystem has no hard links (FAT), a move."""
    try:
        shutil.copytree(source, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        source.replace(target)


def _close_progress_bars(trainer: Any) -> None:
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


def _last_line(error: Exception) -> str:
    """A data loader worker re-raises our error with its traceback inside the message; keep the
    original one-line message."""
    line = str(error).strip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return line[len(prefix) :] if line.startswith(prefix) else line


def _check_plotting() -> None:
    """loss.png is drawn once training has ended: without matplotlib (the train extra's) the run
    stops before any work, not after it (the CLI names the extra to install)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")


def plot_losses(losses: list[tuple[int, float]], title: str, path: Path) -> None:
    """The training loss per logged step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if losses:
        steps, values = zip(*losses, strict=True)
        ax.plot(steps, values, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def options_from(namespace: Any) -> dict[str, Any]:
    """TrainOptions' fields present (not None) in an argparse namespace, for the CLI."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    return {k: v for k, v in vars(namespace).items() if k in names and v is not None}
