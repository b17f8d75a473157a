"""The ASGI app: OpenAI's chat completions over a BatchEngine, plus models, health and metrics.

Every request is checked (key, size, body, fields, model, image) before it reaches the engine;
every refusal is OpenAI's error JSON with the status that says why. The model loads on a thread
after the server starts, so /health answers 503 until it is ready. The engine's scheduler runs
on its own thread; its events reach the event loop through `call_soon_threadsafe`. A client that
goes away (while its images are fetched or decoded, queued, mid-stream, or while waiting for a
whole answer) cancels its request at once: a request not yet submitted never is, a submitted one
frees its row before the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llava_edge import __version__
from llava_edge.errors import LlavaEdgeError, PromptTooLong, TimedOut, TooLarge
from llava_edge.manifest import MANIFEST_NAME
from llava_edge.runtime import BatchEngine, Limits, Pipeline
from llava_edge.runtime.anyres import each_image_tokens
from llava_edge.runtime.batching import Admission, Cancelled, EngineClosed, Event, QueueFull
from llava_edge.serve import protocol
from llava_edge.serve.media import MediaPolicy, fetch_image
from llava_edge.serve.metrics import ServerMetrics
from llava_edge.serve.protocol import ApiError, ChatRequest

log = logging.getLogger("llava_edge.serve")
T = TypeVar("T")


REMOTE_TIMEOUT_S = 10.0  # seconds a remote image may take to fetch, unless told
# seconds a request body may go without a byte arriving (nginx's client_body_timeout is 60 s):
# a link that dropped without the connection closing would otherwise hold its queue place for good
BODY_IDLE_S = 60.0
# seconds shutdown waits for the engine's call in progress (a stalled device's may never end)
ENGINE_STOP_S = 10.0
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")  # an Origin header: scheme://host[:port]


@dataclass
class ServeOptions:
    """Everything `llava-edge serve` takes besides host and port."""

    model_dir: Path
    model_name: str | None = None  # the id clients send as 'model' (default: the dir's name)
    api_key: str | None = None
    max_batch: int = 4
    max_queue: int = 16
    max_body_mb: float = 32
    max_image_mb: float = 20
    allowed_media_dir: Path | None = None
    allow_remote_images: bool = False
    remote_timeout_s: float | None = None  # None: 10 s, where remote images are allowed
    prefix_cache_mb: float | None = None  # None: BatchEngine's default
    limits: Limits = field(default_factory=Limits)
    backend: str = "onnxruntime"
    providers: list[str] | None = None
    threads: int | None = None
    engine_dir: str | None = None
    verify_files: bool | None = None
    # web pages (a robot's dashboard) allowed to call the API from a browser: "*" or origins
    # such as "http://robot.local:3000"; none by default (browsers then refuse other origins)
    cors_origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Refuse settings that would refuse every request, or do nothing, at startup and in
        one line."""
        if self.remote_timeout_s is None:
            self.remote_timeout_s = REMOTE_TIMEOUT_S
        elif not self.allow_remote_images:
            raise LlavaEdgeError(
                "--remote-timeout times remote image fetches, which only --allow-remote-images "
                "allows: add that, or drop --remote-timeout"
            )
        for flag, value in [
            ("--max-body-mb", self.max_body_mb),
            ("--max-image-mb", self.max_image_mb),
            ("--remote-timeout", self.remote_timeout_s),
        ]:
            if not 0 < value < float("inf"):  # a limit of inf MB would count no bytes at all
                raise LlavaEdgeError(f"{flag} must be positive and finite, got {value:g}")
        counts = [("--max-batch", self.max_batch, 1), ("--max-queue", self.max_queue, 0)]
        if self.threads is not None:  # None: onnxruntime's own choice
            counts.append(("--threads", self.threads, 1))
        for flag, value, least in counts:
            if isinstance(value, bool) or not (isinstance(value, int) and value >= least):
                raise LlavaEdgeError(f"{flag} must be a whole number, {least} or more, got {value}")
        if self.prefix_cache_mb is not None and not self.prefix_cache_mb >= 0:
            raise LlavaEdgeError(
                f"--prefix-cache-mb must be 0 (off) or more, got {self.prefix_cache_mb:g}"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise LlavaEdgeError(
                "--api-key is empty: give the key clients must send, or leave the option out to "
                "serve without one"
            )
        media = self.allowed_media_dir
        if media is not None and not Path(media).is_dir():
            raise LlavaEdgeError(f"--allowed-media-dir {media} is not a directory")
        for origin in self.cors_origins:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise LlavaEdgeError(
                    f"--cors-origin {origin!r} is no origin: give scheme://host[:port] as a "
                    "browser sends it (http://robot.local:3000, no path), or *"
                )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name


class ServerState:
    """The loaded model and engine (None while loading), and what the handlers share."""

    def __init__(self, options: ServeOptions, on_load_error: Any = None):
        self.options = options
        self.pipe: Pipeline | None = None
        self.engine: BatchEngine | None = None
        self.closed = False  # the app has shut down: a model that loads after is closed again
        self._lock = threading.Lock()
        self.loader: threading.Thread | None = None
        self.load_error: Exception | None = None
        self.fingerprint = ""  # its system_fingerprint, set once the model is loaded
        self.on_load_error = on_load_error
        self.started = int(time.time())
        self.media = MediaPolicy(
            options.max_image_bytes,
            Path(options.allowed_media_dir) if options.allowed_media_dir else None,
            options.allow_remote_images,
            options.remote_timeout_s,
        )
        self.metrics = ServerMetrics(lambda: self.engine.stats() if self.engine else None)

    def load(self) -> None:
        o = self.options
        try:
            pipe = Pipeline.load(
                o.model_dir,
                backend=o.backend,
                providers=o.providers,
                threads=o.threads,
                verify_files=o.verify_files,
                limits=o.limits,
                engine_dir=o.engine_dir,
            )
            try:
                engine = BatchEngine(
                    pipe,
                    max_batch=o.max_batch,
                    max_queue=o.max_queue,
                    prefix_cache_mb=o.prefix_cache_mb,
                )
            except Exception:
                pipe.close()
                raise
            self.fingerprint = fingerprint(o)
            with self._lock:
                closed = self.closed
                if not closed:
                    self.pipe, self.engine = pipe, engine  # ready from here on
            if closed:  # the server stopped while the model loaded: nobody will close these
                _close(engine, pipe)
                return
            log.info("llava-edge serve: %s loaded; ready", o.name)
        except Exception as e:  # reported by the runner, which stops the server
            self.load_error = e
            if not isinstance(e, LlavaEdgeError):
                log.exception("loading the model failed")
            if self.on_load_error is not None:
                self.on_load_error(e)

    def close(self) -> None:
        """The app's shutdown: by now uvicorn has drained the connections (or, past the drain
        timeout, cancelled them), so what the engine still holds, no client waits for."""
        with self._lock:
            self.closed = True
            engine, pipe = self.engine, self.pipe
        if engine is not None and pipe is not None:
            _close(engine, pipe)

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def check_key(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # ASGI servers decode a header's bytes as Latin-1: the key matches them sent as UTF-8
        # (curl), or as Latin-1 where it fits (Python's http.client, browsers)
        sent, wanted = token.strip(), key.encode()
        as_utf8 = hmac.compare_digest(sent.encode("latin-1"), wanted)
        matches = as_utf8 | hmac.compare_digest(sent.encode(), wanted)
        if scheme.lower() != "bearer" or not matches:
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    def check_origin(self, request: Request) -> None:
        """A browser's request from a web page --cors-origin does not allow is refused, not only
        its reply hidden: a form or a text/plain fetch is sent without a preflight, so any page
        open in a browser on the robot's network would have its questions (and, with remote
        images allowed, their fetches) run."""
        origin = request.headers.get("origin")
        allowed = self.options.cors_origins
        if origin is None or "*" in allowed or origin in allowed:
            return
        raise ApiError(
            403,
            f"a web page of {origin} may not call this server; start it with --cors-origin "
            f"{origin} to allow that page",
            code="origin_not_allowed",
        )

    def require_ready(self) -> tuple[Pipeline, BatchEngine]:
        if self.engine is None or self.pipe is None:
            message = "the model is still loading; retry shortly"
            if self.load_error is not None:
                message = f"the model failed to load: {self.load_error}"
            raise ApiError(503, message, code="model_loading")
        return self.pipe, self.engine


def fingerprint(options: ServeOptions) -> str:
    """OpenAI's `system_fingerprint`: what decides a seeded answer's tokens besides the request.
    The model dir's manifest (every file's hash, its precision and KV cache), this llava-edge and
    onnxruntime, and how the server runs them (backend, providers, threads, batch, prefix reuse:
    int8 rows decoded together share a scale, an fp16 reused prefix moves logits): a client that
    sees it change knows a reply may differ for that, not for its sampling."""
    runtime = None
    if options.backend == "onnxruntime":  # the tensorrt backend's engines are in the manifest
        import onnxruntime

        runtime = onnxruntime.__version__
    setup = [
        __version__,
        runtime,
        options.backend,
        options.providers,
        options.threads,
        None if options.engine_dir is None else str(options.engine_dir),
        options.max_batch,
        options.prefix_cache_mb,
    ]
    digest = hashlib.sha256((Path(options.model_dir) / MANIFEST_NAME).read_bytes())
    digest.update(json.dumps(setup).encode())
    return "fp_" + digest.hexdigest()[:12]


def _close(engine: BatchEngine, pipe: Pipeline) -> None:
    """Cancel what the engine holds and free the model, waiting at most ENGINE_STOP_S for the
    backend call in progress. A call still running past it is left to the process's exit: the
    model stays open under it, as freeing its sessions or device memory mid-call could crash."""
    if engine.close(drain=False, timeout=ENGINE_STOP_S):
        pipe.close()
        return
    log.warning(
        "llava-edge serve: a backend call was still running %g s after shutdown began (a "
        "stalled device?); exiting without waiting for it",
        ENGINE_STOP_S,
    )


def create_app(options: ServeOptions, on_load_error: Any = None) -> Starlette:
    """The app; `on_load_error(exc)` is called (from the loading thread) if the model fails."""
    state = ServerState(options, on_load_error)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        state.loader = threading.Thread(target=state.load, name="llava-edge-load", daemon=True)
        state.loader.start()
        try:
            yield
        except asyncio.CancelledError:
            # uvicorn's force quit (a second Ctrl-C) sends no shutdown event: the event loop
            # cancels this task on its way out. The model must still be closed here: one left
            # open under the engine's backend call as the interpreter exits aborts the process
            _carry_on()
            state.close()  # on the loop's thread: nothing else runs on it any more
            return
        await run_in_threadpool(state.close)

    cors = [
        Middleware(
            CORSMiddleware,
            allow_origins=options.cors_origins,
            allow_methods=["GET", "POST"],
            # any header an allowed page sends: OpenAI's JavaScript client adds its own
            # (X-Stainless-*), which a list of ours would fail the preflight for
            allow_headers=["*"],
            # a page's script sees only the headers named here: OpenAI's client reads these to
            # wait before retrying, or not to retry a 504
            expose_headers=["retry-after", "x-should-retry"],
        )
    ]
    app = Starlette(
        middleware=cors if options.cors_origins else [],
        routes=[
            Route("/v1/chat/completions", _chat_completions, methods=["POST"]),
            Route("/v1/models", _models, methods=["GET"]),
            Route("/v1/models/{model:path}", _model, methods=["GET"]),
            Route("/health", _health, methods=["GET"]),
            Route("/metrics", _metrics, methods=["GET"]),
        ],
        # ApiError here, not in the catch-all: Starlette hands Exception to its error middleware,
        # which logs a traceback after responding; a 401 is no server fault
        exception_handlers={
            ApiError: _api_error_response,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.serve = state
    return app


# ---- routes ---------------------------------------------------------------------------------


async def _health(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    engine = state.engine
    if engine is not None and engine.failure is None:
        return JSONResponse({"status": "ok", "model": state.options.name})
    if engine is not None:  # its scheduler stopped: a supervisor should restart the server
        return JSONResponse({"status": "failed", "error": str(engine.failure)}, status_code=503)
    status = "failed" if state.load_error is not None else "loading"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})


async def _metrics(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    state.check_key(request)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


async def _models(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    state.check_key(request)
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def _model(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    state.check_key(request)
    _check_model(state, request.path_params["model"])
    return JSONResponse(_model_card(state))


async def _chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    try:
        response = await _chat_completion(request, state)
    except asyncio.CancelledError:
        # uvicorn cancels what still runs once SIGTERM's drain timeout has passed: the client
        # gets OpenAI's error JSON and a status to retry on, not a bare 500 and a traceback
        _carry_on()
        response = _error_response(_shutting_down())
    state.metrics.requests.labels(str(response.status_code)).inc()
    return response


async def _chat_completion(request: Request, state: ServerState) -> Response:
    arrived = time.perf_counter()  # --timeout counts from here: fetching and rendering too
    admission = gone = handle = None
    try:
        state.check_origin(request)
        state.check_key(request)
        _check_json(request)
        pipe, engine = state.require_ready()
        # a full queue refuses before the body is read or an image fetched; a request counts
        # against it from here, so a burst of uploads is not all read and decoded at once
        admission = engine.reserve()
        clock = _Clock(arrived, pipe.limits.timeout_s)
        body = await _read_body_in_time(request, state.options.max_body_bytes, clock.limit)
        # from here on every step races the client's leaving: one that leaves while its images
        # are fetched or decoded gives its place in the queue back at once, and is not submitted
        gone = asyncio.ensure_future(_disconnected(request))
        left = threading.Event()  # what the submitting thread sees of `gone`
        gone.add_done_callback(lambda _: left.set())
        # off the event loop, which every client's stream shares: a body of many small messages
        # takes seconds to parse at the body limit
        video = pipe.codec.video_placeholder
        chat = await _in_time(clock, gone, run_in_threadpool(_chat_request, body, video))
        _check_model(state, chat.model)
        # refused before any is fetched only where they cannot fit at any size (an AnyRes
        # image takes the tokens its size gives; the rendered prompt is checked once they are)
        fewest = each_image_tokens(pipe.manifest, len(chat.image_urls), smallest=True)
        if len(chat.image_urls) > pipe.max_context // fewest:
            raise ApiError(
                400,
                f"the conversation holds {len(chat.image_urls)} images; the model's context of "
                f"{pipe.max_context} tokens holds at most {pipe.max_context // fewest} (an image "
                f"takes {fewest} or more); send fewer",
                "messages",
                "context_length_exceeded",
            )
        images = []
        for url in chat.image_urls:
            images.append(await _in_time(clock, gone, fetch_image(url, state.media, clock.left())))
        events: asyncio.Queue[Event] = asyncio.Queue()
        listener = _listener(asyncio.get_running_loop(), events, whole=not chat.stream)
        submitting = run_in_threadpool(
            _submit, pipe, engine, chat, images, listener, arrived, admission, left
        )
        handle = await _in_time(clock, gone, submitting, then=_cancel_submitted)
    except ClientDisconnect:  # the client left before its request reached the engine
        state.metrics.disconnects.inc()
        return Response(status_code=499)
    except Exception as e:
        return _error_response(_api_error(e))
    finally:  # submitted, refused, timed out, cancelled: the place is the queue's again
        if admission is not None:
            admission.release()
        if gone is not None and handle is None:  # not submitted: nobody watches any more
            gone.cancel()
    event = await _wait(state, handle, events, clock, gone)
    if event is None:  # the client left; nobody reads this
        return Response(status_code=499)
    if event.kind == "error":
        return _error_response(_api_error(event.error))
    head = protocol.new_head(chat.model, state.fingerprint)
    if chat.stream:
        return _AnswerStream(state, chat, handle, events, event, head, clock)
    answer = event.answer
    state.metrics.observe_answer(
        len(answer.prompt_token_ids), len(answer.token_ids), answer.timings
    )
    return JSONResponse(protocol.completion(head, answer))


# ---- the steps of a chat completion -------------------------------------------------------------


def _submit(
    pipe: Pipeline,
    engine: BatchEngine,
    chat: ChatRequest,
    images: list[bytes],
    listener: Any,
    arrived: float,
    admission: Admission,
    left: threading.Event,
) -> Any:
    """Render the conversation as a ChatSession holds it, check it fits, hand it to the engine;
    a client that has `left` by then (while an image decoded) is not handed on."""
    limit = pipe.limits.max_new_tokens
    param = chat.max_tokens_param  # max_tokens or max_completion_tokens, as the client sent
    if param and limit and chat.options["max_new_tokens"] > limit:
        raise ApiError(
            400,
            f"{param} {chat.options['max_new_tokens']} is over this server's limit of {limit} "
            f"(--max-new-tokens); lower {param}",
            param,
        )
    pixels = []
    for image in images:
        if left.is_set():
            raise ClientDisconnect()
        pixels.append(_image_pixels(pipe, image))
    try:
        ids = pipe.conversation_ids(chat.turns, pixels, chat.image_turns, chat.system)
    except PromptTooLong as e:
        raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
    options = dict(chat.options)
    room = pipe.max_context - len(ids)
    if room < 1:
        raise ApiError(
            400,
            f"the conversation is {len(ids)} tokens{pipe.image_share(ids)}; the model's context "
            f"is {pipe.max_context}",
            "messages",
            "context_length_exceeded",
        )
    if param and options["max_new_tokens"] > room:
        raise ApiError(
            400,
            f"the conversation is {len(ids)} tokens and {param} asks for "
            f"{options['max_new_tokens']} more, over the model's context of {pipe.max_context}; "
            f"lower {param}",
            param,
            "context_length_exceeded",
        )
    if not param:
        options["max_new_tokens"] = min(room, limit) if limit else room
    if left.is_set():
        raise ClientDisconnect()
    return engine.submit_ids(ids, pixels, options, listener, started=arrived, admission=admission)


async def _in_time(
    clock: _Clock,
    gone: asyncio.Future,
    step: Awaitable[T],
    then: Callable[[asyncio.Future], None] | None = None,
) -> T:
    """`step` within what is left of the request's time limit, the wait for a worker thread
    included (all of them busy): reading a file from a slow card, decoding a 20 MB data: URI's
    base64, decoding and resizing a photo of tens of megapixels (seconds on a Jetson's CPU).
    Past the limit the client gets its 504 at once; a client that leaves first (`gone`) is let
    go at once (ClientDisconnect). A thread cannot be stopped: an abandoned step is cancelled and
    what it raises retrieved, or, given `then`, left to end and handed to it (a request it
    submitted is cancelled there)."""
    running = asyncio.ensure_future(step)
    try:
        # asyncio.wait cancels neither: a worker thread of Starlette's defers a cancel until
        # the thread ends
        await asyncio.wait(
            {running, gone}, timeout=clock.left(), return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:  # the server is stopping
        _abandon(running, then)
        raise
    if gone.done():
        _abandon(running, then)
        raise ClientDisconnect()
    if running.done():
        return running.result()
    _abandon(running, then)
    raise _api_error(clock.timed_out().error) from None


def _abandon(running: asyncio.Future, then: Callable[[asyncio.Future], None] | None) -> None:
    if then is None:
        running.cancel()
    running.add_done_callback(then or _drop)


def _drop(future: asyncio.Future) -> None:
    """Retrieve what an abandoned step raised, so asyncio does not log it as unhandled."""
    if not future.cancelled():
        future.exception()


def _cancel_submitted(submitting: asyncio.Future) -> None:
    if not submitting.cancelled() and submitting.exception() is None:
        submitting.result().cancel()


def _image_pixels(pipe: Pipeline, image: bytes) -> Any:
    """The image decoded and checked; a problem with it is the image_url's."""
    try:
        return pipe.image_pixels(image)
    except TooLarge:
        raise  # 413, with its own code
    except LlavaEdgeError as e:
        raise ApiError(400, str(e), "image_url") from None


def _listener(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, whole: bool) -> Any:
    """Hands the engine's events to the event loop; `whole` (a reply sent in one piece): only
    the last, so a token does not wake the loop for nothing."""

    def deliver(event: Event) -> None:
        if whole and event.kind in ("started", "text"):
            return
        # RuntimeError: the loop is gone (the server stopped), so nobody is listening
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(events.put_nowait, event)

    return deliver


class _Clock:
    """A request's time limit (--timeout, from its arrival), kept by the server too: the engine
    notices it only between two of its calls, and one call (a large image's prefill, a stalled
    device) may outlast it."""

    def __init__(self, arrived: float, limit: float | None):
        self.limit = limit
        self.deadline = None if limit is None else arrived + limit

    def left(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.perf_counter(), 0.0)

    def timed_out(self) -> Event:
        return Event("error", error=TimedOut.after(self.limit))


async def _wait(
    state: ServerState, handle: Any, events: asyncio.Queue, clock: _Clock, gone: asyncio.Future
) -> Event | None:
    """The request's first event delivered (a stream's first token, or a whole reply's end; or
    an error, the time limit's included) before any response is sent, so that an error still
    gets its status. None if the client left first (`gone`). Either way but an event of the
    engine's, the request is cancelled."""
    getter = asyncio.ensure_future(events.get())
    event = None
    try:
        await asyncio.wait(
            {getter, gone}, timeout=clock.left(), return_when=asyncio.FIRST_COMPLETED
        )
        if getter.done():
            event = getter.result()
            return event
        if gone.done():
            state.metrics.disconnects.inc()
            return None
        return clock.timed_out()
    finally:
        gone.cancel()
        if event is None:  # the client left, the time limit passed, or the server is stopping
            getter.cancel()
            handle.cancel()


async def _next_event(events: asyncio.Queue, clock: _Clock, handle: Any) -> Event:
    """A stream's next event, or the time limit's error if it passes first. The limit bounds
    the work, not the reading: an answer the engine ended within it (its events on their way to
    the loop) is handed on whole however late a slow link lets the client read it."""
    try:
        return await asyncio.wait_for(events.get(), clock.left())
    except asyncio.TimeoutError:
        if handle.done.is_set():
            return await events.get()
        return clock.timed_out()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _AnswerStream(StreamingResponse):
    """The answer as server-sent events. A response that ends before the answer did (the client
    left, the server is stopping) cancels the request. The response does it, not its body's
    generator: a client that leaves before the first chunk is asked for ends the response
    before the generator starts, and a generator never started never runs its `finally`."""

    def __init__(
        self,
        state: ServerState,
        chat: ChatRequest,
        handle: Any,
        events: asyncio.Queue,
        first: Event,
        head: protocol.Head,
        clock: _Clock,
    ):
        self.serve, self.handle, self.finished = state, handle, False
        super().__init__(
            self._events(chat, events, first, head, clock),
            media_type="text/event-stream",
            # a proxy in front (nginx, for TLS) would otherwise buffer the answer whole
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def sending(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await super().__call__(scope, receive, sending)
        except asyncio.CancelledError:  # SIGTERM's drain timeout passed: end the stream cleanly
            _carry_on()
            stopping = _shutting_down()
            if not started:
                await _error_response(stopping)(scope, receive, send)
                return
            end = _sse_data(stopping.body()) + "data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": end.encode(), "more_body": False})
        finally:
            if not self.finished:
                self.handle.cancel()
                self.serve.metrics.disconnects.inc()

    async def _events(
        self,
        chat: ChatRequest,
        events: asyncio.Queue,
        first: Event,
        head: protocol.Head,
        clock: _Clock,
    ):
        data = _sse_data
        usage_field = {"usage": None} if chat.include_usage else {}
        yield data(protocol.chunk(head, {"role": "assistant", "content": ""}, **usage_field))
        event = first
        while True:
            if event.kind == "text":
                yield data(protocol.chunk(head, {"content": event.text}, **usage_field))
            elif event.kind == "error":
                self.finished = True
                self.handle.cancel()  # an error of the server's own (the time limit) ends it too
                self.serve.metrics.stream_errors.inc()
                yield data(_api_error(event.error).body())
                yield "data: [DONE]\n\n"
                return
            elif event.kind == "done":
                self.finished = True
                answer = event.answer
                # counted before the last chunks: a client may leave as soon as it reads [DONE]
                self.serve.metrics.observe_answer(
                    len(answer.prompt_token_ids), len(answer.token_ids), answer.timings
                )
                reason = protocol.FINISH_REASONS[answer.finish_reason]
                yield data(protocol.chunk(head, {}, reason, timings=answer.timings, **usage_field))
                if chat.include_usage:
                    usage = protocol.usage(len(answer.prompt_token_ids), len(answer.token_ids))
                    yield data(protocol.chunk(head, None, usage=usage))
                yield "data: [DONE]\n\n"
                return
            event = await _next_event(events, clock, self.handle)


# Line boundaries of str.splitlines that JSON leaves unescaped: SSE ends a line at CR or LF only,
# but httpx's iter_lines, and so many a Python client, splits at these too
LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _sse_data(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False).translate(LINE_BREAKS)}\n\n"


async def _read_body_in_time(request: Request, limit: int, timeout_s: float | None) -> bytearray:
    """The request's body, received within --timeout (nothing is awaited between the request's
    arrival and this read), and with no pause of BODY_IDLE_S between two of its pieces: a client
    that stalls mid-upload (a robot losing Wi-Fi without the connection closing) is answered 408
    instead of holding its connection, and its place in the queue, for good."""
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(
            408,
            f"the request body took over the time limit of {timeout_s:g} s (--timeout) to arrive",
            code="timeout",
        ) from None


async def _read_body(request: Request, limit: int) -> bytearray:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _body_too_large(int(declared), limit)
    body = bytearray()
    pieces = aiter(request.stream())
    while True:
        try:
            piece = await asyncio.wait_for(anext(pieces), BODY_IDLE_S)
        except StopAsyncIteration:
            return body
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                f"no byte of the request body arrived for {BODY_IDLE_S:g} s; send it again",
                code="timeout",
            ) from None
        body += piece
        if len(body) > limit:
            raise _body_too_large(len(body), limit)


def _check_json(request: Request) -> None:
    """A body declared as another media type is refused before it is read: curl's `-d` sends
    `application/x-www-form-urlencoded`, and a form or `text/plain` body parsed as JSON would
    work by chance. A body with no Content-Type at all is read as JSON (a raw body from
    `requests.post(url, data=...)`): nothing contradicts that."""
    declared = request.headers.get("content-type")
    if not declared:
        return
    media_type = declared.partition(";")[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    raise ApiError(
        415,
        f"the request body is sent as {protocol.shown(declared)}; this endpoint takes JSON: "
        "send 'Content-Type: application/json' (curl: -H 'Content-Type: application/json')",
        code="unsupported_media_type",
    )


def _chat_request(body: bytearray, video: str | None) -> ChatRequest:
    """The body as JSON, checked field by field (`video`: the model's video placeholder)."""
    try:
        parsed = json.loads(body)
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply") from None
    except ValueError as e:  # bad JSON or UTF-8, or an integer too long to convert
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    return protocol.parse_chat_request(parsed, video)


def _body_too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is {size} bytes, over this server's limit of {limit} "
        "(--max-body-mb); send a smaller image",
        code="request_too_large",
    )


def _check_model(state: ServerState, model: str) -> None:
    if model != state.options.name:
        raise ApiError(
            404,
            f"the model {protocol.shown(model)} does not exist here; this server serves "
            f"{state.options.name!r}",
            "model",
            "model_not_found",
        )


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.options.name,
        "object": "model",
        "created": state.started,
        "owned_by": "llava-edge",
    }


# ---- errors -----------------------------------------------------------------------------------


def _api_error(error: BaseException) -> ApiError:
    """The status and message a failure gets. LlavaEdgeError messages are meant for users."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, TooLarge):
        return ApiError(413, str(error), "image_url", "image_too_large")
    if isinstance(error, QueueFull):
        return ApiError(429, str(error), code="queue_full")
    if isinstance(error, EngineClosed):
        return ApiError(503, str(error), code="shutting_down")
    if isinstance(error, TimedOut):
        return ApiError(504, str(error), code="timeout")
    if isinstance(error, Cancelled):
        return ApiError(499, str(error), code="cancelled")
    if isinstance(error, LlavaEdgeError):
        return ApiError(400, str(error))
    log.error("internal error", exc_info=error)
    return ApiError(500, f"internal error ({type(error).__name__}); see the server's log")


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry", code="shutting_down")


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    if error.status == 504:
        # OpenAI's client retries a 5xx twice unless told not to: past --timeout, another try
        # takes as long, and the caller would hear of the limit only after three
        headers = {"x-should-retry": "false"}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _carry_on() -> None:
    """Let the current task run on after a cancellation it handles (Task.uncancel, Python 3.11
    on; on 3.10 catching the CancelledError is all there is)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


async def _api_error_response(request: Request, exc: ApiError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        return _error_response(ApiError(404, f"no route {request.url.path}", code="not_found"))
    if exc.status_code == 405:
        response = _error_response(
            ApiError(405, f"{request.method} is not allowed on {request.url.path}")
        )
        response.headers.update(exc.headers or {})  # Allow: the methods the route takes
        return response
    return _error_response(ApiError(exc.status_code, str(exc.detail)))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _error_response(_api_error(exc))
