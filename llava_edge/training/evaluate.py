"""Accuracy of short answers, through the runtime a robot would deploy.

Every (question, answer) round of every sample is asked on its own, with the sample's image, of
an exported model dir. How a prediction is held against its reference is `match`'s:

- "vqa" (the default): both as the VQA evaluation normalises answers (lower case, punctuation
  dropped or spaced, full stops that start no decimal dropped, number words as digits, articles
  dropped, contractions given their apostrophe), after Unicode normalisation (NFKC),
  case-folding and EvalAI's tokenising (commas and question marks dropped, "'s" split off, as
  TextVQA is scored and LLaVA prepares VQAv2 answers); an answer those rules leave empty (only an article, as a multiple-choice
  letter "A") is compared as "exact" compares it.
  A round whose gpt turn lists several reference answers ("answers": VQAv2's ten annotators')
  scores VQA accuracy: min(matches / 3, 1), averaged over the lists that leave out one
  reference in turn, as the VQA evaluation averages over its annotators.
- "exact": equal after NFKC, case-folding, trimming and dropping a final full stop.

A reference left empty by the normalisation is a bad sample, since an empty prediction would
match it. Each question's result is written as one JSON line so that wrong answers can be read.
"""

from __future__ import annotations

import json
import os
import re
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
    is_utf8,
    parse_sample,
)

MATCHES = ("vqa", "exact")


@dataclass
class EvalResult:
    accuracy: float  # score / total
    correct: int  # questions given full credit
    total: int
    answers: Path  # the per-question JSONL
    skipped: int  # bad samples left out by skip_bad
    cut: int = 0  # predictions stopped by max_new_tokens: a longer reference cannot match
    score: float = 0.0  # the questions' scores summed: 1 or 0 each, a share with several answers


def normalize(answer: str) -> str:
    # NFKC and casefold: one spelling of a word, however its accents were composed and its
    # case folded (a tokenizer may give 'e' + combining accent where the reference has 'é')
    return unicodedata.normalize("NFKC", answer).strip().casefold().rstrip(".").strip()


def answer_form(answer: str, match: str = "vqa") -> str:
    """The answer as `match` compares it."""
    if match == "exact":
        return normalize(answer)
    folded = unicodedata.normalize("NFKC", answer).casefold()
    # one the VQA rules leave empty (only an article, as a choice's letter "A") stays itself
    # EvalAI's tokenising too, as TextVQA's references (`data vqa`) and LLaVA's VQAv2
    # predictions are written: "cola's" is "cola 's" on both sides
    return normalize_vqa(folded, evalai=True) or normalize(folded)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """A prediction's score against normalised references: 1 or 0 against one; against
    several, min(matches / 3, 1) over the references less one, averaged over which is left out
    (the VQA evaluation's accuracy over its ten annotators)."""
    if len(references) == 1:
        return float(prediction == references[0])
    matches = sum(reference == prediction for reference in references)
    return sum(
        min((matches - (reference == prediction)) / 3, 1.0) for reference in references
    ) / len(references)


# ---- the VQA evaluation's answer normalisation -----------------------------------------------
# Written out here because the VQA evaluation ships as a script, not a library (`data vqa`
# normalises references with it too): punctuation is
# removed (or, inside words, turned into spaces), full stops that do not start a decimal go,
# number words become digits, articles go, and contractions written without their apostrophe
# get it back.

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!"]  # fmt: skip
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_FULL_STOP = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# Contractions, keyed by their spelling without apostrophes; left out are those whose bare
# spelling is a word of its own (he'll/hell, we're/were, it's/its, I'd/id, she'd/shed...).
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't "
    "hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll "
    "ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't "
    "shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've "
    "'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
)
_CONTRACTIONS = {form.replace("'", ""): form for form in _CONTRACTED.split()}


def normalize_vqa(answer: str, evalai: bool = False) -> str:
    """An answer as the VQA evaluation compares it; `evalai`: with EvalAI's tokenising first
    (lower case, no commas or question marks, "'s" split off), as TextVQA is scored."""
    text = answer
    if evalai:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = text
    for mark in _PUNCTUATION:
        if f"{mark} " in spaced or f" {mark}" in spaced or _COMMA_IN_NUMBER.search(spaced):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _FULL_STOP.sub("", text)
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def evaluate(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    images: str | os.PathLike | None = None,
    answers: str | os.PathLike | None = None,
    max_new_tokens: int = 16,
    skip_bad: bool = False,
    progress: bool = True,
    match: str = "vqa",
    limit: int | None = None,
    **load: Any,
) -> EvalResult:
    """Score `model_dir` on the LLaVA-format `data`; answers go to `answers` (default: beside
    the data file, `<name>.answers.jsonl`), written whole when the run finishes.

    skip_bad: leave out, and count, the samples that cannot be asked (a missing image, or one
    the runtime refuses: unreadable, over a limit) instead of stopping at the first.

    match: "vqa" or "exact", how a prediction is held against its references (the module's
    docstring says each).

    limit: score only the first `limit` samples, reading the file no further (a quick check
    of a model on a large set); bad samples left out by skip_bad do not count toward it.

    load: Pipeline.load's options (backend, providers, threads, engine_dir, verify_files,
    limits), so a model is scored on the backend and under the limits it is deployed with.
    """
    from tqdm.auto import tqdm

    from llava_edge.runtime import Pipeline
    from llava_edge.runtime.sampling import GenerationConfig, whole_number

    # Checked here, or --skip-bad would take a bad value for every sample's fault.
    GenerationConfig(max_new_tokens=max_new_tokens).validate()
    if match not in MATCHES:
        raise LlavaEdgeError(f"--match must be one of {', '.join(MATCHES)}, got {match!r}")
    if limit is not None:
        limit = whole_number("--limit", limit, 1, "a positive number of samples")
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
            references(record, sample, match)
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

    samples = SampleFile(data, keep=keep, progress=progress, limit=limit)
    if not len(samples):  # said before the model loads
        _nothing_asked(data, skipped)
    total = correct = cut = 0
    score = 0.0
    with Pipeline.load(model_dir, **load) as pipe, replace_file(out) as f:
        for index in tqdm(range(len(samples)), desc="evaluating", disable=not progress):
            record = samples.record(index)
            sample = parse_sample(record, int(samples.positions[index]))
            image = image_path(sample, image_root) if sample.image is not None else None
            try:
                rows = _ask(pipe, sample, references(record, sample, match), image, max_new_tokens)
            except BadSample as e:  # an unreadable image, a prompt over the limit...
                skip(e)
                continue
            for row in rows:
                total += 1
                score += row["score"]
                correct += row["correct"]
                cut += row["finish"] == "length"
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if not total:  # the runtime refused every sample
            _nothing_asked(data, skipped)
    return EvalResult(score / total, correct, total, out, len(skipped), cut, score)


@dataclass
class References:
    """One round's reference answers: as written, and as `match` compares them."""

    given: list[str]  # the gpt turn's "answers" where it lists them, else its value
    forms: list[str]
    listed: bool  # given by an "answers" list
    match: str


def references(record: dict, sample: Sample, match: str) -> list[References]:
    """Each round's references; BadSample for an "answers" that is not a list of texts, or a
    reference `match` leaves empty (an empty prediction would match it)."""
    conversations = record["conversations"][int(sample.dropped_first_turn) :]
    rounds = []
    for turn, (_, value) in enumerate(sample.turns):
        listed = conversations[2 * turn + 1].get("answers")
        if listed is not None and (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(answer, str) and is_utf8(answer) for answer in listed)
        ):
            raise BadSample(
                sample.id, f"round {turn}'s 'answers' must be a list of one or more texts"
            )
        given = [value] if listed is None else listed
        forms = [answer_form(answer, match) for answer in given]
        for answer, form in zip(given, forms, strict=True):
            if not form:
                raise BadSample(sample.id, f"round {turn}'s reference answer {answer!r} is empty")
        rounds.append(References(given, forms, listed is not None, match))
    return rounds


def _ask(
    pipe, sample: Sample, rounds: list[References], image: Path | None, max_new_tokens: int
) -> list[dict]:
    """Each round of the sample asked on its own, as rows of the answers file; BadSample when
    the runtime refuses one (the sample then counts not at all)."""
    rows = []
    for turn, ((question, reference), refs) in enumerate(zip(sample.turns, rounds, strict=True)):
        try:
            prediction = pipe.answer(image, question, max_new_tokens=max_new_tokens)
        except LlavaEdgeError as e:
            raise BadSample(sample.id, str(e)) from None
        score = vqa_accuracy(answer_form(prediction.text, refs.match), refs.forms)
        rows.append(
            {
                "id": sample.id,
                "turn": turn,
                "question": question,
                "answer": reference,
                **({"answers": refs.given} if refs.listed else {}),
                "prediction": prediction.text,
                "score": score,
                "correct": score == 1,  # full credit
                "finish": prediction.finish_reason,  # "length": cut at max_new_tokens
            }
        )
    return rows


def _nothing_asked(data: Path, skipped: list[BadSample]) -> None:
    if skipped:
        raise LlavaEdgeError(f"every sample of {data} was left out as bad; the first: {skipped[0]}")
    raise LlavaEdgeError(f"{data} has no question to evaluate")


def _same_file(a: Path, b: Path) -> bool:
    """Whether the two paths name one file (by device and inode, however each is spelled)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False
