"""Exact-match accuracy of short answers, through the runtime a robot would deploy.

Every (question, answer) round of every sample is asked on its own, with the sample's image, of
an exported model dir; the prediction matches when it equals the reference after Unicode
normalisation (NFKC), case-folding, trimming and dropping a final full stop (VQAv2-style short
answers); a reference left empty by that is a bad sample, since an empty prediction would match
it. Each question's result is written as one JSON line so that wrong answers can be read.
"""

from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError
from llava_edge.files import check_output_file, replace_file
from llava_edge.training.data import (
    BadSample,
    Sample,
    SampleFile,
    check_image_dir,
    image_path,
    parse_sample,
)


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    answers: Path  # the per-question JSONL
    skipped: int  # bad samples left out by skip_bad
    cut: int = 0  # predictions stopped by max_new_tokens: a longer reference cannot match


def normalize(answer: str) -> str:
    # NFKC and casefold: one spelling of a word, however its accents were composed and its
    # case folded (a tokenizer may give 'e' + combining accent where the reference has 'é')
    return unicodedata.normalize("NFKC", answer).strip().casefold().rstrip(".").strip()


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
    the data file, `<name>.answers.jsonl`), written whole when the run finishes.

    skip_bad: leave out, and count, the samples that cannot be asked (a missing image, or one
    the runtime refuses: unreadable, over a limit) instead of stopping at the first.

    load: Pipeline.load's options (backend, providers, threads, engine_dir, verify_files,
    limits), so a model is scored on the backend and under the limits it is deployed with.
    """
    from tqdm.auto import tqdm

    from llava_edge.runtime import Pipeline
    from llava_edge.runtime.sampling import GenerationConfig

    # Checked here, or --skip-bad would take a bad value for every sample's fault.
    GenerationConfig(max_new_tokens=max_new_tokens).validate()
    data = Path(data)
    image_root = Path(images) if images is not None else None
    check_image_dir(image_root)
    out = Path(answers) if answers is not None else data.with_name(f"{data.stem}.answers.jsonl")
    check_output_file(out, "--answers")
    if _same_file(out, data):
        raise LlavaEdgeError(f"--answers {out} is the --data file; write the answers elsewhere")
    if Path(model_dir).resolve() in out.resolve().parents:
        raise LlavaEdgeError(
            f"--answers {out} is inside the model dir, whose files the manifest checks; "
            "write the answers elsewhere"
        )
    replaces = out.exists()  # only a file already there can be one of the inputs
    skipped: list[BadSample] = []

    def keep(position: int, record: object) -> bool:
        try:
            sample = parse_sample(record, position)
            for turn, (_, reference) in enumerate(sample.turns):
                if not normalize(reference):  # an empty prediction would match it
                    raise BadSample(
                        sample.id, f"round {turn}'s reference answer {reference!r} is empty"
                    )
            if (
                sample.image is not None
                and image_root is None
                and not Path(sample.image).is_absolute()
            ):
                # the run's fault, not the sample's: --skip-bad must not leave them all out
                raise LlavaEdgeError(
                    f"sample {sample.id}'s image {sample.image} is relative: pass --images DIR, "
                    "the dir it is under"
                )
            if sample.image is not None:
                image = image_path(sample, image_root)
                if not image.is_file():
                    raise BadSample(sample.id, f"image {image} does not exist")
                if replaces and _same_file(out, image):
                    raise LlavaEdgeError(
                        f"--answers {out} is sample {sample.id}'s image; "
                        "write the answers elsewhere"
                    )
            return True
        except BadSample as e:
            return skip(e)

    def skip(e: BadSample) -> bool:
        if not skip_bad:
            raise BadSample(
                e.sample_id, e.problem + "; fix it, or pass --skip-bad to leave it out"
            ) from None
        skipped.append(e)
        return False

    samples = SampleFile(data, keep=keep)
    total = correct = cut = 0
    with Pipeline.load(model_dir, **load) as pipe, replace_file(out) as f:
        for index in tqdm(range(len(samples)), desc="evaluating", disable=not progress):
            sample = parse_sample(samples.record(index), int(samples.positions[index]))
            image = image_path(sample, image_root) if sample.image is not None else None
            try:
                rows = _ask(pipe, sample, image, max_new_tokens)
            except BadSample as e:  # an unreadable image, a prompt over the limit...
                skip(e)
                continue
            for row in rows:
                total += 1
                correct += row["correct"]
                cut += row["finish"] == "length"
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if not total and skipped:
            raise LlavaEdgeError(
                f"every sample of {data} was left out as bad; the first: {skipped[0]}"
            )
        if not total:
            raise LlavaEdgeError(f"{data} has no question to evaluate")
    return EvalResult(correct / total, correct, total, out, len(skipped), cut)


def _ask(pipe, sample: Sample, image: Path | None, max_new_tokens: int) -> list[dict]:
    """Each round of the sample asked on its own, as rows of the answers file; BadSample when
    the runtime refuses one (the sample then counts not at all)."""
    rows = []
    for turn, (question, reference) in enumerate(sample.turns):
        try:
            prediction = pipe.answer(image, question, max_new_tokens=max_new_tokens)
        except LlavaEdgeError as e:
            raise BadSample(sample.id, str(e)) from None
        rows.append(
            {
                "id": sample.id,
                "turn": turn,
                "question": question,
                "answer": reference,
                "prediction": prediction.text,
                "correct": normalize(prediction.text) == normalize(reference),
                "finish": prediction.finish_reason,  # "length": cut at max_new_tokens
            }
        )
    return rows


def _same_file(a: Path, b: Path) -> bool:
    """Whether the two paths name one file (by device and inode, however each is spelled)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False
