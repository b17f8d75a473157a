"""How a bench script ends on a problem it was told about: one line and exit code 1, as
`llava-edge` does, not a traceback (a missing model dir is the user's to fix, not a bug); on
Ctrl-C, one line and exit code 130."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from llava_edge.errors import LlavaEdgeError


def run(main: Callable[[], None]) -> None:
    name = Path(sys.argv[0]).name
    try:
        main()
    except LlavaEdgeError as e:
        sys.exit(f"{name}: error: {e}")
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as a shell reports a process Ctrl-C ended


def given_dirs(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]
) -> dict[str, Path] | None:
    """The dirs the command line gives for `names` (options named after them), or None where it
    gives none and the script makes its own. Some without the others is refused, naming those
    missing: the script would otherwise time the dirs it makes, not the ones given."""
    given = {name: getattr(args, name) for name in names}
    if not any(given.values()):
        return None
    missing = [_flag(name) for name, path in given.items() if path is None]
    if missing:
        named = ", ".join(_flag(name) for name, path in given.items() if path is not None)
        parser.error(f"{named} given without {', '.join(missing)}: give them all, or none")
    return given


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def positive(text: str) -> int:
    """An argparse type: a whole number, 1 or more (runs, threads, tokens), refused when the
    command line is read, before minutes of building model dirs."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more, got {text!r}")
    return value
