"""Export of every LLaVA variant export supports, held to transformers on the same weights.

Six tiny checkpoints together cover: vision_feature_layer as an int (negative and positive) and
as a list; vision_feature_select_strategy 'default' and 'full'; MHA, GQA and MQA text models;
Llama and Mistral backbones; weights saved in fp32, fp16 and bf16. Each is exported in fp32 and
checked three ways: the runtime's greedy tokens against `generate()`, the decoder graph alone
against transformers' forward with its own KV cache (prefill without past, decode at past 1 and
past > 100, the runtime's oversized past buffer, left padding), and the manifest against the
graphs' real inputs and outputs.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest
from llava_edge.runtime import Pipeline

QUESTION = "What is in the picture?"
NEW_TOKENS = 32
LONG_PAST = 120  # "over 100"

# name -> init_checkpoint overrides. The comment says what each adds to the coverage.
CONFIGS: dict[str, dict[str, Any]] = {
    # LLaVA-1.5 as published: layer -2, CLS dropped, Llama MHA; weights in fp32.
    "llama-mha-int-default-fp32": dict(seed=1),
    # A list of layers (features concatenated), GQA 4 -> 2; weights in fp16.
    "llama-gqa-list-default-fp16": dict(
        seed=2, dtype="float16", vision_feature_layer=[-2, -1], text={"num_key_value_heads": 2}
    ),
    # Mistral, CLS kept ('full'), a positive layer index; weights in bf16.
    "mistral-mha-int-full-bf16": dict(
        seed=3,
        dtype="bfloat16",
        backbone="mistral",
        vision_feature_layer=1,
        vision_feature_select_strategy="full",
    ),
    # Mistral with one KV head (MQA), list of layers with 'full'; fp32.
    "mistral-mqa-list-full-fp32": dict(
        seed=4,
        backbone="mistral",
        vision_feature_layer=[-3, -1],
        vision_feature_select_strategy="full",
        text={"num_key_value_heads": 1},
    ),
    # Llama GQA with 'full' and the last layer; weights in bf16.
    "llama-gqa-int-full-bf16": dict(
        seed=5,
        dtype="bfloat16",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        text={"num_key_value_heads": 2},
    ),
    # Mistral GQA with a list of layers and 'default'; weights in fp16.
    "mistral-gqa-list-default-fp16": dict(
        seed=6,
        dtype="float16",
        backbone="mistral",
        vision_feature_layer=[-2, -1],
        text={"num_key_value_heads": 2},
    ),
    # Qwen2 (q/k/v biases, made non-zero below), GQA; fp32.
    "qwen2-gqa-int-default-fp32": dict(seed=7, backbone="qwen2", text={"num_key_value_heads": 2}),
}


def quiet(*_args, **_kwargs) -> None:
    """A `log` for export: these tests read its results, not its report."""


@dataclass
class Exported:
    checkpoint: Path
    model_dir: Path
    model: Any  # LlavaForConditionalGeneration in fp32, eager attention
    processor: Any
    manifest: Manifest


def test_the_checkpoints_cover_every_variant(tmp_path: Path) -> None:
    """What the six checkpoints really are (read back from what init wrote) spans every variant:
    guards against a table edit, or an init that ignores an override, leaving one untested."""
    from transformers import AutoConfig

    from llava_edge.training.checkpoint import init_checkpoint

    seen: dict[str, set] = {k: set() for k in ("layer", "strategy", "kv", "backbone", "dtype")}
    for name, overrides in CONFIGS.items():
        checkpoint = init_checkpoint(tmp_path / name, preset="tiny", **overrides)
        config = AutoConfig.from_pretrained(checkpoint)
        text = config.text_config
        seen["layer"].add(type(config.vision_feature_layer).__name__)
        seen["strategy"].add(config.vision_feature_select_strategy)
        kv, heads = text.num_key_value_heads, text.num_attention_heads
        seen["kv"].add("mha" if kv == heads else "mqa" if kv == 1 else "gqa")
        seen["backbone"].add(text.model_type)
        seen["dtype"] |= {str(d).removeprefix("torch.") for d in _saved_dtypes(checkpoint)}
    assert seen == {
        "layer": {"int", "list"},
        "strategy": {"default", "full"},
        "kv": {"mha", "gqa", "mqa"},
        "backbone": {"llama", "mistral", "qwen2"},
        "dtype": {"float32", "float16", "bfloat16"},
    }


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_edge.export.exporter import export_checkpoint
    from llava_edge.training.checkpoint import init_checkpoint

    root = tmp_path_factory.mktemp(request.param)
    checkpoint = init_checkpoint(root / "checkpoint", preset="tiny", **CONFIGS[request.param])
    _random_biases(checkpoint)
    model_dir = root / "model"
    export_checkpoint(checkpoint, model_dir, verify=False, log=quiet)
    model = LlavaForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    return Exported(checkpoint, model_dir, model, processor, Manifest.load(model_dir))


def test_checkpoint_is_the_variant_asked_for(exported: Exported, request) -> None:
    """init honoured the overrides (else the variants below would test nothing new)."""
    overrides = CONFIGS[request.node.callspec.params["exported"]]
    config = exported.model.config
    saved = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    on_disk = _saved_dtypes(exported.checkpoint)
    assert on_disk == {saved[overrides.get("dtype", "float32")]}
    assert config.vision_feature_layer == overrides.get("vision_feature_layer", -2)
    assert config.vision_feature_select_strategy == overrides.get(
        "vision_feature_select_strategy", "default"
    )
    assert config.text_config.model_type == overrides.get("backbone", "llama")
    kv = overrides.get("text", {}).get("num_key_value_heads", 4)
    assert config.text_config.num_key_value_heads == kv
    assert exported.manifest.text.num_kv_heads == kv
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    full = config.vision_feature_select_strategy == "full"
    assert exported.manifest.num_image_tokens == patches + full


@pytest.mark.parametrize("form", ["standard", "fused"])
def test_greedy_tokens_equal_transformers_generate(exported: Exported, form: str) -> None:
    """Runtime over the exported graphs == generate(), id for id, prompt and 32 new tokens, with
    either decoder form (TensorRT's standard one, onnxruntime's fused one)."""
    image = _picture(exported.model.config.text_config.num_key_value_heads)
    inputs = _hf_inputs(exported.processor, image, QUESTION)
    with torch.no_grad():
        reference = exported.model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )[0, inputs["input_ids"].shape[1] :].tolist()
    with Pipeline.load(exported.model_dir, graph_form=form) as pipe:
        assert pipe.backend.form == form
        answer = pipe.answer(image, QUESTION, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert answer.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert len(reference) == NEW_TOKENS
    assert answer.token_ids == reference


# ---- the decoder graph alone ------------------------------------------------------------------


def test_decoder_prefill_without_past(exported: Exported) -> None:
    decoder = _Decoder(exported)
    embeds = decoder.embeds(batch=2, seq=9, seed=0)
    mask = np.ones((2, 9), dtype=np.int64)
    positions = np.arange(9)[None].repeat(2, 0)
    ref, cache = decoder.reference(embeds, mask, positions, cache=None)
    logits, present = decoder.run(embeds, mask, positions, past=decoder.empty_past(2))
    _close(logits, ref)
    for (k, v), (ref_k, ref_v) in zip(present, _cache_tensors(cache), strict=True):
        _close(k, ref_k)
        _close(v, ref_v)


@pytest.mark.parametrize("past_len", [1, LONG_PAST])
@pytest.mark.parametrize("seq", [1, 3])
def test_decoder_with_past(exported: Exported, past_len: int, seq: int) -> None:
    """Decode (S=1) and a multi-token step after a past (S=3, a chat's next turn)."""
    decoder = _Decoder(exported)
    first = decoder.embeds(batch=2, seq=past_len, seed=1)
    step = decoder.embeds(batch=2, seq=seq, seed=2)
    mask = np.ones((2, past_len + seq), dtype=np.int64)
    positions = np.arange(past_len, past_len + seq)[None].repeat(2, 0)
    _, cache = decoder.reference(first, mask[:, :past_len], np.arange(past_len)[None].repeat(2, 0))
    past = [(k.copy(), v.copy()) for k, v in _cache_tensors(cache)]
    ref, cache = decoder.reference(step, mask, positions, cache)
    logits, present = decoder.run(step, mask, positions, past)
    _close(logits, ref)
    for (k, v), (ref_k, ref_v) in zip(present, _cache_tensors(cache), strict=True):
        _close(k, ref_k[:, :, past_len:])
        _close(v, ref_v[:, :, past_len:])


def test_decoder_past_buffer_longer_than_used(exported: Exported) -> None:
    """The runtime feeds its whole preallocated buffer; unused slots (here noise) are masked."""
    decoder = _Decoder(exported)
    capacity = 256
    first = decoder.embeds(batch=2, seq=LONG_PAST, seed=3)
    step = decoder.embeds(batch=2, seq=1, seed=4)
    _, cache = decoder.reference(
        first, np.ones((2, LONG_PAST), np.int64), np.arange(LONG_PAST)[None].repeat(2, 0)
    )
    rng = np.random.default_rng(5)
    past = []
    for k, v in _cache_tensors(cache):
        buffers = []
        for t in (k, v):
            buffer = rng.normal(0, 10, t.shape[:2] + (capacity,) + t.shape[3:]).astype(np.float32)
            buffer[:, :, :LONG_PAST] = t
            buffers.append(buffer)
        past.append(tuple(buffers))
    mask = np.zeros((2, capacity + 1), dtype=np.int64)
    mask[:, :LONG_PAST] = 1
    mask[:, -1] = 1
    positions = np.full((2, 1), LONG_PAST, dtype=np.int64)
    ref, _ = decoder.reference(step, np.ones((2, LONG_PAST + 1), np.int64), positions, cache)
    logits, _ = decoder.run(step, mask, positions, past)
    _close(logits, ref)


def test_decoder_through_runtime_cache(exported: Exported) -> None:
    """OnnxBackend.decode with its KVCache: prefill > 100 tokens, then token-by-token decode."""
    decoder = _Decoder(exported)
    prompt = decoder.embeds(batch=1, seq=LONG_PAST + 5, seed=6)
    with Pipeline.load(exported.model_dir) as pipe:
        backend = pipe.backend
        cache = backend.new_cache(1)
        ones = np.ones((1, prompt.shape[1]), dtype=np.int64)
        positions = np.arange(prompt.shape[1])[None]
        logits = backend.decode(prompt, ones, positions, cache)
        ref, hf_cache = decoder.reference(prompt, ones, positions, cache=None)
        _close(logits, ref)
        for i in range(3):
            token = decoder.embeds(batch=1, seq=1, seed=10 + i)
            position = np.asarray([[prompt.shape[1] + i]])
            logits = backend.decode(token, np.ones((1, 1), np.int64), position, cache)
            total = prompt.shape[1] + i + 1
            ref, hf_cache = decoder.reference(
                token, np.ones((1, total), np.int64), position, hf_cache
            )
            _close(logits, ref)


def test_decoder_left_padded_batch(exported: Exported) -> None:
    """Rows of different length, left-padded as transformers batches them, prefill then decode."""
    decoder = _Decoder(exported)
    seq, pad = 12, 5
    prompt = decoder.embeds(batch=2, seq=seq, seed=7)
    mask = np.ones((2, seq), dtype=np.int64)
    mask[0, :pad] = 0
    positions = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
    ref, cache = decoder.reference(prompt, mask, positions, cache=None)
    logits, present = decoder.run(prompt, mask, positions, decoder.empty_past(2))
    _close(logits, ref)
    step = decoder.embeds(batch=2, seq=1, seed=8)
    full_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    next_pos = positions[:, -1:] + 1
    ref, _ = decoder.reference(step, full_mask, next_pos, cache)
    logits, _ = decoder.run(step, full_mask, next_pos, present)
    _close(logits, ref)


# ---- the fused form: right-padded rows of their own lengths ----------------------------------


def test_fused_batch_rows_of_different_lengths(exported: Exported) -> None:
    """A left-padded prompt batch (packed to the right by the backend), then decode steps where
    each row writes at its own length, then a 3-token turn per row (run row by row), then a new
    request prefilled alone into a freed row: every row's logits equal transformers' on that row
    alone."""
    decoder = _Decoder(exported)
    lengths = [LONG_PAST, 7]
    prompt = decoder.embeds(batch=2, seq=LONG_PAST, seed=11)
    mask = np.ones((2, LONG_PAST), dtype=np.int64)
    mask[1, : LONG_PAST - lengths[1]] = 0
    with Pipeline.load(exported.model_dir, graph_form="fused") as pipe:
        backend = pipe.backend
        cache = backend.new_cache(2)
        logits = backend.decode(prompt, mask, np.where(mask == 1, np.cumsum(mask, 1) - 1, 1), cache)
        refs = []
        for row, n in enumerate(lengths):
            ref, hf_cache = decoder.reference(
                prompt[row : row + 1, LONG_PAST - n :],
                np.ones((1, n), np.int64),
                np.arange(n)[None],
            )
            _close(logits[row : row + 1], ref)
            refs.append(hf_cache)
        assert cache.lengths.tolist() == lengths
        for step, seq in enumerate([1, 1, 3]):
            new = decoder.embeds(batch=2, seq=seq, seed=20 + step)
            before = cache.lengths.copy()
            positions = before[:, None] + np.arange(seq)[None]
            logits = backend.decode(new, np.ones((2, seq), np.int64), positions, cache)
            for row in range(2):
                total = int(before[row]) + seq
                ref, refs[row] = decoder.reference(
                    new[row : row + 1],
                    np.ones((1, total), np.int64),
                    positions[row : row + 1],
                    refs[row],
                )
                _close(logits[row : row + 1], ref)
        assert cache.lengths.tolist() == [n + 5 for n in lengths]
        # Continuous batching: row 1 is freed and a new request prefilled into it alone, then
        # both rows decode together (row 0 continuing its own sequence).
        cache.truncate(0, row=1)
        fresh = decoder.embeds(batch=1, seq=9, seed=30)
        ones = np.ones((1, 9), np.int64)
        logits = backend.decode(fresh, ones, np.arange(9)[None], cache.rows(1, 2))
        ref, refs[1] = decoder.reference(fresh, np.ones((1, 9), np.int64), np.arange(9)[None])
        _close(logits, ref)
        step = decoder.embeds(batch=2, seq=1, seed=31)
        before = cache.lengths.copy()
        logits = backend.decode(step, np.ones((2, 1), np.int64), before[:, None], cache)
        for row in range(2):
            total = int(before[row]) + 1
            ref, _ = decoder.reference(
                step[row : row + 1],
                np.ones((1, total), np.int64),
                before[row : row + 1, None],
                refs[row],
            )
            _close(logits[row : row + 1], ref)


# ---- the manifest is the contract -------------------------------------------------------------


def test_manifest_describes_the_graphs(exported: Exported) -> None:
    check_manifest_matches_graphs(exported.model_dir)


def check_manifest_matches_graphs(model_dir: Path) -> None:
    """Every graph's IO names, dtypes, ranks and fixed dims are what manifest.json says."""
    manifest = Manifest.load(model_dir)
    specs = [(name, spec) for name, spec in manifest.graphs.items()]
    specs += [(name + " (fused)", g.fused) for name, g in manifest.graphs.items() if g.fused]
    for name, spec in specs:
        session = ort.InferenceSession(
            str(model_dir / spec.file), providers=["CPUExecutionProvider"]
        )
        for declared, actual in (
            (spec.inputs, session.get_inputs()),
            (spec.outputs, session.get_outputs()),
        ):
            assert list(declared) == [a.name for a in actual], name
            for a in actual:
                tensor = declared[a.name]
                assert ORT_TYPES[a.type] == tensor.dtype, (name, a.name, a.type)
                assert len(a.shape) == len(tensor.shape), (name, a.name)
                for dim, want in zip(a.shape, tensor.shape, strict=True):
                    if isinstance(want, int):
                        assert dim == want, (name, a.name, a.shape, tensor.shape)


ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


# ---- helpers ----------------------------------------------------------------------------------


class _Decoder:
    """The exported decoder graph and, beside it, transformers' forward on the same inputs."""

    def __init__(self, exported: Exported):
        self.model = exported.model
        self.manifest = exported.manifest
        self.session = ort.InferenceSession(
            str(exported.model_dir / self.manifest.graphs["decoder"].file),
            providers=["CPUExecutionProvider"],
        )
        self.table = np.load(exported.model_dir / self.manifest.embeddings)

    def embeds(self, batch: int, seq: int, seed: int) -> np.ndarray:
        """Embeddings of random token ids: the magnitudes the decoder sees in use."""
        ids = np.random.default_rng(seed).integers(0, self.table.shape[0] - 1, (batch, seq))
        return self.table[ids]

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        t = self.manifest.text
        empty = np.zeros((batch, t.num_kv_heads, 0, t.head_dim), dtype=np.float32)
        return [(empty, empty)] * t.num_layers

    def run(self, embeds, mask, positions, past) -> tuple[np.ndarray, list]:
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        names = ["logits"]
        for layer, (k, v) in enumerate(past):
            past_k, past_v, present_k, present_v = self.manifest.kv_names(layer)
            feeds[past_k], feeds[past_v] = k, v
            names += [present_k, present_v]
        outputs = self.session.run(names, feeds)
        present = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(len(past))]
        return outputs[0], present

    def reference(self, embeds, mask, positions, cache=None) -> tuple[np.ndarray, Any]:
        """transformers' last-position logits; its cache (a copy of `cache`, grown)."""
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name goes in 5.40)
        params = inspect.signature(self.model.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        with torch.no_grad():
            out = self.model(
                inputs_embeds=torch.from_numpy(embeds),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions),
                use_cache=True,
                **{name: copy.deepcopy(cache)},
            )
        return out.logits[:, -1].numpy(), out.past_key_values


def _cache_tensors(cache: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(layer.keys.numpy(), layer.values.numpy()) for layer in cache.layers]


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    """fp32 on both sides: only summation order differs."""
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def _picture(seed: int) -> Image.Image:
    """Noise with a bright block, wider than tall (resize and crop both act)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)
    array[10:40, 20:60] = (230, 40, 40)
    return Image.fromarray(array)


def _hf_inputs(processor: Any, image: Image.Image, question: str) -> dict:
    """transformers' own way to prompt: the processor's chat template, then the processor."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


def _random_biases(checkpoint: Path) -> None:
    """Give a checkpoint's attention biases (Qwen2's q/k/v) random values: transformers initialises
    them to zero, which would hide a bias put in the wrong place."""
    from safetensors.torch import load_file, save_file

    for path in checkpoint.glob("*.safetensors"):
        tensors = load_file(path)
        biased = {k for k in tensors if k.endswith("_proj.bias") and "language_model" in k}
        if not biased:
            continue
        generator = torch.Generator().manual_seed(0)
        for key in biased:
            t = tensors[key]
            tensors[key] = (torch.randn(t.shape, generator=generator) * 0.5).to(t.dtype)
        save_file(tensors, path, metadata={"format": "pt"})


def _saved_dtypes(checkpoint: Path) -> set:
    from safetensors import safe_open

    dtypes = set()
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            dtypes |= {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    return dtypes


# ---- fp16 -------------------------------------------------------------------------------------


def test_fp16_export_verifies_by_cosine(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """`export --dtype fp16`: fp16 graphs and cache, float32 logits, verified by the cosine rule."""
    from llava_edge.cli import main

    out = tmp_path / "fp16"
    assert main(["export", str(tiny_checkpoint), str(out), "--dtype", "fp16"]) == 0
    printed = capsys.readouterr().out
    assert "verify vs transformers (standard form): PASSED" in printed
    assert "verify vs transformers (fused form): PASSED" in printed
    cosine = float(re.search(r"cosine (\S+)", printed).group(1))
    assert 0.99 <= cosine <= 1.0
    manifest = Manifest.load(out)
    assert manifest.text.dtype == "float16"
    assert {g.precision for g in manifest.graphs.values()} == {"fp16"}
    assert np.load(out / manifest.embeddings).dtype == np.float16
    check_manifest_matches_graphs(out)  # logits float32, everything else float16
    with Pipeline.load(out) as pipe:
        answer = pipe.answer(_picture(0), QUESTION, max_new_tokens=8, ignore_eos=True)
    assert len(answer.token_ids) == 8
    _check_rotary_frequencies_are_float32(tiny_checkpoint, out, manifest)


def test_an_onnxruntime_that_cannot_run_the_fp16_fused_decoder_runs_the_standard_graphs(
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """onnxruntime 1.20 loads an fp16 fused decoder, then fails at its first run: the default
    form runs the standard graphs there and says so in one line; the fused form asked for is
    refused in one."""
    import onnxruntime

    from llava_edge.export.exporter import export_checkpoint

    out = tmp_path / "fp16"
    export_checkpoint(tiny_checkpoint, out, dtype="fp16", verify=False, log=quiet)
    with Pipeline.load(out, graph_form="standard") as pipe:
        standard = pipe.answer(_picture(0), QUESTION, max_new_tokens=6, ignore_eos=True)
    monkeypatch.setattr(onnxruntime, "__version__", "1.20.1")
    with pytest.raises(LlavaEdgeError, match="needs onnxruntime 1.21 or later, not 1.20.1: upg"):
        Pipeline.load(out, graph_form="fused")
    caplog.clear()
    with Pipeline.load(out) as pipe:
        assert pipe.backend.form == "standard"
        answer = pipe.answer(_picture(0), QUESTION, max_new_tokens=6, ignore_eos=True)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "standard graphs, not its fused ones" in line and "fp16 fused decoder" in line
    assert answer.token_ids == standard.token_ids
    monkeypatch.setattr(onnxruntime, "__version__", "1.21.0")
    with Pipeline.load(out) as pipe:
        assert pipe.backend.form == "fused"


def _check_rotary_frequencies_are_float32(checkpoint: Path, out: Path, manifest: Manifest) -> None:
    """Rope's inverse frequencies stay float32 in fp16 graphs, as in transformers' fp16 models:
    rounded to fp16, the angle at distance p is off by up to p * 5e-4 rad."""
    import onnx
    from onnx import numpy_helper
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float16)
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32  # transformers keeps them so
    inv_freq = inv_freq.numpy()
    graph = onnx.load(str(out / manifest.graphs["decoder"].file)).graph
    tensors = [numpy_helper.to_array(t) for t in graph.initializer] + [
        numpy_helper.to_array(a.t) for n in graph.node for a in n.attribute if a.type == a.TENSOR
    ]
    assert any(
        t.dtype == np.float32 and t.size == inv_freq.size and np.allclose(t.ravel(), inv_freq)
        for t in tensors
    )
    fused = onnx.load(str(out / manifest.graphs["decoder"].fused.file)).graph
    cos = next(numpy_helper.to_array(t) for t in fused.initializer if t.name == "cos_cache")
    last = manifest.text.max_context - 1
    expected = np.cos(last * inv_freq.astype(np.float64))
    np.testing.assert_allclose(cos[last].astype(np.float64), expected, atol=2e-3)
