"""Bad requests and broken model dirs get clear errors; the pipeline keeps answering after them;
`import llava_edge.runtime` stays free of torch and transformers."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from llava_edge.cli import main
from llava_edge.errors import LlavaEdgeError, batch_failed
from llava_edge.runtime import BatchFailed, Limits, Pipeline, PromptTooLong, TimedOut, TooLarge


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    with Pipeline.load(tiny_model_dir) as p:
        yield p


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "ok.png"
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(path)
    return path


def bad_requests(tmp_path, image):
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:50])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00" * 100)
    return [
        (dict(image=zero, prompt="What?"), "empty file"),
        (dict(image=truncated, prompt="What?"), "corrupt or truncated"),
        (dict(image=garbage, prompt="What?"), "not an image"),
        (dict(image=tmp_path / "missing.png", prompt="What?"), "does not exist"),
        (dict(image=None, prompt="<image>\nWhat?"), "no image was given"),
        (dict(image=image, prompt="What?", raw=True), "no <image> placeholder"),
        (dict(image=image, prompt="<image> and <image>"), "2 <image> placeholder.*1 image"),
        (dict(image=image, prompt="word " * 2000), "context"),
        (dict(image=image, prompt="What?", max_new_tokens=0), "max_new_tokens"),
        (dict(image=image, prompt="What?", max_new_tokens=-3), "max_new_tokens"),
        (dict(image=image, prompt="What?", temperature=-1.0), "temperature"),
        (dict(image=image, prompt="What?", top_p=-0.1), r"top_p must be in \[0, 1\]"),
        (dict(image=image, prompt="What?", top_p=1.5), r"top_p must be in \[0, 1\]"),
        (dict(image=image, prompt="What?", bogus=1), "unknown generation option"),
        (dict(image=image, prompt="What?", temperature=1.0, seed=-1), "seed must be"),
        (dict(image=image, prompt="What?", seed="abc"), "seed must be"),
        (dict(image=image, prompt="What?", seed=1.5), "seed must be"),
        (dict(image=image, prompt="What?", temperature="0.5"), "temperature must be a number"),
        (dict(image=image, prompt="What?", temperature=float("nan")), "temperature must be in"),
        (dict(image=image, prompt="What?", top_p=None), "top_p must be a number"),
        (dict(image=image, prompt="What?", repetition_penalty="1.1"), "repetition_penalty"),
        (dict(image=image, prompt="What?", max_new_tokens=True), "max_new_tokens"),
        (dict(image=image, prompt="What?", stop=5), "stop must be"),
        (dict(image=image, prompt="What?", stop=[""]), "stop must be"),
        (dict(image=image, prompt="What?", stop=list("abcdefghijklmnopq")), "at most 16 strings"),
        (dict(image=image, prompt="What?", stop="x" * 257), "at most 256 characters"),
        (dict(image=image, prompt="What?", ignore_eos="no"), "ignore_eos must be"),
        (dict(image=None, prompt="  "), "prompt is empty"),
        (dict(image=5, prompt="What?"), "an image is a path, bytes.*got int"),
        (dict(image={}, prompt="What?"), "an image is a path, bytes.*got dict"),
        (dict(image=[None], prompt="What?"), "got NoneType"),
        (dict(image=np.array([[None]]), prompt="What?"), "not pixel values"),
        (dict(image=image, prompt=b"\xff\xfe not text"), "prompt must be text"),
        (
            dict(image=image, prompt="\udcff\udcfe from bytes that were not UTF-8"),
            "not valid UTF-8",
        ),
    ]


def test_bad_requests_fail_clearly_and_the_pipeline_keeps_answering(pipe, tmp_path, image):
    expected = pipe.answer(image, "What?", max_new_tokens=6).token_ids
    for request, message in bad_requests(tmp_path, image):
        request = dict(request)
        with pytest.raises(LlavaEdgeError, match=message):
            pipe.answer(request.pop("image"), request.pop("prompt"), **request)
        assert pipe.answer(image, "What?", max_new_tokens=6).token_ids == expected


def test_image_over_pil_limit_without_a_pixel_limit(pipe, tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    monkeypatch.setattr(pipe, "limits", Limits(max_image_pixels=None))
    with pytest.raises(LlavaEdgeError, match="PIL's decompression-bomb limit"):
        pipe.generate(path, "What?")


def test_long_answers_stop_at_the_context(pipe, image):
    """A prompt that fits but leaves little room ends with finish_reason 'length', not an error."""
    room = pipe.manifest.text.max_context
    prompt_len = len(pipe.answer(image, "word " * 100, max_new_tokens=1).prompt_token_ids)
    answer = pipe.answer(image, "word " * 100, max_new_tokens=room, ignore_eos=True)
    assert len(answer.token_ids) == room - prompt_len and answer.finish_reason == "length"


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def test_missing_graph(model_copy):
    (model_copy / "projector.onnx").unlink()
    with pytest.raises(LlavaEdgeError, match="projector.onnx is missing"):
        Pipeline.load(model_copy)


def test_truncated_graph(model_copy):
    path = model_copy / "decoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(LlavaEdgeError, match="truncated or replaced"):
        Pipeline.load(model_copy)


def test_altered_graph_fails_its_checksum(model_copy):
    path = model_copy / "vision_encoder.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(LlavaEdgeError, match="checksum"):
        Pipeline.load(model_copy, verify_files=True)
    with pytest.raises(LlavaEdgeError, match="checksum"):  # new to this machine: hashed anyway
        Pipeline.load(model_copy)


def test_manifest_problems(model_copy):
    manifest = json.loads((model_copy / "manifest.json").read_text())
    (model_copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(LlavaEdgeError, match="newer than this llava-edge"):
        Pipeline.load(model_copy)
    del manifest["text"]
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LlavaEdgeError, match="'text' is missing"):
        Pipeline.load(model_copy)
    (model_copy / "manifest.json").write_text("{not json")
    with pytest.raises(LlavaEdgeError, match="not valid JSON"):
        Pipeline.load(model_copy)


def test_a_kv_layout_the_runtime_does_not_implement_is_refused(model_copy):
    """A decoder whose `present` holds past + new (Hugging Face's layout) cannot be appended."""
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["kv"]["present_holds"] = "past+new"
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LlavaEdgeError, match="holding 'past\\+new'.*only the new tokens"):
        Pipeline.load(model_copy, verify_files=False)


def test_cli_reports_errors_in_one_line(tiny_model_dir, tmp_path, capsys):
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    assert main(["run", str(tiny_model_dir), "--image", str(zero), "--prompt", "What?"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty file" in err and "Traceback" not in err
    assert main(["run", str(tmp_path), "--prompt", "What?"]) == 1
    assert "not a llava-edge model dir" in capsys.readouterr().err
    not_utf8 = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_edge.cli",
            "run",
            str(tiny_model_dir),
            "--prompt",
            b"\xff\xfe hi",
        ],
        capture_output=True,
    )
    assert not_utf8.returncode == 1 and b"not valid UTF-8" in not_utf8.stderr
    assert b"Traceback" not in not_utf8.stderr


def test_runtime_imports_neither_torch_nor_transformers(tiny_model_dir, image):
    heavy = ("torch", "transformers", "optimum", "peft", "starlette", "uvicorn", "httpx")
    code = (
        "import sys\n"
        "from llava_edge.runtime import BatchEngine, Pipeline\n"
        f"with Pipeline.load({str(tiny_model_dir)!r}) as p:\n"
        f"    p.generate({str(image)!r}, 'What?', max_new_tokens=3)\n"
        f"    with BatchEngine(p) as engine:\n"
        f"        engine.submit({str(image)!r}, 'What?', max_new_tokens=3).result()\n"
        f"heavy = sorted(m for m in {heavy!r} if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_deployment_limits(tiny_model_dir, image):
    from llava_edge.runtime import Limits

    limits = Limits(max_image_pixels=100, max_prompt_tokens=100, max_new_tokens=8, timeout_s=1e-9)
    with Pipeline.load(tiny_model_dir, limits=limits) as pipe:
        with pytest.raises(LlavaEdgeError, match="over the limit of 100"):
            pipe.generate(image, "What?")
        with pytest.raises(LlavaEdgeError, match="over this deployment.s limit of 100"):
            pipe.generate(None, "word " * 150)
        with pytest.raises(LlavaEdgeError, match="limit of 8"):
            pipe.generate(None, "What?", max_new_tokens=9)
        with pytest.raises(LlavaEdgeError, match="time limit"):
            pipe.generate(None, "What?", max_new_tokens=8, ignore_eos=True)
        pipe.limits.timeout_s = None
        assert len(pipe.answer(None, "What?", max_new_tokens=8, ignore_eos=True).token_ids) == 8


def test_graph_or_table_from_another_model(model_copy, tmp_path):
    """Files swapped in from a model of another shape fail at load, naming the problem."""
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["graphs"]["projector"]["outputs"]["image_embeds"]["shape"][-1] = 128
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        LlavaEdgeError, match="image_embeds.*the graph and manifest come from different models"
    ):
        Pipeline.load(model_copy, verify_files=False)
    manifest["graphs"]["projector"]["outputs"]["image_embeds"]["shape"][-1] = 64
    manifest["text"]["hidden_size"] = 128
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LlavaEdgeError, match="embedding table .* hidden size is 128"):
        Pipeline.load(model_copy, verify_files=False)


def test_numbers_of_any_numeric_type_are_taken(pipe, image):
    """Robot code often holds numpy numbers; they mean what Python's do."""
    want = pipe.answer(image, "What?", max_new_tokens=3, temperature=0.7, seed=4, stop=None)
    got = pipe.answer(
        image, "What?", max_new_tokens=np.int64(3), temperature=np.float32(0.7), seed=np.uint8(4)
    )
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize("entry", ["answer", "stream", "generate_batch", "BatchEngine.submit"])
def test_raw_must_be_true_or_false(pipe, image, entry):
    """raw="false" (a setting read from a config file) sent the question without the chat
    template, the model answering a prompt it was never trained on."""
    from llava_edge.runtime import BatchEngine

    ask = {
        "answer": lambda **o: pipe.answer(image, "What?", **o),
        "stream": lambda **o: pipe.stream(image, "What?", **o),
        "generate_batch": lambda **o: pipe.generate_batch([(image, "What?")], **o),
        "BatchEngine.submit": lambda **o: BatchEngine(pipe, start=False).submit(
            image, "What?", **o
        ),
    }[entry]
    with pytest.raises(LlavaEdgeError, match="raw must be True or False, got 'false'"):
        ask(raw="false", max_new_tokens=2)
    assert ask(raw=np.bool_(False), max_new_tokens=2) is not None


def test_engine_and_load_sizes_of_any_integer_type_are_taken(pipe, tiny_model_dir):
    """BatchEngine(max_batch=np.int64(4)) was refused as "must be a positive integer, got 4",
    and Pipeline.load(threads=np.int64(2)) alike; True was taken as one row."""
    from llava_edge.runtime import BatchEngine

    engine = BatchEngine(
        pipe, max_batch=np.int64(2), max_queue=np.int32(3), admit_per_step=np.uint8(1), start=False
    )
    assert (engine.max_batch, engine.max_queue, engine.admit_per_step) == (2, 3, 1)
    assert type(engine.max_batch) is int
    for name in ("max_batch", "max_queue", "admit_per_step"):
        with pytest.raises(LlavaEdgeError, match=f"{name} must be"):
            BatchEngine(pipe, **{name: True}, start=False)
    # a string was repeated 2**20 times, a negative budget taken, NaN and inf raised raw
    for bad in ("64", -1, float("nan"), float("inf")):
        with pytest.raises(LlavaEdgeError, match="prefix_cache_mb must be a number, 0 or more"):
            BatchEngine(pipe, prefix_cache_mb=bad, start=False)
    assert BatchEngine(pipe, prefix_cache_mb=np.float32(0.5), start=False).prefixes.budget == 2**19
    assert BatchEngine(pipe, prefix_cache_mb=None, start=False).prefixes.budget == 256 * 2**20
    with Pipeline.load(tiny_model_dir, threads=np.int64(1)) as loaded:
        assert loaded.answer(None, "Hi", max_new_tokens=1)


def test_methods_that_take_prepared_images_refuse_raw_ones(pipe, image):
    """prompt_ids(question, frame) read a camera array's rows as that many images (a prompt of
    hundreds of image tokens, silently); a path raised AttributeError."""
    frame = np.asarray(Image.open(image))
    calls = (
        lambda raw: pipe.prompt_ids("What?", raw),
        lambda raw: pipe.conversation_ids([("What?", None)], raw, image_turn=0),
        pipe.pixel_features,
        pipe.image_tokens,
    )
    for raw in (frame, str(image), [frame]):
        for call in calls:
            with pytest.raises(LlavaEdgeError, match="images as Pipeline.image_pixels gives"):
                call(raw)
    pixels = pipe.image_pixels(frame)
    assert pipe.prompt_ids("What?", pixels) == pipe.prompt_ids("What?", [pixels])


def test_methods_that_take_raw_images_refuse_prepared_ones(pipe, image):
    """generate(pipe.image_pixels(frame), ...) read the prepared image's three fields as three
    images and blamed the first one's shape (1, 3, H, W)."""
    from llava_edge.runtime import BatchEngine

    pixels = pipe.image_pixels(image)
    engine = BatchEngine(pipe, start=False)
    calls = (
        lambda prepared: pipe.generate(prepared, "What?", max_new_tokens=1),
        lambda prepared: pipe.chat(prepared),
        lambda prepared: engine.submit(prepared, "What?"),
    )
    for prepared in (pixels, [pixels], [str(image), pixels]):
        for call in calls:
            with pytest.raises(LlavaEdgeError, match="prepared by Pipeline.image_pixels"):
                call(prepared)


def test_image_bytes_in_any_buffer_are_taken(pipe, image):
    data = image.read_bytes()
    want = pipe.answer(data, "What?", max_new_tokens=3).token_ids
    for buffer in (bytearray(data), memoryview(data)):
        assert pipe.answer(buffer, "What?", max_new_tokens=3).token_ids == want


def test_an_image_with_no_question_is_still_a_request(pipe, image):
    """An OpenAI message may hold only an image: the template's turn is the question."""
    assert pipe.answer(image, "", max_new_tokens=2).token_ids


@pytest.mark.parametrize(
    "history",
    [[("a", None)], ["ab"], [("a",)], [{"q": "a"}], "ab", [("a", "b", "c")]],
    ids=["no answer", "a string", "one part", "a dict", "not a list", "three parts"],
)
def test_a_malformed_chat_history_is_refused(pipe, image, history):
    with pytest.raises(LlavaEdgeError, match="history is a list of \\(question, answer\\) pairs"):
        pipe.chat(image, history=history)


def test_a_history_over_the_context_is_refused_when_the_chat_starts(pipe, image):
    """As a history over max_prompt_tokens is: it was taken, and every question then failed with
    "the prompt is N tokens ...; shorten it" about a question of a few words."""
    from llava_edge.errors import PromptTooLong

    long = " ".join(["word"] * pipe.max_context)
    with pytest.raises(PromptTooLong, match="history is .* over the model's context"):
        pipe.chat(image, history=[("Describe it.", long)])


def test_later_chat_questions_may_not_be_empty(pipe, image):
    chat = pipe.chat(image, max_new_tokens=2)
    chat.ask("")  # the first turn may be the image alone
    with pytest.raises(LlavaEdgeError, match="question is empty"):
        chat.ask(" ")


@pytest.mark.parametrize(
    "limit",
    [dict(timeout_s=-1), dict(timeout_s=0), dict(max_prompt_tokens=-5), dict(max_new_tokens=2.5),
     dict(max_image_pixels=True)],
    ids=str,
)  # fmt: skip
def test_limits_are_checked_when_made(limit):
    from llava_edge.runtime import Limits

    with pytest.raises(LlavaEdgeError, match=f"the limit {next(iter(limit))} must be a positive"):
        Limits(**limit)


def test_cli_refuses_bad_limits_and_seeds_in_one_line(tiny_model_dir, image, capsys):
    base = ["run", str(tiny_model_dir), "--image", str(image), "--prompt", "hi"]
    for extra, message in [
        (["--timeout", "-1"], "timeout_s must be a positive"),
        (["--temperature", "1", "--seed", "-1"], "seed must be"),
        (["--top-k", "5", "--seed", "1"], "--top-k, --seed shape sampling, which --temperature 0"),
        (["--top-p", "0.9"], "--top-p shape sampling"),
    ]:
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_closed_reader_ends_the_command_quietly(tiny_model_dir, image, tmp_path):
    """`llava-edge watch ... --jsonl | head -1`: no traceback once the reader has gone. The
    reader here (`true`) leaves before the first answer, so the pipe is surely closed then."""
    for i in range(3):
        shutil.copy(image, tmp_path / f"{i:03d}.png")
    command = f"{sys.executable} -m llava_edge.cli watch {tiny_model_dir} --source {tmp_path} "
    command += "--prompt hi --every 0 --max-new-tokens 1 --jsonl | true"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True)
    assert done.returncode == 141 and done.stderr == b"", done.stderr.decode()[-2000:]


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer.encode(*args, **kwargs)


def test_a_text_far_over_the_context_is_refused_unread(pipe, monkeypatch):
    """Tokenizing holds the GIL for seconds on megabytes: every other thread would wait."""
    from llava_edge.errors import PromptTooLong

    counting = CountingTokenizer(pipe.codec.tokenizer)
    monkeypatch.setattr(pipe.codec, "tokenizer", counting)
    bound = 2 * pipe.codec.longest_token * pipe.max_context
    with pytest.raises(PromptTooLong, match="far more than the"):
        pipe.answer(None, "w" * (bound + 1))
    assert counting.calls == 0
    with pytest.raises(LlavaEdgeError, match="context"):  # under the bound: read, then refused
        pipe.answer(None, "w " * (bound // 4))
    assert counting.calls == 1


def test_each_way_a_prompt_is_too_long_has_its_own_type(pipe, image, monkeypatch):
    from llava_edge.runtime import ChatFull, Limits, PromptTooLong

    with pytest.raises(PromptTooLong, match="context"):  # over the context
        pipe.answer(image, "word " * 2000)
    monkeypatch.setattr(pipe, "limits", Limits(max_prompt_tokens=5))
    with pytest.raises(PromptTooLong, match="over this deployment's limit"):
        pipe.answer(image, "What?")
    monkeypatch.setattr(pipe, "limits", Limits(max_prompt_tokens=pipe.max_context - 100))
    chat = pipe.chat(None, ignore_eos=True)
    chat.ask("Hi", max_new_tokens=60)
    with pytest.raises(ChatFull, match="start a new chat"):  # over the limit, in a chat
        chat.ask("word " * 880)


def test_a_prompt_that_places_its_own_images_fits_that_many(pipe) -> None:
    """images_that_fit counts a prompt's own placeholders (it raised StopIteration at the second),
    and encoding more placeholders than images is one clear error."""
    placed = "Compare <image> with <image>."
    assert pipe.images_that_fit(placed) == 2 <= pipe.images_that_fit("Compare them.")
    with pytest.raises(LlavaEdgeError, match="more <image> placeholders than images"):
        pipe.codec.encode(placed, image_tokens=[3])


def test_images_that_fit_refuses_a_raw_that_is_not_true_or_false(pipe) -> None:
    """raw="false" (a config file's string) would read as true: the count of a prompt without
    the chat template, one image where the templated question holds several."""
    with pytest.raises(LlavaEdgeError, match="raw must be True or False"):
        pipe.images_that_fit("<image> What is it?", raw="false")
    assert pipe.images_that_fit("<image> What is it?", raw=np.bool_(True)) == 1


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_threads_must_be_a_positive_whole_number(tiny_model_dir, threads) -> None:
    """onnxruntime took 0 and negatives silently, as its own default (every core)."""
    with pytest.raises(LlavaEdgeError, match="threads must be a whole number, 1 or more"):
        Pipeline.load(tiny_model_dir, threads=threads)


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(background="false"), "background must be True or False, got 'false'"),
        (dict(session_cache="no"), "session_cache must be True or False, got 'no'"),
        (dict(verify_files="no"), "verify_files must be True, False or None, got 'no'"),
        (dict(cuda_graph=True), "cuda_graph replays the tensorrt backend's decode step"),
        (dict(providers=[1]), r"providers are names \('cpu', 'cuda', 'tensorrt'\), got 1"),
        (dict(providers=5), r"providers are names \('cpu', 'cuda', 'tensorrt'\), got 5"),
        (dict(backend="tensorrt", graph_form="fused"), "graph_form .* onnxruntime graphs"),
    ],
    ids=str,
)
def test_load_options_take_effect_or_are_refused(tiny_model_dir, option, message) -> None:
    """A string read from a config file ("false") turned background loading or the session
    cache on; cuda_graph=True on onnxruntime and graph_form on tensorrt did nothing; a provider
    that is not a name raised AttributeError."""
    with pytest.raises(LlavaEdgeError, match=message):
        Pipeline.load(tiny_model_dir, **option)


def test_a_chat_asked_for_a_raw_prompt_says_it_has_none(pipe) -> None:
    """chat(raw=True) said "unknown generation option(s) ['raw']", as if raw were misspelled."""
    with pytest.raises(LlavaEdgeError, match="takes no raw option; send a raw prompt through"):
        pipe.chat(raw=True)
    with pytest.raises(LlavaEdgeError, match="takes no raw option"):
        pipe.chat().ask("Hi", raw=True)


def test_a_path_option_that_is_no_path_is_named(tiny_model_dir) -> None:
    """Pipeline.load(None), as an app whose config lacks the model's path calls it, raised
    Python's own TypeError, naming no option."""
    with pytest.raises(LlavaEdgeError, match="model_dir must be a path .* got NoneType"):
        Pipeline.load(None)
    with pytest.raises(LlavaEdgeError, match="engine_dir must be a path .* got int"):
        Pipeline.load(tiny_model_dir, engine_dir=3)


def test_limits_that_are_not_a_limits_are_refused_at_load(tiny_model_dir) -> None:
    """A dict of limits loaded fine and every request then failed with an AttributeError."""
    with pytest.raises(LlavaEdgeError, match="limits must be a Limits"):
        Pipeline.load(tiny_model_dir, limits={"max_new_tokens": 3})


def test_one_provider_may_be_named_alone(tiny_model_dir, monkeypatch) -> None:
    """providers="cuda" was read letter by letter: "onnxruntime provider c is not available"."""
    import onnxruntime as ort

    from llava_edge.runtime.onnx_backend import provider_list

    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    assert provider_list("cuda") == provider_list(["cuda"]) == available
    with Pipeline.load(tiny_model_dir, providers="cpu", threads=1) as pipe:
        assert pipe.backend.providers == ["CPUExecutionProvider"]


def test_the_cpu_provider_named_first_or_twice_still_comes_last_once(monkeypatch) -> None:
    """providers=["cpu", "cuda"] (`--provider cpu --provider cuda`) put the CPU provider first,
    so onnxruntime, which takes them in order of precedence, ran every graph on the CPU and left
    the GPU idle; ["cpu", "cpu"] warned of a duplicate and turned the session cache off."""
    import onnxruntime as ort

    from llava_edge.runtime.onnx_backend import provider_list

    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_list(["cpu", "cuda"]) == provider_list(["cuda", "cpu", "cuda"]) == gpu
    assert provider_list(["cpu", "tensorrt", "cuda"]) == available
    assert provider_list(["cpu", "cpu"]) == ["CPUExecutionProvider"]


def test_the_cli_refuses_zero_threads(tiny_model_dir, capsys) -> None:
    argv = ["run", str(tiny_model_dir), "--prompt", "hi", "--threads", "0"]
    assert main(argv) == 1
    assert "threads must be a whole number, 1 or more, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("requests", [[("x.jpg",)], [(None, "Hi", 3)], [None], "ab", 5], ids=repr)
def test_a_batch_that_is_not_image_question_pairs_is_refused_in_one_line(pipe, requests):
    with pytest.raises(LlavaEdgeError, match=r"generate_batch takes a list of \(image, prompt\)"):
        pipe.generate_batch(requests, max_new_tokens=2)
    assert len(pipe.generate_batch([(None, "Hi")], max_new_tokens=2)) == 1


def test_a_batch_with_failed_requests_keeps_every_other_answer(pipe, image, tmp_path):
    """60 camera frames, one unreadable, one too large: generate_batch raised at the first
    failure and the answers already computed were lost. Every request runs to its end; the
    error holds each one's Answer or exception, in order, and is also each failure's own type."""
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00" * 100)
    large = np.zeros((300, 300, 3), np.uint8)
    requests = [
        (image, "What?"),
        (garbage, "What?"),
        (None, "Hi"),
        (large, "What?"),
        (image, "word " * 2000),
        (large, "And?"),
    ]
    options = dict(max_new_tokens=4, ignore_eos=True)
    before = pipe.limits
    pipe.limits = Limits(max_image_pixels=50_000)
    try:
        with pytest.raises(BatchFailed) as caught:
            pipe.generate_batch(requests, **options)
    finally:
        pipe.limits = before
    error = caught.value
    assert isinstance(error, TooLarge) and isinstance(error, PromptTooLong)
    assert not isinstance(error, TimedOut)
    results = error.results
    assert set(error.failed) == {1, 3, 4, 5} and len(results) == len(requests)
    for i in (0, 2):
        alone = pipe.answer(*requests[i], **options)
        assert results[i].token_ids == alone.token_ids
    assert "not an image" in str(results[1])
    assert isinstance(results[3], TooLarge) and isinstance(results[5], TooLarge)
    assert isinstance(results[4], PromptTooLong)
    message = str(error)
    assert message.startswith("4 of 6 requests failed (request 1: ") and "\n" not in message
    assert f"requests 3, 5: {results[3]}" in message and f"request 4: {results[4]}" in message
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, TooLarge) and str(again) == message
    assert [type(r) for r in again.results] == [type(r) for r in results]


def test_a_request_past_its_time_limit_in_a_batch_leaves_the_others_answers(pipe, monkeypatch):
    """The time limit counts a request's wait for a row: a late one ends as TimedOut, which
    the batch's error also is, and those answered in time keep their answers."""
    encode = pipe.pixel_features

    def slow(pixels):
        time.sleep(1.2)
        return encode(pixels)

    monkeypatch.setattr(pipe, "pixel_features", slow)
    requests = [(None, "Hi"), (None, "Yo"), (np.zeros((30, 40, 3), np.uint8), "What?")]
    options = dict(max_new_tokens=2, ignore_eos=True)
    with pytest.raises(TimedOut, match=r"^1 of 3 requests failed \(request 2: the request") as e:
        pipe.generate_batch(requests, timeout_s=1.0, **options)
    monkeypatch.undo()
    answers = e.value.results
    assert isinstance(answers[2], TimedOut)
    for i in (0, 1):
        assert answers[i].token_ids == pipe.answer(*requests[i], **options).token_ids


def test_a_batch_step_failing_outside_any_request_keeps_the_finished_answers(pipe, monkeypatch):
    """A failure outside any one request's work (freeing a finished row) ends those still in
    hand, as the engine's thread does; the answer already finished is kept."""
    from llava_edge.runtime.kv_cache import KVCache

    shrink, calls = KVCache.shrink, []

    def failing(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("row copy failed")
        return shrink(self)

    monkeypatch.setattr(KVCache, "shrink", failing)
    options = dict(max_new_tokens=3, ignore_eos=True)
    with pytest.raises(BatchFailed, match=r"request 1: internal error \(RuntimeError: row") as e:
        pipe.generate_batch([(None, "Hi"), (None, "Yo")], **options)
    monkeypatch.undo()
    first, second = e.value.results
    assert first.token_ids == pipe.answer(None, "Hi", **options).token_ids
    assert isinstance(second, RuntimeError)


def test_a_batchs_error_lists_runs_of_requests_failed_alike_as_ranges():
    """60 frames past their time limit make one short line, not 60 repeats of the reason."""
    late, bad = TimedOut("late"), LlavaEdgeError("bad")
    error = batch_failed([late] * 3 + ["answer", late, bad] + ["answer"] * 54)
    assert str(error).startswith("5 of 60 requests failed (requests 0-2, 4: late; request 5: bad)")
    assert isinstance(error, TimedOut) and error.failed == {
        0: late,
        1: late,
        2: late,
        4: late,
        5: bad,
    }


@pytest.mark.parametrize(
    ("option", "message"),
    [({"temperature": -1.0}, "temperature must be in"), ({"timeout_s": 0}, "timeout_s must be")],
)
def test_a_batchs_bad_option_is_refused_before_any_request_runs(pipe, option, message):
    """An option is every request's: refused once, as a single request's would be, not as the
    failure of each request after all were read."""
    with pytest.raises(LlavaEdgeError, match=f"^the limit {message}|^{message}") as caught:
        pipe.generate_batch([(None, "Hi"), (None, "Yo")], max_new_tokens=2, **option)
    assert not isinstance(caught.value, BatchFailed)


def test_a_batchs_requests_run_while_the_later_images_are_read(pipe, monkeypatch):
    """A request's time limit counts from its start: a batch that read every image before any
    request ran spent the first requests' time on the others' images (60 camera frames with a
    0.5 s limit: the first ones timed out before the engine began)."""
    read = pipe.image_pixels

    def slow(image):
        time.sleep(0.2)  # a large frame: decoding and resizing it takes this long
        return read(image)

    frames = [np.full((30, 40, 3), 10 * i, np.uint8) for i in range(10)]
    options = dict(max_new_tokens=3, ignore_eos=True)
    alone = [pipe.answer(frame, "What?", **options).token_ids for frame in frames]
    monkeypatch.setattr(pipe, "image_pixels", slow)
    # reading all ten takes 2 s: past the limit for the first requests, were they to wait
    answers = pipe.generate_batch([(frame, "What?") for frame in frames], timeout_s=1.5, **options)
    assert [a.token_ids for a in answers] == alone


def test_a_history_turn_that_is_not_text_is_named(pipe) -> None:
    """A history answer (or question) that was not text was refused as 'prompt must be text',
    though the prompt was not what was wrong."""
    with pytest.raises(LlavaEdgeError, match=r"^answer of turn 2 must be text, got int"):
        pipe.chat(history=[("Hello?", "Hi."), ("What is this?", 3)])
    with pytest.raises(LlavaEdgeError, match=r"^the question of turn 1 is not valid UTF-8"):
        pipe.conversation_ids([("\udcff", None)])
