"""Exact-match accuracy of short answers, through the runtime a robot would deploy.

Every (question, answer) round of every sample is asked on its own, with the sample's image, of
an exported model dir; the prediction matches when it equals the reference after lower-casing,
trimming and dropping a final full stop (VQAv2-style short answers). Each question's result is
written as one JSON line so that wrong answers can be read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError
from llava_edge.training.data import BadSample, SampleFile, parse_sample


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    answers: Path  # the per-question JSONL
    skipped: int  # bad samples left out by skip_bad


def normalize(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def evaluate(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    images: str | os.PathLike | None = None,
    answers: str | os.PathLike | None = None,
    max_new_tokens: int = 16,
    skip_bad: bool = False,
    progress: bool = True,
    **load: Any,
) -> EvalResult:
    """Score `model_dir` on the LLaVA-format `data`; answers go to `answers` (default: beside
    the data file, `<name>.answers.jsonl`).

    load: Pipeline.load's options (backend, providers, threads, engine_dir, verify_files,
    limits), so a model is scored on the backend and under the limits it is deployed with.
    """
    from tqdm.auto import tqdm

    from llava_edge.runtime import Pipeline

    data = Path(data)
    image_root = Path(images) if images is not None else None
    if image_root is not None and not image_root.is_dir():
        raise LlavaEdgeError(f"image dir {image_root} does not exist")
    out = Path(answers) if answers is not None else data.with_name(f"{data.stem}.answers.jsonl")
    skipped: list[BadSample] = []

    def keep(position: int, record: object) -> bool:
        try:
            sample = parse_sample(record, position)
            if sample.image is not None and not _image_path(sample, image_root).is_file():
                raise BadSample(
                    sample.id, f"image {_image_path(sample, image_root)} does not exist"
                )
            return True
        except BadSample as e:
            if not skip_bad:
                raise BadSample(
                    e.sample_id, e.problem + "; fix it, or pass --skip-bad to leave it out"
                ) from None
            skipped.append(e)
            return False

    samples = SampleFile(data, keep=keep)
    total = correct = 0
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with (
            Pipeline.load(model_dir, **load) as pipe,
            open(tmp, "w", encoding="utf-8") as f,
        ):
            for index in tqdm(range(len(samples)), desc="evaluating", disable=not progress):
                sample = parse_sample(samples.record(index), int(samples.positions[index]))
                image = _image_path(sample, image_root) if sample.image is not None else None
                for turn, (question, reference) in enumerate(sample.turns):
                    try:
                        prediction = pipe.generate(image, question, max_new_tokens=max_new_tokens)
                    except LlavaEdgeError as e:
                        raise BadSample(sample.id, str(e)) from None
                    match = normalize(prediction) == normalize(reference)
                    total += 1
                    correct += match
                    row = {
                        "id": sample.id,
                        "turn": turn,
                        "question": question,
                        "answer": reference,
                        "prediction": prediction,
                        "correct": match,
                    }
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if not total:
            raise LlavaEdgeError(f"{data} has no question to evaluate")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return EvalResult(correct / total, correct, total, out, len(skipped))


def _image_path(sample, root: Path | None) -> Path:
    if root is None:
        raise BadSample(sample.id, "has an image but no image dir was given (--images DIR)")
    return root / sample.image
