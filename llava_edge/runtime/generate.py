"""The generation loop of one request: prefill a prompt, then decode token by token.

Backend-neutral: a backend provides `decode(embeds, token_mask, positions, cache) -> logits` and
the cache; this module turns ids into embeddings (image features put where the image tokens
stand), picks tokens, and knows when to stop. Pipeline's answers, streams and chat turns run
through here (so `run`, `chat`, export's verification, calibration and evaluation do); batches
and the server run the batch engine's loop (runtime/batching.py), which picks tokens with the
same Sampler and embeds with `embed`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llava_edge.errors import TimedOut
from llava_edge.runtime.sampling import GenerationConfig, Sampler


@dataclass
class Step:
    """One decoding step: the token each batch row got, and which rows are done."""

    tokens: np.ndarray  # [B] int64
    finished: np.ndarray  # [B] bool, True where this token ended the row (or it ended before)


@dataclass
class Timer:
    """Wall-clock marks of one request, in seconds since it started."""

    start: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter() - self.start


def embed(
    table: np.ndarray, ids: np.ndarray, image_token_id: int, features: list[np.ndarray | None]
) -> np.ndarray:
    """ids [B, S] -> embeddings [B, S, hidden], each row's image tokens replaced by its features."""
    ids = np.asarray(ids)
    safe = np.where(ids < table.shape[0], ids, 0)  # image ids may lie past the table
    embeds = np.asarray(table[safe.reshape(-1)]).reshape(*ids.shape, table.shape[1])
    for row, feats in enumerate(features):
        if feats is None:
            continue
        slots = np.flatnonzero(ids[row] == image_token_id)
        embeds[row, slots] = feats.astype(embeds.dtype, copy=False)
    return embeds


def positions_from_mask(mask: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Position of each token: count of real tokens before it (padding, masked out, gets 1)."""
    positions = np.cumsum(mask, axis=1) - 1
    if start is not None:
        positions = positions + start[:, None]
    return np.where(mask == 1, positions, 1).astype(np.int64)


def deadline(start: float, timeout_s: float | None, backend: Any) -> float | None:
    """When a request started at `start` (time.perf_counter()) is past its time limit: that
    limit from its start, or from the end of the model's background load where that came later
    (the time a request waits for graphs still opening is the load's, not the request's: a large
    model's cold start would use up any answer's limit). None without a limit, or while the
    model still loads (not late yet)."""
    loaded = backend.loaded_at if timeout_s else None
    return None if loaded is None else max(start, loaded) + timeout_s


def decode_loop(
    backend,
    cache,
    table: np.ndarray,
    embeds: np.ndarray,
    token_mask: np.ndarray,
    positions: np.ndarray,
    config: GenerationConfig,
    eos_ids: list[int],
    pad_id: int,
    seen: list[np.ndarray],
    timer: Timer | None = None,
    timeout_s: float | None = None,
) -> Iterator[Step]:
    """Prefill `embeds`, then yield one Step per new token until every row is done.

    `seen` holds each row's ids so far (for the repetition penalty); the last token yielded is
    not fed back, so a caller continuing the sequence (chat) feeds it first. Past `timeout_s`
    (counted from the timer's start) the loop stops with an error, checked before every decoder
    call (the prompt's too: a request whose image took all its time runs no prompt) and after
    one (a one-token answer whose prefill ran late is late).
    """
    sampler = Sampler(config)
    timer = timer or Timer()

    late_at = None  # known once the model is loaded: then fixed

    def check_deadline() -> None:
        nonlocal late_at
        if late_at is None:
            late_at = deadline(timer.start, timeout_s, backend)
        if late_at is not None and time.perf_counter() > late_at:
            raise TimedOut.after(timeout_s)

    batch = embeds.shape[0]
    check_deadline()
    logits = backend.decode(embeds, token_mask, positions, cache)
    timer.mark("prefill")
    check_deadline()
    next_pos = positions[:, -1] + 1
    finished = np.zeros(batch, dtype=bool)
    seen = [np.asarray(s, dtype=np.int64) for s in seen]
    eos = np.asarray(eos_ids, dtype=np.int64)
    ones = np.ones((batch, 1), dtype=np.int64)
    for step in range(config.max_new_tokens):
        tokens = np.where(finished, pad_id, sampler(logits, seen)).astype(np.int64)
        done = finished.copy() if config.ignore_eos else finished | np.isin(tokens, eos)
        yield Step(tokens=tokens, finished=done)
        finished = done
        if finished.all() or step == config.max_new_tokens - 1:
            return
        check_deadline()
        if config.repetition_penalty != 1.0:  # the only reader of `seen`
            seen = [np.append(s, t) for s, t in zip(seen, tokens, strict=True)]
        logits = backend.decode(
            embed(table, tokens[:, None], -1, []), ones, next_pos[:, None], cache
        )
        next_pos = next_pos + 1
        check_deadline()
