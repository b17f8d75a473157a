"""OpenAI's chat completions API, as the server reads and writes it: request bodies checked field
by field into a `ChatRequest`, and the response, chunk and error JSON.

Checked by hand, not by a schema library: every refusal names the field and what to send
instead, as OpenAI's own errors do, and the few shapes involved fit in one page.
"""

from __future__ import annotations

import reprlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from llava_edge.runtime.sampling import MAX_STOP_CHARS
from llava_edge.runtime.template import IMAGE_PLACEHOLDER

# Fields with a meaning the server cannot honour: refused unless they ask for the default.
UNSUPPORTED_DEFAULTS = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "moderation": (None,),
    # reasoning models' options: a client that writes every field of OpenAI's request sends null
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
}
HINTS = {
    "frequency_penalty": "; use repetition_penalty (multiplicative, as transformers applies it)",
    "presence_penalty": "; use repetition_penalty (multiplicative, as transformers applies it)",
    "max_new_tokens": "; use max_tokens",
}
# Every field the server reads; any other is refused, as OpenAI refuses it: ignored, an option
# such as transformers' max_new_tokens or vLLM's min_p would silently not take effect.
FIELDS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "n",
    "stream",
    "stream_options",
    "response_format",
    *UNSUPPORTED_DEFAULTS,
}
# OpenAI's fields that change no answer (who asked, what to log, tool calls in parallel when
# there are no tools): taken and ignored, so that clients sending them work unchanged.
IGNORED = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "safety_identifier",
}


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


def shown(value: Any) -> str:
    """A client's value as an error message quotes it: its repr cut short, so that a refused
    value of megabytes, or one nested a thousand deep, is not sent back whole."""
    return _SHORT.repr(value)


def _escaped(text: str) -> str:
    """`text` as UTF-8 can carry it. A client's text quoted in a refusal (a field name) may
    hold a lone surrogate, which a JSON escape ("\\ud800") carries and UTF-8 cannot: the reply
    could not be encoded at all. It is written as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ApiError(Exception):
    """A refusal with its HTTP status, rendered as OpenAI's error JSON."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        408: "timeout_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "service_unavailable",
        504: "timeout_error",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        message = _escaped(message)
        param = None if param is None else _escaped(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class ChatRequest:
    """A checked chat completion request."""

    model: str
    turns: list[tuple[str, str | None]]  # (question, answer); the last answer is None
    image_urls: list[str]  # the conversation's images, in order
    image_turns: list[int]  # the turn whose question each goes with
    system: str | None
    options: dict[str, Any] = field(default_factory=dict)  # GenerationConfig's fields
    max_tokens_param: str | None = None  # the field that set max_new_tokens, if one did
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: Any, video: str | None = None) -> ChatRequest:
    """The request checked field by field; `video`: the model's video placeholder
    (TextCodec.video_placeholder), which no message may hold (None: the model has none)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the id GET /v1/models lists", "model")
    for name in body:
        if name not in FIELDS and name not in IGNORED:
            named = name if len(name) <= _SHORT.maxstring else shown(name)
            raise ApiError(
                400,
                f"unrecognized request argument supplied: {named}"
                f"{HINTS.get(name, '; this server does not take it, so leave it out')}",
                named,
            )
    for name, defaults in UNSUPPORTED_DEFAULTS.items():
        if name in body and not any(_equal(body[name], d) for d in defaults):
            raise ApiError(
                400, f"'{name}' is not supported by this server{HINTS.get(name, '')}", name
            )
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, f"'n' must be 1 (one answer per request), got {shown(n)}", "n")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise ApiError(400, "only response_format {'type': 'text'} is supported", "response_format")
    turns, image_urls, image_turns, system = _parse_messages(body.get("messages"), video)
    options, max_tokens_param = _parse_options(body)
    stream = _optional(body, "stream", bool, False)
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options")
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream")
        include_usage = _optional(stream_options, "include_usage", bool, False, "stream_options.")
    return ChatRequest(
        model,
        turns,
        image_urls,
        image_turns,
        system,
        options,
        max_tokens_param,
        stream,
        include_usage,
    )


def _parse_messages(
    messages: Any, video: str | None
) -> tuple[list[tuple[str, str | None]], list[str], list[int], str | None]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", "messages")
    system = None
    turns: list[list[Any]] = []  # [question, answer]
    image_urls: list[str] = []
    image_turns: list[int] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{param} must be an object with 'role' and 'content'", param)
        role = message.get("role")
        if role in ("system", "developer"):
            if turns:
                raise ApiError(
                    400,
                    "system and developer messages go before the first user message: the "
                    "model's template has one system prompt",
                    param,
                )
            text, _ = _content(message.get("content"), param, ("text",), video)
            system = text if system is None else _joined([system, text])
        elif role == "user":
            text, urls = _content(message.get("content"), param, ("text", "image_url"), video)
            if turns and turns[-1][1] is None:  # one turn, as a client sends an image, then
                turns[-1][0] = _joined([turns[-1][0], text])  # its question, in two messages
            else:
                turns.append([text, None])
            image_urls += urls
            image_turns += [len(turns) - 1] * len(urls)
        elif role == "assistant":
            if not turns:
                raise ApiError(
                    400,
                    f"{param} is an assistant message before any user message, which the "
                    "model's chat template cannot hold (it starts with the user's turn, as "
                    "LLaVA was trained); drop it or put the user's message first",
                    param,
                )
            if turns[-1][1] is not None:
                raise ApiError(
                    400,
                    f"{param} follows another assistant message; each answers the user message "
                    "before it: join the two answers into one message",
                    param,
                )
            for name in ("tool_calls", "function_call", "audio"):  # what the model cannot say
                if message.get(name):
                    raise ApiError(
                        400,
                        f"{param}.{name} is not supported: this model answers in text only",
                        f"{param}.{name}",
                    )
            turns[-1][1] = _answer(message, param, video)
        elif role in ("tool", "function"):
            raise ApiError(400, f"'{role}' messages are not supported (no tool use)", param)
        else:
            raise ApiError(
                400,
                f"{param} has role {shown(role)}; use 'system', 'user' or 'assistant'",
                f"{param}.role",
            )
    if not turns:
        raise ApiError(400, "the conversation has no user message", "messages")
    if turns[-1][1] is not None:
        raise ApiError(
            400, "the last message must be the user's, for the model to answer", "messages"
        )
    return [(q, a) for q, a in turns], image_urls, image_turns, system


def _joined(texts: list[str]) -> str:
    """Text parts, or consecutive user messages, as one question: a line each (as vLLM joins
    them), the empty ones (an image's message) left out."""
    return "\n".join(t for t in texts if t)


def _answer(message: dict, param: str, video: str | None) -> str:
    """An assistant message's text as the model said it: its content (null is an empty answer)
    and its refusal, as OpenAI's clients send back a reply that refused (a `refusal` field
    beside null content, or `refusal` parts)."""
    content = message.get("content")
    text, _ = _content("" if content is None else content, param, ("text", "refusal"), video)
    refusal = message.get("refusal")
    if refusal is None:
        return text
    if not isinstance(refusal, str):
        raise ApiError(400, f"{param}.refusal must be a string or null", f"{param}.refusal")
    return _joined([text, _text(refusal, f"{param}.refusal", video)])


def _content(
    content: Any, param: str, kinds: tuple[str, ...], video: str | None
) -> tuple[str, list[str]]:
    """A message's text (its text and refusal parts joined) and its image URLs, from the parts
    of the `kinds` its role may hold. The images go before the text, one image text each, as
    transformers' LLaVA chat templates place them."""
    if isinstance(content, str):
        return _text(content, f"{param}.content", video), []
    if not isinstance(content, list):
        raise ApiError(
            400, f"{param}.content must be a string or a list of parts", f"{param}.content"
        )
    texts, urls = [], []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in kinds and kind in ("text", "refusal"):
            if not isinstance(part.get(kind), str):
                raise ApiError(400, f"{where}.{kind} must be a string", f"{where}.{kind}")
            texts.append(_text(part[kind], f"{where}.{kind}", video))
        elif kind in kinds and kind == "image_url":
            image = part.get("image_url")
            candidate = image.get("url") if isinstance(image, dict) else image
            if not isinstance(candidate, str) or not candidate:
                raise ApiError(
                    400, f"{where}.image_url must hold a 'url' string", f"{where}.image_url"
                )
            urls.append(candidate)
        elif kind == "image_url":
            raise ApiError(400, f"{where}: only user messages may hold images", where)
        else:
            allowed = " or ".join(repr(k) for k in kinds)
            raise ApiError(
                400, f"{where} has type {shown(kind)}; its parts are {allowed}", f"{where}.type"
            )
    return _joined(texts), urls


def _text(text: str, param: str, video: str | None) -> str:
    if IMAGE_PLACEHOLDER in text:
        raise ApiError(
            400,
            f"{param} holds the text {IMAGE_PLACEHOLDER!r}; send images as image_url parts",
            param,
        )
    if video and video in text:
        raise ApiError(
            400,
            f"{param} holds the text {video!r}, the model's video placeholder: this server "
            "takes no video (send its frames as image_url parts); take it out",
            param,
        )
    return text


def _parse_options(body: dict) -> tuple[dict[str, Any], str | None]:
    options: dict[str, Any] = {}
    # the newer name wins; a null counts as not given, as for every other field
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = body.get(name)
    if max_tokens is not None:
        if not _is_int(max_tokens) or max_tokens < 1:
            raise ApiError(
                400, f"'{name}' must be a positive integer, got {shown(max_tokens)}", name
            )
        options["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature", 0, 2)
    if temperature is not None:
        options["temperature"] = float(temperature)
    top_p = _number(body, "top_p", 0, 1)
    if top_p is not None:
        options["top_p"] = float(top_p)
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < 0:
            raise ApiError(
                400, f"'top_k' must be 0 (off) or a positive integer, got {shown(top_k)}", "top_k"
            )
        options["top_k"] = top_k
    penalty = _number(body, "repetition_penalty", 0, 100, above=True)
    if penalty is not None:
        options["repetition_penalty"] = float(penalty)
    seed = body.get("seed")
    if seed is not None:
        # OpenAI takes any 64-bit integer; the sampler's generator, a non-negative one: a
        # negative seed is taken as its two's complement, so distinct seeds stay distinct
        if not _is_int(seed) or seed < -(2**63):
            raise ApiError(
                400, f"'seed' must be an integer of at least -2**63, got {shown(seed)}", "seed"
            )
        options["seed"] = seed % 2**64 if seed < 0 else seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not 1 <= len(stops) <= 4
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
        ):
            raise ApiError(
                400,
                f"'stop' must be a string of 1 to {MAX_STOP_CHARS} characters or a list of 1 to 4 "
                "of them",
                "stop",
            )
        options["stop"] = stops
    ignore_eos = _optional(body, "ignore_eos", bool, None)
    if ignore_eos is not None:
        options["ignore_eos"] = ignore_eos
    return options, name if max_tokens is not None else None


def _number(body: dict, name: str, low: float, high: float, above: bool = False) -> float | None:
    """The field as a number in [low, high] (in (low, high] with `above`), or None if absent."""
    value = body.get(name)
    if value is None:
        return None
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if not number or not (low < value if above else low <= value) or not value <= high:
        interval = f"{'(' if above else '['}{low}, {high}]"
        raise ApiError(400, f"'{name}' must be a number in {interval}, got {shown(value)}", name)
    return value


def _optional(body: dict, name: str, kind: type, default: Any, prefix: str = "") -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ApiError(
            400, f"'{prefix}{name}' must be a {kind.__name__}, got {shown(value)}", prefix + name
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _equal(value: Any, default: Any) -> bool:
    return (
        type(value) is type(default) and value == default if default is not None else value is None
    )


# ---- responses -----------------------------------------------------------------------------

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class Head(NamedTuple):
    """What every object of one completion carries alike: OpenAI gives all the chunks of a
    stream one id, one creation time and one system fingerprint."""

    id: str
    created: int
    model: str
    fingerprint: str


def new_head(model: str, fingerprint: str) -> Head:
    return Head("chatcmpl-" + uuid.uuid4().hex, int(time.time()), model, fingerprint)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(head: Head, answer: Any) -> dict[str, Any]:
    """A whole answer as a `chat.completion`, with timings as an extension field."""
    return {
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "system_fingerprint": head.fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "logprobs": None,
                "finish_reason": FINISH_REASONS[answer.finish_reason],
            }
        ],
        "usage": usage(len(answer.prompt_token_ids), len(answer.token_ids)),
        "timings": answer.timings,
    }


def chunk(
    head: Head,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; delta None gives the usage chunk (no choices)."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    return {
        "id": head.id,
        "object": "chat.completion.chunk",
        "created": head.created,
        "model": head.model,
        "system_fingerprint": head.fingerprint,
        "choices": choices,
        **extra,
    }
