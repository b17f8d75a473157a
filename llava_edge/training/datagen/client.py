"""An asyncio client for any OpenAI-compatible chat-completions endpoint (llama-server, vLLM, a
hosted API), shared by the concurrent requests of a `generate` run.

What it adds to httpx: retries with exponential backoff (and the server's Retry-After) on 429,
5xx, timeouts and dropped connections; a request budget that every attempt, retries included,
draws from; counts of requests, retries and tokens. The retry loop is written here rather than
taken from the openai client or tenacity because every attempt must be charged to the shared
budget before it is sent, errors must be sorted into "retry", "give up on this sample" and "stop
the run", and the sleep must be injectable (tests). asyncio rather than threads: Ctrl-C cancels
requests in flight at once, where a thread blocked in a read would hold the exit up to --timeout.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from llava_edge.errors import LlavaEdgeError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}  # worth another try after a pause


@dataclass(frozen=True)
class Reply:
    content: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class RequestFailed(Exception):
    """No usable answer to this request (retries spent, or the server rejected it)."""


class NotSent(Exception):
    """Not sent: the request budget ran out."""


class EndpointError(LlavaEdgeError):
    """The endpoint cannot serve any request (unreachable, wrong URL or model, refused key)."""


class Budget:
    """How many HTTP requests a run may still send (None: no limit)."""

    def __init__(self, limit: int | None):
        if limit is not None and limit < 0:
            raise LlavaEdgeError("--max-requests must be 0 or more")
        self.limit = limit
        self.spent = 0

    def take(self) -> bool:
        if self.exhausted:
            return False
        self.spent += 1
        return True

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.spent >= self.limit


def endpoint_urls(endpoint: str) -> tuple[str, str]:
    """(base URL, chat-completions URL) of `http://host:port/v1` or of the full completions URL."""
    url = endpoint.strip().rstrip("/")
    try:
        parsed = httpx.URL(url)
        valid = parsed.scheme in ("http", "https") and bool(parsed.host)
        valid = valid and (parsed.port is None or 0 < parsed.port < 65536)
    except httpx.InvalidURL:  # a bracket left open, a port that is not a number...
        valid = False
    if not valid:
        raise LlavaEdgeError(
            f"--endpoint {endpoint!r} is not an http(s) URL; pass e.g. http://localhost:8080/v1"
        )
    if url.endswith("/chat/completions"):
        return url[: -len("/chat/completions")], url
    return url, url + "/chat/completions"


def backoff_delay(
    attempt: int,
    backoff: float,
    max_backoff: float,
    rng: random.Random,
    retry_after: float | None = None,
) -> float:
    """Seconds to wait before retry `attempt` + 1: backoff x 2^attempt, the upper half of it at
    random (so that requests that failed together do not retry together), at least what the
    server asked for, at most max_backoff."""
    ceiling = min(max_backoff, backoff * 2**attempt)
    wait = ceiling / 2 + rng.random() * ceiling / 2
    if retry_after is not None:
        wait = max(wait, min(retry_after, max_backoff))
    return wait


class ChatClient:
    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        budget: Budget | None = None,
        concurrency: int = 4,
        sleep: Callable[[float], Awaitable[object]] | None = None,
        rng: random.Random | None = None,
    ):
        if not timeout > 0 or retries < 0 or not backoff >= 0:  # NaN fails both
            raise LlavaEdgeError("--timeout must be positive, --retries and --backoff 0 or more")
        self.base_url, self.url = endpoint_urls(endpoint)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.budget = budget or Budget(None)
        self._sleep = sleep if sleep is not None else asyncio.sleep
        self._rng = rng or random.Random()
        self._reached = False  # any answer from the server at all, so far
        self._answered = False  # any chat completion, so far
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.requests = 0
        self.retried: Counter[str] = Counter()  # retries by cause
        self.prompt_tokens = 0
        self.completion_tokens = 0

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def models(self) -> list[str]:
        """The model names the endpoint serves (GET /models): a request of the budget's, as
        every HTTP request of a run is; NotSent when none is left."""
        if not self.budget.take():
            raise NotSent()
        self.requests += 1
        try:
            response = await self.http.get(self.base_url + "/models")
        except httpx.TransportError as e:
            raise EndpointError(self._unreachable(self.base_url + "/models", e)) from None
        if response.status_code != 200:
            raise EndpointError(
                f"GET {self.base_url}/models answered HTTP {response.status_code} "
                f"({_message(response)}); name the model with --model"
            )
        try:
            return [str(m["id"]) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise EndpointError(
                f"GET {self.base_url}/models did not list models; name the model with --model"
            ) from None

    async def complete(self, body: dict) -> Reply:
        """POST one chat completion, retrying what is worth retrying."""
        for attempt in range(self.retries + 1):
            if not self.budget.take():
                raise NotSent()
            self.requests += 1
            retry_after = None
            try:
                response = await self.http.post(self.url, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                if not self._reached:  # nothing ever answered: a wrong URL or a stopped server
                    raise EndpointError(self._unreachable(self.url, e)) from None
                cause = "connection failed"
            except httpx.TimeoutException:
                cause = "timed out"
            except httpx.TransportError:
                cause = "connection dropped"
            except httpx.DecodingError:  # a body its Content-Encoding cannot undo
                cause = "malformed response"
            else:
                self._reached = True
                status = response.status_code
                if status == 200:
                    reply = self._reply(response)
                    if reply is not None:
                        self._answered = True
                        return reply
                    cause = "malformed response"
                    if attempt == self.retries and not self._answered:
                        raise EndpointError(
                            f"{self.url} answers HTTP 200, but never with a chat completion "
                            f"({_message(response)}); check --endpoint: the API root of an "
                            "OpenAI-compatible server, e.g. http://localhost:8080/v1"
                        )
                elif status in (401, 403):
                    raise EndpointError(
                        f"{self.url} refused the request: HTTP {status} ({_message(response)}); "
                        "check the key (--api-key-env)"
                    )
                elif status == 404:
                    raise EndpointError(
                        f"{self.url} answered HTTP 404 ({_message(response)}); check --endpoint "
                        "(the API root, e.g. http://localhost:8080/v1) and --model"
                    )
                elif status == 429 and _error_kind(response) == "insufficient_quota":
                    # OpenAI's "out of credit": no retry and no later request can succeed
                    raise EndpointError(
                        f"{self.url} answered HTTP 429 ({_message(response)}); the key's quota "
                        "is spent: add credit, or use another key (--api-key-env)"
                    )
                elif status in RETRY_STATUS or status >= 500:
                    cause = f"HTTP {status}"
                    retry_after = _seconds(response.headers.get("retry-after"))
                else:  # 400, 413, 422...: this request is wrong and stays wrong
                    raise RequestFailed(f"HTTP {status}: {_message(response)}")
            if attempt == self.retries:
                raise RequestFailed(f"{cause} ({attempt + 1} tries)")
            self.retried[cause] += 1
            await self._sleep(
                backoff_delay(attempt, self.backoff, self.max_backoff, self._rng, retry_after)
            )
        raise AssertionError("unreachable")

    def _reply(self, response: httpx.Response) -> Reply | None:
        try:
            data = response.json()
            choice = data["choices"][0]
            content = choice["message"].get("content")
            usage = data.get("usage")
            usage = usage if isinstance(usage, dict) else {}
            reply = Reply(
                content if isinstance(content, str) else None,
                choice.get("finish_reason"),
                _tokens(usage.get("prompt_tokens")),
                _tokens(usage.get("completion_tokens")),
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        return reply

    @staticmethod
    def _unreachable(url: str, error: Exception) -> str:
        return f"cannot reach {url} ({error or type(error).__name__}); is the server running?"


def _tokens(value: object) -> int:
    """A usage count as the server wrote it; one that is no count (NaN, 1e400, text) is 0: the
    counts are bookkeeping, and a reply is not thrown away for them."""
    try:
        return max(0, int(value or 0))
    except (ValueError, TypeError, OverflowError):
        return 0


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare for rate limits, and the backoff still applies


def _error_kind(response: httpx.Response) -> str | None:
    """The type or code of an OpenAI-style error body ({"error": {"type", "code", ...}})."""
    try:
        error = response.json().get("error")
        return error.get("code") or error.get("type")
    except (ValueError, AttributeError):
        return None


def _message(response: httpx.Response) -> str:
    """The server's own words about an error, on one line."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    text = str(message) if message else (response.text or response.reason_phrase)
    return " ".join(text.split())[:200] or "no message"
