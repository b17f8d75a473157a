"""Keeping library chatter off the terminal: what llava-edge prints is its own progress and, on
bad input, one line that says what to fix."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Within the block, the named loggers ("" is the root) show errors only and Python warnings
    are ignored; both are restored after it."""
    named = [logging.getLogger(name or None) for name in loggers]
    levels = [logger.level for logger in named]
    for logger in named:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(named, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def quiet_loading(*also: str) -> Iterator[None]:
    """transformers' loads with no progress bars, notes or warnings (nor those of the loggers
    `also` names): bad input must end in one line. The caller's settings come back after."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with quiet("transformers", *also):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def terminal_bar(iterable: Any = None, progress: bool = True, **options: Any) -> Any:
    """A tqdm bar shown only where stderr is a terminal (and `progress` asks for one): the data
    commands' long checks, silent in a script's log."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if progress else True, **options)  # None: a terminal only
