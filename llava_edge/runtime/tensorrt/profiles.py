"""Optimization profiles derived from the manifest.

The manifest names every dynamic dimension of every graph input ('batch', 'seq', 'past',
'image_tokens', and sums such as 'past+seq' for the decoder's attention mask). A profile here is a
(min, opt, max) value for each of those names; every input's three shapes are resolved from the
same values, so the mask's length equals past + seq at min, opt and max by construction, which is
what TensorRT needs to build the decoder.

The vision encoder and projector take a batch of images, or with AnyRes of each image's base
image and tiles. The decoder gets two profiles: 'prefill' (seq 1..prefill_chunk, tuned for a LLaVA prompt) and
'decode' (seq = 1, tuned for generating). The past length is the capacity of the device KV cache,
which grows in steps of `kv_chunk` up to the max context, so it is never below one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest, TensorSpec
from llava_edge.runtime.anyres import max_tiles

PREFILL = "prefill"
DECODE = "decode"
DEFAULT_PREFILL_CHUNK = 512  # bounds the present-KV staging and activation memory of one call
# The device KV cache's growth step. Larger than the host cache's (kv_cache.CHUNK, 64): each
# growth re-lays the device cache and costs a new CUDA graph capture, against at most
# kv_chunk - 1 unused slots that attention reads.
DEFAULT_KV_CHUNK = 256
PROMPT_TEXT_TOKENS = 64  # text around the image in a typical prompt: sets the 'opt' shapes
ANSWER_TOKENS = 128  # typical answer length: sets the decode profile's 'opt' past


@dataclass(frozen=True)
class EngineLimits:
    """What an engine set is built to take (`llava-edge build`'s options); not to be mixed up
    with a deployment's request limits (llava_edge.runtime.Limits)."""

    max_batch: int = 1
    max_context: int = 4096
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    kv_chunk: int = DEFAULT_KV_CHUNK

    def validate(self) -> None:
        for name in ("max_batch", "max_context", "prefill_chunk", "kv_chunk"):
            if getattr(self, name) < 1:
                raise LlavaEdgeError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class Profile:
    """(min, opt, max) values of the symbolic dimensions, for one optimization profile."""

    name: str
    dims: dict[str, tuple[int, int, int]]

    def shapes(self, specs: dict[str, TensorSpec]) -> dict[str, list[list[int]]]:
        """[min, opt, max] shape of each tensor in `specs`."""
        return {
            name: [resolve(spec.shape, self.point(i), name) for i in range(3)]
            for name, spec in specs.items()
        }

    def point(self, index: int) -> dict[str, int]:
        """The dims at min (0), opt (1) or max (2)."""
        return {name: values[index] for name, values in self.dims.items()}


def resolve(shape: list[int | str], dims: dict[str, int], tensor: str = "") -> list[int]:
    """A manifest shape with its named dimensions replaced by values; 'a+b' adds two names."""
    out = []
    for dim in shape:
        if isinstance(dim, int):
            out.append(dim)
            continue
        try:
            out.append(sum(dims[part.strip()] for part in dim.split("+")))
        except KeyError as e:
            raise LlavaEdgeError(
                f"tensor {tensor} has dimension '{dim}', which this llava-edge cannot size "
                f"(unknown name {e}); upgrade llava-edge or re-export the model"
            ) from None
    return out


def graph_profiles(manifest: Manifest, graph: str, limits: EngineLimits) -> list[Profile]:
    """The optimization profiles of one graph's engine, in the order the engine holds them."""
    limits.validate()
    batch = (1, 1, limits.max_batch)
    if graph != "decoder":
        n = manifest.num_image_tokens
        images = image_batch(manifest, limits.max_batch)
        return [Profile("default", {"batch": images, "image_tokens": (n, n, n)})]
    max_context = limits.max_context
    chunk = min(limits.prefill_chunk, max_context)
    past_min = min(limits.kv_chunk, max_context)
    opt_seq = min(chunk, typical_image_tokens(manifest) + PROMPT_TEXT_TOKENS)
    prefill_past = capacity(opt_seq, limits.kv_chunk, max_context)
    decode_past = capacity(opt_seq + ANSWER_TOKENS, limits.kv_chunk, max_context)
    return [
        Profile(
            PREFILL,
            {
                "batch": batch,
                "seq": (1, opt_seq, chunk),
                "past": (past_min, prefill_past, max_context),
            },
        ),
        Profile(
            DECODE,
            {"batch": batch, "seq": (1, 1, 1), "past": (past_min, decode_past, max_context)},
        ),
    ]


def image_batch(manifest: Manifest, max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch of the vision encoder and projector: one input per image, or with
    AnyRes a base image and up to the most tiles any grid resolution gives, per image."""
    per_image = 1 if manifest.image.anyres is None else max_tiles(manifest.image.anyres)
    return (1, per_image, max_batch * per_image)


def typical_image_tokens(manifest: Manifest) -> int:
    """Image tokens of a prompt, to tune for: fixed, or with AnyRes those of the most tiles."""
    return manifest.num_image_tokens * image_batch(manifest, 1)[1]


def capacity(tokens: int, kv_chunk: int, max_context: int) -> int:
    """Slots the device KV cache holds for `tokens` tokens: whole chunks, at most max context."""
    return min(max_context, max(1, -(-tokens // kv_chunk)) * kv_chunk)


def max_dims(profiles: list[Profile]) -> dict[str, int]:
    """The largest value each dimension takes in any profile: what buffers are sized for."""
    out: dict[str, int] = {}
    for profile in profiles:
        for name, (_, _, high) in profile.dims.items():
            out[name] = max(out.get(name, 0), high)
    return out


def ort_tensorrt_profiles(manifest: Manifest, graph: str, max_batch: int = 1) -> dict[str, str]:
    """Explicit profile options for onnxruntime's TensorRT execution provider.

    Without them the provider rebuilds its engine whenever a shape leaves the range it has seen.
    The onnxruntime backend feeds its whole host cache as past (0 slots before the first call, then
    multiples of its chunk) and does not split prefills, so the range differs from the native
    backend's: past from 0, seq up to the max context, and the 'opt' past is what the host cache
    holds after a typical prompt (it keeps a chunk of headroom after the prompt).
    """
    from llava_edge.runtime.kv_cache import CHUNK

    max_context = manifest.text.max_context
    n = manifest.num_image_tokens
    prompt = typical_image_tokens(manifest) + PROMPT_TEXT_TOKENS
    dims = {
        "batch": (1, 1, max_batch) if graph == "decoder" else image_batch(manifest, max_batch),
        "image_tokens": (n, n, n),
        "seq": (1, 1, max_context),
        "past": (0, capacity(prompt + CHUNK, CHUNK, max_context), max_context),
    }
    specs = manifest.graphs[graph].inputs
    used = {
        d.strip()
        for spec in specs.values()
        for dim in spec.shape
        if isinstance(dim, str)
        for d in dim.split("+")
    }
    shapes = Profile("ort", {k: v for k, v in dims.items() if k in used}).shapes(specs)
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    return {
        key: ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in shapes.items())
        for i, key in enumerate(keys)
    }
