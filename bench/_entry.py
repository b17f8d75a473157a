"""How a bench script ends on a problem it was told about: one line and exit code 1, as
`llava-edge` does, not a traceback (a missing model dir is the user's to fix, not a bug)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from llava_edge.errors import LlavaEdgeError


def run(main: Callable[[], None]) -> None:
    try:
        main()
    except LlavaEdgeError as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
