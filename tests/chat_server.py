"""A stand-in for an OpenAI-compatible chat-completions server, for `data generate` tests.

It listens on a free port of 127.0.0.1 and speaks the protocol over real HTTP/1.1 (keep-alive,
Content-Length, JSON bodies): POST /v1/chat/completions and GET /v1/models. What it answers is
scripted per request: `script(body, attempt)` returns an action, where `attempt` counts the
earlier requests with the same sampling seed (a retry of the same sample). Actions:

    Reply(content, finish_reason, usage, delay)   a chat completion (after `delay` seconds)
    Status(code, message, headers, type)          an error with OpenAI's error body
    Drop()                                        close the connection without an answer
    Cut()                                         send the headers and half the body, then close
    Garbage()                                     200 with an HTML page instead of JSON
    BadEncoding()                                 200 "gzip" that is not gzip
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    content: str | None
    finish_reason: str = "stop"
    usage: tuple[int, int] = (100, 20)
    delay: float = 0.0


@dataclass
class Status:
    code: int
    message: str = "error"
    headers: dict = field(default_factory=dict)
    type: str = "server_error"  # OpenAI's error type (and code)


@dataclass
class Drop:
    pass


@dataclass
class Cut:
    pass


@dataclass
class Garbage:
    pass


@dataclass
class BadEncoding:
    pass


class ChatServer:
    def __init__(
        self,
        script: Callable[[dict, int], object],
        models: tuple[str, ...] = ("test-model",),
        api_key: str | None = None,
    ):
        self.script = script
        self.models = models
        self.api_key = api_key
        self.bodies: list[dict] = []  # every chat request, in arrival order
        self.listed = 0  # GET /v1/models requests
        self.attempts: Counter = Counter()  # by seed
        self.in_flight = 0
        self.most_in_flight = 0
        self.usage = [0, 0]  # tokens in the replies sent
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return self._json(404, {"error": {"message": f"no route {self.path}"}})
                with server.lock:
                    server.listed += 1
                data = [{"id": m, "object": "model", "owned_by": "test"} for m in server.models]
                self._json(200, {"object": "list", "data": data})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._json(404, {"error": {"message": f"no route {self.path}"}})
                if server.api_key and self.headers.get("Authorization") != (
                    f"Bearer {server.api_key}"
                ):
                    return self._json(401, {"error": {"message": "Incorrect API key provided"}})
                with server.lock:
                    server.bodies.append(body)
                    attempt = server.attempts[body.get("seed")]
                    server.attempts[body.get("seed")] += 1
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    self._act(server.script(body, attempt), body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): as a real server sees it
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _act(self, action, body):
                if isinstance(action, Reply):
                    time.sleep(action.delay)
                    with server.lock:
                        server.usage[0] += action.usage[0]
                        server.usage[1] += action.usage[1]
                    self._json(200, completion(body, action))
                elif isinstance(action, Status):
                    error = {"error": {"message": action.message, "type": action.type,
                                       "code": action.type}}  # fmt: skip
                    self._json(action.code, error, action.headers)
                elif isinstance(action, Drop):
                    self.close_connection = True
                elif isinstance(action, Cut):
                    data = json.dumps(completion(body, Reply("{}"))).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                elif isinstance(action, BadEncoding):
                    data = json.dumps(completion(body, Reply("{}"))).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif isinstance(action, Garbage):
                    data = b"<html><body>502 Bad Gateway</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    raise TypeError(f"unknown action {action!r}")

            def _json(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow reply still sleeping does not hold up the test's end
    block_on_close = False

    def handle_error(self, request, client_address):
        """A client that hung up (timed out, or gave up on a stopped run) is not a server bug."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def completion(body: dict, reply: Reply) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "default"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": reply.usage[0],
            "completion_tokens": reply.usage[1],
            "total_tokens": sum(reply.usage),
        },
    }
