"""The `llava-edge` command. Each sub-command parses its options and calls one public function;
no logic lives here. Heavy libraries are imported inside the handlers, so `llava-edge run` on a
Jetson never loads torch.

Errors the user can fix (LlavaEdgeError, a full disk, a path too long, an extra not installed)
print one line and exit 1; Ctrl-C exits 130, and SIGTERM (systemd stopping a service, a scheduler
pre-empting a job) 143, each after the same cleanup (temporary dirs removed, a camera closed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import signal
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterator
from types import FrameType

from llava_edge import __version__
from llava_edge.errors import LlavaEdgeError

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


# ---- init ------------------------------------------------------------------------------------


@command("init")
def _init(args: argparse.Namespace) -> None:
    if args.vision or args.llm:
        from llava_edge.training.checkpoint import compose_checkpoint

        if not (args.vision and args.llm):
            raise LlavaEdgeError(
                "--vision and --llm go together: a CLIP or SigLIP model and a causal LM"
            )
        if args.preset is not None or args.layers is not None:
            raise LlavaEdgeError(
                "--preset and --layers shape a random checkpoint; --vision and --llm take their "
                "shapes from those checkpoints: drop one or the other"
            )
        path = compose_checkpoint(
            args.out_dir,
            vision=args.vision,
            llm=args.llm,
            seed=args.seed,
            force=args.force,
            projector=args.projector,
            dtype=args.dtype,
        )
        print(f"wrote a LLaVA checkpoint of {args.vision} + {args.llm} (new projector) to {path}")
        return
    from llava_edge.training.checkpoint import init_checkpoint

    preset = args.preset or "tiny"
    path = init_checkpoint(
        args.out_dir,
        preset=preset,
        layers=args.layers,
        seed=args.seed,
        force=args.force,
        projector=args.projector,
        dtype=args.dtype,
    )
    print(
        f"wrote a random-weight '{preset}' LLaVA checkpoint ({args.projector} projector) to {path}"
    )


# ---- convert ---------------------------------------------------------------------------------


@command("convert")
def _convert(args: argparse.Namespace) -> None:
    from llava_edge.convert import convert_checkpoint

    convert_checkpoint(
        args.original_dir,
        args.out_dir,
        vision=args.vision,
        base=args.base,
        template=args.template,
        force=args.force,
    )


# ---- export ----------------------------------------------------------------------------------


@command("export")
def _export(args: argparse.Namespace) -> None:
    from llava_edge.export.exporter import export_checkpoint

    export_checkpoint(
        args.checkpoint,
        args.out_dir,
        dtype=args.dtype,
        opset=args.opset,
        max_context=args.max_context,
        force=args.force,
        verify=not args.no_verify,
        trust_remote_code=args.trust_remote_code,
        fused=not args.no_fused,
    )


# ---- quantize --------------------------------------------------------------------------------


@command("quantize")
def _quantize(args: argparse.Namespace) -> None:
    from llava_edge.calib.quantize import check_fp16_options, quantize_model

    check_fp16_options(
        args.precision, args.calib, args.images, args.method, args.samples, args.report
    )
    quantize_model(
        args.model_dir,
        args.out_dir,
        precision=args.precision,
        calib=args.calib,
        images=args.images,
        method=args.method,
        samples=args.samples,
        report=args.report,
        force=args.force,
        block_size=args.block_size,
        prefill=args.prefill,
        kv_cache=args.kv_cache,
    )


# ---- run -------------------------------------------------------------------------------------


@command("run")
def _run(args: argparse.Namespace) -> None:
    options = _generation_options(args)
    image = _stdin_image(args.image)
    with _load_pipeline(args, background=True) as pipe:
        if args.json:
            answer = pipe.answer(image, args.prompt, **options)
            print(
                json.dumps(
                    {
                        "text": answer.text,
                        "prompt_token_ids": answer.prompt_token_ids,
                        "token_ids": answer.token_ids,
                        "finish_reason": answer.finish_reason,
                        "timings": answer.timings,
                    }
                )
            )
            return
        stream = pipe.stream(image, args.prompt, **options)
        try:
            for piece in stream:
                print(piece, end="", flush=True)
        finally:
            print()  # the answer's line ends, cut short (a timeout, Ctrl-C) or not
        answer = stream.answer
        speed = answer.timings.get("decode_tokens_per_s")
        print(
            f"[{len(answer.token_ids)} tokens, {speed or '-'} tokens/s, first token after "
            f"{answer.timings.get('first_token_ms', 0):.0f} ms, stopped by {answer.finish_reason}]",
            file=sys.stderr,
        )


def _stdin_image(images: list[str] | None) -> list[str | bytes] | None:
    """The images with `--image -` read from standard input, as most tools take `-`."""
    if not images or "-" not in images:
        return images
    if images.count("-") > 1:
        raise LlavaEdgeError("standard input holds one image: give `--image -` once")
    if sys.stdin is None:
        raise LlavaEdgeError("--image -: standard input is closed; pipe the image into it")
    data = sys.stdin.buffer.read()
    if not data:
        raise LlavaEdgeError("--image -: standard input is empty; pipe the image into it")
    return [data if image == "-" else image for image in images]


# ---- watch -----------------------------------------------------------------------------------


@command("watch")
def _watch(args: argparse.Namespace) -> None:
    options = _generation_options(args)
    with _load_pipeline(args, background=True) as pipe:
        answers = pipe.watch(
            "/dev/stdin" if args.source == "-" else args.source,
            args.prompt,
            every_s=args.every,
            frames=args.frames,
            changes_only=args.changes_only,
            max_frames=args.max_frames,
            live=True if args.live else None,
            timeout_s=args.source_timeout,
            folder_fps=args.folder_fps,
            reconnect_s=args.reconnect,
            follow=args.follow,
            **options,
        )
        with answers:  # the source closes before the model does, however the loop ends
            for answer in answers:
                if args.json:
                    print(json.dumps(answer.to_dict()), flush=True)
                else:
                    skipped = f" (skipped {answer.skipped})" if answer.skipped else ""
                    said = answer.text if answer.error is None else f"[no answer: {answer.error}]"
                    said = _one_line(said)
                    print(
                        f"{answer.timestamp:9.2f}s  frame {answer.index}{skipped}: {said}",
                        flush=True,
                    )


def _one_line(text: str) -> str:
    """`text` with its control characters escaped, so each frame's answer stays one line of the
    watch's log and an escape sequence a model writes is shown, not obeyed by the terminal."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in text)


# ---- chat ------------------------------------------------------------------------------------


@command("chat")
def _chat(args: argparse.Namespace) -> None:
    from llava_edge.runtime.interactive import chat_loop

    options = _generation_options(args)
    if args.image and "-" in args.image:
        raise LlavaEdgeError(
            "a chat reads its questions from standard input, so an image cannot come from it "
            "(--image -): give the image's path"
        )
    # A UTF-8 locale reads and writes the terminal strictly: a line of other bytes would end the
    # chat with a traceback. Read as the POSIX locale reads it, the question's check names it in
    # one line, and a path of such bytes is written back as typed.
    for stream in (sys.stdin, sys.stdout):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    if sys.stdin is not None and sys.stdin.isatty():
        # input() edits lines with readline where it is imported: a terminal's own line mode
        # keeps 4,095 bytes of a line (a long pasted question would be asked cut short, unsaid),
        # and readline also takes arrow keys and a multi-line paste as one question
        with contextlib.suppress(ImportError):  # Python built without it
            import readline  # noqa: F401
    with _load_pipeline(args) as pipe:
        chat_loop(pipe, args.image, options, read=_read_line, out=sys.stdout)


def _read_line(prompt: str) -> str:
    """A line typed after `prompt`; a closed standard input (`<&-`, no sys.stdin) is its end,
    where `input` would raise RuntimeError."""
    if sys.stdin is None:
        raise EOFError
    return input(prompt)


# ---- bench -----------------------------------------------------------------------------------


@command("bench")
def _bench(args: argparse.Namespace) -> None:
    from functools import partial

    from llava_edge.files import check_output_file
    from llava_edge.runtime import bench

    if args.threads is not None and args.backend != "onnxruntime" and not args.baseline:
        raise LlavaEdgeError(
            f"--threads is for onnxruntime and --baseline; the {args.backend} backend runs its "
            "own engines: drop it, or add --baseline"
        )
    if args.plot:
        check_output_file(args.plot, "--plot")
        bench.check_plot(args.plot, args.model_dir, args.baseline)
        bench.pyplot()
    baseline = None
    if args.baseline:  # transformers needs torch: imported only when asked for
        from llava_edge.export.baseline import TransformersRunner
        from llava_edge.export.exporter import checkpoint_config

        bench.check_baseline(args.model_dir, checkpoint_config(args.baseline))
        baseline = partial(TransformersRunner, args.baseline)
    workload = bench.Workload(
        question_tokens=args.question_tokens,
        new_tokens=args.new_tokens,
        context_tokens=args.context_tokens,
        threads=2 if args.threads is None else args.threads,
        runs=args.runs,
    )
    report = bench.benchmark(args.model_dir, workload, baseline, **_load_options(args))
    print(json.dumps(report, indent=2) if args.json else bench.table(report), flush=True)
    if args.plot:
        bench.plot(report, args.plot)


def _load_pipeline(args: argparse.Namespace, background: bool = False):
    """background: the graphs open while the command reads its image (or opens its camera) and
    runs it through the vision encoder (onnxruntime); a broken graph then fails the first answer
    instead of the load, with the same message (an answer's --timeout does not count the wait
    for graphs still opening)."""
    from llava_edge.runtime import Pipeline

    background = background and args.backend == "onnxruntime"
    options = _load_options(args)
    return Pipeline.load(args.model_dir, threads=args.threads, background=background, **options)


def _load_options(args: argparse.Namespace) -> dict:
    """Pipeline.load's options from the backend options every model-running command offers
    (threads aside: bench puts them in its workload)."""
    from llava_edge.runtime import Limits

    return dict(
        backend=args.backend,
        providers=args.provider,
        engine_dir=args.engine_dir,
        verify_files=True if args.verify_files else None,
        limits=Limits(
            max_image_pixels=args.max_image_pixels,
            max_prompt_tokens=args.max_prompt_tokens,
            timeout_s=args.timeout,
        ),
    )


def _generation_options(args: argparse.Namespace) -> dict:
    """The options as Pipeline takes them; sampling options at temperature 0 are refused, as
    greedy decoding ignores them (the Python API ignores them, as transformers does)."""
    if args.temperature == 0:
        idle = [
            flag
            for flag, given in (
                ("--top-k", args.top_k != 0),
                ("--top-p", args.top_p != 1.0),
                ("--seed", args.seed is not None),
            )
            if given
        ]
        if idle:
            raise LlavaEdgeError(
                f"{', '.join(idle)} shape sampling, which --temperature 0 (greedy, the default) "
                "does not do; give a --temperature above 0 too"
            )
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop or [],
    }
    _check_generation_flags(options)
    if args.raw:
        options["raw"] = True
    if args.system is not None:
        options["system"] = args.system
    return options


def _check_generation_flags(options: dict) -> None:
    """Refuse a generation option before the model loads, naming the flag as typed: the
    Pipeline's own check names the Python parameter (`max_new_tokens must be ...`)."""
    from llava_edge.runtime.sampling import GenerationConfig

    GenerationConfig(**options).validate(named=lambda name: "--" + name.replace("_", "-"))


# ---- serve -----------------------------------------------------------------------------------


@command("serve")
def _serve(args: argparse.Namespace) -> None:
    from llava_edge.serve import ServeOptions, serve

    load = _load_options(args)
    load["limits"] = dataclasses.replace(load["limits"], max_new_tokens=args.max_new_tokens)
    options = ServeOptions(
        model_dir=args.model_dir,
        model_name=args.model_name,
        # an empty variable counts as unset; an empty --api-key is refused (ServeOptions)
        api_key=args.api_key
        if args.api_key is not None
        else os.environ.get("LLAVA_EDGE_API_KEY") or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        max_image_mb=args.max_image_mb,
        allowed_media_dir=args.allowed_media_dir,
        allow_remote_images=args.allow_remote_images,
        remote_timeout_s=args.remote_timeout,
        prefix_cache_mb=args.prefix_cache_mb,
        threads=args.threads,
        cors_origins=args.cors_origin or [],
        **load,
    )
    serve(
        options,
        host=args.host,
        port=args.port,
        drain_timeout_s=args.drain_timeout,
        log_level=args.log_level,
    )


# ---- build -----------------------------------------------------------------------------------


@command("build")
def _build(args: argparse.Namespace) -> None:
    from llava_edge.runtime.tensorrt.build import build_engines

    build_engines(
        args.model_dir,
        args.out,
        max_batch=args.max_batch,
        max_context=args.max_context,
        workspace_gb=args.workspace,
        timing_cache=args.timing_cache,
        check_memory=not args.skip_memory_check,
    )


# ---- plan ------------------------------------------------------------------------------------


@command("plan")
def _plan(args: argparse.Namespace) -> int:
    from llava_edge.runtime.plan import format_plan, parse_device, plan

    result = plan(
        args.model_dir,
        parse_device(args.device, args.reserve, args.backend),
        backend=args.backend,
        max_context=args.max_context,
        max_batch=args.max_batch,
        bandwidth_gbs=args.bandwidth,
        providers=args.provider,
        prefix_cache_mb=args.prefix_cache_mb,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0 if result.fits else 2


# ---- doctor ----------------------------------------------------------------------------------


@command("doctor")
def _doctor(args: argparse.Namespace) -> None:
    from llava_edge.runtime.doctor import diagnose, format_report

    report = diagnose()
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))


# ---- data ------------------------------------------------------------------------------------


@command("data")
def _data(args: argparse.Namespace) -> int | None:
    return DATA_COMMANDS[args.data_command](args)


def _data_synth(args: argparse.Namespace) -> None:
    from llava_edge.training.synth import synthesize

    paths = synthesize(
        args.out_dir, train=args.train, test=args.test, seed=args.seed, force=args.force
    )
    print(
        f"wrote {args.train} training and {args.test} test pictures with their questions to {args.out_dir}"
    )
    for key, path in paths.items():
        print(f"  {key:9s} {path}")


def _data_generate(args: argparse.Namespace) -> int:
    from llava_edge.training.datagen.generate import format_report, generate

    result = generate(
        args.annotations,
        args.images,
        args.out,
        endpoint=args.endpoint,
        model=args.model,
        api_key_env=args.api_key_env,
        kinds=[k.strip() for k in args.kinds.split(",") if k.strip()],
        per_image=args.per_image,
        concurrency=args.concurrency,
        max_images=args.max_images,
        max_requests=args.max_requests,
        journal=args.journal,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        timeout=args.timeout,
        retries=args.retries,
        backoff=args.backoff,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        return 0
    print(format_report(result))
    return 1 if result.failed else 0  # some samples still missing: a script should notice


def _data_vqa(args: argparse.Namespace) -> None:
    from llava_edge.training.datagen.vqa import convert_vqa

    result = convert_vqa(
        args.file, args.format, args.images, args.out, annotations=args.annotations
    )
    print(result.summary())


def _data_mix(args: argparse.Namespace) -> None:
    from llava_edge.training.datagen.mix import format_table, mix

    result = mix(args.sources, args.out, seed=args.seed)
    print(format_table(result))


DATA_COMMANDS = {
    "synth": _data_synth,
    "generate": _data_generate,
    "vqa": _data_vqa,
    "mix": _data_mix,
}


# ---- train, merge-lora, eval ----------------------------------------------------------------


@command("train")
def _train(args: argparse.Namespace) -> None:
    from llava_edge.training.train import options_from, train

    result = train(
        args.stage, args.model, args.data, args.out, images=args.images, **options_from(args)
    )
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: one line, not one a process
        loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
        skipped = f", {result.skipped} bad sample(s) skipped" if result.skipped else ""
        if result.dropped_first_turns:  # as LLaVA's preprocess drops them
            skipped += f", the opening gpt turn of {result.dropped_first_turns} sample(s) left out"
        print(
            f"trained stage {args.stage} for {result.steps} steps{loss}{skipped}: {result.out_dir}"
        )


@command("merge-lora")
def _merge_lora(args: argparse.Namespace) -> None:
    from llava_edge.training.lora import merge_lora

    path = merge_lora(args.adapter_dir, args.out_dir, base=args.base, force=args.force)
    print(f"wrote the merged checkpoint to {path}")


@command("eval")
def _eval(args: argparse.Namespace) -> None:
    from llava_edge.training.evaluate import evaluate

    result = evaluate(
        args.model_dir,
        args.data,
        images=args.images,
        answers=args.answers,
        max_new_tokens=args.max_new_tokens,
        skip_bad=args.skip_bad,
        match=args.match,
        limit=args.limit,
        threads=args.threads,
        **_load_options(args),
    )
    skipped = f" ({result.skipped} bad sample(s) skipped)" if result.skipped else ""
    counted = f"{result.correct}/{result.total}"
    if result.score != result.correct:  # several references: partial credit
        counted = f"{result.score:.2f}/{result.total}, {result.correct} in full"
    cut = (
        f"; {result.cut} prediction(s) cut at --max-new-tokens {args.max_new_tokens}: "
        "a longer reference cannot match, raise it"
        if result.cut
        else ""
    )
    label = "VQA" if args.match == "vqa" else "exact-match"
    print(
        f"{label} accuracy {100 * result.accuracy:.1f}% ({counted})"
        f"{skipped}; answers in {result.answers}{cut}"
    )


# ---- the parser ------------------------------------------------------------------------------


MODEL_HELP = "model dir written by `llava-edge export` (or quantize)"


def build_parser() -> argparse.ArgumentParser:
    from llava_edge.calib.quantize import INT4_BLOCK, INT4_BLOCKS, METHODS, TARGETS

    parser = argparse.ArgumentParser(
        prog="llava-edge", description="Export, quantize and run LLaVA models at the edge."
    )
    parser.add_argument("--version", action="version", version=f"llava-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a random-weight LLaVA checkpoint of a preset's shape")
    p.add_argument("out_dir", help="checkpoint dir to write")
    p.add_argument(
        "--preset",
        choices=["tiny", "demo", "small", "llava-1.5-7b"],
        help="shape of the random checkpoint (default tiny)",
    )
    p.add_argument("--layers", type=int, help="keep only the first N layers of each tower")
    p.add_argument(
        "--vision", help="CLIP or SigLIP checkpoint: build LLaVA from it and --llm instead"
    )
    p.add_argument("--llm", help="causal LM checkpoint to put behind the --vision tower")
    p.add_argument(
        "--projector",
        default="mlp2x_gelu",
        help="mlp2x_gelu (LLaVA-1.5, default), linear (LLaVA v1) or mlpNx_gelu",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the weights (default: --llm's own; float32 for a preset)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    p = sub.add_parser(
        "convert", help="convert an original-format LLaVA checkpoint into one export takes"
    )
    p.add_argument(
        "original_dir", help="checkpoint of the original LLaVA code (or its LoRA/stage-1 output)"
    )
    p.add_argument("out_dir", help="checkpoint dir to write")
    p.add_argument("--vision", help="the CLIP checkpoint dir its mm_vision_tower names")
    p.add_argument("--base", help="the language model a LoRA or stage-1 output was trained on")
    p.add_argument(
        "--template", help="conversation template (default: the one the original uses for it)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    p = sub.add_parser("export", help="export a LLaVA checkpoint to ONNX graphs + manifest")
    p.add_argument("checkpoint", help="checkpoint dir, or a hub id where the network allows")
    p.add_argument("out_dir", help="model dir to write")
    p.add_argument(
        "--dtype", default="fp32", choices=["fp32", "fp16"], help="graphs' weights (default fp32)"
    )
    p.add_argument(
        "--opset", type=int, default=17, help="ONNX opset (default 17: TensorRT 10.3 parses it)"
    )
    p.add_argument(
        "--max-context", type=int, help="longest sequence the runtime allows (default: the model's)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with transformers")
    p.add_argument(
        "--no-fused",
        action="store_true",
        help="write no fused onnxruntime forms of the decoder and vision encoder (halves the "
        "graphs' size on disk)",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code"
    )

    p = sub.add_parser("quantize", help="write an int8, int4 or fp16 copy of an exported model dir")
    p.add_argument("model_dir", help="fp32 model dir written by `llava-edge export`")
    p.add_argument("out_dir", help="model dir to write")
    p.add_argument("--precision", required=True, choices=TARGETS)
    p.add_argument(
        "--calib",
        help="calibration data: a LLaVA JSON or JSONL file, or a folder of images (int8 and int4 "
        "need it)",
    )
    p.add_argument(
        "--images",
        help="folder the LLaVA JSON's image paths start from, or alone a folder of images",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        help="how activation ranges are chosen for the TensorRT graphs (default minmax)",
    )
    p.add_argument("--samples", type=int, help="calibration samples to use (default 32)")
    p.add_argument(
        "--report",
        action="store_true",
        help="compare with fp32 on held-out samples; print a table, save quantize_report.json",
    )
    p.add_argument(
        "--block-size",
        type=int,
        choices=INT4_BLOCKS,
        help=f"int4: weights per scale (default {INT4_BLOCK}; 128 runs faster on the CPU and "
        "costs accuracy: see docs/quantization.md)",
    )
    p.add_argument(
        "--prefill",
        choices=["int8"],
        help="int4: add the decoder in int8 for prompts (about twice as fast to prefill on the "
        "CPU, for the int8 weights' memory on top)",
    )
    p.add_argument(
        "--kv-cache",
        choices=["int8"],
        help="int8, int4: keep the fused decoder's KV cache in int8, scales calibrated per "
        "channel (faster decoding at depth, a quarter of the cache's memory; see "
        "docs/quantization.md)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    p = sub.add_parser("run", help="answer a question about an image")
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument(
        "--image",
        action="append",
        help="image file (-: standard input); repeat for several images in one prompt (omit for "
        "a text-only prompt)",
    )
    p.add_argument(
        "--prompt", required=True, help="the question (in the chat template unless --raw)"
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of streaming text"
    )
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as written, without the chat template"
    )
    _add_generation_options(p)
    _add_backend_options(p)

    p = sub.add_parser(
        "watch",
        help="answer a question about a video, camera, stream, image folder or picture file, frame "
        "after frame",
    )
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument(
        "--source",
        required=True,
        help="video file, camera (/dev/video0), rtsp:// or http:// stream, named pipe or "
        "standard input (- or /dev/stdin), image folder, or picture file (one frame)",
    )
    p.add_argument("--prompt", required=True, help="the question asked about every answered frame")
    p.add_argument(
        "--every", type=float, default=1.0, help="seconds between answered frames (default 1)"
    )
    p.add_argument(
        "--jsonl", dest="json", action="store_true", help="print one JSON object per answer"
    )
    p.add_argument(
        "--max-frames",
        type=int,
        help="stop after N frames (answered, or reported late or unreadable)",
    )
    p.add_argument(
        "--changes-only", action="store_true", help="print an answer only when it changes"
    )
    p.add_argument("--frames", type=int, default=1, help="last K frames in each prompt (default 1)")
    p.add_argument(
        "--live", action="store_true", help="replay a file at its own pace, as a camera would"
    )
    p.add_argument(
        "--source-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for a stream to open or send its next frame (default 10)",
    )
    p.add_argument(
        "--folder-fps",
        type=float,
        help="an image folder's images per second (default 1; for a folder only)",
    )
    p.add_argument(
        "--reconnect",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="open a camera or network stream that drops again, trying for up to SECONDS "
        "before giving up (default 0: its drop ends the watch)",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="watch an image folder for new pictures, or a picture file for its rewrites "
        "(live: the newest one is answered)",
    )
    _add_generation_options(p)
    _add_backend_options(p)
    p.set_defaults(raw=False)

    p = sub.add_parser("chat", help="talk about an image, turn by turn (reuses the KV cache)")
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument(
        "--image",
        action="append",
        help="image file; repeat for several images (omit for a text-only chat)",
    )
    _add_generation_options(p)
    _add_backend_options(p)
    p.set_defaults(raw=False)

    p = sub.add_parser("bench", help="measure load time, TTFT, decode tokens/s, memory")
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument(
        "--baseline",
        metavar="CHECKPOINT",
        help="also run transformers' generate() on the checkpoint the dir was exported from",
    )
    p.add_argument("--runs", type=int, default=5, help="runs to take the median of (default 5)")
    p.add_argument(
        "--question-tokens", type=int, default=32, help="tokens of question text (default 32)"
    )
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    p.add_argument(
        "--context-tokens",
        type=int,
        default=0,
        help="extra prompt tokens (long context; default 0)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="FILE", help="write a PNG chart of the comparison")
    _add_backend_options(p, threads_help="CPU threads for onnxruntime and --baseline (default 2)")

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible server (/v1/chat/completions) that batches clients"
    )
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="default 127.0.0.1: this machine only; 0.0.0.0 listens on every interface",
    )
    p.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default 8000; 0: a free one)"
    )
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (or set LLAVA_EDGE_API_KEY)"
    )
    p.add_argument("--model-name", help="the model id clients send (default: the dir's name)")
    p.add_argument("--max-batch", type=int, default=4, help="requests decoded together (default 4)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait for a row (then 429; default 16)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="refuse requests asking for more; without max_tokens, answer at most this"
        " (default: up to the context)",
    )
    p.add_argument(
        "--max-body-mb", type=float, default=32, help="refuse larger bodies (413; default 32)"
    )
    p.add_argument(
        "--max-image-mb", type=float, default=20, help="refuse larger images (413; default 20)"
    )
    p.add_argument(
        "--allowed-media-dir", help="allow file:// images under this dir (default: none)"
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        help="a web page's origin allowed to call the API from a browser (http://host:port, or "
        "*; repeatable; default: none)",
    )
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="allow http(s) image URLs (size- and time-capped)",
    )
    p.add_argument(
        "--remote-timeout",
        type=float,
        help="seconds a remote image may take to fetch (default 10; also within --timeout)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        help="memory for finished conversations' KV, reused by their next turn (default 256; "
        "0: off; refused for a model whose prompts run dynamic int8, which reuses none)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        help="on SIGTERM, seconds to wait at most for the answers in flight (default: no limit)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="what the server logs (default info)",
    )
    _add_backend_options(p)

    p = sub.add_parser("build", help="build TensorRT engines for a model dir (needs a GPU)")
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument("--out", help="engine dir (default: MODEL_DIR/engines)")
    p.add_argument(
        "--max-batch", type=int, default=1, help="largest batch the engines take (default 1)"
    )
    p.add_argument(
        "--max-context", type=int, help="longest conversation in tokens (default: the model's)"
    )
    p.add_argument("--workspace", type=float, help="TensorRT scratch memory limit in GiB")
    p.add_argument(
        "--timing-cache", help="timing cache file to reuse and update (default: in the engine dir)"
    )

    p.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="build even where `llava-edge plan` says the engines cannot fit in the GPU's memory",
    )

    p = sub.add_parser(
        "plan",
        help="memory a deployment needs (weights, KV cache, activations) and whether it fits",
        description="Exit status 0 when the plan fits the device, 2 when it does not.",
    )
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument(
        "--device",
        help="orin-nano-4gb, orin-nano-8gb, orin-nano-8gb-super, orin-nx-8gb, orin-nx-16gb, "
        "agx-orin-32gb, agx-orin-64gb, or a memory size (8GB, 7.5GiB, bytes); default: this machine "
        "(its GPU for --backend tensorrt)",
    )
    p.add_argument(
        "--max-context", type=int, help="longest conversation in tokens (default: the model's)"
    )
    p.add_argument("--max-batch", type=int, default=1, help="requests decoded together (default 1)")
    p.add_argument(
        "--backend",
        default="onnxruntime",
        choices=["onnxruntime", "tensorrt"],
        help="the backend the deployment runs (default onnxruntime)",
    )
    p.add_argument(
        "--provider",
        action="append",
        help="onnxruntime provider the deployment runs with: cpu (default), cuda, tensorrt "
        "(repeatable; sets which graphs are counted, as `run --provider` opens them)",
    )
    p.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s (for a custom device)")
    p.add_argument("--reserve", type=float, help="GB the OS keeps from applications")
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=0.0,
        help="a server's store of conversations for their next turns: give serve's "
        "--prefix-cache-mb (256 unless told; none for a dir whose prompts run dynamic int8) "
        "when planning for serve (default 0)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("doctor", help="what this machine can run, and what is missing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("data", help="make training data")
    data = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data.add_parser("synth", help="pictures of coloured shapes with captions and questions")
    p.add_argument("out_dir", help="dir to write the pictures and their JSON files to")
    p.add_argument("--train", type=int, default=1000, help="training pictures (default 1000)")
    p.add_argument("--test", type=int, default=200, help="test pictures (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    _add_datagen_parsers(data)

    _add_training_parsers(sub)
    return parser


def _add_datagen_parsers(data: argparse._SubParsersAction) -> None:
    p = data.add_parser(
        "generate",
        help="instruction data from captions and boxes, written by an LLM (LLaVA's pipeline)",
        description="Ask an OpenAI-compatible chat endpoint to write conversations, detailed "
        "descriptions and reasoning questions about each annotated image, from its captions and "
        "boxes. Run the same command again to resume: the journal keeps every settled sample.",
    )
    p.add_argument(
        "--annotations",
        action="append",
        required=True,
        metavar="FILE",
        help="COCO-style JSON (captions and/or boxes) or JSONL of {image, captions, boxes}; "
        "repeatable (merged by image file name)",
    )
    p.add_argument("--images", required=True, help="dir the annotated image names are in")
    p.add_argument("--out", required=True, help="LLaVA JSON file to write")
    p.add_argument(
        "--endpoint", help="API root of an OpenAI-compatible server, e.g. http://localhost:8080/v1"
    )
    p.add_argument("--model", help="model name (default: the only one the endpoint serves)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    p.add_argument(
        "--kinds",
        default="conversation,detail,reasoning",
        help="comma-separated kinds to generate (default: all three)",
    )
    p.add_argument(
        "--per-image", type=int, default=1, help="samples of each kind per image (default 1)"
    )
    p.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight at once (default 4)"
    )
    p.add_argument("--max-images", type=int, help="use only the first N usable images")
    p.add_argument(
        "--max-requests", type=int, help="send at most N HTTP requests (retries count), then stop"
    )
    p.add_argument(
        "--journal",
        help="resumable record of the run (default: beside --out, out.json giving "
        "out.journal.jsonl)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=1024, help="longest reply in tokens (default 1024)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="base of each request's sampling seed (default 0)"
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds one request may take (default 120)"
    )
    p.add_argument(
        "--retries", type=int, default=5, help="retries of a request on 429/5xx/timeout (default 5)"
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        help="seconds before the first retry (then x2; default 1)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the first image's prompts; send nothing"
    )

    p = data.add_parser(
        "vqa",
        help="short-answer VQA data as LLaVA-1.5 mixes it in (response-format prompts)",
    )
    p.add_argument("file", help="the questions file (for jsonl: one question a line)")
    p.add_argument("--format", required=True, choices=["vqav2", "gqa", "textvqa", "jsonl"])
    p.add_argument("--images", required=True, help="dir the images are in")
    p.add_argument("--out", required=True, help="LLaVA JSON file to write")
    p.add_argument(
        "--annotations",
        help="vqav2: the annotations file with the answers (default: found beside FILE)",
    )

    p = data.add_parser("mix", help="mix LLaVA files with weights (LLaVA-1.5's recipe)")
    p.add_argument(
        "sources",
        nargs="+",
        metavar="FILE[:WEIGHT]",
        help="LLaVA JSON/JSONL and how many times its samples go in (default 1; 0.5: a random "
        "half; 2: twice)",
    )
    p.add_argument("--out", required=True, help="LLaVA JSON file to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw and shuffle (default 0)")


def _add_training_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train LLaVA: stage 1 (projector) or 2 (projector + LLM, full or LoRA)",
        description="Defaults are LLaVA-1.5's for the stage (1: lr 1e-3, batch 256, 'plain'; "
        "2: lr 2e-5, batch 128, 'vicuna_v1'; LoRA: lr 2e-4, projector 2e-5), 1 epoch, cosine "
        "schedule with 3% warmup, max length 2048 (at most the model's context), gradient "
        "checkpointing, bf16 on a GPU.",
    )
    p.add_argument(
        "--stage",
        type=int,
        required=True,
        choices=[1, 2],
        help="1: the projector; 2: it and the LLM",
    )
    p.add_argument("--model", required=True, help="LLaVA checkpoint dir to start from")
    p.add_argument("--data", required=True, help="LLaVA JSON or JSONL file")
    p.add_argument("--images", help="dir the samples' image paths are relative to")
    p.add_argument("--out", required=True, help="output checkpoint dir")
    p.add_argument("--lora", action="store_true", default=None, help="stage 2 with LoRA adapters")
    p.add_argument(
        "--keep-adapters",
        action="store_true",
        default=None,
        help="also save the LoRA adapters (OUT/adapter) beside the merged checkpoint",
    )
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default 128)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 256)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    p.add_argument(
        "--epochs", type=float, help="passes over the data (default 1; fractions allowed)"
    )
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    p.add_argument(
        "--lr",
        dest="learning_rate",
        type=float,
        metavar="LR",
        help="learning rate (default: the stage's, above)",
    )
    p.add_argument("--projector-lr", type=float, help="learning rate of the projector")
    p.add_argument(
        "--batch-size",
        dest="global_batch_size",
        type=int,
        metavar="N",
        help="global batch (per-device batch x accumulation x processes)",
    )
    p.add_argument(
        "--per-device-batch-size", type=int, help="batch per device (default: the stage's)"
    )
    p.add_argument(
        "--warmup-ratio", type=float, help="share of the steps spent warming up (default 0.03)"
    )
    p.add_argument("--weight-decay", type=float, help="weight decay (default 0)")
    p.add_argument(
        "--max-length",
        type=int,
        help="longest sample in tokens, image included (default 2048, or the model's context)",
    )
    p.add_argument("--template", help="chat template (default: plain for stage 1, vicuna_v1 for 2)")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto (default): bf16 (or fp16) on a GPU, fp32 on the CPU",
    )
    p.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        default=None,
        help="keep every activation for the backward pass (faster, more memory)",
    )
    p.add_argument(
        "--save-steps", type=int, help="save a resumable checkpoint every N steps (default 500)"
    )
    p.add_argument(
        "--save-total-limit",
        type=int,
        metavar="N",
        help="keep the last N checkpoints (default 1; 0: all)",
    )
    p.add_argument("--logging-steps", type=int, help="log the loss every N steps (default 1)")
    p.add_argument(
        "--workers", type=int, help="data loader processes (default 4 on a GPU, 0 on the CPU)"
    )
    p.add_argument("--seed", type=int, help="random seed (default 42)")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (llava_edge/training/configs/)")
    p.add_argument("--fsdp", help="FSDP JSON config (llava_edge/training/configs/)")
    p.add_argument("--report-to", help="trainer loggers: none, tensorboard, wandb...")
    p.add_argument(
        "--skip-bad", action="store_true", default=None, help="leave out bad samples, count them"
    )
    p.add_argument(
        "--resume", action="store_true", default=None, help="go on from OUT's last checkpoint"
    )
    p.add_argument(
        "--force", action="store_true", default=None, help="start over in a non-empty OUT"
    )

    p = sub.add_parser("merge-lora", help="fold saved LoRA adapters into a plain checkpoint")
    p.add_argument(
        "adapter_dir",
        help="OUT/adapter of `train --lora --keep-adapters`, or a trainer checkpoint of a LoRA "
        "run (OUT/checkpoints/checkpoint-N)",
    )
    p.add_argument("out_dir", help="checkpoint dir to write")
    p.add_argument("--base", help="base checkpoint (default: the one the adapters name)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    p = sub.add_parser("eval", help="accuracy of short answers on LLaVA data (VQA's matching)")
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument("--data", required=True, help="LLaVA JSON or JSONL with reference answers")
    p.add_argument("--images", help="dir the samples' image paths are relative to")
    p.add_argument(
        "--answers",
        help="per-question JSONL (default: beside --data, test.json giving test.answers.jsonl)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=16, help="longest prediction in tokens (default 16)"
    )
    p.add_argument("--skip-bad", action="store_true", help="leave out bad samples, count them")
    p.add_argument(
        "--limit", type=int, help="score only the first N samples (a quick check of a large set)"
    )
    p.add_argument(
        "--match",
        choices=["vqa", "exact"],
        default="vqa",
        help="vqa (default): VQA's answer normalisation, and VQA accuracy where a round lists "
        "several 'answers'; exact: equal after case-folding and a final full stop",
    )
    _add_backend_options(p)


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    p.add_argument(
        "--top-k", type=int, default=0, help="sample from the K likeliest (default 0: off)"
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling's probability mass (default 1)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="above 1 penalizes repeats (default 1)",
    )
    p.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    p.add_argument("--stop", action="append", help="stop string, cut from the answer (repeatable)")
    p.add_argument(
        "--system", help="a system prompt in place of the chat template's (e.g. the robot's role)"
    )


def _add_backend_options(
    p: argparse.ArgumentParser, threads_help: str = "CPU threads for onnxruntime"
) -> None:
    p.add_argument(
        "--backend",
        default="onnxruntime",
        choices=["onnxruntime", "tensorrt"],
        help="onnxruntime (default) or tensorrt: native engines from `llava-edge build`",
    )
    p.add_argument(
        "--engine-dir", help="TensorRT engines to use (tensorrt), or the TensorRT provider's cache"
    )
    p.add_argument(
        "--provider", action="append", help="onnxruntime provider: cpu, cuda, tensorrt (repeatable)"
    )
    p.add_argument("--threads", type=int, help=threads_help)
    p.add_argument(
        "--verify-files",
        action="store_true",
        help="check every file's sha256 (default: once per machine)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=50_000_000,
        help="refuse larger images (default 50,000,000)",
    )
    p.add_argument(
        "--max-prompt-tokens", type=int, help="refuse longer prompts (default: the context)"
    )
    p.add_argument("--timeout", type=float, help="seconds one answer may take")


# The extra that brings what a command imports beyond the runtime's own dependencies
# (pyproject.toml's optional-dependencies): a plain `pip install llava-edge` runs models only.
EXTRAS = {
    "init": "export",
    "export": "export",
    "convert": "convert",
    "quantize": "calib",
    "serve": "serve",
    "bench": "export",  # --baseline runs transformers
    "train": "train",
    "merge-lora": "train",
    "watch": "video",
    "data generate": "data",
    # tqdm's progress bars: the lightest extra that brings it without torch
    "eval": "data",
    "data mix": "data",
}


def _missing_extra(name: str, error: ModuleNotFoundError) -> str | None:
    """The line for a command that needs an extra not installed; None where the missing module
    is not a dependency (a broken install of llava-edge itself)."""
    module = _missing_module(error)
    if name not in EXTRAS or not module or module == "llava_edge":
        return None
    extra = EXTRAS[name]
    return (
        f"`llava-edge {name}` needs the {extra} extra ({module} is missing): "
        f"pip install 'llava-edge[{extra}]'"
    )


def _missing_module(error: BaseException | None) -> str:
    """The top-level module a failed import lacked. transformers raises a lazy attribute's
    missing dependency (accelerate, for TrainingArguments) as a ModuleNotFoundError without a
    name, the import that failed as its cause."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and error.name:
            return error.name.split(".")[0]
        error = error.__cause__ or error.__context__
    return ""


def _complain(line: str) -> None:
    """One line to stderr; a path in another encoding than UTF-8 is shown escaped, on any
    stream (an app's own stderr may be strict)."""
    print(line.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so it unwinds as from Ctrl-C: Python's default
    for SIGTERM ends the process on the spot, leaving its temporary dirs behind until the next
    run and a camera to the kernel."""


# Each signal raises where the command is; SIGINT's is Python's own, but raised from here it
# too waits out an import.
_UNWINDS: dict[int, type[KeyboardInterrupt]] = {
    signal.SIGTERM: Terminated,
    signal.SIGINT: KeyboardInterrupt,
}
_arrived: set[int] = set()  # signals raised: C code a library calls may drop the raise
_DEFER_S, _MAX_DEFERRALS = 0.05, 200  # an import that takes 10 s is stuck: raise anyway
_deferrals = 0


def _raise_for_signal(signum: int, frame: FrameType | None) -> None:
    global _deferrals
    _arrived.add(signum)
    if _importing(frame) and _deferrals < _MAX_DEFERRALS:
        # Raised inside a module's setup, the exception can crash a C extension's (onnx's aborts
        # the interpreter) or be dropped by it (numpy's): it comes again once the import is done.
        _deferrals += 1
        again = threading.Timer(_DEFER_S, _signal_again, (signum,))
        again.daemon = True
        again.start()
        return
    raise _UNWINDS[signum]


def _signal_again(signum: int) -> None:
    if signal.getsignal(signum) is _raise_for_signal:  # the command still runs
        os.kill(os.getpid(), signum)


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM raises Terminated and SIGINT KeyboardInterrupt, neither inside an import
    (handlers belong to the main thread; a signal the parent ignores, as a shell does SIGINT
    for a background job, stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _deferrals
    _arrived.clear()
    _deferrals = 0
    previous = {signum: signal.getsignal(signum) for signum in _UNWINDS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _raise_for_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    name = ""  # the command's, once parsed
    try:
        with _signals_unwind():  # from the start: the parser imports numpy, the command more
            args = build_parser().parse_args(argv)
            name = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
            if args.command != "serve":
                return _dispatch(args, name)
    except KeyboardInterrupt as e:  # while parsing, or as the command ended past its handling
        return _stopped(name, e)
    for signum, unwind in _UNWINDS.items():  # came while the parser imported: deferred, not raised
        if signum in _arrived:
            return _stopped(name, unwind())
    # uvicorn handles both signals for `serve`: it drains the requests in flight
    return _dispatch(args, name)


def _stopped(name: str, signal_raised: KeyboardInterrupt) -> int:
    """One line, and the exit code a shell reports for a process the signal ended."""
    terminated = isinstance(signal_raised, Terminated)
    _complain(
        f"llava-edge{' ' + name if name else ''}: {'terminated' if terminated else 'interrupted'}"
    )
    return 143 if terminated else 130  # 128 + SIGTERM or SIGINT


def _dispatch(args: argparse.Namespace, name: str) -> int:
    try:
        status = COMMANDS[args.command](args) or 0
        for signum, unwind in _UNWINDS.items():  # went on past a raise a library dropped
            if signum in _arrived:
                raise unwind
        return status
    except LlavaEdgeError as e:
        _complain(f"llava-edge {name}: error: {e}")
        return 1
    except ModuleNotFoundError as e:
        problem = _missing_extra(name, e)
        if problem is None:
            raise
        _complain(f"llava-edge {name}: error: {problem}")
        return 1
    except KeyboardInterrupt as e:
        return _stopped(name, e)
    except BrokenPipeError:  # `llava-edge watch --jsonl | head -1`: the reader has what it wanted
        # Python's own advice: point stdout at devnull so the flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a tool killed by the closed pipe would return
    except OSError as e:
        # Every dir is written whole or not at all (files.replace_dir): only the disk needs care.
        if e.errno == errno.ENOSPC:
            where = f" writing {e.filename}" if e.filename else ""
            problem = (
                f"no space left on the device{where}; free some space or write to another disk"
            )
        elif e.errno == errno.ENAMETOOLONG:
            problem = f"a path is too long for the filesystem: {e.filename}; shorten it"
        elif e.errno == errno.ENOENT and e.filename:  # inputs are checked before any work:
            # one missing now went while the command ran
            problem = (
                f"file not found: {e.filename}; if it was moved or deleted while the command "
                "ran, put it back and run the command again"
            )
        else:
            raise
        _complain(f"llava-edge {name}: error: {problem}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
