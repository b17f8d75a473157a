"""`llava-edge eval` on the tiny model: where the answers may go, and what --skip-bad leaves out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_edge.cli import main as cli
from llava_edge.runtime import Pipeline


def _sample(sample_id: str, image: str, question: str = "What colour is it?") -> dict:
    return {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": "grey"},
        ],
    }


@pytest.fixture
def world(tmp_path) -> dict[str, Path]:
    """Two readable pictures and a data file asking about each."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(images / name)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_sample("a", "a.png"), _sample("b", "b.png")]))
    return {"root": tmp_path, "images": images, "data": data}


def _eval(model: Path, data: Path, images: Path, *extra: str) -> int:
    argv = ["eval", str(model), "--data", str(data), "--images", str(images)]
    return cli([*argv, "--max-new-tokens", "2", *extra])


def test_answers_never_replace_the_data_or_an_image(tiny_model_dir, world, capsys):
    data, images = world["data"], world["images"]
    manifest = tiny_model_dir / "manifest.json"
    before = {p: p.read_bytes() for p in (data, images / "a.png", images / "b.png", manifest)}
    spellings = [
        data,
        world["root"] / "images" / ".." / "data.json",
        manifest,
        images / "b.png",
    ]
    for answers in spellings:
        assert _eval(tiny_model_dir, data, images, "--answers", str(answers)) == 1
        err = capsys.readouterr().err
        assert "write the answers elsewhere" in err and "Traceback" not in err, answers
        assert len(err.strip().splitlines()) == 1
    assert "sample b's image" in err
    assert {p: p.read_bytes() for p in before} == before


def test_the_answers_path_is_checked_before_the_run(tiny_model_dir, world, capsys, monkeypatch):
    data, images = world["data"], world["images"]
    loaded = []
    real_load = Pipeline.load

    def load(*args, **kwargs):
        loaded.append(1)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(Pipeline, "load", staticmethod(load))
    for answers, problem in [
        (images, "is a directory"),
        (world["root"] / "missing" / "answers.jsonl", "does not exist"),
        (data / "answers.jsonl", "is a file, not a folder"),
    ]:
        assert _eval(tiny_model_dir, data, images, "--answers", str(answers)) == 1
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, answers
        assert len(err.strip().splitlines()) == 1
    assert loaded == []
    assert not (world["root"] / "missing").exists()


def test_a_failed_run_keeps_the_previous_answers(tiny_model_dir, world, capsys):
    data, images = world["data"], world["images"]
    answers = world["root"] / "answers.jsonl"
    answers.write_text("earlier answers\n")
    (images / "b.png").write_text("not a picture")  # found at the start, refused in the run
    assert _eval(tiny_model_dir, data, images, "--answers", str(answers)) == 1
    assert "sample b:" in capsys.readouterr().err
    assert answers.read_text() == "earlier answers\n"
    assert sorted(p.name for p in world["root"].iterdir()) == [
        "answers.jsonl",
        "data.json",
        "images",
    ]


def test_skip_bad_leaves_out_what_the_runtime_refuses(tiny_model_dir, world, capsys):
    """An image that is no picture and a prompt over --max-prompt-tokens are found only when
    the sample is asked: without --skip-bad they name the sample and stop the run; with it they
    are counted and the rest is scored. A sample counts whole or not at all: the long question
    is its second round, and its first round's answer is not in the file."""
    data, images = world["data"], world["images"]
    (images / "broken.png").write_text("not a picture")
    long_question = "What colour is it? " * 40
    samples = json.loads(data.read_text())
    long = _sample("long", "a.png")
    long["conversations"] += [
        {"from": "human", "value": long_question},
        {"from": "gpt", "value": "grey"},
    ]
    samples += [_sample("broken", "broken.png"), long]
    data.write_text(json.dumps(samples))
    answers = world["root"] / "answers.jsonl"

    # The limit: a short question's prompt fits, the long one's does not.
    assert _eval(tiny_model_dir, data, images, "--max-prompt-tokens", "1") == 1
    short = int(re.search(r"the prompt is (\d+) tokens", capsys.readouterr().err).group(1))
    limit = ["--max-prompt-tokens", str(short + 20), "--answers", str(answers)]

    assert _eval(tiny_model_dir, data, images, *limit) == 1
    err = capsys.readouterr().err
    assert "sample broken:" in err and "--skip-bad" in err and "Traceback" not in err
    assert not answers.exists()

    samples[2], samples[3] = samples[3], samples[2]  # the long prompt first
    data.write_text(json.dumps(samples))
    assert _eval(tiny_model_dir, data, images, *limit) == 1
    assert "sample long:" in capsys.readouterr().err

    assert _eval(tiny_model_dir, data, images, *limit, "--skip-bad") == 0
    assert "/2) (2 bad sample(s) skipped)" in capsys.readouterr().out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]


def test_a_reference_with_nothing_to_match_is_a_bad_sample(tiny_model_dir, world, capsys):
    """A reference that is empty once normalised ('', ' . ') would score an empty prediction,
    a model that says nothing, as right: the sample is refused before the run, or counted out
    with --skip-bad."""
    data, images = world["data"], world["images"]
    samples = json.loads(data.read_text())
    samples[1]["conversations"][1]["value"] = " . "
    data.write_text(json.dumps(samples))
    answers = world["root"] / "answers.jsonl"
    assert _eval(tiny_model_dir, data, images, "--answers", str(answers)) == 1
    err = capsys.readouterr().err
    assert "sample b:" in err and "empty" in err and "--skip-bad" in err
    assert "Traceback" not in err and not answers.exists()
    assert _eval(tiny_model_dir, data, images, "--answers", str(answers), "--skip-bad") == 0
    assert "/1) (1 bad sample(s) skipped)" in capsys.readouterr().out
    assert [json.loads(line)["id"] for line in answers.read_text().splitlines()] == ["a"]


def test_answers_match_however_their_unicode_is_spelled():
    from llava_edge.training.evaluate import normalize

    # composed and decomposed accents, and case beyond ASCII (German sharp s, final sigma)
    assert normalize("Cafe\u0301.") == normalize(" café ")
    assert normalize("STRASSE") == normalize("Straße")
    assert normalize("ΟΔΟΣ") == normalize("οδος") == normalize("οδος")
    assert normalize("3.5") == "3.5" and normalize("Yes.") == "yes"


class _Scripted:
    """A stand-in runtime answering from a table, recording what it was asked."""

    def __init__(self, table: dict[str, tuple[str, str]]):
        self.table = table
        self.asked: list[tuple] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def answer(self, image, question, max_new_tokens):
        from llava_edge.runtime.answer import Answer

        self.asked.append((image, question, max_new_tokens))
        text, finish = self.table[question]
        return Answer(text, [], [], finish)


def test_accuracy_against_a_hand_counted_case(world, monkeypatch):
    """Four rounds in three samples, each asked on its own with its sample's image (none for a
    text-only sample): three match once normalised (one of them cut at the token limit, and
    counted as cut), one is wrong. Accuracy 3/4."""
    from llava_edge.runtime import Pipeline
    from llava_edge.training.evaluate import evaluate

    root, images = world["root"], world["images"]
    two_rounds = _sample("a", "a.png", "What colour is it?")
    two_rounds["conversations"] += [
        {"from": "human", "value": "How many?"},
        {"from": "gpt", "value": "2"},
    ]
    text_only = {
        "id": "t",
        "conversations": [
            {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris"},
        ],
    }
    data = root / "hand.json"
    data.write_text(json.dumps([two_rounds, _sample("b", "b.png", "Shade?"), text_only]))
    runtime = _Scripted(
        {
            "What colour is it?": ("Grey.", "eos"),  # right: case and full stop
            "How many?": ("two", "eos"),  # wrong: exact match, no number words
            "Shade?": (" GREY ", "eos"),  # right
            "Capital of France?": ("Paris", "length"),  # right, though cut at the limit
        }
    )
    monkeypatch.setattr(Pipeline, "load", staticmethod(lambda *a, **k: runtime))
    result = evaluate("model", data, images, answers=root / "hand.answers.jsonl",
                      max_new_tokens=3, progress=False)  # fmt: skip
    assert (result.correct, result.total, result.cut) == (3, 4, 1)
    assert result.accuracy == 0.75
    assert runtime.asked == [
        (images / "a.png", "What colour is it?", 3),
        (images / "a.png", "How many?", 3),
        (images / "b.png", "Shade?", 3),
        (None, "Capital of France?", 3),
    ]
    rows = [json.loads(line) for line in (root / "hand.answers.jsonl").read_text().splitlines()]
    assert [(r["id"], r["turn"], r["correct"]) for r in rows] == [
        ("a", 0, True), ("a", 1, False), ("b", 0, True), ("t", 0, True)
    ]  # fmt: skip
    # docs/training.md: the fields of each line
    fields = {"id", "turn", "question", "answer", "prediction", "correct", "finish"}
    assert all(set(r) == fields for r in rows), rows
    assert (rows[1]["question"], rows[1]["answer"], rows[1]["prediction"]) == (
        "How many?",
        "2",
        "two",
    )
    assert [r["finish"] for r in rows] == ["eos", "eos", "eos", "length"]
