"""Calibration data: reading LLaVA JSON and image folders, and recording what the runtime feeds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import write_pgm16
from PIL import Image

from llava_edge.calib.data import DEFAULT_PROMPT, Activations, Sample, load_samples
from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest


def _picture(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def _llava_json(path: Path, items: list[dict]) -> Path:
    path.write_text(json.dumps(items))
    return path


def _item(image: str | list[str] | None, question: str) -> dict:
    item = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "x"}]}
    if image:
        item["image"] = image
    return item


def test_llava_json_finds_images_beside_it_or_under_images(tmp_path: Path) -> None:
    a = _picture(tmp_path / "images" / "a.png", (255, 0, 0))
    b = _picture(tmp_path / "b.png", (0, 255, 0))
    path = _llava_json(
        tmp_path / "data.json",
        [
            _item("a.png", "<image>\nWhat colour?"),
            _item("b.png", "Is it green?"),
            _item(None, "<image>\nNo picture here."),
        ],
    )
    samples = load_samples(path, None)
    assert samples == [
        Sample(a, "<image>\nWhat colour?"),
        Sample(b, "Is it green?"),
        Sample(None, "No picture here."),  # a text-only sample must not ask for an image
    ]
    elsewhere = tmp_path / "elsewhere"
    c = _picture(elsewhere / "sub" / "a.png", (0, 0, 255))
    path = _llava_json(tmp_path / "other.json", [_item("sub/a.png", "<image>\nWhat colour?")])
    assert load_samples(path, elsewhere) == [Sample(c, "<image>\nWhat colour?")]


def test_image_folder_asks_the_default_prompt(tmp_path: Path) -> None:
    first = _picture(tmp_path / "pics" / "1.jpg", (1, 2, 3))
    second = _picture(tmp_path / "pics" / "2.png", (4, 5, 6))
    depth = tmp_path / "pics" / "3.pgm"  # a depth camera's 16-bit frame
    write_pgm16(depth, np.full((8, 8), 4000, np.uint16))
    (tmp_path / "pics" / "notes.txt").write_text("not a picture")
    (tmp_path / "pics" / "._2.png").write_bytes(b"\x00\x05\x16\x07")  # a Mac's AppleDouble
    expected = [Sample(p, DEFAULT_PROMPT) for p in (first, second, depth)]
    assert load_samples(tmp_path / "pics", None) == expected
    assert load_samples(None, tmp_path / "pics") == expected


def test_a_folder_lists_its_picture_files_only(tmp_path: Path) -> None:
    """A named pipe called like a picture is no picture of the folder: reading it would wait for
    a writer forever (as would the run). Nor is a dir so named."""
    picture = _picture(tmp_path / "pics" / "1.png", (1, 2, 3))
    os.mkfifo(tmp_path / "pics" / "camera.png")
    (tmp_path / "pics" / "dir.png").mkdir()
    assert load_samples(None, tmp_path / "pics") == [Sample(picture, DEFAULT_PROMPT)]


def test_a_folder_whose_pictures_are_in_subfolders_names_them(tmp_path: Path) -> None:
    """An image dataset laid out one subfolder per class is not "a folder with no images"."""
    for name in ("cats", "dogs"):
        _picture(tmp_path / "pics" / name / "1.png", (1, 2, 3))
    _picture(tmp_path / "pics" / ".thumbnails" / "1.png", (1, 2, 3))
    (tmp_path / "pics" / "notes").mkdir()
    with pytest.raises(LlavaEdgeError, match=r"only in its subfolders \(cats, dogs\)"):
        load_samples(None, tmp_path / "pics")


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("pipe", r"is not a file \(a pipe"),
        ("empty_folder", "holds no images"),
        ("bad_json", "cannot read calibration file"),
        ("empty_list", "holds no samples"),
        ("no_question", "has no human turn"),
        ("missing_image", "is not under"),
        ("question_not_text", r"holds no text \('value' is a list\)"),
        ("several_images", "give one file name"),
        ("nothing", "no calibration data"),
    ],
)
def test_bad_sources_say_what_is_wrong(tmp_path: Path, case: str, message: str) -> None:
    calib: Path | None = tmp_path / "data.json"
    if case == "missing":
        calib = tmp_path / "nope.json"
    elif case == "pipe":  # what `--calib <(jq ... data.json)` names
        os.mkfifo(calib)
    elif case == "empty_folder":
        calib = tmp_path / "empty"
        calib.mkdir()
    elif case == "bad_json":
        calib.write_text("{not json")
    elif case == "empty_list":
        calib.write_text("[]")
    elif case == "no_question":
        _llava_json(calib, [{"image": "a.png", "conversations": [{"from": "gpt", "value": "x"}]}])
    elif case == "question_not_text":  # the content list of OpenAI's chat format
        item = _item("a.png", "")
        item["conversations"][0]["value"] = [{"type": "image"}, {"type": "text", "text": "Hi"}]
        _llava_json(calib, [item])
    elif case == "missing_image":
        _llava_json(calib, [_item("gone.png", "<image>\nHi")])
    elif case == "several_images":
        _llava_json(calib, [_item(["a.png", "b.png"], "<image>\n<image>\nHi")])
    else:
        calib = None
    with pytest.raises(LlavaEdgeError, match=message):
        load_samples(calib, None)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    root = tmp_path_factory.mktemp("pictures")
    return [
        Sample(_picture(root / "red.png", (200, 30, 30)), "What colour is it?"),
        Sample(_picture(root / "blue.png", (30, 30, 200)), "Describe it."),
    ]


def test_decoder_feeds_are_prefill_then_decode_steps(
    tiny_model_dir: Path, pictures: list[Sample]
) -> None:
    manifest = Manifest.load(tiny_model_dir)
    captures = list(Activations(tiny_model_dir, pictures, decode_steps=2).captures("decoder"))
    assert len(captures) == len(pictures) * 3  # one prefill and two decode steps each
    session = ort.InferenceSession(str(tiny_model_dir / "decoder.onnx"))
    for i, capture in enumerate(captures):
        feeds = capture.feeds
        seq = feeds["inputs_embeds"].shape[1]
        past = feeds["past_key_values.0.key"].shape[2]
        if i % 3 == 0:  # prefill: the whole prompt, image features in place, nothing cached
            assert seq > manifest.num_image_tokens and past == 0
            prompt = seq
        else:  # decode: one token over exactly the tokens so far (unused cache slots trimmed)
            assert seq == 1 and past == prompt + i % 3 - 1
        assert feeds["attention_mask"].shape == (1, past + seq)
        assert feeds["position_ids"][0, -1] == past + seq - 1
        # trimming the runtime's preallocated slots changes nothing the graph computes
        logits = session.run(["logits"], feeds)[0]
        np.testing.assert_allclose(logits, capture.outputs[0], rtol=1e-5, atol=1e-5)


def test_calibration_leaves_no_session_cache_entries(
    tiny_model_dir: Path, pictures: list[Sample], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fp32 standard graphs calibration runs are not what the CPU runs later."""
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    assert list(Activations(tiny_model_dir, pictures[:1], decode_steps=1).captures("decoder"))
    assert not list((tmp_path / "cache").glob("onnxruntime/*"))


def test_vision_and_projector_feeds_chain(tiny_model_dir: Path, pictures: list[Sample]) -> None:
    manifest = Manifest.load(tiny_model_dir)
    activations = Activations(tiny_model_dir, pictures)
    vision = list(activations.captures("vision_encoder"))
    projector = list(activations.captures("projector"))
    assert len(vision) == len(projector) == len(pictures)
    for v, p in zip(vision, projector, strict=True):
        assert v.feeds["pixel_values"].shape == (1, 3, manifest.image.height, manifest.image.width)
        np.testing.assert_array_equal(p.feeds["image_features"], v.outputs[0])
    assert not np.allclose(vision[0].outputs[0], vision[1].outputs[0])  # two different pictures


def test_held_out_samples_share_nothing_with_calibration(tmp_path: Path) -> None:
    """A LLaVA JSON may repeat a sample, or ask several questions of one picture: the report's
    held-out samples must still be data calibration never saw, pictures included (the vision
    encoder's and projector's rows compare on the pictures alone)."""
    from llava_edge.calib.quantize import _choose

    for i in range(5):
        _picture(tmp_path / f"{i}.png", (40 * i, 90, 200))
    pairs = [(0, "A"), (1, "A"), (0, "A"), (2, "A"), (3, "A"), (4, "A"), (1, "B")]
    calib = _llava_json(tmp_path / "c.json", [_item(f"{i}.png", q) for i, q in pairs])
    samples = load_samples(calib, None)
    calibration, held_out = _choose("int8", samples, 32, report=True)
    assert len(set(calibration)) == len(calibration) == 4 and held_out
    assert not {s.image for s in calibration} & {s.image for s in held_out}
    calibration, held_out = _choose("int8", samples, 32, report=False)
    assert len(set(calibration)) == len(calibration) == 6 and not held_out


@pytest.mark.parametrize(
    "total, samples, held",
    [(40, 16, 8), (20, 16, 4), (10, 32, 1), (2, 32, 1), (12, 4, 6)],
)
def test_report_holds_out_what_the_docs_say(total: int, samples: int, held: int) -> None:
    """docs/quantization.md: samples past --samples are held out from the end of the data, at
    least 1, at most 8 and half the data; fp16, which calibrates nothing, compares on the first
    8."""
    from llava_edge.calib.quantize import _choose

    data = [Sample(Path(f"{i}.png"), DEFAULT_PROMPT) for i in range(total)]
    calibration, held_out = _choose("int8", data, samples, report=True)
    assert held_out == data[total - held :]
    assert calibration == data[: min(samples, total - held)]
    assert _choose("fp16", data, samples, report=True) == ([], data[:8])


def test_an_image_given_as_a_list_of_one_is_that_image(tmp_path: Path) -> None:
    """Multi-image LLaVA data writes every sample's image as a list, one picture or several."""
    _picture(tmp_path / "a.png", (10, 20, 30))
    calib = _llava_json(tmp_path / "c.json", [_item(["a.png"], "<image>\nWhat is it?")])
    (sample,) = load_samples(calib, None)
    assert sample.image == tmp_path / "a.png" and sample.prompt == "<image>\nWhat is it?"


@pytest.mark.parametrize("form", ["jsonl", "bom"])
def test_calibration_reads_the_data_files_training_reads(tmp_path: Path, form: str) -> None:
    """`train --data` takes JSONL and a JSON saved with a byte-order mark; the same file given to
    `quantize --calib` was refused as unreadable."""
    _picture(tmp_path / "a.png", (10, 20, 30))
    items = [_item("a.png", "<image>\nWhat is it?"), _item(None, "Say hi.")]
    plain = _llava_json(tmp_path / "plain.json", items)
    if form == "jsonl":
        calib = tmp_path / "data.jsonl"
        calib.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    else:
        calib = tmp_path / "data.json"
        calib.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    got = load_samples(calib, None)
    assert got == load_samples(plain, None) and len(got) == 2
