"""Real TensorRT engines against onnxruntime fp32 on the CPU, on a GPU.

Skipped, with the reason, where TensorRT, cuda-python or a GPU is missing (every machine this
project is developed on). What they hold: fp32 and fp16 engines give the vision features and
prefill logits of onnxruntime fp32 within tolerance and the same greedy tokens; int8 and int4
engines give logits with cosine similarity >= 0.99 to fp32.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from llava_edge import cli
from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest
from llava_edge.runtime import Pipeline


def _missing() -> str | None:
    """Why TensorRT cannot run here, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    try:
        importlib.import_module("tensorrt")
        from llava_edge.runtime.tensorrt.cuda import import_cudart

        import_cudart()
    except Exception as e:
        return f"tensorrt or cuda-python does not import ({str(e).splitlines()[0]})"
    from llava_edge.runtime.tensorrt.gpu import probe_gpu

    try:
        probe_gpu(0)
    except LlavaEdgeError as e:
        return str(e)
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"needs TensorRT and a GPU: {MISSING}")

PROMPT = "What is in the picture?"
TOKENS = 16


def quiet(*_: object) -> None:
    pass


def picture() -> np.ndarray:
    return (np.random.default_rng(1).random((70, 90, 3)) * 255).astype(np.uint8)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Pipeline:
    return Pipeline.load(tiny_model_dir)


@pytest.fixture(scope="module")
def model_dirs(tiny_checkpoint: Path, tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """fp32, fp16, int8 and int4 model dirs, with engines."""
    from llava_edge.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("trt_gpu")
    dirs = {"fp32": root / "fp32"}
    shutil.copytree(
        tiny_model_dir, dirs["fp32"], ignore=shutil.ignore_patterns("engines*", "ort_*")
    )
    dirs["fp16"] = root / "fp16"
    export_checkpoint(tiny_checkpoint, dirs["fp16"], dtype="fp16", verify=False, log=quiet)
    from llava_edge.training.synth import synthesize

    images = synthesize(root / "calib", train=4, test=0)["images"]
    for precision in ("int8", "int4"):
        out = root / precision
        argv = [
            "quantize",
            str(dirs["fp32"]),
            str(out),
            "--precision",
            precision,
            "--images",
            str(images),
        ]
        assert cli.main(argv) == 0
        dirs[precision] = out
    from llava_edge.runtime.tensorrt.build import build_engines

    for path in dirs.values():
        build_engines(path, log=quiet)
    return dirs


def load(path: Path, **options) -> Pipeline:
    return Pipeline.load(path, backend="tensorrt", **options)


def prompt_logits(pipe: Pipeline) -> np.ndarray:
    """Last-position logits of the prefill of an image prompt."""
    from llava_edge.runtime.generate import embed

    image = pipe.image_pixels(picture())
    ids, features = pipe.prompt_ids(PROMPT, image), pipe.pixel_features(image)
    ids = np.asarray([ids])
    embeds = embed(pipe.table, ids, pipe.manifest.tokens.image_token_id, [features])
    mask = np.ones_like(ids)
    return pipe.backend.decode(embeds, mask, np.cumsum(mask, axis=1) - 1, pipe.backend.new_cache(1))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_vision_features_and_prefill_logits_match_onnxruntime(
    model_dirs, reference, precision
) -> None:
    with load(model_dirs[precision]) as pipe:
        pixels = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
        got = pipe.backend.encode_image(pixels).astype(np.float32)
        want = reference.backend.encode_image(pixels)
        tolerance = 1e-2 if precision == "fp32" else 5e-2  # fp32 engines may use TF32 kernels
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
        logits, ref = prompt_logits(pipe), prompt_logits(reference)
        assert logits.dtype == np.float32
        np.testing.assert_allclose(logits, ref, rtol=tolerance, atol=tolerance)
        assert cosine(logits, ref) > 0.9999


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_greedy_tokens_match_onnxruntime(model_dirs, reference, precision) -> None:
    want = reference.answer(picture(), PROMPT, max_new_tokens=TOKENS, ignore_eos=True).token_ids
    with load(model_dirs[precision]) as pipe:
        assert (
            pipe.answer(picture(), PROMPT, max_new_tokens=TOKENS, ignore_eos=True).token_ids == want
        )
    with load(model_dirs[precision], cuda_graph=True) as pipe:
        assert (
            pipe.answer(picture(), PROMPT, max_new_tokens=TOKENS, ignore_eos=True).token_ids == want
        )
        chat = pipe.chat(picture(), max_new_tokens=TOKENS, ignore_eos=True)
        assert chat.ask(PROMPT) == reference.chat(
            picture(), max_new_tokens=TOKENS, ignore_eos=True
        ).ask(PROMPT)


def test_an_abandoned_chat_turn_is_rolled_back_on_the_device(model_dirs, reference) -> None:
    """The device cache forgets the turn (zeroed on the backend's stream, CUDA graphs kept)."""
    options = dict(max_new_tokens=TOKENS, ignore_eos=True)
    want = reference.chat(picture(), **options)
    with load(model_dirs["fp32"], cuda_graph=True) as pipe:
        chat = pipe.chat(picture(), **options)
        assert chat.ask(PROMPT) == want.ask(PROMPT)
        for _ in chat.stream("Where is it?"):
            break
        assert chat.cache.length == want.cache.length
        assert chat.ask("And then?") == want.ask("And then?")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_engines_keep_the_logits(model_dirs, reference, precision) -> None:
    with load(model_dirs[precision]) as pipe:
        assert cosine(prompt_logits(pipe), prompt_logits(reference)) >= 0.99


def test_engines_are_recorded_for_this_gpu_and_the_cache_stays_on_it(model_dirs) -> None:
    import tensorrt

    from llava_edge.runtime.tensorrt.gpu import probe_gpu

    record = Manifest.load(model_dirs["fp32"]).engines["engines"]
    gpu = probe_gpu(0)
    assert record.tensorrt == tensorrt.__version__
    assert (record.gpu, record.compute_capability) == (gpu.name, gpu.compute_capability)
    with load(model_dirs["fp32"]) as pipe:
        cuda = pipe.backend.cuda
        cache = pipe.backend.new_cache(1)
        cache.reserve(3)
        attributes = cuda.call("cudaPointerGetAttributes", cache.past(0)[0].ptr)
        assert int(attributes.type) == int(cuda.rt.cudaMemoryType.cudaMemoryTypeDevice)
        assert int(pipe.backend.stream) != 0  # not the legacy default stream
        assert pipe.backend.kv_dtype == "float32"


def test_a_pool_serves_repeated_requests_without_new_device_memory(model_dirs, reference) -> None:
    with load(model_dirs["fp16"]) as pipe:
        for _ in range(3):
            pipe.answer(picture(), PROMPT, max_new_tokens=TOKENS, ignore_eos=True)
        # two capacities at most, of one block for each layer's keys and each layer's values
        assert pipe.backend.pool.allocated <= 2 * 2 * pipe.manifest.text.num_layers
