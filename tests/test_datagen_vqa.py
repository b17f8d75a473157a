"""`llava-edge data vqa`: small files in each format, written from the formats' published
layouts, become LLaVA-1.5-style conversations (response-format prompts, answers normalised as
each format is scored, one conversation per image)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from llava_edge.cli import main as cli
from llava_edge.training.data import parse_sample
from llava_edge.training.datagen.vqa import convert_vqa, normalize_vqa

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def images(root, *names):
    folder = root / "images"
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8)).save(folder / name)
    return folder


def conversations(path):
    records = json.loads(path.read_text())
    for position, record in enumerate(records):
        parse_sample(record, position)  # trainable as written
    return {r["image"]: [t["value"] for t in r["conversations"]] for r in records}, records


def test_vqav2_questions_and_annotations(tmp_path, capsys):
    folder = images(tmp_path, "COCO_train2014_000000000009.jpg", "000000000025.jpg")
    questions = {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
        "data_subtype": "train2014", "license": {},
        "questions": [
            {"image_id": 9, "question": "How many dogs are there?", "question_id": 90},
            {"image_id": 25, "question": "What is the giraffe eating?", "question_id": 250},
            {"image_id": 9, "question": "Is it sunny?", "question_id": 91},
            {"image_id": 30, "question": "What color is the bus?", "question_id": 300},
        ],
    }  # fmt: skip

    def annotation(qid, image_id, answer):
        return {"question_id": qid, "image_id": image_id, "question_type": "what",
                "answer_type": "other", "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i}
                            for i in range(1, 11)]}  # fmt: skip

    annotations = {
        "info": {}, "license": {}, "data_subtype": "train2014",
        "annotations": [annotation(90, 9, "two"), annotation(250, 25, "The leaves."),
                        annotation(91, 9, "Yes!"), annotation(300, 30, "red")],
    }  # fmt: skip
    questions_file = tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json"
    questions_file.write_text(json.dumps(questions))
    (tmp_path / "answers.json").write_text(json.dumps(annotations))
    out = tmp_path / "vqav2.json"
    command = ["data", "vqa", str(questions_file), "--format", "vqav2", "--images", str(folder),
               "--out", str(out)]  # fmt: skip
    assert cli(command) == 1  # the annotations file is looked for beside, by its published name
    assert "v2_mscoco_train2014_annotations.json does not exist" in capsys.readouterr().err
    assert cli([*command, "--annotations", str(tmp_path / "answers.json")]) == 0
    first = out.read_bytes()
    (tmp_path / "answers.json").rename(tmp_path / "v2_mscoco_train2014_annotations.json")
    assert cli(command) == 0 and out.read_bytes() == first
    by_image, records = conversations(out)
    assert by_image == {
        "COCO_train2014_000000000009.jpg": [
            f"<image>\nHow many dogs are there?\n{SHORT}", "2", f"Is it sunny?\n{SHORT}", "yes",
        ],
        "000000000025.jpg": [f"<image>\nWhat is the giraffe eating?\n{SHORT}", "leaves"],
    }  # fmt: skip
    assert [r["id"] for r in records] == ["vqav2-COCO_train2014_000000000009", "vqav2-000000000025"]
    printed = capsys.readouterr().out
    assert "wrote 2 conversations (3 questions" in printed
    assert "left out 1 questions about 1 images not in the image dir" in printed


def test_gqa(tmp_path):
    folder = images(tmp_path, "2375429.jpg", "2417468.jpg")
    questions = {
        "02930152": {"semantic": [], "entailed": [], "equivalent": ["02930152"],
                     "question": "Is the sky dark?", "imageId": "2375429", "isBalanced": True,
                     "groups": {"global": None, "local": "06-sky_dark"},
                     "answer": "yes", "semanticStr": "select: sky->verify color: dark",
                     "annotations": {"answer": {}, "question": {"2": "486349"}, "fullAnswer": {}},
                     "types": {"detailed": "verifyAttr", "semantic": "attr",
                               "structural": "verify"},
                     "fullAnswer": "Yes, the sky is dark."},
        "07333408": {"question": "What is on the white wall?", "imageId": "2417468",
                     "answer": "Pipe.", "fullAnswer": "The pipe is on the wall."},
        "07333409": {"question": "Which side is the car on?", "imageId": "2375429",
                     "answer": "left"},
    }  # fmt: skip
    (tmp_path / "train_balanced_questions.json").write_text(json.dumps(questions))
    out = tmp_path / "gqa.json"
    result = convert_vqa(tmp_path / "train_balanced_questions.json", "gqa", folder, out)
    by_image, _ = conversations(out)
    assert by_image == {
        "2375429.jpg": [f"<image>\nIs the sky dark?\n{SHORT}", "yes",
                        f"Which side is the car on?\n{SHORT}", "left"],
        "2417468.jpg": [f"<image>\nWhat is on the white wall?\n{SHORT}", "pipe"],
    }  # fmt: skip
    assert (result.samples, result.questions) == (2, 3)


def test_textvqa_takes_the_most_common_normalised_answer(tmp_path):
    folder = images(tmp_path, "0054c91397f2fe05.jpg", "011e7e629fb9ae7b.jpg")
    data = {
        "dataset_type": "train", "dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [
            {"question": "what is the brand of this camera?", "image_id": "0054c91397f2fe05",
             "image_classes": ["Camera"], "flickr_original_url": "", "flickr_300k_url": "",
             "image_width": 1024, "image_height": 664, "question_tokens": [],
             "question_id": 34602, "set_name": "train",
             "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital",
                         "dakota", "dakota", "Dakota.", "dakota digital", "dakota", "dakota"]},
            {"question": "what does the sign say?", "image_id": "011e7e629fb9ae7b",
             "question_id": 34603, "set_name": "train",
             "answers": ["Stop", "STOP", "stop!", "stop sign", "?", "the stop", "go", "go",
                         "go", "stop"]},
        ],
    }  # fmt: skip
    (tmp_path / "TextVQA_0.5.1_train.json").write_text(json.dumps(data))
    out = tmp_path / "textvqa.json"
    convert_vqa(tmp_path / "TextVQA_0.5.1_train.json", "textvqa", folder, out)
    by_image, records = conversations(out)
    assert by_image == {
        "0054c91397f2fe05.jpg": [f"<image>\nwhat is the brand of this camera?\n{SHORT}", "dakota"],
        "011e7e629fb9ae7b.jpg": [f"<image>\nwhat does the sign say?\n{SHORT}", "stop"],
    }
    # every annotator's answer, normalised, for eval's VQA accuracy ("?" normalises to nothing)
    assert [r["conversations"][1]["answers"] for r in records] == [
        ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota",
         "dakota", "dakota digital", "dakota", "dakota"],
        ["stop", "stop", "stop", "stop sign", "stop", "go", "go", "go", "stop"],
    ]  # fmt: skip


def test_jsonl_with_short_answers_and_multiple_choice(tmp_path):
    folder = images(tmp_path, "bay.png", "dock.png")
    lines = [
        {"image": "bay.png", "question": "How many robots are charging?", "answer": 3},
        {"image": "dock.png", "question": "Which tool is on the bench?",
         "choices": ["wrench", "hammer", "saw"], "answer": "Hammer"},
        {"image": "bay.png", "question": "Is the door open?", "answer": "Yes."},
        {"image": "dock.png", "question": "What is the floor made of?",
         "choices": ["wood", "concrete"], "answer": "b"},
        {"image": "dock.png", "question": "Which light is on?",
         "choices": ["red", "green"], "answer": 0},
    ]  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "qa.json"
    convert_vqa(tmp_path / "qa.jsonl", "jsonl", folder, out)
    by_image, records = conversations(out)
    assert by_image == {
        "bay.png": [f"<image>\nHow many robots are charging?\n{SHORT}", "3",
                    f"Is the door open?\n{SHORT}", "yes"],
        "dock.png": [f"<image>\nWhich tool is on the bench?\nA. wrench\nB. hammer\nC. saw\n{LETTER}",
                     "B",
                     f"What is the floor made of?\nA. wood\nB. concrete\n{LETTER}", "B",
                     f"Which light is on?\nA. red\nB. green\n{LETTER}", "A"],
    }  # fmt: skip
    assert [r["id"] for r in records] == ["jsonl-bay", "jsonl-dock"]


@pytest.mark.parametrize(
    "answer, evalai, expected",
    [
        ("Two", False, "2"),
        ("The dog.", False, "dog"),
        ("an apple", False, "apple"),
        ("dont know", False, "don't know"),
        ("yes, it is", False, "yes it is"),
        ("1,000", False, "1000"),
        ("3.5", False, "3.5"),
        ("black/white", False, "black white"),
        ("t-shirt", False, "t shirt"),
        ("well", False, "well"),  # not "we'll"
        ("Hes RUNNING\n", False, "he's running"),
        ("Man's hat?", True, "man 's hat"),
        ("1,000", True, "1000"),
    ],
)
def test_vqa_answer_normalisation(answer, evalai, expected):
    assert normalize_vqa(answer, evalai=evalai) == expected


@pytest.mark.parametrize(
    "format, content, message",
    [
        ("gqa", '{"data": [1]}', "is not a gqa file"),
        ("textvqa", '{"questions": []}', "is not a textvqa file: an object with a 'data' list"),
        ("vqav2", '{"02930152": {"imageId": "1"}}', "is not a vqav2 file"),
        ("vqav2", '{"questions": []', "is not a vqav2 file: not valid JSON"),
        ("jsonl", '{"image": "a.png", "question": "q"}', "'answer' must be text"),
        ("jsonl", '{"image": "a.png", "question": "q", "choices": ["x"], "answer": "A"}',
         "'choices' must be a list of 2 to 26 texts"),
        ("jsonl", '{"image": "a.png", "question": "q", "choices": ["x", "y"], "answer": "z"}',
         "answer 'z' is none of the choices"),
        ("jsonl", '{"image": "b.png", "question": "q", "answer": "x"}',
         "no question of .* has its image in"),
        ("vqav2", '{"data_subtype": "val2014", "questions": []}',
         "keeps its answers in an annotations file; none was given"),
        ("gqa --annotations", '{"1": {"imageId": "a", "question": "q", "answer": "x"}}',
         "--annotations is vqav2's answers file; gqa keeps its answers in questions.json"),
    ],
)  # fmt: skip
def test_bad_vqa_files_are_one_line_errors(tmp_path, capsys, format, content, message):
    import re

    folder = images(tmp_path, "a.png")
    path = tmp_path / "questions.json"
    path.write_text(content)
    format, *more = format.split()
    if more:  # an option the format does not take
        more.append(str(path))
    code = cli(["data", "vqa", str(path), "--format", format, "--images", str(folder),
                "--out", str(tmp_path / "out.json"), *more])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("format", ["jsonl", "gqa"])
def test_a_vqa_file_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys, format):
    folder = images(tmp_path, "a.png")
    path = tmp_path / "questions.json"
    line = {"image": "a.png", "question": "Qu'est-ce que c'est ?", "answer": "caf\xe9"}
    content = json.dumps(line if format == "jsonl" else {"1": {**line, "imageId": "a"}})
    path.write_bytes(content.replace("\\u00e9", "\xe9").encode("latin-1"))
    code = cli(["data", "vqa", str(path), "--format", format, "--images", str(folder),
                "--out", str(tmp_path / "out.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "is not UTF-8 text" in err, err


@pytest.mark.parametrize("out", ["questions", "annotations"])
def test_vqa_does_not_write_over_the_file_it_reads(tmp_path, capsys, out):
    folder = images(tmp_path, "COCO_val2014_000000000001.jpg")
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    answers = tmp_path / "v2_mscoco_val2014_annotations.json"  # found beside the questions
    question = {"image_id": 1, "question": "What is it?", "question_id": 10}
    questions.write_text(json.dumps({"data_subtype": "val2014", "questions": [question]}))
    answers.write_text(json.dumps({"annotations": [{"question_id": 10,
                                                    "multiple_choice_answer": "cart"}]}))  # fmt: skip
    target = questions if out == "questions" else answers
    before = target.read_bytes()
    code = cli(["data", "vqa", str(questions), "--format", "vqav2", "--images", str(folder),
                "--out", str(target)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "is the vqav2 file it reads" in err, err
    assert target.read_bytes() == before


def test_vqa_does_not_write_over_an_image_it_asks_about(tmp_path, capsys):
    folder = images(tmp_path, "a.png", "b.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"image": f"{n}.png", "question": "Q?", "answer": "x"}) + "\n" for n in "ab"
        )
    )
    before = (folder / "b.png").read_bytes()
    code = cli(["data", "vqa", str(questions), "--format", "jsonl", "--images", str(folder),
                "--out", str(folder / "b.png")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "is the image b.png of" in err, err
    assert (folder / "b.png").read_bytes() == before


def test_images_of_one_name_in_two_folders_get_their_own_ids(tmp_path):
    """Cameras often number their frames alike: aisle/0001.jpg and dock/0001.jpg are two
    samples, and `eval`'s answers and training's errors name a sample by its id."""
    folder = images(tmp_path)
    for camera in ("aisle", "dock"):
        (folder / camera).mkdir()
        Image.new("RGB", (8, 8)).save(folder / camera / "0001.png")
    lines = [{"image": f"{camera}/0001.png", "question": "Is it clear?", "answer": "yes"}
             for camera in ("aisle", "dock")]  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    convert_vqa(tmp_path / "qa.jsonl", "jsonl", folder, tmp_path / "qa.json")
    records = json.loads((tmp_path / "qa.json").read_text())
    assert [r["id"] for r in records] == ["jsonl-aisle/0001", "jsonl-dock/0001"]


def test_images_of_one_name_with_two_extensions_get_their_own_ids(tmp_path):
    """a.jpg and a.png in one folder are two pictures: each keeps its extension in its id (and
    a.jpg.png, whose name without extension is a.jpg, does not take a.jpg's); pictures whose
    name alone is unique keep the id without the extension."""
    folder = images(tmp_path, "a.jpg", "a.png", "a.jpg.png", "b.jpg")
    names = ["a.jpg", "a.png", "a.jpg.png", "b.jpg"]
    lines = [{"image": name, "question": "Is it clear?", "answer": "yes"} for name in names]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    convert_vqa(tmp_path / "qa.jsonl", "jsonl", folder, tmp_path / "qa.json")
    records = json.loads((tmp_path / "qa.json").read_text())
    ids = {r["image"]: r["id"] for r in records}
    assert ids == {
        "a.jpg": "jsonl-a.jpg",
        "a.png": "jsonl-a.png",
        "a.jpg.png": "jsonl-a.jpg.png",
        "b.jpg": "jsonl-b",
    }


def test_a_question_written_with_the_image_placeholder_trains(tmp_path):
    """Questions written in LLaVA's own style ("<image>\\nHow many...?") hold the placeholder
    already: the sample must still hold it once, where training looks for it."""
    folder = images(tmp_path, "bay.png")
    lines = [
        {"image": "bay.png", "question": "<image>\nHow many robots are charging?", "answer": "3"},
        {"image": "bay.png", "question": "Is the door open? <image>", "answer": "yes"},
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    convert_vqa(tmp_path / "qa.jsonl", "jsonl", folder, tmp_path / "qa.json")
    by_image, _ = conversations(tmp_path / "qa.json")
    assert by_image["bay.png"] == [
        f"<image>\nHow many robots are charging?\n{SHORT}",
        "3",
        f"Is the door open?\n{SHORT}",
        "yes",
    ]


def test_the_image_placeholder_in_an_answer_or_choice_leaves_a_trainable_sample(tmp_path):
    """The conversation holds `<image>` once, before the first question, or training refuses
    it: an answer or a choice that writes one loses it, and an answer of nothing else is left
    out as empty."""
    folder = images(tmp_path, "bay.png")
    lines = [
        {"image": "bay.png", "question": "Which view?", "choices": ["<image> left", "right"],
         "answer": "left"},
        {"image": "bay.png", "question": "What is shown?", "answer": "<image> a dock"},
        {"image": "bay.png", "question": "Where?", "answer": "<image>"},
    ]  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    result = convert_vqa(tmp_path / "qa.jsonl", "jsonl", folder, tmp_path / "qa.json")
    by_image, _ = conversations(tmp_path / "qa.json")  # trainable as written
    assert by_image["bay.png"] == [
        f"<image>\nWhich view?\nA. left\nB. right\n{LETTER}",
        "A",
        f"What is shown?\n{SHORT}",
        "a dock",
    ]
    assert result.no_answer == 1


def test_an_empty_open_question_is_left_out_and_counted(tmp_path):
    """An open question of no text (or only `<image>`) asks nothing, and would train the model
    to answer it, as an empty answer would teach it to answer nothing: both are left out and
    counted. A multiple-choice question asks to pick among its choices, stem or none."""
    folder = images(tmp_path, "bay.png")
    lines = [
        {"image": "bay.png", "question": "Is the bay clear?", "answer": "yes"},
        {"image": "bay.png", "question": " ", "answer": "no"},
        {"image": "bay.png", "question": "<image>", "answer": "no"},
        {"image": "bay.png", "question": "", "answer": "B", "choices": ["left", "right"]},
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    result = convert_vqa(tmp_path / "qa.jsonl", "jsonl", folder, tmp_path / "qa.json")
    by_image, _ = conversations(tmp_path / "qa.json")
    assert by_image["bay.png"] == [
        f"<image>\nIs the bay clear?\n{SHORT}",
        "yes",
        f"\nA. left\nB. right\n{LETTER}",
        "B",
    ]
    assert result.no_question == 2
    assert result.summary().splitlines()[-1] == "left out 2 empty open questions"


def test_jsonl_questions_end_at_newlines_only(tmp_path):
    folder = images(tmp_path, "bay.png")
    line = {"image": "bay.png", "question": "Is the bay\u2028clear?", "answer": "yes"}
    (tmp_path / "qa.jsonl").write_text(json.dumps(line, ensure_ascii=False) + "\n")
    convert_vqa(tmp_path / "qa.jsonl", "jsonl", folder, tmp_path / "qa.json")
    by_image, _ = conversations(tmp_path / "qa.json")
    assert by_image["bay.png"] == [f"<image>\nIs the bay\u2028clear?\n{SHORT}", "yes"]


def test_questions_about_an_unreadable_image_are_left_out_and_counted(tmp_path, capsys):
    """A zero-byte frame would stop training (or be skipped there): it is left out here, said."""
    folder = images(tmp_path, "bay.png")
    (folder / "cut.png").write_bytes(b"")
    lines = [{"image": name, "question": "Is it clear?", "answer": "yes"}
             for name in ("bay.png", "cut.png", "cut.png")]  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert cli(["data", "vqa", str(tmp_path / "qa.jsonl"), "--format", "jsonl", "--images",
                str(folder), "--out", str(tmp_path / "qa.json")]) == 0  # fmt: skip
    by_image, _ = conversations(tmp_path / "qa.json")
    assert list(by_image) == ["bay.png"]
    assert "left out 2 questions about 1 images that cannot be read (e.g. cut.png" in (
        capsys.readouterr().out
    )
    (tmp_path / "qa.jsonl").write_text(json.dumps(lines[1]) + "\n")
    assert cli(["data", "vqa", str(tmp_path / "qa.jsonl"), "--format", "jsonl", "--images",
                str(folder), "--out", str(tmp_path / "qa.json")]) == 1  # fmt: skip
    assert "can be read (e.g. cut.png); check the image files" in capsys.readouterr().err


def test_a_question_no_utf8_file_can_hold_is_a_one_line_error(tmp_path, capsys):
    folder = images(tmp_path, "bay.png")
    (tmp_path / "qa.jsonl").write_text(
        '{"image": "bay.png", "question": "Clear? \\ud83d", "answer": "yes"}\n'
    )
    code = cli(["data", "vqa", str(tmp_path / "qa.jsonl"), "--format", "jsonl", "--images",
                str(folder), "--out", str(tmp_path / "qa.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "sample jsonl-bay holds half of a UTF-16 pair" in err, err
    assert not (tmp_path / "qa.json").exists()


def test_vqav2_annotators_answers_reach_eval_as_vqa_accuracy(tmp_path, tiny_model_dir, capsys):
    """VQAv2's ten answers per question go into the gpt turn as "answers" (training keeps its
    "value"), and `eval` scores them by VQA accuracy, counted here by hand: the tiny model's
    own answer given by 2 of 10 annotators scores (2 x 1/3 + 8 x 2/3) / 10 = 0.6, by 3 of 10
    (3 x 2/3 + 7 x 1) / 10 = 0.9, where the majority answer alone ("zebra") would score 0."""
    from llava_edge.runtime import Pipeline

    folder = tmp_path / "images"
    folder.mkdir()
    for image_id, grey in ((9, 60), (25, 200)):
        Image.new("RGB", (40, 30), (grey, grey, grey)).save(folder / f"{image_id:012d}.jpg")
    question = "What is it?"
    prompt = f"{question}\n{SHORT}"
    with Pipeline.load(tiny_model_dir) as pipe:  # what eval asks: the prompt data vqa writes
        own = {i: pipe.answer(folder / f"{i:012d}.jpg", prompt, max_new_tokens=2).text
               for i in (9, 25)}  # fmt: skip
    for answer in own.values():
        assert normalize_vqa(answer) not in ("", "zebra"), own

    def annotation(qid: int, image_id: int, matching: int) -> dict:
        given = [own[image_id]] * matching + ["zebra"] * (10 - matching)
        return {"question_id": qid, "image_id": image_id, "multiple_choice_answer": "zebra",
                "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(given, 1)]}  # fmt: skip

    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps({"questions": [
        {"image_id": 9, "question": question, "question_id": 90},
        {"image_id": 25, "question": question, "question_id": 250},
    ]}))  # fmt: skip
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(
        json.dumps({"annotations": [annotation(90, 9, 2), annotation(250, 25, 3)]})
    )
    out = tmp_path / "vqav2.json"
    assert cli(["data", "vqa", str(questions), "--format", "vqav2", "--images", str(folder),
                "--out", str(out)]) == 0  # fmt: skip
    records = json.loads(out.read_text())
    gpt = records[0]["conversations"][1]
    assert gpt["value"] == "zebra" and len(gpt["answers"]) == 10
    assert parse_sample(records[0], 0).turns == [(prompt, "zebra")]  # training reads "value"
    capsys.readouterr()
    answers = tmp_path / "answers.jsonl"
    assert cli(["eval", str(tiny_model_dir), "--data", str(out), "--images", str(folder),
                "--answers", str(answers), "--max-new-tokens", "2"]) == 0  # fmt: skip
    scores = [json.loads(line)["score"] for line in answers.read_text().splitlines()]
    assert scores == [pytest.approx(0.6), pytest.approx(0.9)]
    assert "VQA accuracy 75.0% (1.50/2, 0 in full)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "format, name, lines, message",
    [
        ("gqa", "q.json", ["{}"], "q.json holds no questions; check the file"),
        ("textvqa", "q.json", ['{"data": []}'], "q.json holds no questions"),
        ("jsonl", "q.jsonl", ["", ""], "q.jsonl holds no questions"),
        ("jsonl", "q.jsonl", ['{"image": "bay.png", "question": "q", "answer": "."}'],
         "every answer in {path} is empty once normalised; check the answers"),
        ("jsonl", "q.jsonl", ['{"image": "bay.png", "question": "q", "answer": "."}',
                              '{"image": "gone.png", "question": "q", "answer": "x"}'],
         "no question of {path} can be written: left out 1 questions about 1 images not in "
         "the image dir (e.g. gone.png); left out 1 questions with an empty answer"),
    ],
)  # fmt: skip
def test_a_file_with_nothing_to_write_says_why(tmp_path, capsys, format, name, lines, message):
    """Not "no question has its image; check --images" where the file holds no question, or
    every answer is empty: the error names what left the questions out."""
    folder = images(tmp_path, "bay.png")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    code = cli(["data", "vqa", str(path), "--format", format, "--images", str(folder),
                "--out", str(tmp_path / "out.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert message.format(path=path) in err
    assert not (tmp_path / "out.json").exists()


def test_the_image_check_shows_its_progress_on_a_terminal(tmp_path, capsys, monkeypatch):
    """Each question's image is looked for and its header read before anything is written
    (minutes for COCO on a cold disk): a bar shows it on a terminal, and none with
    progress=False."""
    import sys

    folder = images(tmp_path, "a.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": "a.png", "question": "Q?", "answer": "x"}) + "\n")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["data", "vqa", str(questions), "--format", "jsonl", "--images", str(folder)]
    assert cli([*argv, "--out", str(tmp_path / "out.json")]) == 0
    assert "checking images: 100%" in capsys.readouterr().err
    convert_vqa(questions, "jsonl", folder, tmp_path / "quiet.json", progress=False)
    assert capsys.readouterr().err == ""
