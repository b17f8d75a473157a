"""Writing LLaVA JSON: a list of samples, one a line, installed whole or not at all."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from llava_edge.errors import LlavaEdgeError
from llava_edge.files import replace_file
from llava_edge.runtime.template import IMAGE_PLACEHOLDER


def conversation(rounds: list[tuple[str, str]]) -> list[dict]:
    """LLaVA's `conversations` of (question, answer) rounds, `<image>` opening the first."""
    turns = []
    for i, (question, answer) in enumerate(rounds):
        value = f"{IMAGE_PLACEHOLDER}\n{question}" if i == 0 else question
        turns += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return turns


def write_samples(path: str | Path, samples: Iterable[dict]) -> int:
    """Write the samples as one JSON list (a sample a line); returns how many."""
    count = 0
    with replace_file(Path(path)) as f:
        f.write("[")
        for sample in samples:
            try:
                f.write(("\n" if count == 0 else ",\n") + json.dumps(sample, ensure_ascii=False))
            except UnicodeEncodeError:  # a "\ud83d" escape in the source: half of an emoji
                raise LlavaEdgeError(
                    f"sample {sample.get('id')} holds half of a UTF-16 pair (a lone surrogate), "
                    "which no UTF-8 file can; fix the text in its source"
                ) from None
            count += 1
        f.write("\n]\n" if count else "]\n")
    return count
