"""Reading LLaVA data: the lazy JSON/JSONL index, sample checks, normalisation."""

from __future__ import annotations

import json
import pickle

import pytest

from llava_edge.errors import LlavaEdgeError
from llava_edge.training import data as data_module
from llava_edge.training.data import BadSample, SampleFile, parse_sample


def sample(i: int, text: str = "hello", image: str | None = "a.png") -> dict:
    record = {
        "id": f"s{i}",
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + f"{text} {i}?"},
            {"from": "gpt", "value": f"answer {i} ünïcödé 🙂"},
        ],
    }
    if image:
        record["image"] = image
    return record


@pytest.mark.parametrize("chunk", [7, 64, 1 << 22])
def test_json_array_index_reads_every_record_back(tmp_path, monkeypatch, chunk):
    # Small chunks put record, escape and multi-byte character borders at chunk borders.
    monkeypatch.setattr(data_module, "_CHUNK", chunk)
    records = [sample(i, text='q\\"[]{},' * (i % 3)) for i in range(40)]
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=1, ensure_ascii=False).encode())
    f = SampleFile(path)
    assert len(f) == 40
    assert [f.record(i) for i in (39, 0, 17)] == [records[39], records[0], records[17]]
    assert list(f.positions) == list(range(40))


def test_jsonl_with_blank_lines_and_keep_filter(tmp_path):
    records = [sample(i) for i in range(5)]
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in records[:2])
        + "\n\n"
        + "\n".join(json.dumps(r) for r in records[2:])
        + "\n"
    )
    f = SampleFile(path, keep=lambda position, record: position % 2 == 0)
    assert [f.record(i)["id"] for i in range(len(f))] == ["s0", "s2", "s4"]
    assert list(f.positions) == [0, 2, 4]


def test_a_limit_reads_no_record_past_the_last_it_keeps(tmp_path):
    """eval --limit N on a large file: the records after the Nth kept one are not read, so a
    damaged line further on does not fail the quick check."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(sample(i)) for i in range(3)) + "\n{not json\n")
    f = SampleFile(path, keep=lambda position, record: position != 1, limit=2)
    assert [f.record(i)["id"] for i in range(len(f))] == ["s0", "s2"]
    with pytest.raises(LlavaEdgeError, match="line 4: not valid JSON"):
        SampleFile(path, limit=4)


@pytest.mark.parametrize("edit", ["in place", "replaced", "appended"])
def test_a_data_file_edited_during_training_is_named_not_read_at_old_offsets(tmp_path, edit):
    """Training reads each sample from the file as it needs it, at the offsets indexed at the
    start: an edited file would give cut records (a JSON traceback hours in) or other samples."""
    import os

    records = [sample(i) for i in range(4)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    f = SampleFile(path)
    assert f.record(1) == records[1]  # its handle open, as a loader's is mid-epoch
    edited = [sample(i, text="a much longer question than before") for i in range(4)]
    text = "".join(json.dumps(r) + "\n" for r in edited)
    if edit == "in place":
        with open(path, "r+") as out:
            out.write(text)
    elif edit == "replaced":  # an editor's save: a new file renamed over the old
        (tmp_path / "new").write_text(text)
        os.replace(tmp_path / "new", path)
        f = pickle.loads(pickle.dumps(f))  # a loader worker of a later epoch opens it afresh
    else:
        with open(path, "a") as out:
            out.write(json.dumps(sample(9)) + "\n")
    with pytest.raises(LlavaEdgeError, match="changed after it was checked"):
        f.record(2)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"data": [1, 2]}', "holds one JSON object"),
        ('{\n "data": [1]\n}\n', "holds one JSON object"),
        ('"text"', "neither a JSON list"),
        ("", "is empty"),
        ('[{"id": 1}, {"id": 2]', "not valid JSON"),
        ('[{"id": 1} {"id": 2}]', "expected ',' or ']'"),
        ('[{"id": 1}]\n[{"id": 2}]\n', "more data after the list's closing ']' at byte 12; two"),
        ("[] x", "more data after the list's closing ']' at byte 3"),
        (b'[{"id": "caf\xe9"}]', r"is not UTF-8 text \(byte 0xe9: invalid continuation byte\)"),
        # JSONL too, not "not valid JSON (...); JSONL holds one sample object a line"
        (
            b'{"id": 1}\n{"id": "caf\xe9"}\n',
            r"d.json, line 2 is not UTF-8 text \(byte 0xe9: invalid continuation byte\); JSON is "
            "UTF-8: save it as UTF-8",
        ),
        # PowerShell 5's Out-File and Notepad's "Unicode" write UTF-16 with a byte-order mark
        (
            '[{"id": 1}]'.encode("utf-16"),
            r"is UTF-16 \(or UTF-32\) text; JSON is UTF-8: save it as UTF-8",
        ),
        (
            '{"id": 1}\n'.encode("utf-16-be"),
            r"is UTF-16 \(or UTF-32\) text; JSON is UTF-8: save it as UTF-8",
        ),
        ('{"id": 1}\n{"id": 2\n', "line 2: not valid JSON"),
        # a JSON list names the line and the sample, as JSONL does
        ('[\n {"id": 1},\n {"id": 2,\n  "x" 3}\n]', r"line 4: sample #1 \(from byte 15\) is not"),
        ('[\n {"id": 1},\n]\n', "line 3: a ',' after sample #0 with no sample following it"),
        ('[\n {"id": 1}\n {"id": 2}]', "line 3: expected ',' or ']' after sample #0"),
        ('[\n {"id": 1},\n {"id": 2}\n', "line 4: the file ends after sample #1, before the"),
    ],
)
def test_wrong_file_shapes_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LlavaEdgeError, match=message) as info:
        SampleFile(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(LlavaEdgeError, match="does not exist"):
        SampleFile(tmp_path / "nope.json")


def test_parse_sample_normalises_the_image_placeholder():
    record = sample(0)
    record["conversations"] += [
        {"from": "human", "value": "and then?"},
        {"from": "gpt", "value": "done"},
    ]
    s = parse_sample(record, 0)
    assert s.id == "s0" and s.image == "a.png"
    assert s.turns == [("hello 0?", "answer 0 ünïcödé 🙂"), ("and then?", "done")]
    trailing = sample(1)
    trailing["conversations"][0]["value"] = "what is it?\n<image>"
    assert parse_sample(trailing, 1).turns[0][0] == "what is it?"
    text_only = parse_sample(sample(2, image=None), 2)
    assert text_only.image is None and text_only.turns[0][0] == "hello 2?"
    # Multi-image LLaVA data writes every sample's image as a list, of one picture here (as
    # quantize's calibration data takes it).
    assert parse_sample({**sample(3), "image": ["a.png"]}, 3).image == "a.png"


def _broken(change) -> dict:
    record = sample(7)
    change(record)
    return record


def _opening_gpt(change=lambda conversations: None) -> dict:
    record = sample(7)
    record["conversations"].insert(0, {"from": "gpt", "value": "Hello! Ask me about it."})
    change(record["conversations"])
    return record


def test_an_opening_gpt_turn_is_left_out_as_llava_leaves_it_out():
    """LLaVA's preprocess drops a conversation's first turn when it is not from human ("Skip
    the first one if it is not from human") and trains on the rest."""
    plain = parse_sample(sample(7), 0)
    opened = parse_sample(_opening_gpt(), 0)
    assert opened.turns == plain.turns and opened.image == plain.image
    assert opened.dropped_first_turn and not plain.dropped_first_turn


@pytest.mark.parametrize(
    "record, problem",
    [
        (["not", "an", "object"], "not an object"),
        (_broken(lambda r: r.pop("conversations")), "no 'conversations' list"),
        (_broken(lambda r: r.update(conversations=[])), "no 'conversations' list"),
        (_broken(lambda r: r["conversations"][1].update({"from": "human"})), "does not alternate"),
        (_broken(lambda r: r["conversations"].reverse()), "ends with a human turn"),
        (_broken(lambda r: r["conversations"].pop(0)), "has only a gpt turn"),
        (_opening_gpt(lambda c: c.append({"from": "gpt", "value": "again"})),
         "turn 3 is from 'gpt', expected 'human'"),
        (_opening_gpt(lambda c: c[2].update(value="")), "turn 2, a gpt answer, is empty"),
        (_opening_gpt(lambda c: c[1].update(value="no placeholder")), "must hold"),
        (_broken(lambda r: r["conversations"].pop()), "ends with a human turn"),
        (_broken(lambda r: r["conversations"][1].update(value=3)), "text 'value'"),
        (_broken(lambda r: r["conversations"][1].update(value=" \n")), "turn 1, a gpt answer, is"),
        (_broken(lambda r: r.pop("image")), "has no 'image'"),
        (_broken(lambda r: r["conversations"][0].update(value="no placeholder")), "must hold"),
        (_broken(lambda r: r.update(image=["a.png", "b.png"])), "one image per sample"),
        # "\ud83d" in the file: half of an emoji's UTF-16 pair, text no tokenizer or UTF-8 takes
        (_broken(lambda r: r["conversations"][1].update(value="ok \ud83d")),
         "turn 1 holds half of a UTF-16 pair"),
    ],
)  # fmt: skip
def test_bad_samples_are_named(record, problem):
    with pytest.raises(BadSample, match=problem) as info:
        parse_sample(record, 3)
    expected_id = "#3" if not isinstance(record, dict) else "s7"
    assert str(info.value).startswith(f"sample {expected_id}: ")


@pytest.mark.parametrize("given", [None, ""])
def test_a_sample_with_a_null_or_empty_id_is_named_by_its_place(given):
    """`"id": null` (a dataframe's missing value) or `""` names no sample: the error gives its
    place in the file, as for a sample without an id, not 'sample None'."""
    record = _broken(lambda r: r["conversations"].pop())
    record["id"] = given
    with pytest.raises(BadSample, match=r"^sample #3: the conversation ends with a human turn"):
        parse_sample(record, 3)
    record["conversations"].append({"from": "gpt", "value": "a"})
    assert parse_sample(record, 3).id == "#3"
