"""Choosing the next token: greedy or sampled, with transformers' logits processors' semantics.

Order as in transformers' generate(): repetition penalty, then temperature, top-k, top-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llava_edge.errors import LlavaEdgeError


@dataclass
class GenerationConfig:
    """How to generate. temperature 0 means greedy (what fp32 equality with transformers uses)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the answer
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise LlavaEdgeError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if not 0 <= self.temperature <= 100:
            raise LlavaEdgeError(f"temperature must be in [0, 100], got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise LlavaEdgeError(f"top_k must be 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise LlavaEdgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty <= 100:
            raise LlavaEdgeError(
                f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LlavaEdgeError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks one token per batch row; owns the random generator so a seed reproduces a run."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, seen: list[np.ndarray]) -> np.ndarray:
        """logits [B, V]; seen: per row, the ids so far (for the repetition penalty)."""
        c = self.config
        logits = logits.astype(np.float32, copy=True)
        if c.repetition_penalty != 1.0:
            for row, ids in zip(logits, seen, strict=True):
                ids = np.unique(ids[ids < row.shape[0]])
                scores = row[ids]
                row[ids] = np.where(
                    scores < 0, scores * c.repetition_penalty, scores / c.repetition_penalty
                )
        if c.greedy:
            return logits.argmax(axis=-1)
        logits /= c.temperature
        if c.top_k:
            k = min(c.top_k, logits.shape[-1])
            kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = _softmax(logits)
        if c.top_p < 1.0:
            probs = _top_p(probs, c.top_p)
        return np.array([self.rng.choice(len(p), p=p) for p in probs])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    cumulative = np.cumsum(sorted_probs, axis=-1)
    drop_sorted = cumulative - sorted_probs >= top_p  # always keeps the first token
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    kept = np.where(drop, 0.0, probs)
    return kept / kept.sum(axis=-1, keepdims=True)
