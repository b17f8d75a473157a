"""manifest.json: the on-disk contract between export, calib and runtime.

Export writes every fact about a model dir here once (image geometry, chat template, special token
ids, KV layout, graph IO names, each file's size and hash); calib and the runtime read it back and
never look at the source checkpoint. It is plain JSON so that a C++ or Rust runtime could read it
too. The format is versioned: a runtime refuses a manifest newer than it understands.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_edge.errors import LlavaEdgeError
from llava_edge.files import replace_file

MANIFEST_NAME = "manifest.json"
# Beside a checkpoint (not in a model dir): llava-edge's facts about it, e.g. the chat template it
# was trained with, which export copies into the manifest.
CHECKPOINT_INFO_FILE = "llava_edge.json"
FORMAT_NAME = "llava-edge-model"
# The newest format this llava-edge reads. A manifest carries the oldest version that describes
# it (1; 2 with AnyRes; 3 with a template that strips text or writes a question prefix; 4 with
# LLaVA-OneVision's downsampled tiles, its untiled images in a prompt of several, its video
# placeholder or a past answer's own header, each of which an older runtime would drop without a
# word), so
# runtimes that predate a feature refuse only the dirs that use it.
FORMAT_VERSION = 4
ANYRES_FORMAT_VERSION = 2
TEMPLATE_FORMAT_VERSION = 3
ONEVISION_FORMAT_VERSION = 4
GRAPH_NAMES = ("vision_encoder", "projector", "decoder")
PREFILL = "decoder_prefill"  # what the runtime and `plan` call the fused decoder's prompt form
PRECISIONS = ("fp32", "fp16", "int8", "int4")
TRIM_MODES = ("", "text", "content")  # TemplateSpec.trim_user


@dataclass
class TensorSpec:
    """dtype as numpy spells it; shape with a name for each dynamic dimension."""

    dtype: str
    shape: list[int | str]


@dataclass
class GraphSpec:
    file: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    precision: str = "fp32"
    # The graph TensorRT should build from, when it differs from `file` (int4: onnxruntime runs
    # MatMulNBits, which TensorRT cannot parse; TensorRT takes INT4 Q/DQ weights instead).
    tensorrt_file: str | None = None
    # The same graph in onnxruntime's fused form (the decoder: GroupQueryAttention over KV
    # buffers shared in place, packed QKV, skip norms; the CLIP vision encoder: its attention
    # fusions; see llava_edge.export.fused). The decoder's IO differs from the standard form's.
    # The onnxruntime backend runs it on the CPU; TensorRT parses none of its contrib ops and
    # builds from the standard form.
    fused: GraphSpec | None = None
    # On a fused decoder: the same graph in another precision, which the onnxruntime backend runs
    # for calls of more than one token (prompts) on the same KV cache; single-token steps run
    # `file`. `quantize --precision int4 --prefill int8` writes it: int8 prefills about twice as
    # fast as int4 on the CPU, int4 decodes faster. Runtimes that predate it ignore it.
    prefill: GraphSpec | None = None
    # Free-form facts a stage records about how it made the graph (quantization settings, the
    # int4 form, the opset); informative, never needed to run it.
    details: dict[str, Any] = field(default_factory=dict)

    def forms(self) -> list[GraphSpec]:
        """This graph and the other forms it holds (fused, and the fused one's prompt form)."""
        fused = self.fused
        return [s for s in (self, fused, fused and fused.prefill) if s is not None]


@dataclass
class AnyResSpec:
    """LLaVA-NeXT's AnyRes: an image becomes a base image and tiles (see runtime/anyres.py)."""

    grid_pinpoints: list[list[int]]  # [height, width] resolutions the image may be tiled at
    tile_size: int  # pixels on a side of one tile
    base_size: list[int]  # [height, width] the whole image is squashed to for the base image
    tile_features: int  # features on a side of one tile's feature grid
    newline: str | None  # .npy file of image_newline [hidden], closing each feature row
    # LLaVA-OneVision's `anyres_max_N`: an unpadded tile grid of more than about N tiles'
    # features is shrunk by bilinear interpolation to about N tiles' (runtime/anyres.py).
    # None: never shrunk (LLaVA-NeXT).
    max_patches: int | None = None
    # How a prompt of several images reads each: True, as it reads one alone (LLaVA-NeXT tiles
    # every image); False, untiled (LLaVA-OneVision tiles an image only where it is its prompt's
    # only one and pads each of several to a square; runtime/anyres.py). An older runtime of the
    # same format refuses several images on a False dir rather than tile them.
    several_images: bool = True


@dataclass
class ImageSpec:
    """What CLIPImageProcessor/LlavaImageProcessor do, as numbers the runtime replays."""

    height: int  # of pixel_values fed to the vision encoder
    width: int
    resize: (
        dict[str, int] | None
    )  # {"shortest_edge": n[, "longest_edge": m]} or {"height": h, "width": w}; None: no resize
    resample: int  # PIL resampling filter code (3 = bicubic)
    center_crop: bool
    rescale_factor: float
    normalize: bool
    mean: list[float]
    std: list[float]
    pad_to_square: bool  # LLaVA-1.5's 'pad' aspect ratio: pad with the mean colour, then resize
    anyres: AnyResSpec | None = None  # set: each image is a base image and tiles (LLaVA-NeXT)


@dataclass
class TextSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    dtype: str  # of inputs_embeds and the KV cache


@dataclass
class TokenSpec:
    image_token_id: int
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos: bool = True  # put bos_token_id before every prompt the chat template renders
    # Put it before a raw prompt (sent without the template), as the tokenizer puts it before any
    # text (transformers' `processor(text=...)`): unlike add_bos where the template writes BOS
    # itself. None (a manifest from before it was recorded): as add_bos.
    raw_bos: bool | None = None
    # LLaVA-OneVision's <video> placeholder, which a prompt may not hold: the runtime takes no
    # video, and transformers refuses the placeholder without one. None: the model has none.
    video_token_id: int | None = None


@dataclass
class TemplateSpec:
    """A chat template as plain strings (see llava_edge.runtime.template for how they join)."""

    name: str
    system: str = ""
    user: str = "USER: "
    assistant: str = " ASSISTANT:"
    answer_prefix: str = " "
    answer_end: str = "</s>"
    image: str = "<image>\n"
    # How a system prompt given at run time is written, "{system}" standing for it (ChatML:
    # "<|im_start|>system\n{system}<|im_end|>\n"); None: it takes `system`'s place as plain text.
    system_format: str | None = None
    # The first turn's user header, where it is not `user`: Llama 2 writes its system prompt
    # inside the first `[INST]`, so `system` opens that turn and the later turns' `<s>[INST] `
    # is not repeated after it. None: `user`, as in every other template.
    first_user: str | None = None
    # The outer whitespace the template strips off what a message says, as Python's str.strip
    # (Jinja's `trim`, Llama 2's `.strip()`) does. trim_user (one of TRIM_MODES): "" none; "text" the question
    # itself (Llama 3 LLaVA-NeXT's `content['text'] | trim`); "content" the message content as a
    # whole (Llama 3's `message['content'] | trim`), where an image marker written before the
    # question, or Llama 2's system prompt inside the first turn, keeps its leading whitespace.
    # trim_assistant, trim_system: whether an answer of the history, or a system prompt given at
    # run time, is stripped. The defaults strip nothing, as the built-in templates do.
    trim_user: str = ""
    trim_assistant: bool = False
    trim_system: bool = False
    # Written before every question, after its images (llava-hf's Llama 3 LLaVA-NeXT writes
    # `<image>` then "\n" + the text, and "\n" + the text where there is no image).
    question_prefix: str = ""
    # What follows a question whose answer the conversation holds (a past turn), where it is not
    # `assistant`: llava-hf's OneVision template writes "assistant \n" before a past answer and
    # "assistant\n" before a new one. None: `assistant`, as in every other template.
    answered_assistant: str | None = None


@dataclass
class KVSpec:
    """How the decoder's cache is named and shaped.

    `past` inputs are [batch, kv_heads, past_len, head_dim] as in Hugging Face's convention;
    `present` outputs hold only the keys/values of this call's tokens ([batch, kv_heads, seq,
    head_dim]), not past+new: the runtime appends them to a cache it preallocated, so the graph
    never copies the whole cache (see DESIGN.md and the export module for the measurement).
    """

    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    present_holds: str = "new"


@dataclass
class FileEntry:
    size: int
    sha256: str


@dataclass
class EngineSpec:
    """One TensorRT engine `llava-edge build` made from one graph."""

    file: str  # in the engine dir
    source: str  # the ONNX file (in the model dir) it was built from
    source_sha256: str  # its graph_digest when it was built: a re-quantized graph needs a rebuild
    size: int
    sha256: str
    # profile name -> input name -> [min, opt, max] shapes, in the engine's profile order
    profiles: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)


@dataclass
class EngineSet:
    """The engines of one build: tied to the TensorRT version and GPU they were built for."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "8.7"
    max_batch: int
    max_context: int
    prefill_chunk: int  # longest run of tokens one decoder call takes; longer prefills are split
    kv_chunk: int  # the device KV cache grows by this many slots
    engines: dict[str, EngineSpec] = field(default_factory=dict)  # graph name -> engine


@dataclass
class Manifest:
    graphs: dict[str, GraphSpec]
    image: ImageSpec
    num_image_tokens: int
    text: TextSpec
    tokens: TokenSpec
    template: TemplateSpec
    embeddings: (
        str  # .npy file of the text embedding table [vocab, hidden], looked up by the runtime
    )
    tokenizer: str = "tokenizer.json"
    kv: KVSpec = field(default_factory=KVSpec)
    files: dict[str, FileEntry] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, model types, versions
    # engine dir (relative to the model dir where it lies inside it) -> the engines built there
    engines: dict[str, EngineSet] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = 1

    # ---- reading and writing -------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> Manifest:
        path = Path(model_dir) / MANIFEST_NAME
        try:
            _check_model_dir(Path(model_dir))
        except PermissionError:  # a dir copied with another user's permissions (no x bit)
            raise LlavaEdgeError(
                f"cannot look into model dir {model_dir}: Permission denied; let this user "
                "read it (chmod -R a+rX)"
            ) from None
        try:
            # utf-8-sig: a manifest edited in a Windows editor may begin with a byte-order mark
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except OSError as e:  # a model dir copied with another user's permissions
            raise LlavaEdgeError(f"cannot read {path}: {e.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LlavaEdgeError(f"{path} is not valid JSON ({e}); re-export the model") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(data, dict):
            raise LlavaEdgeError(f"{where}: expected a JSON object")
        if data.get("format") != FORMAT_NAME:
            raise LlavaEdgeError(f"{where}: not a llava-edge manifest (format is missing or wrong)")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise LlavaEdgeError(
                f"{where}: format_version {version!r} is not a version number; re-export the model"
            )
        if version > FORMAT_VERSION:
            raise LlavaEdgeError(
                f"{where}: format_version {version!r} is newer than this llava-edge understands "
                f"({FORMAT_VERSION}); upgrade llava-edge"
            )
        manifest = _build(cls, data, where)
        if isinstance(data["template"], dict) and "system_format" not in data["template"]:
            manifest.template = _older_template(manifest.template, where)
        manifest.validate(where)
        return manifest

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, model_dir: str | os.PathLike) -> None:
        """Write atomically, so a reader never sees half a manifest (nor a power cut)."""
        with replace_file(Path(model_dir) / MANIFEST_NAME) as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")

    def validate(self, where: str = MANIFEST_NAME) -> None:
        missing = [g for g in GRAPH_NAMES if g not in self.graphs]
        if missing:
            raise LlavaEdgeError(f"{where}: graphs {missing} are missing; re-export the model")
        for name, graph in self.graphs.items():
            for spec in graph.forms():
                if spec.precision not in PRECISIONS:
                    raise LlavaEdgeError(
                        f"{where}: graph {name} has unknown precision {spec.precision}; re-export "
                        "the model"
                    )
        # Files are named relative to the model dir and stay in it: quantize copies them into a
        # new dir, where a name like ../x would write outside it.
        names = [
            f for g in self.graphs.values() for s in g.forms() for f in (s.file, s.tensorrt_file)
        ]
        names += [*self.data_files(), *self.files]
        for name in names:
            if name is not None and (
                not name or Path(name).is_absolute() or ".." in Path(name).parts
            ):
                raise LlavaEdgeError(
                    f"{where}: file name {name!r} is not inside the model dir; re-export the model"
                )
        # An engine is a file of its engine dir, which a rebuild deletes once replaced: a name
        # like ../x or /x would delete a file elsewhere.
        for engine_dir, record in self.engines.items():
            for spec in record.engines.values():
                if spec.file in ("", ".", "..") or Path(spec.file).name != spec.file:
                    raise LlavaEdgeError(
                        f"{where}: engine file {spec.file!r} of {engine_dir} is not a file name "
                        "in its engine dir; remove the record (or the manifest's engines) and "
                        "build again"
                    )
        if self.template.trim_user not in TRIM_MODES:
            raise LlavaEdgeError(
                f"{where}: template trim_user {self.template.trim_user!r} is none of "
                f"{list(TRIM_MODES)}; re-export the model"
            )
        sizes = {f"text.{f.name}": getattr(self.text, f.name) for f in dataclasses.fields(TextSpec)}
        sizes.update(
            num_image_tokens=self.num_image_tokens,
            **{f"image.{name}": getattr(self.image, name) for name in ("height", "width")},
            **{f"image.resize.{k}": v for k, v in (self.image.resize or {}).items()},
        )
        for name, value in sizes.items():
            if isinstance(value, int) and value <= 0:
                raise LlavaEdgeError(f"{where}: {name} is {value}, not a size; re-export the model")
        if self.text.num_heads % self.text.num_kv_heads:
            raise LlavaEdgeError(f"{where}: the text model's shapes are inconsistent")
        self._validate_image(where)
        self._validate_kv_names(where)
        if self.format_version < self.required_version():
            raise LlavaEdgeError(
                f"{where}: format_version {self.format_version} is older than what it describes "
                f"needs ({self.required_version()}); re-export the model"
            )
        anyres = self.image.anyres
        if anyres is not None and (
            not anyres.grid_pinpoints
            or anyres.tile_size <= 0
            or anyres.tile_features**2 != self.num_image_tokens
            or (anyres.max_patches is not None and anyres.max_patches <= 0)
        ):
            raise LlavaEdgeError(f"{where}: the AnyRes settings are inconsistent; re-export")

    def _validate_kv_names(self, where: str) -> None:
        """Every layer's KV names (kv's templates, `{i}` the layer) among the decoder's IO."""
        decoder = self.graphs["decoder"]
        for layer in range(self.text.num_layers):
            try:
                names = self.kv_names(layer)
            # a template naming another field, or a field or item of the layer number
            except (KeyError, IndexError, ValueError, AttributeError, TypeError):
                raise LlavaEdgeError(
                    f"{where}: kv names {dataclasses.astuple(self.kv)[:4]} may only use {{i}}, "
                    "the layer; re-export the model"
                ) from None
            fields = ("past_key", "past_value", "present_key", "present_value")
            sides = ("inputs", "inputs", "outputs", "outputs")
            for field_name, name, io in zip(fields, names, sides, strict=True):
                if name not in getattr(decoder, io):
                    raise LlavaEdgeError(
                        f"{where}: kv.{field_name} names {name!r} for layer {layer}, which is "
                        f"none of the decoder's {io}; re-export the model"
                    )

    def _validate_image(self, where: str) -> None:
        """What the runtime's preprocessing takes (as export does from an image processor): a
        resize it knows, a PIL filter, a mean and a non-zero std for all or each colour channel."""
        image = self.image
        resize = image.resize or {"shortest_edge": 1}
        if "shortest_edge" not in resize and not {"height", "width"} <= resize.keys():
            raise LlavaEdgeError(
                f"{where}: image.resize {image.resize} names neither shortest_edge nor height and "
                "width; re-export the model"
            )
        if image.resample not in range(6):  # PIL's Image.Resampling codes
            raise LlavaEdgeError(
                f"{where}: image.resample {image.resample} is not a PIL filter (0-5); re-export"
            )
        channels = (1, 3)
        if image.normalize and (
            len(image.mean) not in channels or len(image.std) not in channels or 0 in image.std
        ):
            raise LlavaEdgeError(
                f"{where}: image.mean {image.mean} and image.std {image.std} need 1 or 3 values each "
                "(std none 0); re-export the model"
            )

    def required_version(self) -> int:
        """The oldest format version that describes this manifest: what it records for runtimes
        that predate a feature to refuse rather than misread."""
        t, anyres = self.template, self.image.anyres
        if (
            t.answered_assistant is not None
            or self.tokens.video_token_id is not None
            or (
                anyres is not None and (anyres.max_patches is not None or not anyres.several_images)
            )
        ):
            return ONEVISION_FORMAT_VERSION
        if t.question_prefix or t.trim_user or t.trim_assistant or t.trim_system:
            return TEMPLATE_FORMAT_VERSION
        return ANYRES_FORMAT_VERSION if anyres is not None else 1

    # ---- facts derived from the contract ---------------------------------------------------

    def kv_names(self, layer: int) -> tuple[str, str, str, str]:
        """(past key, past value, present key, present value) names of one layer."""
        kv = self.kv
        return (
            kv.past_key.format(i=layer),
            kv.past_value.format(i=layer),
            kv.present_key.format(i=layer),
            kv.present_value.format(i=layer),
        )

    # ---- integrity ---------------------------------------------------------------------------

    def record_files(self, model_dir: str | os.PathLike) -> None:
        """Record size and sha256 of every file the model dir needs."""
        self.files = {
            name: FileEntry(
                size=(Path(model_dir) / name).stat().st_size, sha256=sha256(Path(model_dir) / name)
            )
            for name in self.needed_files(model_dir)
        }

    def graph_digest(self, file: str) -> str | None:
        """What identifies a graph with its weights: its sha256, combined with its `.data` file's
        where its weights are there (the `.onnx` alone is then the same for every checkpoint of
        one shape: a fine-tune and its base); None where the manifest records no hash. Caches of
        what is built from a graph (optimized sessions, TensorRT engines) are keyed by it."""
        entry = self.files.get(file)
        if entry is None:
            return None
        data = self.files.get(file + ".data")
        if data is None:
            return entry.sha256
        return hashlib.sha256(f"{entry.sha256} {data.sha256}".encode()).hexdigest()

    def data_files(self) -> list[str]:
        """The files besides the graphs: tokenizer, embedding table, AnyRes' image_newline."""
        names = [self.embeddings, self.tokenizer]
        if self.image.anyres is not None and self.image.anyres.newline:
            names.append(self.image.anyres.newline)
        return names

    def needed_files(self, model_dir: str | os.PathLike) -> list[str]:
        names = [f.file for g in self.graphs.values() for f in g.forms()] + self.data_files()
        names += [g.tensorrt_file for g in self.graphs.values() if g.tensorrt_file]
        # ONNX external data sits next to its graph under the graph's name + ".data".
        names += [n + ".data" for n in list(names) if (Path(model_dir) / (n + ".data")).exists()]
        return sorted(set(names))

    def check_files(self, model_dir: str | os.PathLike, hashes: bool | None = None) -> None:
        """Fail clearly if a file is missing, truncated or altered.

        Sizes are always checked. Hashes are checked when `hashes` is True, or, when it is None,
        the first time this machine sees these files (a fingerprint of the manifest and each
        file's size and mtime is remembered in the user cache dir), so a 7B model is hashed once
        after it is copied, not on every start of a robot's app.
        """
        model_dir = Path(model_dir)
        for name, entry in self.files.items():
            path = model_dir / name
            if not path.is_file():
                raise LlavaEdgeError(f"{path} is missing; copy the whole model dir or re-export it")
            size = path.stat().st_size
            if size != entry.size:
                raise LlavaEdgeError(
                    f"{path} is {size} bytes but the manifest says {entry.size}: the file is "
                    "truncated or replaced; copy it again or re-export"
                )
        fingerprint = self._fingerprint(model_dir)
        if hashes is None:
            hashes = fingerprint not in _verified_fingerprints()
        if not hashes:
            return
        for name, entry in self.files.items():
            try:
                digest = sha256(model_dir / name)
            except OSError as e:  # a model dir copied with another user's permissions
                raise LlavaEdgeError(f"cannot read {model_dir / name}: {e.strerror}") from None
            if digest != entry.sha256:
                raise LlavaEdgeError(
                    f"{model_dir / name} does not match the checksum in the manifest: the file is "
                    "corrupt or comes from another model; copy it again or re-export"
                )
        _remember_verified(fingerprint)

    def mark_verified(self, model_dir: str | os.PathLike) -> None:
        """Remember that `model_dir`'s files match (their writer just hashed them)."""
        _remember_verified(self._fingerprint(Path(model_dir)))

    def _fingerprint(self, model_dir: Path) -> str:
        digest = hashlib.sha256(str(model_dir.resolve()).encode())
        digest.update(json.dumps(self.to_dict(), sort_keys=True).encode())
        for name in sorted(self.files):
            stat = (model_dir / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


def _check_model_dir(model_dir: Path) -> None:
    """Refuse what is not a model dir, naming what it is instead. By os.stat, which raises
    PermissionError for a dir this user may not look into, where pathlib's exists() and
    is_file() say False from Python 3.14 on."""
    mode = _mode(model_dir)
    if mode is None:
        raise LlavaEdgeError(f"model dir {model_dir} does not exist")
    if not stat.S_ISDIR(mode):
        raise LlavaEdgeError(f"{model_dir} is a file; give the model dir `llava-edge export` wrote")
    try:  # onnxruntime and tokenizers open files by UTF-8 name
        os.path.abspath(model_dir).encode("utf-8")
    except UnicodeEncodeError:
        raise LlavaEdgeError(
            f"model dir {model_dir}: the path is not valid UTF-8 text; rename it in UTF-8"
        ) from None
    mode = _mode(model_dir / MANIFEST_NAME)
    if mode is None or not stat.S_ISREG(mode):
        raise LlavaEdgeError(
            f"{model_dir} has no {MANIFEST_NAME}: it is not a llava-edge model dir "
            "(make one with `llava-edge export CHECKPOINT OUT_DIR`)"
        )


def _mode(path: Path) -> int | None:
    """`path`'s st_mode; None where there is nothing there (PermissionError is raised)."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in it
        return None


def _older_template(template: TemplateSpec, where: str) -> TemplateSpec:
    """A template from a manifest written before `system_format` (and `first_user`) were: a
    built-in template's strings get its way of writing a run-time system prompt (ChatML's own
    block); one read off a checkpoint's chat template cannot, as only the checkpoint knows it."""
    from llava_edge.runtime.template import TEMPLATES

    known = TEMPLATES.get(template.name)
    fields = {"image": template.image, "system_format": None, "first_user": None}
    if known is not None and dataclasses.replace(known, **fields) == template:
        return dataclasses.replace(template, system_format=known.system_format)
    raise LlavaEdgeError(
        f"{where}: the template has no 'system_format' (an older llava-edge exported it), so a "
        "system prompt could not be written as the model was trained; re-export the model"
    )


def write_checkpoint_info(checkpoint: str | os.PathLike, template: str) -> None:
    """Write a checkpoint's llava_edge.json: the chat template it was trained with."""
    path = Path(checkpoint) / CHECKPOINT_INFO_FILE
    path.write_text(json.dumps({"template": template}, indent=2) + "\n", encoding="utf-8")


def read_checkpoint_template(checkpoint: str | os.PathLike) -> str | None:
    """The template a checkpoint names in its llava_edge.json (training writes it), or None."""
    path = Path(checkpoint) / CHECKPOINT_INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise LlavaEdgeError(f"{path} is not a JSON object naming a template") from None


def cache_dir() -> Path | None:
    """Where llava-edge remembers things between runs ($LLAVA_EDGE_CACHE, else
    $XDG_CACHE_HOME/llava-edge, else ~/.cache/llava-edge); None where there is nowhere (no home
    directory, as for a service run under a user id without one): then nothing is remembered.

    An empty variable counts as unset, and so does a relative XDG_CACHE_HOME (as the XDG spec
    says), or the cache would land in whatever directory the process started in.
    """
    if os.environ.get("LLAVA_EDGE_CACHE"):
        return Path(os.environ["LLAVA_EDGE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "llava-edge"
    home = os.path.expanduser("~")
    return Path(home) / ".cache" / "llava-edge" if os.path.isabs(home) else None


VERIFIED_KEPT = 1000  # fingerprints remembered: the most recently verified ones


def _verified_fingerprints() -> list[str]:
    """Fingerprints of verified dirs, oldest first."""
    root = cache_dir()
    try:
        return (root / "verified.txt").read_text(encoding="ascii").split() if root else []
    except (OSError, ValueError):  # damaged (not text): rewritten by the next remembering
        return []


def _remember_verified(fingerprint: str) -> None:
    """Best effort: a read-only home only means hashing again next time."""
    root = cache_dir()
    if root is None:
        return
    known = [f for f in _verified_fingerprints() if f != fingerprint] + [fingerprint]
    try:
        with replace_file(root / "verified.txt") as f:
            f.write("\n".join(known[-VERIFIED_KEPT:]) + "\n")
    except (OSError, LlavaEdgeError):  # replace_file names a dir it cannot write to
        pass


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _build(cls: type, data: Any, where: str) -> Any:
    """Build a dataclass tree from JSON, naming the first field that is missing or mistyped.

    Hand-written because the runtime may import nothing beyond numpy, pillow, tokenizers and
    onnxruntime (no pydantic); the manifest is small and flat enough for this.
    """
    if not isinstance(data, dict):
        raise _mistyped(where, f"an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise LlavaEdgeError(f"{where}: field '{f.name}' is missing; re-export the model")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}: {f.name}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except LlavaEdgeError as e:
                errors.append(str(e))
        raise LlavaEdgeError(errors[0])  # the first option's complaint
    if origin is dict:
        _, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise _mistyped(where, "an object")
        return {k: _convert(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise _mistyped(where, "a list")
        return [_convert(item_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool, float) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise _mistyped(where, f"{hint.__name__}, got {value!r}")
    return value


def _mistyped(where: str, expected: str) -> LlavaEdgeError:
    """A field of the wrong JSON type: hand-edited, or written by something else."""
    return LlavaEdgeError(f"{where}: expected {expected}; re-export the model")
