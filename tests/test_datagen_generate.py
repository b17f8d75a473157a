"""`llava-edge data generate` against a real HTTP server that speaks the OpenAI chat-completions
protocol (tests/chat_server.py) and answers from a table of replies: good ones, malformed ones,
429s, 5xx, slow replies, dropped and cut connections. What must hold: every good sample lands
once, every bad one is reported, retries wait with backoff, the budget and the concurrency bound
hold, a run killed with SIGKILL and resumed writes the same file as an uninterrupted run, and the
file trains with `llava-edge train --stage 2` as it is."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chat_server import BadEncoding, ChatServer, Cut, Drop, Garbage, Reply, Status
from PIL import Image

from llava_edge.cli import main as cli
from llava_edge.errors import LlavaEdgeError
from llava_edge.training.data import SampleFile, parse_sample
from llava_edge.training.datagen.client import backoff_delay
from llava_edge.training.datagen.generate import generate
from llava_edge.training.datagen.journal import Journal
from llava_edge.training.datagen.prompts import (
    DETAIL_QUESTIONS,
    KINDS,
    SYSTEM,
    prompts_version,
    request_seed,
)

OBJECTS = ["pallet", "crate", "drone", "forklift", "robot", "ladder", "bin", "cart"]
WIDTH, HEIGHT = 48, 32


def make_images(root: Path, count: int) -> tuple[Path, Path, Path]:
    """`count` images with COCO captions and instances in two files (merged by file name).

    Image i shows OBJECTS[i]; its one box is the middle half of the picture, which renders as
    [0.250, 0.250, 0.750, 0.750]."""
    images = root / "images"
    images.mkdir(parents=True)
    entries, captions, boxes = [], [], []
    for i in range(count):
        name = f"img_{i}.png"
        Image.new("RGB", (WIDTH, HEIGHT), (30 * i, 100, 200)).save(images / name)
        entries.append({"id": 100 + i, "file_name": name, "width": WIDTH, "height": HEIGHT})
        captions.append({"id": i, "image_id": 100 + i, "caption": f"A {OBJECTS[i]} in a room."})
        captions.append({"id": 50 + i, "image_id": 100 + i, "caption": f"One {OBJECTS[i]}."})
        bbox = [WIDTH / 4, HEIGHT / 4, WIDTH / 2, HEIGHT / 2]
        boxes.append({"id": i, "image_id": 100 + i, "bbox": bbox, "category_id": i + 1})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(OBJECTS)]
    caption_file, instance_file = root / "captions.json", root / "instances.json"
    caption_file.write_text(json.dumps({"images": entries, "annotations": captions}))
    instance_file.write_text(
        json.dumps({"images": entries, "annotations": boxes, "categories": categories})
    )
    return images, caption_file, instance_file


def good(kind: str, image: str, index: int = 0) -> dict:
    """A realistic reply of each kind (with a key the schema does not have, to be ignored)."""
    thing = OBJECTS[int(image.split("_")[1].split(".")[0])]
    if kind == "conversation":
        return {
            "turns": [
                {"question": f"What is in the middle of the room? ({index})",
                 "answer": f"A {thing} stands in the middle of the room."},
                {"question": "How many are there?", "answer": f"There is one {thing}."},
            ],
            "notes": "two turns",
        }  # fmt: skip
    if kind == "detail":
        return {"description": f"A single {thing} fills the center of a plain room. ({index})"}
    return {
        "question": f"Why might someone put a {thing} there? ({index})",
        "answer": f"The {thing} is in the middle, where it is easy to reach from every side.",
        "difficulty": "medium",
    }


def rounds_of(kind: str, reply: dict) -> list[tuple[str, str]]:
    if kind == "conversation":
        return [(t["question"], t["answer"]) for t in reply["turns"]]
    if kind == "detail":
        return [(None, reply["description"])]
    return [(reply["question"], reply["answer"])]


class Table:
    """Scripted replies per sample key, attempt by attempt (the last one repeats); every key
    without a script gets its good reply."""

    def __init__(self, images: list[str], per_image: int = 1, seed: int = 0, delay: float = 0.0):
        self.scripts: dict[tuple, list] = {}
        self.delay = delay
        self.keys = {
            request_seed(seed, image, kind, i): (image, kind, i)
            for image in images
            for kind in KINDS
            for i in range(per_image)
        }
        self.problems: list[str] = []  # requests the server could not place

    def __call__(self, body: dict, attempt: int):
        key = self.keys.get(body.get("seed"))
        if key is None:
            self.problems.append(f"unknown seed {body.get('seed')}")
            return Status(400, "unknown seed")
        image, kind, index = key
        thing = OBJECTS[int(image.split("_")[1].split(".")[0])]
        context = body["messages"][-1]["content"]
        if (
            body["messages"][0]["content"] != SYSTEM[kind]
            or f"A {thing} in a room." not in context
            or f"- {thing}: [0.250, 0.250, 0.750, 0.750]" not in context
            or body.get("response_format") != {"type": "json_object"}
        ):
            self.problems.append(f"request for {key} does not carry its prompt and context")
            return Status(400, "bad request")
        script = self.scripts.get(key, [Reply(json.dumps(good(kind, image, index)))])
        action = script[min(attempt, len(script) - 1)]
        if isinstance(action, Reply) and self.delay and not action.delay:
            action = Reply(action.content, action.finish_reason, action.usage, self.delay)
        return action


def expected_sample(key: tuple, reply: dict) -> dict:
    image, kind, index = key
    return {"id": f"{image}-{kind}-{index}", "image": image, "rounds": rounds_of(kind, reply)}


def check_samples(out: Path, expected: list[dict]) -> None:
    """The output is valid LLaVA data holding exactly the expected samples, in order."""
    records = json.loads(out.read_text())
    assert [r["id"] for r in records] == [e["id"] for e in expected]
    for position, (record, want) in enumerate(zip(records, expected, strict=True)):
        sample = parse_sample(record, position)  # what training checks
        assert sample.image == want["image"]
        assert record["conversations"][0]["value"].startswith("<image>\n")
        for (question, answer), (want_q, want_a) in zip(sample.turns, want["rounds"], strict=True):
            assert answer == want_a
            assert question == want_q or (want_q is None and question in DETAIL_QUESTIONS)


@pytest.fixture
def scene(tmp_path):
    images, captions, instances = make_images(tmp_path, 6)
    names = [f"img_{i}.png" for i in range(6)]
    return tmp_path, images, [captions, instances], names


class Sleeps(list):
    """Records how long retries would have waited, without waiting."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_good_samples_land_once_and_bad_ones_are_reported(scene):
    root, images, annotations, names = scene
    table = Table(names)
    bad_json = "Sure! Here is a conversation about the image: Q: what is it? A: a pallet."
    leak = {"question": "Where is it?", "answer": "It spans [0.250, 0.250, 0.750, 0.750]."}
    copied = {"description": "The crate's left edge is at 0.250 of the width."}
    table.scripts = {
        ("img_0.png", "conversation", 0): [Status(429, "rate limited", {"Retry-After": "3"}),
                                           Reply(json.dumps(good("conversation", "img_0.png")))],
        ("img_0.png", "detail", 0): [Status(500), Status(503),
                                     Reply(json.dumps(good("detail", "img_0.png")))],
        ("img_1.png", "conversation", 0): [Reply(json.dumps(good("conversation", "img_1.png")),
                                                 delay=6.0),
                                           Reply(json.dumps(good("conversation", "img_1.png")))],
        ("img_1.png", "detail", 0): [Drop(), Reply(json.dumps(good("detail", "img_1.png")))],
        ("img_1.png", "reasoning", 0): [Cut(), Reply(json.dumps(good("reasoning", "img_1.png")))],
        ("img_2.png", "conversation", 0): [Garbage(),
                                           Reply(json.dumps(good("conversation", "img_2.png")))],
        ("img_2.png", "detail", 0): [Reply(bad_json)],
        ("img_2.png", "reasoning", 0): [Reply(json.dumps(leak))],
        ("img_3.png", "conversation", 0): [Reply(json.dumps({"turns": "What is shown?"}))],
        ("img_3.png", "detail", 0): [Reply(json.dumps(copied))],
        ("img_3.png", "reasoning", 0): [Reply('{"question": "Why is the', finish_reason="length")],
        ("img_4.png", "conversation", 0): [
            Reply("```json\n" + json.dumps(good("conversation", "img_4.png")) + "\n```")],
        ("img_4.png", "detail", 0): [Status(400, "This model's maximum context length is 4096")],
        ("img_4.png", "reasoning", 0): [Status(500, "internal error")],
        ("img_5.png", "conversation", 0): [Reply(None)],
        ("img_5.png", "detail", 0): [Reply("[1, 2]")],
        ("img_5.png", "reasoning", 0): [BadEncoding(),
                                        Reply(json.dumps(good("reasoning", "img_5.png")))],
    }  # fmt: skip
    sleeps = Sleeps()
    out = root / "out.json"
    with ChatServer(table) as server:
        result = generate(
            annotations, images, out, endpoint=server.url, concurrency=3, timeout=2.0,
            retries=3, backoff=0.01, progress=False, sleep=sleeps,
        )  # fmt: skip
    assert table.problems == []

    dropped = {key: reason for key, reason, _ in result.dropped}
    assert dropped == {
        ("img_2.png", "detail", 0): "not JSON",
        ("img_2.png", "reasoning", 0): "raw coordinates in an answer",
        ("img_3.png", "conversation", 0): "wrong schema",
        ("img_3.png", "detail", 0): "raw coordinates in an answer",
        ("img_3.png", "reasoning", 0): "cut off at the token limit",
        ("img_5.png", "conversation", 0): "empty reply",
        ("img_5.png", "detail", 0): "wrong schema",
    }
    failed = dict(result.failed)
    assert set(failed) == {("img_4.png", "detail", 0), ("img_4.png", "reasoning", 0)}
    assert failed[("img_4.png", "detail", 0)].startswith("HTTP 400: This model's maximum")
    assert failed[("img_4.png", "reasoning", 0)] == "HTTP 500 (4 tries)"

    bad = set(dropped) | set(failed)
    settled = [(n, k, 0) for n in names for k in KINDS if (n, k, 0) not in bad]
    check_samples(out, [expected_sample(key, good(key[1], key[0])) for key in settled])
    assert result.samples == {"conversation": 4, "detail": 2, "reasoning": 3}

    # Attempts: one per good reply, plus every retry; the rejected request (400) is not retried.
    seeds = {key: request_seed(0, *key) for key in table.keys.values()}
    attempts = {key: server.attempts[seed] for key, seed in seeds.items()}
    assert attempts[("img_0.png", "conversation", 0)] == 2
    assert attempts[("img_0.png", "detail", 0)] == 3
    assert attempts[("img_4.png", "detail", 0)] == 1
    assert attempts[("img_4.png", "reasoning", 0)] == 4
    for key in ("conversation", "detail", "reasoning"):
        assert attempts[("img_1.png", key, 0)] == 2  # slow, dropped, cut: retried once
    assert attempts[("img_5.png", "reasoning", 0)] == 2  # a body gzip cannot undo: retried
    assert len(server.bodies) == sum(attempts.values())
    assert result.requests == server.listed + len(server.bodies) == 1 + 29  # GET /models too
    assert result.retries == {
        "HTTP 429": 1, "HTTP 500": 4, "HTTP 503": 1, "timed out": 1,
        "connection dropped": 2, "malformed response": 2,
    }  # fmt: skip
    assert len(sleeps) == sum(result.retries.values())
    assert 3.0 in sleeps  # the server's Retry-After
    assert all(0.005 <= s <= 0.08 for s in sleeps if s != 3.0)  # 0.01 x 2^attempt, jittered
    # Token accounting: every reply the server sent, and the journal agrees.
    assert [result.prompt_tokens, result.completion_tokens] == server.usage
    assert [result.journal_prompt_tokens, result.journal_completion_tokens] == server.usage


def test_retries_back_off_exponentially_and_honour_retry_after(tmp_path):
    images, captions, instances = make_images(tmp_path, 1)
    table = Table(["img_0.png"])
    key = ("img_0.png", "detail", 0)
    table.scripts[key] = [
        Status(500), Status(502), Status(429, headers={"Retry-After": "7"}), Status(503),
        Status(504), Reply(json.dumps(good("detail", "img_0.png"))),
    ]  # fmt: skip
    sleeps = Sleeps()
    with ChatServer(table) as server:
        result = generate(
            [captions, instances], images, tmp_path / "out.json", endpoint=server.url,
            kinds=["detail"],
            retries=5, backoff=0.4, progress=False, sleep=sleeps,
        )  # fmt: skip
    assert result.samples == {"detail": 1} and server.attempts[request_seed(0, *key)] == 6
    assert len(sleeps) == 5
    for attempt in (0, 1, 3, 4):  # the upper half of 0.4 s x 2^attempt
        assert 0.2 * 2**attempt <= sleeps[attempt] <= 0.4 * 2**attempt
    assert sleeps[2] == 7.0


def test_backoff_is_capped():
    rng = random.Random(0)
    assert 30.0 <= backoff_delay(10, 1.0, 60.0, rng) <= 60.0
    assert backoff_delay(0, 1.0, 60.0, rng, retry_after=3600) == 60.0


def test_requests_in_flight_never_exceed_the_concurrency(scene):
    root, images, annotations, names = scene
    table = Table(names, delay=0.05)
    with ChatServer(table) as server:
        generate(
            annotations, images, root / "out.json", endpoint=server.url, concurrency=3,
            progress=False,
        )  # fmt: skip
    assert len(server.bodies) == 18
    assert 2 <= server.most_in_flight <= 3


def uninterrupted(tmp_path: Path, images: Path, annotations, names, scripts=None) -> bytes:
    table = Table(names)
    table.scripts = dict(scripts or {})
    with ChatServer(table) as server:
        out = tmp_path / "whole" / "out.json"
        generate(annotations, images, out, endpoint=server.url, progress=False, sleep=Sleeps())
    return out.read_bytes()


def test_the_request_budget_stops_the_run_and_a_rerun_completes_it(scene):
    root, images, annotations, names = scene
    table = Table(names)
    first = ("img_0.png", "conversation", 0)
    table.scripts[first] = [Status(500), Reply(json.dumps(good("conversation", "img_0.png")))]
    out = root / "out.json"
    with ChatServer(table) as server:
        result = generate(
            annotations, images, out, endpoint=server.url, model="test-model", concurrency=1,
            max_requests=4, progress=False, sleep=Sleeps(),
        )  # fmt: skip
        assert len(server.bodies) == result.requests == 4  # the retry counted
        assert result.unsent == 18 - 3 and not result.failed
        assert len(json.loads(out.read_text())) == 3
        assert cli(["data", "generate", "--annotations", str(annotations[0]), "--annotations",
                    str(annotations[1]), "--images", str(images), "--out", str(out),
                    "--endpoint", server.url, "--backoff", "0"]) == 0  # fmt: skip
        assert len(server.bodies) == 4 + 15  # only what was missing
    assert out.read_bytes() == uninterrupted(root, images, annotations, names, table.scripts)


def test_samples_of_relabelled_images_are_asked_again(scene):
    """Labels fixed after a run: the samples written from the old labels are stale, and a rerun
    asks them again instead of keeping them."""
    root, images, annotations, names = scene
    out = root / "out.json"
    table = Table(names)
    with ChatServer(table) as server:
        generate(annotations, images, out, endpoint=server.url, progress=False)
        boxes = json.loads(annotations[1].read_text())
        boxes["annotations"].append(  # a second box on img_3.png
            {"id": 99, "image_id": 103, "bbox": [0, 0, 4, 4], "category_id": 4}
        )
        annotations[1].write_text(json.dumps(boxes))
        result = generate(annotations, images, out, endpoint=server.url, progress=False)
        again = server.bodies[18:]
    assert sorted(table.keys[b["seed"]] for b in again) == [
        ("img_3.png", kind, 0) for kind in sorted(KINDS)
    ]
    assert all("- forklift: [0.000, 0.000, 0.083, 0.125]" in b["messages"][-1]["content"]
               for b in again)  # fmt: skip
    assert sum(result.samples.values()) == 18 and len(json.loads(out.read_text())) == 18
    assert result.journal_prompt_tokens == 21 * 100  # the superseded samples cost tokens too


def test_a_torn_journal_line_is_asked_again(scene):
    root, images, annotations, names = scene
    out = root / "out.json"
    table = Table(names)
    with ChatServer(table) as server:
        generate(annotations, images, out, endpoint=server.url, progress=False)
        journal = root / "out.journal.jsonl"
        lines = journal.read_text().splitlines(keepends=True)
        journal.write_text("".join(lines[:-1]) + lines[-1][:25])  # killed mid-line
        torn = json.loads(lines[-1])
        out.unlink()
        generate(annotations, images, out, endpoint=server.url, progress=False)
        assert len(server.bodies) == 19
        assert server.bodies[-1]["seed"] == request_seed(0, torn["image"], torn["kind"], 0)
    assert out.read_bytes() == uninterrupted(root, images, annotations, names)
    assert len(journal.read_text().splitlines()) == 1 + 18


def test_each_journal_line_is_on_disk_before_the_next_is_written(tmp_path, monkeypatch):
    """Power loss: a settled sample's line is flushed and synced as it is appended, so a journal
    loses at most the line being written."""
    path = tmp_path / "out.journal.jsonl"
    synced: list[int] = []  # the journal's size on disk at each fsync of it
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            synced.append(path.stat().st_size)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with Journal(path, {"model": "m"}) as journal:
        for index in range(3):
            entry = {"image": "a.png", "kind": "detail", "index": index, "dropped": "x"}
            journal.append(entry)
            assert synced[-1] == path.stat().st_size, index  # synced with this line in it
    assert len(synced) == 3 and synced == sorted(set(synced))


KILL_AFTER = "LLAVA_EDGE_TEST_KILL_AFTER"


def test_sigkill_then_resume_writes_the_same_file_as_an_uninterrupted_run(tmp_path):
    images, captions, instances = make_images(tmp_path, 8)
    names = [f"img_{i}.png" for i in range(8)]
    scripts = {
        ("img_1.png", "detail", 0): [Status(429), Reply(json.dumps(good("detail", "img_1.png")))],
        ("img_2.png", "reasoning", 0): [Reply("not json")],
        ("img_5.png", "conversation", 0): [Drop(), Reply(
            json.dumps(good("conversation", "img_5.png")))],
    }  # fmt: skip
    expected = uninterrupted(tmp_path, images, [captions, instances], names, scripts)
    settled = 8 * 3  # the dropped reply is settled too: it is journaled, not asked again
    kill_after = int(os.environ.get(KILL_AFTER) or random.randint(1, settled - 1))
    print(f"SIGKILL after {kill_after} journal entries; replay with {KILL_AFTER}={kill_after}")

    out = tmp_path / "resumed" / "out.json"
    journal = out.with_name("out.journal.jsonl")
    table = Table(names, delay=0.02)
    table.scripts = scripts
    command = [
        sys.executable, "-m", "llava_edge.cli", "data", "generate", "--annotations",
        str(captions), "--annotations", str(instances), "--images", str(images), "--out",
        str(out), "--concurrency", "3", "--backoff", "0.01",
    ]  # fmt: skip
    with ChatServer(table) as server:
        command += ["--endpoint", server.url]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            lines = journal.read_bytes().count(b"\n") if journal.exists() else 0
            if lines - 1 >= kill_after:  # the first line is the journal's header
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == -signal.SIGKILL, stderr.decode()
        assert not out.exists()

        resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == expected
    keys = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    keys = [(k["image"], k["kind"], k["index"]) for k in keys]
    assert len(keys) == len(set(keys)) == settled  # nothing asked twice, nothing lost
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_generated_data_trains_with_stage_2_unchanged(tiny_checkpoint, tmp_path, capsys):
    images, captions, instances = make_images(tmp_path, 3)
    names = [f"img_{i}.png" for i in range(3)]
    out = tmp_path / "generated.json"
    with ChatServer(Table(names)) as server:
        generate([captions, instances], images, out, endpoint=server.url, progress=False)
    code = cli([
        "train", "--stage", "2", "--model", str(tiny_checkpoint), "--data", str(out),
        "--images", str(images), "--out", str(tmp_path / "trained"), "--max-steps", "1",
        "--batch-size", "3", "--per-device-batch-size", "3", "--no-gradient-checkpointing",
        "--save-steps", "1000", "--max-length", "1024",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "trained stage 2 for 1 steps" in printed and "skipped" not in printed
    assert (tmp_path / "trained" / "model.safetensors").is_file()
    assert len(SampleFile(out)) == 9


def test_dry_run_prints_the_prompts_and_sends_nothing(scene, capsys):
    root, images, annotations, names = scene
    with ChatServer(Table(names)) as server:
        code = cli(["data", "generate", "--annotations", str(annotations[0]), "--annotations",
                    str(annotations[1]), "--images", str(images), "--out", str(root / "o.json"),
                    "--endpoint", server.url, "--kinds", "detail,reasoning", "--per-image", "2",
                    "--dry-run"])  # fmt: skip
        assert server.bodies == []
    printed = capsys.readouterr().out
    assert code == 0
    assert SYSTEM["detail"] in printed and SYSTEM["reasoning"] in printed
    assert SYSTEM["conversation"] not in printed
    assert "- A pallet in a room.\n- One pallet." in printed
    assert "- pallet: [0.250, 0.250, 0.750, 0.750]" in printed
    assert printed.count("[system]") == 2  # the first image's first prompt of each kind
    assert "24 requests for 6 images; nothing was sent" in printed
    assert not (root / "o.json").exists() and not (root / "o.journal.jsonl").exists()


def test_dry_run_counts_what_a_resumed_run_would_send(scene, capsys):
    root, images, annotations, names = scene
    args = ["data", "generate", "--annotations", str(annotations[0]), "--annotations",
            str(annotations[1]), "--images", str(images), "--out", str(root / "o.json")]  # fmt: skip
    with ChatServer(Table(names)) as server:
        generate(annotations, images, root / "o.json", endpoint=server.url, model="test-model",
                 max_requests=5, concurrency=1, progress=False)  # fmt: skip
        journal = (root / "o.journal.jsonl").read_bytes()
        assert cli([*args, "--dry-run", "--max-requests", "4"]) == 0
        assert len(server.bodies) == 5
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed == (
        f"dry run: 18 requests for 6 images, 13 still to send (5 settled in "
        f"{root / 'o.journal.jsonl'}); --max-requests 4 sends at most 4; nothing was sent"
    )
    assert (root / "o.journal.jsonl").read_bytes() == journal


def test_options_take_effect(scene):
    root, images, annotations, names = scene
    table = Table(names, per_image=2, seed=7)
    with ChatServer(table, models=("only-model",)) as server:
        result = generate(
            annotations, images, root / "out.json", endpoint=server.url + "/chat/completions",
            kinds=["reasoning", "conversation"], per_image=2, max_images=2, seed=7,
            temperature=0.2, max_tokens=300, journal=root / "elsewhere.jsonl", progress=False,
        )  # fmt: skip
        bodies = server.bodies
    assert table.problems == []
    assert result.model == "only-model" and {b["model"] for b in bodies} == {"only-model"}
    assert (root / "elsewhere.jsonl").is_file() and not (root / "out.journal.jsonl").exists()
    assert {(b["temperature"], b["max_tokens"]) for b in bodies} == {(0.2, 300)}
    asked = sorted(table.keys[b["seed"]] for b in bodies)
    assert asked == sorted(
        (n, k, i) for n in names[:2] for k in ("reasoning", "conversation") for i in range(2)
    )
    ids = [r["id"] for r in json.loads((root / "out.json").read_text())]
    assert ids == [f"{n}-{k}-{i}" for n in names[:2] for k in ("reasoning", "conversation")
                   for i in range(2)]  # fmt: skip


def test_the_api_key_is_sent(scene, monkeypatch):
    """The key as the variable holds it, less the newline a key read from a file keeps (with
    it, every request failed as a dropped connection); one no HTTP header can carry is refused
    before any request (it crashed with a UnicodeEncodeError traceback)."""
    root, images, annotations, names = scene
    monkeypatch.setenv("TEST_LLM_KEY", "sk-right\n")
    with ChatServer(Table(names), api_key="sk-right") as server:
        result = generate(
            annotations, images, root / "out.json", endpoint=server.url, model="m",
            api_key_env="TEST_LLM_KEY", max_images=1, progress=False,
        )  # fmt: skip
        assert sum(result.samples.values()) == 3
        for key in ("sk-ключ", "sk-a\x07b"):
            monkeypatch.setenv("TEST_LLM_KEY", key)
            with pytest.raises(LlavaEdgeError, match="TEST_LLM_KEY: the key holds a character"):
                generate(annotations, images, root / "other.json", endpoint=server.url,
                         model="m", api_key_env="TEST_LLM_KEY")  # fmt: skip
        assert len(server.bodies) == 3


def test_a_second_run_on_the_same_journal_is_refused(scene):
    root, images, annotations, names = scene
    with Journal(root / "out.journal.jsonl", {}), ChatServer(Table(names)) as server:
        with pytest.raises(LlavaEdgeError, match="another `llava-edge data generate` is writing"):
            generate(annotations, images, root / "out.json", endpoint=server.url, model="m")
        assert server.bodies == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli(["data", "generate", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing annotations", "annotation file .* does not exist"),
        ("missing images", "image dir .* does not exist"),
        ("llava json as annotations", "is neither COCO annotations .* nor JSONL"),
        ("unknown kind", "--kinds 'detail,story': give each of"),
        ("greedy copies", "--per-image 3 at --temperature 0 asks for the same reply 3 times"),
        ("unreachable endpoint", r"cannot reach http://127\.0\.0\.1:\d+/v1/chat/completions"),
        ("wrong key", r"refused the request: HTTP 401 \(Incorrect API key provided\)"),
        ("unset key variable", "--api-key-env NO_SUCH_VARIABLE_X: that environment variable"),
        ("two models", r"serves 2 models \(a, b\); name one with --model"),
        ("other settings", "journal .* was written with temperature 0.7, not 0.1"),
        (
            "other prompts",
            "journal .* was written with the prompts of another llava-edge version; finish it "
            "with that version, or start over: delete it, or pass another --journal",
        ),
        ("not an url", "is not an http\\(s\\) URL"),
        ("journal is out", "--journal and --out are both"),
        ("out is the labels", "--out .*instances.json is one of the annotation files"),
        ("out is an image", "--out .*img_1.png is the image img_1.png of the annotations"),
        ("wrong path", r"answered HTTP 404 \(no route /chat/completions\); check --endpoint"),
    ],
)
def test_bad_input_is_a_one_line_error(scene, capsys, monkeypatch, case, message):
    root, images, annotations, names = scene
    monkeypatch.setenv("TEST_LLM_KEY", "sk-wrong")
    args = ["--images", str(images), "--out", str(root / "out.json")]
    ann = ["--annotations", str(annotations[0]), "--annotations", str(annotations[1])]
    models = ("a", "b") if case == "two models" else ("m",)
    with ChatServer(Table(names), models=models, api_key="sk-right") as server:
        endpoint = ["--endpoint", server.url]
        if case == "missing annotations":
            ann = ["--annotations", str(root / "nope.json")]
        elif case == "missing images":
            args[1] = str(root / "no-images")
        elif case == "llava json as annotations":
            (root / "llava.json").write_text(json.dumps([{"id": "a", "conversations": []}]))
            ann = ["--annotations", str(root / "llava.json")]
        elif case == "unknown kind":
            args += ["--kinds", "detail,story"]
        elif case == "greedy copies":
            args += ["--per-image", "3", "--temperature", "0"]
        elif case == "unreachable endpoint":
            endpoint = ["--endpoint", f"http://127.0.0.1:{free_port()}/v1", "--model", "m"]
        elif case == "wrong key":
            args += ["--api-key-env", "TEST_LLM_KEY", "--model", "m"]
        elif case == "unset key variable":
            args += ["--api-key-env", "NO_SUCH_VARIABLE_X"]
        elif case in ("other settings", "other prompts"):
            prompts = prompts_version() if case == "other settings" else "0123abcd"
            settings = {"model": "m", "prompts": prompts, "temperature": 0.7,
                        "seed": 0, "max_tokens": 1024}  # fmt: skip
            Journal(root / "out.journal.jsonl", settings).close()
            args += ["--model", "m"]
            args += ["--temperature", "0.1"] if case == "other settings" else []
        elif case == "not an url":
            endpoint = ["--endpoint", "localhost:8080"]
        elif case == "journal is out":
            args += ["--journal", str(root / "out.json")]
        elif case == "out is the labels":
            args[3] = str(annotations[1])
        elif case == "out is an image":
            args[3] = str(images / "img_1.png")
        elif case == "wrong path":
            endpoint = ["--endpoint", server.url.removesuffix("/v1"), "--model", "m"]
        code, err = run_cli(capsys, *ann, *args, *endpoint)
        assert server.bodies == []
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("llava-edge data generate: error: "), err
    assert re.search(message, err), err
    assert not (root / "out.json").exists()
    assert "categories" in json.loads(annotations[1].read_text())  # the labels are intact


@pytest.mark.parametrize(
    "endpoint", ["localhost:8080", "http://127.0.0.1:99999/v1", "http://[::1/v1", "http://:80/v1"]
)
def test_an_endpoint_that_is_no_url_is_a_one_line_error(scene, capsys, endpoint):
    """A port out of range or an open bracket failed inside the HTTP client, with a traceback."""
    root, images, annotations, _ = scene
    code, err = run_cli(capsys, "--annotations", str(annotations[1]), "--images", str(images),
                        "--out", str(root / "out.json"), "--endpoint", endpoint, "--model", "m")  # fmt: skip
    assert code == 1 and err.count("\n") == 1, err
    assert f"--endpoint {endpoint!r} is not an http(s) URL" in err


def test_an_endpoint_that_never_answers_a_chat_completion_stops_the_run(scene, capsys):
    """A web page at the URL (a UI, a proxy's error page) answers 200 to everything: once the
    first request's tries are spent with no chat completion ever, the run stops, rather than
    spend every request's retries on it."""
    root, images, annotations, names = scene
    with ChatServer(lambda body, attempt: Garbage()) as server:
        code, err = run_cli(capsys, "--annotations", str(annotations[1]), "--images", str(images),
                            "--out", str(root / "out.json"), "--endpoint", server.url,
                            "--concurrency", "1", "--retries", "2", "--backoff", "0")  # fmt: skip
        assert len(server.bodies) == 3  # one request's three tries, not all 18 requests'
    assert code == 1 and err.count("\n") == 1, err
    assert "answers HTTP 200, but never with a chat completion (<html>" in err, err


def test_failed_requests_make_the_exit_status_non_zero(scene, capsys):
    root, images, annotations, names = scene
    table = Table(names)
    table.scripts[("img_0.png", "detail", 0)] = [Status(503, "overloaded")]
    with ChatServer(table) as server:
        code = cli(["data", "generate", "--annotations", str(annotations[0]), "--annotations",
                    str(annotations[1]), "--images", str(images), "--out", str(root / "out.json"),
                    "--endpoint", server.url, "--retries", "1", "--backoff", "0",
                    "--max-images", "1"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 1
    assert "1 requests failed (run again to retry them):" in printed
    assert "img_0.png detail #0: HTTP 503 (2 tries)" in printed
    assert "wrote 2 samples (conversation 1, reasoning 1) about 1 images" in printed


def test_usage_counts_that_are_no_numbers_keep_the_reply(scene):
    """A usage count of NaN or 1e400 (JSON a server may write) is counted as 0: the reply is
    kept (1e400 crashed the run with an OverflowError; NaN took the reply for malformed)."""
    root, images, annotations, _ = scene
    reply = Reply(json.dumps({"description": "A single crate fills the room."}),
                  usage=(float("inf"), float("nan")))  # fmt: skip
    with ChatServer(lambda body, attempt: reply) as server:
        result = generate(annotations, images, root / "out.json", endpoint=server.url,
                          model="m", kinds=["detail"], max_images=2, retries=0)  # fmt: skip
    assert sum(result.samples.values()) == 2 and not result.failed
    assert [result.prompt_tokens, result.completion_tokens] == [0, 0]


def test_missing_http_client_is_a_one_line_error(scene, monkeypatch):
    root, images, annotations, names = scene
    monkeypatch.setitem(sys.modules, "httpx", None)
    monkeypatch.delitem(sys.modules, "llava_edge.training.datagen.client", raising=False)
    with pytest.raises(LlavaEdgeError, match=r"pip install 'llava-edge\[data\]'"):
        generate(annotations, images, root / "out.json", endpoint="http://127.0.0.1:9/v1")


def test_generate_runs_where_an_event_loop_already_runs(scene):
    """From a notebook (whose thread runs an event loop) the Python API works as anywhere."""
    import asyncio

    root, images, annotations, names = scene

    async def notebook_cell(url):
        return generate(annotations, images, root / "out.json", endpoint=url, max_images=1,
                        progress=False)  # fmt: skip

    with ChatServer(Table(names)) as server:
        result = asyncio.run(notebook_cell(server.url))
    assert sum(result.samples.values()) == 3


# The CLI run as Ctrl-C finds it in a terminal. A process started in the background by a shell
# (`make test &`, nohup) inherits SIGINT ignored, and Python keeps an inherited SIG_IGN, so the
# child would never see the test's Ctrl-C.
INTERACTIVE_CLI = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('llava_edge.cli', run_name='__main__')"
)


def test_ctrl_c_stops_at_once_and_keeps_the_journal(scene):
    root, images, annotations, names = scene
    table = Table(names)
    table.scripts[("img_0.png", "detail", 0)] = [Reply(json.dumps(good("detail", "img_0.png")),
                                                       delay=30)]  # fmt: skip
    out = root / "out.json"
    command = [sys.executable, "-c", INTERACTIVE_CLI, "data", "generate", "--annotations",
               str(annotations[0]), "--annotations", str(annotations[1]), "--images", str(images),
               "--out", str(out), "--max-images", "1"]  # fmt: skip
    with ChatServer(table) as server:
        # PYTHONFAULTHANDLER: a child that does not stop is made to print where it is stuck
        env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
        process = subprocess.Popen(
            [*command, "--endpoint", server.url], stderr=subprocess.PIPE, env=env
        )
        journal = root / "out.journal.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            not journal.exists() or journal.read_bytes().count(b"\n") < 3
        ):
            time.sleep(0.01)  # the two quick samples are in; the slow one is in flight
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            _, err = process.communicate()
            pytest.fail(f"still running 20 s after Ctrl-C:\n{err.decode()}")
        took = time.monotonic() - interrupted
    assert process.returncode == 130, err.decode()
    assert err.decode().strip().endswith("llava-edge data generate: interrupted")
    assert took < 10  # not held up by the reply still 30 s away
    entries = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert sorted(e["kind"] for e in entries) == ["conversation", "reasoning"]


def test_a_file_that_is_not_a_journal_is_left_alone(scene):
    root, images, annotations, names = scene
    notes = root / "notes.txt"
    notes.write_text("my own notes, no newline at the end")
    with pytest.raises(LlavaEdgeError, match="is not a journal of `llava-edge data generate`"):
        generate(annotations, images, root / "out.json", journal=notes, dry_run=True)
    with pytest.raises(LlavaEdgeError, match="is not a journal of `llava-edge data generate`"):
        generate(annotations, images, root / "out.json", endpoint="http://127.0.0.1:9/v1",
                 model="m", journal=notes)  # fmt: skip
    assert notes.read_text() == "my own notes, no newline at the end"
    picture = images / "img_0.png"  # not UTF-8 text: refused as not a journal, left as it was
    before = picture.read_bytes()
    for dry_run in (True, False):
        with pytest.raises(LlavaEdgeError, match="is not a journal of `llava-edge data generate`"):
            generate(annotations, images, root / "out.json", endpoint="http://127.0.0.1:9/v1",
                     model="m", journal=picture, dry_run=dry_run)  # fmt: skip
    assert picture.read_bytes() == before


def test_sigterm_stops_the_run_with_one_line_and_a_rerun_completes_it(scene):
    """systemd or a job scheduler stops a run with SIGTERM wherever it is: in a request, in a
    journal write. It ends with exit 143 and one line, every time, and loses nothing."""
    root, images, annotations, names = scene
    out = root / "out.json"
    journal = root / "out.journal.jsonl"
    command = [sys.executable, "-m", "llava_edge.cli", "data", "generate", "--annotations",
               str(annotations[0]), "--annotations", str(annotations[1]), "--images",
               str(images), "--out", str(out), "--concurrency", "3"]  # fmt: skip
    with ChatServer(Table(names, delay=0.02)) as server:
        command += ["--endpoint", server.url]
        for settled in (2, 5, 9):  # three runs, each stopped a few samples further on
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                not journal.exists() or journal.read_bytes().count(b"\n") <= settled
            ):
                time.sleep(0.002)
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=30)
            assert process.returncode == 143, err.decode()
            assert err.decode() == "llava-edge data generate: terminated\n"
        assert not out.exists()
        assert subprocess.run(command, capture_output=True, timeout=120).returncode == 0
    assert out.read_bytes() == uninterrupted(root, images, annotations, names)
    entries = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert len({(e["image"], e["kind"], e["index"]) for e in entries}) == len(entries) == 18


def test_the_request_budget_holds_for_the_model_list(scene):
    """GET /models is an HTTP request too: --max-requests 0 sends nothing at all, and the model
    list is charged to the budget like any chat request."""
    root, images, annotations, names = scene
    with ChatServer(Table(names)) as server:
        with pytest.raises(LlavaEdgeError, match="--max-requests 0 leaves no request .* --model"):
            generate(annotations, images, root / "out.json", endpoint=server.url,
                     max_requests=0, progress=False)  # fmt: skip
        assert server.listed == 0 and server.bodies == []
        result = generate(annotations, images, root / "out.json", endpoint=server.url,
                          max_requests=3, concurrency=1, progress=False)  # fmt: skip
        assert server.listed == 1 and len(server.bodies) == 2
        assert result.requests == 3 and result.unsent == 16


def test_a_higher_token_limit_asks_again_only_the_replies_cut_off(scene, capsys):
    """The report says of a reply cut off at --max-tokens: raise --max-tokens. A rerun with a
    higher limit resumes the journal and asks again those replies only; the others stand."""
    root, images, annotations, names = scene
    table = Table(names)
    cut = ("img_2.png", "detail", 0)
    table.scripts[cut] = [Reply('{"description": "A long', finish_reason="length"),
                          Reply(json.dumps(good("detail", "img_2.png")))]  # fmt: skip
    out = root / "out.json"
    with ChatServer(table) as server:
        first = generate(annotations, images, out, endpoint=server.url, max_tokens=64,
                         progress=False)  # fmt: skip
        assert [(key, reason) for key, reason, _ in first.dropped] == [
            (cut, "cut off at the token limit")
        ]
        args = ["data", "generate", "--annotations", str(annotations[0]), "--annotations",
                str(annotations[1]), "--images", str(images), "--out", str(out),
                "--endpoint", server.url, "--max-tokens", "128"]  # fmt: skip
        assert cli([*args, "--dry-run"]) == 0
        assert "1 still to send" in capsys.readouterr().out
        assert cli(args) == 0
        assert len(server.bodies) == 19 and server.bodies[-1]["max_tokens"] == 128
        assert server.bodies[-1]["seed"] == request_seed(0, *cut)
        assert cli(args) == 0 and len(server.bodies) == 19  # settled now
        assert cli([*args[:-1], "64"]) == 0 and len(server.bodies) == 19  # and kept at 64
    assert len(json.loads(out.read_text())) == 18


def test_an_exhausted_quota_stops_the_run_at_once(scene, capsys):
    """A hosted API out of credit answers 429 insufficient_quota to every request: no retry or
    later request can succeed, so the run stops at the first with the server's words."""
    root, images, annotations, names = scene
    quota = Status(429, "You exceeded your current quota, please check your plan and billing "
                   "details.", type="insufficient_quota")  # fmt: skip
    with ChatServer(lambda body, attempt: quota) as server:
        code, err = run_cli(capsys, "--annotations", str(annotations[1]), "--images", str(images),
                            "--out", str(root / "out.json"), "--endpoint", server.url,
                            "--model", "m", "--concurrency", "1", "--backoff", "0")  # fmt: skip
        assert len(server.bodies) == 1
    assert code == 1 and err.count("\n") == 1, err
    assert "HTTP 429 (You exceeded your current quota" in err and "billing" in err, err


def test_a_reply_with_unicode_line_separators_resumes(scene):
    """JSON keeps U+2028, U+2029 and U+0085 inside a string as they are: they are not the
    journal's line ends, and the journal reads back after them."""
    root, images, annotations, names = scene
    table = Table(names)
    text = {"description": "A pallet.\u2028Next to it, a crate.\u2029And a cart\x85."}
    table.scripts[("img_1.png", "detail", 0)] = [Reply(json.dumps(text, ensure_ascii=False))]
    out = root / "out.json"
    with ChatServer(table) as server:
        generate(annotations, images, out, endpoint=server.url, progress=False)
        first = out.read_bytes()
        generate(annotations, images, out, endpoint=server.url, progress=False)
        assert len(server.bodies) == 18
    assert out.read_bytes() == first
    assert text["description"] in {r["conversations"][1]["value"] for r in json.loads(first)}


def test_a_dry_run_refuses_what_the_run_would_refuse(scene, capsys):
    """A dry run is the look before spending: settings the journal would refuse are said then,
    not counted as settled."""
    root, images, annotations, names = scene
    out = root / "out.json"
    with ChatServer(Table(names)) as server:
        generate(annotations, images, out, endpoint=server.url, max_images=1, progress=False)
    args = ["data", "generate", "--annotations", str(annotations[0]), "--annotations",
            str(annotations[1]), "--images", str(images), "--out", str(out), "--dry-run"]  # fmt: skip
    assert cli([*args, "--temperature", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "was written with temperature 0.7, not 0.2" in err and err.count("\n") == 1, err
    assert cli([*args, "--model", "other"]) == 1
    assert "was written with model 'test-model', not 'other'" in capsys.readouterr().err
    assert cli([*args, "--max-requests", "-1"]) == 1
    assert "--max-requests must be 0 or more" in capsys.readouterr().err
    assert cli([*args, "--timeout", "0"]) == 1
    assert "--timeout must be positive" in capsys.readouterr().err
    assert cli(args) == 0  # the model left out: the endpoint names it, not the dry run
    assert "15 still to send (3 settled" in capsys.readouterr().out


@pytest.mark.parametrize(
    "option, message",
    [
        (["--temperature", "nan"], "--temperature must be a number 0 or more"),
        (["--temperature", "inf"], "--temperature must be a number 0 or more"),
        (["--timeout", "nan"], "--timeout must be positive"),
        (["--backoff", "nan"], "--backoff 0 or more"),
    ],
)
def test_an_option_that_is_no_number_is_a_one_line_error(scene, capsys, option, message):
    """NaN passed every bound check: the request body could not be written as JSON (a
    traceback), a NaN timeout crashed in the HTTP client, a NaN backoff waited the longest."""
    root, images, annotations, _ = scene
    with ChatServer(lambda body, attempt: Status(503)) as server:
        code, err = run_cli(capsys, "--annotations", str(annotations[1]), "--images", str(images),
                            "--out", str(root / "out.json"), "--endpoint", server.url,
                            "--model", "m", *option)  # fmt: skip
        assert server.bodies == []
    assert code == 1 and err.count("\n") == 1 and message in err, err


def test_a_reply_with_a_broken_surrogate_is_kept_or_dropped_not_a_crash(scene):
    """An LLM that splits an emoji can send half of a UTF-16 pair as a JSON escape ("\\ud83d"):
    text no UTF-8 file can hold. The run must not die on it (a rerun would ask the same reply
    and die again)."""
    root, images, annotations, names = scene
    table = Table(names)
    key = ("img_1.png", "detail", 0)  # the escape inside the reply's JSON
    table.scripts[key] = [Reply('{"description": "A crate \\ud83d and a cart."}')]
    other = ("img_2.png", "reasoning", 0)  # in the HTTP body's JSON, around a reply not JSON
    table.scripts[other] = [Reply("Sure! \ud83d")]
    out = root / "out.json"
    with ChatServer(table) as server:
        result = generate(annotations, images, out, endpoint=server.url, progress=False)
        generate(annotations, images, out, endpoint=server.url, progress=False)
        assert len(server.bodies) == 18  # settled: not asked again
    assert sum(result.samples.values()) + len(result.dropped) == 18
    assert sorted((k, reason) for k, reason, _ in result.dropped) == [
        (key, "not UTF-8 text"), (other, "not JSON")
    ]  # fmt: skip
    assert len(SampleFile(out)) == 16


def test_a_dry_run_lists_the_images_it_leaves_out(scene, capsys):
    """The look before spending shows what the run's report would: images left out (a wrong
    --images for half the set shows here, not after the run)."""
    root, images, annotations, names = scene
    extra = root / "more.jsonl"
    extra.write_text(json.dumps({"image": "img_9.png", "captions": ["A ladder."]}) + "\n")
    assert cli(["data", "generate", "--annotations", str(annotations[1]), "--annotations",
                str(extra), "--images", str(images), "--out", str(root / "o.json"),
                "--dry-run"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "left out 1 annotated images:\n  img_9.png: no file " in printed, printed


def test_the_image_check_shows_its_progress_on_a_terminal(scene, capsys, monkeypatch):
    """Each annotated image's header is read for its size before any request (minutes for
    COCO on a cold disk): a bar shows it on a terminal, a dry run's too, and none with
    progress=False."""
    root, images, annotations, _ = scene
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["data", "generate", "--images", str(images), "--out", str(root / "o.json")]
    argv += ["--annotations", str(annotations[0]), "--model", "m", "--dry-run"]
    assert cli(argv) == 0
    assert "checking images: 100%|" in capsys.readouterr().err
    generate(annotations, images, root / "o.json", model="m", dry_run=True, progress=False)
    assert capsys.readouterr().err == ""
