"""The sampler draws from transformers' distribution: the same tokens kept, the same
probabilities, as its logits processors give on the same logits (random rows and edge cases)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime.sampling import GenerationConfig, Sampler

VOCAB = 97


def reference(
    logits: np.ndarray, seen: np.ndarray, config: GenerationConfig, monkeypatch
) -> np.ndarray:
    """The probabilities transformers' generate() samples from, with its processors in its order
    (it leaves out a processor at its neutral value, as here).

    TopPLogitsWarper sorts with torch's default, unstable sort, so which of several tokens tied at
    the top-p boundary it drops depends on the sort's implementation (it differs with the row's
    length). Run with a stable sort, it drops them in id order, the rule the sampler follows.
    """
    sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sort(*a, **k, stable=True))
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    processors.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        processors.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        processors.append(TopPLogitsWarper(config.top_p))
    scores = processors(torch.from_numpy(seen), torch.from_numpy(logits.copy()))
    return scores.softmax(dim=-1).numpy()


def rows() -> np.ndarray:
    """Random rows at several scales, and the edge cases: ties everywhere, a tie for the top,
    all equal, one token far ahead, a tie straddling the top-k boundary."""
    rng = np.random.default_rng(0)
    random = [rng.standard_normal(VOCAB) * scale for scale in (0.3, 1.0, 3.0, 8.0)]
    ties = np.round(rng.standard_normal(VOCAB))  # a few distinct values, many tokens each
    top_tie = rng.standard_normal(VOCAB)
    top_tie[[5, 40, 90]] = top_tie.max() + 1.0
    flat = np.zeros(VOCAB)
    peaked = rng.standard_normal(VOCAB)
    peaked[17] = 30.0
    boundary = np.arange(VOCAB, dtype=np.float64) / VOCAB
    boundary[80:90] = boundary[85]  # ten tokens tied around the 10th..20th largest
    return np.stack([*random, ties, top_tie, flat, peaked, boundary]).astype(np.float32)


CONFIGS = {
    "temperature": dict(temperature=0.7),
    "hot": dict(temperature=2.5),
    "top_k": dict(temperature=1.0, top_k=12),
    "top_k of one": dict(temperature=1.0, top_k=1),
    "top_k over the vocab": dict(temperature=1.0, top_k=10_000),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "top_p tiny": dict(temperature=1.0, top_p=1e-6),
    "top_p zero": dict(temperature=1.0, top_p=0.0),
    "top_p half": dict(temperature=0.8, top_p=0.5),
    "penalty": dict(temperature=1.0, repetition_penalty=1.3),
    "penalty below one": dict(temperature=1.0, repetition_penalty=0.7),
    "everything": dict(temperature=0.9, top_k=30, top_p=0.8, repetition_penalty=1.2),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_kept_tokens_and_probabilities_equal_transformers(name, monkeypatch):
    config = GenerationConfig(**CONFIGS[name])
    logits = rows()
    seen = np.random.default_rng(1).integers(0, VOCAB, (len(logits), 12))
    seen[:, :3] = [5, 17, 85]  # the penalty hits tied and leading tokens too
    want = reference(logits, seen, config, monkeypatch)
    got = Sampler(config).probabilities(logits, list(seen))
    for row, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(g > 0, w > 0), f"row {row}: kept {np.flatnonzero(g > 0)}"
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=f"row {row}")


def test_sampled_tokens_come_from_the_kept_set():
    config = GenerationConfig(temperature=1.0, top_k=5, top_p=0.7, seed=3)
    logits = rows()[:4]
    seen = [np.zeros(1, np.int64)] * len(logits)
    kept = Sampler(config).probabilities(logits, seen) > 0
    sampler = Sampler(config)
    draws = np.stack([sampler(logits, seen) for _ in range(200)])
    assert all(kept[row, draws[:, row]].all() for row in range(len(logits)))
    assert any(len(set(draws[:, row])) > 1 for row in range(len(logits)))  # it does sample


def test_top_p_zero_keeps_only_the_most_probable_token_of_a_large_flat_vocabulary():
    """OpenAI's API takes top_p 0 (its range is [0, 1]): only the most likely token. Over Qwen2's
    152k-token vocabulary a nearly flat distribution's float32 running sum passes 1 before its
    last token, and TopPLogitsWarper's rule read literally keeps a dozen tokens more."""
    logits = (np.random.default_rng(0).standard_normal((3, 152_000)) * 0.01).astype(np.float32)
    seen = [np.zeros(1, np.int64)] * len(logits)
    config = GenerationConfig(temperature=1.0, top_p=0, seed=0)
    kept = Sampler(config).probabilities(logits, seen) > 0
    assert kept.sum(axis=-1).tolist() == [1, 1, 1]
    assert Sampler(config)(logits, seen).tolist() == logits.argmax(axis=-1).tolist()


def test_greedy_takes_the_penalized_argmax():
    logits = np.array([[3.0, 2.9, -1.0]], np.float32)
    greedy = Sampler(GenerationConfig(repetition_penalty=1.1))
    assert greedy(logits, [np.array([0])]).tolist() == [1]  # 3.0 / 1.1 < 2.9
    assert greedy(logits, [np.array([2])]).tolist() == [0]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("bad", [[1.0, np.nan, 2.0], [1.0, np.inf, 2.0], [-np.inf] * 3], ids=str)
def test_scores_the_model_overflowed_are_refused_not_picked(temperature, bad):
    """A decoder that overflowed (an fp16 model) gives NaN or infinite scores: greedy argmax
    would pick the NaN's id (or id 0 of a row all -inf) as if it were a token, and sampling
    blamed the temperature. A -inf among finite scores is a token ruled out, and passes."""
    logits = np.array([[1.0, 3.0, -np.inf], bad], np.float32)
    sampler = Sampler(GenerationConfig(temperature=temperature, seed=0))
    with pytest.raises(LlavaEdgeError, match="overflowed") as error:
        sampler(logits, [np.zeros(1, np.int64)] * 2)
    assert "temperature" not in str(error.value)
    assert sampler(logits[:1], [np.zeros(1, np.int64)]).shape == (1,)  # finite scores: a token
