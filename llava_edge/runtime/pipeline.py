"""The public runtime API: load a model dir, ask questions about images.

from llava_edge.runtime import Pipeline

with Pipeline.load("model_dir") as pipe:
    print(pipe.generate("photo.jpg", "What is on the table?"))
    for piece in pipe.stream(camera_frame, "Is the door open?"):
        print(piece, end="", flush=True)
    chat = pipe.chat("photo.jpg")
    chat.ask("What colour is the cup?")
    chat.ask("And the plate?")          # reuses the first turn's KV cache
"""

from __future__ import annotations

import numbers
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from llava_edge.errors import ChatFull, LlavaEdgeError, PromptTooLong, batch_failed
from llava_edge.manifest import Manifest, TemplateSpec
from llava_edge.runtime.answer import Answer, AnswerText, timings
from llava_edge.runtime.anyres import (
    ImagePixels,
    check_several,
    each_image_tokens,
    image_embeds,
    image_pixels,
    image_token_count,
    load_newline,
    pixels_list,
    prompt_forms,
    untiled_embeds,
    untiles_several,
)
from llava_edge.runtime.exit_guard import running_exit
from llava_edge.runtime.generate import (
    Timer,
    decode_loop,
    embed,
    positions_from_mask,
)
from llava_edge.runtime.image import ImageInput, Images, image_list, load_image
from llava_edge.runtime.sampling import GenerationConfig, true_or_false, whole_number
from llava_edge.runtime.template import IMAGE_PLACEHOLDER, answer_text, user_turn, with_system
from llava_edge.runtime.tokenizer import TextCodec, common_prefix

if TYPE_CHECKING:
    from llava_edge.runtime.watch import Watch

FEATURE_CACHE_SIZE = 8
# Rows generate_batch decodes at once, the rest waiting for a free one: every row of a KV cache
# is as long as its longest conversation, so memory grows with the rows (a 7B model's 768-token
# row holds 400 MB in fp16), while a decode step past a few rows gains little more throughput.
BATCH_ROWS = 8


@dataclass
class Limits:
    """What a deployment allows one request; exceeding any is a clear error, never a hang.

    Every entry point holds to them: generate, answer, stream, generate_batch and each chat
    turn, whatever form the image comes in. `max_prompt_tokens` bounds the prompt an answer is
    conditioned on: for a chat turn that is the whole conversation so far plus the new question
    (what a single request replaying the chat would send), so a chat cannot outgrow it.
    `timeout_s` counts from the start of the request (for a chat turn, of the turn); a call's
    own `timeout_s=` takes its place for that call (see Pipeline.answer).
    """

    max_image_pixels: int | None = 50_000_000
    max_prompt_tokens: int | None = None  # default: the model's context
    max_new_tokens: int | None = None
    timeout_s: float | None = None  # wall-clock time of one request

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_prompt_tokens", "max_new_tokens", "timeout_s"):
            _check_limit(name, getattr(self, name), "no limit")

    def check_options(self, config: GenerationConfig) -> None:
        if self.max_new_tokens is not None and config.max_new_tokens > self.max_new_tokens:
            raise LlavaEdgeError(
                f"max_new_tokens {config.max_new_tokens} is over this deployment's limit of "
                f"{self.max_new_tokens}"
            )

    def check_prompt(self, tokens: int, chat: bool = False, images: str = "") -> None:
        """images: what the prompt's images take of it, where that is worth saying
        (Pipeline.image_share)."""
        if self.max_prompt_tokens is not None and tokens > self.max_prompt_tokens:
            what = "the conversation with this question is" if chat else "the prompt is"
            fix = "; start a new chat" if chat else ""
            raise (ChatFull if chat else PromptTooLong)(
                f"{what} {tokens} tokens{images}, over this deployment's limit of "
                f"{self.max_prompt_tokens}{fix}"
            )


def _check_limit(name: str, value: Any, none_means: str) -> None:
    """A limit is a positive number (whole, but for the time limit), or None."""
    whole = name != "timeout_s"
    kind = numbers.Integral if whole else numbers.Real
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, kind) or not value > 0
    ):
        raise LlavaEdgeError(
            f"the limit {name} must be a positive {'integer' if whole else 'number'} "
            f"(or None: {none_means}), got {value!r}"
        )


class Pipeline:
    """A loaded model that answers questions about images.

    Threads: one Pipeline may be shared by any number of threads. Each request keeps its own KV
    cache and random generator; the onnxruntime sessions run concurrent requests safely and the
    image-feature cache is locked. A ChatSession belongs to one thread at a time.
    """

    def __init__(
        self, model_dir: Path, manifest: Manifest, backend: Any, limits: Limits | None = None
    ):
        self.model_dir = model_dir
        self.limits = limits or Limits()
        self.manifest = manifest
        self.backend = backend
        self.codec = TextCodec(
            model_dir / manifest.tokenizer,
            manifest.tokens,
            manifest.num_image_tokens,
            max_tokens=self.max_context,
        )
        self.table = _load_table(model_dir / manifest.embeddings, manifest)
        self.newline = load_newline(model_dir, manifest)  # AnyRes models only
        self._features: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._encoding: dict[str, threading.Event] = {}  # images being encoded, set when done
        self.stats = {"vision_runs": 0, "feature_cache_hits": 0}
        self.closed = False

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        backend: str = "onnxruntime",
        providers: str | list[str] | None = None,
        threads: int | None = None,
        verify_files: bool | None = None,
        limits: Limits | None = None,
        engine_dir: str | os.PathLike | None = None,
        cuda_graph: bool = False,
        graph_form: str = "auto",
        session_cache: bool = True,
        background: bool = False,
    ) -> Pipeline:
        """Open a model dir written by `llava-edge export` (or quantize).

        backend: 'onnxruntime' (providers 'cpu', 'cuda', 'tensorrt') or 'tensorrt' (native
        engines from `llava-edge build`, which refuses providers, threads and graph_form:
        onnxruntime's). verify_files: True checks every file's sha256 against the manifest,
        False only sizes, None (default) hashes only files new to this machine.
        limits: what one request may ask for (image pixels, prompt tokens, new tokens, time).
        engine_dir: the native engines to load (default: those recorded for this GPU), or the
        onnxruntime TensorRT provider's engine cache. cuda_graph: replay the native backend's
        decode step as a CUDA graph (the tensorrt backend only). graph_form: which form of the
        graphs onnxruntime runs, 'auto' (the fused forms on the CPU where the model dir has
        them), 'fused' or 'standard'. session_cache: keep
        onnxruntime's optimized CPU graphs in the user cache dir, so later loads skip that work
        (llava_edge.runtime.session_cache). background: return once the manifest, files,
        tokenizer and embedding table are checked and the graphs have started to open (the
        onnxruntime backend): the app goes on with its own start while they load, the first call
        that needs a graph waits for it (a request's image runs while the decoder still opens),
        and a graph that fails to load raises at that call or at `wait_loaded()`.
        """
        if threads is not None:  # onnxruntime takes 0 and negatives silently, as its default
            threads = whole_number("threads", threads, 1, "a whole number, 1 or more")
        for name, value in (
            ("cuda_graph", cuda_graph),
            ("session_cache", session_cache),
            ("background", background),
        ):
            true_or_false(name, value)
        if verify_files is not None:
            true_or_false("verify_files", verify_files, "True, False or None")
        if cuda_graph and backend != "tensorrt":
            raise LlavaEdgeError(
                "cuda_graph replays the tensorrt backend's decode step; onnxruntime has none: "
                "drop it, or use backend='tensorrt'"
            )
        if limits is not None and not isinstance(limits, Limits):
            raise LlavaEdgeError(
                f"limits must be a Limits(...) (llava_edge.runtime.Limits), got "
                f"{type(limits).__name__}"
            )
        model_dir = _path("model_dir", model_dir)
        if engine_dir is not None:
            _path("engine_dir", engine_dir)
        manifest = Manifest.load(model_dir)
        manifest.check_files(model_dir, hashes=None if verify_files is None else bool(verify_files))
        if backend == "onnxruntime":
            from llava_edge.runtime.onnx_backend import OnnxBackend

            engine = OnnxBackend(
                model_dir,
                manifest,
                providers=providers,
                threads=threads,
                engine_dir=engine_dir,
                graph_form=graph_form,
                session_cache=session_cache,
                background=background,
            )
        elif backend == "tensorrt":
            if providers:
                raise LlavaEdgeError(
                    "providers (--provider) are onnxruntime's; the tensorrt backend runs its own "
                    "engines: drop them, or use --backend onnxruntime"
                )
            if threads is not None:
                raise LlavaEdgeError(
                    "threads (--threads) are onnxruntime's CPU threads; the tensorrt backend runs "
                    "its engines on the GPU: drop them, or use --backend onnxruntime"
                )
            if background:
                raise LlavaEdgeError(
                    "background loading is for the onnxruntime backend; load the TensorRT "
                    "backend without it"
                )
            if graph_form != "auto":
                raise LlavaEdgeError(
                    f"graph_form ({graph_form!r}) picks the onnxruntime graphs to run; the "
                    "tensorrt backend runs its engines: drop it, or use backend='onnxruntime'"
                )
            from llava_edge.runtime.tensorrt.backend import TensorRTBackend

            engine = TensorRTBackend(
                model_dir,
                manifest,
                engine_dir=engine_dir,
                cuda_graph=bool(cuda_graph),
                verify_files=verify_files,
            )
        else:
            raise LlavaEdgeError(f"unknown backend {backend!r}; choose 'onnxruntime' or 'tensorrt'")
        try:
            return cls(model_dir, manifest, engine, limits)
        except BaseException:
            engine.close()  # graphs still opening in the background stop there
            raise

    def wait_loaded(self) -> None:
        """Block until every graph is open (after `load(..., background=True)`); raises the
        error of a graph that failed to load."""
        self._check_open()
        self.backend.wait_loaded()

    @property
    def max_images_per_prompt(self) -> int:
        """How many images' tokens fit in the context at once (at least one). A prompt may hold
        several images as transformers' LLaVA models take them (each placeholder filled with its
        image's features, in order); LLaVA-1.5 itself was trained with one per conversation.
        LLaVA-OneVision reads each of several untiled (runtime/anyres.py), in fewer tokens than
        its largest tiled image."""
        return max(1, self.max_context // each_image_tokens(self.manifest, 2))

    def image_share(self, ids: list[int]) -> str:
        """What a prompt's AnyRes images take of its tokens, for a message refusing it: their
        tokens grow with their size, so a smaller image is the way to a shorter prompt (on
        LLaVA-OneVision, where each of several is untiled whatever its size, fewer images are).
        Empty where the images are of one size whatever they show."""
        taken = ids.count(self.manifest.tokens.image_token_id)
        if not taken or self.manifest.image.anyres is None:
            return ""
        if untiles_several(self.manifest.image):
            return (
                f" ({taken} of them its images': fewer images, or a smaller one alone, take fewer)"
            )
        return f" ({taken} of them its images': a smaller image takes fewer)"

    def images_that_fit(
        self, prompt: str, raw: bool = False, system: str | None = None, *, smallest: bool = False
    ) -> int:
        """How many images this question can hold and leave room for an answer within the
        context and the prompt limit: any number of them up to it fits, each of the largest
        size (0: not even one does). smallest=True counts images of the fewest tokens instead
        (with AnyRes, the base image's alone): how many some images can fit, where the largest
        count is what any images can. LLaVA-OneVision reads one image alone tiled and each of
        several untiled, in fewer tokens: where one large image alone does not fit, this is 0,
        though two or more, each untiled, may."""
        self._check_open()
        _check_text(prompt)
        raw = self._raw({"raw": raw})
        template = self._template(system, raw)
        room = self.max_context - 1
        if self.limits.max_prompt_tokens is not None:
            room = min(room, self.limits.max_prompt_tokens)
        fit = 0
        # A prompt that places its own images holds as many as it has placeholders, or none.
        placed = raw or IMAGE_PLACEHOLDER in prompt
        counts = (
            [prompt.count(IMAGE_PLACEHOLDER)]
            if placed
            else range(1, self.max_images_per_prompt + 1)
        )
        for count in counts:
            text = prompt if raw else user_turn(template, prompt, count, True)
            each = each_image_tokens(self.manifest, count, smallest)
            ids = self.codec.encode(text, first=True, image_tokens=[each] * count, raw=raw)
            if len(ids) > room:
                break
            fit = count
        return fit

    # ---- one-shot questions --------------------------------------------------------------

    def generate(self, image: Images, prompt: str, **options: Any) -> str:
        """The answer's text. `image` may be a list (or deque) of images (in the order of their
        `<image>` placeholders, or put before the question). Options are GenerationConfig's
        fields, plus raw=True to send the prompt as written (no chat template; it must then hold
        one `<image>` per image given), system (a system prompt in place of the template's,
        written as the template writes one) and timeout_s, this call's time limit (see
        `answer`)."""
        return self.answer(image, prompt, **options).text

    def answer(self, image: Images, prompt: str, **options: Any) -> Answer:
        """Like generate, with token ids, finish reason and timings.

        max_new_tokens is a most, on every entry point of the library: an answer that reaches
        the end of the model's context stops there (finish reason 'length'), where `serve`
        refuses a max_tokens past the context, as OpenAI's API does (an HTTP client is told why
        it cannot have what it asked for; an app reads the finish reason).

        timeout_s (every entry point takes it: generate, answer, stream, generate_batch, a chat
        and each of its turns, BatchEngine.submit): this call's time limit in seconds, in place
        of the pipeline's `Limits.timeout_s` for this call only, tighter or looser (None: the
        pipeline's; math.inf: none). Past it the call raises TimedOut, as past the pipeline's.
        """
        return self._stream(image, prompt, options).read()

    def _answer_prepared(
        self, pixels: list[ImagePixels], prompt: str, timer: Timer, **options: Any
    ) -> Answer:
        """`answer` about images image_pixels prepared: a watch of the last K frames prepares
        each frame once, not once for each of the K answers it is part of. timer: the request's,
        started before the newest image was prepared, so that its preparing counts in the
        answer's timings and time limit as it does in `answer`'s."""
        return self._stream(None, prompt, options, prepared=pixels, timer=timer).read()

    def stream(self, image: Images, prompt: str, **options: Any) -> TextStream:
        """The answer as text pieces, each whole UTF-8 characters, as soon as they are decoded.

        Iterate it; afterwards its `.answer` holds ids, finish reason and timings. The image and
        prompt are checked (and the image encoded) at once, so bad input fails here.
        """
        return self._stream(image, prompt, options)

    def generate_batch(
        self, requests: Iterable[tuple[Images, str]], **options: Any
    ) -> list[Answer]:
        """Several (image, prompt) pairs decoded together; each answers as it would alone.

        Each prompt is prefilled alone into a row of one KV cache and the rows decode together
        (runtime/batching.py, on this thread), on either backend; past the rows the backend
        takes (TensorRT engines' --max-batch) or BATCH_ROWS (8: every row holds as much KV
        cache as the longest conversation), requests wait for a free row. A BatchEngine of your
        own sets its rows (`max_batch`).

        Each request is read (its image decoded) and then runs while the next is read; its time
        limit counts from its reading, its wait for a row included.

        A request that fails (its image unreadable or over a limit, its prompt too long, its
        time limit passed) stops no other: every request runs
        to its end, then BatchFailed is raised, its message naming the failed requests and why,
        its `results` every request's Answer or exception in order. It is also an instance of
        each failed request's own error type (TimedOut, TooLarge, ...), as a single request
        would raise it. Options are every request's: a bad one is refused before any runs.
        """
        from llava_edge.runtime.batching import BatchEngine

        self._check_open()
        if isinstance(requests, str | bytes) or not isinstance(requests, Iterable):
            requests = [requests]  # refused just below, as one malformed request
        requests = list(requests)
        malformed = [
            i
            for i, one in enumerate(requests)
            if not isinstance(one, list | tuple) or len(one) != 2
        ]
        if malformed:
            one = requests[malformed[0]]
            what = type(one).__name__ + (f" of {len(one)}" if isinstance(one, list | tuple) else "")
            raise LlavaEdgeError(
                "generate_batch takes a list of (image, prompt) pairs (image None for none); "
                f"request {malformed[0]} is {what}"
            )
        if not requests:
            return []
        self._check_options(options)  # every request's: a bad one is refused before any runs
        rows = min(len(requests), self.backend.max_batch or BATCH_ROWS)  # the rest wait
        engine = BatchEngine(
            self, max_batch=rows, max_queue=len(requests), prefix_cache_mb=0, start=False
        )
        results: list[Answer | Exception | None] = []
        handles = {}
        for i, (image, prompt) in enumerate(requests):
            try:
                handles[i] = engine.submit(image, prompt, **options)
                results.append(None)
            except Exception as e:  # this request's image or prompt: the others still run
                results.append(e)
            # the requests read so far run while the next image is read: a time limit counts
            # from its request's start, not from the last image's
            engine.run_step()
        engine.run_until_idle()
        for i, handle in handles.items():
            results[i] = handle.error or handle.answer
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            raise batch_failed(results) from failures[0]
        return results

    def watch(
        self,
        source: str | os.PathLike | Iterable[Any],
        prompt: str,
        every_s: float = 1.0,
        **options: Any,
    ) -> Watch:
        """One answer per sampled frame of a video file, camera (/dev/videoN), RTSP/HTTP stream,
        pipe (/dev/stdin), image folder, picture file (one frame), or an app's own frames (any
        iterable of images, as a camera driver yields them), every `every_s` seconds; live
        sources never queue stale frames. Use it in a `with` block (or close() it): the source's
        reader stops when it ends.

        Options: frames (last K frames per prompt), changes_only, max_frames, live, timeout_s
        (seconds with no frame before the source counts as stalled), answer_timeout_s (each
        answer's time limit, in place of the pipeline's Limits.timeout_s), folder_fps,
        reconnect_s, follow (see llava_edge.runtime.watch), and the generation options of
        `answer`.
        Video needs PyAV (`pip install 'llava-edge[video]'`).
        """
        from llava_edge.runtime.watch import watch

        return watch(self, source, prompt, every_s=every_s, **options)

    def chat(
        self,
        image: Images = None,
        history: list[tuple[str, str]] | None = None,
        system: str | None = None,
        **options: Any,
    ) -> ChatSession:
        """A multi-turn conversation about an image (or a list of them, all with the first
        question); each turn reuses the cache of the last, and may bring new images of its own
        (`ask(question, image=frame)`).

        `options` (GenerationConfig's fields, and timeout_s) apply to every turn; a turn may
        override them. The images are loaded and checked here, so a bad one fails at once, and
        encoded by the first turn: a turn's time limit counts from that turn, and the first
        turn's counts the images' encoding, as a single request's does (a turn that times out
        keeps the features, so the question asked again does not encode them twice).
        history: earlier (question, answer) turns to go on from, rendered as if this session had
        asked them and the model had given those answers (each closed by its end of sequence).
        system: the conversation's system prompt, in place of the template's.
        """
        return ChatSession(self, image, options, history or [], system)

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the sessions; the pipeline refuses requests afterwards."""
        self.closed = True
        self.backend.close()
        with self._lock:
            self._features.clear()

    def __enter__(self) -> Pipeline:
        return self

    def __reduce__(self) -> NoReturn:
        """A Pipeline belongs to its process: its sessions cannot be sent to another (a spawned
        worker, a process pool), which would fail on some lock inside them; say what to do."""
        raise TypeError(
            "a Pipeline holds its process's loaded model and cannot be pickled (sent to another "
            "process): load the model dir in each worker process (Pipeline.load), or share one "
            "Pipeline between threads"
        )

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the steps of a request ------------------------------------------------------------

    @property
    def _pad_id(self) -> int:
        tokens = self.manifest.tokens
        if tokens.pad_token_id is not None:
            return tokens.pad_token_id
        return tokens.eos_token_ids[0] if tokens.eos_token_ids else 0  # fills finished rows only

    def _stream(
        self,
        image: Images,
        prompt: str,
        options: dict,
        prepared: list[ImagePixels] | None = None,
        timer: Timer | None = None,
    ) -> TextStream:
        """prepared: the images as image_pixels made them, in place of `image`; timer: the
        request's, where it started before they were made (see _answer_prepared)."""
        raw, system = self._raw(options), self._system(options)
        timeout_s = self._timeout(options.pop("timeout_s", None))
        config = self._config(options)
        timer = timer or Timer()
        ids, features = self._prepare(image, prompt, raw, system, prepared)
        timer.mark("vision")
        config = self._fit_context(config, len(ids), ids=ids)
        cache = self.backend.new_cache(1)
        return TextStream(
            self, cache, ids, ids, features, config, timer, timeout_s, start_position=0
        )

    def _check_open(self) -> None:
        if self.closed:
            raise LlavaEdgeError("this pipeline is closed; load the model dir again")

    def _prepare(
        self,
        image: Images,
        prompt: str,
        raw: bool,
        system: str | None,
        prepared: list[ImagePixels] | None = None,
    ) -> tuple[list[int], np.ndarray | None]:
        """Check the prompt, apply the template, encode it; run the vision encoder if needed.
        prepared: the images as image_pixels made them, in place of `image`."""
        self._check_open()
        pixels = (
            [self.image_pixels(one) for one in image_list(image)] if prepared is None else prepared
        )
        ids = self.prompt_ids(prompt, pixels, raw, system)
        return ids, self.pixel_features(pixels) if pixels else None

    def prompt_ids(
        self,
        prompt: str,
        image: ImagePixels | list[ImagePixels] | None,
        raw: bool = False,
        system: str | None = None,
    ) -> list[int]:
        """One question's ids: the chat template applied (unless raw; with `system` in place of
        its system prompt), each `<image>` expanded to its image's tokens, checked against the
        prompt limit."""
        self._check_open()
        _check_text(prompt)
        template = self._template(system, raw)
        images = pixels_list(image)
        placeholders = prompt.count(IMAGE_PLACEHOLDER)
        if placeholders > len(images):
            raise LlavaEdgeError(
                f"the prompt holds {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
                + (f"{len(images)} image(s) were given" if images else "no image was given")
                + ": give one image per placeholder"
            )
        if (raw or placeholders) and placeholders < len(images):
            raise LlavaEdgeError(
                f"{len(images)} image(s) were given but the prompt has "
                f"{placeholders or 'no'} {IMAGE_PLACEHOLDER} placeholder(s) to put them at: "
                "one per image"
            )
        if not images and not prompt.strip():
            raise LlavaEdgeError("the prompt is empty and there is no image: ask a question")
        text = prompt if raw else user_turn(template, prompt, len(images), True)
        ids = self.codec.encode(text, first=True, image_tokens=self.image_tokens(images), raw=raw)
        if not ids:  # a raw empty prompt on a model with no BOS token
            raise LlavaEdgeError("the prompt is empty: ask a question")
        self.limits.check_prompt(len(ids), images=self.image_share(ids))
        return ids

    def conversation_ids(
        self,
        turns: list[tuple[str, str | None]],
        image: ImagePixels | list[ImagePixels] | None = None,
        image_turn: int | list[int] | None = None,
        system: str | None = None,
    ) -> list[int]:
        """A whole conversation's ids: the rendered conversation encoded as one text, as
        training encodes it and as a ChatSession that had asked these questions holds them.

        turns: (question, answer) pairs; the last answer is None to leave the prompt open for
        the model. image: the conversation's images, in order; image_turn: the turn each goes
        with (one index for all of them, or one per image, never decreasing). system: replaces
        the template's system prompt.
        """
        ids = self._render(turns, image, image_turn, system)
        self.limits.check_prompt(len(ids), images=self.image_share(ids))
        return ids

    def _render(
        self,
        turns: list[tuple[str, str | None]],
        image: ImagePixels | list[ImagePixels] | None,
        image_turn: int | list[int] | None,
        system: str | None = None,
    ) -> list[int]:
        """conversation_ids without the prompt limit: a chat re-renders its finished turns with
        this, and the limit bounds what an answer is conditioned on, not the answer."""
        self._check_open()
        if not isinstance(turns, list | tuple) or any(
            not isinstance(turn, list | tuple) or len(turn) != 2 for turn in turns
        ):
            raise LlavaEdgeError("a conversation is a list of (question, answer) pairs")
        if not turns:
            raise LlavaEdgeError("the conversation has no turns")
        images = pixels_list(image)
        one_turn = isinstance(image_turn, numbers.Integral)  # numpy's too: robot code holds them
        if image_turn is None or one_turn:
            image_turns = [] if image_turn is None else [int(image_turn)] * len(images)
        else:
            image_turns = list(image_turn)
        if one_turn and not images or len(image_turns) != len(images):
            raise LlavaEdgeError(
                "give the conversation's images and the turns they go with together"
            )
        if image_turns != sorted(image_turns) or not all(0 <= t < len(turns) for t in image_turns):
            raise LlavaEdgeError(
                f"image turns {image_turns} must be turns of the conversation, in order"
            )
        template = self._template(system)
        text = ""
        for i, (question, answer) in enumerate(turns):
            _check_text(question, f"question of turn {i + 1}")
            given = image_turns.count(i)
            placeholders = question.count(IMAGE_PLACEHOLDER)
            if placeholders not in (0, given):
                raise LlavaEdgeError(
                    f"turn {i + 1}'s question holds {placeholders} {IMAGE_PLACEHOLDER} "
                    f"placeholder(s) for {given} image(s): one placeholder per image, or none"
                )
            text += user_turn(template, question, given, first=i == 0, answered=answer is not None)
            if answer is None:
                if i != len(turns) - 1:
                    raise LlavaEdgeError(f"turn {i + 1} has no answer but is not the last")
                continue
            _check_text(answer, f"answer of turn {i + 1}")
            if IMAGE_PLACEHOLDER in answer:
                raise LlavaEdgeError(
                    f"turn {i + 1}'s answer holds an {IMAGE_PLACEHOLDER} placeholder"
                )
            text += answer_text(template, answer)
        return self.codec.encode(text, first=True, image_tokens=self.image_tokens(images))

    def image_pixels(self, image: ImageInput) -> ImagePixels:
        """The image loaded (within the pixel limit) and preprocessed for the vision encoder (on
        LLaVA-OneVision, each form's pixels when a prompt first reads the image in it)."""
        self._check_open()
        loaded = load_image(image, self.limits.max_image_pixels)
        if loaded is image and untiles_several(self.manifest.image):
            # its untiled form is made from it when a prompt of several asks: from this picture,
            # not from what the caller draws into its own image later (a camera's buffer)
            loaded = loaded.copy()
        return image_pixels(loaded, self.manifest.image)

    def image_tokens(self, image: ImagePixels | list[ImagePixels] | None) -> list[int] | None:
        """How many image tokens each image takes in a prompt of these images (None without
        one): LLaVA-OneVision reads each of several untiled (runtime/anyres.py)."""
        images = pixels_list(image)
        if not images:
            return None
        spec, count = self.manifest.image, self.manifest.num_image_tokens
        several = len(images) > 1
        return [image_token_count(one, spec, count, several) for one in images]

    def image_features(self, image: ImageInput) -> np.ndarray:
        """Projected image features [N, hidden], one per image token; a repeated image comes
        from the cache (the array is the cache's, read-only: copy it to change it). With AnyRes,
        N depends on the image's size (see runtime/anyres.py)."""
        return self.pixel_features(self.image_pixels(image))

    def pixel_features(self, image: ImagePixels | list[ImagePixels]) -> np.ndarray:
        """Features of preprocessed images, in order, as one prompt of them reads them (each of
        several untiled on LLaVA-OneVision), each from the cache when it came before."""
        images = prompt_forms(pixels_list(image))
        if len(images) == 1:
            return self._features_of(images[0])
        return np.concatenate([self._features_of(one) for one in images])

    def _features_of(self, image: ImagePixels) -> np.ndarray:
        key = image.key
        while True:  # threads asking about one new image at once: one encodes, the rest wait
            self._check_open()
            with self._lock:
                if key in self._features:
                    self._features.move_to_end(key)
                    self.stats["feature_cache_hits"] += 1
                    return self._features[key]
                encoding = self._encoding.get(key)
                if encoding is None:
                    encoding = self._encoding[key] = threading.Event()
                    break
            if running_exit():  # the thread encoding it may be parked at exit, never to finish
                return self._encode(image)
            encoding.wait()  # then the cache holds it, or that encode failed and this one tries
        try:
            return self._encode(image)
        finally:
            with self._lock:
                del self._encoding[key]
            encoding.set()

    def _encode(self, image: ImagePixels) -> np.ndarray:
        key = image.key
        encoded = self.backend.encode_image(image.pixels)
        if image.untiled:
            features = untiled_embeds(encoded, self.newline)
        else:
            features = image_embeds(encoded, image.size, self.manifest.image, self.newline)
        (expected,) = self.image_tokens(image)
        if len(features) != expected:
            raise LlavaEdgeError(
                f"the vision encoder gave {len(features)} image features where the prompt holds "
                f"{expected} image tokens: the manifest does not match the graphs; re-export the "
                "model"
            )
        features.flags.writeable = False  # handed out as it is cached: none may change it
        with self._lock:
            self.stats["vision_runs"] += 1
            self._features[key] = features
            # FEATURE_CACHE_SIZE pictures, and beyond them as many as one prompt holds (a watch
            # over its last K frames re-encodes none): the context's worth of features, not
            # max_images_per_prompt pictures, which counts LLaVA-OneVision's untiled forms while
            # its tiled ones take up to ten times their tokens
            while len(self._features) > FEATURE_CACHE_SIZE and (
                sum(map(len, self._features.values())) > self.max_context
            ):
                self._features.popitem(last=False)
        return features

    @staticmethod
    def _raw(options: dict) -> bool:
        """Take the `raw` option out of a call's options; a string ("false" from a config file)
        would read as true and send the prompt without the chat template."""
        return true_or_false("raw", options.pop("raw", False))

    def _check_options(self, options: dict) -> None:
        """Refuse a call's bad options now, leaving them in place: those of a batch or a watch,
        taken by each of its requests, are refused once, before any runs."""
        checked = dict(options)
        raw, system = self._raw(checked), self._system(checked)
        self._template(system, raw)
        self._timeout(checked.pop("timeout_s", None))
        self._config(checked)

    @staticmethod
    def _system(options: dict) -> str | None:
        """Take the `system` option out of a call's options."""
        return options.pop("system", None)

    def _template(self, system: str | None, raw: bool = False) -> TemplateSpec:
        """The chat template, with `system` as its system prompt where one is given."""
        if system is None:
            return self.manifest.template
        if raw:
            raise LlavaEdgeError(
                "a system prompt goes into the chat template, which raw=True leaves out: write "
                "it into the raw prompt, or drop raw"
            )
        _check_text(system, "system prompt")
        if IMAGE_PLACEHOLDER in system:
            raise LlavaEdgeError(f"the system prompt holds an {IMAGE_PLACEHOLDER} placeholder")
        return with_system(self.manifest.template, system)

    def _timeout(self, timeout_s: Any) -> float | None:
        """A call's time limit: its own `timeout_s` if it gave one, else the pipeline's."""
        _check_limit("timeout_s", timeout_s, "the pipeline's Limits.timeout_s")
        return self.limits.timeout_s if timeout_s is None else timeout_s

    def _config(self, options: dict) -> GenerationConfig:
        known = {f.name for f in fields(GenerationConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LlavaEdgeError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        config = GenerationConfig(**options)
        if "max_new_tokens" not in options and self.limits.max_new_tokens:
            config.max_new_tokens = min(config.max_new_tokens, self.limits.max_new_tokens)
        config.validate()
        self.limits.check_options(config)
        return config

    @property
    def max_context(self) -> int:
        """The longest conversation (prompt and answer) this pipeline runs."""
        # TensorRT engines may be built for less than the model's context
        return getattr(self.backend, "max_context", self.manifest.text.max_context)

    def _fit_context(
        self,
        config: GenerationConfig,
        prompt_len: int,
        used: int = 0,
        conversation: int = 0,
        ids: list[int] | None = None,
    ) -> GenerationConfig:
        """Fail on a prompt that cannot fit; shorten max_new_tokens to what is left (the
        library's answers stop at the context's end; serve checks first, and refuses).
        conversation: a chat's tokens before this question, in the cache (`used`) or not (a
        history still to feed): a question that does not fit after them is ChatFull. ids: the
        prompt's, to say what its images take of it where it does not fit (image_share)."""
        limit = self.max_context
        room = limit - used - prompt_len
        if room < 1 and conversation:
            raise ChatFull(
                f"this question ({used + prompt_len - conversation} tokens) does not fit after "
                f"the conversation's {conversation}: the model's context is {limit}; start a new "
                "chat"
            )
        if room < 1:
            raise PromptTooLong(
                f"the prompt is {prompt_len} tokens{self.image_share(ids or [])}, but the model's "
                f"context is {limit}; shorten it"
            )
        if config.max_new_tokens > room:
            config = GenerationConfig(**{**config.__dict__, "max_new_tokens": room})
        return config


class ChatSession:
    """A conversation about an image (or several), each turn reusing the turns' KV cache; a
    turn may bring new images, which count with it (rolled back with it, if it is).

    A turn counts once it finishes: its stream was iterated to the end (the answer ended with
    eos, a stop string or its length limit; `ask` always finishes). A turn that does not finish
    (its stream closed or dropped before the end, a timeout, an error while decoding) is rolled
    back whole: the session answers exactly as if the question had never been asked, so the next
    question may follow at once. Its KV cache keeps at most what it held before: a turn that
    re-reads the conversation (after a history, a cut answer or one holding the image token, or
    a LLaVA-OneVision image read untiled once a second arrives) gives up the part it re-reads
    once it runs (not where it is refused), and the next turn feeds that part again. Starting a
    turn while an earlier turn's stream is still open rolls the earlier one back first (or is
    refused while another thread is inside that stream's decode step); iterating that stream
    afterwards is an error.

    Not thread-safe: use one session per thread.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        image: Images,
        options: dict,
        history: list[tuple[str, str]],
        system: str | None = None,
    ):
        pipeline._check_open()
        self.template = pipeline._template(system)  # a bad system prompt fails here
        self.system = system
        _turn_options(pipeline, options)  # bad options fail here, not at the first turn
        if not isinstance(history, list | tuple) or any(
            not isinstance(turn, list | tuple) or len(turn) != 2 or turn[1] is None
            for turn in history
        ):
            raise LlavaEdgeError("a chat's history is a list of (question, answer) pairs")
        self.pipeline = pipeline
        self.options = options
        # loaded and checked here, so a bad image fails at once (several, as one prompt holds
        # them: LLaVA-OneVision pads each to a square); encoded by the first turn
        self.pixels = [pipeline.image_pixels(one) for one in image_list(image)]
        check_several([one.size for one in self.pixels], pipeline.manifest.image)
        self.image_turns = [0] * len(self.pixels)  # the turn each image came with
        # the last features fed and the keys of the images they are of: a turn that failed,
        # asked again, does not encode them twice
        self.features: tuple[list[str], np.ndarray] | None = None
        self.cache = pipeline.backend.new_cache(1)
        # every id in the conversation, the last answer's last one too
        self.ids: list[int] = (
            pipeline.conversation_ids(
                history, self.pixels, image_turn=0 if self.pixels else None, system=system
            )
            if history
            else []
        )
        if len(self.ids) > pipeline.max_context:
            raise PromptTooLong(
                f"the chat's history is {len(self.ids)} tokens, over the model's context of "
                f"{pipeline.max_context}; keep fewer or shorter turns"
            )
        self.fed = 0  # how many of `ids` are in the cache
        self.history_closed = bool(history)  # `ids` end with a history answer's whole end marker
        self.turns: list[tuple[str, str]] = [tuple(turn) for turn in history]  # as shown
        self._open: weakref.ref[TextStream] | None = None  # the latest turn's stream

    def ask(self, prompt: str, image: Images = None, **options: Any) -> str:
        """The answer to one more question; the turn counts, as it is read to its end (one
        that times out or fails is rolled back, as any unfinished turn is). image: new images
        (a robot's next frame) this question brings, put before it as the first question's are;
        their reading and encoding count in the turn's time limit."""
        return self._turn(prompt, image, {**self.options, **options}).read().text

    def stream(self, prompt: str, image: Images = None, **options: Any) -> TextStream:
        """One more question (with new images, as `ask` takes them), its answer as text pieces;
        the turn counts once it is exhausted."""
        return self._turn(prompt, image, {**self.options, **options})

    def _turn(self, prompt: str, image: Images, options: dict) -> TextStream:
        pipe = self.pipeline
        pipe._check_open()
        earlier = self._open() if self._open is not None else None
        # an unfinished earlier turn is rolled back before this one starts; one that another
        # thread is reading now would roll back under this turn, so it is refused
        if earlier is not None and not earlier._close_now():
            raise LlavaEdgeError(
                "another thread is reading this chat's previous answer: a chat belongs to one "
                "thread at a time; let that turn end first, or give each thread its own chat"
            )
        _check_text(prompt)
        timeout_s, config = _turn_options(pipe, options)
        timer = Timer()  # the turn's time limit counts from here, its images' encoding too
        first = not self.ids
        new_pixels = [pipe.image_pixels(one) for one in image_list(image)]
        # the images as the conversation with this question reads them, made before the session
        # changes: LLaVA-OneVision reads an image untiled once a second joins it
        forms = prompt_forms(self.pixels + new_pixels)
        reread = self._reread(forms)
        brought = self.pixels + new_pixels if first else new_pixels  # this question's images
        if not prompt.strip() and not brought:
            raise LlavaEdgeError("the question is empty: ask something")
        placeholders = prompt.count(IMAGE_PLACEHOLDER)
        if placeholders and placeholders != len(brought):
            raise LlavaEdgeError(
                f"the question holds {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for the "
                f"{len(brought)} image(s) it brings: one placeholder per image, or none"
            )
        text = user_turn(self.template, prompt, len(brought), first)
        held, image_id, fed = self.ids, pipe.manifest.tokens.image_token_id, self.fed
        if first:
            new_ids = pipe.prompt_ids(prompt, brought, system=self.system)
        elif self.history_closed or reread is not None:
            held, new_ids = self._after_rendered(prompt, new_pixels, reread)
            fed = min(fed, len(held))  # the cache gives up the rest once the turn runs
        else:  # the images held read as before
            new_ids = self._later_turn_ids(text, forms[len(self.pixels) :])
        # the image tokens the cache holds: none of them where a turn that re-read the images
        # cut it back before them and was rolled back
        cached = held[:fed].count(image_id)
        pending = held[fed:] + new_ids  # the last answer's final token was never fed
        try:
            pipe.limits.check_prompt(len(held) + len(new_ids), chat=True)
            config = pipe._fit_context(config, len(pending), fed, len(held))
        except ChatFull:
            self._fits_a_new_chat(prompt, self.pixels + new_pixels, config)
            raise
        if fed < self.fed:  # refused above, the turn would have left the cache as it stood
            self.cache.truncate(fed)
            self.fed = fed
        features = self._features_to_feed(forms, cached)
        if features is not None:
            timer.mark("vision")
        stream = TextStream(
            pipe,
            self.cache,
            pending,
            held + new_ids,
            features,
            config,
            timer,
            timeout_s,
            start_position=self.fed,
            turn=_Turn(self, prompt, new_pixels),
        )
        self._open = weakref.ref(stream)
        return stream

    def _reread(self, forms: list[ImagePixels]) -> int | None:
        """Where the held conversation stops being what the cache may keep, where the images
        it holds read otherwise with this turn's (`forms`): at its first image token, before
        any image's features; None where they read as before."""
        held = prompt_forms(self.pixels)
        if not self.ids or all(one.key == was.key for one, was in zip(forms, held, strict=False)):
            return None
        image_id = self.pipeline.manifest.tokens.image_token_id
        return self.ids.index(image_id) if image_id in self.ids else 0

    def _features_to_feed(self, forms: list[ImagePixels], cached: int) -> np.ndarray | None:
        """Features of the image tokens still to feed: those of the conversation's images
        (`forms`, as it reads them) past the first `cached` image tokens, which the cache
        holds."""
        pipe = self.pipeline
        counts = pipe.image_tokens(forms) or []
        first = skipped = 0
        while first < len(forms) and skipped + counts[first] <= cached:
            first, skipped = first + 1, skipped + counts[first]
        if first == len(forms):
            return None
        keys = [one.key for one in forms[first:]]
        if self.features is None or self.features[0] != keys:
            self.features = (keys, pipe.pixel_features(forms[first:]))
        return self.features[1][cached - skipped :]

    def _fits_a_new_chat(
        self, prompt: str, images: list[ImagePixels], config: GenerationConfig
    ) -> None:
        """Raise PromptTooLong (shorten it) for a question a new chat about the chat's images
        could not hold either, where ChatFull's advice, to start a new chat, would lose the
        conversation for nothing."""
        pipe = self.pipeline
        ids = pipe.prompt_ids(prompt, images, system=self.system)
        pipe._fit_context(config, len(ids), ids=ids)

    def _after_rendered(
        self, prompt: str, images: list[ImagePixels], reread: int | None = None
    ) -> tuple[list[int], list[int]]:
        """The conversation's ids before a turn that follows turns the chat holds as rendered (a
        history, an answer cut by a stop string), and the ids the turn adds: the whole
        conversation rendered again, as serve renders it. The ids held before are those the two
        share: the tokenizer may read the end of the last answer together with this turn
        (llava-hf's answers end with a space, read with the next "USER:" as "▁USER:"), and
        none past `reread` (_reread), where the image tokens are the same but their features
        are not. The cache gives up what it holds past them when the turn runs."""
        pipe = self.pipeline
        whole = pipe._render(
            [*self.turns, (prompt, None)],
            self.pixels + images,
            self.image_turns + [len(self.turns)] * len(images),
            self.system,
        )
        keep = common_prefix(self.ids, whole)
        if reread is not None:
            keep = min(keep, reread)
        return whole[:keep], whole[keep:]

    def _later_turn_ids(self, text: str, images: list[ImagePixels]) -> list[int]:
        """The ids a turn adds after an answer the model generated, as encoding the whole
        conversation as one text gives them (what training saw): the answer's end marker and
        this turn are encoded together, since a tokenizer reads a turn's first word differently
        at the start of a text (the Llama tokenizer's "▁USER" there, "USER" after "</s>"). What
        the conversation already holds of the end marker is not fed twice: up to the model's
        end-of-sequence token after an answer that ended with one, all of it where that token
        stands for an end marker that holds none; none after an answer cut short, nor of an end
        marker the tokenizer reads together with what follows (llava-hf's space, read with the
        next "USER:" as "▁USER:"), where dropping its tokens would drop the turn's first."""
        pipe = self.pipeline
        end = pipe.manifest.template.answer_end
        ids = pipe.codec.encode(end + text, first=False, image_tokens=pipe.image_tokens(images))
        head = pipe.codec.encode(end, first=False)
        last = self.ids[-1]
        if last not in pipe.manifest.tokens.eos_token_ids:
            held = 0
        elif last in head:
            held = head.index(last) + 1
        else:
            held = len(head) if ids[: len(head)] == head else 0
        return ids[held:]


class _Turn:
    """What a chat turn's stream does to its session: commit when it finishes, else roll back.

    The stream's generator holds this, not the session's stream, so that dropping a stream frees
    it at once (and rolls it back) instead of waiting for the cycle collector.
    """

    def __init__(self, session: ChatSession, prompt: str, images: list[ImagePixels]):
        self.session = session
        self.prompt = prompt
        self.images = images  # the new images it brings, the session's once it counts
        self.fed = session.fed  # where the cache stood before the turn

    def commit(self, ids: list[int], answer: list[int], text: str, stopped: bool) -> None:
        """The turn counts: `ids` were fed for it, `answer` generated. An answer cut by a stop
        string is held as it is shown, not as it was generated (the stop string and what came
        with it in its last token): the conversation is re-rendered from the shown turns, as a
        server re-renders what its client sends back, and the cache is kept up to where the two
        agree. So is every answer where the template writes a past answer's header otherwise
        than a new one's (answered_assistant): the next turn feeds the answer again after the
        past header; and an answer holding the image token, which its text does not show and
        which a next turn would read as one of the images' slots. Where an answer spells out an
        image placeholder, which its re-rendered text would read as an image, or the model's
        video placeholder, which a prompt may not hold, the turn is held as generated."""
        session = self.session
        image_id = session.pipeline.manifest.tokens.image_token_id
        rendered = stopped or session.template.answered_assistant is not None or image_id in answer
        ids = ids + answer
        turns = [*session.turns, (self.prompt, text)]
        pixels = session.pixels + self.images
        image_turns = session.image_turns + [len(session.turns)] * len(self.images)
        spelled = [IMAGE_PLACEHOLDER, session.pipeline.codec.video_placeholder]
        if not rendered or any(p and p in answer for _, answer in turns for p in spelled):
            session.ids, session.fed, session.history_closed = ids, session.cache.length, False
        else:
            pipe = session.pipeline
            shown = pipe._render(turns, pixels, image_turns, session.system)
            agree = common_prefix(ids[: session.cache.length], shown)
            session.cache.truncate(agree)
            session.ids, session.fed, session.history_closed = shown, agree, True
        # last: a failure above leaves the session as it was. The images as the conversation
        # reads them: once it holds several (LLaVA-OneVision), their untiled forms alone, not
        # the tiled pixels and the pictures they were made from (tens of MB a camera frame)
        session.pixels, session.image_turns = prompt_forms(pixels), image_turns
        session.turns.append(turns[-1])

    def rollback(self) -> None:
        cache = self.session.cache
        cache.truncate(self.fed)
        cache.shrink()  # a long abandoned answer must not keep its buffers for the whole chat


class TextStream:
    """The text pieces of one answer, each whole UTF-8 characters, as soon as they are decoded.

    Iterate it once; afterwards `.answer` holds the finished Answer. `close()` abandons it (as
    dropping it does); a chat turn abandoned so is rolled back (see ChatSession).
    """

    def __init__(
        self,
        pipe: Pipeline,
        cache: Any,
        feed_ids: list[int],
        all_ids: list[int],
        features: np.ndarray | None,
        config: GenerationConfig,
        timer: Timer,
        timeout_s: float | None,
        start_position: int,
        turn: _Turn | None = None,
    ):
        self._outcome = _Outcome()  # shared with the generator, which holds no TextStream
        self._pieces = _pieces(
            pipe,
            cache,
            feed_ids,
            all_ids,
            features,
            config,
            timer,
            timeout_s,
            start_position,
            turn,
            self._outcome,
        )

    @property
    def answer(self) -> Answer | None:
        """The finished answer; None until the stream has been iterated to its end."""
        return self._outcome.answer

    def read(self) -> Answer:
        """The stream iterated to its end: the finished answer (what answer and ask return)."""
        for _ in self:
            pass
        return self._outcome.answer

    @property
    def _abandoned(self) -> bool:
        return self._outcome.abandoned

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            if self._abandoned:
                self._pieces.close()  # closed from another thread during a step: it ends here
                raise _abandoned()
            return next(self._pieces)
        except StopIteration:
            if self._abandoned:  # closed from another thread just before this step
                raise _abandoned() from None
            raise
        except ValueError:  # 'generator already executing': the closing thread rolls back
            if self._abandoned and self._pieces.gi_running:
                raise _abandoned() from None
            raise

    def close(self) -> None:
        """Stop decoding; an unfinished chat turn is rolled back. From another thread (a robot's
        control thread cancelling the answer being read) it returns at once: the reading thread
        ends after the step in progress, rolling back there."""
        self._close_now()

    def _close_now(self) -> bool:
        """Close; False if another thread is inside a step, which ends it at its next piece."""
        self._outcome.abandon()
        try:
            self._pieces.close()
        except ValueError:  # running in another thread
            if not self._pieces.gi_running:
                raise
            return False
        return True


class _Outcome:
    """How a stream ended, as its generator and its TextStream share it: with its answer, or
    abandoned first. Whichever comes first holds, so that a close() from another thread as the
    answer ends either leaves the answer and its chat turn whole or rolls the turn back, and the
    reader is told which."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answer: Answer | None = None
        self.abandoned = False

    def finish(self, answer: Answer) -> bool:
        """Record the answer, unless the stream was abandoned before it."""
        with self._lock:
            if not self.abandoned:
                self.answer = answer
            return not self.abandoned

    def abandon(self) -> None:
        """Mark the stream abandoned, unless its answer is already recorded."""
        with self._lock:
            self.abandoned = self.answer is None


def _turn_options(pipe: Pipeline, options: dict) -> tuple[float | None, GenerationConfig]:
    """A chat turn's time limit and generation config from its options. A chat's turns are the
    template's: a raw prompt has no turns to hold, so `raw` is refused saying so."""
    if "raw" in options:
        raise LlavaEdgeError(
            "a chat renders every turn with the model's chat template, so it takes no raw "
            "option; send a raw prompt through answer, stream or generate"
        )
    options = dict(options)
    return pipe._timeout(options.pop("timeout_s", None)), pipe._config(options)


def _path(name: str, value: object) -> Path:
    """A path option as Path; anything else refused naming the option (Path(None) raises
    Python's own TypeError, which names none)."""
    if not isinstance(value, str | os.PathLike):
        raise LlavaEdgeError(
            f"{name} must be a path (a str or os.PathLike), got {type(value).__name__}"
        )
    return Path(value)


def _abandoned() -> LlavaEdgeError:
    return LlavaEdgeError(
        "this answer was abandoned (closed, or a later turn of its chat was started); ask again"
    )


def _pieces(
    pipe: Pipeline,
    cache: Any,
    feed_ids: list[int],
    all_ids: list[int],
    features: np.ndarray | None,
    config: GenerationConfig,
    timer: Timer,
    timeout_s: float | None,
    start_position: int,
    turn: _Turn | None,
    outcome: _Outcome,
) -> Iterator[str]:
    """Decode one answer, yielding its text; on every exit that is not the end, roll back."""
    pipe._check_open()
    finished = False
    steps = None
    try:
        ids = np.asarray([feed_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        positions = positions_from_mask(mask, np.asarray([start_position]))
        embeds = embed(pipe.table, ids, pipe.manifest.tokens.image_token_id, [features])
        answer = AnswerText(pipe.codec, config.stop)
        generated: list[int] = []
        reason = "length"
        steps = decode_loop(
            pipe.backend,
            cache,
            pipe.table,
            embeds,
            mask,
            positions,
            config,
            pipe.manifest.tokens.eos_token_ids,
            pipe._pad_id,
            [np.asarray(all_ids)],
            timer,
            timeout_s,
        )
        for step in steps:
            token = int(step.tokens[0])
            generated.append(token)
            if len(generated) == 1:
                timer.mark("first_token")
            if step.finished[0]:
                reason = "eos"
                break
            piece = answer.push(token)
            if piece:
                yield piece
            if answer.stopped:
                break
        steps.close()
        piece = answer.finish()
        if piece:
            yield piece
        timer.mark("done")
        whole = Answer(
            answer.text,
            list(all_ids),
            generated,
            "stop" if answer.stopped else reason,
            timings(timer, len(generated)),
        )
        if not outcome.finish(whole):  # closed by another thread after the last step
            raise _abandoned()
        if turn is not None:
            turn.commit(all_ids, generated, answer.text, answer.stopped)
        finished = True
    finally:
        if steps is not None:
            steps.close()
        if turn is not None and not finished:
            turn.rollback()


def _load_table(path: Path, manifest: Manifest) -> np.ndarray:
    """The text embedding table, memory-mapped; its shape must be the manifest's."""
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LlavaEdgeError(f"cannot read the embedding table {path}: {e}") from None
    hidden = manifest.text.hidden_size
    if table.ndim != 2 or table.shape[1] != hidden:
        raise LlavaEdgeError(
            f"embedding table {path} is {list(table.shape)}, but the model's hidden size is "
            f"{hidden}: it comes from another model; re-export the model dir"
        )
    return table


def _check_text(prompt: Any, what: str = "prompt") -> None:
    if not isinstance(prompt, str):
        raise LlavaEdgeError(f"{what} must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 (argv, files)
        raise LlavaEdgeError(
            f"the {what} is not valid UTF-8 text (bad character at position {e.start}); "
            "re-encode it as UTF-8"
        ) from None
