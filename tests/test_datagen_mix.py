"""`llava-edge data mix`: weights, reproducibility with a seed, the summary table, bad input."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest

from llava_edge.cli import main as cli
from llava_edge.training.datagen.mix import format_table, mix, parse_source


def write(path, samples, jsonl=False):
    if jsonl:
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    else:
        path.write_text(json.dumps(samples))
    return path


def long_sample(i):
    return {
        "id": f"gen-{i}",
        "image": f"img_{i % 5}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the scene."},
            {"from": "gpt", "value": "A forklift moves pallets down a long aisle."},  # 8 words
            {"from": "human", "value": "Is anyone there?"},
            {"from": "gpt", "value": "Yes, one worker."},  # 3 words
        ],
    }


def short_sample(i):
    return {
        "id": f"vqa-{i}",
        "image": f"vqa_{i}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color?\nAnswer the question using a "
             "single word or phrase."},
            {"from": "gpt", "value": "red"},
        ],
    }  # fmt: skip


@pytest.fixture
def sources(tmp_path):
    generated = write(tmp_path / "generated.json", [long_sample(i) for i in range(10)])
    vqa = write(tmp_path / "vqa.jsonl", [short_sample(i) for i in range(8)], jsonl=True)
    return generated, vqa


def test_weights_seed_and_table(tmp_path, sources, capsys):
    generated, vqa = sources
    out = tmp_path / "mix.json"
    code = cli(["data", "mix", f"{generated}:0.5", f"{vqa}:2.25", "--out", str(out),
                "--seed", "3"])  # fmt: skip
    assert code == 0
    records = json.loads(out.read_text())
    ids = Counter(r["id"] for r in records)
    generated_ids = [i for i in ids if i.startswith("gen-")]
    assert len(generated_ids) == 5 and all(ids[i] == 1 for i in generated_ids)  # a random half
    vqa_counts = sorted(ids[f"vqa-{i}"] for i in range(8))
    assert vqa_counts == [2] * 6 + [3] * 2  # twice each, and a quarter a third time
    originals = {s["id"]: s for s in [*map(long_sample, range(10)), *map(short_sample, range(8))]}
    assert all(r == originals[r["id"]] for r in records)  # copied unchanged
    assert [r["id"] for r in records] != sorted(r["id"] for r in records)  # shuffled

    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table if not line.startswith("-")}
    assert rows[str(generated)] == ["0.5", "5", "10", str(len({f"img_{int(i[4:]) % 5}.png"
                                                               for i in generated_ids})),
                                    "10", "5.5"]  # fmt: skip
    assert rows[str(vqa)] == ["2.25", "18", "8", "8", "18", "1.0"]
    assert rows["mix"][0:2] == ["23", "18"]
    assert rows["mix"][3:] == ["28", f"{(10 * 5.5 + 18) / 28:.1f}"]

    again = tmp_path / "again.json"
    assert cli(["data", "mix", f"{generated}:0.5", f"{vqa}:2.25", "--out", str(again),
                "--seed", "3"]) == 0  # fmt: skip
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other.json"
    assert cli(["data", "mix", f"{generated}:0.5", f"{vqa}:2.25", "--out", str(other),
                "--seed", "4"]) == 0  # fmt: skip
    assert other.read_bytes() != out.read_bytes()


def test_weight_defaults_to_one_and_paths_may_hold_colons(tmp_path, sources):
    generated, _ = sources
    odd = write(tmp_path / "a:b.json", [short_sample(i) for i in range(3)])
    assert parse_source(str(generated)).weight == 1.0
    assert parse_source(f"{odd}:2").path == odd
    result = mix([str(generated), f"{odd}:1"], tmp_path / "mix.json")
    assert [s.samples for s in result.sources] == [10, 3]
    assert "mix" in format_table(result)
    # a Path is a file of weight 1, its name taken whole ("a:b.json" holds no weight)
    assert parse_source(odd) == parse_source(f"{odd}:1")
    result = mix([generated, odd], tmp_path / "mix.json")
    assert [s.samples for s in result.sources] == [10, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{g}:abc"], "weight 'abc' is not a number"),
        (["{g}:-1"], "weight -1.0 must be a number 0 or more"),
        (["{g}:nan"], "weight nan must be a number 0 or more"),
        (["{g}:0"], "the mix is empty: .*generated.json:0 of 10 samples take none"),
        (["{g}:0.01", "{d}/vqa.jsonl:0.05"], r"generated.json:0.01 of 10, .*vqa.jsonl:0.05 of 8"),
        (["{d}/nope.json"], "data file .* does not exist"),
        (["{d}/bad.json"], r"bad.json: sample s1: has only a gpt turn"),
        (["{d}/object.json"], "holds one JSON object"),
        (["{g}", "--out", "{g}"], "is one of the sources"),
        (
            ["{g}:1e7"],
            r"the mix would hold over 10,000,000 samples \(.*generated.json:1e\+07 of 10",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, sources, capsys, args, message):
    generated, _ = sources
    bad = [{"id": "s1", "image": "a.png", "conversations": [{"from": "gpt", "value": "x"}]}]
    write(tmp_path / "bad.json", bad)
    (tmp_path / "object.json").write_text('{"id": "x"}')
    args = [a.format(g=generated, d=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "mix.json")]
    before = generated.read_bytes()
    code = cli(["data", "mix", *args])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "mix.json").exists()
    assert generated.read_bytes() == before


def test_a_sample_no_utf8_file_can_hold_stops_the_mix_with_its_id(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text(
        '[{"id": "x7", "conversations": [{"from": "human", "value": "q"}, '
        '{"from": "gpt", "value": "a \\ud83d"}]}]'
    )
    assert cli(["data", "mix", str(path), "--out", str(tmp_path / "mix.json")]) == 1
    err = capsys.readouterr().err
    assert "sample x7: turn 1 holds half of a UTF-16 pair" in err and err.count("\n") == 1, err


def test_out_is_replaced_whole_or_left_as_it_was(tmp_path, sources, monkeypatch):
    """docs/data.md: a file at --out is replaced without --force; a mix interrupted while it
    writes (Ctrl-C) leaves it as it was, with no temporary file beside it; an --out that is
    another name of a source (a hard link) replaces that name, never the source's content."""
    import llava_edge.training.datagen.mix as mix_module

    generated, vqa = sources
    out = tmp_path / "mix.json"
    out.write_text("the previous mix")
    checked, real = [], mix_module.parse_sample

    def interrupted(record, position):
        checked.append(position)
        if len(checked) > 18 + 5:  # every sample checked, then five written
            raise KeyboardInterrupt
        return real(record, position)

    monkeypatch.setattr(mix_module, "parse_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mix([str(generated), str(vqa)], out)
    monkeypatch.undo()
    assert out.read_text() == "the previous mix"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated.json", "mix.json", "vqa.jsonl"]
    assert cli(["data", "mix", str(generated), str(vqa), "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 18

    before = generated.read_bytes()
    os.link(generated, tmp_path / "linked.json")
    assert cli(["data", "mix", f"{generated}:2", "--out", str(tmp_path / "linked.json")]) == 0
    assert generated.read_bytes() == before
    assert len(json.loads((tmp_path / "linked.json").read_text())) == 20


def test_the_mix_shows_its_progress_on_a_terminal(tmp_path, sources, capsys, monkeypatch):
    """Checking and writing LLaVA-1.5's 665k-sample mix takes a minute: bars show both on a
    terminal, none in a script's log or with progress=False."""
    import sys

    generated, vqa = sources
    argv = ["data", "mix", str(generated), str(vqa), "--out", str(tmp_path / "mix.json")]
    assert cli(argv) == 0
    assert "%|" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli(argv) == 0
    err = capsys.readouterr().err
    assert f"checking {generated.name}: 100%" in err and "writing: 100%" in err
    mix([generated, vqa], tmp_path / "quiet.json", progress=False)
    assert capsys.readouterr().err == ""
