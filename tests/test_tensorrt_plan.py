"""The TensorRT backend's pure logic: profiles, buffer plans, the device KV cache, compatibility
checks and IO names. Runs everywhere (the device memory through tests/cudart_stub.py, on the
host)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import MANIFEST_NAME, EngineSet, EngineSpec, FileEntry, Manifest, sha256
from llava_edge.runtime.tensorrt import buffers, profiles
from llava_edge.runtime.tensorrt.compat import (
    Platform,
    check_engine_io,
    check_engines,
    engine_dir_key,
    numpy_dtype,
    same_tensorrt,
    select_engines,
)
from llava_edge.runtime.tensorrt.cuda import Allocation, Cuda, DeviceArray
from llava_edge.runtime.tensorrt.device_cache import DeviceKVCache, KVPool
from llava_edge.runtime.tensorrt.names import io_names
from llava_edge.runtime.tensorrt.profiles import DECODE, PREFILL, EngineLimits, graph_profiles

ORIN = Platform("10.3.0.30", "Orin", "8.7")


@pytest.fixture(scope="module")
def manifest(tiny_model_dir: Path) -> Manifest:
    return Manifest.load(tiny_model_dir)


def llava_7b(manifest: Manifest) -> Manifest:
    """The tiny manifest with LLaVA-1.5-7B's text shapes in fp16 (for sizes only)."""
    text = dataclasses.replace(
        manifest.text,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        vocab_size=32064,
        max_context=4096,
        dtype="float16",
    )
    return dataclasses.replace(manifest, text=text, num_image_tokens=576)


# ---- profiles ------------------------------------------------------------------------------


def test_decoder_profiles_keep_the_mask_as_long_as_past_plus_seq(manifest: Manifest) -> None:
    limits = EngineLimits(max_batch=4, max_context=1024, prefill_chunk=128, kv_chunk=256)
    prefill, decode = graph_profiles(manifest, "decoder", limits)
    assert (prefill.name, decode.name) == (PREFILL, DECODE)
    decoder = manifest.graphs["decoder"]
    for profile in (prefill, decode):
        shapes = profile.shapes(decoder.inputs)
        assert set(shapes) == set(decoder.inputs)
        for point in range(3):
            batch, seq, _ = shapes["inputs_embeds"][point]
            past = shapes["past_key_values.0.key"][point][2]
            assert shapes["attention_mask"][point] == [batch, past + seq]
            assert shapes["position_ids"][point] == [batch, seq]
            assert shapes["past_key_values.1.value"][point] == [batch, 4, past, 16]
        for low, opt, high in shapes.values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
    assert prefill.dims["seq"] == (1, 64 + profiles.PROMPT_TEXT_TOKENS, 128)
    assert decode.dims["seq"] == (1, 1, 1)
    assert prefill.dims["past"][::2] == decode.dims["past"][::2] == (256, 1024)
    assert prefill.dims["batch"] == (1, 1, 4)
    # opt past is a cache capacity: whole chunks holding a typical prompt (and answer)
    assert prefill.dims["past"][1] == 256 and decode.dims["past"][1] == 256


def test_profiles_shrink_to_a_context_shorter_than_one_chunk(manifest: Manifest) -> None:
    prefill, decode = graph_profiles(manifest, "decoder", EngineLimits(1, 100, 512, 256))
    assert prefill.dims["past"] == decode.dims["past"] == (100, 100, 100)
    assert prefill.dims["seq"] == (1, 100, 100)


def test_vision_profiles_vary_the_batch_only(manifest: Manifest) -> None:
    (vision,) = graph_profiles(manifest, "vision_encoder", EngineLimits(max_batch=3))
    assert vision.shapes(manifest.graphs["vision_encoder"].inputs) == {
        "pixel_values": [[1, 3, 64, 64], [1, 3, 64, 64], [3, 3, 64, 64]]
    }
    (projector,) = graph_profiles(manifest, "projector", EngineLimits(max_batch=3))
    assert projector.shapes(manifest.graphs["projector"].inputs)["image_features"][2] == [3, 64, 32]


def test_bad_limits_and_unknown_dims_say_what_is_wrong(manifest: Manifest) -> None:
    with pytest.raises(LlavaEdgeError, match="--max-batch must be at least 1, got 0"):
        graph_profiles(manifest, "decoder", EngineLimits(max_batch=0))
    assert profiles.resolve(["batch", 7, "past+seq"], {"batch": 2, "past": 5, "seq": 3}) == [
        2,
        7,
        8,
    ]
    with pytest.raises(LlavaEdgeError, match="'frames'"):
        profiles.resolve(["frames"], {"batch": 1}, "video")


def test_capacity_is_whole_chunks_up_to_the_context() -> None:
    assert [profiles.capacity(n, 256, 1000) for n in (1, 256, 257, 999)] == [256, 256, 512, 1000]


def test_onnxruntime_tensorrt_provider_gets_explicit_profiles(manifest: Manifest) -> None:
    from llava_edge.runtime.onnx_backend import provider_options

    options = provider_options("TensorrtExecutionProvider", manifest, "decoder", Path("/c"))
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_path"] == "/c"
    # the provider names engines by the graph's file and node names, not its weights: each
    # graph's engines sit in a dir named by its content, so a cache dir shared by two models of
    # one shape (or a model re-quantized in place) never runs the other one's engines
    engines = Path(options["trt_engine_cache_path"])
    assert engines.parent == Path("/c") and engines.name.startswith("decoder-")
    other = dataclasses.replace(manifest, files=dict(manifest.files))
    other.files["decoder.onnx"] = dataclasses.replace(other.files["decoder.onnx"], sha256="0" * 64)
    moved = provider_options("TensorrtExecutionProvider", other, "decoder", Path("/c"))
    assert moved["trt_engine_cache_path"] != str(engines)
    assert moved["trt_profile_max_shapes"] == options["trt_profile_max_shapes"]
    low = dict(item.split(":") for item in options["trt_profile_min_shapes"].split(","))
    high = dict(item.split(":") for item in options["trt_profile_max_shapes"].split(","))
    assert set(low) == set(manifest.graphs["decoder"].inputs)
    # the onnxruntime backend starts from an empty cache and prefills in one call
    assert low["past_key_values.0.key"] == "1x4x0x16" and low["attention_mask"] == "1x1"
    assert high["inputs_embeds"] == "1x1024x64" and high["attention_mask"] == "1x2048"
    # tuned for the past the host cache really feeds after a typical prompt
    from llava_edge.runtime.kv_cache import KVCache

    opt = dict(item.split(":") for item in options["trt_profile_opt_shapes"].split(","))
    cache = KVCache(manifest.text, 1)
    cache.reserve(manifest.num_image_tokens + profiles.PROMPT_TEXT_TOKENS)
    assert opt["past_key_values.0.key"] == f"1x4x{cache.capacity}x16"
    vision = provider_options("TensorrtExecutionProvider", manifest, "vision_encoder", Path("/c"))
    assert vision["trt_profile_opt_shapes"] == "pixel_values:1x3x64x64"
    assert provider_options("CUDAExecutionProvider", manifest, "decoder", Path("/c")) == {}


# ---- buffer plans ----------------------------------------------------------------------------


def test_buffer_plan_aligns_every_tensor_and_sizes_it_for_the_largest_shape() -> None:
    plan = buffers.plan(
        {
            "a": ((3, 5), "float16"),
            "b": ((7,), "int64"),
            "c": ((1, 300), "float32"),
            "d": ((0,), "float32"),
        }
    )
    slots = list(plan.slots.values())
    assert [s.nbytes for s in slots] == [30, 56, 1200, 0]
    assert all(s.offset % buffers.ALIGNMENT == 0 for s in slots)
    for before, after in zip(slots, slots[1:], strict=False):
        assert after.offset >= before.offset + before.nbytes
    assert plan.nbytes % buffers.ALIGNMENT == 0 and plan.nbytes >= slots[-1].offset


@pytest.fixture
def device() -> Cuda:
    import cudart_stub

    cudart_stub.reset()
    return Cuda(cudart_stub)


def test_arena_views_are_aligned_and_disjoint(device: Cuda) -> None:
    plan = buffers.plan({"x": ((3,), "float32"), "y": ((10,), "int64"), "z": ((5,), "float16")})
    arena = buffers.Arena(plan, device)
    stream = device.stream()
    assert all(arena.address(name) % 256 == 0 for name in plan.slots)
    device.to_device(arena.view("x", (3,)), np.full(3, 1.5), stream)
    device.to_device(arena.view("y", (2, 5)), np.full((2, 5), -1), stream)
    device.to_device(arena.view("z", (5,)), np.zeros(5), stream)
    assert device.to_host(arena.view("x", (3,)), stream).tolist() == [1.5] * 3
    assert device.to_host(arena.view("y", (2, 5)), stream).tolist() == [[-1] * 5] * 2
    with pytest.raises(ValueError, match="does not fit"):
        arena.view("x", (4,))
    arena.free()


# ---- the device KV cache ---------------------------------------------------------------------


def test_a_7b_cache_at_full_context_is_what_the_docs_budget(manifest: Manifest, device) -> None:
    text = llava_7b(manifest).text
    cache = DeviceKVCache(text, 1, 4096, 256, device, device.stream(), KVPool(device, 0))
    assert cache.block_bytes(4096) == 2 * 32 * 32 * 4096 * 128 * 2  # 2 GiB at fp16
    assert cache.capacity == 0  # nothing is taken before the conversation needs it


def upload(device: Cuda, array: np.ndarray, stream) -> DeviceArray:
    memory = Allocation(device, array.nbytes)
    target = DeviceArray(memory.ptr, array.shape, array.dtype)
    device.to_device(target, array, stream)
    return target


def test_device_cache_grows_by_chunks_and_keeps_what_was_appended(
    manifest: Manifest, device: Cuda
) -> None:
    text = manifest.text
    stream = device.stream()
    pool = KVPool(device, keep_bytes=10**9)
    cache = DeviceKVCache(text, 2, 20, 4, device, stream, pool)
    rng = np.random.default_rng(0)
    keys, values, masks, capacities = [], [], [], []
    for seq in (3, 1, 1, 5, 1, 6):
        cache.reserve(seq)
        capacities.append(cache.capacity)
        mask = np.ones((2, seq), dtype=np.int64)
        mask[1, 0] = 0
        masks.append(mask)
        assert cache.attention_mask(mask).shape == (2, cache.capacity + seq)
        for layer in range(text.num_layers):
            k = rng.standard_normal((2, text.num_kv_heads, seq, text.head_dim)).astype(np.float32)
            v = rng.standard_normal(k.shape).astype(np.float32)
            cache.append(layer, upload(device, k, stream), upload(device, v, stream))
            if layer == 1:
                keys.append(k)
                values.append(v)
        cache.advance(mask)
    assert capacities == [4, 4, 8, 12, 12, 20]
    past_k, past_v = (device.to_host(t, stream) for t in cache.past(1))
    assert past_k.shape == (2, text.num_kv_heads, 20, text.head_dim)
    np.testing.assert_array_equal(past_k[:, :, :17], np.concatenate(keys, axis=2))
    np.testing.assert_array_equal(past_v[:, :, :17], np.concatenate(values, axis=2))
    assert not past_k[:, :, 17:].any()  # unused slots hold zeros (masked, never NaN garbage)
    expected = np.concatenate(masks + [np.zeros((2, 3), dtype=np.int64)], axis=1)
    np.testing.assert_array_equal(cache.valid, expected)
    with pytest.raises(LlavaEdgeError, match="--max-context"):
        cache.reserve(4)
    # a rolled-back turn: the slots after 10 are zero again and free to be written
    cache.truncate(10)
    past_k = device.to_host(cache.past(1)[0], stream)
    np.testing.assert_array_equal(past_k[:, :, :10], np.concatenate(keys, axis=2)[:, :, :10])
    assert cache.length == 10 and not past_k[:, :, 10:].any() and not cache.valid[:, 10:].any()
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(11)


def test_a_cache_that_cannot_grow_is_left_as_it_was(manifest: Manifest, device: Cuda) -> None:
    import cudart_stub

    text, stream = manifest.text, device.stream()
    pool = KVPool(device, keep_bytes=0)
    cache = DeviceKVCache(text, 2, 64, 16, device, stream, pool)
    cache.reserve(10)
    rng = np.random.default_rng(0)
    for layer in range(text.num_layers):
        k, v = rng.standard_normal((2, 2, text.num_kv_heads, 10, text.head_dim)).astype(np.float32)
        cache.append(layer, upload(device, k, stream), upload(device, v, stream))
    cache.advance(np.ones((2, 10), np.int64))

    def contents() -> list[np.ndarray]:
        return [device.to_host(t, stream) for i in range(text.num_layers) for t in cache.past(i)]

    before, valid = contents(), cache.valid.copy()
    # room for the first layer's keys at 32 slots, not for the next block: it fails half-grown
    cudart_stub.limit = cudart_stub.in_use() + 3 * cache.region_bytes(32) // 2
    try:
        with pytest.raises(LlavaEdgeError, match="out of GPU memory"):
            cache.reserve(20)
        assert pool.allocated == 2 * text.num_layers + 1
        assert cache.capacity == 16 and (cache.valid == valid).all()
        for now, then in zip(contents(), before, strict=True):
            np.testing.assert_array_equal(now, then)
        cache.truncate(5)  # a chat turn rolled back after the failure
        cudart_stub.limit = None
        cache.reserve(20)
        assert cache.capacity == 32
        for now, then in zip(contents(), before, strict=True):
            np.testing.assert_array_equal(now[:, :, :5], then[:, :, :5])
            assert not now[:, :, 5:].any()
        fresh = DeviceKVCache(text, 2, 64, 16, device, stream, pool)
        cudart_stub.limit = cudart_stub.in_use() + cache.region_bytes(16)
        with pytest.raises(LlavaEdgeError, match="out of GPU memory"):
            fresh.reserve(1)  # its first blocks: given back, the cache still empty
        assert fresh.capacity == 0 and pool.kept >= 1
    finally:
        cudart_stub.limit = None


def test_a_cache_collected_while_the_pool_is_busy_does_not_hang_it(
    manifest: Manifest, device: Cuda, monkeypatch
) -> None:
    # the cycle collector runs at any allocation, on the thread that allocates: a cache caught
    # in a cycle (a traceback holding the frame it lived in) gives its blocks back right there
    import gc
    import threading

    stream = device.stream()
    pool = KVPool(device, keep_bytes=10**9)
    real = KVPool._trim

    def collecting(self, new):
        gc.enable()
        gc.collect()
        return real(self, new)

    monkeypatch.setattr(KVPool, "_trim", collecting)
    gc.disable()  # the collector runs inside the pool's lock, not at an allocation before it
    try:
        cache = DeviceKVCache(manifest.text, 1, 64, 16, device, stream, pool)
        cache.reserve(1)
        cache.cycle = cache  # garbage only the cycle collector frees
        del cache
        worker = threading.Thread(target=pool.take, args=(4096,), daemon=True)
        worker.start()
        worker.join(timeout=30)
    finally:
        gc.enable()
    assert not worker.is_alive(), "the pool deadlocked on its own lock"
    assert pool.kept == 2 * manifest.text.num_layers  # the collected cache's blocks came back


def test_cache_memory_comes_from_a_pool_reused_across_requests(
    manifest: Manifest, device: Cuda
) -> None:
    import cudart_stub

    stream = device.stream()
    pool = KVPool(device, keep_bytes=10**9)

    def request() -> int:
        cache = DeviceKVCache(manifest.text, 1, 64, 16, device, stream, pool)
        cache.reserve(20)  # 32 slots
        cache.advance(np.ones((1, 20), np.int64))
        cache.reserve(20)  # grows to 48: a second block; the first goes back to the pool
        return cache.capacity

    blocks = 2 * manifest.text.num_layers  # a capacity: one block for each layer's keys, values
    before = cudart_stub.in_use()
    assert request() == 48
    allocated = pool.allocated
    assert allocated == 2 * blocks and pool.kept == 2 * blocks  # both capacities' wait in the pool
    for _ in range(5):
        request()
    assert pool.allocated == allocated  # the same blocks served every request
    assert cudart_stub.in_use() - before > 0
    small = KVPool(device, keep_bytes=0)  # keeps nothing: blocks are freed on the next take
    for _ in range(3):
        cache = DeviceKVCache(manifest.text, 1, 64, 16, device, stream, small)
        cache.reserve(20)
        del cache
    assert small.kept <= blocks
    pool.close()
    small.close()


# ---- engine compatibility ----------------------------------------------------------------------


def engine_set(manifest: Manifest, engine_dir: Path, **changes) -> EngineSet:
    """A record of engines written to `engine_dir` for the tiny model."""
    engines = {}
    for name, graph in manifest.graphs.items():
        path = engine_dir / f"{name}.engine"
        path.write_bytes(name.encode() * 10)
        engines[name] = EngineSpec(
            f"{name}.engine",
            graph.file,
            manifest.graph_digest(graph.file),
            path.stat().st_size,
            sha256(path),
        )
    record = EngineSet("10.3.0.30", "Orin", "8.7", 1, 1024, 512, 256, engines)
    return dataclasses.replace(record, **changes)


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns("engines*"))
    return out


def test_engines_load_only_where_they_were_built(manifest: Manifest, model_copy: Path) -> None:
    engine_dir = model_copy / "engines"
    engine_dir.mkdir()
    record = engine_set(manifest, engine_dir)
    assert check_engines(record, engine_dir, manifest, model_copy, ORIN) == []
    assert same_tensorrt("10.3.0.30", "10.3.0.30") and not same_tensorrt("10.3.0", "10.4.0")
    # the build number too (a JetPack update within TensorRT 10.3)
    with pytest.raises(LlavaEdgeError, match=r"TensorRT 10\.3\.0\.30.*TensorRT 10\.3\.0\.26"):
        check_engines(
            record, engine_dir, manifest, model_copy, Platform("10.3.0.26", "Orin", "8.7")
        )
    with pytest.raises(
        LlavaEdgeError, match=r"TensorRT 10\.3\.0\.30.*TensorRT 10\.7\.0.*llava-edge build"
    ):
        check_engines(record, engine_dir, manifest, model_copy, Platform("10.7.0", "Orin", "8.7"))
    with pytest.raises(LlavaEdgeError, match=r"compute capability 8\.7.*is 8\.6; rebuild"):
        check_engines(
            record, engine_dir, manifest, model_copy, Platform("10.3.0.30", "RTX A4000", "8.6")
        )
    (warning,) = check_engines(
        record, engine_dir, manifest, model_copy, Platform("10.3.0.30", "Orin NX", "8.7")
    )
    assert "Orin NX" in warning and "rebuild" in warning


def test_a_changed_graph_or_damaged_engine_asks_for_a_rebuild(
    manifest: Manifest, model_copy: Path
) -> None:
    engine_dir = model_copy / "engines"
    engine_dir.mkdir()
    record = engine_set(manifest, engine_dir)
    stale = dataclasses.replace(
        record,
        engines={
            **record.engines,
            "decoder": dataclasses.replace(record.engines["decoder"], source_sha256="0" * 64),
        },
    )
    with pytest.raises(LlavaEdgeError, match="decoder.onnx changed.*rebuild"):
        check_engines(stale, engine_dir, manifest, model_copy, ORIN)
    (engine_dir / "projector.engine").write_bytes(b"x")
    with pytest.raises(LlavaEdgeError, match="projector.engine is truncated.*rebuild"):
        check_engines(record, engine_dir, manifest, model_copy, ORIN)
    (engine_dir / "projector.engine").unlink()
    with pytest.raises(LlavaEdgeError, match="projector.engine is missing"):
        check_engines(record, engine_dir, manifest, model_copy, ORIN)


def test_an_engine_is_stale_once_the_weights_in_its_graphs_data_file_change(
    manifest: Manifest, model_copy: Path
) -> None:
    """A graph over 1.8 GB keeps its weights in `<graph>.data`, and its `.onnx` is then the same
    for every checkpoint of one shape: re-quantizing a fine-tune in place changes only the
    `.data`, and its engine must be rebuilt."""
    engine_dir = model_copy / "engines"
    engine_dir.mkdir()
    before = copy.deepcopy(manifest)
    before.files["decoder.onnx.data"] = FileEntry(size=10, sha256="a" * 64)
    record = engine_set(before, engine_dir)
    assert check_engines(record, engine_dir, before, model_copy, ORIN) == []
    after = copy.deepcopy(before)
    after.files["decoder.onnx.data"] = FileEntry(size=10, sha256="b" * 64)
    assert after.graph_digest("decoder.onnx") != before.graph_digest("decoder.onnx")
    assert after.graph_digest("projector.onnx") == manifest.files["projector.onnx"].sha256
    with pytest.raises(LlavaEdgeError, match="decoder.onnx changed.*rebuild"):
        check_engines(record, engine_dir, after, model_copy, ORIN)


def test_engine_sets_are_chosen_by_dir_or_by_platform(
    manifest: Manifest, model_copy: Path, tmp_path: Path
) -> None:
    with pytest.raises(LlavaEdgeError, match="no TensorRT engines yet.*llava-edge build"):
        select_engines(manifest, model_copy, None, ORIN)
    outside = tmp_path / "x86"
    outside.mkdir()
    (model_copy / "engines").mkdir()
    manifest = dataclasses.replace(
        manifest,
        engines={
            "engines": engine_set(manifest, model_copy / "engines"),
            engine_dir_key(model_copy, outside): engine_set(
                manifest, outside, gpu="L4", compute_capability="8.9"
            ),
        },
    )
    assert engine_dir_key(model_copy, model_copy / "engines") == "engines"
    assert select_engines(manifest, model_copy, None, ORIN)[0] == model_copy / "engines"
    l4 = Platform("10.3.0.30", "L4", "8.9")
    assert select_engines(manifest, model_copy, None, l4)[0] == outside.resolve()
    assert select_engines(manifest, model_copy, outside, ORIN)[1].gpu == "L4"
    elsewhere = tmp_path / "elsewhere"  # the command to copy builds there, not in the default dir
    with pytest.raises(LlavaEdgeError, match=f"`llava-edge build {model_copy} --out {elsewhere}`"):
        select_engines(manifest, model_copy, elsewhere, ORIN)


def test_engine_records_round_trip_and_old_manifests_still_load(
    manifest: Manifest, model_copy: Path
) -> None:
    data = json.loads((model_copy / MANIFEST_NAME).read_text())
    assert "engines" in data  # written by this version, empty
    data.pop("engines")
    (model_copy / MANIFEST_NAME).write_text(json.dumps(data))
    assert Manifest.load(model_copy).engines == {}
    (model_copy / "engines").mkdir()
    with_engines = dataclasses.replace(
        manifest, engines={"engines": engine_set(manifest, model_copy / "engines")}
    )
    with_engines.save(model_copy)
    assert Manifest.load(model_copy).engines == with_engines.engines


# ---- IO names and types -------------------------------------------------------------------------


def test_io_names_come_from_the_manifest(manifest: Manifest) -> None:
    """A manifest that names its tensors otherwise gets those names bound, nothing assumed."""
    kv = dataclasses.replace(
        manifest.kv,
        past_key="cache.{i}.k",
        past_value="cache.{i}.v",
        present_key="new.{i}.k",
        present_value="new.{i}.v",
    )
    renames = {
        old: new
        for layer in range(manifest.text.num_layers)
        for old, new in zip(
            manifest.kv_names(layer),
            dataclasses.replace(manifest, kv=kv).kv_names(layer),
            strict=True,
        )
    }
    renames |= {"pixel_values": "frames", "image_embeds": "projected"}
    graphs = {
        name: dataclasses.replace(
            graph,
            inputs={renames.get(k, k): v for k, v in graph.inputs.items()},
            outputs={renames.get(k, k): v for k, v in graph.outputs.items()},
        )
        for name, graph in manifest.graphs.items()
    }
    renamed = dataclasses.replace(manifest, kv=kv, graphs=graphs)
    names = io_names(renamed)
    assert (names.pixel_values, names.image_embeds) == ("frames", "projected")
    assert names.layers[1] == ("cache.1.k", "cache.1.v", "new.1.k", "new.1.v")
    # the past the backend binds from its cache: every decoder input that spans past slots
    decoder = renamed.graphs["decoder"]
    assert names.past == {n for n, spec in decoder.inputs.items() if "past" in spec.shape}
    assert names.past.isdisjoint(io_names(manifest).past)
    graphs["decoder"] = dataclasses.replace(
        decoder, inputs={k: v for k, v in decoder.inputs.items() if k != "position_ids"}
    )
    with pytest.raises(LlavaEdgeError, match="position_ids"):
        io_names(dataclasses.replace(renamed, graphs=graphs))


def test_engine_io_must_match_the_manifest(manifest: Manifest) -> None:
    spec = manifest.graphs["projector"]
    good = {"image_features": ("input", "float32"), "image_embeds": ("output", "float32")}
    check_engine_io("projector", spec, good, "rebuild")
    with pytest.raises(
        LlavaEdgeError, match=r"image_embeds is output float16, manifest says output float32"
    ):
        check_engine_io(
            "projector", spec, {**good, "image_embeds": ("output", "float16")}, "rebuild"
        )
    with pytest.raises(LlavaEdgeError, match=r"missing \['image_embeds'\].*unexpected \['x'\]"):
        check_engine_io(
            "projector",
            spec,
            {"image_features": good["image_features"], "x": ("output", "float32")},
            "rebuild",
        )

    class DataType:  # TensorRT's enum members carry a name
        def __init__(self, name):
            self.name = name

    assert [numpy_dtype(DataType(n)) for n in ("FLOAT", "HALF", "INT64")] == [
        "float32",
        "float16",
        "int64",
    ]
    with pytest.raises(LlavaEdgeError, match="FP8"):
        numpy_dtype(DataType("FP8"))


def test_the_device_is_read_as_torch_and_cuda_name_it() -> None:
    from llava_edge.runtime.tensorrt.backend import device_index

    assert [device_index(d) for d in (0, 2, "1", "cuda", "cuda:1", " cuda:3 ")] == [
        0,
        2,
        1,
        0,
        1,
        3,
    ]
    for bad in ("cuda:x", "cpu", "gpu:1", "-1", "cuda:"):
        with pytest.raises(LlavaEdgeError, match="is not a CUDA GPU"):
            device_index(bad)
