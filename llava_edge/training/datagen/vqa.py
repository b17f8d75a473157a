"""Short-answer VQA data as LLaVA-1.5 mixes it into its training data.

Each question gets the response-format prompt LLaVA-1.5 uses for its kind, so that a model
trained on long generated answers still answers short when asked to:

    open question     "{question}\\nAnswer the question using a single word or phrase."
    multiple choice   "{question}\\nA. ...\\nB. ...\\nAnswer with the option's letter from the
                      given choices directly."   (answer: the letter)

Answers are normalised as the format's own evaluation normalises predictions (VQAv2: the VQA
evaluation's punctuation, number-word, article and contraction rules; TextVQA: the same after
EvalAI's tokenising; GQA: lower case without a final full stop, as LLaVA scores GQA; JSONL: as
`llava-edge eval --match exact` compares answers), so the model learns the form it is scored
on. All the questions about one image become one conversation, in file order, `<image>` in the
first turn. Where the format has several annotators' answers (VQAv2's and TextVQA's ten), the
gpt turn lists them too, normalised the same way, as `"answers"`: `llava-edge eval` scores a
prediction against them by VQA accuracy, and training reads only the turn's `"value"`.

Formats (as published):
- vqav2: the questions file (`{"data_subtype": "train2014", "questions": [{"image_id",
  "question", "question_id"}]}`) and the annotations file with the answers (`{"annotations":
  [{"question_id", "multiple_choice_answer", "answers"}]}`); images `COCO_train2014_<id:012>.jpg`
  or COCO 2017's `<id:012>.jpg`.
- gqa: `{question_id: {"imageId", "question", "answer", ...}}`; images `<imageId>.jpg`.
- textvqa: `{"data": [{"image_id", "question", "answers": [10 answers]}]}`; images
  `<image_id>.jpg`; the answer is the most common of the ten after normalising.
- jsonl: `{"image", "question", "answer"}` a line, with `"choices": [...]` for multiple choice
  (the answer may be the letter, the choice's text or its 0-based index).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError
from llava_edge.logs import terminal_bar
from llava_edge.runtime.template import IMAGE_PLACEHOLDER, SHORT_ANSWER
from llava_edge.training.datagen.annotations import read_text
from llava_edge.training.datagen.llava_json import conversation, write_samples
from llava_edge.training.evaluate import normalize as normalize_short
from llava_edge.training.evaluate import normalize_vqa

MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
FORMATS = ("vqav2", "gqa", "textvqa", "jsonl")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Question:
    images: tuple[str, ...]  # file names the image may have (relative to the image dir)
    question: str
    answer: str  # normalised; for multiple choice, the letter
    choices: tuple[str, ...] = ()
    references: tuple[str, ...] = ()  # every annotator's answer, normalised as `answer` is

    def prompt(self) -> str:
        # A question written in LLaVA's style holds the placeholder already; the conversation
        # puts it in once, where training looks for it.
        question = without_placeholder(self.question)
        if not self.choices:
            return f"{question}\n{SHORT_ANSWER}"
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{question}\n{options}\n{MULTIPLE_CHOICE}"


def without_placeholder(text: str) -> str:
    """The text without LLaVA's image placeholder: the conversation writes it once, before the
    first question, where training looks for it (a sample holding another is not trainable)."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


@dataclass
class VqaResult:
    out: Path
    samples: int = 0
    questions: int = 0
    missing_image: list[str] = field(default_factory=list)  # image names not found
    missing_questions: int = 0  # questions left out with them
    unreadable: list[str] = field(default_factory=list)  # image files that are no picture
    unreadable_questions: int = 0  # questions left out with them
    no_answer: int = 0  # questions whose answer normalises to nothing
    no_question: int = 0  # open questions of no text (or only the image placeholder)

    def summary(self) -> str:
        wrote = (
            f"wrote {self.samples} conversations ({self.questions} questions, one conversation "
            f"per image) to {self.out}"
        )
        return "\n".join([wrote, *self.left_out()])

    def left_out(self) -> list[str]:
        """A line for each reason questions were left out, with how many."""
        lines = []
        if self.missing_questions:
            lines.append(
                f"left out {self.missing_questions} questions about {len(self.missing_image)} "
                f"images not in the image dir (e.g. {self.missing_image[0]})"
            )
        if self.unreadable_questions:
            lines.append(
                f"left out {self.unreadable_questions} questions about {len(self.unreadable)} "
                f"images that cannot be read (e.g. {self.unreadable[0]})"
            )
        if self.no_answer:
            lines.append(f"left out {self.no_answer} questions with an empty answer")
        if self.no_question:
            lines.append(f"left out {self.no_question} empty open questions")
        return lines


def convert_vqa(
    path: str | Path,
    format: str,
    images: str | Path,
    out: str | Path,
    annotations: str | Path | None = None,
    progress: bool = True,
) -> VqaResult:
    """Write the VQA file's questions as LLaVA JSON conversations, one per image.

    progress: a bar over the questions while their images are looked for and their headers
    read (COCO's 82k pictures, on a cold disk, take minutes), on a terminal only.
    """
    path, image_dir, out = Path(path), Path(images), Path(out)
    if format not in FORMATS:
        raise LlavaEdgeError(f"unknown VQA format {format!r}; choose from {', '.join(FORMATS)}")
    if not path.is_file():
        raise LlavaEdgeError(f"{format} file {path} does not exist")
    if annotations is not None and format != "vqav2":
        raise LlavaEdgeError(
            f"--annotations is vqav2's answers file; {format} keeps its answers in {path.name}"
        )
    if not image_dir.is_dir():
        raise LlavaEdgeError(f"image dir {image_dir} does not exist")
    if out.is_dir():
        raise LlavaEdgeError(f"--out {out} is a directory; name the JSON file to write")
    answers = annotations or (_vqav2_annotations(path) if format == "vqav2" else None)
    if any(Path(i).resolve() == out.resolve() for i in (path, answers) if i is not None):
        raise LlavaEdgeError(f"--out {out} is the {format} file it reads; write elsewhere")
    if format == "vqav2":
        questions = read_vqav2(path, annotations)
    elif format == "gqa":
        questions = read_gqa(path)
    elif format == "textvqa":
        questions = read_textvqa(path)
    else:
        questions = read_jsonl(path)

    result = VqaResult(out)
    groups: dict[str, list[Question]] = {}
    found: dict[tuple[str, ...], str | None] = {}
    unreadable: set[str] = set()
    checking = terminal_bar(questions, progress, desc="checking images", unit=" questions")
    for question in checking:
        if question.images not in found:
            found[question.images] = next(
                (name for name in question.images if (image_dir / name).is_file()), None
            )
            if found[question.images] is None:
                result.missing_image.append(question.images[0])
            elif not _readable(image_dir / found[question.images]):
                unreadable.add(found[question.images])
                result.unreadable.append(found[question.images])
        image = found[question.images]
        if image is None:
            result.missing_questions += 1
        elif image in unreadable:  # a zero-byte frame: training could not read it either
            result.unreadable_questions += 1
        elif not question.choices and not without_placeholder(question.question):
            result.no_question += 1  # an open question of no text: nothing is asked
        elif not question.answer:
            result.no_answer += 1
        else:
            groups.setdefault(image, []).append(question)
    if not groups:
        _nothing_to_write(path, image_dir, result)
    if out.exists():  # only a file already there can be one of the pictures
        for image in groups:
            if (image_dir / image).resolve() == out.resolve():
                raise LlavaEdgeError(
                    f"--out {out} is the image {image} of {path}'s questions; write elsewhere"
                )
    ids = sample_ids(list(groups))
    samples = [
        {"id": f"{format}-{ids[image]}", "image": image, "conversations": _conversation(group)}
        for image, group in groups.items()
    ]
    result.samples = write_samples(out, samples)
    result.questions = sum(len(g) for g in groups.values())
    return result


def _nothing_to_write(path: Path, image_dir: Path, result: VqaResult) -> None:
    """Say why no question of the file can be written, by what left them out."""
    causes = {
        "missing": result.missing_questions,
        "unreadable": result.unreadable_questions,
        "empty": result.no_answer,
        "no question": result.no_question,
    }
    given = [cause for cause, count in causes.items() if count]
    if not given:
        raise LlavaEdgeError(f"{path} holds no questions; check the file")
    if given == ["missing"]:
        raise LlavaEdgeError(
            f"no question of {path} has its image in {image_dir} (looked for "
            f"{result.missing_image[0]}); check --images"
        )
    if given == ["unreadable"]:
        raise LlavaEdgeError(
            f"no image of {path} in {image_dir} can be read (e.g. {result.unreadable[0]}); "
            "check the image files"
        )
    if given == ["empty"]:
        raise LlavaEdgeError(f"every answer in {path} is empty once normalised; check the answers")
    raise LlavaEdgeError(f"no question of {path} can be written: {'; '.join(result.left_out())}")


def _conversation(group: list[Question]) -> list[dict]:
    """The questions about one image as LLaVA turns; a gpt turn whose question has several
    annotators' answers lists them as "answers", which `eval` scores by VQA accuracy and
    training ignores (it trains on "value")."""
    turns = conversation([(q.prompt(), q.answer) for q in group])
    for question, answer in zip(group, turns[1::2], strict=True):
        if question.references:
            answer["answers"] = list(question.references)
    return turns


def sample_ids(images: list[str]) -> dict[str, str]:
    """Each image's id: its name without the extension (`eval`'s answers and training's errors
    name samples by it), or its whole name where that would be another image's id too (a.jpg
    beside a.png; a.jpg.png beside a.jpg). Image names are unique, so the ids are."""
    stems = {image: Path(image).with_suffix("").as_posix() for image in images}
    counts = Counter(stems.values())
    names = set(images)
    return {
        image: stem if counts[stem] == 1 and (stem == image or stem not in names) else image
        for image, stem in stems.items()
    }


def _readable(path: Path) -> bool:
    """Whether the file has a picture's header (as training checks each image)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 (reading the header is the check)
    except Exception:  # PIL raises many types for unreadable files
        return False
    return True


# ---- the formats -----------------------------------------------------------------------------


def read_vqav2(path: Path, annotations: str | Path | None) -> list[Question]:
    document = _load(path, "vqav2")
    if not isinstance(document, dict) or not isinstance(document.get("questions"), list):
        raise _not(path, "vqav2", "a questions file is an object with a 'questions' list")
    answers_path = Path(annotations) if annotations else _vqav2_annotations(path)
    if answers_path is None or not answers_path.is_file():
        looked = f"{answers_path} does not exist" if answers_path else "none was given"
        raise LlavaEdgeError(
            f"vqav2 keeps its answers in an annotations file; {looked} (pass --annotations FILE)"
        )
    answer_doc = _load(answers_path, "vqav2")
    if not isinstance(answer_doc, dict) or not isinstance(answer_doc.get("annotations"), list):
        raise _not(answers_path, "vqav2", "an annotations file has an 'annotations' list")
    answers = {}
    for entry in answer_doc["annotations"]:
        answer = _get(entry, "multiple_choice_answer", str, answers_path, "vqav2")
        given = entry.get("answers")
        annotators = (
            [a.get("answer") for a in given if isinstance(a, dict)]
            if isinstance(given, list)
            else []
        )
        references = tuple(_normalised(annotators, normalize_vqa))
        answers[entry.get("question_id")] = normalize_vqa(answer), references
    subtype = document.get("data_subtype")
    questions = []
    for entry in document["questions"]:
        image_id = _get(entry, "image_id", int, path, "vqav2")
        if entry.get("question_id") not in answers:
            raise LlavaEdgeError(
                f"{answers_path} has no answer to question {entry.get('question_id')} of {path}; "
                "pass the annotations file of the same split"
            )
        names = [f"{image_id:012d}.jpg"]
        if isinstance(subtype, str):
            names.insert(0, f"COCO_{subtype}_{image_id:012d}.jpg")
        answer, references = answers[entry["question_id"]]
        question = _get(entry, "question", str, path, "vqav2").strip()
        questions.append(Question(tuple(names), question, answer, references=references))
    return questions


def _vqav2_annotations(questions: Path) -> Path | None:
    """v2_OpenEnded_mscoco_train2014_questions.json -> v2_mscoco_train2014_annotations.json"""
    name = questions.name.replace("OpenEnded_", "").replace("_questions", "_annotations")
    return questions.with_name(name) if name != questions.name else None


def read_gqa(path: Path) -> list[Question]:
    document = _load(path, "gqa")
    if not isinstance(document, dict) or not all(isinstance(v, dict) for v in document.values()):
        raise _not(path, "gqa", "an object mapping question ids to {imageId, question, answer}")
    return [
        Question(
            (f"{_get(entry, 'imageId', str, path, 'gqa')}.jpg",),
            _get(entry, "question", str, path, "gqa").strip(),
            normalize_short(without_placeholder(_get(entry, "answer", str, path, "gqa"))),
        )
        for entry in document.values()
    ]


def read_textvqa(path: Path) -> list[Question]:
    document = _load(path, "textvqa")
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise _not(path, "textvqa", "an object with a 'data' list")
    questions = []
    for entry in document["data"]:
        answers = _get(entry, "answers", list, path, "textvqa")
        normalised = _normalised(answers, functools.partial(normalize_vqa, evalai=True))
        # The most common answer; among equally common ones, the first given.
        answer = Counter(normalised).most_common(1)[0][0] if normalised else ""
        questions.append(
            Question(
                (f"{_get(entry, 'image_id', str, path, 'textvqa')}.jpg",),
                _get(entry, "question", str, path, "textvqa").strip(),
                answer,
                references=tuple(normalised),
            )
        )
    return questions


def _normalised(answers: list[Any], normalize: Callable[[str], str]) -> list[str]:
    """The annotators' text answers, normalised; those left empty go (they match nothing, and
    `eval` refuses an empty reference)."""
    return [form for form in (normalize(a) for a in answers if isinstance(a, str)) if form]


def read_jsonl(path: Path) -> list[Question]:
    questions = []
    for number, line in enumerate(read_text(path).split("\n"), 1):  # U+2028 is no line end
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlavaEdgeError(f"{where}: not valid JSON ({e.msg})") from None
        image = _get(entry, "image", str, where, "jsonl")
        question = _get(entry, "question", str, where, "jsonl").strip()
        answer = entry.get("answer") if isinstance(entry, dict) else None
        choices = entry.get("choices")
        if choices is None:
            if not isinstance(answer, str | int | float) or isinstance(answer, bool):
                raise LlavaEdgeError(f"{where}: 'answer' must be text")
            answer = normalize_short(without_placeholder(str(answer)))
            questions.append(Question((image,), question, answer))
            continue
        if (
            not isinstance(choices, list)
            or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) and without_placeholder(c) for c in choices)
        ):
            raise LlavaEdgeError(f"{where}: 'choices' must be a list of 2 to 26 texts")
        choices = tuple(without_placeholder(c) for c in choices)
        questions.append(Question((image,), question, _letter(answer, choices, where), choices))
    return questions


def _letter(answer: Any, choices: tuple[str, ...], where: str) -> str:
    """The letter of the right choice, given as the letter, the choice's text or its index."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return LETTERS[answer]
    if isinstance(answer, str):
        text = answer.strip()
        if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
            return text.upper()
        for i, choice in enumerate(choices):
            if normalize_short(choice) == normalize_short(text):
                return LETTERS[i]
    raise LlavaEdgeError(
        f"{where}: answer {answer!r} is none of the choices (give a letter, a choice or its index)"
    )


def _load(path: Path, format: str) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise _not(path, format, f"not valid JSON ({e.msg} at line {e.lineno})") from None


def _get(entry: Any, key: str, kind: type, where: Path | str, format: str) -> Any:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _not(where, format, f"an entry has no {kind.__name__} '{key}'")
    return value


def _not(where: Path | str, format: str, why: str) -> LlavaEdgeError:
    return LlavaEdgeError(f"{where} is not a {format} file: {why}; check --format")
