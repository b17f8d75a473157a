"""onnxruntime's fused forms: the decoder built node by node from the checkpoint's weights, and the
CLIP or SigLIP vision encoder through onnxruntime.transformers' optimizer (`write_fused_vision`,
below).

The TorchScript decoder (graphs.py) is made of standard ops so that TensorRT parses it; onnxruntime
runs it as ~1,100 small operators a step. This second form of the same weights is what
onnxruntime's own generative runtime emits for Llama-family models, and what its CPU kernels run
fastest:

    SimplifiedLayerNormalization (layer 0) / SkipSimplifiedLayerNormalization (residual + norm)
    one packed QKV MatMul (+ one packed bias Add for Qwen2)
    GroupQueryAttention: rotary inside (cos/sin tables from the checkpoint's own rotary module),
        causal attention over a preallocated KV buffer that past and present share in place
    o_proj MatMul, SkipSimplifiedLayerNormalization, gate/up MatMuls, the activation (SiLU,
        GELU...), down MatMul
    logits of each row's last token only

It is written by hand with onnx.helper because no exporter emits it: torch.onnx produces the
unfused ops, onnxruntime.transformers' fusions find nothing to fuse in the TorchScript decoder,
and onnxruntime-genai's builder writes its own model dir (token ids in, genai_config.json, all
positions' logits) rather than a graph of this model dir's contract.

IO (all names in the manifest):
    inputs_embeds [batch, seq, hidden]; seqlens_k int32 [batch]: each row's tokens after this call
    minus one; total_sequence_length int32 scalar: the longest row's tokens after this call;
    past_key_values.{i}.key/value [batch, kv_heads, capacity, head_dim]
    -> logits float32 [batch, vocab]; present.{i}.key/value: the same buffers as past (bound to
    the same memory, GroupQueryAttention writes the call's keys/values in place).
Row r holds its tokens in slots [0, len_r) (right padding); a token's position is its slot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import GraphSpec, KVSpec, TensorSpec, TextSpec

FUSED_FILE = "decoder_fused.onnx"
MS_DOMAIN = "com.microsoft"
# The MLP's activations (transformers' hidden_act names) the fused form writes, by formula.
SILU_ACTS = ("silu", "swish")
ERF_GELU_ACTS = ("gelu", "gelu_python")  # x * Phi(x)
TANH_GELU_ACTS = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh")
ACTIVATIONS = (*SILU_ACTS, *ERF_GELU_ACTS, *TANH_GELU_ACTS, "quick_gelu", "relu")


def fused_spec(text: TextSpec, precision: str) -> GraphSpec:
    """The fused decoder's manifest entry (its IO differs from the standard form's)."""
    kv = KVSpec()
    buffer = ["batch", text.num_kv_heads, "capacity", text.head_dim]
    inputs = {
        "inputs_embeds": TensorSpec(text.dtype, ["batch", "seq", text.hidden_size]),
        "seqlens_k": TensorSpec("int32", ["batch"]),
        "total_sequence_length": TensorSpec("int32", []),
    }
    outputs = {"logits": TensorSpec("float32", ["batch", text.vocab_size])}
    for i in range(text.num_layers):
        inputs[kv.past_key.format(i=i)] = TensorSpec(text.dtype, buffer)
        inputs[kv.past_value.format(i=i)] = TensorSpec(text.dtype, buffer)
        outputs[kv.present_key.format(i=i)] = TensorSpec(text.dtype, buffer)
        outputs[kv.present_value.format(i=i)] = TensorSpec(text.dtype, buffer)
    return GraphSpec(
        file=FUSED_FILE,
        inputs=inputs,
        outputs=outputs,
        precision=precision,
        details={"form": "fused: GroupQueryAttention, packed QKV, SkipSimplifiedLayerNorm"},
    )


def can_fuse(text_config: Any) -> str | None:
    """Why this text model has no fused form, or None when it has one."""
    act = getattr(text_config, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        return f"activation {act!r} (the fused form has {', '.join(ACTIVATIONS)})"
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    if head_dim % 16:
        return f"head size {head_dim} (GroupQueryAttention takes multiples of 16)"
    if partial_rotary_factor(text_config) != 1.0:
        return "rotary over part of each head (GroupQueryAttention rotates whole heads)"
    # Dynamic rope needs nothing of its own: its tables change only past max_position_embeddings,
    # which no export's context reaches, so the tables read from the rotary module hold.
    return None


def partial_rotary_factor(text_config: Any) -> float:
    """The share of each head the rotary embedding turns (Phi-3 and Phi-4 keep it under
    rope_parameters, older configs beside it)."""
    rope = getattr(text_config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", None))
    return 1.0 if factor is None else float(factor)


def build_fused_decoder(llava: Any, text: TextSpec, opset: int) -> Any:
    """An onnx.ModelProto of the fused decoder from a loaded LlavaForConditionalGeneration, at
    the export's opset (its standard ops mean the same from 13 to 20)."""
    from onnx import TensorProto, helper

    language = llava.model.language_model
    config = llava.config.text_config
    dtype = np.dtype(text.dtype)
    g = _Graph(dtype)
    eps = float(config.rms_norm_eps)
    hidden, heads, kv_heads, head_dim = (
        text.hidden_size,
        text.num_heads,
        text.num_kv_heads,
        text.head_dim,
    )
    cos, sin = _rotary_tables(language, text.max_context, head_dim)
    g.constant("cos_cache", cos.astype(dtype))
    g.constant("sin_cache", sin.astype(dtype))
    kv = KVSpec()

    residual, x = "inputs_embeds", None
    mlp_out = None
    for i, layer in enumerate(language.layers):
        attn = layer.self_attn
        if i == 0:
            x = g.node(
                "SimplifiedLayerNormalization",
                [residual, g.weight(f"l{i}.ln1", norm_weight(layer.input_layernorm))],
                axis=-1,
                epsilon=eps,
            )
        else:
            x, residual = g.skip_norm(
                mlp_out, residual, norm_weight(layer.input_layernorm), eps, f"l{i}"
            )
        qkv = g.linear(x, *_packed_qkv(attn), f"l{i}.qkv")
        query, key, value = qkv, "", ""
        if hasattr(attn, "q_norm"):  # Qwen3: each head's query and key normed before rotary
            sizes = g.constant(
                g.fresh("qkv_sizes"), np.asarray([heads, kv_heads, kv_heads], np.int64) * head_dim
            )
            query, key, value = (g.fresh(n) for n in ("q", "k", "v"))
            g.node("Split", [qkv, sizes], outputs=[query, key, value], axis=-1)
            query = g.head_norm(query, attn.q_norm, heads, head_dim, eps, f"l{i}.q_norm")
            key = g.head_norm(key, attn.k_norm, kv_heads, head_dim, eps, f"l{i}.k_norm")
        past_k, past_v = kv.past_key.format(i=i), kv.past_value.format(i=i)
        present_k, present_v = kv.present_key.format(i=i), kv.present_value.format(i=i)
        attended = g.node(
            "GroupQueryAttention",
            [
                query,
                key,
                value,
                past_k,
                past_v,
                "seqlens_k",
                "total_sequence_length",
                "cos_cache",
                "sin_cache",
            ],
            outputs=[g.fresh("attn"), present_k, present_v],
            domain=MS_DOMAIN,
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=float(attn.scaling),
            do_rotary=1,
            rotary_interleaved=0,
            local_window_size=-1,
        )
        o = g.linear(attended, attn.o_proj.weight, attn.o_proj.bias, f"l{i}.o")
        h, residual = g.skip_norm(
            o, residual, norm_weight(layer.post_attention_layernorm), eps, f"l{i}p"
        )
        mlp = layer.mlp
        (gate_w, gate_b), (up_w, up_b) = _gate_up(mlp)
        gate = g.linear(h, gate_w, gate_b, f"l{i}.gate")
        up = g.linear(h, up_w, up_b, f"l{i}.up")
        act = g.activation(gate, config.hidden_act)
        mlp_out = g.linear(
            g.node("Mul", [act, up]), mlp.down_proj.weight, mlp.down_proj.bias, f"l{i}.down"
        )

    # Each row's last token: slot min(seqlens_k, seq - 1) of this call (right padding; a decode
    # step or a batch-1 prompt takes its last slot). Only those rows reach the norm and lm_head.
    last_hidden = g.node("Add", [mlp_out, residual])
    shape = g.node("Shape", ["inputs_embeds"])
    batch = g.node("Gather", [shape, g.constant("i0", np.asarray(0, np.int64))], axis=0)
    seq = g.node("Gather", [shape, g.constant("i1", np.asarray(1, np.int64))], axis=0)
    one = g.constant("one", np.asarray(1, np.int64))
    last = g.node(
        "Min", [g.node("Cast", ["seqlens_k"], to=TensorProto.INT64), g.node("Sub", [seq, one])]
    )
    rows = g.node("Range", [g.constant("zero", np.asarray(0, np.int64)), batch, one])
    flat_index = g.node("Add", [g.node("Mul", [rows, seq]), last])
    flat = g.node("Reshape", [last_hidden, g.constant("flat", np.asarray([-1, hidden], np.int64))])
    picked = g.node("Gather", [flat, flat_index], axis=0)
    normed = g.node(
        "SimplifiedLayerNormalization",
        [picked, g.weight("final_norm", norm_weight(language.norm))],
        axis=-1,
        epsilon=eps,
    )
    logits = g.linear(normed, llava.lm_head.weight, llava.lm_head.bias, "lm_head")
    if dtype != np.float32:
        logits = g.node("Cast", [logits], to=TensorProto.FLOAT)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))

    io = fused_spec(text, text.dtype)  # the IO the manifest records, declared there once

    def value_infos(tensors: dict[str, TensorSpec]) -> list[Any]:
        return [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), t.shape
            )
            for name, t in tensors.items()
        ]

    inputs, outputs = value_infos(io.inputs), value_infos(io.outputs)
    graph = helper.make_graph(g.nodes, "decoder_fused", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)]
    # The oldest IR version these opsets allow, not the installed onnx's newest (14 for onnx
    # 1.23), which an older onnxruntime on the robot refuses to load (1.30 reads up to 13).
    ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=ir_version, producer_name="llava-edge"
    )


def norm_weight(norm: Any) -> Any:
    """An RMSNorm module's scale as SimplifiedLayerNormalization takes it: Gemma's norms scale
    by 1 + weight."""
    if type(norm).__name__ == "GemmaRMSNorm":
        return norm.weight.detach().float() + 1.0
    return norm.weight


def _packed_qkv(attn: Any) -> tuple[Any, Any]:
    """(weight, bias or None) of one MatMul computing queries, keys and values."""
    import torch

    if hasattr(attn, "qkv_proj"):  # Phi-3 stores them packed already
        return attn.qkv_proj.weight, attn.qkv_proj.bias
    projections = [attn.q_proj, attn.k_proj, attn.v_proj]
    weight = torch.cat([p.weight for p in projections], dim=0)
    if all(p.bias is None for p in projections):
        return weight, None
    bias = torch.cat(
        [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in projections]
    )
    return weight, bias


def _gate_up(mlp: Any) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """((gate weight, bias), (up weight, bias)); Phi-3 packs them gate first."""
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        bias = mlp.gate_up_proj.bias
        gate_b, up_b = (None, None) if bias is None else bias.chunk(2)
        return (gate, gate_b), (up, up_b)
    return (mlp.gate_proj.weight, mlp.gate_proj.bias), (mlp.up_proj.weight, mlp.up_proj.bias)


def write_fused_decoder(llava: Any, text: TextSpec, path: Path, opset: int) -> None:
    from llava_edge.files import save_graph

    save_graph(build_fused_decoder(llava, text, opset), path)


def _rotary_tables(language: Any, max_context: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_context, rotary_dim / 2] from the checkpoint's own rotary module, so every
    rope variant it implements (scaling types, attention factor) comes out as transformers has it."""
    import torch

    positions = torch.arange(max_context)[None]
    probe = torch.zeros(1, 1, head_dim, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = language.rotary_emb(probe, positions)
    half = cos.shape[-1] // 2
    cos, sin = cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()
    if cos.shape[1] * 2 != head_dim:
        raise LlavaEdgeError(
            f"rotary over {cos.shape[1] * 2} of {head_dim} head dims is not supported by the fused form"
        )
    return cos, sin


class _Graph:
    """Nodes and initializers with fresh names."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def constant(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, tensor: Any) -> str:
        return self.constant(name, tensor.detach().float().numpy().astype(self.dtype))

    def node(
        self,
        op: str,
        inputs: list[str],
        outputs: list[str] | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> str:
        from onnx import helper

        outputs = outputs or [self.fresh(op.lower())]
        self.nodes.append(
            helper.make_node(
                op, inputs, outputs, name=self.fresh(op), domain=domain or None, **attrs
            )
        )
        return outputs[0]

    def linear(self, x: str, weight: Any, bias: Any, name: str) -> str:
        """x @ weight.T (+ bias): weights stored [in, out] as MatMul and the quantizers want."""
        w = self.constant(f"{name}.weight", weight.detach().float().numpy().T.astype(self.dtype))
        y = self.node("MatMul", [x, w])
        if bias is not None:
            y = self.node("Add", [y, self.weight(f"{name}.bias", bias)])
        return y

    def activation(self, x: str, name: str) -> str:
        """transformers' ACT2FN[name](x) in standard ops (the GELUs computed in float32, where
        onnxruntime's CPU has Erf and Tanh kernels; it fuses them into Gelu/FastGelu at load)."""
        from onnx import TensorProto

        if name in SILU_ACTS:
            return self.node("Mul", [x, self.node("Sigmoid", [x])])
        if name == "relu":
            return self.node("Relu", [x])
        if name == "quick_gelu":  # x * sigmoid(1.702 x)
            scaled = self.node("Mul", [x, self.scalar(1.702, self.dtype)])
            return self.node("Mul", [x, self.node("Sigmoid", [scaled])])
        f32 = np.dtype(np.float32)
        y = x if self.dtype == f32 else self.node("Cast", [x], to=TensorProto.FLOAT)
        if name in ERF_GELU_ACTS:  # 0.5 x (1 + erf(x / sqrt 2))
            inner = self.node("Erf", [self.node("Mul", [y, self.scalar(0.5**0.5, f32)])])
        elif name in TANH_GELU_ACTS:  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            cube = self.node("Mul", [y, self.node("Mul", [y, y])])
            poly = self.node("Add", [y, self.node("Mul", [cube, self.scalar(0.044715, f32)])])
            root = float(np.sqrt(2 / np.pi))
            inner = self.node("Tanh", [self.node("Mul", [poly, self.scalar(root, f32)])])
        else:
            raise LlavaEdgeError(f"the fused decoder has no activation {name!r}")
        one_plus = self.node("Add", [inner, self.scalar(1.0, f32)])
        y = self.node("Mul", [self.node("Mul", [y, self.scalar(0.5, f32)]), one_plus])
        return y if self.dtype == f32 else self.node("Cast", [y], to=TensorProto.FLOAT16)

    def scalar(self, value: float, dtype: np.dtype) -> str:
        return self.constant(self.fresh("scalar"), np.asarray(value, dtype=dtype))

    def head_norm(self, x: str, norm: Any, heads: int, head_dim: int, eps: float, name: str) -> str:
        """norm over each head of x [B, S, heads * head_dim] (Qwen3's q_norm/k_norm)."""
        split = self.constant(self.fresh("heads"), np.asarray([0, 0, heads, head_dim], np.int64))
        joined = self.constant(self.fresh("joined"), np.asarray([0, 0, heads * head_dim], np.int64))
        normed = self.node(
            "SimplifiedLayerNormalization",
            [self.node("Reshape", [x, split]), self.weight(name, norm_weight(norm))],
            axis=-1,
            epsilon=float(getattr(norm, "variance_epsilon", eps)),
        )
        return self.node("Reshape", [normed, joined])

    def skip_norm(self, x: str, skip: str, weight: Any, eps: float, name: str) -> tuple[str, str]:
        """(norm(x + skip), x + skip): one SkipSimplifiedLayerNormalization."""
        out, total = self.fresh("normed"), self.fresh("residual")
        self.node(
            "SkipSimplifiedLayerNormalization",
            [x, skip, self.weight(f"{name}.norm", weight)],
            outputs=[out, "", "", total],
            domain=MS_DOMAIN,
            epsilon=eps,
        )
        return out, total


# ---- the vision encoder ------------------------------------------------------------------------

VISION_FUSED_FILE = "vision_encoder_fused.onnx"
# Towers whose encoder layers are CLIP's shape (pre-norm, q/k/v/out projections with biases, a
# two-layer MLP): onnxruntime's CLIP fusions apply to both.
FUSABLE_TOWERS = ("clip_vision_model", "siglip_vision_model")
# The fused graph must equal the standard one on a random input this closely (relative to the
# features' range); the fusions only reorder sums, so a larger gap means a wrong graph.
VISION_FUSED_TOLERANCE = 1e-4


def write_fused_vision(
    standard: Path, spec: GraphSpec, vision_config: Any, out: Path
) -> tuple[GraphSpec | None, str | None]:
    """The vision encoder with onnxruntime's CLIP fusions (Attention, SkipLayerNormalization, the
    tower's GELU) from onnxruntime.transformers' optimizer: (its spec, None), or (None, why there
    is none): an fp16 graph (the CPU Attention kernel is float32), a tower the fusions do not
    know, no attention fused, or a fused graph whose features differ from the standard graph's."""
    import dataclasses

    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    from llava_edge.files import save_graph
    from llava_edge.logs import quiet

    tower = getattr(vision_config, "model_type", "")
    if spec.precision != "fp32":
        return None, f"{spec.precision} (the CPU Attention kernel is float32)"
    if tower not in FUSABLE_TOWERS:
        return None, f"vision tower {tower!r} (the fusions know {', '.join(FUSABLE_TOWERS)})"
    with quiet("onnxruntime.transformers"):
        optimized = optimize_model(
            _with_fused_domain(onnx.load(str(standard))),
            model_type="clip",
            num_heads=vision_config.num_attention_heads,
            hidden_size=vision_config.hidden_size,
            opt_level=0,  # the Python fusions only; onnxruntime optimizes the rest at load
        )
    model = optimized.model
    ops = {n.op_type for n in model.graph.node}
    if "Attention" not in ops:
        return None, f"onnxruntime's optimizer fused no attention in this {tower}"
    path = out / VISION_FUSED_FILE
    save_graph(model, path)  # saved first: a tower past 2 GiB runs from its file only
    gap = _vision_gap(standard, path, spec)
    if gap > VISION_FUSED_TOLERANCE:
        for written in (path, path.with_name(path.name + ".data")):
            written.unlink(missing_ok=True)
        return None, f"the fused graph's features differ from the standard graph's by {gap:.2g}"
    fused = dataclasses.replace(
        spec,
        file=VISION_FUSED_FILE,
        fused=None,
        tensorrt_file=None,
        details={
            "form": ", ".join(["fused: Attention", "SkipLayerNormalization", *_gelus(ops)])
            + " (onnxruntime's CLIP fusions)",
            "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        },
    )
    return fused, None


def _with_fused_domain(model: Any) -> Any:
    """`model` with onnxruntime's domain among its opsets, for the fused ops (the optimizer
    omits it)."""
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


# onnxruntime's fused GELU ops, one of which the tower's activation becomes (its config's
# hidden_act: CLIP's quick_gelu QuickGelu, SigLIP's tanh GELU FastGelu, an erf GELU BiasGelu...)
FUSED_GELUS = ("QuickGelu", "FastGelu", "BiasFastGelu", "Gelu", "BiasGelu")


def _gelus(ops: set[str]) -> list[str]:
    """The fused GELU ops a graph holds (none where the activation was left unfused)."""
    return [op for op in FUSED_GELUS if op in ops]


def _vision_gap(standard: Path, fused: Path, spec: GraphSpec) -> float:
    """max |fused - standard| / max |standard| of the features of two random images."""
    import onnxruntime as ort

    (name, tensor) = next(iter(spec.inputs.items()))
    shape = [2 if isinstance(d, str) else d for d in tensor.shape]
    pixels = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    results = []
    for graph in (standard, fused):
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        results.append(session.run(None, {name: pixels})[0].astype(np.float64))
    reference, ours = results
    return float(np.abs(ours - reference).max() / (np.abs(reference).max() + 1e-30))
