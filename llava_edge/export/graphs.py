"""The three exported graphs as torch modules wrapped around a loaded LlavaForConditionalGeneration.

`VisionEncoder` and `Projector` call the checkpoint's own modules. `Decoder` walks the language
model's layers itself: transformers' cache and mask code cannot express a cache that lives outside
the graph, and that is what makes decoding fast (see `attention`). Every layer module (norms,
projections, rotary embedding and its apply function, MLP) is still the checkpoint's own, so any
Llama-shaped text model exports, and verification holds the result to transformers' tokens: Llama,
Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma (its norms and scaled embeddings are its
own modules') and Phi-3 (packed q/k/v, partial rotary).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from llava_edge.modeling import CLASS_TOKENS

SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
# Towers called as pixel_values -> hidden states of every layer (CLS first where there is one).
SUPPORTED_VISION_TOWERS = tuple(CLASS_TOKENS)


class VisionEncoder(nn.Module):
    """pixel_values -> features of the layer(s) the checkpoint selects, CLS dropped for 'default'."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        config = llava.config
        self.tower = llava.model.vision_tower
        layers = config.vision_feature_layer
        self.layers = [layers] if isinstance(layers, int) else list(layers)
        self.drop_cls = config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
        selected = [hidden[i][:, 1:] if self.drop_cls else hidden[i] for i in self.layers]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)


class Projector(nn.Module):
    def __init__(self, llava: nn.Module):
        super().__init__()
        self.projector = llava.model.multi_modal_projector

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.projector(image_features)


class Decoder(nn.Module):
    """inputs_embeds, attention_mask [B, past+S], position_ids, past k/v... -> last logits, new k/v."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        text = llava.model.language_model
        self.config = llava.config.text_config
        self.layers = text.layers
        self.norm = text.norm
        self.rotary = text.rotary_emb
        self.lm_head = llava.lm_head
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        # The text model's own rotary function: Phi-3's rotates part of each head only.
        self.apply_rotary = sys.modules[
            type(self.layers[0].self_attn).__module__
        ].apply_rotary_pos_emb

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        hidden = inputs_embeds
        cos, sin = self.rotary(hidden, position_ids)
        allowed = visibility(attention_mask, hidden.shape[1])
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # queries are grouped per KV head: [B, 1, G*S, T], group-major
            allowed = allowed.repeat(1, 1, groups, 1)
        present = []
        for i, layer in enumerate(self.layers):
            residual = hidden
            hidden, key, value = self.attention(
                layer,
                layer.input_layernorm(hidden),
                cos,
                sin,
                past[2 * i],
                past[2 * i + 1],
                allowed,
            )
            hidden = residual + hidden
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            present += [key, value]
        last = self.norm(hidden[:, -1, :])
        # Logits are float32 in every precision (the manifest says so): the sampler's softmax and
        # argmax over a 32k vocabulary want the range, and the cast is one [B, V] op.
        return (self.lm_head(last).float(), *present)

    def attention(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        allowed: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention over past and new keys without concatenating them.

        Scores against the past and against the new keys are computed apart and joined (they are
        small); values are weighted apart and summed. So the graph never copies the KV cache,
        which a Concat(past, new) would do on every step, and returns only the new keys/values.
        GQA groups the query heads of each KV head, so K/V are never repeated either.
        """
        attn = layer.self_attn
        batch, seq, _ = x.shape
        head_dim = attn.head_dim
        groups = self.num_heads // self.num_kv_heads
        q, k, v = project_qkv(attn, x)
        q = q.view(batch, seq, self.num_heads, head_dim)
        k = k.view(batch, seq, self.num_kv_heads, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: an RMSNorm over each head's query and key
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, head_dim).transpose(1, 2)
        q, k = self.apply_rotary(q, k, cos, sin)
        # [B, H, S, D] -> [B, KV, G*S, D]: query head h = kv * G + g, as transformers' repeat_kv.
        q = q.reshape(batch, self.num_kv_heads, groups * seq, head_dim)
        past_len = past_key.shape[2]
        scores = (
            torch.cat(
                [torch.matmul(q, past_key.transpose(2, 3)), torch.matmul(q, k.transpose(2, 3))],
                dim=-1,
            ).float()
            * attn.scaling
        )
        # Masked scores get the dtype's lowest value through Where, never by addition, so fp16
        # cannot overflow to -inf and fully masked (padding) rows stay finite.
        scores = torch.where(allowed, scores, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs[..., :past_len], past_value) + torch.matmul(
            probs[..., past_len:], v
        )
        out = (
            out.reshape(batch, self.num_heads, seq, head_dim)
            .transpose(1, 2)
            .reshape(batch, seq, -1)
        )
        return attn.o_proj(out), k, v


def project_qkv(
    attn: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values [B, S, heads * head_dim], from q/k/v_proj or Phi-3's qkv_proj."""
    if not hasattr(attn, "qkv_proj"):
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q_size = attn.config.num_attention_heads * attn.head_dim
    kv_size = attn.config.num_key_value_heads * attn.head_dim
    return attn.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)


def visibility(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """[B, 1, S, past+S] bool: which keys each new token may attend to.

    A key is visible if its slot is valid in attention_mask and it does not come after the
    query (slots are in time order; the S new tokens take the last S slots).
    """
    total = attention_mask.shape[1]
    key_slot = torch.arange(total, device=attention_mask.device)
    query_slot = torch.arange(seq, device=attention_mask.device) + (total - seq)
    causal = key_slot[None, :] <= query_slot[:, None]
    return causal[None, None] & attention_mask.bool()[:, None, None, :]
