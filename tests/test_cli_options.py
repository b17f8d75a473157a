"""Every option of every `llava-edge` sub-command takes effect.

The options are read from `build_parser()` itself, so a new option is covered the day it is
added. Each is set, alone, to a value of its own (an option in the command's base arguments is
replaced), the command runs with the public functions its handler calls recorded (offline stages
faked; the runtime's functions run for real on the tiny model), and the test asserts that the
recorded calls changed and that the value arrived in them.
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import functools
import json
import re
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from llava_edge import cli
from llava_edge.runtime import Pipeline
from llava_edge.runtime.pipeline import ChatSession

Calls = list[tuple[str, tuple, dict]]


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(argv prefix, sub-parser) of every sub-command, nested ones (`data synth`) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                yield from commands(sub, (*prefix, name)) if nested else [((*prefix, name), sub)]


def options(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]


def ids() -> list[str]:
    return [
        " ".join(cmd) + " " + (a.option_strings[0] if a.option_strings else a.dest)
        for cmd, sub in commands(cli.build_parser())
        for a in options(sub)
    ]


CASES = [(cmd, a.dest) for cmd, sub in commands(cli.build_parser()) for a in options(sub)]

# Options that only work together: setting one sets the other too.
COMPANIONS = {("init", "vision"): ("llm", "companion-llm"), ("init", "llm"): ("vision", "vis")}
COMPANIONS[("serve", "remote_timeout")] = ("allow_remote_images", None)  # times what it allows
COMPANIONS |= {  # sampling options act only when sampling (greedy is refused them)
    (cmd, dest): ("temperature", "0.5")
    for cmd in ("run", "chat", "watch")
    for dest in ("top_k", "top_p", "seed")
}


# ---- recording the public functions the handlers call ------------------------------------------


def leaves(value: Any, path: str = "") -> set[tuple[str, str]]:
    """(path, value) of every scalar in a recorded call, objects by type (their ids vary)."""
    if isinstance(value, functools.partial):
        return leaves((value.func.__name__, value.args, value.keywords), path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return leaves(
            {f.name: getattr(value, f.name) for f in dataclasses.fields(value)},
            path + ":" + type(value).__name__,
        )
    if isinstance(value, dict):
        return set().union(*(leaves(v, f"{path}.{k}") for k, v in value.items()), set())
    if isinstance(value, list | tuple):
        return set().union(*(leaves(v, f"{path}[{i}]") for i, v in enumerate(value)), set())
    if value is None or isinstance(value, str | int | float | bool | Path):
        return {(path, repr(str(value) if isinstance(value, Path) else value))}
    return {(path, type(value).__name__)}


@pytest.fixture(scope="module")
def world(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cli_options")
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / "picture.png")
    data = root / "data.json"
    data.write_text(
        json.dumps(
            [
                {
                    "id": "a",
                    "image": "picture.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat colour?"},
                        {"from": "gpt", "value": "grey"},
                    ],
                }
            ]
        )
    )
    manifest = Pipeline.load(tiny_model_dir).manifest
    from llava_edge.runtime.onnx_backend import OnnxBackend

    backend = OnnxBackend(tiny_model_dir, manifest, threads=1)
    backend.close = lambda: None  # shared by every pipeline the handlers load
    return {"root": root, "model": tiny_model_dir, "data": data, "backend": backend}


@pytest.fixture
def record(world, monkeypatch) -> Calls:
    """Record the calls; offline stages (and the server) return stand-ins, the runtime runs
    the tiny model."""
    calls: Calls = []

    def fake(name: str, result: Any = None):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result(*args, **kwargs) if callable(result) else result

        return call

    def through(name: str, real):
        def call(*args, **kwargs):
            calls.append(
                (name, args[1:] if name.startswith(("Pipeline.", "ChatSession.")) else args, kwargs)
            )
            return real(*args, **kwargs)

        return call

    import llava_edge.calib.quantize as quantize
    import llava_edge.convert as convert
    import llava_edge.export.baseline as baseline
    import llava_edge.export.exporter as exporter
    import llava_edge.runtime.bench as bench
    import llava_edge.runtime.doctor as doctor
    import llava_edge.runtime.interactive as interactive
    import llava_edge.runtime.plan as plan
    import llava_edge.runtime.tensorrt.build as build
    import llava_edge.serve as serve
    import llava_edge.training.checkpoint as checkpoint
    import llava_edge.training.datagen.generate as datagen_generate
    import llava_edge.training.datagen.mix as datagen_mix
    import llava_edge.training.datagen.vqa as datagen_vqa
    import llava_edge.training.evaluate as evaluate
    import llava_edge.training.lora as lora
    import llava_edge.training.synth as synth
    import llava_edge.training.train as train

    trained = types.SimpleNamespace(
        steps=1, final_loss=0.5, skipped=0, dropped_first_turns=0, out_dir="out"
    )
    for module, name, result in [
        (checkpoint, "init_checkpoint", "ckpt"),
        (checkpoint, "compose_checkpoint", "ckpt"),
        (convert, "convert_checkpoint", "ckpt"),
        (exporter, "export_checkpoint", None),
        (exporter, "checkpoint_config", None),  # bench --baseline reads it first
        (bench, "check_baseline", None),
        (quantize, "quantize_model", None),
        (build, "build_engines", None),
        (synth, "synthesize", {}),
        (train, "train", trained),
        (lora, "merge_lora", "merged"),
        (datagen_generate, "generate", datagen_generate.GenerateResult(Path("o"), Path("j"), "m")),
        (datagen_vqa, "convert_vqa", datagen_vqa.VqaResult(Path("o"))),
        (datagen_mix, "mix", datagen_mix.MixResult(Path("o"), 0, [])),
        (bench, "plot", None),
        (serve, "serve", None),  # the server would run until stopped: its options are the call
    ]:
        monkeypatch.setattr(module, name, fake(f"{module.__name__}.{name}", result))
    for module, name in [
        (evaluate, "evaluate"),
        (bench, "benchmark"),
        (interactive, "chat_loop"),
        (doctor, "diagnose"),
        (plan, "plan"),
        (plan, "parse_device"),
    ]:
        monkeypatch.setattr(
            module, name, through(f"{module.__name__}.{name}", getattr(module, name))
        )
    for cls, name in [
        (Pipeline, "answer"),
        (Pipeline, "stream"),
        (Pipeline, "chat"),
        (Pipeline, "watch"),
        (ChatSession, "stream"),
    ]:
        monkeypatch.setattr(cls, name, through(f"{cls.__name__}.{name}", getattr(cls, name)))

    def load(model_dir, **kwargs):
        calls.append(("Pipeline.load", (model_dir,), kwargs))
        return Pipeline(world["model"], world["backend"].manifest, world["backend"])

    monkeypatch.setattr(Pipeline, "load", staticmethod(load))

    class Baseline:  # the transformers side of `bench --baseline`
        name = "transformers"
        load_s, memory_mb = 1.0, 1.0

        def __init__(self, *args):
            calls.append(("TransformersRunner", args, {}))

        def run_once(self):
            timings = dict(preprocess_ms=1, vision_ms=1, prefill_ms=1, ttft_ms=1)
            return timings | dict(decode_tokens_per_s=1, prompt_tokens=1)

    monkeypatch.setattr(baseline, "TransformersRunner", Baseline)
    asked = []

    def one_question(_prompt: str = "") -> str:  # `chat` asks one question, then leaves
        if asked:
            asked.clear()
            raise EOFError
        asked.append(1)
        return "What is it?"

    monkeypatch.setattr(builtins, "input", one_question)
    return calls


# ---- the walk -----------------------------------------------------------------------------------


def base_arguments(cmd: tuple[str, ...], sub: argparse.ArgumentParser, world) -> dict[str, str]:
    """dest -> value of what the command needs (positionals, required options), cheap settings."""
    base: dict[str, str] = {}
    for action in options(sub):
        if not action.option_strings or action.required:
            base[action.dest] = str(action.choices[0] if action.choices else f"base-{action.dest}")
    model = str(world["model"])
    runtime = {
        "run": {"model_dir": model, "prompt": "Hi", "max_new_tokens": "2"},
        "chat": {"model_dir": model, "max_new_tokens": "2"},
        # a folder of images is a source without a video decoder; one frame, one line of JSON
        "watch": {
            "model_dir": model,
            "source": str(world["root"]),
            "prompt": "Hi",
            "max_new_tokens": "2",
            "max_frames": "1",
        },
        "plan": {"model_dir": model},
        "bench": {"model_dir": model, "runs": "1", "new_tokens": "2", "question_tokens": "4"},
        "eval": {
            "model_dir": model,
            "data": str(world["data"]),
            "images": str(world["root"]),
            "max_new_tokens": "2",
        },
    }
    return base | runtime.get(cmd[-1], {})


def own_value(action: argparse.Action, base: dict[str, str], world) -> str | None:
    """A value for the option unlike its default and its base value; None for flags."""
    if action.nargs == 0:
        return None
    taken = {str(action.default), base.get(action.dest)}
    # A default applied by the handler (None in argparse, to tell it from a value given) is
    # named in the help: "(default tiny)".
    taken |= set(re.findall(r"\(default:? ([^;,)\s]+)", action.help or ""))
    if action.choices:
        return next(str(c) for c in action.choices if str(c) not in taken)
    if action.type is int:
        return "3" if "3" not in taken else "4"
    if action.type is float:
        return "0.5" if "0.5" not in taken else "0.25"
    if action.dest == "cors_origin":  # must be a web origin
        return "http://robot.local:3000"
    if action.dest.endswith("media_dir"):  # must be a dir that exists
        folder = world["root"] / f"own-{action.dest}"
        folder.mkdir(exist_ok=True)
        return str(folder)
    path = world["root"] / f"own-{action.dest}.png"  # text that is also a readable image
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(path)
    return str(path)


def argv(cmd, sub, values: dict[str, str | None]) -> list[str]:
    out, positionals = list(cmd), []
    for action in options(sub):
        if action.dest not in values:
            continue
        value = values[action.dest]
        if not action.option_strings:
            positionals.append(value)
        elif value is None:
            out.append(action.option_strings[0])
        else:
            out += [action.option_strings[0], value]
    return out + positionals


def run(args: list[str], calls: Calls, capsys) -> tuple[int, Calls, str]:
    calls.clear()
    code = cli.main(args)
    return code, list(calls), capsys.readouterr().out


@pytest.mark.parametrize(("cmd", "dest"), CASES, ids=ids())
def test_every_option_takes_effect(cmd, dest, world, record, capsys):
    sub = next(s for c, s in commands(cli.build_parser()) if c == cmd)
    action = next(a for a in options(sub) if a.dest == dest)
    base = base_arguments(cmd, sub, world)
    code, before, out_before = run(argv(cmd, sub, base), record, capsys)
    assert code == 0 and before, f"{cmd} fails with its base arguments"

    value = own_value(action, base, world)
    changed = {**base, dest: value}
    if (cmd[-1], dest) in COMPANIONS:
        other, other_value = COMPANIONS[(cmd[-1], dest)]
        changed[other] = other_value
    _, after, out_after = run(argv(cmd, sub, changed), record, capsys)

    if dest == "json":  # an output format: the output is JSON with it, text without
        json.loads(out_after)
        with pytest.raises(json.JSONDecodeError):
            json.loads(out_before)
        return
    seen_before, seen_after = leaves(before), leaves(after)
    assert seen_after != seen_before, f"{' '.join(argv(cmd, sub, changed))} changed no call"
    if value is not None:
        arrived = {v for _, v in seen_after - seen_before}
        expected = {repr(value), repr(int(value)) if action.type is int else None}
        if action.type is float:
            expected.add(repr(float(value)))
        assert arrived & expected, f"{value!r} of {dest} reached no call (changed: {arrived})"
