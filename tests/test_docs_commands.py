"""The command lines README.md and docs/*.md show are ones `llava-edge` accepts.

A user copies them: every `llava-edge COMMAND ...` the docs write (in code blocks and in inline
code) must name a command that exists and only options that command's parser has, and one
written out in full (no `[...]`, `|` or `...` placeholders) must parse as shown; the values a
synopsis shows are the defaults; and the repository files the docs name are there. The parser is
`build_parser()` itself, so a renamed or removed option fails here until the docs follow.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import re
import shlex
from pathlib import Path

import pytest

from llava_edge import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A command starts a line or follows a shell separator; an error line it quotes
# (`llava-edge build: error: ...`) is output, not a command.
COMMAND = re.compile(r"(?:^\s*|[;&|]\s*|\$\()llava-edge\s+(?!\S*:)([a-z][a-z-]*)(.*)")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every sub-command by its words (`data synth`), nested ones included."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                    walk(sub, f"{prefix}{name} ") if nested else found.setdefault(
                        f"{prefix}{name}", sub
                    )

    walk(cli.build_parser(), "")
    return found


def doc_lines(text: str) -> list[tuple[bool, str]]:
    """(in a code block, line) of each line of every fenced block (continuations joined: a
    backslash's, and a synopsis wrapped onto indented lines of options, `    [--images DIR]`)
    and of each inline code in the prose."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        block = re.sub(r"\\\n\s*|\n\s+(?=\[?--)", " ", block)
        lines += [(True, line) for line in block.splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [(False, line) for line in re.findall(r"`([^`\n]+)`", prose)]
    return lines


def shown_commands() -> list[tuple[str, bool, str, str]]:
    """(doc, in a code block, command words, the rest of the line) of every `llava-edge ...`
    the docs show."""
    commands = subcommands()
    shown = []
    for doc in DOCS:
        for block, line in doc_lines(doc.read_text()):
            match = COMMAND.search(line)
            if not match:
                continue
            name, rest = match.groups()
            if name == "data" and (sub := re.match(r"\s+([a-z]+)(.*)", rest)):
                name, rest = f"data {sub.group(1)}", sub.group(2)
            if name not in commands and name != "data":
                name = f"unknown command {name!r}"
            shown.append((doc.name, block, name, rest.split("  #")[0].split(" # ")[0].strip()))
    return shown


SHOWN = shown_commands()


def test_the_docs_show_commands():
    """The scan finds what it checks: a change to the docs' format must not empty it."""
    assert len(SHOWN) > 50
    assert {name for _, _, name, _ in SHOWN} >= {"export", "quantize", "train", "run", "data vqa"}


@pytest.mark.parametrize(
    ("doc", "name", "rest"),
    [(d, n, r) for d, _, n, r in SHOWN],
    ids=[f"{d}:{n}" for d, _, n, _ in SHOWN],
)
def test_every_option_shown_exists(doc: str, name: str, rest: str):
    assert not name.startswith("unknown"), f"{doc}: llava-edge has no {name}"
    parser = subcommands().get(name)
    if parser is None:  # `llava-edge data` alone
        return
    known = {option for action in parser._actions for option in action.option_strings}
    # A pipe ends the command; what follows is another program's (`| head -1`).
    options = OPTION.findall(rest.split(" | ")[0] if "[" not in rest else rest)
    unknown = sorted(set(options) - known)
    assert not unknown, f"{doc}: `llava-edge {name}` has no {unknown}"


# Code-block lines written out in full: no `[...]`, `a|b`, `...` or CAPITALS placeholders.
FULL = [
    (doc, name, rest)
    for doc, block, name, rest in SHOWN
    if block and name in subcommands() and not re.search(r"\[|\.\.\.|\||[A-Z_]{4,}", rest)
]


@pytest.mark.parametrize(("doc", "name", "rest"), FULL, ids=[f"{d}:{n}" for d, n, _ in FULL])
def test_every_full_command_line_parses(doc: str, name: str, rest: str):
    argv = [*name.split(), *shlex.split(rest.split(" > ")[0].split(" && ")[0])]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.build_parser().parse_args(argv)
        except SystemExit as refused:
            pytest.fail(
                f"{doc}: `llava-edge {' '.join(argv)}` exits {refused}: {stderr.getvalue()}"
            )


# Options of other programs the docs show: pip, huggingface-cli, python -m venv, torchrun,
# accelerate, trtexec, the original LLaVA's scripts, and the bench/ scripts (their own parsers).
OTHER_PROGRAMS = {
    "--index-url": "pip",
    "--local-dir": "hf download",
    "--system-site-packages": "python -m venv",
    "--nproc": "torchrun --nproc_per_node",
    "--config": "accelerate launch --config_file",
    "--onnx": "trtexec --onnx=",
    "--strongly": "trtexec --stronglyTyped",
    "--bits": "the original LLaVA's training scripts",
    "--skip-tensorrt": "bench/gpu_check.py",
    "--skip-training": "bench/gpu_check.py",
    "--fp32": "bench/bench_quantize.py",
    "--int8": "bench/bench_quantize.py",
    "--int4": "bench/bench_quantize.py",
}


@pytest.mark.parametrize("doc", DOCS, ids=[doc.name for doc in DOCS])
def test_every_option_named_in_prose_exists(doc: Path):
    """An option named anywhere (`--prefix-cache-mb` in a sentence about serve) is one some
    command has: a misspelt or removed option in prose fails here too."""
    known = {o for p in subcommands().values() for a in p._actions for o in a.option_strings}
    named = set(OPTION.findall(doc.read_text()))
    unknown = sorted(named - known - set(OTHER_PROGRAMS))
    assert not unknown, f"{doc.name} names options no llava-edge command has: {unknown}"


def synopsis_defaults() -> list[tuple[str, str, str, str]]:
    """(doc, command, option, value) of each `[--option VALUE]` a synopsis line shows with a
    value rather than a placeholder: README's Commands list writes defaults so."""
    shown = []
    for doc, block, name, rest in SHOWN:
        if not block or name not in subcommands():
            continue
        for option, value in re.findall(r"\[(--[a-z-]+) ([^\]\s|A-Z]+)\]", rest):
            # An option whose parser default is None is resolved further in (`quantize
            # --samples 32`) or shown with an example (`--provider cuda`): not checked here.
            if value != "..." and default(name, option) is not None:
                shown.append((doc, name, option, value))
    return shown


def default(name: str, option: str) -> object:
    parser = subcommands()[name]
    return next(a.default for a in parser._actions if option in a.option_strings)


DEFAULTS = synopsis_defaults()


@pytest.mark.parametrize(
    ("doc", "name", "option", "value"), DEFAULTS, ids=[f"{n} {o}" for _, n, o, _ in DEFAULTS]
)
def test_synopsis_values_are_the_defaults(doc: str, name: str, option: str, value: str):
    expected = default(name, option)
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        assert float(value) == expected, f"{doc}: `{name} [{option} {value}]`, default {expected}"
    else:
        assert value == str(expected), f"{doc}: `{name} [{option} {value}]`, default {expected}"


# A file path in this repository, as the docs write one: `llava_edge/files.py`,
# `bench/bench_load.py`, `tests/test_plan.py`, or under llava_edge/ (`runtime/anyres.py`).
REPO_FILE = re.compile(
    r"(?<![\w/.-])((?:llava_edge|tests|bench|runtime|export|training|calib|serve|convert)/[\w/]+\.\w+)"
)


@pytest.mark.parametrize("doc", DOCS, ids=[doc.name for doc in DOCS])
def test_every_repository_file_named_exists(doc: Path):
    """A file the docs send a reader to is there."""
    named = set(REPO_FILE.findall(doc.read_text()))
    missing = sorted(
        p for p in named if not (ROOT / p).exists() and not (ROOT / "llava_edge" / p).exists()
    )
    assert not missing, f"{doc.name} names files that are not there: {missing}"


def test_the_docs_name_repository_files():
    assert sum(len(REPO_FILE.findall(doc.read_text())) for doc in DOCS) > 30


INSTALL = re.compile(r"pip install\b.*?\bllava-edge(?:\[([a-z,]+)\])?")


def with_their_extras(extras: set[str]) -> set[str]:
    """The extras pip installs for `llava-edge[...]`: those named and those they name in turn
    (`train` brings `export`), read from the installed package's metadata."""
    named = re.compile(r'llava-edge\[(\w+)\]\s*;\s*extra\s*==\s*"(\w+)"')
    brings = [
        m.groups() for r in importlib.metadata.requires("llava-edge") if (m := named.match(r))
    ]
    found: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra not in found:
            found.add(extra)
            todo += [inner for inner, outer in brings if outer == extra]
    return found


def install_blocks() -> list[tuple[str, set[str], list[str]]]:
    """(doc, extras installed, commands run) of each code block that installs llava-edge and
    runs it."""
    blocks = []
    for doc in DOCS:
        for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), re.S):
            installs = INSTALL.findall(block)
            names = []
            for name, rest in (m.groups() for m in map(COMMAND.search, block.splitlines()) if m):
                sub = re.match(r"\s+([a-z]+)", rest) if name == "data" else None
                names.append(f"data {sub.group(1)}" if sub else name)
            if installs and names:
                extras = {e for found in installs for e in found.split(",") if e}
                blocks.append((doc.name, with_their_extras(extras), names))
    return blocks


def test_a_block_that_installs_llava_edge_installs_what_its_commands_need():
    """A reader pastes the block whole: each command in it finds the extra it needs installed
    (`quantize --precision int4` without [calib] stops midway, asking for it)."""
    blocks = install_blocks()
    assert len(blocks) >= 3
    for doc, extras, names in blocks:
        needed = {name: cli.EXTRAS[name] for name in names if name in cli.EXTRAS}
        missing = {name: extra for name, extra in needed.items() if extra not in extras}
        assert not missing, f"{doc}: a block installs {sorted(extras)} and runs {missing}"


def options_of(name: str) -> set[str]:
    parser = subcommands()[name]
    return {o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}


def readme_commands() -> tuple[list[str], str]:
    """README's Commands list (a synopsis a line) and the prose after it."""
    section = (ROOT / "README.md").read_text().split("\n## Commands\n")[1].split("\n## ")[0]
    _, block, prose = section.split("```", 2)
    return [line for line in block.splitlines() if line.startswith("llava-edge ")], prose


def shared_options(prose: str) -> dict[str, set[str]]:
    """The options the prose after README's Commands list gives to several commands at once:
    "`run`, `chat` and `watch` take the sampling options (`--temperature`, ...)"."""
    header = re.compile(r"((?:`[a-z-]+`(?:, | and ))*`[a-z-]+`) (?:also )?take ")
    shared: dict[str, set[str]] = {}
    heads = list(header.finditer(prose))
    for head, after in zip(heads, [*heads[1:], None], strict=True):
        clause = prose[head.end() : after.start() if after else None]
        for name in re.findall(r"`([a-z-]+)`", head.group(1)):
            shared.setdefault(name, set()).update(OPTION.findall(clause))
    return shared


# A synopsis that ends in `...` leaves the rest of its options to the page its prose names.
ELSEWHERE = {
    "train": "docs/training.md",
    "serve": "README.md#serve",
    "data generate": "docs/data.md",
}


def elsewhere(name: str) -> str:
    path, _, section = ELSEWHERE[name].partition("#")
    text = (ROOT / path).read_text()
    return text.split(f"\n## {section.capitalize()}\n")[1].split("\n## ")[0] if section else text


def synopses() -> list[tuple[str, str, list[str]]]:
    """(doc, command, its synopsis lines): README's Commands list, and each line of a docs/
    page that shows a command's form with placeholders (`llava-edge quantize MODEL_DIR ...`)."""
    lines, _ = readme_commands()
    found: dict[tuple[str, str], list[str]] = {}
    for line in lines:
        match = COMMAND.search(line)
        name, rest = match.groups()
        if name == "data":
            name, rest = re.match(r"\s+([a-z]+)(.*)", rest).groups()
            name = f"data {name}"
        found.setdefault(("README.md", name), []).append(rest)
    for doc, block, name, rest in SHOWN:
        if doc != "README.md" and block and re.match(r"[A-Z_]{3,}\b", rest):
            found.setdefault((doc, name), []).append(rest)
    return [(doc, name, rests) for (doc, name), rests in found.items()]


SYNOPSES = synopses()


def test_the_synopses_are_found():
    assert {name for doc, name, _ in SYNOPSES if doc == "README.md"} == set(subcommands())
    assert {(doc, name) for doc, name, _ in SYNOPSES} >= {
        ("quantization.md", "quantize"),
        ("checkpoints.md", "convert"),
    }
    assert shared_options(readme_commands()[1])["watch"] >= {"--timeout", "--system"}


@pytest.mark.parametrize(
    ("doc", "name", "rests"), SYNOPSES, ids=[f"{d}:{n}" for d, n, _ in SYNOPSES]
)
def test_every_option_is_in_its_synopsis(doc: str, name: str, rests: list[str]):
    """A synopsis shows every option its command has, or says where the others are: an option
    added to the parser fails here until the docs show it."""
    shown = {option for rest in rests for option in OPTION.findall(rest)}
    if doc == "README.md":
        shown |= shared_options(readme_commands()[1]).get(name, set())
        if rests[-1].rstrip().endswith("...") and name in ELSEWHERE:
            shown |= set(OPTION.findall(elsewhere(name)))
    missing = sorted(options_of(name) - shown)
    assert not missing, f"{doc}: the synopsis of `llava-edge {name}` lacks {missing}"


def test_the_figures_quantization_md_quotes_are_in_readmes_benchmarks():
    """docs/quantization.md's advice on choosing a precision quotes README's benchmark table:
    every figure it gives (ms, tok/s, MB) is one that table holds, so a benchmark rerun that
    changes the table fails here until the advice follows."""
    advice = (ROOT / "docs" / "quantization.md").read_text()
    advice = advice.split("### Choosing a precision for a CPU host")[1].split("\n\n")[1]
    assert "From README's benchmark table" in advice
    table = (ROOT / "README.md").read_text().split("\n## Benchmarks\n")[1].split("\n## ")[0]
    table = "\n".join(line for line in table.splitlines() if line.startswith("| "))
    quoted = re.findall(r"(\d+(?:\.\d+)?) (?:ms|tok/s|MB)\b", advice)
    assert len(quoted) >= 6
    missing = [f for f in quoted if not re.search(rf"(?<![\d.]){re.escape(f)}(?![\d.])", table)]
    assert not missing, f"quantization.md quotes {missing}, which README's table does not hold"


def test_readmes_python_runs_as_written(tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys):
    """README's Python blocks, run in order as a user would paste them, with what they leave to
    the reader bound: the model dir, photo.jpg, a camera's frames (a folder of pictures for
    /dev/video0), the questions. A renamed method or option fails here until README follows."""
    import numpy as np
    from PIL import Image

    from llava_edge.runtime import Pipeline

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(picture).save("photo.jpg")
    (tmp_path / "frames").mkdir()
    for i in range(3):
        Image.fromarray(np.roll(picture, i, axis=1)).save(tmp_path / "frames" / f"{i}.png")
    bound = {
        "camera_frame": picture,
        "next_frame": picture[::-1],
        "img1": "photo.jpg",
        "img2": picture,
        "before": picture,
        "after": picture[:, ::-1],
        "frame": picture,
        "questions": ["Is the door open?", "How many cups?"],
    }
    places = {'"model/"': repr(str(tiny_model_dir)), '"/dev/video0"': '"frames"'}
    with Pipeline.load(tiny_model_dir) as pipe:
        for block in blocks:
            for written, here in places.items():
                block = block.replace(written, here)
            exec(compile(block, "README.md", "exec"), {**bound, "pipe": pipe, "Pipeline": Pipeline})
    assert "frame 2:" in capsys.readouterr().out


def help_defaults() -> list[tuple[str, argparse.Action]]:
    """(command, option) of each option with a default value a user relies on: a number or a
    name, not None (resolved further in) nor a switch's False."""
    return [
        (name, action)
        for name, parser in subcommands().items()
        for action in parser._actions
        if action.option_strings
        and isinstance(action.default, int | float | str)
        and not isinstance(action.default, bool)
        and action.default != argparse.SUPPRESS
    ]


@pytest.mark.parametrize(
    ("name", "action"),
    help_defaults(),
    ids=[f"{n} {a.option_strings[-1]}" for n, a in help_defaults()],
)
def test_help_states_each_default_as_the_parser_has_it(name: str, action: argparse.Action):
    """`llava-edge COMMAND --help` is where a user looks a default up (`serve --max-queue`): an
    option with one says so, and a number it states is the parser's."""
    text = action.help or ""
    assert "default" in text, f"`{name} --help`: {action.option_strings[-1]} states no default"
    stated = re.search(r"default:? (-?[\d,.]+\d)", text)
    if stated and isinstance(action.default, int | float):
        assert float(stated.group(1).replace(",", "")) == action.default, (
            f"`{name} --help`: {action.option_strings[-1]} says {stated.group(0)!r}, "
            f"the parser's default is {action.default}"
        )
