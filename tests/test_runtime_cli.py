"""`llava-edge run`, `chat` and `bench` as a user drives them."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import sys

import numpy as np
import pytest
from PIL import Image

from llava_edge.cli import main
from llava_edge.runtime import Pipeline
from llava_edge.runtime.interactive import chat_loop


def write_image(path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), np.uint8)).save(path)
    return path


def test_run_streams_then_reports_speed(tiny_model_dir, tmp_path, capsys):
    image = write_image(tmp_path / "a.png")
    assert (
        main(
            [
                "run",
                str(tiny_model_dir),
                "--image",
                str(image),
                "--prompt",
                "Hi?",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    with Pipeline.load(tiny_model_dir) as pipe:
        assert out == pipe.generate(str(image), "Hi?", max_new_tokens=5) + "\n"
    assert "tokens/s" in err


def test_run_cut_short_ends_its_line_before_the_error(tiny_model_dir, monkeypatch, capsys):
    """A timeout or Ctrl-C mid-answer: the partial answer's line ends, so the error is not glued
    to it in the terminal and a script reading stdout gets whole lines."""
    from llava_edge.errors import LlavaEdgeError

    def cut(*_args, **_kwargs):
        yield "half an ans"
        raise LlavaEdgeError("the request ran past its time limit of 1 s")

    monkeypatch.setattr(Pipeline, "stream", cut)
    assert main(["run", str(tiny_model_dir), "--prompt", "Hi?"]) == 1
    out, err = capsys.readouterr()
    assert out == "half an ans\n"
    assert err.startswith("llava-edge run: error: the request ran past its time limit")


def test_run_with_top_p_zero_answers_greedily(tiny_model_dir, capsys):
    argv = ["run", str(tiny_model_dir), "--prompt", "Hi?", "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    greedy = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*argv, "--temperature", "2", "--top-p", "0", "--seed", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == greedy


def test_run_takes_several_images(tiny_model_dir, tmp_path, capsys):
    first = write_image(tmp_path / "a.png")
    second = tmp_path / "b.png"
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(second)
    argv = ["run", str(tiny_model_dir), "--image", str(first), "--image", str(second)]
    assert main([*argv, "--prompt", "What changed?", "--max-new-tokens", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    with Pipeline.load(tiny_model_dir) as pipe:
        want = pipe.answer([str(first), str(second)], "What changed?", max_new_tokens=4)
        image_id = pipe.manifest.tokens.image_token_id
        assert got["prompt_token_ids"].count(image_id) == 2 * pipe.manifest.num_image_tokens
    assert got["prompt_token_ids"] == want.prompt_token_ids
    assert got["token_ids"] == want.token_ids
    assert main([*argv, "--prompt", "<image> only one?"]) == 1
    assert "2 image(s) were given" in capsys.readouterr().err


def test_chat_loop_keeps_going_after_errors(tiny_model_dir, tmp_path):
    image = write_image(tmp_path / "a.png")
    lines = iter(
        [
            "What is it?",
            "/image /no/such.png",
            "/image " + str(image),
            "And now?",
            "/reset",
            "/quit",
        ]
    )
    out = io.StringIO()
    with Pipeline.load(tiny_model_dir) as pipe:
        chat_loop(pipe, str(image), {"max_new_tokens": 4}, read=lambda _: next(lines), out=out)
        first = pipe.generate(str(image), "What is it?", max_new_tokens=4)
    text = out.getvalue().splitlines()
    assert text[1] == first
    assert text[2].startswith("error:") and "does not exist" in text[2]
    assert text[3].startswith("(new conversation about")
    assert text[-1] == "(new conversation)"


def test_bench_json_with_baseline_and_plot(tiny_model_dir, tiny_checkpoint, tmp_path, capsys):
    plot = tmp_path / "chart.png"
    args = [
        "bench",
        str(tiny_model_dir),
        "--baseline",
        str(tiny_checkpoint),
        "--runs",
        "2",
        "--new-tokens",
        "4",
    ]
    assert main([*args, "--json", "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    for side in ("llava_edge", "transformers"):
        assert report[side]["runs"] == 2 and report[side]["decode_tokens_per_s"] > 0
    assert report["llava_edge"]["prompt_tokens"] == report["transformers"]["prompt_tokens"]
    assert report["ratios"]["decode_speedup"] == round(
        report["llava_edge"]["decode_tokens_per_s"] / report["transformers"]["decode_tokens_per_s"],
        3,
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_questions_are_exactly_the_tokens_asked_for_with_a_byte_level_bpe():
    """A Qwen-like tokenizer, whose merges make a cut character cost two tokens (36 asked for,
    35 given by the first cut under): every length from 1 to 200 is hit exactly, and where no
    cut hits one, the longest under it is taken."""
    from hf_checkpoints import qwen_tokenizer

    from llava_edge.runtime.bench import question

    class Codec:  # TextCodec's encode, on the tokenizer alone
        def __init__(self) -> None:
            self.tokenizer = qwen_tokenizer()

        def encode(self, text: str, first: bool) -> list[int]:
            return self.tokenizer(text, add_special_tokens=first)["input_ids"]

    codec = Codec()
    counts = {n: len(codec.encode(question(codec, n), first=False)) for n in range(1, 201)}
    assert {n: c for n, c in counts.items() if c != n} == {}

    class Pairs:  # two tokens a character: no odd count can be hit, the longest under is taken
        def encode(self, text: str, first: bool) -> list[int]:
            return [0] * 2 * len(text)

    assert question(Pairs(), 7) == "ple"


def test_version_is_the_installed_distributions(capsys):
    """`llava-edge --version` names the release pip installed (pyproject.toml's version and
    llava_edge.__version__ are kept by hand in two places)."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"llava-edge {version('llava-edge')}"


@pytest.mark.parametrize("command", ["run", "watch"])
def test_a_time_limit_counts_from_a_loaded_model(
    tiny_model_dir, tmp_path, monkeypatch, capsys, command
):
    """`--timeout` is what one answer may take: a decoder that takes longer than that to open
    (a large model's cold start) does not time out the first answer."""
    import time

    from llava_edge.runtime.onnx_backend import OnnxBackend

    opened = OnnxBackend._open

    def slow_open(self, name, *args, **kwargs):
        if name == "decoder":
            time.sleep(3.0)
        return opened(self, name, *args, **kwargs)

    monkeypatch.setattr(OnnxBackend, "_open", slow_open)
    folder = tmp_path / "frames"
    folder.mkdir()
    image = write_image(folder / "a.png")
    argv = [command, str(tiny_model_dir), "--prompt", "Hi?", "--max-new-tokens", "2"]
    argv += ["--timeout", "2.5", "--json"] if command == "run" else ["--timeout", "2.5"]
    if command == "run":
        argv += ["--image", str(image)]
    else:
        argv += ["--source", str(folder), "--jsonl"]
    assert main(argv) == 0, capsys.readouterr().err
    answer = json.loads(capsys.readouterr().out.splitlines()[0])
    assert answer.get("error") is None and answer["text"]


def test_chat_with_standard_input_closed_ends_as_at_its_end(tiny_model_dir, monkeypatch, capsys):
    """`llava-edge chat MODEL <&-` (a service started with no standard input): Python has no
    sys.stdin, and the chat ends as at the end of its input."""
    monkeypatch.setattr("sys.stdin", None)
    assert main(["chat", str(tiny_model_dir), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("Ask anything")


def test_an_image_on_standard_input_is_given_as_a_dash(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """`camera-snap | llava-edge run MODEL --image - --prompt ...`: `-` is standard input, as
    for most tools; a chat reads its questions there, so it refuses one."""
    image = write_image(tmp_path / "a.png")
    argv = ["run", str(tiny_model_dir), "--prompt", "Hi?", "--max-new-tokens", "4", "--json"]
    assert main([*argv, "--image", str(image)]) == 0
    expected = json.loads(capsys.readouterr().out)["text"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(image.read_bytes())))
    assert main([*argv, "--image", "-"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["text"] == expected
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))  # now read to its end
    chat = ["chat", str(tiny_model_dir), "--image", "-"]
    for command in ([*argv, "--image", "-"], [*argv, "--image", "-", "--image", "-"], chat):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "standard input" in err


def test_a_video_given_as_an_image_is_named_as_one(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`run --image clip.mp4` (or a video piped to `--image -`) was 'not an image PIL can read
    (EPS, ICO ...)': it says it is a video, and which command reads videos."""
    import av

    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), "rgb24")
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    argv = ["run", str(tiny_model_dir), "--prompt", "Hi?", "--max-new-tokens", "2"]
    cases = [
        (str(video), b"", f"is a video (MP4), not an image; `llava-edge watch --source {video}`"),
        ("-", video.read_bytes(), "is a video (MP4), not an image; `llava-edge watch --source -`"),
    ]
    for image, piped, message in cases:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(piped)))
        assert main([*argv, "--image", image]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err


def test_base64_given_as_an_image_is_named_with_a_command_line_remedy(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """`base64 img | run --image -` was 'not an image PIL can read (EPS, ICO ...)';
    `--image data:...` and a bare base64 string were answered with a Python remedy
    (base64.b64decode). Each says what it is, and what to do on the command line."""
    import base64

    text = base64.encodebytes(write_image(tmp_path / "a.png").read_bytes()).decode()
    argv = ["run", str(tiny_model_dir), "--prompt", "Hi?", "--max-new-tokens", "2"]
    cases = [
        ("-", text.encode(), "is base64 text of a PNG image, not the image: `base64 -d`"),
        ("-", b"data:image/png;base64," + text.encode(), "is a data: URI, not the image: `base64"),
        ("data:image/png;base64," + text, b"", "a data: URI is not an image file: `base64 -d`"),
        (text.replace("\n", ""), b"", "is base64 of a PNG image, not a path: `base64 -d`"),
    ]
    for image, piped, message in cases:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(piped)))
        assert main([*argv, "--image", image]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
        assert len(err) < 400


def test_chat_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(tiny_model_dir, monkeypatch):
    """A UTF-8 locale reads and writes the terminal strictly: a line of other bytes (a Latin-1
    terminal, a binary paste) is the question's one-line error, and a path of such bytes is
    named as typed, not the chat's traceback."""
    typed = b"caf\xe9?\n/image /no/caf\xe9.png\nWhat is it?\n"
    shown = io.BytesIO()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8"))
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(shown, encoding="utf-8"))
    assert main(["chat", str(tiny_model_dir), "--max-new-tokens", "2"]) == 0
    sys.stdout.flush()
    out = shown.getvalue()
    with Pipeline.load(tiny_model_dir) as pipe:
        answer = pipe.chat(None, max_new_tokens=2).ask("What is it?")
    assert b"not valid UTF-8" in out and b"/no/caf\xe9.png does not exist" in out, out
    assert out.endswith(f"> {answer}\n> \n".encode()), out


def test_chat_on_a_terminal_reads_a_question_longer_than_its_line_buffer(tiny_model_dir):
    """A terminal in its line mode keeps 4,095 bytes of a line and drops the rest: a long pasted
    question would be asked cut short, unsaid. Read with line editing, it arrives whole (here too
    long for the model, as the whole question is)."""
    question = "word " * 1200  # 6,000 bytes; its first 4,095 fit the tiny model's context
    pid, terminal = pty.fork()
    if pid == 0:  # the child: `llava-edge chat` on the terminal
        os.execv(
            sys.executable, [sys.executable, "-m", "llava_edge.cli", "chat", str(tiny_model_dir)]
        )
    said = b""

    def read_until(done) -> None:
        nonlocal said
        while not done():
            ready, _, _ = select.select([terminal], [], [], 30)
            assert ready, said[-500:]
            said += os.read(terminal, 1 << 16)

    try:
        read_until(lambda: said.endswith(b"> "))  # asked once it reads the terminal
        os.write(terminal, question.encode() + b"\n")
        read_until(lambda: b"error:" in said or said.count(b"\n> ") > 1)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(terminal)
    assert b"shorten it" in said, said[-500:]
