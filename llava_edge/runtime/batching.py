"""Continuous batching: requests decoded together, joining and leaving between decode steps.

A robot app asking several questions at once, or a server with several clients, submits them to
one `BatchEngine`; its scheduler thread runs every decoder call. Each step it

1. drops cancelled requests (a cancelled request's row is free before the next decode step),
2. admits a waiting request (by default one a step) into a free row of one shared KV cache:
   it is prefilled alone (batch 1, no padding, so its first logits are its own last
   position's), the start of its prompt, where it equals a finished request's prompt and answer
   (a conversation's next turn, another question about the same image), is copied from the
   prefix store instead of computed, and the features of the images after that come from the
   pipeline's cache (those the copied start holds are not encoded at all),
3. decodes one token for every running request in one batched decoder call, each row at its
   own position (runtime/kv_cache.py keeps a length per row),
4. lets finished requests leave: the last running row moves into the freed one, so the rows
   decoded are always [0, n) and a step never computes for an empty row.

Every request keeps its own sampler and seed, stop strings, limits, deadline and stream of text.

    engine = BatchEngine(pipe, max_batch=4)
    requests = [engine.submit(frame, q, max_new_tokens=32) for q in questions]
    answers = [r.result() for r in requests]
    engine.close()

Decode is bound by reading the weights, and a batched step reads them once for all its rows,
so rows decoded together cost far less than the same rows one after another (bench/bench_serve.py
measures the engine's decode throughput at 1 to 8 clients).
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import operator
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError, TimedOut, first_line
from llava_edge.runtime.answer import Answer, AnswerText, timings
from llava_edge.runtime.anyres import ImagePixels, pixels_list, prompt_forms
from llava_edge.runtime.exit_guard import EXIT_WAIT_S, before_exit, running_exit
from llava_edge.runtime.generate import Timer, embed
from llava_edge.runtime.image import Images, image_list
from llava_edge.runtime.sampling import GenerationConfig, Sampler, whole_number

MIN_PREFIX = 16  # tokens: shorter shared prefixes are recomputed, not copied or stored
MAX_PREFIXES = 64  # finished requests kept for reuse (recent conversations), within the budget
PREFIX_CACHE_MB = 256  # the prefix store's default budget, where prompts can reuse prefixes


class QueueFull(LlavaEdgeError):
    """Too many requests are waiting for a row; try again later."""


class EngineClosed(LlavaEdgeError):
    """The engine is closed (or closing) and takes no new requests."""


class Cancelled(LlavaEdgeError):
    """The request was cancelled before it finished."""


class Admission:
    """A place in the queue held for a request still arriving (its body read, its images
    decoded, its prompt rendered): `BatchEngine.reserve` counts it against max_queue, so a burst
    of large uploads is refused before it is all read and decoded at once. Given back by
    `submit_ids(admission=...)`, where the request takes its place in the queue, or by
    `release()` on any other way out; giving it back twice is harmless."""

    def __init__(self, engine: BatchEngine):
        self._engine = engine
        self.held = True

    def release(self) -> None:
        with self._engine._lock:
            self._give_back()

    def _give_back(self) -> None:
        """Under the engine's lock."""
        if self.held:
            self.held = False
            self._engine.admitting -= 1


@dataclass
class Event:
    """What a request reports: that its first token is out, a piece of text, its finished
    Answer, or the error that ended it."""

    kind: str  # "started", "text", "done" or "error"
    text: str = ""
    answer: Answer | None = None
    error: Exception | None = None


class Request:
    """One submitted request: iterate it for text pieces (or call `result()`), `cancel()` it.

    A `listener`, if given, receives every Event instead (called from the scheduler thread; it
    must not block), which is how an asyncio server bridges to its event loop. A listener that
    raises ends its own request with that error; the other requests go on.
    """

    _ids = itertools.count()

    def __init__(
        self,
        ids: list[int],
        pixels: list[ImagePixels],
        image_tokens: list[int],
        config: GenerationConfig,
        answer_text: AnswerText,
        timeout_s: float | None,
        listener: Callable[[Event], None] | None,
        started: float | None = None,
    ):
        self.id = next(Request._ids)
        self.ids = ids
        self.pixels = pixels
        self.config = config
        self.text = answer_text
        self.timer = Timer() if started is None else Timer(start=started)
        # an engine is made from a loaded model: no request waits for a background load
        self.deadline = self.timer.start + timeout_s if timeout_s else None
        self.timeout_s = timeout_s
        self.sampler = Sampler(config)
        self.generated: list[int] = []
        self.seen = np.asarray(ids, dtype=np.int64)  # kept only when repetition is penalised
        # which picture each image's tokens stand for (and how many): prefix reuse needs the same
        self.images = [(one.key, n) for one, n in zip(pixels, image_tokens, strict=True)]
        self.reused = 0  # prompt tokens whose keys/values came from the prefix store
        self.answer: Answer | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.done = threading.Event()
        self._listener = listener
        self.listener_error: Exception | None = None  # what the listener raised, if it did
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._read = False  # the text has been read to its end (or its error)

    # ---- the caller's side -----------------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        """Text pieces as they are decoded; raises the request's error, if it ends in one.

        The text is read once, as a TextStream's: iterating again afterwards yields nothing
        (`result()` still holds the answer or the error). Leaving it before the end (a break, an
        exception, the iterator closed or dropped) cancels the request, as leaving a stream stops
        its answer: nobody reads the rest, and its row goes to the next request.
        """
        if self._listener is not None:
            raise RuntimeError("a request with a listener is read through its listener")
        try:
            while not self._read:
                event = self._events.get()
                if event.kind == "text":
                    yield event.text
                elif event.kind == "error":
                    self._read = True
                    raise event.error
                elif event.kind == "done":
                    self._read = True
        finally:
            if not self._read:
                self.cancel()

    def result(self, timeout: float | None = None) -> Answer:
        """Wait for the whole answer; raises the request's error if it ended in one.

        timeout: how long this call waits, as a Future's `result` takes it, not the request's
        time limit (`timeout_s` at submit): past it this raises TimeoutError and the request
        goes on (`cancel()` it to free its row), where past its time limit it fails with
        TimedOut.
        """
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        return self.answer

    def cancel(self) -> None:
        """Stop generating; the row is free before the scheduler's next step."""
        self.cancelled = True

    # ---- the scheduler's side --------------------------------------------------------------

    def emit(self, event: Event) -> None:
        if self.done.is_set():  # a request ends once (a failure while it leaves is too late)
            return
        if event.kind == "done":
            self.answer = event.answer
        elif event.kind == "error":
            self.error = event.error
        try:
            (self._listener or self._events.put)(event)
        except Exception as e:  # the app's listener: it ends this request only (`_leave`)
            if self.listener_error is None:
                self.listener_error = e
        if event.kind in ("done", "error"):
            self.done.set()

    def fail(self, error: Exception) -> None:
        self.emit(Event("error", error=error))

    @property
    def fed_ids(self) -> list[int]:
        """The ids in this request's cache row: the prompt and all but the last answer token."""
        return self.ids + self.generated[:-1]


# Each image of a prompt, in order: the key of its picture and how many image tokens it takes.
Pictures = list[tuple[str, int]]


class PrefixStore:
    """Keys/values of finished requests' rows, so that a later prompt starting the same way (a
    conversation's next turn, a new question about the same image) copies them instead of
    computing them. Least recently used entries go first once the budget is spent."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        # key -> (ids, (image key, image tokens) per image, keys/values per layer, bytes)
        self.entries: OrderedDict[int, tuple[np.ndarray, Pictures, list, int]] = OrderedDict()
        self.used = 0
        self._keys = itertools.count()

    def match(self, ids: np.ndarray, images: Pictures, image_id: int) -> tuple[list, int] | None:
        """The stored keys/values sharing the longest prefix with `ids`, and its usable length
        (at most len(ids) - 1: the last prompt token is always fed, for its logits). Image
        tokens match only where they stand for the same picture."""
        best, best_len, best_key = None, 0, None
        image_at = np.flatnonzero(ids == image_id)
        for key, (stored, stored_images, kv, _) in self.entries.items():
            n = min(len(stored), len(ids) - 1)
            diff = np.flatnonzero(stored[:n] != ids[:n])
            length = int(diff[0]) if len(diff) else n
            length = _same_pictures(length, image_at, images, stored_images)
            if length > best_len:
                best, best_len, best_key = kv, length, key
        if best is None or best_len < MIN_PREFIX:
            return None
        self.entries.move_to_end(best_key)
        return best, best_len

    def add(self, ids: np.ndarray, images: Pictures, kv: list) -> None:
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if len(ids) < MIN_PREFIX or size > self.budget:
            return
        for key, (stored, stored_images, _, stored_size) in list(self.entries.items()):
            covered = len(stored) <= len(ids) and np.array_equal(ids[: len(stored)], stored)
            if covered and images[: len(stored_images)] == stored_images:
                del self.entries[key]  # the new entry answers every prompt the old one did
                self.used -= stored_size
        while self.entries and (
            self.used + size > self.budget or len(self.entries) >= MAX_PREFIXES
        ):
            *_, old_size = self.entries.popitem(last=False)[1]
            self.used -= old_size
        self.entries[next(self._keys)] = (ids, images, kv, size)
        self.used += size


# Engines not closed yet, whose scheduler thread may still run: the process's exit stops them.
_running: weakref.WeakSet[BatchEngine] = weakref.WeakSet()


def _close_at_exit() -> None:
    """Cancel what every engine still holds and wait for its thread: an app may exit without
    closing its engine (its thread is a daemon), and its waiters then hear Cancelled."""
    for engine in list(_running):
        engine.close(drain=False, timeout=EXIT_WAIT_S)


before_exit(_close_at_exit)


def prefix_budget(prefix_cache_mb: Any, exact: bool) -> int:
    """The prefix store's bytes: None is PREFIX_CACHE_MB where prompts can reuse a prefix
    (`exact`) and none where they cannot; a budget given where none can be reused is refused,
    as it would do nothing."""
    if prefix_cache_mb is None:
        return PREFIX_CACHE_MB * 2**20 if exact else 0
    if (
        isinstance(prefix_cache_mb, bool | np.bool_)
        or not isinstance(prefix_cache_mb, numbers.Real)
        or not 0 <= prefix_cache_mb < float("inf")
    ):
        raise LlavaEdgeError(
            f"prefix_cache_mb must be a number, 0 or more (0: no prefix reuse), got "
            f"{prefix_cache_mb!r}"
        )
    if prefix_cache_mb and not exact:
        raise LlavaEdgeError(
            f"a prefix cache (--prefix-cache-mb, prefix_cache_mb) of {prefix_cache_mb:g} MB would "
            "do nothing: this model dir's prompts run onnxruntime's dynamic int8 form (an int8 "
            "dir, or int4 quantized with --prefill int8), which scales each call's activations "
            "alike, so a reused prefix would change the answer; leave it out or give 0"
        )
    return int(prefix_cache_mb * 2**20)


def _token_ids(ids: Any) -> list[int]:
    """A rendered prompt's ids as Python ints (numpy's taken), refused if it is empty or holds
    anything else."""
    try:
        ids = [operator.index(i) for i in ids]
    except TypeError:
        raise LlavaEdgeError(
            "a prompt's ids are token ids (whole numbers), as Pipeline.prompt_ids gives them"
        ) from None
    if not ids:
        raise LlavaEdgeError("the prompt is empty: render one with Pipeline.prompt_ids")
    return ids


def _same_pictures(length: int, image_at: np.ndarray, images: Pictures, stored: Pictures) -> int:
    """How much of a `length`-token common prefix holds the same pictures: up to the first
    image whose tokens start in it but which stands for another picture (or none stored)."""
    taken = 0  # image tokens of the images before image i
    for i, image in enumerate(images):
        if taken >= len(image_at) or image_at[taken] >= length:
            break
        if i >= len(stored) or stored[i] != image:
            return int(image_at[taken])
        taken += image[1]
    return length


class BatchEngine:
    """Decodes the requests submitted to it together, on a scheduler thread of its own.

    max_batch: rows of the shared KV cache (requests decoded at once); max_queue: requests that
    may wait for a row before `submit` raises QueueFull; prefix_cache_mb: memory for the keys and
    values of finished requests (0: no prefix reuse; None: PREFIX_CACHE_MB, or 0 where prefixes
    cannot be reused, below); admit_per_step: requests prefilled between
    two decode steps. One (the default) keeps the running answers flowing while a burst of
    requests arrives (each waits at most one prefill a token) and spreads the burst's requests
    apart, so they finish, and their clients come back, at different steps instead of all at
    once. The pipeline's Limits apply to every request. `start=False` leaves the scheduling to
    the caller (`run_until_idle`), which is how Pipeline.generate_batch runs a batch without a
    thread. An engine made by an exit handler that runs after the runtime's (which parks every
    other thread's model calls) has no thread either: `submit` answers the request there.

    Prefixes are never reused where the graph that runs prompts is onnxruntime's dynamic int8
    form (int8 model dirs, and int4 ones quantized with `--prefill int8`): it quantizes
    activations with one scale per call, so a prompt fed as a stored prefix plus the rest would
    get other keys, values and tokens than fed whole. A prefix_cache_mb above 0 is refused
    there. (An int8 KV cache, `--kv-cache int8`, reuses prefixes exactly: its keys and values
    are stored quantized whether fed whole or in parts.) An int8 dir's decode step shares that
    scale among its rows too, so there a batched answer can differ from the answer alone where
    two tokens nearly tie; fp32 and int4 (MatMulNBits) dirs answer exactly as alone.

    A failed step fails the requests in hand and the engine goes on from an empty cache; if not
    even a new cache can be had, the engine stops: the requests in hand fail, `failure` holds
    why, and `submit` raises EngineClosed saying so. No request is left waiting.
    """

    def __init__(
        self,
        pipeline: Any,
        max_batch: int = 4,
        max_queue: int = 64,
        prefix_cache_mb: float | None = None,
        admit_per_step: int = 1,
        start: bool = True,
    ):
        max_batch = whole_number("max_batch", max_batch, 1, "a positive integer")
        max_queue = whole_number("max_queue", max_queue, 0, "0 or more")
        self.admit_per_step = whole_number("admit_per_step", admit_per_step, 1, "at least 1")
        self.pipe = pipeline
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.cache = pipeline.backend.new_cache(max_batch)
        exact = not pipeline.backend.prompt_scales_per_call
        self.prefixes = PrefixStore(prefix_budget(prefix_cache_mb, exact))
        self.running: list[Request] = []  # running[i] decodes in cache row i
        self.waiting: deque[Request] = deque()
        self.admitting = 0  # places held by Admissions: requests still arriving
        self.counters = {
            "requests": 0,
            "finished": 0,
            "failed": 0,
            "cancelled": 0,
            "prompt_tokens": 0,
            "prefix_tokens_reused": 0,
            "generated_tokens": 0,
            "decode_steps": 0,
            "decode_tokens": 0,  # tokens of batched decode steps (first tokens come from prefill)
            "decode_seconds": 0.0,
            "prefill_seconds": 0.0,  # admissions: image features and prefill
        }
        self._lock = threading.Condition()
        self._closing = False
        self._cancelling = False  # closing without draining
        self.failure: BaseException | None = None  # what stopped the scheduler thread, if any
        self._thread: threading.Thread | None = None
        # made by an exit handler that runs after the runtime's: a thread of its own would be
        # parked at its first model call, so each request is answered within submit instead
        self._answers_in_submit = start and running_exit()
        if start and not self._answers_in_submit:
            self._thread = threading.Thread(target=self._run, name="llava-edge-batch", daemon=True)
            try:
                self._thread.start()
            except BaseException:  # a Ctrl-C while start waits: no engine, so no close to come
                with self._lock:
                    self._closing = True
                    self._lock.notify_all()
                raise
            _running.add(self)

    # ---- submitting ------------------------------------------------------------------------

    def submit(
        self,
        image: Images,
        prompt: str,
        listener: Callable[[Event], None] | None = None,
        **options: Any,
    ) -> Request:
        """One question, as Pipeline.stream takes it (options: GenerationConfig's fields,
        raw=True for a prompt sent as written, system for a system prompt in place of the
        template's, and timeout_s, as submit_ids takes it). The
        time limit counts from this call: reading the image is part of the request."""
        started = time.perf_counter()
        timeout_s = self.pipe._timeout(options.pop("timeout_s", None))  # bad: refused at once
        pixels = [self.pipe.image_pixels(one) for one in image_list(image)]
        ids = self.pipe.prompt_ids(
            prompt, pixels, self.pipe._raw(options), self.pipe._system(options)
        )
        return self.submit_ids(ids, pixels, options, listener, timeout_s, started)

    def submit_ids(
        self,
        ids: list[int],
        image: ImagePixels | list[ImagePixels] | None,
        options: dict[str, Any] | GenerationConfig,
        listener: Callable[[Event], None] | None = None,
        timeout_s: float | None = None,
        started: float | None = None,
        admission: Admission | None = None,
    ) -> Request:
        """A prompt already rendered (Pipeline.prompt_ids, Pipeline.conversation_ids) with the
        image it was rendered for (Pipeline.image_pixels).

        Checks it against the limits here, in the caller's thread, so bad input fails at once;
        the image is encoded (or found in the feature cache) on admission. A max_new_tokens past
        the context is shortened to it, as Pipeline's answers are (the server refuses one before
        it submits).
        timeout_s: this request's time limit in place of the pipeline's `Limits.timeout_s`
        (None: the pipeline's), as every Pipeline entry point takes it; it counts the wait for a
        row, and past it the request fails with TimedOut. (A server taking one from its clients
        would cap it at its own.) started: when the request
        began (time.perf_counter), if before this call: its time limit and timings count from
        there (a server's request arrives before its image is fetched and its prompt rendered).
        admission: the place `reserve` held for this request, which it now takes.
        """
        request = self._request(ids, image, options, listener, timeout_s, started)
        with self._lock:
            if admission is not None:
                admission._give_back()
            self._refuse_without_room()
            self.waiting.append(request)
            self.counters["requests"] += 1
            self._lock.notify_all()
        if self._answers_in_submit:
            self.run_until_idle()
        return request

    def reserve(self) -> Admission:
        """Hold a place in the queue for a request still arriving, or raise what a submit would
        raise for want of room: a server reserves before it reads a request's body and decodes
        its images, so a burst of them counts against max_queue while it is read. Give the
        place back by submitting with `admission=`, or by `release()` on every other way out."""
        with self._lock:
            self._refuse_without_room()
            self.admitting += 1
            return Admission(self)

    def _refuse_without_room(self) -> None:
        """Under the lock."""
        if self.failure is not None:
            raise self._stopped_error()
        if self._closing:
            raise EngineClosed("the engine is shutting down and takes no new requests")
        free_rows = self.max_batch - len(self.running)
        if len(self.waiting) + self.admitting >= self.max_queue + free_rows:
            arriving = f" ({self.admitting} more arriving)" if self.admitting else ""
            raise QueueFull(
                f"{len(self.waiting)} requests are already waiting for one of "
                f"{self.max_batch} rows{arriving}; try again later"
            )

    def _request(
        self,
        ids: list[int],
        image: ImagePixels | list[ImagePixels] | None,
        options: dict[str, Any] | GenerationConfig,
        listener: Callable[[Event], None] | None,
        timeout_s: float | None,
        started: float | None = None,
    ) -> Request:
        pipe = self.pipe
        if pipe.closed:
            raise EngineClosed("the pipeline is closed; load the model dir again")
        ids = _token_ids(ids)
        if isinstance(options, GenerationConfig):
            options = dict(vars(options))
        config = pipe._config(dict(options))
        pipe.limits.check_prompt(len(ids), images=pipe.image_share(ids))
        config = pipe._fit_context(config, len(ids), ids=ids)
        # in the form the prompt reads them: a picture's untiled features have a key of their own
        pixels = prompt_forms(pixels_list(image))
        image_tokens = ids.count(pipe.manifest.tokens.image_token_id)
        counts = pipe.image_tokens(pixels) or []
        wanted = sum(counts)
        if image_tokens != wanted:
            raise LlavaEdgeError(
                f"the prompt holds {image_tokens} image tokens where the images given take "
                f"{wanted}: render the prompt for the images it is sent with"
            )
        timeout_s = pipe._timeout(timeout_s)
        return Request(
            list(ids),
            pixels,
            counts,
            config,
            AnswerText(pipe.codec, config.stop),
            timeout_s,
            listener,
            started,
        )

    # ---- state -------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Rows in use, requests waiting, and running totals (for metrics and tests)."""
        with self._lock:
            return {
                "running": len(self.running),
                "waiting": len(self.waiting),
                "admitting": self.admitting,
                "max_batch": self.max_batch,
                "prefix_entries": len(self.prefixes.entries),
                "prefix_bytes": self.prefixes.used,
                **self.counters,
            }

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop taking requests; finish those in hand (drain) or cancel them, then stop. An
        engine without a thread of its own (`start=False`) does that on the caller's.

        timeout: seconds to wait for the scheduler thread (None: until it ends). A cancelled
        request leaves only between two backend calls, and a call in progress (a stalled
        device) cannot be interrupted: returns False if the thread still runs one at the
        timeout (it is a daemon, so it does not keep the process alive), else True. An engine
        never closed is closed by the process's exit, without draining, which waits
        EXIT_WAIT_S at most."""
        _running.discard(self)  # its closer has said how long to wait
        with self._lock:
            self._closing = True
            if not drain:
                self._cancelling = True  # a request between the queue and its row too
                for request in [*self.waiting, *self.running]:
                    request.cancel()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        self.run_until_idle()
        return True

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        """Leaving the block as written drains the requests in hand (their results stay
        readable); leaving it on an exception, Ctrl-C included, cancels them: nothing will read
        them, and a Ctrl-C should not wait out every answer."""
        self.close(drain=kind is None)

    # ---- scheduling ----------------------------------------------------------------------

    def run_until_idle(self) -> None:
        """Schedule on the caller's thread until every submitted request has finished."""
        while self.run_step():
            pass

    def run_step(self) -> bool:
        """One step on the caller's thread, as the scheduler thread takes it: a step that fails
        outside any one request's work ends the requests in hand with its error, so those
        already finished keep their answers. Returns whether any request still waits or runs."""
        try:
            return self.step()
        except Exception as e:
            self._fail_all(e)
            return False

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self.running and not self.waiting and not self._closing:
                        self._lock.wait()
                    if self._closing and not self.running and not self.waiting:
                        return
                try:
                    self.step()
                except Exception as e:  # a bug must not leave callers waiting forever
                    self._fail_all(e)
        except BaseException as e:  # not even a fresh cache: the engine stops, and says why
            self._stop(e)
            raise

    def _fail_all(self, error: Exception) -> None:
        """End every request with `error` and start again from an empty cache. Raises only if
        no cache can be had (then the engine stops: `_stop`)."""
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
            running, self.running = list(self.running), []
        self.counters["failed"] += len(running) + len(waiting)
        for request in running + waiting:  # first: nobody waits on the cache's repair
            request.fail(error)  # emit catches what a listener raises
        try:
            for row in range(len(running)):
                self.cache.truncate(0, row)
            self.cache.shrink()
        except Exception:  # a cache the failure left unusable is replaced
            self.cache = self.pipe.backend.new_cache(self.max_batch)

    def _stop(self, error: BaseException) -> None:
        """The scheduler thread is ending on `error`: fail what it holds, refuse what comes."""
        with self._lock:
            self.failure, self._closing = error, True
            pending = [*self.running, *self.waiting]
            self.running, self.waiting = [], deque()
            self.counters["failed"] += len(pending)
        for request in pending:
            request.fail(self._stopped_error())

    def _stopped_error(self) -> EngineClosed:
        return EngineClosed(
            f"the engine stopped after an internal error ({first_line(self.failure)}); "
            "load the model again"
        )

    def step(self) -> bool:
        """One round: drop cancelled requests, admit waiting ones, decode one token for all.

        Returns whether any request is still waiting or running.
        """
        for request in self.running[:]:
            if request.cancelled:
                self._leave(request, Cancelled("the request was cancelled"))
        admitted = self._take_waiting()
        for request in admitted:
            self._admit(request)
        if self.running:
            self._decode()
        with self._lock:
            return bool(self.running or self.waiting)

    def _take_waiting(self) -> list[Request]:
        """Requests that get a row this round. Cancelled ones, and ones past their time limit
        (which counts the wait), leave the queue at once instead of when a row frees."""
        taken, dropped, late = [], [], []
        with self._lock:
            kept: deque[Request] = deque()
            for request in self.waiting:
                if request.cancelled:
                    dropped.append(request)
                elif self._deadline_passed(request):
                    late.append(request)
                elif (
                    len(self.running) + len(taken) < self.max_batch
                    and len(taken) < self.admit_per_step
                ):
                    taken.append(request)
                else:
                    kept.append(request)
            self.waiting = kept
            self.counters["cancelled"] += len(dropped)
            self.counters["failed"] += len(late)
        for request in dropped:
            request.fail(Cancelled("the request was cancelled"))
        for request in late:
            request.fail(self._timeout_error(request))
        return taken

    def _admit(self, request: Request) -> None:
        """Prefill `request` alone into the next free row and pick its first token."""
        row = len(self.running)
        with self._lock:
            self.running.append(request)
            if self._cancelling:  # close(drain=False) came after it left the queue
                request.cancel()
        if request.cancelled:
            self._leave(request, Cancelled("the request was cancelled"))
            return
        began = time.perf_counter()
        try:
            self._check_deadline(request)
            hit = self.prefixes.match(
                np.asarray(request.ids, dtype=np.int64),
                request.images,
                self.pipe.manifest.tokens.image_token_id,
            )  # None below MIN_PREFIX tokens
            features = self._features_from(request, hit[1] if hit else 0)
            request.timer.mark("vision")
            # cancelled or late while its image was encoded (seconds, for a large one on a
            # Jetson): its row is free before its prompt is run for nothing
            if request.cancelled:
                raise Cancelled("the request was cancelled")
            self._check_deadline(request)
            logits = self._prefill(request, row, hit, features)
            request.timer.mark("prefill")
            self._check_deadline(request)  # as after a decode step: a late first token is late
        except Exception as e:  # the request's own failure; the others go on
            self._leave(request, e)
            return
        finally:
            self.counters["prefill_seconds"] += time.perf_counter() - began
        self.counters["prompt_tokens"] += len(request.ids)
        self._take(request, logits)

    def _features_from(self, request: Request, start: int) -> np.ndarray | None:
        """The features of the prompt's image tokens from token `start` on. Pictures whose
        tokens all lie before it came with the reused prefix and are not encoded again (the
        feature cache may have let them go since)."""
        held = request.ids[:start].count(self.pipe.manifest.tokens.image_token_id)
        skipped = taken = 0  # pictures wholly held, and their tokens
        for _, count in request.images:
            if taken + count > held:
                break
            skipped, taken = skipped + 1, taken + count
        pixels, request.pixels = request.pixels[skipped:], []
        return self.pipe.pixel_features(pixels)[held - taken :] if pixels else None

    def _prefill(
        self, request: Request, row: int, hit: tuple[list, int] | None, features: np.ndarray | None
    ) -> np.ndarray:
        """Copy the stored prefix `hit` (keys/values, tokens) into the row, then feed the rest
        of the prompt, with `features` for its image tokens."""
        pipe = self.pipe
        image_id = pipe.manifest.tokens.image_token_id
        start = 0
        self.cache.truncate(0, row)
        if hit is not None:
            kv, start = hit
            self.cache.write_row(row, kv, start)
            request.reused = start
            self.counters["prefix_tokens_reused"] += start
        feed = np.asarray(request.ids[start:], dtype=np.int64)[None]
        embeds = embed(pipe.table, feed, image_id, [features])
        positions = np.arange(start, len(request.ids), dtype=np.int64)[None]
        rows = self.cache.rows(row, row + 1)
        return pipe.backend.decode(embeds, np.ones_like(feed), positions, rows)

    def _decode(self) -> None:
        """One token for every running request, in one decoder call over rows [0, n)."""
        pipe, n = self.pipe, len(self.running)
        tokens = np.asarray([[r.generated[-1]] for r in self.running], dtype=np.int64)
        positions = self.cache.lengths[:n, None].copy()
        start = time.perf_counter()
        try:
            logits = pipe.backend.decode(
                embed(pipe.table, tokens, -1, []),
                np.ones_like(tokens),
                positions,
                self.cache.rows(0, n),
            )
        except Exception as e:  # a failed step fails every request in it
            for request in self.running[:]:
                self._leave(request, e)
            return
        self.counters["decode_steps"] += 1
        self.counters["decode_tokens"] += n
        self.counters["decode_seconds"] += time.perf_counter() - start
        for request, row_logits in zip(self.running[:], logits, strict=True):
            if request.cancelled:
                self._leave(request, Cancelled("the request was cancelled"))
            elif self._deadline_passed(request):
                self._leave(request, self._timeout_error(request))
            else:
                self._take(request, row_logits[None])

    def _take(self, request: Request, logits: np.ndarray) -> None:
        """Sample `request`'s next token from its logits [1, V]; finish it if it is done."""
        config = request.config
        try:
            token = int(request.sampler(logits, [request.seen])[0])
        except Exception as e:  # this request's own settings: it fails, the batch goes on
            self._leave(request, e)
            return
        request.generated.append(token)
        self.counters["generated_tokens"] += 1
        if len(request.generated) == 1:
            request.timer.mark("first_token")
            # its text may come later (a character, a stop)
            if not self._tell(request, Event("started")):
                return
        if config.repetition_penalty != 1.0:  # the only reader of `seen`
            request.seen = np.append(request.seen, token)
        eos = not config.ignore_eos and token in self.pipe.manifest.tokens.eos_token_ids
        if eos:
            self._finish(request, "eos")
            return
        piece = request.text.push(token)
        if piece and not self._tell(request, Event("text", text=piece)):
            return
        if request.text.stopped:
            self._finish(request, "stop")
        elif len(request.generated) >= config.max_new_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        piece = request.text.finish()
        if piece and not self._tell(request, Event("text", text=piece)):
            return
        reason = "stop" if request.text.stopped else reason
        request.timer.mark("done")
        row = self.running.index(request)
        fed = request.fed_ids
        # an entry over the whole budget is not kept: its row is not even read (a device copy
        # of the whole row, which would stall every other row's next token for nothing)
        if len(fed) >= MIN_PREFIX and len(fed) * self._slot_bytes <= self.prefixes.budget:
            # reuse only saves time: a copy that fails (no host memory for it) costs this
            # answer nothing, and the rows beside it nothing either
            with contextlib.suppress(Exception):
                kv = self.cache.read_row(row, len(fed))
                self.prefixes.add(np.asarray(fed, dtype=np.int64), request.images, kv)
        answer = Answer(
            request.text.text,
            list(request.ids),
            list(request.generated),
            reason,
            {**timings(request.timer, len(request.generated)), "prefix_reused": request.reused},
        )
        try:
            self._release(request)
        finally:  # its answer is whole even if freeing its row failed
            self.counters["finished"] += 1
            request.emit(Event("done", answer=answer))

    def _tell(self, request: Request, event: Event) -> bool:
        """Send a running request an event; False when its listener raised, which ends it."""
        request.emit(event)
        if request.listener_error is None:
            return True
        self._leave(request, request.listener_error)
        return False

    def _leave(self, request: Request, error: Exception) -> None:
        """End `request` with `error` and free its row."""
        try:
            self._release(request)
        finally:  # it ends even if freeing its row failed
            self.counters["cancelled" if isinstance(error, Cancelled) else "failed"] += 1
            request.fail(error)

    def _release(self, request: Request) -> None:
        """Free `request`'s row: the last running row moves into it, so rows stay [0, n)."""
        row = self.running.index(request)
        last = len(self.running) - 1
        # the cache is this (the scheduler's) thread's alone: only the list needs the lock, and
        # a row's copy must not hold up submissions
        if row != last:
            self.cache.move_row(last, row)
        else:
            self.cache.truncate(0, row)
        with self._lock:
            self.running[row] = self.running[last]
            self.running.pop()
        self.cache.shrink()

    @property
    def _slot_bytes(self) -> int:
        """Bytes of one token's keys and values, over all layers, as read_row copies them."""
        t = self.pipe.manifest.text
        return 2 * t.num_layers * t.num_kv_heads * t.head_dim * np.dtype(self.cache.dtype).itemsize

    def _check_deadline(self, request: Request) -> None:
        if self._deadline_passed(request):
            raise self._timeout_error(request)

    @staticmethod
    def _deadline_passed(request: Request) -> bool:
        return request.deadline is not None and time.perf_counter() > request.deadline

    @staticmethod
    def _timeout_error(request: Request) -> TimedOut:
        return TimedOut.after(request.timeout_s)
