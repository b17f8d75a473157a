"""LLaVA's instruction-generation pipeline against any OpenAI-compatible chat endpoint.

For every annotated image, every kind asked for and every index up to `per_image`, one request:
the kind's system prompt and worked examples, then the image's captions and boxes as text. The
JSON reply becomes a LLaVA sample or is dropped with its reason. At most `concurrency` requests
are in flight (asyncio); each settled sample is appended to the journal as soon as it is known,
so a killed run, run again, asks only what is missing, and the final LLaVA JSON (written whole
from the journal, in annotation order) is the same as an uninterrupted run's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError
from llava_edge.logs import terminal_bar
from llava_edge.training.datagen.annotations import ImageNotes, read_annotations
from llava_edge.training.datagen.journal import Journal, Key, check_settings, settled_entries
from llava_edge.training.datagen.llava_json import conversation, write_samples
from llava_edge.training.datagen.prompts import KINDS, messages, prompts_version, request_seed
from llava_edge.training.datagen.replies import CUT_OFF, Dropped, parse_reply


@dataclass(frozen=True)
class Job:
    notes: ImageNotes
    kind: str
    index: int

    @property
    def key(self) -> Key:
        return self.notes.image, self.kind, self.index

    @functools.cached_property
    def context(self) -> str:
        """A digest of what the LLM is shown about the image: labels edited since a sample was
        journaled make that sample stale, and it is asked again."""
        return hashlib.sha256(self.notes.render().encode("utf-8")).hexdigest()[:16]

    def settled(self, entries: dict[Key, dict], max_tokens: int) -> dict | None:
        """This job's journal entry, unless it must be asked again: it was asked about other
        labels, or its reply was cut off at a lower token limit than `max_tokens`."""
        entry = entries.get(self.key)
        if entry is None:
            return None
        context = entry.get("context")  # none: journaled before contexts were, and counts
        if context is not None and context != self.context:
            return None
        cut = entry.get("status") == "dropped" and entry.get("reason") == CUT_OFF
        if cut and (entry.get("max_tokens") or 0) < max_tokens:
            return None
        return entry


@dataclass
class GenerateResult:
    out: Path | None  # None after a dry run
    journal: Path
    model: str | None
    samples: Counter = field(default_factory=Counter)  # in the final file, by kind
    images: int = 0  # images with at least one sample in the final file
    dropped: list[tuple[Key, str, str]] = field(
        default_factory=list
    )  # this run: key, reason, detail
    dropped_earlier: int = 0  # dropped by earlier runs of the journal
    failed: list[tuple[Key, str]] = field(default_factory=list)  # no reply: asked again next run
    unsent: int = 0  # not asked: the request budget ran out
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
    requests: int = 0  # HTTP requests this run, retries included
    retries: Counter = field(default_factory=Counter)  # by cause
    prompt_tokens: int = 0  # this run
    completion_tokens: int = 0
    journal_prompt_tokens: int = 0  # every run of the journal
    journal_completion_tokens: int = 0


def generate(
    annotations: Sequence[str | Path] | str | Path,
    images: str | Path,
    out: str | Path,
    endpoint: str | None = None,
    model: str | None = None,
    api_key_env: str | None = None,
    kinds: Sequence[str] = KINDS,
    per_image: int = 1,
    concurrency: int = 4,
    max_images: int | None = None,
    max_requests: int | None = None,
    journal: str | Path | None = None,
    temperature: float = 0.7,
    max_tokens: int = 1024,
    seed: int = 0,
    timeout: float = 120.0,
    retries: int = 5,
    backoff: float = 1.0,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], object] = print,
    sleep: Callable[[float], Awaitable[object]] | None = None,
) -> GenerateResult:
    """Generate instruction data for the annotated images; see the module docstring.

    journal: default OUT's name with `.journal.jsonl`. sleep: how retries wait (tests pass a
    recorder). dry_run: log the first image's prompts and send nothing.
    """
    if isinstance(annotations, str | Path):
        annotations = [annotations]
    kinds = _check_options(
        kinds, per_image, concurrency, max_images, max_requests, temperature, max_tokens
    )
    # the client's check, for a dry run too (NaN is neither positive nor 0 or more)
    if not timeout > 0 or retries < 0 or not backoff >= 0:
        raise LlavaEdgeError("--timeout must be positive, --retries and --backoff 0 or more")
    out = Path(out)
    if out.is_dir():
        raise LlavaEdgeError(f"--out {out} is a directory; name the JSON file to write")
    if any(Path(a).resolve() == out.resolve() for a in annotations):
        raise LlavaEdgeError(
            f"--out {out} is one of the annotation files; write the data elsewhere"
        )
    journal_path = Path(journal) if journal else out.with_name(out.stem + ".journal.jsonl")
    if journal_path.resolve() == out.resolve():
        raise LlavaEdgeError(f"--journal and --out are both {out}; give the journal its own file")
    notes, skipped = read_annotations(list(annotations), images, progress)
    if out.exists():  # only a file already there can be one of the pictures
        for note in notes:
            if (Path(images) / note.image).resolve() == out.resolve():
                raise LlavaEdgeError(
                    f"--out {out} is the image {note.image} of the annotations; write the data "
                    "elsewhere"
                )
    notes = notes[:max_images] if max_images else notes
    jobs = [Job(n, kind, i) for n in notes for kind in kinds for i in range(per_image)]

    def body(job: Job, model: str | None) -> dict:
        request = {
            "messages": messages(job.kind, job.notes.render()),
            "response_format": {"type": "json_object"},
            "temperature": temperature,
            "max_tokens": max_tokens,
            "seed": request_seed(seed, *job.key),
        }
        return {"model": model, **request} if model else request

    def settings(model: str | None) -> dict:
        """What the journal must have been written with (the model: where it is known)."""
        known = {"model": model} if model else {}
        return {**known, "prompts": prompts_version(), "temperature": temperature, "seed": seed,
                "max_tokens": max_tokens}  # fmt: skip

    if dry_run:
        check_settings(journal_path, settings(model))
        first = [next(j for j in jobs if j.kind == kind) for kind in kinds]
        _show_prompts([(j, body(j, model)) for j in first], log)
        settled = settled_entries(journal_path)
        _show_count(jobs, settled, journal_path, max_requests, max_tokens, log)
        for line in _left_out(skipped):
            log(line)
        return GenerateResult(None, journal_path, model, skipped_images=skipped)
    if endpoint is None:
        raise LlavaEdgeError("no --endpoint given: the URL of an OpenAI-compatible API")
    api_key = _api_key(api_key_env)
    try:
        from llava_edge.training.datagen.client import Budget, ChatClient
    except ImportError as e:
        raise LlavaEdgeError(
            f"`data generate` needs an HTTP client ({e}): pip install 'llava-edge[data]'"
        ) from None

    client_options = dict(
        api_key=api_key,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        budget=Budget(max_requests),
        concurrency=concurrency,
        sleep=sleep,
    )

    async def session() -> GenerateResult:
        async with ChatClient(endpoint, **client_options) as client:
            chosen = model or await _only_model(client)
            result = GenerateResult(out, journal_path, chosen, skipped_images=skipped)
            with Journal(journal_path, settings(chosen)) as book:
                todo = [job for job in jobs if job.settled(book.entries, max_tokens) is None]
                result.dropped_earlier = sum(
                    (j.settled(book.entries, max_tokens) or {}).get("status") == "dropped"
                    for j in jobs
                )
                with _progress_bar(len(jobs), len(jobs) - len(todo), progress) as bar:
                    request = functools.partial(body, model=chosen)
                    await _run(client, todo, request, book, result, concurrency, bar)
                _write_final(out, jobs, book, result, max_tokens)
            result.requests = client.requests
            result.retries = client.retried
            result.prompt_tokens = client.prompt_tokens
            result.completion_tokens = client.completion_tokens
            return result

    return _run_to_completion(session)


def _run_to_completion(session: Callable[[], Coroutine[Any, Any, GenerateResult]]):
    """asyncio.run(session()), also where the caller's thread already runs an event loop (a
    notebook), by running it on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(asyncio.run, session()).result()
    previous = signal.getsignal(signal.SIGTERM)
    with _pythons_own_sigint():
        result = asyncio.run(_stopped_by_sigterm(session, previous))
    if result is not _TERMINATED:
        return result
    if callable(previous):
        previous(signal.SIGTERM, None)  # the CLI's raises Terminated
    signal.raise_signal(signal.SIGTERM)  # the default: end the process as SIGTERM does
    raise KeyboardInterrupt  # a handler that returned: stop all the same


_TERMINATED = object()


@contextlib.contextmanager
def _pythons_own_sigint() -> Iterator[None]:
    """asyncio.run cancels the run on Ctrl-C, as it unwinds cleanly, only under Python's own
    SIGINT handler: another (the CLI's) raises inside whatever task the signal lands in. An
    ignored SIGINT stays ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous) or previous is signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


async def _stopped_by_sigterm(session, previous):
    """Run the session; SIGTERM cancels it, as asyncio.run does on Ctrl-C, and once the run has
    unwound, the handler the process had runs (outside the loop). Left to run where the signal
    lands, a Python handler raises inside a request or a journal write, where asyncio prints a
    traceback or httpx swallows it and the run goes on."""
    main, arrived = asyncio.current_task(), []

    def cancel() -> None:
        arrived.append(True)
        main.cancel()

    loop = asyncio.get_running_loop()
    if previous in (signal.SIG_IGN, None):  # ignored, or not Python's to handle
        return await session()
    try:
        loop.add_signal_handler(signal.SIGTERM, cancel)
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        return await session()
    try:
        return await session()
    except asyncio.CancelledError:
        if not arrived:
            raise
        return _TERMINATED
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)  # asyncio leaves the default behind


def _progress_bar(total: int, done: int, progress: bool):
    return terminal_bar(
        progress=progress, total=total, initial=done, desc="generating", unit="sample"
    )


async def _run(client, todo, body, book: Journal, result: GenerateResult, concurrency: int, bar):
    """Ask for every job, `concurrency` requests at a time. Outcomes are recorded between
    awaits, so a journal line is never cut by a cancellation (Ctrl-C)."""
    waiting = iter(todo)

    async def worker() -> None:
        while not client.budget.exhausted:
            job = next(waiting, None)
            if job is None:
                return
            outcome = await _ask(client, job, body(job))
            if outcome is None:
                result.unsent += 1
            elif isinstance(outcome, str):
                result.failed.append((job.key, outcome))
            else:
                book.append(outcome)
                if outcome["status"] == "dropped":
                    result.dropped.append((job.key, outcome["reason"], outcome["detail"]))
                bar.update()
            bar.set_postfix(dropped=len(result.dropped), failed=len(result.failed))

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*workers)  # EndpointError in one ends the run here
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    result.unsent += sum(1 for _ in waiting)  # never asked: the budget ran out


async def _ask(client, job: Job, body: dict) -> dict | str | None:
    """The journal entry of one job, a failure message, or None if it was not sent."""
    from llava_edge.training.datagen.client import NotSent, RequestFailed

    try:
        reply = await client.complete(body)
    except RequestFailed as e:
        return str(e)
    except NotSent:
        return None
    image, kind, index = job.key
    entry = {
        "image": image,
        "kind": kind,
        "index": index,
        "context": job.context,
        "max_tokens": body["max_tokens"],
        "usage": [reply.prompt_tokens, reply.completion_tokens],
    }
    try:
        rounds = parse_reply(
            kind, reply.content, reply.finish_reason, job.notes.coordinates(), image, index
        )
    except Dropped as e:
        return {**entry, "status": "dropped", "reason": e.reason, "detail": e.detail,
                "reply": reply.content}  # fmt: skip
    sample = {
        "id": f"{image}-{kind}-{index}",
        "image": image,
        "conversations": conversation(rounds),
    }
    return {**entry, "status": "ok", "sample": sample}


def _write_final(
    out: Path, jobs: list[Job], book: Journal, result: GenerateResult, max_tokens: int
) -> None:
    samples = []
    for job in jobs:
        entry = job.settled(book.entries, max_tokens)
        if entry is not None and entry["status"] == "ok":
            samples.append(entry["sample"])
            result.samples[job.kind] += 1
    result.images = len({s["image"] for s in samples})
    result.journal_prompt_tokens, result.journal_completion_tokens = book.usage
    write_samples(out, samples)


async def _only_model(client) -> str:
    from llava_edge.training.datagen.client import NotSent

    try:
        names = await client.models()
    except NotSent:
        raise LlavaEdgeError(
            f"--max-requests {client.budget.limit} leaves no request to ask {client.base_url} "
            "which model it serves; name it with --model"
        ) from None
    if len(names) != 1:
        listed = ", ".join(names[:5]) or "none"
        raise LlavaEdgeError(
            f"{client.base_url} serves {len(names)} models ({listed}); name one with --model"
        )
    return names[0]


def _api_key(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = (os.environ.get(variable) or "").strip()  # a key read from a file keeps its newline
    if not key:
        raise LlavaEdgeError(f"--api-key-env {variable}: that environment variable is not set")
    if not (key.isascii() and key.isprintable()):  # an HTTP header carries neither
        raise LlavaEdgeError(
            f"--api-key-env {variable}: the key holds a character that is not printable ASCII "
            "(a control character, or a letter outside ASCII); check the variable"
        )
    return key


def _check_options(
    kinds, per_image, concurrency, max_images, max_requests, temperature, max_tokens
) -> list:
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise LlavaEdgeError(
            f"--kinds {','.join(kinds)!r}: give each of {', '.join(KINDS)} at most once"
        )
    if per_image < 1 or concurrency < 1 or (max_images is not None and max_images < 1):
        raise LlavaEdgeError("--per-image, --concurrency and --max-images must be at least 1")
    if max_requests is not None and max_requests < 0:
        raise LlavaEdgeError("--max-requests must be 0 or more")
    if not 0 <= temperature < math.inf or max_tokens < 1:  # NaN and inf: not JSON numbers
        raise LlavaEdgeError("--temperature must be a number 0 or more and --max-tokens at least 1")
    if temperature == 0 and per_image > 1:  # greedy decoding ignores the per-sample seeds
        raise LlavaEdgeError(
            f"--per-image {per_image} at --temperature 0 asks for the same reply {per_image} "
            "times; sample (e.g. --temperature 0.7) or ask for one"
        )
    return kinds


def _show_prompts(first: list[tuple[Job, dict]], log: Callable[[str], object]) -> None:
    for job, body in first:
        log(f"===== {job.notes.image} · {job.kind} #{job.index} (seed {body['seed']}) =====")
        for message in body["messages"]:
            log(f"[{message['role']}]\n{message['content']}\n")


def _show_count(jobs, settled, journal: Path, max_requests: int | None, max_tokens, log) -> None:
    """How many requests a run would send: what the journal lacks, within --max-requests."""
    todo = sum(job.settled(settled, max_tokens) is None for job in jobs)
    images = len({job.notes.image for job in jobs})
    line = f"dry run: {len(jobs)} requests for {images} images"
    if todo < len(jobs):
        line += f", {todo} still to send ({len(jobs) - todo} settled in {journal})"
    if max_requests is not None and max_requests < todo:
        line += f"; --max-requests {max_requests} sends at most {max_requests}"
    log(line + "; nothing was sent")


def format_report(result: GenerateResult, limit: int = 20) -> str:
    """What a run made, dropped, failed and cost, for the terminal."""
    if result.out is None:
        return ""
    kinds = ", ".join(f"{kind} {n}" for kind, n in result.samples.items())
    lines = [
        f"wrote {sum(result.samples.values())} samples ({kinds or 'none'}) about "
        f"{result.images} images to {result.out}"
    ]
    lines += _left_out(result.skipped_images, limit)
    if result.dropped:
        reasons = Counter(reason for _, reason, _ in result.dropped)
        lines.append(
            f"dropped {len(result.dropped)} replies ("
            + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
            + "):"
        )
        lines += [_line(key, f"{r}: {d}" if d else r) for key, r, d in result.dropped[:limit]]
    if result.dropped_earlier:
        lines.append(f"{result.dropped_earlier} replies were dropped by earlier runs")
    if result.failed:
        lines.append(f"{len(result.failed)} requests failed (run again to retry them):")
        lines += [_line(key, why) for key, why in result.failed[:limit]]
    if result.unsent:
        lines.append(
            f"{result.unsent} samples not asked: the request budget ran out (run again to go on)"
        )
    retries = ", ".join(f"{n} {cause}" for cause, n in result.retries.most_common())
    lines.append(
        f"requests: {result.requests}"
        + (f" ({sum(result.retries.values())} retries: {retries})" if retries else "")
        + f"; tokens: {result.prompt_tokens:,} prompt + {result.completion_tokens:,} completion"
        + f" (journal {result.journal}: {result.journal_prompt_tokens:,} +"
        f" {result.journal_completion_tokens:,})"
    )
    hidden = max(0, len(result.dropped) - limit) + max(0, len(result.failed) - limit)
    if hidden:
        lines.append(
            f"({hidden} more not shown: the journal holds every dropped reply; the next run asks "
            "the failed requests again)"
        )
    return "\n".join(lines)


def _left_out(skipped: list[tuple[str, str]], limit: int = 20) -> list[str]:
    if not skipped:
        return []
    lines = [f"left out {len(skipped)} annotated images:"]
    return lines + [f"  {image}: {why}" for image, why in skipped[:limit]]


def _line(key: Key, why: str) -> str:
    image, kind, index = key
    return f"  {image} {kind} #{index}: {why}"
