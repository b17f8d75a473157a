"""`llava-edge serve`: the real server (uvicorn on a free port) called with the official `openai`
client and with raw HTTP: answers equal the library's, every malformed or over-limit request gets
OpenAI's error JSON with the right status, a client that leaves frees its row, SIGTERM drains.

The model is the tiny one whose answers depend on their whole context (conftest), so a server
that rendered a conversation differently from the library would answer differently."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image
from starlette.testclient import TestClient

from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Limits
from llava_edge.runtime.batching import Cancelled
from llava_edge.serve import ServeOptions, create_app
from llava_edge.serve.app import fingerprint
from llava_edge.serve.server import bind

KEY = "test-key"
MODEL = "tiny"


class Server:
    """The app under uvicorn on a thread, on a free port; stopped like SIGTERM stops it."""

    def __init__(self, options: ServeOptions):
        self.app = create_app(options)
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server did not become ready")

    @property
    def state(self):
        return self.app.state.serve

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def post(self, body, key: str = KEY, timeout: float = 30) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(
            self.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout
        )

    def metric(self, name: str, default: float | None = None) -> float:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        if default is not None:  # a labelled counter appears with its first count
            return default
        raise KeyError(name)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media")
    picture(1).save(path / "one.png")
    return path


@pytest.fixture(scope="module")
def server(context_model_dir, media_dir):
    s = Server(
        ServeOptions(
            context_model_dir,
            model_name=MODEL,
            api_key=KEY,
            max_batch=2,
            max_queue=1,
            max_body_mb=0.3,
            max_image_mb=0.1,
            allowed_media_dir=media_dir,
            allow_remote_images=True,
            remote_timeout_s=2,
            limits=Limits(max_image_pixels=40_000, max_new_tokens=900),
        )
    )
    yield s
    s.stop()


def picture(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(question: str, url: str | None = None) -> dict:
    content = [{"type": "text", "text": question}]
    if url:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": content}


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A test's own web server: its requests are not logged."""

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def web_server(handler: type[QuietHandler]) -> Iterator[str]:
    """`handler` on a free local port, on a thread; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


# ---- answers ----------------------------------------------------------------------------------


def test_health_models_and_routes(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in server.client().models.list()] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("other")
    missing = httpx.get(server.url + "/v2/anything", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"


def test_greedy_answers_equal_the_pipeline_streamed_or_not(server):
    pipe, image = server.state.pipe, picture(2)
    want = pipe.answer(image, "What is in the picture?", max_new_tokens=24)
    messages = [ask("What is in the picture?", data_uri(image))]
    client = server.client()
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
    assert whole.choices[0].message.content == want.text
    assert whole.usage.completion_tokens == len(want.token_ids)
    assert whole.usage.prompt_tokens == len(want.prompt_token_ids)
    assert whole.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want.finish_reason]
    pieces, usage, reasons = [], None, []
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == want.text
    assert usage.completion_tokens == len(want.token_ids)
    assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}


def test_a_stream_tells_proxies_not_to_buffer_or_cache_it(server):
    """nginx, often in front for TLS, buffers a response whole unless told not to: a robot
    behind it would get its streamed answer only at the end."""
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 3, "stream": True}
    response = server.post(body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    assert "no-cache" in response.headers["cache-control"]


def test_a_stream_of_unicode_line_separators_reads_line_by_line(server, monkeypatch):
    """SSE ends a line at CR or LF only, but httpx's iter_lines (and so many a Python client)
    splits at every line boundary str.splitlines knows: a chunk whose text held U+2028, U+2029
    or U+0085 reached such a client in pieces that were no JSON. They are sent as escapes."""
    from llava_edge.runtime.answer import AnswerText

    push = AnswerText.push
    monkeypatch.setattr(AnswerText, "push", lambda self, token: push(self, token) + SEPARATORS)
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers) as r:
        lines = [line for line in r.iter_lines() if line]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.count(SEPARATORS) == 3 and lines[-1] == "data: [DONE]"


SEPARATORS = "\u2028\u2029\x85"


def test_a_streams_chunks_share_one_id_and_creation_time(server, monkeypatch):
    """As OpenAI's do, though the clock moves between tokens (here on every reading of it)."""
    from llava_edge.serve import protocol

    ticks = iter(range(1_800_000_000, 1_900_000_000))
    monkeypatch.setattr(protocol, "time", types.SimpleNamespace(time=lambda: next(ticks)))
    stream = server.client().chat.completions.create(
        model=MODEL, messages=[ask("Count.")], max_tokens=6, stream=True
    )
    assert len({(chunk.id, chunk.created) for chunk in stream}) == 1


def test_replies_carry_a_system_fingerprint_of_what_decides_their_tokens(server, tiny_model_dir):
    """OpenAI's system_fingerprint, to compare seeded answers by: one value on a reply and every
    chunk of a stream, which changes with the model dir or with how the server runs it."""
    client = server.client()
    whole = client.chat.completions.create(model=MODEL, messages=GOOD, max_tokens=2)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=GOOD,
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    prints = {whole.system_fingerprint, *(chunk.system_fingerprint for chunk in stream)}
    assert prints == {fingerprint(server.state.options)}
    assert whole.system_fingerprint.startswith("fp_")
    for change in [{"model_dir": tiny_model_dir}, {"max_batch": 3}, {"threads": 1}]:
        changed = dataclasses.replace(server.state.options, **change)
        assert fingerprint(changed) != whole.system_fingerprint, change


def test_multi_turn_with_the_image_in_the_first_turn_equals_a_chat_session(server):
    pipe, image = server.state.pipe, picture(3)
    first = server.client().chat.completions.create(
        model=MODEL, messages=[ask("What is this?", data_uri(image))], max_tokens=10
    )
    answer = first.choices[0].message.content
    messages = [
        ask("What is this?", data_uri(image)),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what colour is it?"},
    ]
    reply = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    chat = pipe.chat(image, history=[("What is this?", answer)])
    stream = chat.stream("And what colour is it?", max_new_tokens=12)
    assert reply.choices[0].message.content == "".join(stream)
    assert reply.usage.completion_tokens == len(stream.answer.token_ids)
    assert reply.usage.prompt_tokens == len(stream.answer.prompt_token_ids)


def test_images_in_several_turns_equal_the_library(server):
    """Every image_url part is an image of its turn, in order, as conversation_ids renders them;
    more images than the context holds are refused before any is fetched."""
    from llava_edge.runtime import BatchEngine

    pipe = server.state.pipe
    images = [picture(21), picture(22, size=(50, 70)), picture(23)]
    two = {"role": "user", "content": [*ask("Compare them.", data_uri(images[1]))["content"]]}
    two["content"].insert(1, {"type": "image_url", "image_url": {"url": data_uri(images[2])}})
    messages = [
        ask("What is this?", data_uri(images[0])),
        {"role": "assistant", "content": "A picture."},
        two,
    ]
    reply = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    turns = [("What is this?", "A picture."), ("Compare them.", None)]
    pixels = [pipe.image_pixels(image) for image in images]
    ids = pipe.conversation_ids(turns, pixels, [0, 1, 1])
    with BatchEngine(pipe, max_batch=1, prefix_cache_mb=0) as engine:
        want = engine.submit_ids(ids, pixels, {"max_new_tokens": 10}).result()
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == want.text
    single = server.client().chat.completions.create(model=MODEL, messages=[two], max_tokens=10)
    alone = pipe.answer(images[1:], "Compare them.", max_new_tokens=10)
    assert single.choices[0].message.content == alone.text
    many = [{"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}]
    crowded = {"role": "user", "content": many * (pipe.max_images_per_prompt + 1)}
    response = server.post({"model": MODEL, "messages": [crowded]})
    assert response.status_code == 400 and "holds at most" in error_of(response)["message"]


def test_an_image_then_its_question_in_two_messages_is_one_turn(server):
    """Clients often send the picture, then the question, as two user messages; text parts
    become a line each."""
    pipe, image = server.state.pipe, picture(4)
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}}]},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}],
        },
    ]
    reply = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    want = pipe.answer(image, "What is this?\nBe\nbrief.", max_new_tokens=10)
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == len(want.prompt_token_ids)


def test_text_only_and_system_prompt(server):
    pipe = server.state.pipe
    reply = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}], max_tokens=16
    )
    want = pipe.answer(None, "Say something.", max_new_tokens=16)
    assert reply.choices[0].message.content == want.text
    null_newer_name = server.post(
        {"model": MODEL, "messages": GOOD, "max_tokens": 3, "max_completion_tokens": None}
    )
    assert null_newer_name.json()["usage"]["completion_tokens"] <= 3
    system = server.client().chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a robot."},
            {"role": "user", "content": "Say something."},
        ],
        max_tokens=4,
    )
    ids = pipe.conversation_ids([("Say something.", None)], system="You are a robot.")
    assert system.usage.prompt_tokens == len(ids) != len(want.prompt_token_ids)


def test_an_assistant_message_with_null_content_is_an_empty_answer(server):
    """OpenAI's message schema lets an assistant's content be null (openai's own types allow
    it); a client replaying history with such a turn gets the reply an empty answer gets."""
    turns = [{"role": "user", "content": "Hi."}, None, {"role": "user", "content": "What?"}]
    replies = []
    for content in ("", None):
        turns[1] = {"role": "assistant", "content": content}
        replies.append(server.post({"model": MODEL, "messages": turns, "max_tokens": 4}))
    assert replies[1].status_code == 200, replies[1].text
    assert replies[1].json()["choices"] == replies[0].json()["choices"]


def test_an_assistant_refusal_sent_back_in_history_is_what_it_said(server):
    """OpenAI's clients send a reply that refused back as it came: a `refusal` beside null
    content, or a `refusal` part. Either is the answer's text, as if sent as its content."""
    said = "I cannot help with that."
    replies = []
    for answer in [
        {"content": said},
        {"content": [{"type": "refusal", "refusal": said}]},
        {"content": None, "refusal": said},
    ]:
        turns = [ask("Hi."), {"role": "assistant", **answer}, ask("Why?")]
        replies.append(server.post({"model": MODEL, "messages": turns, "max_tokens": 4}))
    assert [r.status_code for r in replies] == [200] * 3, replies[1].text
    assert replies[1].json()["choices"] == replies[0].json()["choices"]
    assert replies[2].json()["usage"] == replies[0].json()["usage"]
    assert replies[2].json()["choices"] == replies[0].json()["choices"]
    in_system = [{"role": "system", "content": [{"type": "refusal", "refusal": said}]}, *GOOD]
    refused = server.post({"model": MODEL, "messages": in_system})
    assert refused.status_code == 400 and "its parts are 'text'" in error_of(refused)["message"]


GREETING = {"role": "assistant", "content": "How can I help?"}


@pytest.mark.parametrize(
    ("messages", "message", "fix"),
    [
        (
            [GREETING, ask("What?")],
            "messages[1] is an assistant message before any user message",
            "drop",
        ),
        (
            [ask("Hi."), GREETING, GREETING, ask("What?")],
            "messages[3] follows another assistant",
            "join",
        ),
    ],
    ids=["greeting first", "two answers in a row"],
)
def test_an_assistant_message_out_of_turn_says_what_to_change(server, messages, message, fix):
    """A chat UI's greeting ("How can I help?") sent before the user's first question: LLaVA's
    templates start with the user's turn (its training drops a leading assistant message), so it
    is refused in one line naming the message and what to do."""
    system = {"role": "system", "content": "You are a robot."}
    reply = server.post({"model": MODEL, "messages": [system, *messages]})
    assert reply.status_code == 400
    error = error_of(reply)
    assert error["param"] == message.split()[0] and error["message"].startswith(message)
    assert fix in error["message"] and "\n" not in error["message"]


def test_system_and_developer_messages_before_the_first_question_are_one_system_prompt(server):
    """OpenAI takes several; LangChain sends its prompt's system message and the caller's."""
    pipe, question = server.state.pipe, {"role": "user", "content": "Say something."}
    reply = server.post(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a robot."},
                {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                question,
            ],
            "max_tokens": 4,
        }
    )
    assert reply.status_code == 200, reply.text
    ids = pipe.conversation_ids([("Say something.", None)], system="You are a robot.\nBe brief.")
    assert reply.json()["usage"]["prompt_tokens"] == len(ids)
    late = server.post(
        {"model": MODEL, "messages": [question, {"role": "system", "content": "A."}, *GOOD]}
    )
    assert late.status_code == 400 and error_of(late)["param"] == "messages[1]"


def test_a_seed_reproduces_a_sampled_answer_negative_ones_too(server):
    """OpenAI takes any 64-bit seed; a client drawing one at random sends negatives half the
    time. A negative seed is its two's complement, so distinct seeds stay distinct."""

    def sampled(seed: int) -> str:
        body = {"model": MODEL, "messages": GOOD, "max_tokens": 12, "temperature": 1.5}
        reply = server.post({**body, "seed": seed})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    assert sampled(7) == sampled(7) != sampled(8)
    assert sampled(-1) == sampled(-1) == sampled(2**64 - 1) != sampled(1)
    too_low = server.post({"model": MODEL, "messages": GOOD, "seed": -(2**63) - 1})
    assert too_low.status_code == 400 and error_of(too_low)["param"] == "seed"


def test_top_p_zero_is_taken_and_answers_greedily(server):
    """OpenAI's API takes top_p in [0, 1]; 0 keeps only the most probable token."""
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 12}
    greedy = server.post(body)
    sampled = server.post({**body, "temperature": 1.5, "top_p": 0, "seed": 3})
    assert sampled.status_code == 200, sampled.text
    assert sampled.json()["choices"] == greedy.json()["choices"]


def test_images_from_allowed_files_and_remote_urls(server, media_dir, tmp_path):
    pipe = server.state.pipe
    want = pipe.answer(media_dir / "one.png", "What?", max_new_tokens=6).text
    local = server.post(
        {
            "model": MODEL,
            "messages": [ask("What?", (media_dir / "one.png").as_uri())],
            "max_tokens": 6,
        }
    )
    assert local.status_code == 200 and local.json()["choices"][0]["message"]["content"] == want
    outside = tmp_path / "secret.png"
    picture(1).save(outside)
    (media_dir / "link.png").symlink_to(outside)
    for url in (
        outside.as_uri(),
        (media_dir / "link.png").as_uri(),
        f"file://{media_dir}/../{tmp_path.name}/secret.png",
    ):
        refused = server.post({"model": MODEL, "messages": [ask("What?", url)]})
        assert refused.status_code == 400 and "allowed media dir" in error_of(refused)["message"]
    nul = server.post({"model": MODEL, "messages": [ask("What?", f"file://{media_dir}/a%00.png")]})
    assert nul.status_code == 400 and "does not exist" in error_of(nul)["message"]
    files = {"/one.png": (media_dir / "one.png").read_bytes(), "/big.png": b"x" * 200_000}

    class Handler(QuietHandler):
        def do_GET(self):
            if self.path == "/drip.png":  # a byte every half second: each read is quick
                self.send_response(200)
                self.end_headers()
                for _ in range(10):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.5)
                return
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

    with web_server(Handler) as base:
        remote = server.post(
            {"model": MODEL, "messages": [ask("What?", base + "/one.png")], "max_tokens": 6}
        )
        assert remote.json()["choices"][0]["message"]["content"] == want
        big = server.post({"model": MODEL, "messages": [ask("What?", base + "/big.png")]})
        assert big.status_code == 413 and error_of(big)["code"] == "image_too_large"
        slow = server.post({"model": MODEL, "messages": [ask("What?", base + "/drip.png")]})
        assert slow.status_code == 400 and "took over 2" in error_of(slow)["message"]
        gone = server.post({"model": MODEL, "messages": [ask("What?", base + "/none.png")]})
        assert gone.status_code == 400 and "HTTP 404" in error_of(gone)["message"]


def test_a_remote_timeout_over_five_seconds_takes_effect():
    """--remote-timeout is the download's only deadline: httpx's own default (5 s to connect,
    5 s per read) does not cut a slow camera's snapshot short, nor blame --remote-timeout."""
    from llava_edge.serve.media import MediaPolicy, fetch_image

    image = io.BytesIO()
    picture(1).save(image, "PNG")

    class Slow(QuietHandler):
        def do_GET(self):
            time.sleep(5.5)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(image.getvalue())

    policy = MediaPolicy(2**20, None, True, remote_timeout_s=8)
    with web_server(Slow) as base:
        got = asyncio.run(fetch_image(base + "/snapshot.png", policy))
    assert got == image.getvalue()


def test_a_remote_image_is_fetched_uncompressed_and_a_compressed_reply_refused():
    """The image-size limit counts the bytes that arrive: a reply gzipped anyway (a few KB
    that inflate to gigabytes) is refused from its headers, not inflated past the limit."""
    import gzip

    from llava_edge.serve.media import MediaPolicy, fetch_image
    from llava_edge.serve.protocol import ApiError

    image = io.BytesIO()
    picture(1).save(image, "PNG")
    asked: list[str | None] = []

    class Server(QuietHandler):
        def do_GET(self):
            asked.append(self.headers.get("Accept-Encoding"))
            body = image.getvalue()
            self.send_response(200)
            if self.path == "/bomb.png":
                body = gzip.compress(b"\0" * 5_000_000)
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    policy = MediaPolicy(100_000, None, True)
    with web_server(Server) as base:
        assert asyncio.run(fetch_image(base + "/photo.png", policy)) == image.getvalue()
        with pytest.raises(ApiError, match="compressed"):
            asyncio.run(fetch_image(base + "/bomb.png", policy))
    assert asked == ["identity", "identity"]


@pytest.mark.parametrize("size", [1001, 1004, 1005, 1006])
def test_a_data_url_over_the_limit_is_refused_with_its_exact_size(size: int) -> None:
    """An image sent as a data: URL over the limit is refused saying its own size: one refused
    from its base64's length alone (past the limit by 4 bytes or more) was said to be a byte or
    two larger, the '=' padding counted as data. One at the limit is taken."""
    from llava_edge.serve.media import MediaPolicy, fetch_image
    from llava_edge.serve.protocol import ApiError

    def url(n: int) -> str:
        return "data:image/png;base64," + base64.b64encode(b"x" * n).decode()

    policy = MediaPolicy(1000, None, True)
    assert asyncio.run(fetch_image(url(1000), policy)) == b"x" * 1000
    with pytest.raises(ApiError) as refused:
        asyncio.run(fetch_image(url(size), policy))
    assert refused.value.status == 413
    assert f"the image is {size} bytes, over this server's limit of 1000;" in str(refused.value)


@pytest.mark.parametrize("padding", ["=", "==", "===="])
def test_a_data_url_padded_past_its_last_group_is_held_to_the_limit(padding: str) -> None:
    """base64.b64decode takes '=' past a full last group ('QUFB=' decodes to 3 bytes): such a
    data: URL one byte over the limit was sized from its padding as under it, and taken."""
    from llava_edge.serve.media import MediaPolicy, fetch_image
    from llava_edge.serve.protocol import ApiError

    payload = base64.b64encode(b"x" * 1002).decode() + padding
    assert len(base64.b64decode(payload, validate=True)) == 1002
    with pytest.raises(ApiError) as refused:
        asyncio.run(fetch_image("data:image/png;base64," + payload, MediaPolicy(1001, None, True)))
    assert refused.value.status == 413
    assert "the image is 1002 bytes, over this server's limit of 1001;" in str(refused.value)


# ---- refusals ---------------------------------------------------------------------------------

GOOD = [ask("What?")]
MALFORMED = {
    "not json": b"{not json",
    "nested too deeply": b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "an integer too long to read": b'{"model": "tiny", "max_tokens": ' + b"9" * 5000 + b"}",
    "not an object": [1, 2],
    # JSON may escape half of an emoji's UTF-16 pair, which no UTF-8 reply can quote back
    "a field name holding a lone surrogate": b'{"model": "tiny", "messages": '
    b'[{"role": "user", "content": "Hi."}], "max_tokens": 2, "grip\\ud83d": 1}',
    "no model": {"messages": GOOD},
    "no messages": {"model": MODEL},
    "empty messages": {"model": MODEL, "messages": []},
    "bad role": {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
    "ends with assistant": {
        "model": MODEL,
        "messages": [*GOOD, {"role": "assistant", "content": "A"}],
    },
    "content a number": {"model": MODEL, "messages": [{"role": "user", "content": 3}]},
    "bad part type": {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}],
    },
    "image placeholder text": {"model": MODEL, "messages": [ask("<image> what?")]},
    "image in an answer": {
        "model": MODEL,
        "messages": [
            ask("A?", data_uri(picture(1))),
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            ask("B?"),
        ],
    },
    "image in system": {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
            *GOOD,
        ],
    },
    "bad base64": {"model": MODEL, "messages": [ask("What?", "data:image/png;base64,@@@@")]},
    "not an image": {
        "model": MODEL,
        "messages": [ask("What?", "data:image/png;base64," + base64.b64encode(b"hello").decode())],
    },
    "ftp url": {"model": MODEL, "messages": [ask("What?", "ftp://host/x.png")]},
    "unclosed ipv6 url": {"model": MODEL, "messages": [ask("What?", "http://[::1/x.png")]},
    "unclosed ipv6 file url": {"model": MODEL, "messages": [ask("What?", "file://[x/y.png")]},
    "port out of range": {"model": MODEL, "messages": [ask("What?", "http://127.0.0.1:99999/x")]},
    "nul host": {"model": MODEL, "messages": [ask("What?", "http://\u0000/x.png")]},
    "bad idna host": {"model": MODEL, "messages": [ask("What?", "http://xn--/x.png")]},
    "n=2": {"model": MODEL, "messages": GOOD, "n": 2},
    "negative max_tokens": {"model": MODEL, "messages": GOOD, "max_tokens": -1},
    "string max_tokens": {"model": MODEL, "messages": GOOD, "max_tokens": "10"},
    "temperature 3": {"model": MODEL, "messages": GOOD, "temperature": 3},
    "top_p over 1": {"model": MODEL, "messages": GOOD, "top_p": 1.5},
    "temperature too small to sample": {"model": MODEL, "messages": GOOD, "temperature": 1e-40},
    "five stops": {"model": MODEL, "messages": GOOD, "stop": ["a", "b", "c", "d", "e"]},
    "a stop string over the limit": {"model": MODEL, "messages": GOOD, "stop": ["a", "b" * 257]},
    "stream a string": {"model": MODEL, "messages": GOOD, "stream": "yes"},
    "stream_options without stream": {
        "model": MODEL,
        "messages": GOOD,
        "stream_options": {"include_usage": True},
    },
    "frequency_penalty": {"model": MODEL, "messages": GOOD, "frequency_penalty": 0.5},
    "logprobs": {"model": MODEL, "messages": GOOD, "logprobs": True},
    "tools": {"model": MODEL, "messages": GOOD, "tools": [{"type": "function"}]},
    "an option the server does not know": {"model": MODEL, "messages": GOOD, "min_p": 0.1},
    "over the token limit": {"model": MODEL, "messages": GOOD, "max_tokens": 901},
    "over the context": {"model": MODEL, "messages": GOOD, "max_tokens": 1000},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_400_and_the_server_goes_on(server, case):
    body = MALFORMED[case]
    if isinstance(body, bytes):
        response = httpx.post(
            server.url + "/v1/chat/completions",
            content=body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
    else:
        response = server.post(body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and len(error["message"]) > 10
    if "stop" in case:
        assert error["param"] == "stop"
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_fields_are_refused_not_ignored(server):
    """A field the server would ignore would not take effect: transformers' max_new_tokens sent
    for max_tokens would let the answer run to the end of the context. OpenAI refuses unknown
    fields too; the bookkeeping fields it takes (user, metadata, ...) change no answer."""
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 2}
    habit = server.post({**body, "max_new_tokens": 5})
    assert habit.status_code == 400 and error_of(habit)["param"] == "max_new_tokens"
    assert "max_tokens" in error_of(habit)["message"].split("max_new_tokens", 1)[1]
    with pytest.raises(openai.BadRequestError, match="best_of"):
        server.client().chat.completions.create(
            model=MODEL, messages=GOOD, max_tokens=2, extra_body={"best_of": 2}
        )
    bookkeeping = {"user": "robot-7", "metadata": {"node": "arm"}, "store": False}
    caching = {"prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "implicit"}}
    assert (
        server.post({**body, **bookkeeping, **caching, "parallel_tool_calls": True}).status_code
        == 200
    )
    # a client that writes every field of OpenAI's request, unset ones as null
    unset = ("reasoning_effort", "verbosity", "web_search_options", "moderation")
    assert server.post({**body, **dict.fromkeys(unset)}).status_code == 200
    for name, value in [("reasoning_effort", "high"), ("moderation", {"model": "omni"})]:
        asked = server.post({**body, name: value})
        assert asked.status_code == 400 and error_of(asked)["param"] == name
    # a reply that called a tool or spoke, in history: the model says neither
    call = {"name": "grip", "arguments": "{}"}
    for name, value in [("function_call", call), ("audio", {"id": "audio_1"})]:
        said = {"role": "assistant", "content": None, name: value}
        history = server.post({**body, "messages": [ask("Hi."), said, ask("And?")]})
        assert history.status_code == 400 and error_of(history)["param"] == f"messages[1].{name}"


HUGE = "x" * 200_000
DEEP = json.loads("[" * 900 + "]" * 900)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": HUGE},
        {"temperature": DEEP},
        {"seed": -(10**4000)},
        {"model": HUGE},
        {HUGE: 1},
        {"messages": [{"role": HUGE, "content": "Hi."}]},
        {"messages": [{"role": "user", "content": [{"type": HUGE}]}]},
        {"messages": [ask("What?", f"file://{HUGE}/one.png")]},
    ],
    ids=[
        "long string",
        "deep list",
        "long integer",
        "model",
        "field name",
        "role",
        "part type",
        "file url",
    ],
)
def test_a_refused_value_is_quoted_cut_short_not_sent_back_whole(server, fields):
    """Each refusal quotes what it refuses; a value of 200 kB (or nested 900 deep) came back
    whole in the message."""
    response = server.post({"model": MODEL, "messages": GOOD, "max_tokens": 2, **fields})
    assert response.status_code in (400, 404), response.text[:200]
    error = error_of(response)
    assert len(error["message"]) < 300 and len(error["param"]) < 100, error["message"][:300]


def _png_base64(seed: int = 1) -> str:
    return data_uri(picture(seed)).partition(",")[2]


@pytest.mark.parametrize(
    "url, named",
    [
        ("data:text/plain;base64,", "text/plain"),
        ("data:application/json;base64,", "application/json"),
        ("data:video/mp4;base64,", "video/mp4"),
        ("data:image/png;base64", "data:image/png;base64,"),
        ("data:image/png,", "base64"),
    ],
    ids=["text", "json", "video", "no_comma", "not_base64"],
)
def test_a_data_url_that_is_not_a_base64_image_is_a_400_naming_it(server, url, named):
    """The media type of a data: URL said nothing: text/plain was decoded as an image."""
    if url.endswith(","):
        url += _png_base64()
    response = server.post({"model": MODEL, "messages": [ask("What?", url)], "max_tokens": 1})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "image_url" and named in error["message"]
    assert "\n" not in error["message"]


@pytest.mark.parametrize(
    "header",
    [
        "data:image/jpeg;base64",
        "DATA:IMAGE/PNG;BASE64",
        "data:;base64",
        "data:application/octet-stream;base64",
        "data:image/png;x=y;base64",
    ],
    ids=["other_image_type", "upper_case", "no_type", "octet_stream", "parameter"],
)
def test_a_data_url_of_any_image_type_is_read_by_its_bytes(server, header):
    """The bytes say what the image is (a PNG sent as image/jpeg is still a PNG); the scheme,
    media type and base64 are case-insensitive; a URL without a media type is taken too."""
    url = f"{header},{_png_base64()}"
    response = server.post({"model": MODEL, "messages": [ask("What?", url)], "max_tokens": 1})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_bare_base64_is_named_as_such_not_taken_for_a_path(server, fmt):
    """An image's base64 without its data: header (as other APIs take images): a JPEG's begins
    with /9j/, so it was read as a file path ('image file /9j/4AAQ... does not exist', the
    whole image echoed back), the others as an unknown kind of URL."""
    bare = data_uri(picture(1), fmt).partition(",")[2]
    response = server.post({"model": MODEL, "messages": [ask("What?", bare)], "max_tokens": 1})
    assert response.status_code == 400, response.text
    message = error_of(response)["message"]
    assert f"data:image/{fmt.lower()};base64," in message and len(message) < 200


def test_image_and_limit_refusals_name_what_to_change(server, monkeypatch):
    corrupt = data_uri(picture(1))[:-200]
    bad = server.post({"model": MODEL, "messages": [ask("What?", corrupt)]})
    assert bad.status_code == 400 and error_of(bad)["param"] == "image_url"
    assert "image image" not in error_of(bad)["message"]
    over = server.post({"model": MODEL, "messages": GOOD, "max_tokens": 901})
    assert (
        error_of(over)["param"] == "max_tokens" and "lower max_tokens" in error_of(over)["message"]
    )
    newer = server.post({"model": MODEL, "messages": GOOD, "max_completion_tokens": 1000})
    assert error_of(newer)["param"] == "max_completion_tokens"  # the field the client sent
    assert "lower max_completion_tokens" in error_of(newer)["message"]
    huge = server.post({"model": MODEL, "messages": [ask("word " * 50_000)], "max_tokens": 2})
    assert huge.status_code == 400 and error_of(huge)["code"] == "context_length_exceeded"
    monkeypatch.setattr(server.state.pipe.limits, "max_prompt_tokens", 3)
    limited = server.post({"model": MODEL, "messages": GOOD, "max_tokens": 2})
    assert error_of(limited)["code"] == "context_length_exceeded"
    assert error_of(limited)["param"] == "messages"


def test_a_max_tokens_past_the_context_is_refused_where_the_library_cuts_it(server):
    """Under --max-new-tokens but past the context: the server refuses it, as OpenAI's API does
    (the library stops such an answer at the context instead: tests/test_runtime_limits.py);
    without max_tokens the answer may run to the end of the context."""
    pipe = server.state.pipe
    question = "word " * (pipe.max_context - 40)
    prompt = len(pipe.conversation_ids([(question, None)]))
    room = pipe.max_context - prompt
    assert 0 < room < 64
    messages = [ask(question)]
    past = server.post({"model": MODEL, "messages": messages, "max_tokens": room + 1})
    assert past.status_code == 400 and error_of(past)["code"] == "context_length_exceeded"
    assert error_of(past)["param"] == "max_tokens"
    for body in [{"max_tokens": room}, {}]:
        fits = server.post({"model": MODEL, "messages": messages, **body})
        assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] <= room


def test_line_wrapped_base64_is_taken(server):
    url = data_uri(picture(1))
    header, payload = url.split(",", 1)
    wrapped = header + "," + "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))
    body = {"model": MODEL, "max_tokens": 4}
    want = server.post({**body, "messages": [ask("What?", url)]}).json()
    got = server.post({**body, "messages": [ask("What?", wrapped)]})
    assert got.status_code == 200
    assert got.json()["choices"][0]["message"] == want["choices"][0]["message"]


def test_405_says_which_methods_are_allowed(server):
    response = httpx.get(server.url + "/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_keys_models_and_sizes_get_their_statuses(server):
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 2}
    assert error_of(server.post(body, key=""))["code"] == "invalid_api_key"
    assert server.post(body, key="wrong").status_code == 401
    odd_key = httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"Authorization": b"Bearer \xff"}
    )
    assert odd_key.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(model=MODEL, messages=GOOD)
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # a probe needs no key
    unknown = server.post({**body, "model": "gpt-4o"})
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4o", messages=GOOD)
    huge_body = server.post({**body, "padding": "x" * 400_000})
    assert huge_body.status_code == 413 and error_of(huge_body)["code"] == "request_too_large"
    big_file = server.post(
        {**body, "messages": [ask("What?", "data:image/png;base64," + "A" * 200_000)]}
    )
    assert big_file.status_code == 413
    many_pixels = server.post(
        {**body, "messages": [ask("What?", data_uri(Image.new("RGB", (300, 200)), "JPEG"))]}
    )
    assert many_pixels.status_code == 413 and "pixels" in error_of(many_pixels)["message"]
    assert server.metric('llava_edge_http_requests_total{status="413"}') >= 3


def test_a_key_beyond_ascii_is_taken_as_its_utf8_bytes(context_model_dir):
    """A header's bytes reach the app decoded as Latin-1: compared as UTF-8, a key holding a
    character beyond Latin-1 matched no header at all, and every request got 401."""
    key = "clé-ключ"
    app = create_app(ServeOptions(context_model_dir, model_name=MODEL, api_key=key))
    client = TestClient(app)  # no lifespan: /v1/models needs no model
    sent = client.get("/v1/models", headers={"Authorization": b"Bearer " + key.encode()})
    assert sent.status_code == 200 and sent.json()["data"][0]["id"] == MODEL
    wrong = client.get("/v1/models", headers={"Authorization": b"Bearer " + "clé".encode()})
    assert wrong.status_code == 401
    app = create_app(ServeOptions(context_model_dir, model_name=MODEL, api_key="clé"))
    as_latin1 = {"Authorization": b"Bearer " + "clé".encode("latin-1")}  # as http.client sends
    assert TestClient(app).get("/v1/models", headers=as_latin1).status_code == 200


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Decoder calls slowed to ~200 a second: the tiny model answers 800 tokens in well under a
    second, too fast for a client to leave mid-answer on purpose."""
    backend = server.state.pipe.backend
    decode = backend.decode

    def slow(*args):
        time.sleep(STEP_S)
        return decode(*args)

    monkeypatch.setattr(backend, "decode", slow)


STEP_S = 0.005
SLOW_DECODE = (
    "import sys, time\n"
    "from llava_edge.runtime.onnx_backend import OnnxBackend\n"
    "decode = OnnxBackend.decode\n"
    f"OnnxBackend.decode = lambda self, *a: (time.sleep({STEP_S}), decode(self, *a))[1]\n"
    "from llava_edge.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_a_stream_cut_off_by_the_time_limit_is_counted(server, slow_steps, monkeypatch):
    """Its status went out as 200 with the first chunk: the metrics still tell it failed."""
    monkeypatch.setattr(server.state.pipe.limits, "timeout_s", 0.5)
    errors = server.metric("llava_edge_stream_errors_total")
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 800, "ignore_eos": True, "stream": True}
    response = server.post(body)
    assert response.status_code == 200
    events = [line for line in response.text.splitlines() if line.startswith("data: {")]
    assert json.loads(events[-1][len("data: ") :])["error"]["code"] == "timeout"
    assert server.metric("llava_edge_stream_errors_total") == errors + 1


def test_the_time_limit_holds_while_the_engine_is_busy_in_one_long_call(server, monkeypatch):
    """The engine notices a time limit only between two of its calls; one call (a large image's
    prefill on a Jetson, a stalled device) may outlast it. The client still gets its 504, or its
    stream's timeout event, when the limit passes, and the request is cancelled."""
    backend = server.state.pipe.backend
    decode, slow = backend.decode, {"calls": 0}

    def stalls_after_the_first_call(*args):
        slow["calls"] += 1
        if slow["calls"] > 1:
            time.sleep(2.5)
        return decode(*args)

    monkeypatch.setattr(server.state.pipe.limits, "timeout_s", 0.8)
    monkeypatch.setattr(backend, "decode", stalls_after_the_first_call)
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 50, "ignore_eos": True}
    start = time.monotonic()
    stream = server.post({**body, "stream": True})  # its first token comes from the quick call
    events = [line for line in stream.text.splitlines() if line.startswith("data: {")]
    assert stream.status_code == 200 and json.loads(events[-1][6:])["error"]["code"] == "timeout"
    assert time.monotonic() - start < 2
    start = time.monotonic()
    whole = server.post(body)
    assert whole.status_code == 504 and error_of(whole)["code"] == "timeout"
    assert time.monotonic() - start < 2
    deadline = time.time() + 10  # the calls under way end, then the rows are free
    while server.state.engine.stats()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.state.engine.stats()["running"] == 0


def test_a_request_past_the_time_limit_is_not_retried_by_openais_client(
    server, slow_steps, monkeypatch
):
    """OpenAI's client retries a 5xx twice by default: a robot would hear of its answer's time
    limit after three of them. A 504 tells it not to retry (another try takes as long)."""
    monkeypatch.setattr(server.state.pipe.limits, "timeout_s", 0.3)
    before = server.metric('llava_edge_http_requests_total{status="504"}', default=0)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)  # its default retries
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(
            model=MODEL, messages=GOOD, max_tokens=800, extra_body={"ignore_eos": True}
        )
    assert raised.value.status_code == 504
    assert server.metric('llava_edge_http_requests_total{status="504"}') == before + 1


def test_the_time_limit_holds_while_a_large_image_decodes(server, monkeypatch):
    """Decoding and resizing a photo of tens of megapixels takes seconds on a Jetson's CPU: the
    504 still comes at --timeout, and the request, once rendered, is not left to the engine."""
    pipe = server.state.pipe
    image_pixels = pipe.image_pixels

    def slow_decode(image):
        time.sleep(2)
        return image_pixels(image)

    monkeypatch.setattr(pipe.limits, "timeout_s", 0.5)
    monkeypatch.setattr(pipe, "image_pixels", slow_decode)
    generated = server.state.engine.stats()["generated_tokens"]
    start = time.monotonic()
    late = server.post({"model": MODEL, "messages": [ask("What?", data_uri(picture(5)))]})
    assert late.status_code == 504 and error_of(late)["code"] == "timeout"
    assert time.monotonic() - start < 1.5
    time.sleep(2)  # the decode ends; what it rendered goes no further than the queue
    stats = server.state.engine.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["generated_tokens"] == generated


def test_a_client_leaving_mid_stream_frees_its_row_and_a_full_queue_gets_429(server, slow_steps):
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 800, "ignore_eos": True}
    url, headers = server.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    cancelled = server.metric("llava_edge_engine_cancelled_total")
    finished = server.metric("llava_edge_engine_finished_total")
    results: list[httpx.Response] = []
    queued = threading.Thread(target=lambda: results.append(server.post({**body, "max_tokens": 2})))
    with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        stream = {**body, "stream": True}
        with a.stream("POST", url, json=stream, headers=headers) as one:
            lines_one = one.iter_lines()  # (dropping an iterator closes the connection)
            assert next(lines_one).startswith("data: ")  # streaming: it holds a row
            with b.stream("POST", url, json=stream, headers=headers) as two:
                lines_two = two.iter_lines()
                assert next(lines_two).startswith("data: ")  # the other row
                assert server.metric("llava_edge_engine_running") == 2
                queued.start()  # waits for a row: the queue (of one) is full
                deadline = time.time() + 10
                while server.metric("llava_edge_engine_waiting") < 1 and time.time() < deadline:
                    time.sleep(0.01)
                full = server.post(body)
                assert full.status_code == 429 and error_of(full)["code"] == "queue_full"
                assert full.headers["retry-after"]
                fetched = []

                class Counting(QuietHandler):
                    def do_GET(self):
                        fetched.append(self.path)
                        self.send_response(404)
                        self.end_headers()

                with web_server(Counting) as base:  # refused before its image is fetched
                    pictured = server.post({**body, "messages": [ask("What?", base + "/a.png")]})
                assert pictured.status_code == 429 and fetched == []
        # both clients left mid-answer (800 tokens take longer than this)
        queued.join(30)
    assert results[0].status_code == 200  # the queued request got a freed row
    with pytest.raises(httpx.TimeoutException):  # a client that gives up on a whole answer
        server.post(body, timeout=0.3)
    deadline = time.time() + 10
    while server.metric("llava_edge_engine_running") and time.time() < deadline:
        time.sleep(0.02)
    assert server.metric("llava_edge_engine_running") == 0
    assert server.metric("llava_edge_engine_cancelled_total") == cancelled + 3
    assert server.metric("llava_edge_engine_finished_total") == finished + 1  # the queued one
    assert server.metric("llava_edge_client_disconnects_total") >= 3


def test_a_client_leaving_before_the_first_chunk_frees_its_row(server, slow_steps):
    """The client leaves after the response has started and before its body's first chunk is
    asked for, so the body's generator never starts. Raw ASGI, which fixes that order."""
    engine = server.state.engine
    before = engine.stats()
    disconnects = server.metric("llava_edge_client_disconnects_total")
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 800, "ignore_eos": True}

    async def leave_at_the_start() -> list[str]:
        gone, sent = asyncio.Event(), []
        messages = [{"type": "http.request", "body": json.dumps({**body, "stream": True}).encode()}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message["type"])
            if message["type"] == "http.response.start":
                gone.set()
                await asyncio.sleep(0.05)  # the disconnect is seen before the body is asked for

        await server.app(chat_scope(server.app), receive, send)
        return sent

    assert asyncio.run(leave_at_the_start()) == ["http.response.start"]
    deadline = time.time() + 10  # 800 slowed tokens take over 4 s
    while engine.stats()["running"] and time.time() < deadline:
        time.sleep(0.02)
    after = engine.stats()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["finished"] == before["finished"]
    assert server.metric("llava_edge_client_disconnects_total") == disconnects + 1


def leave_after(server: Server, body: dict, seconds: float) -> None:
    """A real HTTP client: sends `body`, reads nothing, and closes its connection after
    `seconds` (a robot powered off mid-request)."""
    data = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(head.encode() + data)
        time.sleep(seconds)


def settles(engine, check, within: float) -> bool:
    """Whether `check(engine.stats())` comes true within `within` seconds."""
    deadline = time.monotonic() + within
    while not check(engine.stats()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_client_leaving_while_its_image_decodes_gives_its_place_back_at_once(server, monkeypatch):
    """Decoding a photo of tens of megapixels takes seconds on a Jetson's CPU: a client gone
    meanwhile gives its place in the queue back when it leaves, not when the decode ends, and
    what the decode renders never reaches the engine."""
    pipe, engine = server.state.pipe, server.state.engine
    image_pixels = pipe.image_pixels

    def slow_decode(image):
        time.sleep(2)
        return image_pixels(image)

    monkeypatch.setattr(pipe, "image_pixels", slow_decode)
    before = engine.stats()
    disconnects = server.metric("llava_edge_client_disconnects_total")
    body = {"model": MODEL, "messages": [ask("What?", data_uri(picture(7)))], "max_tokens": 8}
    leave_after(server, body, 0.4)
    assert settles(engine, lambda s: s["admitting"] == 0, within=1)
    time.sleep(2)  # the decode ends: nothing of it is submitted
    assert engine.stats()["requests"] == before["requests"]
    assert server.metric("llava_edge_client_disconnects_total") == disconnects + 1


def test_a_client_leaving_while_its_image_is_encoded_gets_no_prefill(server, monkeypatch):
    """The engine cannot stop its vision encoder mid-call (a large image's takes seconds on a
    Jetson), but a request whose client left meanwhile leaves its row there, before its
    prompt is run."""
    pipe, engine = server.state.pipe, server.state.engine
    pixel_features = pipe.pixel_features

    def slow_encode(pixels):
        time.sleep(1.5)
        return pixel_features(pixels)

    monkeypatch.setattr(pipe, "pixel_features", slow_encode)
    before = engine.stats()
    body = {"model": MODEL, "messages": [ask("What?", data_uri(picture(8)))], "max_tokens": 8}
    leave_after(server, body, 0.5)
    assert settles(engine, lambda s: s["running"] == 0, within=3)
    after = engine.stats()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["prompt_tokens"] == before["prompt_tokens"]  # its prompt was never run


def test_clients_leaving_while_queued_or_mid_answer_free_their_place_at_once(server, monkeypatch):
    """Whole or streamed, waiting for a row or decoding: a client that closes its connection
    has its request cancelled within a few decoder steps, and the answers of the clients that
    stay are what they would be alone."""
    pipe, engine, backend = server.state.pipe, server.state.engine, server.state.pipe.backend
    want = pipe.answer(None, "What?", max_new_tokens=600, ignore_eos=True).text
    decode = backend.decode
    monkeypatch.setattr(backend, "decode", lambda *a: (time.sleep(STEP_S), decode(*a))[1])
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 600, "ignore_eos": True}
    answers: dict[str, str] = {}

    def stay(name: str) -> None:
        answers[name] = server.post(body).json()["choices"][0]["message"]["content"]

    stays = threading.Thread(target=stay, args=("first",))
    stays.start()
    assert settles(engine, lambda s: s["running"] == 1, within=5)
    cancelled = engine.stats()["cancelled"]
    for leaving in [body, {**body, "stream": True}]:  # each takes the second row, then leaves
        leave_after(server, leaving, 0.3)
        assert settles(engine, lambda s: s["running"] == 1, within=1)
    filler = threading.Thread(target=stay, args=("second",))
    filler.start()  # both rows busy: the next client waits in the queue
    assert settles(engine, lambda s: s["running"] == 2, within=5)
    leave_after(server, body, 0.3)
    assert settles(engine, lambda s: s["waiting"] == 0 and s["running"] == 2, within=1)
    stays.join(30)
    filler.join(30)
    assert answers == {"first": want, "second": want}
    assert engine.stats()["cancelled"] == cancelled + 3


def chat_scope(app) -> dict:
    """The ASGI scope of an authorised POST /v1/chat/completions, for raw ASGI calls."""
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer " + KEY.encode()),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "app": app,
    }


def test_reading_a_large_body_does_not_stall_the_other_clients(server, monkeypatch):
    """Parsing a body of many small messages takes seconds at the body limit (a 10 MB one took
    1.8 s here): on the event loop, every other client's stream and /health would wait for it."""
    from llava_edge.serve import protocol

    parse = protocol.parse_chat_request

    def slow_parse(body, video):
        time.sleep(2)  # as a large body takes
        return parse(body, video)

    monkeypatch.setattr(protocol, "parse_chat_request", slow_parse)
    body = {"model": MODEL, "messages": GOOD, "max_tokens": 2}
    slow = threading.Thread(target=server.post, args=(body,))
    slow.start()
    try:
        time.sleep(0.3)  # the slow request is being parsed
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - start < 1
    finally:
        slow.join(30)


def test_a_client_leaving_while_sending_its_body_is_no_server_error(server, caplog):
    """A robot on flaky Wi-Fi gives up halfway through uploading its image: that is a client
    gone (499, counted as a disconnect), not a 500 with a traceback in the server's log."""
    disconnects = server.metric("llava_edge_client_disconnects_total")
    messages = [
        {"type": "http.request", "body": b'{"model": "tiny", "messages": [', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    with caplog.at_level("ERROR", logger="llava_edge.serve"):
        asyncio.run(server.app(chat_scope(server.app), receive, send))
    assert sent[0]["status"] == 499 and not caplog.records
    assert server.metric("llava_edge_client_disconnects_total") == disconnects + 1
    assert server.metric("llava_edge_engine_admitting") == 0


def _stalled_upload() -> tuple[Callable, Callable, list[dict]]:
    """An ASGI receive that gives the start of a body and then nothing, a send that keeps what
    the app sends, and the list it keeps it in."""
    parts = [{"type": "http.request", "body": b'{"model": "tiny", ', "more_body": True}]
    sent: list[dict] = []

    async def receive() -> dict:
        if parts:
            return parts.pop(0)
        await asyncio.sleep(3600)  # the rest never comes

    async def send(message: dict) -> None:
        sent.append(message)

    return receive, send, sent


def test_a_body_that_stalls_mid_upload_gets_408_within_the_time_limit(context_model_dir):
    """A robot whose Wi-Fi drops without the connection closing stops sending halfway through
    its image: --timeout answers it instead of the request holding its connection for good."""
    options = ServeOptions(context_model_dir, model_name=MODEL, limits=Limits(timeout_s=0.5))
    app = create_app(options)
    receive, send, sent = _stalled_upload()

    with TestClient(app) as client:
        deadline = time.time() + 30
        while client.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        start = time.time()
        asyncio.run(asyncio.wait_for(app(chat_scope(app), receive, send), 30))
    assert time.time() - start < 5
    assert sent[0]["status"] == 408
    assert "--timeout" in json.loads(sent[1]["body"])["error"]["message"]


def test_a_body_that_stalls_without_a_time_limit_gives_its_queue_place_back(
    context_model_dir, monkeypatch
):
    """Without --timeout, an upload whose link dropped without the connection closing held its
    place in the queue for good: a few such robots and every other client got 429 until the
    server restarted. A body from which nothing arrives for BODY_IDLE_S gets 408."""
    from llava_edge.serve import app as app_module

    monkeypatch.setattr(app_module, "BODY_IDLE_S", 0.5)
    options = ServeOptions(context_model_dir, model_name=MODEL, max_batch=1, max_queue=0)
    app = create_app(options)
    receive, send, sent = _stalled_upload()

    async def stalled_then_another() -> list[int]:
        stalled = asyncio.ensure_future(app(chat_scope(app), receive, send))
        await asyncio.sleep(0.1)
        statuses = [app.state.serve.engine.stats()["admitting"]]
        await asyncio.wait_for(stalled, 10)
        return [*statuses, app.state.serve.engine.stats()["admitting"]]

    with TestClient(app) as client:
        deadline = time.time() + 30
        while client.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert asyncio.run(stalled_then_another()) == [1, 0]
        answer = client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": GOOD, "max_tokens": 2}
        )
    assert sent[0]["status"] == 408
    assert "no byte" in json.loads(sent[1]["body"])["error"]["message"]
    assert answer.status_code == 200


def test_shutdown_cancels_what_no_client_waits_for(context_model_dir, monkeypatch):
    """By the app's shutdown every client has had its answer or been cut off (SIGTERM's drain
    timeout), so a request still in the engine (one whose handler was cancelled while
    submitting it) is cancelled, not decoded to its end while the process waits."""
    from llava_edge.runtime.onnx_backend import OnnxBackend

    decode = OnnxBackend.decode
    monkeypatch.setattr(
        OnnxBackend, "decode", lambda self, *a: (time.sleep(STEP_S), decode(self, *a))[1]
    )
    app = create_app(ServeOptions(context_model_dir, model_name=MODEL))
    with TestClient(app):
        deadline = time.time() + 30
        while not app.state.serve.ready and time.time() < deadline:
            time.sleep(0.05)
        engine = app.state.serve.engine
        orphan = engine.submit(None, "Go on.", max_new_tokens=900, ignore_eos=True)
        start = time.time()
    assert time.time() - start < 2  # 900 slowed tokens take over 4.5 s
    with pytest.raises(Cancelled):
        orphan.result(timeout=0)


def test_a_request_past_the_time_limit_gets_504(context_model_dir):
    options = ServeOptions(context_model_dir, model_name=MODEL, limits=Limits(timeout_s=1e-9))
    with TestClient(create_app(options)) as client:  # the ASGI client, lifespan and all
        deadline = time.time() + 30
        while client.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        late = client.post("/v1/chat/completions", json={"model": MODEL, "messages": GOOD})
    assert late.status_code == 504 and "time limit" in error_of(late)["message"]


def test_a_stream_finished_in_time_is_delivered_whole_to_a_slow_reader(
    context_model_dir, monkeypatch
):
    """The time limit bounds the work, not the reading: an answer the engine finished within it
    reaches a client that reads it after the deadline (a slow link), not cut by a 504 event."""
    from llava_edge.serve import app as serve_app

    sse = serve_app._sse_data

    def slow(payload):
        time.sleep(0.03)  # the link: every chunk takes this long to go out
        return sse(payload)

    monkeypatch.setattr(serve_app, "_sse_data", slow)
    server = Server(ServeOptions(context_model_dir, model_name=MODEL, limits=Limits(timeout_s=0.5)))
    try:
        body = {"model": MODEL, "messages": GOOD, "max_tokens": 60, "ignore_eos": True}
        start = time.perf_counter()
        reply = server.post({**body, "stream": True})
        took = time.perf_counter() - start
        assert server.state.engine.stats()["failed"] == 0  # the engine finished it in time
    finally:
        server.stop()
    lines = [line for line in reply.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]
    assert took > 0.7  # sent well past the time limit


def test_the_time_limit_counts_from_the_request_not_from_its_image(context_model_dir):
    """A slow image server cannot stretch --timeout: fetching is part of the request."""

    class Slow(QuietHandler):
        def do_GET(self):
            time.sleep(3)
            self.send_response(200)
            self.end_headers()

    options = ServeOptions(
        context_model_dir, model_name=MODEL, allow_remote_images=True, limits=Limits(timeout_s=1)
    )
    with web_server(Slow) as base, TestClient(create_app(options)) as client:
        deadline = time.time() + 30
        while client.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        late = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [ask("What?", base + "/x.png")]},
        )
        took = time.monotonic() - start
    assert late.status_code == 504 and error_of(late)["code"] == "timeout"
    assert took < 2.5


@pytest.mark.parametrize("field", ["max_body_mb", "max_image_mb"])
def test_a_size_limit_of_infinite_mb_is_refused_at_startup(context_model_dir, field):
    """--max-body-mb inf started a server that answered every request 500 (its bytes cannot
    be counted in an int); --max-image-mb inf ended in a traceback."""
    with pytest.raises(LlavaEdgeError, match=f"--{field.replace('_', '-')} must be positive"):
        ServeOptions(context_model_dir, **{field: float("inf")})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port must be 0 to 65535"),
        (["--max-new-tokens", "0"], "max_new_tokens must be a positive"),
        (["--max-body-mb", "-1"], "--max-body-mb must be positive"),
        (["--timeout", "-1"], "timeout_s must be a positive"),
        (["--remote-timeout", "0", "--allow-remote-images"], "--remote-timeout must be positive"),
        (["--allowed-media-dir", "/nonexistent"], "is not a directory"),
        # a key from an unset variable ('--api-key=$KEY') must not serve without one
        (["--port", "0", "--api-key="], "--api-key is empty"),
    ],
)
def test_settings_that_would_refuse_every_request_fail_at_startup(
    context_model_dir, flags, message
):
    done = subprocess.run(
        [sys.executable, "-m", "llava_edge.cli", "serve", str(context_model_dir), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "field, flag", [("max_batch", "--max-batch"), ("max_queue", "--max-queue")]
)
def test_batch_and_queue_sizes_are_refused_before_the_model_loads(context_model_dir, field, flag):
    """At startup, naming the flag, not after the port is taken and the model loaded (a minute
    for a 7B model's engines on a Jetson) in the engine's terms."""
    with pytest.raises(LlavaEdgeError, match=f"{flag} must be"):
        ServeOptions(context_model_dir, **{field: -1})


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_engine_that_stopped_fails_health_and_refuses_requests(context_model_dir, monkeypatch):
    """Its scheduler thread gone (a failed step, and no memory for a fresh cache): /health says
    so for the robot's supervisor to restart the server, and requests get 503 instead of
    waiting forever."""
    app = create_app(ServeOptions(context_model_dir, model_name=MODEL))
    with TestClient(app) as client:
        deadline = time.time() + 30
        while client.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        engine = app.state.serve.engine

        def gone(*args) -> None:
            raise MemoryError("out of device memory")

        monkeypatch.setattr(engine, "_decode", lambda: 1 / 0)
        monkeypatch.setattr(engine.cache, "shrink", gone)
        monkeypatch.setattr(engine.pipe.backend, "new_cache", gone)
        body = {"model": MODEL, "messages": GOOD, "max_tokens": 3}
        assert client.post("/v1/chat/completions", json=body).status_code == 500
        engine._thread.join(10)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 503 and "out of device memory" in error_of(refused)["message"]


def test_a_server_stopped_while_loading_closes_the_model_it_loads(context_model_dir):
    """An app embedded in a robot's process and stopped before its model is ready leaves no
    model (sessions, device memory) and no scheduler thread behind."""

    def schedulers() -> int:
        return [thread.name for thread in threading.enumerate()].count("llava-edge-batch")

    before = schedulers()  # other apps' (this module's server)
    app = create_app(ServeOptions(context_model_dir, model_name=MODEL))
    with TestClient(app):
        pass  # stopped at once: the model is still loading
    state = app.state.serve
    state.loader.join(30)
    assert schedulers() == before and (state.pipe is None or state.pipe.closed)


def test_loading_gives_503_before_the_model_is_ready(context_model_dir):
    app = create_app(ServeOptions(context_model_dir, model_name=MODEL))
    client = TestClient(app)  # no lifespan: the model never starts loading
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": GOOD})
    assert response.status_code == 503 and error_of(response)["code"] == "model_loading"
    assert response.headers["retry-after"] == "1"


def start_cli_server(model_dir: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`llava-edge serve` in a subprocess (its decoder slowed), once it is ready."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    command = ["serve", str(model_dir), "--port", str(port), "--model-name", MODEL, *options]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_DECODE, *command, "--threads", "1"],
        env={**os.environ, "LLAVA_EDGE_API_KEY": KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return process, url


def test_sigterm_drains_the_answer_in_flight_then_exits(context_model_dir):
    process, url = start_cli_server(context_model_dir)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        stream = client.chat.completions.create(
            model=MODEL,
            messages=GOOD,
            max_tokens=300,
            stream=True,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        chunks = iter(stream)
        next(chunks)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the answer takes over a second more (slowed decoder)
        with pytest.raises(httpx.TransportError):  # draining: no new connections
            httpx.get(url + "/health")
        rest = list(chunks)
        assert rest[-2].choices[0].finish_reason == "length"  # the whole answer came
        assert rest[-1].usage.completion_tokens == 300
        # uvicorn re-raises the signal once it has shut down, so the parent sees why it ended
        assert process.wait(30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
        log = process.stdout.read().decode()
    assert "Traceback" not in log and "Finished server process" in log
    # where clients find it, and when it can answer: uvicorn says neither for a bound socket
    assert f"llava-edge serve: listening on {url}/v1, model id '{MODEL}'" in log
    assert f"llava-edge serve: {MODEL} loaded; ready" in log


def test_a_second_ctrl_c_quits_at_once_and_closes_the_model(context_model_dir):
    """uvicorn's force quit ("CTRL+C to force quit") skips the app's shutdown: the model was
    left open under the engine's backend call as the interpreter exited (onnxruntime then
    aborts the process: exit 134), and uvicorn logged the app's cancelled shutdown as a
    traceback."""
    process, url = start_cli_server(context_model_dir)
    try:
        body = {"model": MODEL, "messages": GOOD, "max_tokens": 300, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers
        ) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGINT)
            time.sleep(0.3)  # draining: the answer takes over a second more (slowed decoder)
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(httpx.TransportError):
                list(lines)
        assert process.wait(30) == 130
    finally:
        if process.poll() is None:
            process.kill()
        log = process.stdout.read().decode()
        process.stdout.close()
    assert "Traceback" not in log and "terminate called" not in log, log
    assert log.strip().endswith("llava-edge serve: interrupted")


def test_drain_timeout_caps_the_wait(context_model_dir):
    """The answer in flight is cut off, its stream ended by an error event; a request still
    waiting for a row gets a 503 to retry elsewhere (OpenAI's error JSON, no traceback)."""
    process, url = start_cli_server(context_model_dir, "--drain-timeout", "0.5", "--max-batch", "1")
    try:
        body = {"model": MODEL, "messages": GOOD, "max_tokens": 900, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        queued: list[httpx.Response] = []
        waiter = threading.Thread(
            target=lambda: queued.append(
                httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            )
        )
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers
        ) as response:
            lines = response.iter_lines()
            next(lines)
            waiter.start()
            time.sleep(0.3)  # it waits for the only row
            process.send_signal(signal.SIGTERM)
            start = time.time()
            rest = [line for line in lines if line]  # cut off after the drain timeout
        waiter.join(30)
        assert rest[-1] == "data: [DONE]" and '"code": "shutting_down"' in rest[-2]
        assert process.wait(30) in (0, -signal.SIGTERM)
        assert time.time() - start < 4  # 900 slowed tokens would take over 4.5 s
        assert queued[0].status_code == 503 and error_of(queued[0])["code"] == "shutting_down"
    finally:
        if process.poll() is None:
            process.kill()
        log = process.stdout.read().decode()
        process.stdout.close()
    assert "Traceback" not in log


def test_cli_errors_are_one_line(context_model_dir):
    def serve(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
        code = f"{prelude}import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run(
            [sys.executable, "-c", code, "serve", *args], capture_output=True, text=True
        )

    missing = serve(str(context_model_dir), prelude="import sys; sys.modules['uvicorn'] = None; ")
    assert missing.returncode == 1 and "pip install 'llava-edge[serve]'" in missing.stderr
    no_model = serve("/nonexistent/model")
    assert no_model.returncode == 1 and "does not exist" in no_model.stderr
    bad_batch = serve(str(context_model_dir), "--port", "0", "--max-batch", "0")
    assert bad_batch.returncode == 1 and "--max-batch must be a whole number" in bad_batch.stderr
    taken = bind("127.0.0.1", 0)
    try:
        busy = serve(str(context_model_dir), "--port", str(taken.getsockname()[1]))
    finally:
        taken.close()
    assert busy.returncode == 1 and "cannot listen on 127.0.0.1" in busy.stderr
    for result in (missing, no_model, bad_batch, busy):
        assert "Traceback" not in result.stderr


def test_localhost_listens_on_ipv4_where_the_system_lists_ipv6_first(monkeypatch):
    """As uvicorn binds: a robot's other nodes often call this machine 127.0.0.1."""
    import socket

    real = socket.getaddrinfo

    def ipv6_first(host, port, *args, **kwargs):
        infos = real("127.0.0.1", port, *args, **kwargs)
        v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))
        return [v6, *infos] if host == "localhost" else infos

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_first)
    sock = bind("localhost", 0)
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_shutdown_does_not_wait_for_good_on_a_stalled_decoder_call(
    context_model_dir, monkeypatch, caplog
):
    """A stalled device (a decoder call that never returns) must not hang the server's exit
    until systemd kills it: shutdown waits a bounded time, says a call was still running, and
    leaves the model open under that call instead of freeing it mid-call."""
    from llava_edge.serve import app as app_module

    monkeypatch.setattr(app_module, "ENGINE_STOP_S", 0.5)
    app = create_app(ServeOptions(context_model_dir, model_name=MODEL))
    entered, release = threading.Event(), threading.Event()
    try:
        with caplog.at_level("WARNING", logger="llava_edge.serve"), TestClient(app):
            deadline = time.time() + 30
            while not app.state.serve.ready and time.time() < deadline:
                time.sleep(0.05)
            backend = app.state.serve.pipe.backend
            decode = backend.decode

            def stalls(*args):
                entered.set()
                release.wait(60)
                return decode(*args)

            monkeypatch.setattr(backend, "decode", stalls)
            app.state.serve.engine.submit(None, "Go on.", max_new_tokens=50, ignore_eos=True)
            assert entered.wait(30)
            start = time.time()
        assert time.time() - start < 3
        assert "still running" in caplog.text
        assert not app.state.serve.pipe.closed
    finally:
        release.set()


@pytest.mark.parametrize("form", ["file", "data"])
def test_the_time_limit_holds_while_an_image_is_read_or_its_base64_decoded(
    server, media_dir, monkeypatch, form
):
    """A file on a slow SD card, or a 20 MB data: URI's base64 on a Jetson's CPU, is part of
    the request: the 504 still comes at --timeout."""
    from llava_edge.serve import media

    name = "_local_file" if form == "file" else "_data_uri"
    original = getattr(media, name)

    def slow(*args):
        time.sleep(2)
        return original(*args)

    monkeypatch.setattr(server.state.pipe.limits, "timeout_s", 0.5)
    monkeypatch.setattr(media, name, slow)
    url = (media_dir / "one.png").as_uri() if form == "file" else data_uri(picture(5))
    start = time.monotonic()
    late = server.post({"model": MODEL, "messages": [ask("What?", url)]})
    assert late.status_code == 504 and error_of(late)["code"] == "timeout"
    assert time.monotonic() - start < 1.5
    assert server.state.engine.stats()["admitting"] == 0  # its place, held while reading


def test_a_burst_of_uploads_past_the_queue_is_refused_before_its_images_are_read(
    server, monkeypatch
):
    """Requests still uploading or decoding their images count against --max-queue: a burst of
    large uploads is refused (429) before it is all read and decoded at once, and every way out
    of reading (an answer, a bad image) gives the place back."""
    from llava_edge.serve import media

    original, entered, release = media._data_uri, threading.Semaphore(0), threading.Event()

    def held(*args):
        entered.release()
        release.wait(30)
        return original(*args)

    monkeypatch.setattr(media, "_data_uri", held)
    room = server.state.engine.max_batch + server.state.engine.max_queue  # an idle engine's
    good = {"model": MODEL, "messages": [ask("What?", data_uri(picture(2)))], "max_tokens": 2}
    bad = {"model": MODEL, "messages": [ask("What?", "data:image/png;base64,!!!!")]}
    bodies = [bad] + [good] * (room - 1)
    results: dict[int, httpx.Response] = {}
    threads = [
        threading.Thread(target=lambda i=i, b=b: results.__setitem__(i, server.post(b)))
        for i, b in enumerate(bodies)
    ]
    try:
        for thread in threads:
            thread.start()
        for _ in bodies:
            assert entered.acquire(timeout=30)  # every place taken, each image being decoded
        assert server.metric("llava_edge_engine_admitting") == room
        refused = server.post(good, timeout=5)
        assert refused.status_code == 429 and error_of(refused)["code"] == "queue_full"
    finally:
        release.set()
        for thread in threads:
            thread.join(30)
    assert results[0].status_code == 400
    assert all(results[i].status_code == 200 for i in range(1, room))
    assert server.metric("llava_edge_engine_admitting") == 0
    assert server.post(good).status_code == 200


DASHBOARD = "http://robot.local:3000"


def test_a_browser_page_of_an_allowed_origin_may_call_the_api(tiny_model_dir):
    """A robot's web dashboard calls the server from a browser: the preflight of an allowed
    origin is answered before the API key is asked for (browsers send none with it), and each
    response names the origin; another origin is told nothing, so its browser refuses."""
    options = ServeOptions(tiny_model_dir, api_key=KEY, cors_origins=[DASHBOARD])
    client = TestClient(create_app(options))  # no lifespan: the model need not load
    preflight = {
        "Origin": DASHBOARD,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    answer = client.options("/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == DASHBOARD
    health = client.get("/health", headers={"Origin": DASHBOARD})
    assert health.headers["access-control-allow-origin"] == DASHBOARD
    other = {**preflight, "Origin": "http://elsewhere.example"}
    assert "access-control-allow-origin" not in client.options("/v1/models", headers=other).headers
    unauthorized = client.get("/v1/models", headers={"Origin": DASHBOARD})
    assert unauthorized.status_code == 401  # the key still guards every call but the preflight


def test_a_dashboard_on_openais_js_client_passes_its_preflight(tiny_model_dir):
    """OpenAI's JavaScript client sends its own headers (X-Stainless-*) with every request, so
    its browser asks for them in the preflight: allowing only authorization and content-type
    failed that preflight (400), and a dashboard on the official client could not call at all.
    The origin is what is checked; any header an allowed page sends is taken."""
    options = ServeOptions(tiny_model_dir, api_key=KEY, cors_origins=[DASHBOARD])
    client = TestClient(create_app(options))  # no lifespan: the model need not load
    preflight = {
        "Origin": DASHBOARD,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, "
        "x-stainless-retry-count",
    }
    answer = client.options("/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200
    allowed = answer.headers["access-control-allow-headers"].lower()
    assert "x-stainless-os" in allowed and "x-stainless-retry-count" in allowed
    other = {**preflight, "Origin": "http://elsewhere.example"}
    assert "access-control-allow-origin" not in client.options("/v1/models", headers=other).headers


def test_a_dashboard_page_sees_the_retry_headers(tiny_model_dir):
    """A page's script reads only the response headers CORS exposes: OpenAI's client in a
    browser saw no x-should-retry on a 504 (and retried it twice more) nor Retry-After."""
    options = ServeOptions(tiny_model_dir, api_key=KEY, cors_origins=[DASHBOARD])
    client = TestClient(create_app(options))  # no lifespan: the model is still loading
    headers = {"Origin": DASHBOARD, "Authorization": f"Bearer {KEY}"}
    loading = client.post(
        "/v1/chat/completions", json={"model": "x", "messages": GOOD}, headers=headers
    )
    assert loading.status_code == 503 and loading.headers["retry-after"] == "1"
    exposed = loading.headers["access-control-expose-headers"].lower()
    assert "retry-after" in exposed and "x-should-retry" in exposed


def test_without_cors_origins_a_browser_is_told_nothing(tiny_model_dir):
    client = TestClient(create_app(ServeOptions(tiny_model_dir)))
    health = client.get("/health", headers={"Origin": DASHBOARD})
    assert "access-control-allow-origin" not in health.headers


def test_a_web_page_of_another_origin_cannot_have_a_browser_run_a_question(server, tiny_model_dir):
    """A form, or a fetch of text/plain, needs no preflight: CORS hid only the reply from a page
    that --cors-origin does not allow, and its question still ran. Such a request is refused."""
    body = json.dumps({"model": MODEL, "messages": GOOD, "max_tokens": 2})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"}
    url = server.url + "/v1/chat/completions"
    finished = server.state.engine.stats()["finished"]
    page = httpx.post(url, content=body, headers={**headers, "Origin": "http://evil.example"})
    assert page.status_code == 403 and error_of(page)["code"] == "origin_not_allowed"
    assert "--cors-origin http://evil.example" in error_of(page)["message"]
    assert server.state.engine.stats()["finished"] == finished
    allowed = TestClient(create_app(ServeOptions(tiny_model_dir, cors_origins=[DASHBOARD])))
    json_headers = {**headers, "Content-Type": "application/json", "Origin": DASHBOARD}
    dashboard = allowed.post("/v1/chat/completions", content=body, headers=json_headers)
    assert dashboard.status_code == 503  # let through: the model is not loaded in this app


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain", "text/plain; charset=utf-8", "image/png"],
)
def test_a_body_of_another_media_type_than_json_gets_415_naming_the_header(server, content_type):
    """curl's `-d` alone sends application/x-www-form-urlencoded: told so and how to send JSON,
    before the body is read, rather than its bytes parsed as JSON by chance."""
    body = json.dumps({"model": MODEL, "messages": GOOD, "max_tokens": 2})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": content_type}
    finished = server.state.engine.stats()["finished"]
    refused = httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers)
    assert refused.status_code == 415, refused.text
    error = error_of(refused)
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_media_type"
    assert content_type in error["message"] and "Content-Type: application/json" in error["message"]
    assert server.state.engine.stats()["finished"] == finished


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json"],
)
def test_a_json_body_or_one_of_no_declared_type_is_answered(server, content_type):
    """A raw body sent without a Content-Type (`requests.post(url, data=...)`) is read as JSON."""
    body = json.dumps({"model": MODEL, "messages": GOOD, "max_tokens": 2})
    headers = {"Authorization": f"Bearer {KEY}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    request = httpx.Request(
        "POST", server.url + "/v1/chat/completions", content=body, headers=headers
    )
    assert ("content-type" in request.headers) == (content_type is not None)
    with httpx.Client() as client:
        answered = client.send(request)
    assert answered.status_code == 200, answered.text


@pytest.mark.parametrize("origin", ["robot.local:3000", "http://robot.local:3000/", "http://"])
def test_a_cors_origin_that_is_no_origin_is_refused(tiny_model_dir, origin):
    with pytest.raises(LlavaEdgeError, match="is no origin"):
        ServeOptions(tiny_model_dir, cors_origins=[origin])


def test_a_file_that_grows_past_the_limit_after_its_size_is_read_is_refused(tmp_path, monkeypatch):
    """The size is checked, then the file read: a frame a camera is still writing may have grown
    in between, and is read no further than the limit."""
    from llava_edge.serve import media

    image = tmp_path / "frame.jpg"
    image.write_bytes(b"x" * 5000)
    policy = media.MediaPolicy(max_image_bytes=1000, allowed_media_dir=tmp_path)
    sizes = iter([800])  # what the size check saw, before the camera wrote the rest
    monkeypatch.setattr(media.os.path, "getsize", lambda path: next(sizes, 5000))
    with pytest.raises(media.ApiError) as refused:
        media._local_file(image.as_uri(), policy)
    assert refused.value.status == 413 and "5000 bytes" in str(refused.value)
