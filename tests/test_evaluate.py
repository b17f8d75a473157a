"""`llava-edge eval` on the tiny model: where the answers may go, and what --skip-bad leaves out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error
from PIL import Image

from llava_edge.cli import main as cli
from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Pipeline
from llava_edge.training.evaluate import evaluate


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
        err = one_line_error(capsys.readouterr().err)
        assert "write the answers elsewhere" in err, answers
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


def test_data_with_nothing_to_ask_is_refused_before_the_model_loads(
    tiny_model_dir, world, capsys, monkeypatch
):
    """An empty data file, and one whose every sample --skip-bad leaves out (a missing image),
    are said in one line before the model loads (minutes for a 7B one)."""
    data, images = world["data"], world["images"]
    monkeypatch.setattr(Pipeline, "load", staticmethod(lambda *a, **k: pytest.fail("loaded")))
    data.write_text("[]")
    assert _eval(tiny_model_dir, data, images) == 1
    assert "has no question to evaluate" in one_line_error(capsys.readouterr().err)
    data.write_text(json.dumps([_sample("gone", "missing.png")]))
    assert _eval(tiny_model_dir, data, images, "--skip-bad") == 1
    err = one_line_error(capsys.readouterr().err)
    assert "every sample" in err and "missing.png does not exist" in err


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


def _hand_counted(world, monkeypatch, match: str):
    """Four rounds in three samples, each asked on its own with its sample's image (none for a
    text-only sample), scored with `match`."""
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
            "How many?": ("two", "eos"),  # a number word: right only with VQA's rules
            "Shade?": (" GREY ", "eos"),  # right
            "Capital of France?": ("Paris", "length"),  # right, though cut at the limit
        }
    )
    monkeypatch.setattr(Pipeline, "load", staticmethod(lambda *a, **k: runtime))
    result = evaluate("model", data, images, answers=root / "hand.answers.jsonl",
                      max_new_tokens=3, progress=False, match=match)  # fmt: skip
    assert runtime.asked == [
        (images / "a.png", "What colour is it?", 3),
        (images / "a.png", "How many?", 3),
        (images / "b.png", "Shade?", 3),
        (None, "Capital of France?", 3),
    ]
    rows = [json.loads(line) for line in (root / "hand.answers.jsonl").read_text().splitlines()]
    # docs/training.md: the fields of each line
    fields = {"id", "turn", "question", "answer", "prediction", "score", "correct", "finish"}
    assert all(set(r) == fields for r in rows), rows
    assert (rows[1]["question"], rows[1]["answer"], rows[1]["prediction"]) == (
        "How many?",
        "2",
        "two",
    )
    assert [r["finish"] for r in rows] == ["eos", "eos", "eos", "length"]
    return result, rows


def test_exact_accuracy_against_a_hand_counted_case(world, monkeypatch):
    """Three match once case, spaces and a final full stop are set aside (one of them cut at
    the token limit, and counted as cut); 'two' against '2' is wrong. Accuracy 3/4."""
    result, rows = _hand_counted(world, monkeypatch, "exact")
    assert (result.correct, result.total, result.cut, result.score) == (3, 4, 1, 3)
    assert result.accuracy == 0.75
    assert [(r["id"], r["turn"], r["correct"], r["score"]) for r in rows] == [
        ("a", 0, True, 1), ("a", 1, False, 0), ("b", 0, True, 1), ("t", 0, True, 1)
    ]  # fmt: skip


def test_vqa_accuracy_against_a_hand_counted_case(world, monkeypatch):
    """The default matching: VQA's rules turn 'two' into '2', so all four are right."""
    result, rows = _hand_counted(world, monkeypatch, "vqa")
    assert (result.correct, result.total, result.cut, result.accuracy) == (4, 4, 1, 1.0)
    assert [r["correct"] for r in rows] == [True] * 4


def test_vqa_answer_forms():
    """The VQA evaluation's rules (visualqa.org/evaluation.html), on both sides of a match."""
    from llava_edge.training.evaluate import answer_form

    same = [
        ("Cat.", "cat"),
        ("Two", "2"),
        ("a dog", "dog"),
        ("The red one!", "red 1"),
        ("dont", "don't"),
        ("100,978", "100978"),
        ("left-hand", "left hand"),
        ("Straße", "STRASSE"),  # Unicode case-folding, as the exact matching does
        ("Coca Cola's", "coca cola 's"),  # EvalAI's tokenising: TextVQA's references
    ]
    for prediction, reference in same:
        assert answer_form(prediction) == answer_form(reference), (prediction, reference)
    different = [("3.5", "35"), ("2:50 pm", "250 pm"), ("girl's", "girls"), ("no", "none")]
    for prediction, reference in different:
        assert answer_form(prediction) != answer_form(reference), (prediction, reference)
    # an answer VQA's rules would leave empty, a choice's letter, is kept: "A" is not "B"
    assert answer_form("A.") == answer_form("a") != answer_form("B")
    assert answer_form("Two", "exact") != answer_form("2", "exact")


def test_vqa_accuracy_over_ten_annotators():
    """min(matches / 3, 1) over each nine of the ten answers, averaged (the VQA evaluation's
    leave-one-out), counted by hand; one reference is a plain match."""
    from llava_edge.training.evaluate import vqa_accuracy

    def ten(matching: int) -> list[str]:
        return ["cat"] * matching + ["dog"] * (10 - matching)

    assert vqa_accuracy("cat", ten(0)) == 0
    assert vqa_accuracy("cat", ten(1)) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("cat", ten(2)) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("cat", ten(3)) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
    assert vqa_accuracy("cat", ten(4)) == vqa_accuracy("cat", ten(10)) == 1
    assert vqa_accuracy("cat", ["cat"]) == 1 and vqa_accuracy("cat", ["dog"]) == 0


def test_several_reference_answers_score_vqa_accuracy(tiny_model_dir, world, capsys):
    """A gpt turn's "answers" (VQAv2's ten) score the prediction by VQA accuracy: the tiny
    model's own answer given by 2 of 10 annotators scores 0.6; a list that is not texts is a
    bad sample, in one line."""
    data, images = world["data"], world["images"]
    with Pipeline.load(tiny_model_dir) as pipe:
        own = pipe.answer(images / "a.png", "What colour is it?", max_new_tokens=2).text
    samples = json.loads(data.read_text())
    annotators = [own.upper(), f"{own}."] + ["zebra crossing"] * 8
    samples[0]["conversations"][1]["answers"] = annotators
    data.write_text(json.dumps(samples))
    answers = world["root"] / "answers.jsonl"
    assert _eval(tiny_model_dir, data, images, "--answers", str(answers)) == 0
    out = capsys.readouterr().out
    assert "VQA accuracy 30.0% (0.60/2, 0 in full)" in out, out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert rows[0]["answers"] == annotators and rows[0]["score"] == pytest.approx(0.6)
    assert "answers" not in rows[1] and rows[1]["score"] == 0
    # docs/training.md: training reads the turn's value alone
    from llava_edge.training.data import parse_sample

    assert parse_sample(samples[0], 0).turns == [("What colour is it?", "grey")]

    for listed in (["cat", 3], []):  # an empty list is said to be one, not a wrong type
        samples[0]["conversations"][1]["answers"] = listed
        data.write_text(json.dumps(samples))
        assert _eval(tiny_model_dir, data, images, "--answers", str(answers)) == 1
        err = one_line_error(capsys.readouterr().err)
        assert "sample a: round 0's 'answers' must be a list of one or more texts" in err


def test_the_answers_go_beside_the_data_file_by_default(tiny_model_dir, world, capsys):
    """Without --answers, `data.json`'s answers are `data.answers.jsonl` beside it, as
    docs/training.md and `eval --help` say."""
    assert _eval(tiny_model_dir, world["data"], world["images"]) == 0
    assert "data.answers.jsonl" in capsys.readouterr().out
    assert sorted(p.name for p in world["root"].iterdir()) == [
        "data.answers.jsonl",
        "data.json",
        "images",
    ]


def test_the_check_of_the_data_shows_its_progress(tiny_model_dir, world, capsys, monkeypatch):
    """Every sample is checked before the model loads (its shape, references, image file): a
    VQAv2-sized file takes a while, shown on a progress bar as `train` shows it, and left off
    with progress=False."""
    monkeypatch.setattr(Pipeline, "load", staticmethod(lambda *a, **k: pytest.fail("loaded")))
    data, images = world["data"], world["images"]
    data.write_text(json.dumps([_sample("a", "a.png"), _sample("gone", "missing.png")]))
    assert _eval(tiny_model_dir, data, images) == 1
    err = capsys.readouterr().err
    assert "checking data.json: " in err
    assert "missing.png does not exist" in one_line_error(err)
    with pytest.raises(LlavaEdgeError, match="missing.png does not exist"):
        evaluate(tiny_model_dir, data, images, progress=False)
    assert capsys.readouterr().err == ""


def test_limit_scores_the_first_samples_and_reads_no_further(tiny_model_dir, world, capsys):
    data, images = world["data"], world["images"]
    records = json.loads(data.read_text())
    data.write_text(json.dumps([*records, _sample("gone", "missing.png")]))
    assert _eval(tiny_model_dir, data, images, "--limit", "2") == 0
    capsys.readouterr()
    answers = data.with_name("data.answers.jsonl").read_text().splitlines()
    assert [json.loads(row)["id"] for row in answers] == ["a", "b"]
    assert _eval(tiny_model_dir, data, images, "--limit", "0") == 1
    assert "--limit must be a positive number of samples, got 0" in one_line_error(
        capsys.readouterr().err
    )
