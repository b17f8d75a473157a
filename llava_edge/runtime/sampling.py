"""Choosing the next token: greedy or sampled, with transformers' logits processors' semantics.

Order as in transformers' generate(): repetition penalty, then temperature, top-k, top-p.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# numpy imports np.random on first use; imported here, with the runtime, so the first answer does
# not run numpy's module setup, which drops a KeyboardInterrupt (Ctrl-C, SIGTERM) raised in it.
from numpy.random import default_rng

from llava_edge.errors import LlavaEdgeError

# Stop strings a request may give, and their length: after every token the answer's text is
# searched for each (on the scheduler thread every row of a batch shares), and a stream holds
# back what could still begin one, so a long one can keep a whole answer from streaming.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass
class GenerationConfig:
    """How to generate. temperature 0 means greedy (what fp32 equality with transformers uses)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 0: only the most probable token (OpenAI's range, [0, 1])
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the answer
    ignore_eos: bool = False

    def validate(self, named: Callable[[str], str] = str) -> None:
        """Refuse what generation cannot take, in one line naming the option as `named` gives
        it (the CLI's `--max-new-tokens` for `max_new_tokens`); numbers of any numeric type
        (numpy's included: robot code often holds them) become Python's own."""
        self.max_new_tokens = whole_number(
            named("max_new_tokens"), self.max_new_tokens, 1, "a positive integer"
        )
        self.top_k = whole_number(named("top_k"), self.top_k, 0, "0 (off) or a positive integer")
        if self.seed is not None:
            self.seed = whole_number(named("seed"), self.seed, 0, "None or a non-negative integer")
        self.temperature = _number(named("temperature"), self.temperature, 0, 100, "[0, 100]")
        self.top_p = _number(named("top_p"), self.top_p, 0, 1, "[0, 1]")
        self.repetition_penalty = _number(
            named("repetition_penalty"), self.repetition_penalty, 0, 100, "(0, 100]", above=True
        )
        self._validate_stop(named("stop"))
        self.ignore_eos = true_or_false(named("ignore_eos"), self.ignore_eos)

    def _validate_stop(self, name: str) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list | tuple) or any(
            not isinstance(s, str) or not s for s in self.stop
        ):
            raise LlavaEdgeError(
                f"{name} must be a string or a list of non-empty strings, got {self.stop!r}"
            )
        self.stop = list(self.stop)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise LlavaEdgeError(
                f"{name} takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}"
            )
        longest = max(self.stop, key=len, default="")
        if len(longest) > MAX_STOP_CHARS:
            raise LlavaEdgeError(
                f"{name} strings may be at most {MAX_STOP_CHARS} characters each, got one of "
                f"{len(longest)}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def true_or_false(name: str, value: object, what: str = "True or False") -> bool:
    """`value` as a bool: True or False (numpy's too); a string from a config file ("false")
    would read as true, so it is refused, saying the option must be `what`."""
    if not isinstance(value, bool | np.bool_):
        raise LlavaEdgeError(f"{name} must be {what}, got {value!r}")
    return bool(value)


def whole_number(name: str, value: object, least: int, what: str) -> int:
    """`value` as an int: a whole number of any integer type (robot code holds numpy's), not a
    bool, at least `least`; else refused, saying it must be `what`."""
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, numbers.Integral)
        or value < least
    ):
        raise LlavaEdgeError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _number(
    name: str, value: object, low: float, high: float, span: str, above: bool = False
) -> float:
    """A real number in [low, high] (in (low, high] where `above`)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise LlavaEdgeError(f"{name} must be a number in {span}, got {value!r}")
    if not (low < value if above else low <= value) or not value <= high:
        raise LlavaEdgeError(f"{name} must be in {span}, got {value}")
    return float(value)


class Sampler:
    """Picks one token per batch row; owns the random generator so a seed reproduces a run.

    The distribution sampled from is transformers' on the same logits: its
    RepetitionPenaltyLogitsProcessor, then TemperatureLogitsWarper, TopKLogitsWarper and
    TopPLogitsWarper, in the order generate() applies them (tests compare the kept tokens and
    their probabilities with those classes). Top-k keeps every token tied with the k-th, as
    TopKLogitsWarper does; of tokens tied at the top-p boundary the lower ids go first, as
    TopPLogitsWarper drops them on a stable sort (its default sort leaves the order of ties to
    torch). Hand-written in numpy because the runtime does not import torch.
    """

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = default_rng(config.seed)

    def __call__(self, logits: np.ndarray, seen: list[np.ndarray]) -> np.ndarray:
        """logits [B, V]; seen: per row, the ids so far (for the repetition penalty)."""
        _check_scores(logits)
        if self.config.greedy:
            return self.penalized(logits, seen).argmax(axis=-1)
        probs = self.probabilities(logits, seen)
        return np.array([self.rng.choice(len(p), p=p) for p in probs])

    def penalized(self, logits: np.ndarray, seen: list[np.ndarray]) -> np.ndarray:
        """float32 logits with the repetition penalty applied to every id seen."""
        penalty = self.config.repetition_penalty
        logits = logits.astype(np.float32, copy=True)
        if penalty != 1.0:
            for row, ids in zip(logits, seen, strict=True):
                ids = np.unique(ids[ids < row.shape[0]])
                scores = row[ids]
                row[ids] = np.where(scores < 0, scores * penalty, scores / penalty)
        return logits

    def probabilities(self, logits: np.ndarray, seen: list[np.ndarray]) -> np.ndarray:
        """[B, V]: the distribution a sampled token is drawn from (0 where filtered out)."""
        c = self.config
        if c.greedy:
            raise ValueError("greedy decoding picks the largest logit; it has no distribution")
        with np.errstate(all="ignore"):  # overflow shows as non-finite probabilities, below
            logits = self.penalized(logits, seen) / np.float32(c.temperature)
            if c.top_k:
                k = min(c.top_k, logits.shape[-1])
                kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
                logits = np.where(logits < kth, -np.inf, logits)  # ties with the k-th stay
            if c.top_p < 1.0:
                logits = _top_p(logits, c.top_p)
            probs = _softmax(logits)
        if not np.isfinite(probs).all():
            raise LlavaEdgeError(
                f"temperature {c.temperature} with repetition_penalty {c.repetition_penalty} "
                "scales the logits past float32's range; raise the temperature (0 is greedy)"
            )
        return probs


def _check_scores(logits: np.ndarray) -> None:
    """Refuse scores a decoder that overflowed gives: argmax would take a NaN's id for a token
    (transformers' too: torch's argmax ranks NaN first), and no distribution holds them. -inf is
    a score (a token ruled out), so it passes, unless it rules out every token. One pass: a row's
    max is NaN where the row holds one, and infinite only where the row is +inf or all -inf."""
    if not np.isfinite(logits.max(axis=-1)).all():
        raise LlavaEdgeError(
            "the model's scores for the next token hold NaN or infinity: it overflowed in its "
            "precision (fp16, or a TensorRT engine built with it); use an fp32 model dir"
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Drop the least likely tokens whose probabilities sum to at most 1 - top_p, keeping at
    least the most likely one: TopPLogitsWarper's rule, on an ascending (stable) sort as it
    sorts, so that ties at the boundary fall the same way. top_p 0 keeps that one alone: a
    float32 sum over a large, flat vocabulary can pass 1 before its last token, and the rule
    read literally would keep a few more."""
    order = np.argsort(logits, axis=-1, kind="stable")
    if top_p == 0:
        drop_sorted = np.ones(logits.shape, dtype=bool)
    else:
        cumulative = np.cumsum(_softmax(np.take_along_axis(logits, order, axis=-1)), axis=-1)
        drop_sorted = cumulative <= np.float32(1 - top_p)
    drop_sorted[:, -1] = False
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits)
