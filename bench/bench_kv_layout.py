"""Why the decoder returns only the new keys/values: decode speed of two KV layouts, as JSON.

    .venv/bin/python bench/bench_kv_layout.py [--work DIR] [--threads 2] [--steps 32]

`new-only` is what llava-edge exports: past keys/values come in as a preallocated buffer, the
graph attends to past and new keys without joining them and returns only the new ones, which the
runtime writes into its buffer. `concat` is Hugging Face / optimum's convention: the graph
concatenates past and new (present = past + new), so every step copies the whole cache. Both
graphs are exported from the same `small` checkpoint and timed in the same run at 100 and 1,500
tokens of context, interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from llava_edge.export.graphs import Decoder
from llava_edge.manifest import TextSpec
from llava_edge.runtime.kv_cache import KVCache


class ConcatDecoder(Decoder):
    """The same decoder with Hugging Face's cache convention: present = concat(past, new)."""

    def attention(self, layer, x, cos, sin, past_key, past_value, allowed):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        batch, seq, _ = x.shape
        d, groups = attn.head_dim, self.num_heads // self.num_kv_heads
        q = attn.q_proj(x).view(batch, seq, self.num_heads, d).transpose(1, 2)
        k = attn.k_proj(x).view(batch, seq, self.num_kv_heads, d).transpose(1, 2)
        v = attn.v_proj(x).view(batch, seq, self.num_kv_heads, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
        q = q.reshape(batch, self.num_kv_heads, groups * seq, d)
        scores = torch.where(
            allowed, torch.matmul(q, k.transpose(2, 3)).float() * attn.scaling, -3.0e38
        )
        out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v)
        out = out.reshape(batch, self.num_heads, seq, d).transpose(1, 2).reshape(batch, seq, -1)
        return attn.o_proj(out), k, v


def export(module: torch.nn.Module, text: TextSpec, path: Path) -> None:
    names = [f"past.{i}.{kind}" for i in range(text.num_layers) for kind in ("key", "value")]
    outputs = [f"present.{i}.{kind}" for i in range(text.num_layers) for kind in ("key", "value")]
    args = (
        torch.randn(1, 3, text.hidden_size),
        torch.ones(1, 8, dtype=torch.int64),
        torch.arange(5, 8)[None],
        *[torch.randn(1, text.num_kv_heads, 5, text.head_dim) for _ in names],
    )
    dynamic = {
        "inputs_embeds": {1: "seq"},
        "attention_mask": {1: "total"},
        "position_ids": {1: "seq"},
    }
    dynamic |= {n: {2: "past"} for n in names} | {n: {2: "len"} for n in outputs}
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=["inputs_embeds", "attention_mask", "position_ids", *names],
            output_names=["logits", *outputs],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )


def decode_rate(
    session: ort.InferenceSession, text: TextSpec, context: int, steps: int, new_only: bool
) -> float:
    """Tokens/s of `steps` single-token decoder calls after a prefill of `context` tokens."""
    rng = np.random.default_rng(0)
    names = [f"past.{i}.{kind}" for i in range(text.num_layers) for kind in ("key", "value")]
    cache = KVCache(text, batch=1)
    past = [np.zeros((1, text.num_kv_heads, 0, text.head_dim), np.float32) for _ in names]

    def step(embeds: np.ndarray) -> None:
        nonlocal past
        seq = embeds.shape[1]
        mask = np.ones((1, seq), np.int64)
        if new_only:
            cache.reserve(seq)
            feeds = {n: cache.past(i // 2)[i % 2] for i, n in enumerate(names)}
            full_mask = cache.attention_mask(mask)
        else:
            feeds = dict(zip(names, past, strict=True))
            full_mask = np.ones((1, past[0].shape[2] + seq), np.int64)
        start = cache.length if new_only else past[0].shape[2]
        feeds |= {
            "inputs_embeds": embeds,
            "attention_mask": full_mask,
            "position_ids": np.arange(start, start + seq, dtype=np.int64)[None],
        }
        outputs = session.run(None, feeds)[1:]
        if new_only:
            for layer in range(text.num_layers):
                cache.append(layer, outputs[2 * layer], outputs[2 * layer + 1])
            cache.advance(mask)
        else:
            past = outputs

    step(rng.standard_normal((1, context, text.hidden_size), dtype=np.float32))
    token = rng.standard_normal((1, 1, text.hidden_size), dtype=np.float32)
    start = time.perf_counter()
    for _ in range(steps):
        step(token)
    return steps / (time.perf_counter() - start)


def main() -> None:
    from transformers import LlavaForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llava-edge-bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    checkpoint = args.work / "small-checkpoint"
    if not checkpoint.exists():
        raise SystemExit(f"run bench/bench_runtime.py first (it builds {checkpoint})")
    model = LlavaForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    )
    config = model.config.text_config
    text = TextSpec(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        vocab_size=config.vocab_size,
        max_context=4096,
        dtype="float32",
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {}
    for name, module in (("new-only", Decoder(model)), ("concat", ConcatDecoder(model))):
        path = args.work / f"kv-{name}.onnx"
        if not path.exists():
            export(module, text, path)
        sessions[name] = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    del model
    rates: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for context in (100, 1500):
            for name, session in sessions.items():
                rates.setdefault(f"{name}@{context}", []).append(
                    decode_rate(session, text, context, args.steps, new_only=name == "new-only")
                )
    report = {k: round(statistics.median(v), 2) for k, v in rates.items()}
    for name in sessions:
        report[f"{name} 1500/100"] = round(report[f"{name}@1500"] / report[f"{name}@100"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
