"""What `data generate` reads and parses: annotation files (COCO and JSONL) and how the LLM is
shown them, the replies' schemas, coordinate leaks, and the per-sample request seeds."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from llava_edge.errors import LlavaEdgeError
from llava_edge.training.datagen.annotations import read_annotations
from llava_edge.training.datagen.prompts import (
    DETAIL_QUESTIONS,
    EXAMPLES,
    KINDS,
    detail_question,
    messages,
    request_seed,
)
from llava_edge.training.datagen.replies import Dropped, leaked_coordinates, parse_reply


def test_coco_captions_and_instances_merge_by_file_name(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (200, 100)).save(tmp_path / "images" / name)
    # Two files with different ids for the same images (as two labelling exports may have).
    captions = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "caption": " A dog on grass. "},
            {"id": 2, "image_id": 1, "caption": "A brown dog."},
            {"id": 3, "image_id": 2, "caption": "An empty street."},
        ],
    }
    instances = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 200, "height": 100},
            {"id": 8, "file_name": "c.jpg", "width": 200, "height": 100},
            {"id": 9, "file_name": "missing.jpg", "width": 10, "height": 10},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "bbox": [20, 10, 100, 50], "category_id": 3},
            {"id": 2, "image_id": 7, "bbox": [150, 80, 80, 40], "category_id": 4},  # past edge
            {"id": 3, "image_id": 8, "bbox": [0, 0, 0, 10], "category_id": 3},  # empty
            {"id": 4, "image_id": 9, "bbox": [0, 0, 5, 5], "category_id": 3},
        ],
        "categories": [{"id": 3, "name": "dog"}, {"id": 4, "name": "ball"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    notes, skipped = read_annotations(
        [tmp_path / "captions.json", tmp_path / "instances.json"], tmp_path / "images"
    )
    assert [n.image for n in notes] == ["a.jpg", "b.jpg"]
    assert notes[0].render() == (
        "Captions:\n- A dog on grass.\n- A brown dog.\n\n"
        "Objects (label: [x_min, y_min, x_max, y_max], as fractions of the image's width and "
        "height):\n"
        "- dog: [0.100, 0.100, 0.600, 0.600]\n"
        "- ball: [0.750, 0.800, 1.000, 1.000]"
    )
    assert notes[1].render() == "Captions:\n- An empty street."
    assert notes[0].coordinates() == {"0.100", "0.600", "0.750", "0.800", "1.000"}
    assert dict(skipped) == {
        "c.jpg": "no caption and no box to describe",
        "missing.jpg": f"no file {tmp_path / 'images' / 'missing.jpg'}",
    }


def test_jsonl_boxes_in_pixels_sized_from_the_image_header(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (640, 480)).save(tmp_path / "imgs" / "shelf.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "imgs" / "given.png")
    lines = [
        {"image": "shelf.png", "boxes": [{"label": "crate", "box": [320, 240, 64, 48]}]},
        {"image": "given.png", "width": 100, "height": 50, "captions": ["Sized by hand."],
         "boxes": [{"label": "tag", "box": [10, 5, 60, 30]}]},
    ]  # fmt: skip
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    notes, skipped = read_annotations([path], tmp_path / "imgs")
    assert skipped == []
    # Corners in either order; size read from the file when not annotated.
    assert notes[0].boxes[0].numbers() == ["0.100", "0.100", "0.500", "0.500"]
    assert notes[1].boxes[0].numbers() == ["0.100", "0.100", "0.600", "0.600"]  # 100 x 50 given
    assert notes[0].render().startswith("Objects (label:")


def test_a_box_cut_by_the_edge_is_clipped_to_the_image(tmp_path):
    """docs/data.md: a box that runs past the image's edge is shown to the LLM as the part of it
    on the image (a detector's box of an object half out of frame)."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (640, 480)).save(tmp_path / "imgs" / "edge.png")
    line = {"image": "edge.png", "boxes": [{"label": "cart", "box": [-64, 240, 704, 528]}]}
    (tmp_path / "labels.jsonl").write_text(json.dumps(line) + "\n")
    notes, skipped = read_annotations([tmp_path / "labels.jsonl"], tmp_path / "imgs")
    assert skipped == []
    assert notes[0].boxes[0].numbers() == ["0.000", "0.500", "1.000", "1.000"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"id": "x", "conversations": []}]', "neither COCO annotations"),
        ('{"info": {}}', "neither COCO annotations"),
        ('{"image": "a.png"}\n{"image": ', "line 2: not valid JSON"),
        ('{"image": "a.png", "captions": "one"}', "'captions' must be a list of strings"),
        ('{"image": "a.png", "boxes": [{"label": "x", "box": [1, 2]}]}', "must be 4 numbers"),
        ('{"images": [{"id": 1}], "annotations": []}', "image #0 has no 'id' or 'file_name'"),
        (
            '{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 2}]}',
            "annotation #0 names no image",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.png"}], '
            '"annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 5}]}',
            "category_id that 'categories' does not name",
        ),
        (
            '{"image": "nope.png", "captions": ["x"]}',
            r"none of the 1 annotated images is usable \(no file .*nope.png\); check --images",
        ),
        # not --images' fault: the file annotates nothing, or gives nothing to describe
        ("", "labels.json: no image is annotated; check the annotation files"),
        ('{"images": [], "annotations": []}', "no image is annotated; check the annotation files"),
        ('{"image": "a.png"}', r"\(no caption and no box to describe\); give each image a caption"),
        # a "\ud83d" escape: half of an emoji's UTF-16 pair, which no request can carry
        (
            '{"image": "a.png", "captions": ["A cart \\ud83d"]}',
            "a.png: its captions or labels hold half of a UTF-16 pair",
        ),
        (
            '{"image": "a.png", "boxes": [{"label": "\\udc00", "box": [1, 1, 4, 4]}]}',
            "a.png: its captions or labels hold half of a UTF-16 pair",
        ),
        # Boxes that cannot be on the image: not numbers, or wholly outside it (sizes of
        # another resolution, say): clamped to the edge they became nothing, or a sliver.
        ('{"image": "a.png", "boxes": [{"label": "x", "box": [0, 0, NaN, 4]}]}', "4 numbers"),
        ('{"image": "a.png", "boxes": [{"label": "x", "box": [0, 0, Infinity, 4]}]}', "4 numbers"),
        (
            '{"image": "a.png", "boxes": [{"label": "cart", "box": [10, 2, 30, 6]}]}',
            r"a.png: the 'cart' box .* lies wholly outside the 8 x 8 image",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.png", "width": 640, "height": 480}], '
            '"annotations": [{"image_id": 1, "bbox": [700, 10, 50, 50], "category_id": 1}], '
            '"categories": [{"id": 1, "name": "cart"}]}',
            r"wholly outside the 640 x 480 image",
        ),
    ],
)
def test_bad_annotation_files_are_one_line_errors(tmp_path, content, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "labels.json"
    path.write_text(content)
    with pytest.raises(LlavaEdgeError, match=message) as info:
        read_annotations([path], tmp_path)
    assert "\n" not in str(info.value)


def parse(kind, content, finish="stop", coordinates=frozenset({"0.412", "0.388"})):
    return parse_reply(kind, content, finish, set(coordinates), "a.jpg", 0)


def test_each_kind_parses_its_schema_and_ignores_other_keys():
    conversation = {"turns": [{"question": " Q1 ", "answer": "A1", "why": "x"},
                              {"question": "Q2", "answer": "A2"}], "n": 2}  # fmt: skip
    assert parse("conversation", json.dumps(conversation)) == [("Q1", "A1"), ("Q2", "A2")]
    assert parse("detail", '{"description": "A long text.", "title": "t"}') == [
        (detail_question("a.jpg", 0), "A long text.")
    ]
    assert parse("reasoning", '{"question": "Why?", "answer": "Because.", "score": 3}') == [
        ("Why?", "Because.")
    ]
    fenced = '```json\n{"question": "Why?", "answer": "Because."}\n```'
    assert parse("reasoning", fenced) == [("Why?", "Because.")]


@pytest.mark.parametrize(
    "kind, content, finish, reason",
    [
        ("detail", "The image shows a dog.", "stop", "not JSON"),
        ("detail", '{"description": "cut', "length", "cut off at the token limit"),
        ("detail", "", "stop", "empty reply"),
        ("detail", None, "stop", "empty reply"),
        ("detail", '["a"]', "stop", "wrong schema"),
        ("detail", '{"text": "x"}', "stop", "wrong schema"),
        ("detail", '{"description": "  "}', "stop", "wrong schema"),
        ("conversation", '{"turns": []}', "stop", "wrong schema"),
        ("conversation", '{"turns": [{"question": "q"}]}', "stop", "wrong schema"),
        ("conversation", '{"turns": ["q", "a"]}', "stop", "wrong schema"),
        ("reasoning", '{"question": "q", "answer": 3}', "stop", "wrong schema"),
        ("reasoning", '{"question": "Where?", "answer": "At (0.41, 0.39)."}', "stop",
         "raw coordinates in an answer"),
        ("detail", '{"description": "Its left edge is at 0.412."}', "stop",
         "raw coordinates in an answer"),
        ("conversation", '{"turns": [{"question": "q", "answer": "fine"}, '
         '{"question": "box?", "answer": "[0.1, 0.2, 0.3, 0.4]"}]}', "stop",
         "raw coordinates in an answer"),
        ("reasoning", '{"question": "<image>\\nWhy?", "answer": "Because."}', "stop",
         "the image placeholder in the text"),
        ("conversation", '{"turns": [{"question": "q", "answer": "The <image> shows a cart."}]}',
         "stop", "the image placeholder in the text"),
        # an LLM stuck repeating "[" (a crash, asked again by every rerun, without the drop)
        ("detail", '{"description": ' + "[" * 5000 + "]" * 5000 + "}", "stop", "not JSON"),
    ],
)  # fmt: skip
def test_bad_replies_are_dropped_with_their_reason(kind, content, finish, reason):
    with pytest.raises(Dropped) as info:
        parse(kind, content, finish)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "text, leak",
    [
        ("The cup holds 0.5 liters and costs 2.50 dollars.", None),
        ("Version 1.0 of the robot, from 2021, moves at 0.8 m/s.", None),
        ("It covers [0.100, 0.200, 0.300, 0.400].", "0.100, 0.200, 0.300, 0.400"),
        ("Centered near (.41, .39).", ".41, .39"),
        ("Its top is at 0.388 of the height.", "0.388"),
        ("Its top is at .388 of the height.", ".388"),
        ("It is 10.412 meters away.", None),
    ],
)
def test_coordinate_leaks(text, leak):
    assert leaked_coordinates(text, {"0.412", "0.388"}) == leak


def test_request_seeds_differ_per_sample_and_do_not_change():
    keys = [(s, img, kind, i) for s in (0, 1) for img in ("a.jpg", "b.jpg") for kind in KINDS
            for i in range(3)]  # fmt: skip
    seeds = [request_seed(*key) for key in keys]
    assert len(set(seeds)) == len(keys)
    assert all(0 <= s < 2**31 for s in seeds)
    assert request_seed(0, "img_0.png", "detail", 0) == 500572046  # stable across runs/machines
    assert {detail_question(f"{i}.jpg", 0) for i in range(200)} == set(DETAIL_QUESTIONS)


def test_worked_examples_follow_their_own_rules():
    """The examples show the schemas filled in, and never leak their own coordinates."""
    for kind in KINDS:
        chat = messages(kind, "Captions:\n- x")
        assert [m["role"] for m in chat] == ["system"] + ["user", "assistant"] * 2 + ["user"]
        assert "JSON" in chat[0]["content"]  # hosted JSON modes require the word
        for example, reply in zip(EXAMPLES, chat[2:-1:2], strict=True):
            coordinates = {n for box in example.boxes for n in box.numbers()}
            assert parse_reply(kind, reply["content"], "stop", coordinates, "x.jpg", 0)


def test_a_coco_image_id_given_to_two_files_is_refused(tmp_path):
    """Annotations name images by id: with one id on two files, whose caption is whose cannot
    be told, and silently giving it to the last one misdescribes both images."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    path = tmp_path / "labels.json"
    images = [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}]
    annotations = [{"image_id": 1, "caption": "A pallet."}]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    with pytest.raises(LlavaEdgeError, match="image id 1 names both 'a.png' and 'b.png'"):
        read_annotations([path], tmp_path)
    # The same entry twice (a merged export) is harmless.
    path.write_text(json.dumps({"images": [images[0], images[0]], "annotations": annotations}))
    notes, _ = read_annotations([path], tmp_path)
    assert [(n.image, n.captions) for n in notes] == [("a.png", ("A pallet.",))]


def test_an_annotation_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "labels.jsonl"
    path.write_bytes('{"image": "a.png", "captions": ["Caf\xe9 counter."]}\n'.encode("latin-1"))
    with pytest.raises(LlavaEdgeError, match="is not UTF-8 text .*save it as UTF-8"):
        read_annotations([path], tmp_path)


def test_a_label_in_two_files_describes_one_object(tmp_path):
    """A file given twice, or a detector's boxes beside the labelling tool's: the same caption
    or box twice is one, else the LLM is shown two forklifts where there is one."""
    Image.new("RGB", (100, 50)).save(tmp_path / "a.png")
    jsonl = tmp_path / "labels.jsonl"
    line = {"image": "a.png", "captions": ["A forklift."],
            "boxes": [{"label": "forklift", "box": [10, 10, 50, 40]}]}  # fmt: skip
    jsonl.write_text(json.dumps(line) + "\n")
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({
        "images": [{"id": 3, "file_name": "a.png", "width": 100, "height": 50}],
        "annotations": [{"image_id": 3, "bbox": [10, 10, 40, 30], "category_id": 1},
                        {"image_id": 3, "bbox": [60, 10, 20, 30], "category_id": 1}],
        "categories": [{"id": 1, "name": "forklift"}],
    }))  # fmt: skip
    notes, _ = read_annotations([jsonl, jsonl, coco], tmp_path)
    assert notes[0].captions == ("A forklift.",)
    assert [b.numbers() for b in notes[0].boxes] == [
        ["0.100", "0.200", "0.500", "0.800"],
        ["0.600", "0.200", "0.800", "0.800"],  # a second forklift of its own
    ]


def test_a_size_read_from_the_file_is_the_upright_size(tmp_path):
    """A camera that stores its pictures sideways with an EXIF orientation: the labelling tool,
    the runtime and training all see the picture upright, so the boxes are in upright pixels and
    the size they are normalised by must be the upright one too."""
    (tmp_path / "imgs").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide, 20 high; shown rotated: 20 wide, 40 high
    Image.new("RGB", (40, 20)).save(tmp_path / "imgs" / "side.jpg", exif=exif)
    line = {"image": "side.jpg", "boxes": [{"label": "arm", "box": [0, 10, 20, 40]}]}
    (tmp_path / "labels.jsonl").write_text(json.dumps(line) + "\n")
    notes, _ = read_annotations([tmp_path / "labels.jsonl"], tmp_path / "imgs")
    assert notes[0].boxes[0].numbers() == ["0.000", "0.250", "1.000", "1.000"]


def test_a_webp_whose_exif_header_is_unreadable_is_kept_at_its_stored_size(tmp_path):
    """EXIF whose header is no TIFF header gives no orientation, so load_image reads such a WebP
    as stored and training takes it: it is no unreadable picture, and its boxes are normalised
    by the stored size, the one training sees."""
    (tmp_path / "imgs").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # unread below: the picture stays 40 wide, 20 high
    file = tmp_path / "imgs" / "side.webp"
    Image.new("RGB", (40, 20)).save(file, exif=exif, lossless=True)
    assert file.read_bytes().count(b"MM\x00*") == 1
    file.write_bytes(file.read_bytes().replace(b"MM\x00*", b"MX\x00*"))
    line = {"image": "side.webp", "boxes": [{"label": "arm", "box": [0, 10, 20, 20]}]}
    (tmp_path / "labels.jsonl").write_text(json.dumps(line) + "\n")
    notes, skipped = read_annotations([tmp_path / "labels.jsonl"], tmp_path / "imgs")
    assert skipped == []
    assert notes[0].boxes[0].numbers() == ["0.000", "0.500", "0.500", "1.000"]


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """A JSONL writer (json.dumps(..., ensure_ascii=False)) keeps U+2028 and U+0085 inside a
    string as they are; they do not end the line."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    line = {"image": "a.png", "captions": ["Two carts.\u2028One is red\x85."]}
    (tmp_path / "labels.jsonl").write_text(json.dumps(line, ensure_ascii=False) + "\n")
    notes, _ = read_annotations([tmp_path / "labels.jsonl"], tmp_path / "imgs")
    assert notes[0].captions == ("Two carts.\u2028One is red\x85.",)


def test_an_unreadable_image_is_left_out_and_listed(tmp_path):
    """A frame a logger cut short (zero bytes, or not a picture) cannot be trained on: it is
    left out and listed like a missing one, whether or not its size is annotated, instead of
    being paid for or stopping the run."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "imgs" / "good.png")
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    (tmp_path / "imgs" / "text.png").write_text("not a picture")
    box = [{"label": "cart", "box": [1, 1, 5, 5]}]
    lines = [
        {"image": "good.png", "boxes": box},
        {"image": "empty.png", "boxes": box},
        {"image": "text.png", "width": 10, "height": 10, "boxes": box},
    ]
    (tmp_path / "labels.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    notes, skipped = read_annotations([tmp_path / "labels.jsonl"], tmp_path / "imgs")
    assert [n.image for n in notes] == ["good.png"]
    assert [image for image, _ in skipped] == ["empty.png", "text.png"]
    assert all(why.startswith("cannot be read (") for _, why in skipped), skipped
