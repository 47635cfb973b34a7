"""DeepSeek-style Mixture-of-Experts language model: MLA or GQA attention, fine-grained routed + shared experts,
softmax or sigmoid group-limited routing, aux-loss-free load balancing and multi-token prediction.

This file is also exported next to `config.json` by `save_pretrained`, so a folder loads with `trust_remote_code=True`
where the `modeling_moe` package is not installed: it imports only torch, transformers and its sibling files.
"""

import contextlib
import dataclasses
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import utils as generation_utils
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, packed_sequence_mask_function
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from .cache_moe import MoEStaticCache
from .configuration_moe import MoEConfig

# experts_implementation="fused" (Triton kernels, modeling_moe.kernels) is registered when the modeling_moe package is
# installed, also for this file's exported trust_remote_code copy; without the package the default stays grouped_mm.
try:
    import modeling_moe.kernels as moe_kernels
except ImportError:
    moe_kernels = None
try:  # the MLA decode kernel (Triton) likewise comes with the package
    from modeling_moe.kernels.mla_decode import HAS_TRITON as MLA_DECODE_HAS_TRITON
    from modeling_moe.kernels.mla_decode import mla_decode_attention
except ImportError:
    MLA_DECODE_HAS_TRITON, mla_decode_attention = False, None
try:  # and the router's small ops as kernels (selection, weight split); without them the router runs PyTorch ops
    from modeling_moe.kernels.router import router_topk, router_topk_applies, split_bf16_, split_bf16_applies
except ImportError:
    router_topk = router_topk_applies = split_bf16_ = split_bf16_applies = None
try:  # and the chunked loss (`skip_logits`); without it the loss is taken from the whole logits
    from modeling_moe.kernels.linear_cross_entropy import chunked_causal_lm_loss
except ImportError:
    chunked_causal_lm_loss = None


@dataclass
class MoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """transformers' MoE causal-LM output, plus `lm_loss`: the next-token loss alone, without the auxiliary and MTP
    terms that `loss` (the training objective) adds to it."""

    lm_loss: torch.FloatTensor | None = None


# transformers renamed the cache argument and output field from `past_key_values` to `cache` in 5.2x.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class MoERotaryEmbedding(nn.Module):
    """cos/sin tables of the rotary part of each head (`qk_rope_head_dim` in MLA, `head_dim` in GQA)."""

    inv_freq: torch.Tensor

    def __init__(self, config: MoEConfig):
        super().__init__()
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            dim, base = config.head_dim, config.rope_parameters["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(x.dtype, torch.float32)  # never below fp32: positions reach the thousands
        freqs = position_ids[..., None].to(dtype) * self.inv_freq.to(device=x.device, dtype=dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                 heads_dim: int = 1) -> torch.Tensor:
    """Rotate `x` [batch, heads, seq, dim] (or [batch, seq, heads, dim] with `heads_dim` 2) by the [batch, seq, dim]
    tables.

    Interleaved weights (DeepSeek's layout) rotate pairs (x0, x1), (x2, x3), ...; the result is written de-interleaved
    (evens then odds), which leaves every query-key dot product unchanged.
    """
    cos, sin = cos.unsqueeze(heads_dim), sin.unsqueeze(heads_dim)
    if not interleaved:
        return x * cos + rotate_half(x) * sin
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention: explicit softmax in fp32 over [batch, heads, q, k] scores."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = add_attention_mask(scores, attention_mask)
    probs = softmax_in_at_least_fp32(scores).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def document_indices(position_ids: torch.Tensor) -> torch.Tensor:
    """Which packed document each position [..., seq] belongs to (0, 1, ...): a new one wherever the positions do not
    go up by one."""
    new_document = position_ids.diff(dim=-1) != 1
    return torch.cat([torch.zeros_like(position_ids[..., :1]), new_document.cumsum(-1)], dim=-1)


def let_keyless_queries_see_themselves(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask [..., q, k] in which each query that may attend to no key (left padding) attends to its own
    position instead; the other rows are unchanged.

    Such a query's output is discarded (the loss masks padding), but its logsumexp is -inf, and with that cuDNN's SDPA
    backward, the backend PyTorch picks for MLA's unequal head dims on H100/H200, returns NaN query gradients when the
    length is 64 mod 128 (PyTorch >= 2.11, pytorch/pytorch#196678: every countdown GRPO step of 192 tokens here)."""
    queries, keys = mask.shape[-2:]
    positions = torch.arange(keys, device=mask.device)
    own = positions[None, :] == (positions[:queries, None] + keys - queries)
    return mask | (own & ~mask.any(dim=-1, keepdim=True))


def attend(module, query, key, value, attention_mask, **kwargs) -> torch.Tensor:
    """[batch, heads, seq, dim] attention through the `attn_implementation` chosen in the config (sdpa, eager, ...)."""
    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager_attention_forward
    )
    attn_output, _ = attention_interface(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=module.attention_dropout if module.training else 0.0,
        scaling=module.scaling,
        **kwargs,
    )
    return attn_output


def softmax_in_at_least_fp32(scores: torch.Tensor) -> torch.Tensor:
    return F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


def add_attention_mask(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a transformers 4D mask, boolean (True = attend) or additive, to attention scores."""
    if attention_mask is None:
        return scores
    attention_mask = attention_mask[..., : scores.shape[-1]]
    lowest = torch.finfo(scores.dtype).min
    if attention_mask.dtype == torch.bool:
        return scores.masked_fill(~attention_mask, lowest)
    # Clamped so that fully masked rows (left padding) stay finite instead of turning into NaN.
    return (scores + attention_mask).clamp(min=lowest)


def cache_has_tokens(cache: Cache, layer_idx: int) -> bool:
    """Whether `cache` already holds tokens for `layer_idx`. A static cache keeps its length on the device; ours
    answers from the host, so the choice of code path neither syncs nor breaks a compiled graph."""
    if isinstance(cache, MoEStaticCache):
        return cache.has_cached_tokens(layer_idx)
    return bool(cache.get_seq_length(layer_idx) > 0)


def yarn_softmax_scale(config: MoEConfig, head_dim: int) -> float:
    """Softmax scale; YaRN with `mscale_all_dim` also sharpens it by mscale^2 as in DeepSeek-V2/V3."""
    scale = head_dim**-0.5
    rope = config.rope_parameters
    if rope.get("rope_type") == "yarn" and rope.get("mscale_all_dim") and rope["factor"] > 1:
        mscale = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0
        scale = scale * mscale * mscale
    return scale


class MoEMultiHeadLatentAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2): the cache holds only the `kv_lora_rank` latent and one shared
    rotary key per token.

    Training and prefill expand the latent to per-head keys and values through `kv_b_proj`. A step that extends an
    existing cache uses the absorbed form instead: `kv_b_proj`'s key half is folded into the query and its value half
    into the output, so attention runs directly over the cached latents and nothing is expanded.
    """

    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1
        self.is_causal = True
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.scaling = yarn_softmax_scale(config, self.qk_head_dim)
        self.attention_dropout = config.attention_dropout

        q_out = self.num_heads * self.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = MoERMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = MoERMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_bias)

    def project_query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.config.q_lora_rank is None:
            return self.q_proj(hidden_states)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        batch, seq_len = hidden_states.shape[:-1]
        # Queries stay [batch, seq, heads, dim] up to the attention, which gets [batch, heads, seq, dim] views: SDPA's
        # output and gradients take the query's memory order, so o_proj's input and q_proj's gradient need no
        # transposing copies.
        query = self.project_query(hidden_states).view(batch, seq_len, self.num_heads, self.qk_head_dim)
        q_nope, q_rope = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(batch, 1, seq_len, self.kv_lora_rank)
        k_rope = k_rope.view(batch, 1, seq_len, self.qk_rope_head_dim)

        cos, sin = position_embeddings
        q_rope = apply_rotary(q_rope, cos, sin, self.config.rope_interleave, heads_dim=2)
        k_rope = apply_rotary(k_rope, cos, sin, self.config.rope_interleave)

        extends_cache = cache is not None and cache_has_tokens(cache, self.layer_idx)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)

        if extends_cache:
            static = isinstance(cache, MoEStaticCache)
            attn_output = self.absorbed_attention(q_nope.transpose(1, 2), q_rope.transpose(1, 2), latent, k_rope,
                                                  attention_mask, static)
        else:
            # A first fill: only the first seq_len positions hold keys (a static cache returns its whole buffer).
            latent, k_rope = latent[:, :, :seq_len], k_rope[:, :, :seq_len]
            if attention_mask is not None:
                attention_mask = attention_mask[..., :seq_len]
            attn_output = self.expanded_attention(q_nope, q_rope, latent, k_rope, attention_mask, **kwargs)
        return self.o_proj(attn_output.reshape(batch, seq_len, -1))

    def expanded_attention(self, q_nope, q_rope, latent, k_rope, attention_mask, **kwargs):
        """Attention over per-head keys and values expanded from the latents; queries [batch, seq, heads, dim]."""
        batch, _, kv_len, _ = latent.shape
        kv = self.kv_b_proj(latent).view(batch, kv_len, self.num_heads, -1)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_rope.transpose(1, 2).expand(-1, -1, self.num_heads, -1)), dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)
        return attend(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                      **kwargs)

    def kv_b_weight(self) -> torch.Tensor:
        """`kv_b_proj`'s weight [heads * (nope + v), r] as the module applies it. The absorbed form needs the matrix
        itself; when an adapter wraps the projection (PEFT LoRA, unmerged), its `.weight` is the base weight alone,
        so the wrapped module is applied to the identity instead (one [r, r] input), which includes the adapter."""
        if type(self.kv_b_proj) is nn.Linear:
            return self.kv_b_proj.weight
        base = self.kv_b_proj.get_base_layer() if hasattr(self.kv_b_proj, "get_base_layer") else self.kv_b_proj
        identity = torch.eye(self.kv_lora_rank, dtype=base.weight.dtype, device=base.weight.device)
        return self.kv_b_proj(identity).transpose(0, 1)

    def absorbed_attention(self, q_nope, q_rope, latent, k_rope, attention_mask, static_cache=False):
        """Attention over the cached latents: scores = (q_nope W_uk) c^T + q_rope k_rope^T, output = (p c) W_uv^T.

        On CUDA a static cache goes through the split-KV Triton kernel, which reads only the filled part of the
        preallocated buffers; an exactly-filled dynamic cache stays on the PyTorch path, as fast until the kernel is
        tuned (benchmarks/RESULTS.md).
        """
        w_kv = self.kv_b_weight().view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        batch, heads, q_len, _ = q_nope.shape
        q_latent = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)
        if static_cache and mla_decode_attention is not None and MLA_DECODE_HAS_TRITON and q_latent.is_cuda:
            out_latent = mla_decode_attention(q_latent, q_rope, latent, k_rope, self.scaling, attention_mask)
            return torch.einsum("bhsr,hvr->bshv", out_latent, w_uv)
        # Heads folded into rows: one [heads * q, r] x [r, kv] product per sequence reads the cache once; a
        # broadcasting matmul over the single latent "head" would copy the cache once per head.
        latent, k_rope = latent.squeeze(1), k_rope.squeeze(1)
        scores = torch.bmm(q_latent.reshape(batch, heads * q_len, -1), latent.transpose(1, 2))
        scores = scores + torch.bmm(q_rope.reshape(batch, heads * q_len, -1), k_rope.transpose(1, 2))
        scores = add_attention_mask(scores.view(batch, heads, q_len, -1) * self.scaling, attention_mask)
        probs = softmax_in_at_least_fp32(scores).to(latent.dtype)
        out_latent = torch.bmm(probs.view(batch, heads * q_len, -1), latent).view(batch, heads, q_len, -1)
        return torch.einsum("bhsr,hvr->bshv", out_latent, w_uv)


class MoEGroupedQueryAttention(nn.Module):
    """Grouped-query attention (Mixtral / Qwen3-MoE style) with a standard per-head key/value cache."""

    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.is_causal = True
        self.scaling = yarn_softmax_scale(config, self.head_dim)
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        batch, seq_len = hidden_states.shape[:-1]
        # [batch, seq, heads, dim] up to the attention's [batch, heads, seq, dim] views, as in MLA (no transposing
        # copies around SDPA)
        query = self.q_proj(hidden_states).view(batch, seq_len, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(batch, seq_len, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query = apply_rotary(query, cos, sin, self.config.rope_interleave, heads_dim=2).transpose(1, 2)
        key = apply_rotary(key, cos, sin, self.config.rope_interleave, heads_dim=2).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attn_output = attend(self, query, key, value, attention_mask, **kwargs)
        return self.o_proj(attn_output.reshape(batch, seq_len, -1))


class MoEMLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, config: MoEConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio of expert loads [..., experts] (Wang et al. 2024): (max load - mean load) / mean load."""
    mean = load.mean(dim=-1)
    return (load.amax(dim=-1) - mean) / mean.clamp(min=1e-9)


def split_bf16(t: torch.Tensor, parts: int = 3) -> torch.Tensor:
    """An fp32 tensor as `parts` bf16 tensors that sum to it, stacked: each the top 8 significand bits of what the ones
    before left, so three carry all 24 of fp32's exactly. Truncated, not rounded: each piece is exact in bf16, so a
    compiler that keeps a cast's value in fp32 (as inductor does) cannot change them. Eager on a GPU, one kernel
    (`kernels/router.py`) instead of six ops."""
    if parts == 3 and split_bf16_ is not None and split_bf16_applies(t):
        return split_bf16_(t.contiguous(), t.new_empty(3, *t.shape, dtype=torch.bfloat16))
    pieces = []
    for _ in range(parts - 1):
        top = (t.view(torch.int32) & -65536).view(torch.float32)  # the sign, exponent and 7 significand bits
        pieces.append(top)
        t = t - top  # exact
    return torch.stack([*pieces, t]).to(torch.bfloat16)


def matmul_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 matrices, accumulated and returned in fp32 (on tensor cores where the GPU has them)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class RouterLogits(torch.autograd.Function):
    """fp32 router logits x @ W^T of bf16 hidden states x and an fp32 (or bf16) weight W, on bf16 tensor cores.

    x is exact in bf16 and an fp32 W = W_1 + W_2 + W_3 exactly in three bf16 pieces (a bf16 W is its own one), so each
    product x W_i is exact in fp32 and x @ [W_1; W_2; W_3]^T, summed over its thirds, is the fp32 product up to the
    accumulation's rounding, as cuBLAS's fp32 GEMM computes it (what `F.linear` on fp32 copies runs, as transformers'
    DeepseekV3 router does), but on tensor cores instead of CUDA cores; Hopper's tensor cores accumulate with 3-4x
    that GEMM's error (~1e-5 of the largest logit, where TF32 would give ~5e-4). The backward splits the fp32 logit
    gradient G the same way: dW from one GEMM of [G_1; G_2; G_3]^T @ x; dx, rounded to bf16 anyway, from G_1 W_1 +
    G_2 W_1 + G_1 W_2 as one GEMM (the terms left out are 2^-16 of it). No fp32 copy of x is made or saved.
    """

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        pieces = split_bf16(weight.float(), parts=1 if weight.dtype == torch.bfloat16 else 3)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(hidden_states, pieces[:2])
        logits = matmul_fp32_out(hidden_states, pieces.flatten(0, 1).t())
        return logits.unflatten(-1, (len(pieces), -1)).sum(dim=-2)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        hidden_states, weight_pieces = ctx.saved_tensors
        pieces = split_bf16(grad_logits.float())
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            terms = [(i, j) for i, j in [(0, 0), (1, 0), (0, 1)] if j < len(weight_pieces)]
            grad_hidden = (torch.cat([pieces[i] for i, _ in terms], dim=-1)
                           @ torch.cat([weight_pieces[j] for _, j in terms]))
        if ctx.needs_input_grad[1]:
            per_piece = matmul_fp32_out(pieces.permute(1, 0, 2).flatten(1).t(), hidden_states)  # [G_1; G_2; G_3]^T x
            grad_weight = per_piece.unflatten(0, (len(pieces), -1)).sum(dim=0).to(ctx.weight_dtype)
        return grad_hidden, grad_weight


# Below this many multiply-adds (tokens x hidden x experts) an eager `RouterLogits` may cost more in the host's ~15
# launches (splitting the weight and the gradient, summing the pieces) than the GPU time it saves (the fp32 GEMM's
# forward+backward takes ~0.4 ms at 2^30 on an H200): decode steps, and the 1.26B model's 16k-token layers when not
# compiled, keep the fp32 GEMM. Compiled, the split fuses and is always taken.
ROUTER_TENSOR_CORE_MIN_MACS = 2**31


def largest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [..., k] of the k largest entries along the last dimension, in descending order, ties to the
    lower index: k rounds of max, each masking the entry it picked, as the Triton router picks. Compiled, inductor
    fuses the rounds and the scores around them into one kernel (26 us for 16k tokens x 64 experts, top-6, on an
    H200), where torch.topk stays an aten kernel of its own (57 us)."""
    positions = torch.arange(values.shape[-1], device=values.device)
    picked_values, picked = [], []
    for _ in range(k):
        best, index = values.max(dim=-1, keepdim=True)
        picked_values.append(best)
        picked.append(index)
        values = values.masked_fill(positions == index, float("-inf"))
    return torch.cat(picked_values, dim=-1), torch.cat(picked, dim=-1)


def router_logits_fp32(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The router's logits [tokens, experts] in at least fp32: bf16 hidden states on a GPU through `RouterLogits`
    where it pays (compiled, or a batch of ROUTER_TENSOR_CORE_MIN_MACS or more), anything else as `F.linear` of fp32
    (or wider) copies."""
    pays = torch.compiler.is_compiling() or hidden_states.numel() * weight.shape[0] >= ROUTER_TENSOR_CORE_MIN_MACS
    if (hidden_states.is_cuda and hidden_states.dtype == torch.bfloat16
            and weight.dtype in (torch.float32, torch.bfloat16) and pays):
        return RouterLogits.apply(hidden_states, weight)
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    return F.linear(hidden_states.to(dtype), weight.to(dtype))


class MoETopkRouter(nn.Module):
    """Scores every expert in fp32 and picks the top-k per token.

    `e_score_correction_bias` only steers the selection (aux-loss-free balancing); the routing weights come from the
    unbiased scores. While training it counts the tokens each expert receives, for `update_expert_bias`.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        # A plain attribute, not a buffer: DDP would overwrite every rank's counts with rank 0's at each forward.
        self.tokens_per_expert: torch.Tensor | None = None

    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        if self.config.scoring_func == "softmax":
            return router_logits.softmax(dim=-1)
        if self.config.scoring_func == "sigmoid":
            return router_logits.sigmoid()
        raise ValueError(f"scoring_func={self.config.scoring_func!r} is not supported; allowed: 'softmax', 'sigmoid'.")

    @torch.no_grad()
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k expert indices [tokens, k] from the scores plus bias, limited to the best groups if configured."""
        biased = scores + self.e_score_correction_bias
        config = self.config
        if config.topk_method == "group_limited" and config.topk_group < config.n_group:
            grouped = biased.view(-1, config.n_group, self.num_experts // config.n_group)
            if config.scoring_func == "sigmoid":
                group_scores = largest(grouped, 2)[0].sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            best_groups = largest(group_scores, config.topk_group)[1]
            keep = (best_groups.unsqueeze(-1) == torch.arange(config.n_group, device=biased.device)).any(dim=1)
            biased = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, self.num_experts)
        return largest(biased, self.top_k)[1]

    def weights_of(self, scores: torch.Tensor, topk_indices: torch.Tensor) -> torch.Tensor:
        """The chosen experts' routing weights: their unbiased scores, normalised if configured, then scaled."""
        topk_weights = scores.gather(1, topk_indices)
        if self.config.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weights * self.config.routed_scaling_factor

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = router_logits_fp32(hidden_states.reshape(-1, hidden_states.shape[-1]), self.weight)
        config = self.config
        if router_topk is not None and router_topk_applies(router_logits, config.scoring_func, config.n_group,
                                                           config.topk_method == "group_limited"):
            # scores, select and weights_of in one kernel (and one for their backward): eager launches add up
            topk_weights, topk_indices = router_topk(
                router_logits, self.e_score_correction_bias, self.top_k, config.scoring_func,
                config.n_group if config.topk_method == "group_limited" else 1, config.topk_group,
                config.norm_topk_prob, config.routed_scaling_factor)
            return router_logits, topk_weights, topk_indices
        scores = self.scores(router_logits)
        topk_indices = self.select(scores)
        return router_logits, self.weights_of(scores, topk_indices), topk_indices

    @torch.no_grad()
    def count_tokens(self, topk_indices: torch.Tensor, token_mask: torch.Tensor | None = None):
        """Add the tokens of one forward to each expert's load, from the experts it chose ([tokens, k]; padding, 0 in
        `token_mask`, does not count). The model calls this after the layer, outside any checkpointed region, so a
        forward replayed for backward is never counted twice, and the count traces into a compiled graph."""
        load = routed_load(topk_indices, self.num_experts, token_mask=token_mask)[0]
        if self.tokens_per_expert is None:
            self.tokens_per_expert = load
        else:
            self.tokens_per_expert.add_(load)

    @torch.no_grad()
    def expert_load(self, router_logits: torch.Tensor, num_sequences: int = 1,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens each expert receives from these router logits, per sequence: [num_sequences, experts] (the logits'
        rows in sequence order, as the model returns them; rows where `token_mask` is 0 do not count)."""
        return routed_load(self.select(self.scores(router_logits)), self.num_experts, num_sequences, token_mask)


@use_experts_implementation
class MoEExperts(nn.Module):
    """The routed experts, stacked: `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I].

    This loop is the readable reference ("eager"); `experts_implementation` swaps in faster ones. Every implementation
    reads the parameters at call time, so PEFT's `target_parameters` LoRA applies to all of them.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * config.moe_intermediate_size, config.hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, config.moe_intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        # Combine in at least fp32, whatever the activations' dtype.
        accumulate_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        output = torch.zeros(hidden_states.shape, dtype=accumulate_dtype, device=hidden_states.device)
        for expert in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            output.index_add_(0, token_idx, expert_out.to(accumulate_dtype) * top_k_weights[token_idx, slot, None])
        return output.to(hidden_states.dtype)


class MoESparseMoeBlock(nn.Module):
    """Routed experts plus always-on shared experts."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.gate = MoETopkRouter(config)
        self.experts = MoEExperts(config)
        self.shared_experts = (
            MoEMLP(config, config.moe_intermediate_size * config.n_shared_experts) if config.n_shared_experts else None
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The block's output and its routing: (router logits [tokens, experts], chosen experts [tokens, k])."""
        # The shared experts first: their GEMMs keep the GPU busy while the host runs the router and the routing, a
        # chain of small kernels that would otherwise leave it idle (eager V2-Lite-sized layer: ~1.4 ms an iteration)
        shared = self.shared_experts(hidden_states) if self.shared_experts is not None else None
        router_logits, topk_weights, topk_indices = self.gate(hidden_states)
        routed = self.experts(hidden_states.reshape(-1, hidden_states.shape[-1]), topk_indices, topk_weights)
        output = routed.view_as(hidden_states)
        if shared is not None:
            output = output + shared
        return output, (router_logits, topk_indices)


ATTENTION_CLASSES = {"mla": MoEMultiHeadLatentAttention, "gqa": MoEGroupedQueryAttention}


class MoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ATTENTION_CLASSES[config.attention_type](config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoESparseMoeBlock(config) if self.is_moe else MoEMLP(config, config.intermediate_size)
        self.input_layernorm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        """Returns the new hidden states and this layer's routing, (router logits, chosen experts) (None in a dense
        layer)."""
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        routing = None
        if self.is_moe:
            hidden_states, routing = self.mlp(hidden_states)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, routing


class MoEMultiTokenPredictionLayer(MoEDecoderLayer):
    """DeepSeek-V3 MTP module: predicts the token `depth` positions further from the previous depth's hidden states
    and the embedding of the next known token. It shares the embedding and output head with the main model."""

    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.norm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, previous_hidden, next_embeds, position_embeddings, attention_mask=None, **kwargs):
        hidden_states = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(previous_hidden)), dim=-1))
        hidden_states, routing = super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
        return self.norm(hidden_states), routing


STALE_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def save_through_staging(save_directory: str, write: Callable[[str], object]):
    """Call `write(staging)` on a hidden folder inside `save_directory`, then move what it wrote in; returns what
    `write` returned.

    Staging inside the target keeps every move on one file system, also when `save_directory` is itself a mount point
    (a container volume), and needs no write access to its parent. Files of other tools already there (a tokenizer,
    a Trainer's optimizer state) are kept. The earlier config.json goes first and the new one comes in last, after
    the weight files of an earlier save that this one does not replace are removed (a stale model.safetensors would
    be loaded instead of new shards): a save interrupted while its files move in leaves a folder that does not load,
    never a valid-looking config over a mix of two saves. If `write` fails, the folder is left as it was.
    """
    save_directory = os.path.abspath(os.fspath(save_directory))
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory} is a file, not a directory.")
    created = not os.path.isdir(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    staging = tempfile.mkdtemp(dir=save_directory, prefix=".saving-")
    try:
        try:
            result = write(staging)
        except BaseException:
            if created:
                shutil.rmtree(save_directory, ignore_errors=True)
            raise
        written = sorted(os.listdir(staging), key=lambda name: name == "config.json")
        config_file = os.path.join(save_directory, "config.json")
        if "config.json" in written and os.path.lexists(config_file):
            os.remove(config_file)
        for name in written:
            if name == "config.json":
                for stale in os.listdir(save_directory):
                    if stale not in written and STALE_WEIGHTS.fullmatch(stale):
                        os.remove(os.path.join(save_directory, stale))
            os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


class MoEPreTrainedModel(PreTrainedModel):
    config_class = MoEConfig
    config: MoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoEDecoderLayer", "MoEMultiTokenPredictionLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]

    def __init__(self, config: MoEConfig, *inputs, **kwargs):
        config.check()  # fields may have been set since the config was built
        super().__init__(config, *inputs, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Default to the fused Triton experts where they run (a CUDA GPU, Triton installed) and compute this model's
        experts (SwiGLU: hidden_act="silu"); transformers' choice (grouped_mm) otherwise. An explicit
        `experts_implementation` always wins."""
        if (requested_experts is None and moe_kernels is not None and moe_kernels.preferred_by_default()
                and self.config.hidden_act == "silu"):
            requested_experts = "fused"
        return super().get_correct_experts_implementation(requested_experts)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, MoERMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, MoETopkRouter):
            module.weight.normal_(0.0, std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, MoEExperts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, MoERotaryEmbedding):
            module.inv_freq.copy_(MoERotaryEmbedding(self.config).inv_freq)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` through `save_through_staging`: written into a hidden folder inside
        `save_directory`, then moved in, config last and the earlier config removed first, so an interrupted save never
        leaves a half-written checkpoint behind a valid-looking config. Weight shards of an earlier save that the new
        one does not replace are removed."""
        save_directory = os.path.abspath(os.fspath(save_directory))
        if kwargs.get("push_to_hub"):  # transformers names the repository after the folder it writes: the staging one
            kwargs.setdefault("repo_id", os.path.basename(save_directory))
        save = super().save_pretrained
        return save_through_staging(save_directory, lambda staging: save(staging, *args, **kwargs))

    def routers(self) -> list[MoETopkRouter]:
        return [module for module in self.modules() if isinstance(module, MoETopkRouter)]

    @torch.no_grad()
    def update_expert_bias(self, update_speed: float | None = None, process_group=None) -> dict[str, torch.Tensor]:
        """Aux-loss-free load balancing step (DeepSeek-V3): call once per optimizer step.

        Sums the tokens each expert received since the last call over the data-parallel ranks (when torch.distributed
        is initialised), moves each router's bias by `update_speed * sign(mean load - load)` (centred so the biases
        keep a zero mean), resets the counts and returns per-layer statistics: `tokens_per_expert` [layers, experts]
        and `maxvio` [layers], (max load - mean load) / mean load.
        """
        routers = self.routers()
        if not routers:
            return {"tokens_per_expert": torch.empty(0, 0), "maxvio": torch.empty(0)}
        speed = self.config.bias_update_speed if update_speed is None else update_speed
        device = routers[0].e_score_correction_bias.device
        load = torch.stack([
            r.tokens_per_expert.to(device) if r.tokens_per_expert is not None
            else torch.zeros(r.num_experts, device=device)
            for r in routers
        ])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load, group=process_group)
        mean = load.mean(dim=-1, keepdim=True)
        if speed > 0:
            delta = speed * torch.sign(mean - load)
            delta -= delta.mean(dim=-1, keepdim=True)
            for router, router_delta in zip(routers, delta):
                router.e_score_correction_bias += router_delta
        for router in routers:
            router.tokens_per_expert = None
        return {"tokens_per_expert": load, "maxvio": max_violation(load)}

    def num_parameters_summary(self) -> dict[str, int]:
        """Parameter counts: `total`; `mtp`, the MTP modules' own (skipped at inference); `embedding`, the input table;
        `activated` per token at inference, without the input table (the DeepSeek reports' convention) and the MTP
        modules, with only `num_experts_per_tok` of each layer's routed experts."""
        top_k = self.config.num_experts_per_tok
        total = mtp = idle_experts = 0
        seen = set()  # tied embeddings: one tensor, two modules
        for name, module in self.named_modules():
            own = sum(p.numel() for p in module.parameters(recurse=False) if id(p) not in seen)
            seen.update(id(p) for p in module.parameters(recurse=False))
            in_mtp = ".mtp_layers." in f".{name}."
            total += own
            mtp += own if in_mtp else 0
            if isinstance(module, MoEExperts) and not in_mtp:
                idle_experts += own * (module.num_experts - top_k) // module.num_experts
        embedding = self.get_input_embeddings().weight.numel()
        activated = total - embedding - mtp - idle_experts
        return {"total": total, "activated": activated, "mtp": mtp, "embedding": embedding}


class MoEModel(MoEPreTrainedModel):
    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MoERotaryEmbedding(config)
        self.mtp_layers = nn.ModuleList(
            MoEMultiTokenPredictionLayer(config, config.num_hidden_layers + depth)
            for depth in range(config.num_nextn_predict_layers)
        )
        self.gradient_checkpointing = False
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also loads the base model of a DeepSeek-V2/V3 checkpoint (see `MoEForCausalLM.from_pretrained`)."""
        from .deepseek_checkpoint import is_deepseek_checkpoint

        if is_deepseek_checkpoint(pretrained_model_name_or_path):
            return MoEForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, **kwargs).model
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:  # a training forward makes none (one hides packed documents' bounds), but uses one given
            use_cache = self.config.use_cache and (not self.training or cache is not None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if isinstance(cache, MoEStaticCache) and not cache.has_cached_tokens(0):  # a prefill, from position 0
            cache.check_length(inputs_embeds.shape[1], "this forward")
        # Positions the caller gives may pack several documents into a row, which the mask must see (transformers
        # reads them on the host); positions made here never do, and are not handed to the mask (no host sync).
        mask_positions = position_ids
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen

        causal_mask = self.causal_mask(inputs_embeds, attention_mask, cache, mask_positions)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        router_logits = ()
        token_mask = padding_mask(attention_mask, *inputs_embeds.shape[:2]) if self.training else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, routing = layer(
                hidden_states, position_embeddings, attention_mask=causal_mask, cache=cache, **kwargs
            )
            if routing is not None:
                router_logits += (routing[0],)
                if self.training:
                    layer.mlp.gate.count_tokens(routing[1], token_mask)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            router_logits=router_logits,
            **{CACHE_FIELD: cache},
        )

    def causal_mask(self, inputs_embeds, attention_mask, cache, position_ids):
        """transformers' mask for the configured attention; in training, a boolean one lets each query that would see
        no key (left padding) see itself (`let_keyless_queries_see_themselves`).

        Pretraining's masks (no cache; sdpa or eager) come out the same whether or not a CUDA graph is being captured
        (`pretrain --cuda_graph`), which transformers treats as tracing: given positions mask each packed document on
        the device, where transformers would first read on the host whether any row packs several (a sync each
        forward); sdpa without a padding mask or positions gets None (its `is_causal`), which transformers gives
        only outside a capture.
        """
        implementation = self.config._attn_implementation
        documents = None
        if cache is None and implementation in ("sdpa", "eager"):
            if position_ids is not None:
                documents = packed_sequence_mask_function(
                    document_indices(position_ids.expand(inputs_embeds.shape[0], -1)))
                position_ids = None  # (transformers' own search for packed documents reads them on the host)
            elif attention_mask is None and implementation == "sdpa":
                return None
        # Positional arguments: the cache keyword was renamed across transformers 5.x.
        mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids,
                                  and_mask_function=documents)
        if self.training and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            mask = let_keyless_queries_see_themselves(mask)
        return mask

    def multi_token_prediction(self, hidden_states, input_ids, attention_mask=None, position_ids=None, **kwargs):
        """Run the MTP modules in sequence; depth d's hidden states at position i predict token i + d + 1.

        Returns one (normed hidden states [batch, seq - d, hidden], router logits) pair per depth.
        """
        seq_len = input_ids.shape[1]
        given_positions = position_ids is not None  # as in forward: only these go to the mask
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        outputs = []
        for depth, layer in enumerate(self.mtp_layers, start=1):
            keep = seq_len - depth
            embeds = self.embed_tokens(input_ids[:, depth:])
            mask = attention_mask[:, :keep] if attention_mask is not None else None
            positions = position_ids[..., :keep]
            causal_mask = self.causal_mask(embeds, mask, None, positions if given_positions else None)
            hidden_states, routing = layer(
                hidden_states[:, :keep], embeds, self.rotary_emb(embeds, positions), causal_mask, **kwargs
            )
            if routing is not None and self.training:
                layer.mlp.gate.count_tokens(routing[1], padding_mask(mask, *embeds.shape[:2]))
            outputs.append((hidden_states, routing[0] if routing is not None else None))
        return outputs


def batch_share(labels: torch.Tensor, num_items_in_batch) -> torch.Tensor | float:
    """The weight of a per-micro-batch mean added to the language-modelling loss. A trainer that passes
    `num_items_in_batch` (transformers' Trainer with gradient accumulation or tokens averaged across devices) sums the
    LM loss over the whole batch and divides by that count, and no longer divides by the accumulation steps: each
    micro-batch's mean then counts in proportion to its share of the counted tokens, so the terms add up to one mean."""
    if num_items_in_batch is None:
        return 1.0
    counted = (labels[..., 1:] != -100).sum()
    return counted / torch.as_tensor(num_items_in_batch, device=counted.device)


def padding_mask(attention_mask, batch: int, seq_len: int) -> torch.Tensor | None:
    """This forward's [batch, seq_len] padding mask (1 = a real token) from a 2D attention mask, which may also cover
    cached positions before these tokens; None for no mask or another kind (4D, custom)."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and (
            attention_mask.shape[0] == batch and attention_mask.shape[1] >= seq_len):
        return attention_mask[:, attention_mask.shape[1] - seq_len:]
    return None


def token_weights(token_mask: torch.Tensor | None, topk_indices: torch.Tensor, dtype) -> torch.Tensor:
    """1 per (token, chosen expert), 0 for the padding tokens of `token_mask` ([tokens] or any shape of that size)."""
    if token_mask is None:
        return torch.ones_like(topk_indices, dtype=dtype)
    return token_mask.reshape(-1, 1).to(dtype).expand_as(topk_indices)


def routed_load(topk_indices: torch.Tensor, num_experts: int, num_sequences: int = 1,
                token_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tokens each expert receives from the chosen experts [tokens, k], per sequence: [num_sequences, experts] (the
    rows in sequence order; rows where `token_mask` is 0 do not count).

    A histogram (bin s * experts + e; padding falls outside every bin): scatter_add's atomic adds, all on a few dozen
    counters, take 32 us a layer of 16k tokens on an H200. scatter_add where deterministic algorithms are enforced
    (torch's histc has no deterministic CUDA kernel)."""
    rows = topk_indices.reshape(num_sequences, -1)
    if not torch.are_deterministic_algorithms_enabled():
        bins = rows + torch.arange(0, num_sequences * num_experts, num_experts, device=rows.device).unsqueeze(1)
        if token_mask is not None:
            bins = bins.masked_fill(token_weights(token_mask, topk_indices, torch.bool).reshape_as(rows).logical_not(),
                                    -1)
        total = num_sequences * num_experts
        return torch.histc(bins.float(), bins=total, min=-0.5, max=total - 0.5).view(num_sequences, -1).to(dtype)
    load = torch.zeros(num_sequences, num_experts, dtype=dtype, device=topk_indices.device)
    return load.scatter_add_(1, rows, token_weights(token_mask, topk_indices, dtype).reshape_as(rows))


def expert_balance_loss(router: MoETopkRouter, router_logits: torch.Tensor, num_sequences: int = 1,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek's expert-level balance loss sum_i f_i * P_i, averaged over `num_sequences` equal slices of the tokens.

    f_i = E / (k T) * (tokens routed to expert i), P_i = mean affinity of expert i (scores normalised per token);
    a perfectly balanced router gives 1. One slice is the batch-wise loss; one slice per sequence is DeepSeek-V3's
    sequence-wise loss. Tokens where `token_mask` is 0 (padding) take no part: T counts the others.
    """
    scores = router.scores(router_logits)
    # f counts the experts the router chose: from the scores plus the bias, before the normalisation (which, for
    # sigmoid scores, would move a token's scores against the bias and pick other experts).
    selected = router.select(scores.detach())
    scores = scores / scores.sum(dim=-1, keepdim=True)
    experts, top_k = router.num_experts, router.top_k
    weights = token_weights(token_mask, selected, scores.dtype)
    counts = routed_load(selected, experts, num_sequences, token_mask, scores.dtype)
    tokens = weights[:, 0].reshape(num_sequences, -1).sum(dim=1, keepdim=True).clamp(min=1)  # per slice
    fraction = counts * experts / (top_k * tokens)
    mean_scores = (scores * weights[:, :1]).reshape(num_sequences, -1, experts).sum(dim=1) / tokens
    return (fraction * mean_scores).sum(dim=-1).mean()


# Devices on which `generate()` may queue a decode step before knowing whether the previous one finished every
# sequence (each needs events: `torch.Event`).
DEFERRED_STOP_DEVICES = ("cuda", "mps")


@contextlib.contextmanager
def deferred_stop_check(enabled: bool = True):
    """Within this context transformers' `_sample` loop learns that every sequence has finished one step late, also
    on CUDA, through transformers' own `DeferredStopCheck` (which it enables only on Apple GPUs): the host no longer
    waits for the device at every token, so it prepares step n + 1 while the GPU runs step n. With the decode step in
    a CUDA graph the host's Python is about as long as the device's work, so the two overlap instead of adding up.
    When the batch ends on EOS, one more step runs and transformers drops it: the tokens are the same."""
    check = getattr(generation_utils, "DeferredStopCheck", None)
    if not enabled or check is None:  # transformers without it: its synchronous check
        yield
        return
    supported = check.__dict__["is_supported"]

    def is_supported(device, cache, cache_is_returned, is_assistant):
        if device.type not in DEFERRED_STOP_DEVICES or is_assistant:
            return False
        return cache is None or getattr(cache, "is_croppable", False) or not cache_is_returned

    check.is_supported = staticmethod(is_supported)
    try:
        yield
    finally:
        check.is_supported = supported


class MoEForCausalLM(MoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # generate(): defer the check "has every sequence finished?" by one step on CUDA (see `deferred_stop_check`)
    defer_stop_check = True
    # generate(cache_implementation="static"): keep the cache after the call and reuse it (reset) in the next call it
    # fits (same batch size, length, dtype and device), as transformers 4.x did. Its buffers keep their addresses, so
    # the CUDA graphs captured over them replay; a new cache allocated after other work (the training step between
    # two RL rollouts) lands elsewhere, and every graph is recorded again. The cache a call returns is therefore
    # overwritten by the next call; set False for a new cache per call.
    reuse_static_cache = True
    # What generate() keeps for its next call (the static caches above, MTP speculative decoding's draft cache and
    # compiled steps): rebuilt on demand, so left out of copies and pickles (`__getstate__`).
    GENERATION_STATE = ("_static_cache", "_speculative_draft_cache", "_speculative_steps")

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.model = MoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def __getstate__(self):
        """The module's state without `GENERATION_STATE`: `copy.deepcopy(model)` (TRL's create_reference_model, for
        one) would otherwise copy the kept static cache too, doubling its memory, and try to copy compiled steps."""
        state = super().__getstate__()
        for slot in self.GENERATION_STATE:
            state.pop(slot, None)
        return state

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        skip_logits: bool = False,
        mtp_items_in_batch: list | torch.Tensor | None = None,
        **kwargs,
    ) -> MoECausalLMOutputWithPast:
        r"""
        skip_logits (`bool`, *optional*, defaults to `False`):
            Compute the loss from the hidden states a chunk of tokens at a time (`kernels.linear_cross_entropy`)
            and return no logits: the [tokens, vocab] logits are never held whole. Needs `labels`. Pretraining uses
            it; a trainer that reads the logits (TRL's SFT token accuracy, GRPO's log-probabilities) cannot.
        mtp_items_in_batch (one count per MTP depth, *optional*):
            `num_items_in_batch` of each MTP depth d (the labels[:, d + 1:] that are not -100, over the whole batch:
            every micro-batch and rank). With it each depth's loss is its sum over this micro-batch divided by that
            count, so the micro-batches' MTP terms add up to the whole batch's mean exactly; without it, each
            micro-batch's mean counts by its share of the main loss's tokens (`num_items_in_batch`).
        """
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True computes the loss instead of the logits: it needs `labels`")
        output_router_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        kwargs.pop("output_attentions", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        kept = hidden_states[:, keep, :]
        logits = None if skip_logits else self.lm_head(kept)

        router_logits = outputs.router_logits
        moe_routers = [layer.mlp.gate for layer in self.model.layers if layer.is_moe]
        aux_loss = None
        token_mask = padding_mask(attention_mask, *hidden_states.shape[:2])
        if output_router_logits and router_logits:
            aux_loss = torch.stack(
                [expert_balance_loss(r, l, token_mask=token_mask) for r, l in zip(moe_routers, router_logits)]
            ).mean()

        loss = lm_loss = None
        if labels is not None:
            loss = lm_loss = self.next_token_loss(kept, logits, labels, **kwargs)
            share = batch_share(labels, kwargs.get("num_items_in_batch"))
            if aux_loss is not None and self.config.router_aux_loss_coef:
                loss = loss + self.config.router_aux_loss_coef * share * aux_loss.to(loss.device)
            if self.training and self.config.seq_aux_loss_coef and router_logits:
                batch = hidden_states.shape[0]
                seq_aux = torch.stack(
                    [expert_balance_loss(r, l, num_sequences=batch, token_mask=token_mask)
                     for r, l in zip(moe_routers, router_logits)]
                ).mean()
                loss = loss + self.config.seq_aux_loss_coef * share * seq_aux
            if self.training and self.model.mtp_layers and input_ids is not None:
                loss = loss + self.config.mtp_loss_weight * (1.0 if mtp_items_in_batch is not None else share) * (
                    self.mtp_loss(hidden_states, input_ids, labels, attention_mask, position_ids,
                                  skip_logits=skip_logits, items_per_depth=mtp_items_in_batch, **kwargs)
                )

        return MoECausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            router_logits=router_logits if output_router_logits else None,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )

    def next_token_loss(self, hidden_states, logits, labels, **kwargs):
        """transformers' causal-LM loss of the logits, or, without them (`skip_logits`), the same loss computed from
        the hidden states in chunks (from the whole logits after all where the package's kernels are absent)."""
        if logits is None and chunked_causal_lm_loss is not None:
            return chunked_causal_lm_loss(hidden_states, self.lm_head.weight, labels, **kwargs)
        if logits is None:
            logits = self.lm_head(hidden_states)
        return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

    def mtp_loss(self, hidden_states, input_ids, labels, attention_mask=None, position_ids=None, skip_logits=False,
                 items_per_depth=None, **kwargs):
        """Mean over depths of the cross-entropy of MTP depth d, whose position i predicts labels[i + d + 1]: each
        depth's sum over its counted tokens divided by `items_per_depth[d - 1]`, or by its own count here (a mean; 0
        for a depth with none). The forward's loss keywords, such as num_items_in_batch, are the main loss's."""
        losses = []
        for depth, (mtp_hidden, _) in enumerate(
            self.model.multi_token_prediction(hidden_states, input_ids, attention_mask, position_ids), start=1
        ):
            logits = None if skip_logits else self.lm_head(mtp_hidden)
            if items_per_depth is not None:
                counted = items_per_depth[depth - 1]
            else:
                counted = (labels[:, depth + 1:] != -100).sum().clamp(min=1)
            losses.append(self.next_token_loss(mtp_hidden, logits, labels[:, depth:], num_items_in_batch=counted))
        return torch.stack(losses).mean()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """transformers' cache preparation; a static cache passed in must hold the whole generation (else the decode
        step fails when it runs past the end), checked here, before anything runs or is compiled."""
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
        cache = model_kwargs.get(CACHE_FIELD)
        if isinstance(cache, MoEStaticCache):
            cache.check_length(max_cache_length, "this generate() call (prompt + max_new_tokens - 1)")

    def _prepare_static_cache(
        self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size=None, model_kwargs=None, **kwargs
    ):
        """What `generate()` uses for `cache_implementation="static"` (or "offloaded_static"): a MoEStaticCache, the
        latent cache of MLA models, the previous call's when it fits (`reuse_static_cache`). Same sizing as
        transformers (never below a previous call's length, so a compiled decode step is reused)."""
        max_cache_len = max(max_cache_len, getattr(self, "_previous_max_cache_length", -1))
        offloading = "offloaded" in cache_implementation
        self._previous_max_cache_length = max_cache_len

        def build():
            cache = MoEStaticCache(self.config, max_cache_len, offloading=offloading)
            one_device = len(set(getattr(self, "hf_device_map", {"": self.device}).values())) == 1
            if prefill_chunk_size is not None and one_device and (getattr(self, "_tp_size", None) or 1) == 1:
                cache.early_initialization(batch_size, dtype=self.dtype, device=self.device)  # a compiled prefill
            return cache

        return self.reused_static_cache("_static_cache", batch_size, max_cache_len, offloading, build)

    def reused_static_cache(self, slot: str, batch_size: int, max_cache_len: int, offloading: bool, build):
        """The static cache a previous call kept in attribute `slot`, reset, when it fits and `reuse_static_cache`
        is on; else a new one from `build()`, kept there for the next call."""
        cache = getattr(self, slot, None) if self.reuse_static_cache else None
        if cache is not None and cache.fits(batch_size, max_cache_len, offloading, self.dtype, self.device):
            cache.reset()
            return cache
        cache = build()
        setattr(self, slot, cache if self.reuse_static_cache else None)
        return cache

    def _default_compile_config(self):
        """transformers' default for generate's compiled decode step (inductor, CUDA graphs), without the CUDA graphs
        when the experts read their group sizes on the host, which a graph capture refuses: the eager loop, and
        transformers' grouped_mm in dtypes other than bf16 (under torch.compile it falls back to a per-expert loop)."""
        config = super()._default_compile_config()
        if config.mode == "reduce-overhead" and not self._experts_capturable():
            config = dataclasses.replace(config, mode="default")
        return config

    def _experts_capturable(self) -> bool:
        """Whether the routed experts run without host syncs, so a CUDA graph can capture them."""
        implementation = self.config._experts_implementation
        if implementation == "grouped_mm":
            return all(layer.mlp.experts.gate_up_proj.dtype == torch.bfloat16
                       for layer in self.model.layers if layer.is_moe)
        return implementation == "fused"

    def _sample(self, *args, **kwargs):
        """transformers' sampling / greedy loop, with its stop decision deferred by a step on CUDA when
        `defer_stop_check` is set (see `deferred_stop_check`)."""
        with deferred_stop_check(self.defer_stop_check):
            return super()._sample(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """transformers' `generate`, always in eval mode (the training flag is restored after): generated tokens are
        never counted as expert load (RL trainers such as TRL's GRPO generate with the model in training mode).
        Each submodule's own flag is restored, so submodules kept in eval mode inside a training model stay so."""
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            return super().generate(*args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also loads DeepSeek-V2/V3 checkpoints (transformers' or the original Hub layout), mapping their config."""
        from .deepseek_checkpoint import is_deepseek_checkpoint, load_deepseek_checkpoint

        if is_deepseek_checkpoint(pretrained_model_name_or_path):
            return load_deepseek_checkpoint(cls, pretrained_model_name_or_path, *args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained_deepseek(self, save_directory, **kwargs):
        """Save as a DeepSeek-V3 (sigmoid routing) or V2 (softmax) checkpoint in the original Hub layout, which
        transformers' own classes, vLLM and SGLang load."""
        from .deepseek_checkpoint import save_deepseek_checkpoint

        return save_deepseek_checkpoint(self, save_directory, **kwargs)


__all__ = ["MoEPreTrainedModel", "MoEModel", "MoEForCausalLM"]
