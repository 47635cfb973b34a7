"""MLA decode attention over the latent cache, in absorbed form: a split-KV (flash-decoding) Triton kernel, a PyTorch
reference with the same signature, and `mla_decode_attention`, which picks one.

With kv_b_proj = [W_uk; W_uv] per head, the key half is folded into the query and the value half into the output:

    scores[b, h, s, t] = scale * (q_latent[b, h, s] . latent[b, t] + q_rope[b, h, s] . k_rope[b, t])
    out_latent[b, h, s] = softmax_t(scores[b, h, s]) @ latent[b]          (the caller projects it through W_uv)

where q_latent = q_nope @ W_uk ([B, H, S, r]), and the cache holds one latent [T, r] and one rotary key [T, rope] per
sequence, shared by every head. The kernel reads each latent tile once for a block of heads (and all S query tokens):
heads x query tokens are the rows of one [BLOCK_H * BLOCK_S, r] x [r, BLOCK_N] product.

Which keys a query sees:
  * `cache_seqlens` [B] (default: T for all; clamped to T): keys at positions >= cache_seqlens[b] are never read (a
    preallocated static cache is only filled up to there); the kernel splits the filled part of each sequence across
    the split programs, from the device-side length (no host sync: CUDA-graph safe).
  * `key_mask`, True = may attend:
      - None or [B, T] (padding of each sequence): the S query tokens are the last S filled positions,
        cache_seqlens[b] - S + i for token i, and are causal among themselves;
      - [B, S, T] (a per-query mask, e.g. transformers' 4D mask with its head dim dropped): the mask is the whole
        rule (causality included); cache_seqlens then only bounds the keys that are read.
  A query that sees no key at all (a fully masked row) gets a zero output.
  The kernel reads only each sequence's window [first visible key, cache_seqlens) (`key_window`: left padding is
  skipped), and reads the mask itself only for sequences whose window has holes.

Stage 1 (grid: batch x head blocks x splits) runs an online softmax over its share of the keys, in fp32 with exp2,
and writes a normalized partial output and its log-sum-exp; stage 2 merges the splits (log-sum-exp weights). With one
split, stage 1 writes the output directly.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

import torch

from . import dispatch
from .dispatch import interpreting
from .launch import cdiv, launch, next_power_of_2
from .mla_decode_hopper import hopper_kernel_applies, mla_decode_hopper_split
from .offline_compile import programs_per_sm

try:  # Triton is optional: without it everything runs the PyTorch reference
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

__all__ = [
    "DecodeConfig",
    "HAS_TRITON",
    "default_config",
    "default_num_splits",
    "key_mask_from_attention_mask",
    "key_window",
    "mla_decode_attention",
    "mla_decode_reference",
    "mla_decode_triton",
    "set_split_backend",
    "split_backend",
    "tile_config",
    "use_triton",
]

SPLIT_BACKENDS = ("auto", "triton")
_split_backend = dispatch.Choice("MLA_DECODE_KERNEL", SPLIT_BACKENDS, "MLA decode split kernel")


def set_split_backend(name: str | None):
    """Which kernel runs the split (first) stage: "auto" takes the Gluon kernel for Hopper
    (`mla_decode_hopper.py`) where it applies (sm_90, bf16 / fp16, one query token, heads a multiple of 64, rank 512
    + rope 64) and the Triton kernel elsewhere; "triton" always the Triton kernel. None: follow MLA_DECODE_KERNEL."""
    _split_backend.set(name)


def split_backend() -> str:
    return _split_backend.get()


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; MLA_DECODE_REFERENCE=1 forces PyTorch."""
    return dispatch.use_triton(tensor, HAS_TRITON, "MLA_DECODE_REFERENCE")


# ------------------------------------------------------------------------------------------------ argument handling


def _as_cache(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """[B, T, d], or [B, 1, T, d] as a model's cache layer holds it."""
    if tensor.dim() == 4:
        if tensor.shape[1] != 1:
            raise ValueError(f"{name} must be [B, T, d] or [B, 1, T, d], got {tuple(tensor.shape)}")
        tensor = tensor.squeeze(1)
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be [B, T, d] or [B, 1, T, d], got {tuple(tensor.shape)}")
    return tensor


def _check(q_latent, q_rope, latent, k_rope, cache_seqlens, key_mask):
    latent, k_rope = _as_cache(latent, "latent"), _as_cache(k_rope, "k_rope")
    batch, heads, q_len, rank = q_latent.shape
    if q_rope.shape[:3] != (batch, heads, q_len):
        raise ValueError(f"q_rope {tuple(q_rope.shape)} does not match q_latent {tuple(q_latent.shape)}")
    if latent.shape[0] != batch or latent.shape[2] != rank:
        raise ValueError(f"latent {tuple(latent.shape)} does not match q_latent {tuple(q_latent.shape)}")
    if k_rope.shape != (batch, latent.shape[1], q_rope.shape[-1]):
        raise ValueError(f"k_rope {tuple(k_rope.shape)} does not match latent / q_rope")
    kv_len = latent.shape[1]
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise ValueError("key_mask must be boolean (True = may attend)")
        if key_mask.shape not in ((batch, kv_len), (batch, q_len, kv_len)):
            raise ValueError(
                f"key_mask must be [B, T] or [B, S, T] = {(batch, q_len, kv_len)}, got {tuple(key_mask.shape)}"
            )
    if cache_seqlens is not None and cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must be [B], got {tuple(cache_seqlens.shape)}")
    return latent, k_rope


def key_mask_from_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int
) -> torch.Tensor | None:
    """A transformers attention mask -> the boolean key mask of this module ([B, T] or [B, S, T], True = attend).

    4D masks [B or 1, 1, S or 1, >= T] (boolean, or additive with 0 for "attend" and a negative value, -1e4 or
    below, for "masked", as create_causal_mask builds them) keep their only head and their first T keys; 2D / 3D masks
    (padding masks: 1 or True = attend, 0 = padding, any dtype) keep their first T keys. Broadcast batch / query dims
    are expanded; any mask is made boolean.
    """
    if attention_mask is None:
        return None
    mask = attention_mask
    additive = mask.dim() == 4 and mask.is_floating_point()
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"a 4D attention mask must hold one mask for every head ([B, 1, S, T]), got "
                             f"{tuple(mask.shape)}")
        mask = mask[:, 0]
    mask = mask[..., :kv_len]
    if mask.dtype != torch.bool:
        mask = mask > -1 if additive else mask != 0
    if mask.dim() == 3:
        return mask.expand(batch, q_len, mask.shape[-1])
    return mask.expand(batch, mask.shape[-1])


def key_window(key_mask: torch.Tensor, cache_seqlens: torch.Tensor | None = None):
    """Where each sequence's visible keys lie, so that the kernel reads the mask only where it must (device-side,
    no host sync): (seqlens [B] int32, starts [B] int32, mask_needed [B] bool).

    Every key a query may see lies in [starts[b], seqlens[b]): seqlens is `cache_seqlens`, or without it 1 + the last
    key any query of the sequence may see (a preallocated static cache is read only as far as it is filled); a
    left-padded prompt starts after its padding; a sequence that sees nothing gets an empty window. `mask_needed` is
    False when every key of the window is visible, as for left padding, so the window's bounds say everything; True
    when the window has holes or its query tokens see different keys (a per-query mask [B, S, T] with S > 1).
    """
    any_query = key_mask if key_mask.dim() == 2 else key_mask.any(dim=1)
    kv_len = any_query.shape[-1]
    # In int64, the type of `kv_len`: when it is a symbolic size under torch.compile (generate's decode step after a
    # recompile), inductor's Triton reductions mixing it with int32 values fail to compile (torch 2.11: "Loop-carried
    # variable ... int32 ... int64").
    positions = torch.arange(kv_len, device=any_query.device, dtype=torch.long)
    if cache_seqlens is None:
        # 1 + the last visible key: every visible key lies below it, so `visible` is the mask itself and the three
        # reductions (last, first, count) read the mask in one pass.
        seqlens = torch.where(any_query, positions + 1, 0).amax(dim=-1)
        visible = any_query
    else:
        seqlens = cache_seqlens.to(torch.long).clamp(max=kv_len)  # never past the keys there are
        visible = any_query & (positions < seqlens[:, None])
    first = torch.where(visible, positions, kv_len).amin(dim=-1)
    starts = torch.minimum(first, seqlens)
    mask_needed = visible.sum(dim=-1) != seqlens - starts
    if key_mask.dim() == 3 and key_mask.shape[1] > 1:
        mask_needed = torch.ones_like(mask_needed)
    seqlens, starts = seqlens.to(torch.int32), starts.to(torch.int32)
    return seqlens, starts, mask_needed


# ------------------------------------------------------------------------------------------------ PyTorch reference


def mla_decode_reference(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    softmax_scale: float,
    cache_seqlens: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `mla_decode_triton`, in PyTorch: softmax in at least fp32, output in q_latent's dtype."""
    latent, k_rope = _check(q_latent, q_rope, latent, k_rope, cache_seqlens, key_mask)
    batch, heads, q_len, rank = q_latent.shape
    kv_len = latent.shape[1]
    compute = torch.promote_types(q_latent.dtype, torch.float32)
    # Heads folded into rows: one [H * S, r] x [r, T] product per sequence reads the latent once.
    scores = torch.bmm(q_latent.reshape(batch, heads * q_len, rank).to(compute), latent.to(compute).transpose(1, 2))
    scores = scores + torch.bmm(
        q_rope.reshape(batch, heads * q_len, -1).to(compute), k_rope.to(compute).transpose(1, 2)
    )
    scores = scores.view(batch, heads, q_len, kv_len) * softmax_scale

    device = q_latent.device
    seqlens = (
        torch.full((batch,), kv_len, device=device, dtype=torch.long) if cache_seqlens is None
        else cache_seqlens.to(device=device, dtype=torch.long).clamp(max=kv_len)
    )
    keys = torch.arange(kv_len, device=device)
    allowed = (keys < seqlens[:, None])[:, None, :]  # [B, 1, T]
    if key_mask is None or key_mask.dim() == 2:
        last = seqlens[:, None] - q_len + torch.arange(q_len, device=device)  # [B, S]: each query's position
        allowed = allowed & (keys <= last[..., None])
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, :]
    else:
        allowed = allowed & key_mask
    allowed = allowed[:, None]  # [B, 1, S, T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(dim=-1, keepdim=True), probs, torch.zeros((), dtype=compute, device=device))
    out = torch.bmm(probs.view(batch, heads * q_len, kv_len), latent.to(compute))
    return out.view(batch, heads, q_len, rank).to(q_latent.dtype)


# ------------------------------------------------------------------------------------------------ Triton kernels

_KERNELS: dict = {}


def _kernels():
    """The @triton.jit functions, defined on first use: Triton decides at decoration time whether a kernel runs in
    the interpreter, so TRITON_INTERPRET set after this module's import still applies (one set per mode)."""
    key = interpreting()
    if key not in _KERNELS:
        _KERNELS[key] = _define_kernels()
    return _KERNELS[key]


def _define_kernels():
    @triton.jit
    def mla_decode_split_kernel(
        QL, QR, KL, KR, MASK, SEQLENS, STARTS, MASK_NEEDED, O, LSE,
        stride_qlb, stride_qlh, stride_qls, stride_qlr,
        stride_qrb, stride_qrh, stride_qrs, stride_qrd,
        stride_klb, stride_klt, stride_klr,
        stride_krb, stride_krt, stride_krd,
        stride_mb, stride_ms, stride_mt,
        stride_ob, stride_oh, stride_os, stride_osplit, stride_or,
        stride_lb, stride_lh, stride_ls, stride_lsplit,
        H, S, R, DR, T, qk_scale,
        HAS_MASK: tl.constexpr, SEQUENCES: tl.constexpr, CAUSAL: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DIRECT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, VALUE_BLOCKS: tl.constexpr, PRECISION: tl.constexpr,
    ):
        head_blocks = tl.cdiv(H, BLOCK_H)
        pid = tl.program_id(0)
        value_block = pid % VALUE_BLOCKS  # this program's share of the output (value) columns
        b = pid // VALUE_BLOCKS // head_blocks
        head_block = pid // VALUE_BLOCKS % head_blocks
        split = tl.program_id(1)
        BLOCK_V: tl.constexpr = BLOCK_R // VALUE_BLOCKS
        # Whose mask has holes in its window (or differs between query tokens): only those sequences read it. With
        # SEQUENCES "window" / "holes", this launch takes the sequences without / with holes, another one the rest.
        needs_mask = tl.load(MASK_NEEDED + b) != 0
        if SEQUENCES == "window":
            if needs_mask:
                return
        if SEQUENCES == "holes":
            if needs_mask == 0:
                return

        # Rows: heads x query tokens (row m = head h, token i with m = h * BLOCK_S + i).
        offs_m = tl.arange(0, BLOCK_M)
        head = head_block * BLOCK_H + offs_m // BLOCK_S
        token = offs_m % BLOCK_S
        row_ok = (head < H) & (token < S)
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_DR)
        r_ok = offs_r < R
        d_ok = offs_d < DR
        offs_v = value_block * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < R

        q_lat = tl.load(
            QL + b * stride_qlb + head[:, None] * stride_qlh + token[:, None] * stride_qls
            + offs_r[None, :] * stride_qlr,
            mask=row_ok[:, None] & r_ok[None, :], other=0.0,
        )
        q_rot = tl.load(
            QR + b * stride_qrb + head[:, None] * stride_qrh + token[:, None] * stride_qrs
            + offs_d[None, :] * stride_qrd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )

        seqlen = tl.minimum(tl.load(SEQLENS + b).to(tl.int32), T)  # never past the cache (no clamp launch)
        last_key = seqlen - S + token  # each query token's own position (used when CAUSAL)
        # The keys this sequence may see lie in [first, seqlen) (a left-padded prompt starts later); this split's
        # share of them, in whole blocks; trailing splits may get nothing.
        first = tl.load(STARTS + b).to(tl.int32)
        blocks_per_split = tl.cdiv(tl.cdiv(seqlen - first, BLOCK_N), NUM_SPLITS)
        start = first + split * blocks_per_split * BLOCK_N
        end = tl.minimum(start + blocks_per_split * BLOCK_N, seqlen)

        mask_ptr = MASK + b * stride_mb
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            kl = tl.load(
                KL + b * stride_klb + offs_n[:, None] * stride_klt + offs_r[None, :] * stride_klr,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0,
            )
            kr = tl.load(
                KR + b * stride_krb + offs_n[:, None] * stride_krt + offs_d[None, :] * stride_krd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0,
            )
            qk = tl.dot(q_lat, tl.trans(kl), input_precision=PRECISION)
            qk += tl.dot(q_rot, tl.trans(kr), input_precision=PRECISION)
            allowed = row_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= last_key[:, None])
            if HAS_MASK:
                if BLOCK_S == 1:  # one query token: one mask row for every head, loaded once (fewer registers)
                    key_ok = tl.load(mask_ptr + offs_n * stride_mt, mask=n_ok, other=0)
                    allowed = allowed & (key_ok != 0)[None, :]
                else:
                    key_ok = tl.load(mask_ptr + token[:, None] * stride_ms + offs_n[None, :] * stride_mt,
                                     mask=allowed, other=0)
                    allowed = allowed & (key_ok != 0)
            qk = tl.where(allowed, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf) while a row saw nothing
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if VALUE_BLOCKS == 1:
                values = kl
            else:  # the scores need the whole latent, the output only this program's columns of it
                values = tl.load(
                    KL + b * stride_klb + offs_n[:, None] * stride_klt + offs_v[None, :] * stride_klr,
                    mask=n_ok[:, None] & v_ok[None, :], other=0.0,
                )
            acc = acc * alpha[:, None] + tl.dot(p.to(kl.dtype), values, input_precision=PRECISION)
            m_i = m_new

        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        o_ptrs = (
            O + b * stride_ob + head[:, None] * stride_oh + token[:, None] * stride_os
            + split * stride_osplit + offs_v[None, :] * stride_or
        )
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])
        if not DIRECT and value_block == 0:
            lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))  # log2 units
            lse_ptrs = LSE + b * stride_lb + head * stride_lh + token * stride_ls + split * stride_lsplit
            tl.store(lse_ptrs, lse, mask=row_ok)

    @triton.jit
    def mla_decode_merge_kernel(
        PO, LSE, O,
        stride_pb, stride_ph, stride_ps, stride_psplit, stride_pr,
        stride_lb, stride_lh, stride_ls, stride_lsplit,
        stride_ob, stride_oh, stride_os, stride_or,
        H, S, R,
        NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // (H * S)
        h = (pid // S) % H
        i = pid % S
        offs_s = tl.arange(0, BLOCK_SPLITS)
        s_ok = offs_s < NUM_SPLITS
        lse = tl.load(LSE + b * stride_lb + h * stride_lh + i * stride_ls + offs_s * stride_lsplit,
                      mask=s_ok, other=float("-inf"))
        m = tl.max(lse, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        weight = tl.exp2(lse - m_safe)  # 0 for the splits that saw no key
        total = tl.sum(weight, axis=0)
        weight = weight / tl.where(total > 0, total, 1.0)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            part = tl.load(
                PO + b * stride_pb + h * stride_ph + i * stride_ps + offs_s[:, None] * stride_psplit
                + offs_r[None, :] * stride_pr,
                mask=s_ok[:, None] & r_ok[None, :], other=0.0,
            )
            out = tl.sum(part * weight[:, None], axis=0)
            tl.store(O + b * stride_ob + h * stride_oh + i * stride_os + offs_r * stride_or,
                     out.to(O.dtype.element_ty), mask=r_ok)

    return mla_decode_split_kernel, mla_decode_merge_kernel


def _next_pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, next_power_of_2(n))


@dataclass(frozen=True)
class DecodeConfig:
    """One launch of the split kernel: rows are block_h heads x block_s query tokens; block_n keys per step; the
    output (value) columns shared among `value_blocks` programs (each computes the scores over the whole latent but
    accumulates only its columns: a smaller accumulator for many-head tiles, at the price of recomputed scores)."""

    block_h: int
    block_s: int
    block_n: int
    num_warps: int
    num_stages: int
    value_blocks: int = 1


def default_config(heads: int, q_len: int, dtype: torch.dtype, on_gpu: bool) -> DecodeConfig:
    """Tile sizes picked by measurement on an H200 (benchmarks/bench_mla_decode.py, RESULTS.md):

    * many heads (>= 64 rows of heads x tokens, the V3 shape): 64-row tiles with 64 keys, 8 warps, 2 stages; each
      latent tile is read once per 64 heads (1.08 TB/s at 128 heads vs 0.34 with 32-row tiles);
    * few heads (16: V2-Lite, the 1.26B model): up to 32 rows (all 16 heads of one token), 32 keys, 4 warps,
      3 stages (in the layer, with its key mask: 104 us at batch 32 x 8192 keys, 2.9 TB/s; 64 keys and 2 stages,
      113 us, although without a mask they lead, 2.85 vs 2.65 TB/s);
    * fp32 (tests) and the CPU interpreter: small tiles that fit shared memory / run quickly.
    """
    block_s = _next_pow2(q_len)
    if not on_gpu:
        return DecodeConfig(max(1, min(_next_pow2(heads), 16 // block_s)), block_s, 16, 1, 1)
    if dtype == torch.float32:
        return DecodeConfig(max(1, min(_next_pow2(heads), 32 // block_s)), block_s, 32, 4, 1)
    if heads * block_s >= 64:
        return DecodeConfig(max(1, 64 // block_s), block_s, 64, 8, 2)
    return DecodeConfig(max(1, min(_next_pow2(heads), 32 // block_s)), block_s, 32, 4, 3)


_TILE_OVERRIDE: DecodeConfig | None = None


@contextlib.contextmanager
def tile_config(config: DecodeConfig | None):
    """Launch every split kernel in this block with `config` instead of `default_config` (block_s still follows the
    query length): how benchmarks time a candidate tile inside a whole model step."""
    global _TILE_OVERRIDE
    previous, _TILE_OVERRIDE = _TILE_OVERRIDE, config
    try:
        yield
    finally:
        _TILE_OVERRIDE = previous


def default_num_splits(batch: int, head_blocks: int, kv_len: int, config: DecodeConfig, resident_per_sm: int,
                       device: torch.device) -> int:
    """As many split programs as fill every SM as many times as it holds programs (`resident_per_sm`, from the
    compiled kernel), in whole waves (V3 shape on an H200: 2 splits, one wave of 128 programs, 0.28 ms; 4 splits, two
    waves, 0.33 ms; V2-Lite: 8 splits, one wave of 2 programs per SM, 0.106 ms; 16, 1.5 waves, 0.158 ms), each
    split keeping >= 4 key blocks of the cache's capacity.

    It depends on shapes only (the capacity, not the filled length), so a captured CUDA graph stays valid while the
    cache fills; the kernel shares each sequence's filled keys among the splits at run time."""
    if device.type != "cuda":
        return 1 if kv_len <= 2 * config.block_n else 2
    programs = batch * head_blocks * config.value_blocks
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    by_occupancy = sms * resident_per_sm // programs  # whole waves: a partial one is a tail
    by_length = max(1, kv_len // (4 * config.block_n))
    return int(max(1, min(by_occupancy, by_length, 64)))


_RESIDENT: dict = {}  # launch signature -> programs per SM of its compiled split kernel


def mla_decode_triton(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    softmax_scale: float,
    cache_seqlens: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    num_splits: int | None = None,
    key_starts: torch.Tensor | None = None,
    mask_needed: torch.Tensor | None = None,
    block_h: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    value_blocks: int | None = None,
) -> torch.Tensor:
    """Split-KV MLA decode attention (see the module docstring).

    q_latent [B, H, S, r], q_rope [B, H, S, rope], latent [B, T, r] (or [B, 1, T, r]), k_rope [B, T, rope] (or
    [B, 1, T, rope]), cache_seqlens [B] int (default T), key_mask bool [B, T] or [B, S, T] (default all True);
    `key_starts` / `mask_needed`: as `key_window(key_mask, cache_seqlens)` returns them, computed here when not
    given.
    Returns out_latent [B, H, S, r] in q_latent's dtype; fp32 accumulation whatever the input dtype.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    latent, k_rope = _check(q_latent, q_rope, latent, k_rope, cache_seqlens, key_mask)
    split_kernel, merge_kernel = _kernels()
    batch, heads, q_len, rank = q_latent.shape
    kv_len, rope = latent.shape[1], k_rope.shape[-1]
    device = q_latent.device
    on_gpu = device.type == "cuda"

    out = torch.empty_like(q_latent)
    if q_latent.dtype != latent.dtype or q_rope.dtype != latent.dtype:  # tl.dot wants one operand dtype
        q_latent, q_rope = q_latent.to(latent.dtype), q_rope.to(latent.dtype)

    # Rows of a program: BLOCK_H heads x BLOCK_S query tokens, all reading the same latent tiles.
    config = default_config(heads, q_len, latent.dtype, on_gpu)
    if _TILE_OVERRIDE is not None:
        config = replace(_TILE_OVERRIDE, block_s=config.block_s)
    overrides = dict(block_h=block_h, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                     value_blocks=value_blocks)
    config = replace(config, **{name: value for name, value in overrides.items() if value is not None})
    config = replace(config, block_h=max(config.block_h, _next_pow2(cdiv(16, config.block_s))))  # tl.dot: >= 16 rows
    block_r = _next_pow2(rank, 16)
    block_dr = _next_pow2(rope, 16)
    if config.value_blocks < 1 or config.value_blocks & (config.value_blocks - 1) or block_r // config.value_blocks < 16:
        raise ValueError(f"value_blocks must be a power of two leaving >= 16 of the {block_r} latent columns to each "
                         f"program, got {config.value_blocks}")
    head_blocks = cdiv(heads, config.block_h)
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), kv_len, device=device, dtype=torch.int32)
    cache_seqlens = cache_seqlens.to(device=device, dtype=torch.int32)  # clamped to the cache in the kernel
    if key_mask is not None:
        mask = key_mask if key_mask.dim() == 3 else key_mask[:, None, :]
        mask_strides = (mask.stride(0), mask.stride(1) if key_mask.dim() == 3 else 0, mask.stride(2))
        if key_starts is None or mask_needed is None:
            _, key_starts, mask_needed = key_window(key_mask, cache_seqlens)
    else:
        mask, mask_strides = cache_seqlens, (0, 0, 0)  # never read
        key_starts = mask_needed = torch.zeros_like(cache_seqlens)
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"

    # Which sequences each launch takes, and whether it reads the mask. With a mask, the sequences whose visible keys
    # form a plain window (no holes: left padding) run in a launch without the mask path, which costs even when its
    # loads are predicated off (H200, in the layer: 16 heads 0.147 -> 0.138 ms, 128 heads 0.466 -> 0.425 ms), and
    # those with holes in a second launch that reads it; each program of either returns at once on the others.
    launches = [("all", False)] if key_mask is None else [("window", False), ("holes", True)]
    # The launch without the mask path goes to the Gluon kernel for Hopper where it applies: one 64-head program
    # per SM, as the Triton tile at many heads.
    # A tile given explicitly (here or through `tile_config`) is a request for the Triton kernel.
    tiles_given = _TILE_OVERRIDE is not None or any(value is not None for value in overrides.values())
    hopper = not tiles_given and split_backend() == "auto" and hopper_kernel_applies(q_latent, q_rope, latent, k_rope)
    qk_scale = softmax_scale * 1.4426950408889634  # log2(e): the kernels use exp2

    def run_split(splits: int, partial: torch.Tensor, lse: torch.Tensor, sequences: str, has_mask: bool,
                  warmup: bool = False):
        if hopper and not has_mask and not warmup:
            return mla_decode_hopper_split(q_latent, q_rope, latent, k_rope, partial, lse, cache_seqlens, key_starts,
                                           mask_needed, qk_scale, splits, skip_holes=sequences == "window")
        grid = (batch * head_blocks * config.value_blocks, splits)
        run = (functools.partial(split_kernel.warmup, grid=grid) if warmup
               else functools.partial(launch, split_kernel, grid))
        return run(
            q_latent, q_rope, latent, k_rope, mask, cache_seqlens, key_starts, mask_needed, partial, lse,
            *q_latent.stride(), *q_rope.stride(), *latent.stride(), *k_rope.stride(), *mask_strides,
            *partial.stride(), *lse.stride(),
            heads, q_len, rank, rope, kv_len, qk_scale,
            HAS_MASK=has_mask, SEQUENCES=sequences, CAUSAL=key_mask is None or key_mask.dim() == 2,
            NUM_SPLITS=splits, DIRECT=splits == 1,
            BLOCK_H=config.block_h, BLOCK_S=config.block_s, BLOCK_M=config.block_h * config.block_s,
            BLOCK_N=config.block_n, BLOCK_R=block_r, BLOCK_DR=block_dr, VALUE_BLOCKS=config.value_blocks,
            PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )

    def partials(splits: int):
        return (torch.empty((batch, heads, q_len, splits, rank), device=device, dtype=torch.float32),
                torch.empty((batch, heads, q_len, splits), device=device, dtype=torch.float32))

    if num_splits is None:
        resident = 1
        # the Gluon kernel: one program per SM; the Triton one: compile (not run) the split variant once per signature
        # to learn how many programs an SM holds
        if on_gpu and not hopper:
            signature = (device.index, config, rank, rope, latent.dtype, key_mask is None, mask_strides[1] == 0)
            if signature not in _RESIDENT:
                compiled = run_split(2, *partials(2), *launches[0], warmup=True)
                _RESIDENT[signature] = programs_per_sm(compiled, config.num_warps, device)
            resident = _RESIDENT[signature]
        num_splits = default_num_splits(batch, head_blocks, kv_len, config, resident, device)
    num_splits = max(1, int(num_splits))
    direct = num_splits == 1

    if direct:
        partial = out.unsqueeze(3)  # [B, H, S, 1, r]
        lse = torch.empty((1, 1, 1, 1), device=device, dtype=torch.float32)  # never written
    else:
        partial, lse = partials(num_splits)
    for sequences, has_mask in launches:
        run_split(num_splits, partial, lse, sequences, has_mask)
    if not direct:
        merge_block_r = block_r if on_gpu else min(block_r, 32)  # GPU: the whole row in one pass of loads
        launch(
            merge_kernel, (batch * heads * q_len,),
            partial, lse, out, *partial.stride(), *lse.stride(), *out.stride(),
            heads, q_len, rank,
            NUM_SPLITS=num_splits, BLOCK_SPLITS=_next_pow2(num_splits, 2), BLOCK_R=merge_block_r,
            num_warps=4 if on_gpu else 1,
        )
    return out


# ------------------------------------------------------------------------------------------------ dispatch


@torch.library.custom_op("modeling_moe::mla_decode", mutates_args=())
def _mla_decode_op(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    softmax_scale: float,
    cache_seqlens: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    key_starts: torch.Tensor | None,
    mask_needed: torch.Tensor | None,
    num_splits: int | None,
) -> torch.Tensor:
    """The Triton path as an opaque op: torch.compile keeps it whole (no tracing into the launcher), and a compiled
    decode step with it is captured in one CUDA graph (mode="reduce-overhead", as generate() compiles static caches)."""
    return mla_decode_triton(q_latent, q_rope, latent, k_rope, softmax_scale, cache_seqlens, key_mask, num_splits,
                             key_starts, mask_needed)


@_mla_decode_op.register_fake
def _(q_latent, q_rope, latent, k_rope, softmax_scale, cache_seqlens, key_mask, key_starts, mask_needed, num_splits):
    return torch.empty_like(q_latent)


def mla_decode_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    softmax_scale: float,
    attention_mask: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """out_latent [B, H, S, r] = attention over the latent cache in absorbed form: the Triton kernel on CUDA (or
    under TRITON_INTERPRET=1), the PyTorch reference elsewhere.

    `attention_mask` is a transformers mask (4D [B, 1, S, >= T], boolean or additive, as the model's attention
    layers receive it), or a boolean key mask [B, T] / [B, S, T]. Without `cache_seqlens`, the keys read stop after
    the last one the mask lets any query see (all T without a mask): a preallocated static cache is read only as far
    as it is filled, with no host sync. Keys before the first visible one (left padding) are not read either.
    """
    kv_len = _as_cache(latent, "latent").shape[1]
    key_mask = key_mask_from_attention_mask(attention_mask, q_latent.shape[0], q_latent.shape[2], kv_len)
    key_starts = mask_needed = None
    if key_mask is not None:
        # Here, outside the opaque op, so that a compiled step fuses these reductions with the mask's conversion
        # instead of launching small kernels of their own inside the op.
        cache_seqlens, key_starts, mask_needed = key_window(key_mask, cache_seqlens)
    if use_triton(q_latent):
        return _mla_decode_op(q_latent, q_rope, latent, k_rope, softmax_scale, cache_seqlens, key_mask, key_starts,
                              mask_needed, num_splits)
    return mla_decode_reference(q_latent, q_rope, latent, k_rope, softmax_scale, cache_seqlens, key_mask)
