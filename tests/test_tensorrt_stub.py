"""The TensorRT builder and backend driven through tests/tensorrt_stub.py on a CPU.

The stub checks what TensorRT checks (strong typing, no precision flags, consistent profiles,
aligned and complete bindings) and runs each engine's ONNX graph with onnxruntime at the addresses
it was given. So these tests verify the control flow (calls, flags, profile shapes, which buffers
are bound, the device KV cache and its growth, chunked prefill, CUDA graph bookkeeping) against the
onnxruntime backend's tokens and logits. They verify nothing about real TensorRT engines: that is
test_tensorrt_gpu.py, which needs a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import cudart_stub
import numpy as np
import pytest
import tensorrt_stub

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import MANIFEST_NAME, Manifest
from llava_edge.runtime import Pipeline
from llava_edge.runtime.onnx_backend import OnnxBackend
from llava_edge.runtime.tensorrt import cuda, gpu
from llava_edge.runtime.tensorrt.backend import TensorRTBackend
from llava_edge.runtime.tensorrt.build import build_engines

STUB_GPU = gpu.GpuInfo(0, "Stub Orin", "8.7", 8 << 30, 6 << 30, True, "12.6")


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_stub)
    monkeypatch.setattr(gpu, "probe_gpu", lambda index=0: STUB_GPU)
    monkeypatch.setattr(cuda, "import_cudart", lambda: cudart_stub)
    tensorrt_stub.calls.clear()
    cudart_stub.reset()
    return tensorrt_stub


@pytest.fixture
def model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns("engines*", "ort_*"))
    return out


def engine_file(model: Path, name: str) -> Path:
    """Where the manifest says the engine of graph `name` is (engine files are content-named)."""
    return model / "engines" / Manifest.load(model).engines["engines"].engines[name].file


def quiet(*_: object) -> None:
    pass


def backend(model: Path, **options) -> TensorRTBackend:
    return TensorRTBackend(model, Manifest.load(model), **options)


def image() -> np.ndarray:
    return (np.random.default_rng(1).random((70, 90, 3)) * 255).astype(np.uint8)


# ---- build -------------------------------------------------------------------------------------


def test_build_makes_strongly_typed_engines_and_records_them(stub, model: Path) -> None:
    out = build_engines(model, max_batch=2, workspace_gb=0.5, log=quiet)
    assert out == model / "engines"
    builds = [c for c in stub.calls if c[0] == "build"]
    strongly_typed = 1 << int(stub.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert [Path(c[1]).name for c in builds] == [
        "vision_encoder.onnx",
        "projector.onnx",
        "decoder.onnx",
    ]
    for _, _, flags, builder_flags, pools in builds:
        assert flags == strongly_typed and builder_flags == []
        assert pools == {stub.MemoryPoolType.WORKSPACE: 2**29}
    record = Manifest.load(model).engines["engines"]
    assert (record.tensorrt, record.gpu, record.compute_capability) == (
        "10.3.0.30",
        "Stub Orin",
        "8.7",
    )
    assert (record.max_batch, record.max_context) == (2, 1024)
    decoder = record.engines["decoder"]
    assert (out / decoder.file).stat().st_size == decoder.size
    assert list(decoder.profiles) == ["prefill", "decode"]
    assert decoder.profiles["decode"]["attention_mask"] == [[1, 257], [1, 257], [2, 1025]]
    assert not list(out.glob(".*.tmp"))


def test_the_timing_cache_is_reused_between_builds(stub, model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "shared" / "timing.cache"
    build_engines(model, timing_cache=cache, log=quiet)
    first = cache.read_bytes()
    assert len(timing_entries(cache)) == 3  # one entry per engine built
    build_engines(model, out_dir=tmp_path / "again", timing_cache=cache, log=quiet)
    loaded = [c[1] for c in stub.calls if c[0] == "create_timing_cache"]
    assert loaded == [b"", first]  # the second build started from the first one's timings
    assert len(timing_entries(cache)) == 6
    assert set(Manifest.load(model).engines) == {"engines", str((tmp_path / "again").resolve())}
    # by default the engine dir keeps one cache per TensorRT version
    build_engines(model, log=quiet)
    assert (model / "engines" / "timing-10.3.0.30.cache").is_file()


def timing_entries(path: Path) -> list:
    return json.loads(path.read_bytes().partition(b"\n")[2])


def test_a_stale_timing_cache_falls_back_to_an_empty_one(stub, model: Path, tmp_path) -> None:
    cache = tmp_path / "timing.cache"
    stale = b"written by TensorRT 8.6 on another GPU"
    cache.write_bytes(stale)
    said = []
    build_engines(model, timing_cache=cache, log=said.append)
    assert [c[1] for c in stub.calls if c[0] == "create_timing_cache"] == [stale, b""]
    assert any("stale or from another TensorRT" in line for line in said)
    assert len(timing_entries(cache)) == 3  # replaced by a good one


def test_a_timing_cache_from_another_gpu_falls_back_to_an_empty_one(
    stub, model: Path, tmp_path, monkeypatch
) -> None:
    cache = tmp_path / "timing.cache"  # one --timing-cache for two boards
    build_engines(model, timing_cache=cache, log=quiet)
    monkeypatch.setattr(stub, "device_properties", "Stub Orin NX, SM 8.7")
    said = []
    build_engines(model, out_dir=tmp_path / "nx", timing_cache=cache, log=said.append)
    assert any("stale or from another TensorRT or GPU" in line for line in said)
    assert b"Stub Orin NX" in cache.read_bytes().partition(b"\n")[0]  # now this GPU's
    assert len(timing_entries(cache)) == 3


def test_tensorrt_before_10_is_refused_with_the_jetpack_to_use(stub, model, monkeypatch) -> None:
    monkeypatch.setattr(stub, "__version__", "8.6.2.3")
    with pytest.raises(
        LlavaEdgeError, match=r"TensorRT 8\.6\.2\.3 is too old.*JetPack 6\.1 or later.*8\.6"
    ):
        build_engines(model, log=quiet)
    with pytest.raises(LlavaEdgeError, match="too old"):
        backend(model)


def test_tensorrt_11_builds_strongly_typed_without_precision_flags(stub, model: Path) -> None:
    stub.use_version("11.1.0.1")
    try:
        build_engines(model, log=quiet)
        builds = [c for c in stub.calls if c[0] == "build"]
        assert len(builds) == 3 and all(c[2] == 1 for c in builds)  # bit 0 on 11, not bit 1
        trt = Pipeline(model, Manifest.load(model), backend(model))
        trt.wait_loaded()  # the engines loaded with the backend: nothing to wait for
        assert len(trt.answer(None, "Hi", max_new_tokens=3, ignore_eos=True).token_ids) == 3
    finally:
        stub.use_version("10.3.0.30")


def test_tensorrt_failure_signals_reach_the_user(stub, model: Path, monkeypatch) -> None:
    # a graph whose external weights were not copied: the parser fails, naming the file
    import onnx

    graph = onnx.load(model / "decoder.onnx")
    onnx.save(
        graph, model / "decoder.onnx", save_as_external_data=True, location="decoder.onnx.data"
    )
    (model / "decoder.onnx.data").unlink()
    manifest = Manifest.load(model)
    manifest.files.pop("decoder.onnx.data", None)
    manifest.record_files(model)
    manifest.save(model)
    with pytest.raises(
        LlavaEdgeError,
        match="parser rejected decoder.onnx: .*Failed to open file: decoder.onnx.data",
    ):
        build_engines(model, log=quiet)


def test_a_profile_tensorrt_does_not_add_fails_the_build(stub, model: Path, monkeypatch) -> None:
    # add_optimization_profile returns -1 for a profile it finds invalid and builds without it:
    # the engine would lack a profile the backend selects, and rebuilding would not help
    real = stub._Config.add_optimization_profile
    monkeypatch.setattr(  # the decoder's second profile, 'decode', is refused
        stub._Config,
        "add_optimization_profile",
        lambda self, profile: -1 if self.profiles else real(self, profile),
    )
    with pytest.raises(LlavaEdgeError, match="refused the decode optimization profile of the dec"):
        build_engines(model, log=quiet)
    assert not list((model / "engines").glob("*.engine")) and not Manifest.load(model).engines


REAL_SET_ADDRESS = tensorrt_stub._Context.set_tensor_address


def test_refused_addresses_and_profiles_are_errors(stub, model: Path, monkeypatch) -> None:
    build_engines(model, log=quiet)
    be = backend(model)
    cache = be.new_cache(1)
    embeds = np.zeros((1, 3, 64), np.float32)
    monkeypatch.setattr(stub._Context, "set_tensor_address", lambda self, name, address: False)
    with pytest.raises(LlavaEdgeError, match="refused the address of .* for the decoder engine"):
        be.decode(embeds, np.ones((1, 3), np.int64), np.arange(3)[None], cache)
    monkeypatch.setattr(stub._Context, "set_tensor_address", REAL_SET_ADDRESS)

    def refuse(self, index, stream):
        raise RuntimeError("Cannot set optimization profile: the context is in use")

    be = backend(model)
    cache = be.new_cache(1)
    be.decode(embeds, np.ones((1, 3), np.int64), np.arange(3)[None], cache)
    monkeypatch.setattr(stub._Context, "set_optimization_profile_async", refuse)
    with pytest.raises(
        LlavaEdgeError, match="refused profile decode of the decoder engine .*context is in use"
    ):
        be.decode(embeds[:, :1], np.ones((1, 1), np.int64), np.array([[3]]), cache)


def test_engines_load_from_a_memory_map_and_unchanged_bindings_are_not_repeated(
    stub, model: Path
) -> None:
    build_engines(model, log=quiet)
    be = backend(model)
    assert [c for c in stub.calls if c[0] == "deserialize_cuda_engine"]
    cache = be.new_cache(1)
    embeds = np.zeros((1, 1, 64), np.float32)
    be.decode(
        np.zeros((1, 4, 64), np.float32), np.ones((1, 4), np.int64), np.arange(4)[None], cache
    )
    be.decode(embeds, np.ones((1, 1), np.int64), np.array([[4]]), cache)
    stub.calls.clear()
    be.decode(embeds, np.ones((1, 1), np.int64), np.array([[5]]), cache)  # same shapes, buffers
    assert not [c for c in stub.calls if c[0] in ("set_input_shape", "set_tensor_address")]


def test_a_profile_switch_sets_every_shape_and_address_again_before_the_run(
    stub, model: Path
) -> None:
    """Switching between prefill and decode invalidates the context's dynamic bindings: each
    switch is followed by every input's shape and every IO tensor's address before the run."""
    build_engines(model, log=quiet)
    be = backend(model)
    cache = be.new_cache(1)
    steps = [(4, 0), (1, 4), (1, 5), (3, 6), (1, 9)]  # prefill, decode, decode, prefill, decode
    stub.calls.clear()
    for seq, start in steps:
        be.decode(
            np.zeros((1, seq, 64), np.float32),
            np.ones((1, seq), np.int64),
            np.arange(start, start + seq)[None],
            cache,
        )
    io = be.engines["decoder"].io
    switches = [i for i, c in enumerate(stub.calls) if c[0] == "set_optimization_profile_async"]
    assert [stub.calls[i][1] for i in switches] == [1, 0, 1]
    for at in switches:
        run = next(i for i, c in enumerate(stub.calls) if i > at and c[0] == "execute_async_v3")
        bound = stub.calls[at:run]
        assert {c[1] for c in bound if c[0] == "set_tensor_address"} == set(io)
        inputs = {name for name, (mode, _) in io.items() if mode == "input"}
        assert {c[1] for c in bound if c[0] == "set_input_shape"} == inputs


def test_int4_builds_from_the_tensorrt_graph_and_a_failed_build_changes_nothing(
    stub, model: Path
) -> None:
    import onnx
    from onnx import helper

    # an onnxruntime-only decoder (a contrib op TensorRT cannot parse), as int4 dirs hold
    graph = onnx.load(model / "decoder.onnx")
    graph.graph.node.append(
        helper.make_node("MatMulNBits", ["inputs_embeds"], ["unused"], domain="com.microsoft")
    )
    onnx.save(graph, model / "decoder_nbits.onnx")
    manifest = Manifest.load(model)
    manifest.graphs["decoder"].file = "decoder_nbits.onnx"
    manifest.graphs["decoder"].tensorrt_file = "decoder.onnx"
    manifest.record_files(model)
    manifest.save(model)
    build_engines(model, log=quiet)
    parsed = [Path(c[1]).name for c in stub.calls if c[0] == "parse_from_file"]
    assert parsed[-1] == "decoder.onnx"
    assert Manifest.load(model).engines["engines"].engines["decoder"].source == "decoder.onnx"

    decoder_engine = engine_file(model, "decoder")
    before = ((model / MANIFEST_NAME).read_bytes(), decoder_engine.read_bytes())
    manifest.graphs["decoder"].tensorrt_file = None  # now TensorRT would have to parse MatMulNBits
    manifest.save(model)
    saved = (model / MANIFEST_NAME).read_bytes()
    with pytest.raises(
        LlavaEdgeError,
        match=r"parser rejected decoder_nbits.onnx: In node \d+ with operator MatMulNBits: No importer",
    ):
        build_engines(model, log=quiet)
    assert (model / MANIFEST_NAME).read_bytes() == saved
    assert decoder_engine.read_bytes() == before[1]
    assert not list((model / "engines").glob(".*.tmp"))


def refuse_to_build(stub, monkeypatch, graph: str) -> None:
    """TensorRT returns no plan for `graph`'s engine (its log says why)."""
    real = stub.Builder.build_serialized_network
    monkeypatch.setattr(
        stub.Builder,
        "build_serialized_network",
        lambda self, network, config: (
            None if graph in network.path else real(self, network, config)
        ),
    )


def test_a_build_that_tensorrt_refuses_leaves_the_old_engines(
    stub, model: Path, monkeypatch
) -> None:
    build_engines(model, log=quiet)
    saved = (model / MANIFEST_NAME).read_bytes()
    engines = {p.name: p.read_bytes() for p in (model / "engines").glob("*.engine")}
    refuse_to_build(stub, monkeypatch, "decoder")
    with pytest.raises(LlavaEdgeError, match="could not build the decoder engine") as refused:
        build_engines(model, max_batch=2, log=quiet)
    assert "check finds" not in str(refused.value)  # the graph passes it: TensorRT's log says why
    assert (model / MANIFEST_NAME).read_bytes() == saved
    assert {p.name: p.read_bytes() for p in (model / "engines").glob("*.engine")} == engines
    assert not list((model / "engines").glob(".*.tmp"))


def test_tensorrt_that_cannot_start_cuda_says_so_in_one_line(
    stub, model: Path, monkeypatch
) -> None:
    """TensorRT logs "CUDA initialization failure with error: 35" (a driver older than its CUDA)
    and its Builder and Runtime constructors raise TypeError, which would be a traceback."""
    build_engines(model, log=quiet)

    def unstarted(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    monkeypatch.setattr(stub, "Builder", unstarted)
    monkeypatch.setattr(stub, "Runtime", unstarted)
    saved = (model / MANIFEST_NAME).read_bytes()
    with pytest.raises(
        LlavaEdgeError, match=r"TensorRT could not start on the Stub Orin .*CUDA 12\.6"
    ):
        build_engines(model, max_batch=2, log=quiet)
    assert (model / MANIFEST_NAME).read_bytes() == saved
    cudart_stub.calls.clear()
    with pytest.raises(LlavaEdgeError, match="TensorRT could not start on the Stub Orin"):
        backend(model)
    assert not [c for c in cudart_stub.calls if c[0] == "cudaStreamCreateWithFlags"]


def test_builds_and_models_loaded_together_share_the_logger_tensorrt_keeps(
    stub, model: Path
) -> None:
    """TensorRT passes every builder's and runtime's messages to one logger, the first one's, for
    as long as any of them lives: a model loaded beside another, or built while one is loaded,
    given a logger of its own would log through the first model's after that one is unloaded."""
    import gc

    build_engines(model, log=quiet)
    first = backend(model)
    seen = len(stub.errors)
    second = backend(model)  # loaded while the first still is
    del first
    gc.collect()  # the first model unloaded, and its runtime with it
    build_engines(model, log=quiet)  # while the second is loaded
    backend(model).close()
    second.close()
    assert not stub.errors[seen:]


def test_build_options_are_checked_before_anything_is_written(stub, model: Path) -> None:
    with pytest.raises(
        LlavaEdgeError, match="--max-context must be between 1 and the model's context 1024"
    ):
        build_engines(model, max_context=4096, log=quiet)
    for workspace in (0, float("nan"), float("inf")):  # argparse's float takes 'nan' and 'inf'
        with pytest.raises(LlavaEdgeError, match="--workspace must be a positive number of GiB"):
            build_engines(model, workspace_gb=workspace, log=quiet)
    assert not (model / "engines").exists()


def test_a_timing_cache_the_build_cannot_use_is_refused_before_building(
    stub, model: Path, tmp_path: Path, monkeypatch
) -> None:
    from llava_edge.runtime.tensorrt import build

    blocker = tmp_path / "a_file"
    blocker.write_text("not a dir")
    for path, message in [
        (tmp_path, "is a directory; name a file"),
        (blocker / "timing.cache", "cannot make the timing cache's dir"),
    ]:
        with pytest.raises(LlavaEdgeError, match=message):
            build_engines(model, timing_cache=path, log=quiet)

    def unreadable(path: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(build, "_read", unreadable)
    with pytest.raises(LlavaEdgeError, match="cannot read the timing cache .*Permission denied"):
        build_engines(model, timing_cache=blocker, log=quiet)
    assert not [c for c in stub.calls if c[0] == "build"]
    assert not Manifest.load(model).engines


@pytest.fixture(scope="module")
def fp16_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shape exported in fp16: a KV position of one row is 4 heads x 16 x 2 = 128 bytes,
    half of TensorRT's 256-byte alignment."""
    from llava_edge.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("fp16") / "model"
    export_checkpoint(tiny_checkpoint, out, dtype="fp16", verify=False, log=quiet)
    return out


def test_a_batched_cache_whose_rows_would_not_align_is_refused_at_build(
    stub, fp16_model: Path, model: Path, monkeypatch
) -> None:
    from llava_edge.runtime.tensorrt import build

    # what such engines do: a request joining the batch in row 1 binds its past off alignment
    with monkeypatch.context() as unchecked:
        unchecked.setattr(build, "_check_row_alignment", lambda *a: None, raising=False)
        build_engines(fp16_model, max_batch=2, kv_chunk=15, log=quiet)
    be = backend(fp16_model)
    cache = be.new_cache(2)
    embeds = np.zeros((1, 3, 64), np.float16)
    with pytest.raises(LlavaEdgeError, match="refused the address of past_key_values"):
        be.decode(embeds, np.ones((1, 3), np.int64), np.arange(3)[None], cache.rows(1, 2))
    be.close()

    with pytest.raises(LlavaEdgeError, match="kv_chunk 15 with --max-batch 2.*multiple of 2"):
        build_engines(fp16_model, max_batch=2, kv_chunk=15, log=quiet)
    with pytest.raises(
        LlavaEdgeError, match=r"--max-context 65 .*4 KV heads x 16 x 2 bytes.*give 64 or 66"
    ):
        build_engines(fp16_model, max_batch=2, max_context=65, kv_chunk=16, log=quiet)
    # one row, or an fp32 cache (256 bytes a position), always aligns
    build_engines(fp16_model, max_batch=1, max_context=65, kv_chunk=15, log=quiet)
    build_engines(model, max_batch=2, max_context=65, kv_chunk=15, log=quiet)


# ---- the backend ---------------------------------------------------------------------------


def test_backend_matches_onnxruntime_through_chunked_prefill_and_cache_growth(
    stub, model: Path
) -> None:
    # prefill in pieces of 32 tokens, the cache grows every 32: a 75-token prompt and 60 new
    # tokens cross both many times
    build_engines(model, prefill_chunk=32, kv_chunk=32, log=quiet)
    reference = Pipeline.load(model)
    trt = Pipeline(model, reference.manifest, backend(model))
    options = dict(max_new_tokens=60, ignore_eos=True)
    expected = reference.answer(image(), "What is in the picture?", **options)
    got = trt.answer(image(), "What is in the picture?", **options)
    assert len(expected.prompt_token_ids) > 64
    assert got.token_ids == expected.token_ids

    pixels = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(
        trt.backend.encode_image(pixels),
        reference.backend.encode_image(pixels),
        rtol=1e-5,
        atol=1e-5,
    )
    embeds = np.random.default_rng(3).standard_normal((1, 40, 64)).astype(np.float32)
    mask, positions = np.ones((1, 40), np.int64), np.arange(40)[None]
    logits = trt.backend.decode(embeds, mask, positions, trt.backend.new_cache(1))
    assert logits.dtype == np.float32 and logits.shape == (1, 576)
    ref = reference.backend.decode(embeds, mask, positions, reference.backend.new_cache(1))
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_batches_and_chats_match_onnxruntime(stub, model: Path) -> None:
    build_engines(model, max_batch=2, prefill_chunk=48, kv_chunk=64, log=quiet)
    reference = Pipeline.load(model)
    trt = Pipeline(model, reference.manifest, backend(model))
    requests = [
        (image(), "Describe it."),
        (None, "Say something much longer than the first one, please."),
    ]
    expected = reference.generate_batch(requests, max_new_tokens=12, ignore_eos=True)
    got = trt.generate_batch(requests, max_new_tokens=12, ignore_eos=True)
    assert [a.token_ids for a in got] == [a.token_ids for a in expected]
    chats = [p.chat(image(), max_new_tokens=8) for p in (reference, trt)]
    for question in ("What colour?", "And the shape?"):
        answers = [c.ask(question) for c in chats]
        assert answers[0] == answers[1]
    assert chats[1].cache.length == chats[0].cache.length
    with pytest.raises(LlavaEdgeError, match="batch of 3.*batch at most 2 .*--max-batch"):
        trt.backend.new_cache(3)
    # More requests than the engines' rows: the third waits for a free row.
    three = [*requests, (image(), "A third question.")]
    expected = reference.generate_batch(three, max_new_tokens=5, ignore_eos=True)
    got = trt.generate_batch(three, max_new_tokens=5, ignore_eos=True)
    assert [a.token_ids for a in got] == [a.token_ids for a in expected]


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_requests_join_and_leave_a_batch_on_the_device_cache(
    stub, model: Path, cuda_graph: bool
) -> None:
    """Each row of the device cache keeps its own length: a request prefilled alone into a free
    row decodes with the others, a finished row is refilled by moving the last one, and a next
    turn copies its conversation from the prefix store; each answers as it would alone."""
    from llava_edge.runtime import BatchEngine

    build_engines(model, max_batch=2, prefill_chunk=48, kv_chunk=16, log=quiet)
    reference = Pipeline.load(model)
    trt = Pipeline(model, reference.manifest, backend(model, cuda_graph=cuda_graph))
    asks = [(image(), "Describe it.", 3), (None, "Say something longer, please.", 20)]
    asks.append((image(), "And now?", 9))  # joins while the second still runs
    engine = BatchEngine(trt, max_batch=2, start=False)
    handles = [engine.submit(i, q, max_new_tokens=n, ignore_eos=True) for i, q, n in asks[:2]]
    while not handles[0].done.is_set():
        engine.step()
    assert engine.cache.lengths[1] == 0 and engine.cache.lengths[0] > 0  # the last row moved up
    handles.append(engine.submit(asks[2][0], asks[2][1], max_new_tokens=9, ignore_eos=True))
    engine.run_until_idle()
    for (picture, question, n), handle in zip(asks, handles, strict=True):
        alone = reference.answer(picture, question, max_new_tokens=n, ignore_eos=True)
        assert handle.result().token_ids == alone.token_ids
    turns = [("Describe it.", handles[0].result().text), ("And its colour?", None)]
    pixels = trt.image_pixels(image())
    ids = trt.conversation_ids(turns, pixels, image_turn=0)
    second = engine.submit_ids(ids, pixels, {"max_new_tokens": 6, "ignore_eos": True})
    engine.run_until_idle()
    assert second.result().timings["prefix_reused"] > 0
    assert trt.backend.cuda_graph == cuda_graph  # no capture was refused
    launches = [c for c in cudart_stub.calls if c[0] == "cudaGraphLaunch"]
    assert bool(launches) == cuda_graph  # batched decode steps replay their graphs
    fresh = BatchEngine(reference, max_batch=1, prefix_cache_mb=0, start=False)
    options = {"max_new_tokens": 6, "ignore_eos": True}
    want = fresh.submit_ids(ids, reference.image_pixels(image()), options)
    fresh.run_until_idle()
    assert second.result().token_ids == want.result().token_ids


def test_serve_runs_on_the_tensorrt_backend(stub, model: Path) -> None:
    """`llava-edge serve --backend tensorrt`: two concurrent answers from the engines, each the
    library's own."""
    from concurrent.futures import ThreadPoolExecutor

    from starlette.testclient import TestClient

    from llava_edge.serve import ServeOptions, create_app

    build_engines(model, max_batch=2, log=quiet)
    reference = Pipeline.load(model)
    options = ServeOptions(model, model_name="m", max_batch=2, backend="tensorrt")
    questions = ["Say something.", "Say something else, at more length."]
    with TestClient(create_app(options)) as client:
        deadline = time.time() + 60
        while client.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)  # the model loads in the background
        assert client.app.state.serve.pipe.backend.name == "tensorrt"

        def ask(question: str) -> dict:
            body = {"model": "m", "max_tokens": 8, "ignore_eos": True}
            body["messages"] = [{"role": "user", "content": question}]
            return client.post("/v1/chat/completions", json=body).json()

        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(ask, questions))
    for question, reply in zip(questions, replies, strict=True):
        want = reference.answer(None, question, max_new_tokens=8, ignore_eos=True)
        assert reply["choices"][0]["message"]["content"] == want.text


def test_the_engine_reads_the_kv_cache_where_it_lives(stub, model: Path) -> None:
    build_engines(model, log=quiet)
    be = backend(model)
    cache = be.new_cache(1)
    embeds = np.zeros((1, 5, 64), np.float32)
    be.decode(embeds, np.ones((1, 5), np.int64), np.arange(5)[None], cache)
    be.decode(embeds[:, :1], np.ones((1, 1), np.int64), np.array([[5]]), cache)
    context = be.engines["decoder"].context
    for layer, (past_k, past_v, present_k, _) in enumerate(be.names.layers):
        key, value = cache.past(layer)
        assert context.addresses[past_k] == key.ptr  # the cache itself, no copy
        assert context.addresses[past_v] == value.ptr
        assert context.addresses[present_k] == be.engines["decoder"].arena.address(present_k)
    assert context.shapes["past_key_values.0.key"] == (1, 4, 256, 16)
    assert context.shapes["attention_mask"] == (1, 257)
    profiles = [c[1] for c in stub.calls if c[0] == "set_optimization_profile_async"]
    assert profiles == [1]  # the new context starts on prefill (0); one switch to decode


def test_cuda_graphs_are_captured_once_per_capacity_and_replayed(stub, model: Path) -> None:
    build_engines(model, kv_chunk=16, log=quiet)
    reference = Pipeline.load(model)
    be = backend(model, cuda_graph=True)
    trt = Pipeline(model, reference.manifest, be)
    options = dict(max_new_tokens=40, ignore_eos=True)
    assert (
        trt.answer(None, "Hello there", **options).token_ids
        == reference.answer(None, "Hello there", **options).token_ids
    )
    captures = [c for c in cudart_stub.calls if c[0] == "cudaStreamBeginCapture"]
    launches = [c for c in cudart_stub.calls if c[0] == "cudaGraphLaunch"]
    runs = [c for c in stub.calls if c[0] == "execute_async_v3" and "decoder" in c[1]]
    # a prompt of ~10 tokens, then 39 decode steps over capacities 16, 32 and 48: at each
    # capacity one eager step, then a capture (in thread-local mode), then replays
    assert [c[1] for c in captures] == [
        cudart_stub.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    ] * 3
    assert len(launches) == 39 - 3
    assert len(runs) == 1 + 3 + 3  # the prefill, one eager step per capacity, each capture
    assert be.cuda_graph  # nothing refused the capture


def test_a_refused_capture_decodes_on_and_gives_its_graph_back(
    stub, model: Path, monkeypatch
) -> None:
    build_engines(model, kv_chunk=16, log=quiet)
    reference = Pipeline.load(model)
    be = backend(model, cuda_graph=True)
    trt = Pipeline(model, reference.manifest, be)
    refused = (cudart_stub.cudaError_t.cudaErrorStreamCaptureUnsupported, None)
    monkeypatch.setattr(cudart_stub, "cudaGraphInstantiate", lambda graph, flags: refused)
    options = dict(max_new_tokens=8, ignore_eos=True)
    with pytest.warns(UserWarning, match="CUDA graph capture of the decode step failed"):
        got = trt.answer(None, "Hello there", **options).token_ids
    assert got == reference.answer(None, "Hello there", **options).token_ids
    assert not be.cuda_graph  # decodes eagerly from then on
    ended = [c for c in cudart_stub.calls if c[0] == "cudaStreamEndCapture"]
    destroyed = [c for c in cudart_stub.calls if c[0] == "cudaGraphDestroy"]
    assert len(ended) == len(destroyed) == 1


def test_the_device_cache_truncates_and_a_chat_turn_rolls_back(stub, model: Path) -> None:
    from test_chat_turns import check_truncate

    build_engines(model, kv_chunk=4, log=quiet)  # the cut slots cross chunk boundaries
    be = backend(model)
    check_truncate(be, 64)
    cache = be.new_cache(1)
    be.decode(np.ones((1, 6, 64), np.float32), np.ones((1, 6), np.int64), np.arange(6)[None], cache)
    cache.truncate(2)
    for layer in range(len(be.names.layers)):
        for region in cache.past(layer):
            assert not be.cuda.to_host(region, be.stream)[:, :, 2:].any()

    reference = Pipeline.load(model)
    trt = Pipeline(model, reference.manifest, be)
    chats = [p.chat(image(), max_new_tokens=6, ignore_eos=True) for p in (reference, trt)]
    chats[0].ask("What colour?")
    chats[1].ask("What colour?")
    for _ in chats[1].stream("And the shape?"):
        break  # abandoned: rolled back
    assert chats[1].cache.length == chats[0].cache.length
    assert chats[1].ask("Where is it?") == chats[0].ask("Where is it?")


def test_the_device_cache_gives_back_the_capacity_its_rows_no_longer_need(
    stub, model: Path
) -> None:
    """Every decode step's attention reads every slot of the capacity, masked or not: once the
    rows fit in half of it (a long request left a batch that goes on, a chat's long answer was
    rolled back), they move into blocks of a smaller capacity and answer as before."""
    from llava_edge.runtime import BatchEngine

    build_engines(model, max_batch=2, kv_chunk=16, log=quiet)
    reference = Pipeline.load(model)
    trt = Pipeline(model, reference.manifest, backend(model))
    options = dict(ignore_eos=True)
    engine = BatchEngine(trt, max_batch=2, start=False)
    long = engine.submit(None, "word " * 150, max_new_tokens=6, **options)
    short = engine.submit(None, "Hi", max_new_tokens=30, **options)
    while not long.done.is_set():
        engine.step()
    cache = engine.cache
    assert 0 < cache.length < cache.capacity < 2 * (cache.length + cache.kv_chunk)
    engine.run_until_idle()
    alone = reference.answer(None, "Hi", max_new_tokens=30, **options)
    assert short.result().token_ids == alone.token_ids

    chats = [p.chat(None, max_new_tokens=4, **options) for p in (reference, trt)]
    chats[0].ask("Hi")
    chats[1].ask("Hi")
    cache, held = chats[1].cache, chats[1].cache.length
    stream = chats[1].stream("Go on.", max_new_tokens=200)
    for _ in stream:
        if cache.capacity >= 4 * (held + cache.kv_chunk):
            break
    assert cache.capacity >= 4 * (held + cache.kv_chunk)  # the turn grew it
    stream.close()  # rolled back
    assert cache.length == held < cache.capacity < 2 * (held + cache.kv_chunk)
    assert chats[1].ask("And then?") == chats[0].ask("And then?")


def test_a_shrink_without_memory_for_its_blocks_leaves_the_cache_as_it_was(
    stub, model: Path, monkeypatch
) -> None:
    build_engines(model, kv_chunk=16, log=quiet)
    be = backend(model)
    cache = be.new_cache(1)
    embeds = np.random.default_rng(0).standard_normal((1, 80, 64)).astype(np.float32)
    be.decode(embeds, np.ones((1, 80), np.int64), np.arange(80)[None], cache)
    cache.truncate(3)
    kept = [be.cuda.to_host(region, be.stream)[:, :, :3] for region in cache.past(0)]
    take, calls = cache.pool.take, []

    def second_fails(nbytes: int):
        calls.append(nbytes)
        if len(calls) == 2:
            raise MemoryError
        return take(nbytes)

    monkeypatch.setattr(cache.pool, "take", second_fails)
    cache.shrink()
    assert cache.capacity == 80 and cache.length == 3
    monkeypatch.undo()
    cache.shrink()
    assert cache.capacity == 16 and cache.length == 3
    for region, before in zip(cache.past(0), kept, strict=True):
        after = be.cuda.to_host(region, be.stream)
        assert np.array_equal(after[:, :, :3], before) and not after[:, :, 3:].any()


def test_engines_built_for_a_shorter_context_shorten_the_answer(stub, model: Path) -> None:
    build_engines(model, max_context=40, kv_chunk=16, log=quiet)
    reference = Pipeline.load(model)
    trt = Pipeline(model, reference.manifest, backend(model))
    answer = trt.answer(None, "Hello there", max_new_tokens=100, ignore_eos=True)
    assert answer.finish_reason == "length"
    assert len(answer.prompt_token_ids) + len(answer.token_ids) == 40
    with pytest.raises(LlavaEdgeError, match="context is 40"):
        trt.answer(None, "word " * 50)


# ---- compatibility at load ---------------------------------------------------------------------


def test_loading_elsewhere_says_to_rebuild(stub, model: Path, monkeypatch) -> None:
    build_engines(model, log=quiet)
    monkeypatch.setattr(stub, "__version__", "10.7.0.23")
    with pytest.raises(
        LlavaEdgeError,
        match=r"TensorRT 10\.3\.0\.30.*10\.7\.0\.23; rebuild them with `llava-edge build",
    ):
        backend(model)
    monkeypatch.setattr(stub, "__version__", "10.3.0.30")
    monkeypatch.setattr(
        gpu, "probe_gpu", lambda index=0: gpu.GpuInfo(0, "RTX 3090", "8.6", 1, 1, False, "12.6")
    )
    with pytest.raises(LlavaEdgeError, match="compute capability 8.7 .* is 8.6; rebuild"):
        backend(model)
    monkeypatch.setattr(gpu, "probe_gpu", lambda index=0: STUB_GPU)
    manifest = Manifest.load(model)
    manifest.kv.present_holds = "past+new"
    with pytest.raises(LlavaEdgeError, match="only the new tokens"):
        TensorRTBackend(model, manifest)
    engine_file(model, "decoder").write_bytes(b"not an engine")
    with pytest.raises(LlavaEdgeError, match=r"decoder\.\w+\.engine is truncated or altered"):
        backend(model)


def test_a_cuda_python_newer_than_the_driver_says_which_to_install(
    stub, model: Path, monkeypatch
) -> None:
    build_engines(model, log=quiet)
    too_new = (cudart_stub.cudaError_t.cudaErrorInsufficientDriver,)
    monkeypatch.setattr(cudart_stub, "cudaSetDevice", lambda index: too_new)
    with pytest.raises(
        LlavaEdgeError,
        match=r"cudaSetDevice failed: cudaErrorInsufficientDriver: the NVIDIA driver is older .*"
        r"pip install 'cuda-bindings>=12\.6,<13'",
    ):
        backend(model)


def test_build_refuses_engines_that_cannot_fit(stub, model: Path, monkeypatch) -> None:
    small_gpu = gpu.GpuInfo(0, "Stub Orin Nano", "8.7", 8 << 30, 300 << 20, True, "12.6")
    monkeypatch.setattr(gpu, "probe_gpu", lambda index=0: small_gpu)
    monkeypatch.setattr(gpu, "host_available_memory", lambda: 200 << 20)
    with pytest.raises(
        LlavaEdgeError,
        match=r"would need \d+\.\d+ GB .* has 0\.31 GB free; .*--skip-memory-check",
    ):
        build_engines(model, log=quiet)
    assert not [c for c in stub.calls if c[0] == "build"] and not (model / "engines").exists()
    build_engines(model, log=quiet, check_memory=False)  # the override builds anyway
    assert len([c for c in stub.calls if c[0] == "build"]) == 3


def test_a_batch_that_cannot_fit_is_told_the_batch_that_does(stub, model: Path, monkeypatch):
    from llava_edge.runtime.plan import Device, plan

    def total(batch: int) -> int:
        return plan(model, Device("gpu", 64 << 30, 0, None), "tensorrt", max_batch=batch).total

    free = (total(2) + total(64)) // 2  # batch 2 fits at the model's full context, 64 does not
    board = gpu.GpuInfo(0, "Stub Orin", "8.7", 64 << 30, free, False, "12.6")
    monkeypatch.setattr(gpu, "probe_gpu", lambda index=0: board)
    with pytest.raises(
        LlavaEdgeError, match=r"--max-batch \(at most (\d+) fits at --max-context 1024"
    ) as e:
        build_engines(model, max_batch=64, log=quiet)
    assert 2 <= int(e.value.args[0].split("--max-batch (at most ")[1].split()[0]) < 64


def test_a_jetson_counts_the_memory_linux_can_give_back(stub, model: Path, monkeypatch) -> None:
    # On an integrated GPU, CUDA's free memory can be less than what the board can allocate:
    # where Linux's MemAvailable says more, the engines fit.
    orin = gpu.GpuInfo(0, "Stub Orin Nano", "8.7", 8 << 30, 300 << 20, True, "12.6")
    monkeypatch.setattr(gpu, "probe_gpu", lambda index=0: orin)
    monkeypatch.setattr(gpu, "host_available_memory", lambda: 6 << 30)
    build_engines(model, log=quiet)
    assert len([c for c in stub.calls if c[0] == "build"]) == 3
    # a discrete GPU's own memory is what CUDA says, whatever the host has
    card = gpu.GpuInfo(0, "Stub L4", "8.9", 24 << 30, 300 << 20, False, "12.6")
    monkeypatch.setattr(gpu, "probe_gpu", lambda index=0: card)
    with pytest.raises(LlavaEdgeError, match=r"has 0\.31 GB free"):
        build_engines(model, out_dir=model / "l4", log=quiet)


def test_the_cuda_calls_exist_in_cuda_python_as_used(stub, model: Path, monkeypatch) -> None:
    """Every CUDA runtime name the backend used on the stand-in exists in the real bindings."""
    from cuda.bindings import runtime

    used = set()

    class Recording:
        def __getattr__(self, name):
            used.add(name)
            return getattr(cudart_stub, name)

    monkeypatch.setattr(cuda, "import_cudart", lambda: Recording())
    build_engines(model, kv_chunk=16, log=quiet)
    be = backend(model, cuda_graph=True)
    trt = Pipeline(model, Manifest.load(model), be)
    trt.answer(image(), "Hi", max_new_tokens=40, ignore_eos=True)
    chat = trt.chat(None, max_new_tokens=2)
    chat.ask("Hello")
    chat.cache.truncate(0)  # zeroes the forgotten slots
    be.close()
    assert {
        "cudaMalloc",
        "cudaMemcpy2DAsync",
        "cudaMemset2DAsync",
        "cudaStreamBeginCapture",
        "cudaGraphLaunch",
    } <= used
    missing = sorted(n for n in used if not hasattr(runtime, n))
    assert not missing
    mode = runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    assert int(mode) == int(cudart_stub.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    for kind in cudart_stub.cudaMemcpyKind:
        assert int(getattr(runtime.cudaMemcpyKind, kind.name)) == int(kind)
    assert runtime.cudaStreamNonBlocking == cudart_stub.cudaStreamNonBlocking


def test_the_runtime_and_the_tensorrt_backend_import_no_torch() -> None:
    import subprocess

    code = (
        "import sys\n"
        "import llava_edge.runtime, llava_edge.runtime.tensorrt.backend\n"
        "import llava_edge.runtime.tensorrt.build, llava_edge.runtime.plan\n"
        "print(sorted(m for m in ('torch', 'transformers', 'av') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_int4_engines_keep_an_fp16_kv_cache(stub, model: Path, tmp_path: Path) -> None:
    """The int4 TensorRT form computes in fp16: its engines take and give the KV cache in fp16,
    and the device cache holds half the bytes; answers equal onnxruntime running that form."""
    from llava_edge.calib.quantize import quantize_model
    from llava_edge.training.synth import synthesize

    images = synthesize(tmp_path / "calib", train=4, test=0)["images"]
    int4 = tmp_path / "int4"
    quantize_model(model, int4, "int4", calib=images, samples=2, log=quiet)
    build_engines(int4, kv_chunk=32, log=quiet)
    be = backend(int4)
    assert be.kv_dtype == "float16"
    cache = be.new_cache(1)
    cache.reserve(1)
    fp32 = 2 * 2 * 4 * 32 * 16 * 4  # keys and values, 2 layers, 4 heads, 32 slots, head_dim 16
    assert cache.block_bytes(32) == fp32 // 2
    # onnxruntime running the same TensorRT forms (its cache follows the graph: fp16 too); the
    # int8 vision encoder's and projector's too, whose `file` (dynamic int8) gives other features
    manifest = Manifest.load(int4)
    for graph in manifest.graphs.values():
        graph.file = graph.tensorrt_file or graph.file
    reference = Pipeline(int4, manifest, OnnxBackend(int4, manifest, graph_form="standard"))
    assert reference.backend.new_cache(1).dtype == np.float16
    trt = Pipeline(int4, manifest, be)
    options = dict(max_new_tokens=12, ignore_eos=True)
    want = reference.answer(image(), "What is it?", **options).token_ids
    assert trt.answer(image(), "What is it?", **options).token_ids == want


def test_a_build_removes_only_the_engines_it_replaces(stub, model: Path, tmp_path: Path) -> None:
    shared = tmp_path / "engines"  # one engine dir for a robot's models
    shared.mkdir()
    (shared / "detector.engine").write_bytes(b"another program's engine")
    other = tmp_path / "other"
    shutil.copytree(model, other)
    build_engines(model, out_dir=shared, log=quiet)
    first = set(p.name for p in shared.glob("*.engine"))
    build_engines(other, out_dir=shared, max_batch=2, log=quiet)  # other engines, same dir
    assert first <= set(p.name for p in shared.glob("*.engine"))
    assert (shared / "detector.engine").read_bytes() == b"another program's engine"
    key = str(shared.resolve())
    for path in (model, other):
        backend(path, engine_dir=shared).close()  # both models' engines are all there
    # a rebuild of the first model replaces its own old engines, and only those
    build_engines(model, out_dir=shared, max_context=512, log=quiet)
    names = set(p.name for p in shared.glob("*.engine"))
    recorded = {e.file for e in Manifest.load(model).engines[key].engines.values()}
    kept = {e.file for e in Manifest.load(other).engines[key].engines.values()}
    assert names == recorded | kept | {"detector.engine"}


def test_models_with_byte_identical_engines_in_one_dir_keep_their_own_files(
    stub, model: Path, tmp_path: Path, monkeypatch
) -> None:
    """Two fine-tunes sharing an engine dir can build byte-identical engines (a frozen vision
    tower): each records a file of its own, so one's rebuild never removes an engine the
    other's manifest names."""
    real = stub.Builder.build_serialized_network
    first: dict[str, bytes] = {}  # TensorRT's engines hold no source path; the stub's do

    def same_bytes(self, network, config):
        return first.setdefault(Path(network.path).name, real(self, network, config))

    monkeypatch.setattr(stub.Builder, "build_serialized_network", same_bytes)
    shared = tmp_path / "engines"
    other = tmp_path / "other"
    shutil.copytree(model, other)
    build_engines(model, out_dir=shared, log=quiet)
    build_engines(other, out_dir=shared, log=quiet)
    key = str(shared.resolve())
    mine, theirs = (Manifest.load(m).engines[key].engines for m in (model, other))
    assert [mine[n].sha256 for n in mine] == [theirs[n].sha256 for n in mine]  # the same bytes
    assert not {e.file for e in mine.values()} & {e.file for e in theirs.values()}
    monkeypatch.setattr(stub.Builder, "build_serialized_network", real)
    build_engines(model, out_dir=shared, max_context=512, log=quiet)  # replaces its own
    assert all((shared / e.file).is_file() for e in theirs.values())
    backend(other, engine_dir=shared).close()


def test_engines_reach_the_disk_before_the_manifest_names_them(
    stub, model: Path, monkeypatch
) -> None:
    from llava_edge.runtime.tensorrt import build

    events: list[str] = []
    real_fsync, real_save = os.fsync, Manifest.save

    def fsync(fd: int) -> None:
        events.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def save(self: Manifest, model_dir) -> None:
        events.append("manifest")
        real_save(self, model_dir)

    monkeypatch.setattr(build.os, "fsync", fsync)
    monkeypatch.setattr(Manifest, "save", save)
    build_engines(model, log=quiet)
    before = events[: events.index("manifest")]
    written = {name.split(".")[1] for name in before if name.endswith(".tmp")}
    assert {"vision_encoder", "projector", "decoder"} <= written  # each .NAME.engine.*.tmp
    assert "engines" in before  # the dir, for the renames


def test_a_backend_on_a_second_gpu_runs_from_any_thread(stub, model: Path) -> None:
    import threading

    build_engines(model, log=quiet)
    be = backend(model, device="cuda:1")  # the current device is per thread in CUDA
    stub.errors.clear()
    embeds = np.zeros((1, 5, 64), np.float32)
    size = (be.manifest.image.height, be.manifest.image.width)
    results: list = []

    def request() -> None:  # as the batching thread or a server's worker runs it
        try:
            cache = be.new_cache(1)
            be.decode(embeds, np.ones((1, 5), np.int64), np.arange(5)[None], cache)
            results.append(
                be.decode(embeds[:, :1], np.ones((1, 1), np.int64), np.array([[5]]), cache)
            )
            results.append(be.encode_image(np.zeros((1, 3, *size), np.float32)))
        except Exception as e:  # noqa: BLE001 (reported below)
            results.append(e)

    worker = threading.Thread(target=request)
    worker.start()
    worker.join()
    assert [type(r) for r in results] == [np.ndarray, np.ndarray], results
    assert not stub.errors
    assert {cudart_stub.device_of(a) for a in be.engines["decoder"].addresses.values()} == {1}
    be.close()
    cudart_stub.calls.clear()
    backend(model, device="2").close()  # an index as text is that GPU, not GPU 0
    assert ("cudaSetDevice", 2) in cudart_stub.calls


def test_close_frees_the_device_memory_of_caches_still_held(stub, model: Path) -> None:
    build_engines(model, log=quiet)
    before = cudart_stub.in_use()
    be = backend(model)
    cache = be.new_cache(1)  # e.g. a chat kept past the pipeline's `with` block
    be.decode(
        np.zeros((1, 5, 64), np.float32), np.ones((1, 5), np.int64), np.arange(5)[None], cache
    )
    be.close()
    assert cudart_stub.in_use() == before  # a model unloaded gives all its GPU memory back
    with pytest.raises(LlavaEdgeError, match="engines are closed"):
        be.decode(np.zeros((1, 1, 64), np.float32), np.ones((1, 1), np.int64), [[5]], cache)
    del cache  # dropping it later frees nothing twice
    assert cudart_stub.in_use() == before


def test_a_load_that_fails_gives_back_what_it_took(stub, model: Path, monkeypatch) -> None:
    from llava_edge.runtime.tensorrt import backend as trt_backend

    build_engines(model, log=quiet)
    before = cudart_stub.in_use()
    real = trt_backend.check_engine_io

    def decoder_differs(name, *args, **kwargs):  # the vision and projector engines loaded
        if name == "decoder":
            raise LlavaEdgeError("the decoder engine's inputs/outputs differ from the manifest")
        real(name, *args, **kwargs)

    monkeypatch.setattr(trt_backend, "check_engine_io", decoder_differs)
    for _ in range(2):  # a robot that retries, or falls back to onnxruntime, leaks nothing
        with pytest.raises(LlavaEdgeError, match="differ from the manifest"):
            backend(model)
    assert cudart_stub.in_use() == before
    created = [c for c in cudart_stub.calls if c[0] == "cudaStreamCreateWithFlags"]
    assert len([c for c in cudart_stub.calls if c[0] == "cudaStreamDestroy"]) == len(created)


def test_a_build_whose_manifest_cannot_be_saved_leaves_no_new_engines(
    stub, model: Path, monkeypatch
) -> None:
    build_engines(model, log=quiet)
    before = sorted(p.name for p in (model / "engines").glob("*.engine"))

    def disk_full(self, model_dir) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Manifest, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_engines(model, max_batch=2, log=quiet)  # other engines, renamed into place
    # the manifest still names the old engines, and nothing names the new ones: gone again
    assert sorted(p.name for p in (model / "engines").glob("*.engine")) == before


KILLED_BEFORE_THE_MANIFEST = """
import os, sys
sys.path.insert(0, {tests!r})
import tensorrt_stub
sys.modules["tensorrt"] = tensorrt_stub
from llava_edge.manifest import Manifest
from llava_edge.runtime.tensorrt import gpu
gpu.probe_gpu = lambda index=0: gpu.GpuInfo(0, "Stub Orin", "8.7", 8 << 30, 6 << 30, True, "12.6")
Manifest.save = lambda self, model_dir: os._exit(9)  # killed between the renames and the commit
from llava_edge.runtime.tensorrt.build import build_engines
build_engines({model!r}, out_dir={out!r}, max_batch=2, log=lambda *a: None)
"""


def test_the_next_build_removes_engines_a_killed_build_left(
    stub, model: Path, tmp_path: Path
) -> None:
    import subprocess

    shared = tmp_path / "engines"  # shared: only what the killed build wrote may go
    shared.mkdir()
    (shared / "detector.engine").write_bytes(b"another program's engine")
    build_engines(model, out_dir=shared, log=quiet)
    script = KILLED_BEFORE_THE_MANIFEST.format(
        tests=str(Path(__file__).parent), model=str(model), out=str(shared)
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert done.returncode == 9, done.stderr.decode()[-2000:]
    assert len(list(shared.glob("*.engine"))) == 1 + 3 + 3  # new engines no manifest names
    build_engines(model, out_dir=shared, log=quiet)
    recorded = {
        e.file for e in Manifest.load(model).engines[str(shared.resolve())].engines.values()
    }
    assert {p.name for p in shared.glob("*.engine")} == recorded | {"detector.engine"}


def test_a_timing_cache_that_cannot_be_saved_does_not_fail_a_finished_build(
    stub, model: Path, tmp_path: Path, monkeypatch
) -> None:
    from llava_edge.runtime.tensorrt import build

    cache = tmp_path / "shared" / "timing.cache"  # e.g. on a full or read-only share
    real = build._write

    def full(path: Path, data) -> tuple[int, str]:
        if path.name.startswith(".timing.cache."):
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(build, "_write", full)
    said: list[str] = []
    assert build_engines(model, timing_cache=cache, log=said.append) == model / "engines"
    assert set(Manifest.load(model).engines["engines"].engines) == set(Manifest.load(model).graphs)
    assert any("could not save the timing cache" in line for line in said)
    assert not list(cache.parent.glob("*.tmp"))


def test_a_decoder_whose_past_and_present_differ_in_type_is_refused(
    stub, model: Path, monkeypatch
) -> None:
    # The device cache copies present into past byte for byte: one type for both, or garbage
    manifest = Manifest.load(model)
    manifest.graphs["decoder"].tensorrt_file = "decoder.onnx"  # a TensorRT form: fp16 allowed
    manifest.save(model)
    build_engines(model, log=quiet)
    real = stub._Engine.get_tensor_dtype
    monkeypatch.setattr(
        stub._Engine,
        "get_tensor_dtype",
        lambda self, name: stub.DataType.HALF if name.startswith("present") else real(self, name),
    )
    before = cudart_stub.in_use()
    with pytest.raises(LlavaEdgeError, match="past keys/values are float32 and its present"):
        backend(model)
    assert cudart_stub.in_use() == before


def test_a_conversation_at_the_engines_context_holds_the_kv_memory_plan_counts(
    stub, model: Path, monkeypatch
) -> None:
    # `build` refuses engines whose KV cache at --max-context does not fit (llava-edge plan): a
    # conversation grown to that context, cache growth and the pool included, must not hold more
    from llava_edge.runtime.plan import Device, plan

    build_engines(model, max_context=256, prefill_chunk=64, kv_chunk=32, log=quiet)
    be = backend(model)
    before, peak = cudart_stub.in_use(), [0]
    real = cudart_stub.cudaMalloc

    def malloc(nbytes: int):
        result = real(nbytes)
        peak[0] = max(peak[0], cudart_stub.in_use())
        return result

    monkeypatch.setattr(cudart_stub, "cudaMalloc", malloc)
    for _ in range(2):  # a second request reuses what the pool kept
        cache = be.new_cache(1)
        for start in range(0, 256, 64):
            be.decode(
                np.zeros((1, 64, 64), np.float32),
                np.ones((1, 64), np.int64),
                np.arange(start, start + 64)[None],
                cache,
            )
        del cache
    counted = plan(model, Device("gpu", 8 << 30, 0, None), "tensorrt", max_context=256).kv_cache
    text = be.manifest.text  # growing holds one layer's keys (or values) twice, for a moment
    one_region = text.num_kv_heads * 256 * text.head_dim * np.dtype(be.kv_dtype).itemsize
    assert peak[0] - before <= counted + one_region + 4096  # and each block's alignment slack
    be.close()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_engine_cut_off_while_written_leaves_no_partial_file(
    stub, model: Path, monkeypatch, failure: BaseException
) -> None:
    # a full disk, or Ctrl-C during the long write of a large engine: no partial file stays
    from llava_edge.runtime.tensorrt import build

    real_fsync = build.os.fsync
    failed: list[str] = []

    def fsync(fd: int) -> None:
        name = Path(build.os.readlink(f"/proc/self/fd/{fd}")).name
        if ".engine." in name and name.endswith(".tmp") and not failed:
            failed.append(name)
            raise failure
        real_fsync(fd)

    monkeypatch.setattr(build.os, "fsync", fsync)
    with pytest.raises(type(failure)):
        build_engines(model, log=quiet)
    assert failed and failed[0].startswith(".vision_encoder.engine.")
    assert not [p.name for p in (model / "engines").iterdir() if "engine" in p.name]
    assert not Manifest.load(model).engines


def test_a_build_that_could_not_record_its_engines_refuses_before_building(
    stub, model: Path, tmp_path: Path, monkeypatch
) -> None:
    # the manifest names the engines: a model dir on a read-only disk (a robot's image) would
    # fail the build at its end, after every engine was built
    import errno
    import tempfile

    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # noqa: A002 (tempfile's name)
        if Path(dir).resolve() == model.resolve():
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(LlavaEdgeError, match=f"cannot write to the model dir {model}: Read-only"):
        build_engines(model, tmp_path / "engines", log=quiet)
    assert not [c for c in stub.calls if c[0] == "build"]
    monkeypatch.setattr(tempfile, "mkstemp", real)
    (tmp_path / "a-file").write_text("")  # --out naming a file
    with pytest.raises(LlavaEdgeError, match="cannot write to the engine dir .*a-file"):
        build_engines(model, tmp_path / "a-file", log=quiet)
    assert not [c for c in stub.calls if c[0] == "build"]


def test_two_builds_into_one_engine_dir_at_once_keep_their_own_engines(
    stub, model: Path, tmp_path: Path, monkeypatch
) -> None:
    # an engine dir shared by two fine-tunes of one model, built at the same time (a CI job)
    import threading

    from llava_edge.manifest import sha256
    from llava_edge.runtime.tensorrt import build

    other = tmp_path / "other"
    shutil.copytree(model, other)
    shared = tmp_path / "engines"
    both_writing = threading.Barrier(2, timeout=60)
    real_fsync = build.os.fsync

    saving = threading.Barrier(2, timeout=60)

    def fsync(fd: int) -> None:
        name = Path(build.os.readlink(f"/proc/self/fd/{fd}")).name
        if name.startswith(".decoder.engine"):
            both_writing.wait()  # each has written its decoder engine, neither renamed it yet
        if name.startswith(".timing-"):
            saving.wait()  # and each its timing cache, into the one they share
        real_fsync(fd)

    monkeypatch.setattr(build.os, "fsync", fsync)
    failures: list[BaseException] = []
    said: list[str] = []  # neither build may fail to save its timings

    def run(path: Path) -> None:
        try:
            build_engines(
                path, shared, log=lambda line: said.append(line) if "timing" in line else None
            )
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=run, args=(path,)) for path in (model, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and not said
    for path in (model, other):
        record = Manifest.load(path).engines[str(shared.resolve())]
        for spec in record.engines.values():
            assert sha256(shared / spec.file) == spec.sha256
    assert len(timing_entries(shared / "timing-10.3.0.30.cache")) == 3  # one build's, whole
    assert not list(shared.glob(".*.tmp"))


def test_the_next_build_removes_what_a_killed_build_was_writing(stub, model: Path) -> None:
    import subprocess

    build_engines(model, log=quiet)
    engines = model / "engines"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=-1)
    killed = engines / f".decoder.engine.{int(gone.stdout)}-0badcafe.tmp"  # its process is gone
    running = engines / f".decoder.engine.{os.getpid()}-0badcafe.tmp"  # another build, running
    timing = engines / f".timing-10.3.0.30.cache.{int(gone.stdout)}-0badcafe.tmp"
    killed.write_bytes(b"part of an engine")
    running.write_bytes(b"part of an engine")
    timing.write_bytes(b"part of a timing cache")
    build_engines(model, log=quiet)
    assert not killed.exists() and running.exists() and not timing.exists()


def test_a_build_tensorrt_refuses_names_what_the_compatibility_check_finds(
    stub, model: Path, monkeypatch
) -> None:
    """TensorRT's log is long and device-side; the one line names what llava-edge's own check
    finds in the graph (an operator TensorRT 10.3 lacks, say)."""
    from llava_edge.calib import trt_check

    manifest = Manifest.load(model)
    decoder = model / (manifest.graphs["decoder"].tensorrt_file or manifest.graphs["decoder"].file)
    findings = {decoder: ["decoder: operator com.microsoft:MatMulNBits is not in TensorRT 10.3"]}
    monkeypatch.setattr(trt_check, "check_graph", lambda path: findings.get(Path(path), []))
    refuse_to_build(stub, monkeypatch, "decoder")
    with pytest.raises(LlavaEdgeError) as refused:
        build_engines(model, log=quiet)
    assert "check finds: decoder: operator com.microsoft:MatMulNBits" in str(refused.value)


@pytest.mark.parametrize("name", ["../../victim.txt", "ABSOLUTE"])
def test_a_manifest_naming_an_engine_outside_its_dir_is_refused_before_a_rebuild_deletes_it(
    stub, model: Path, tmp_path: Path, name: str
) -> None:
    """A rebuild deletes the engines its previous build recorded: a model dir shared with a
    record naming ../../victim.txt or an absolute path deleted that file instead."""
    import json

    victim = tmp_path / "victim.txt"
    victim.write_text("a file of the user's")
    build_engines(model, log=quiet)
    path = model / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["engines"]["engines"]["engines"]["decoder"]["file"] = (
        str(victim) if name == "ABSOLUTE" else name
    )
    path.write_text(json.dumps(data))
    with pytest.raises(LlavaEdgeError, match="is not a file name in its engine dir"):
        build_engines(model, log=quiet)
    assert victim.read_text() == "a file of the user's"
