"""The MLA decode split kernel for Hopper (sm_90) in Gluon, Triton's lower-level dialect: FlashMLA's division of a
64-head block's work between two warpgroups with their own roles (warp specialization).

One program: one sequence, 64 heads, one split of its keys, one query token, kv_lora_rank 512 + rope 64 (every
DeepSeek-V2/V3 shape). Three partitions:
  * a loader warp streams each 32-key block of the latent and rotary keys, as nine 32x64 tiles, into a four-stage
    ring through TMA;
  * two consumer warpgroups take the key blocks in turns. The owner of block i computes its scores over all 576
    columns (Q @ K^T), updates the online softmax, and publishes P, the rescale factor and the running max and sum
    in its own shared-memory buffers for the other;
  * each consumer accumulates its half of the 512 output (value) columns over every block: the owner with P in
    registers, the other with P from shared memory.
The softmax of block i needs block i - 1's running max, so the softmaxes form a chain through both warpgroups; the
MMAs are kept off it. A consumer issues its block i's scores before it waits for block i - 1, and block i - 1's
value MMAs run during block i's softmax. (Triton 3.6's own compiler, with 8 warps on a 64-head tile, splits every
score tile and the softmax statistics between the warpgroups instead: shared memory and CTA barriers at every key
block, no overlap; KERNEL_NOTES.md, "MLA decode".)

It writes what the Triton split kernel writes (normalized partial outputs and base-2 log-sum-exps per split), so
`mla_decode.py`'s merge follows unchanged; `mla_decode_triton` picks it (`hopper_kernel_applies`) for the launch of
the sequences without holes in their key window. Gluon has no CPU interpreter: the CPU tests compile it for sm_90
(registers, spills, shared memory), the GPU tests compare it with the float64 reference.
"""

from __future__ import annotations

import torch

from .dispatch import is_sm90
from .launch import launch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # TMA's global -> shared copy: `async_load` in triton >= 3.7, `async_copy_global_to_shared` before (3.6: the H200
    # image); the old name raises in 3.9
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAS_GLUON = True
except Exception:  # pragma: no cover - older Triton, or none
    HAS_GLUON = False

__all__ = ["HAS_GLUON", "hopper_kernel_applies", "mla_decode_hopper_split"]

RANK, ROPE = 512, 64  # latent and rotary columns: every DeepSeek-V2/V3 shape
HEADS = 64  # heads per program: the rows of one warpgroup MMA
COLUMNS = 64  # columns per shared-memory tile: one 128-byte swizzle row of bf16
CHUNKS = (RANK + ROPE) // COLUMNS  # tiles of one key block: 8 latent + 1 rotary
KEYS, STAGES = 32, 4  # keys per block and blocks in flight: Q (72 KiB) + 4 x 36 KiB + 2 P (8 KiB) of 227 KiB
MAX_REGISTERS = 168  # x 384 threads = the register file, which the partitions share:
CONSUMER_REGISTERS = 232  # each consumer warpgroup's (the loader warp gets 24)


def hopper_kernel_applies(q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                          k_rope: torch.Tensor) -> bool:
    """Whether the Gluon kernel takes these tensors (after `mla_decode._check`): bf16 / fp16 on an sm_90 GPU, one
    query token, heads a multiple of 64, rank 512 + rope 64, caches contiguous (TMA reads them as [B * T, cols])."""
    if not HAS_GLUON or not q_latent.is_cuda:
        return False
    batch, heads, q_len, rank = q_latent.shape
    return (is_sm90(q_latent.device)
            and latent.dtype in (torch.bfloat16, torch.float16) and q_latent.dtype == q_rope.dtype == latent.dtype
            and k_rope.dtype == latent.dtype and q_len == 1 and heads % HEADS == 0
            and rank == RANK and k_rope.shape[-1] == ROPE
            and latent.is_contiguous() and k_rope.is_contiguous())


if HAS_GLUON:
    # the module's numbers as the kernels' compile-time constants
    _RANK, _HEADS, _COLUMNS, _CHUNKS, _KEYS, _STAGES, _CONSUMER_REGISTERS = (
        gl.constexpr(v) for v in (RANK, HEADS, COLUMNS, CHUNKS, KEYS, STAGES, CONSUMER_REGISTERS))

    @gluon.jit
    def _key_range(SEQLENS, STARTS, MASK_NEEDED, T, b, split, SKIP_HOLES: gl.constexpr, NUM_SPLITS: gl.constexpr):
        """This split's keys [start, end) of sequence b in whole key blocks (shared as the Triton split kernel shares
        them), their block count, and whether this launch writes the sequence at all (not when its window has
        holes: another launch reads its mask)."""
        seqlen = gl.minimum(gl.load(SEQLENS + b).to(gl.int32), T)
        first = gl.load(STARTS + b).to(gl.int32)
        blocks_per_split = gl.cdiv(gl.cdiv(seqlen - first, _KEYS), NUM_SPLITS)
        start = first + split * blocks_per_split * _KEYS
        end = gl.minimum(start + blocks_per_split * _KEYS, seqlen)
        n_blocks = gl.cdiv(gl.maximum(end - start, 0), _KEYS)
        mine = True
        if SKIP_HOLES:
            mine = gl.load(MASK_NEEDED + b) == 0
            n_blocks = gl.where(mine, n_blocks, 0)
        return start, end, n_blocks, mine

    @gluon.jit
    def _load_keys(args, SKIP_HOLES: gl.constexpr, NUM_SPLITS: gl.constexpr, DIRECT: gl.constexpr):
        """The loader warp: each key block's nine tiles into the ring, once both consumers have freed the slot."""
        (latent_desc, rope_desc, q_smem, k_smem, p_smem, stats, k_ready, k_empty, published,
         SEQLENS, STARTS, MASK_NEEDED, O, LSE, H, T, qk_scale,
         stride_ob, stride_oh, stride_osplit, stride_or, stride_lb, stride_lh, stride_lsplit) = args
        b = gl.program_id(0) // (H // _HEADS)
        start, end, n_blocks, mine = _key_range(SEQLENS, STARTS, MASK_NEEDED, T, b, gl.program_id(1), SKIP_HOLES,
                                                NUM_SPLITS)
        for i in range(n_blocks):
            slot = i % _STAGES
            mbarrier.wait(k_empty.index(slot), ((i // _STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1 at once
            ready = k_ready.index(slot)
            mbarrier.expect(ready, _CHUNKS * _KEYS * _COLUMNS * latent_desc.dtype.primitive_bitwidth // 8)
            row = b * T + start + i * _KEYS
            for c in gl.static_range(_CHUNKS - 1):
                _tma_load(latent_desc, [row, c * _COLUMNS], ready, k_smem.index(slot * _CHUNKS + c))
            _tma_load(rope_desc, [row, 0], ready, k_smem.index(slot * _CHUNKS + _CHUNKS - 1))

    @gluon.jit
    def _issue_scores(q_smem, k_smem, k_ready, i, s_layout: gl.constexpr):
        """S = Q @ K_i^T over the 576 columns, issued (not waited for) once block i is in shared memory."""
        slot = i % _STAGES
        mbarrier.wait(k_ready.index(slot), (i // _STAGES) & 1)
        s = warpgroup_mma_init(gl.zeros([_HEADS, _KEYS], gl.float32, layout=s_layout))
        for c in gl.static_range(_CHUNKS):
            s = warpgroup_mma(q_smem.index(c), k_smem.index(slot * _CHUNKS + c).permute((1, 0)), s, use_acc=c > 0,
                              is_async=True)
        return s

    @gluon.jit
    def _softmax(s, i, start, end, qk_scale, m_i, l_i, rows: gl.constexpr, dtype: gl.constexpr):
        """The online-softmax update of block i's scores: P (in the cache's dtype), the factor that rescales what came
        before, and the new running max and sum."""
        s_layout: gl.constexpr = s.type.layout
        keys = start + i * _KEYS + gl.arange(0, _KEYS, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((keys < end)[None, :], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.convert_layout(gl.max(s, axis=1), rows))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf) while a row saw nothing
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - gl.convert_layout(m_safe, gl.SliceLayout(1, s_layout))[:, None]).to(dtype)
        l_new = l_i * alpha + gl.convert_layout(gl.sum(p.to(gl.float32), axis=1), rows)
        return p, alpha, m_new, l_new

    @gluon.jit
    def _issue_values(p, k_smem, i, V0: gl.constexpr, o0, o1, o2, o3, alpha):
        """O[:, this warpgroup's 256 columns] = O * alpha + P @ V_i over four 64-column tiles, issued."""
        first = i % _STAGES * _CHUNKS + V0
        o0 = warpgroup_mma(p, k_smem.index(first), o0 * alpha[:, None], is_async=True)
        o1 = warpgroup_mma(p, k_smem.index(first + 1), o1 * alpha[:, None], is_async=True)
        o2 = warpgroup_mma(p, k_smem.index(first + 2), o2 * alpha[:, None], is_async=True)
        o3 = warpgroup_mma(p, k_smem.index(first + 3), o3 * alpha[:, None], is_async=True)
        return o0, o1, o2, o3

    @gluon.jit
    def _publish(my_p, stats, W: gl.constexpr, p, alpha, m_i, l_i, published):
        """P and the statistics of this warpgroup's block into its buffers, then the other warpgroup told."""
        my_p.store(p)
        stats.index(3 * W).store(alpha)
        stats.index(3 * W + 1).store(m_i)
        stats.index(3 * W + 2).store(l_i)
        fence_async_shared()  # P is read by the other's MMAs (the async proxy)
        mbarrier.arrive(published.index(1 - W), count=1)

    @gluon.jit
    def _read_published(stats, published, W: gl.constexpr, i, rows: gl.constexpr):
        """The other warpgroup's block i, once it is published: its rescale factor, running max and sum."""
        mbarrier.wait(published.index(W), (i // 2) & 1)
        theirs: gl.constexpr = 3 * (1 - W)
        return stats.index(theirs).load(rows), stats.index(theirs + 1).load(rows), stats.index(theirs + 2).load(rows)

    @gluon.jit
    def _accumulate_values(p, k_smem, k_empty, i, V0: gl.constexpr, o0, o1, o2, o3, alpha):
        """`_issue_values`, waited for; then this warpgroup is done with key block i."""
        o0, o1, o2, o3 = _issue_values(p, k_smem, i, V0, o0, o1, o2, o3, alpha)
        o0, o1, o2, o3 = warpgroup_mma_wait(num_outstanding=0, deps=(o0, o1, o2, o3))
        mbarrier.arrive(k_empty.index(i % _STAGES), count=1)
        return o0, o1, o2, o3

    @gluon.jit
    def _consume(args, W: gl.constexpr, SKIP_HOLES: gl.constexpr, NUM_SPLITS: gl.constexpr, DIRECT: gl.constexpr):
        """Consumer warpgroup W (0 or 1): the scores and softmax of the key blocks i with i % 2 == W, published for
        the other, and output columns [256 W, 256 W + 256) over every block. Each step takes the other's block
        i - 1 and this warpgroup's block i: block i's scores are issued first, so they run while this warpgroup
        waits for block i - 1's P (and its value MMAs run under block i's softmax)."""
        (latent_desc, rope_desc, q_smem, k_smem, p_smem, stats, k_ready, k_empty, published,
         SEQLENS, STARTS, MASK_NEEDED, O, LSE, H, T, qk_scale,
         stride_ob, stride_oh, stride_osplit, stride_or, stride_lb, stride_lh, stride_lsplit) = args
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, _KEYS, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, _COLUMNS, 16])
        rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        V0: gl.constexpr = W * (_RANK // 2 // _COLUMNS)  # this warpgroup's first value tile
        head_blocks = H // _HEADS
        b = gl.program_id(0) // head_blocks
        head_block = gl.program_id(0) % head_blocks
        split = gl.program_id(1)
        start, end, n_blocks, mine = _key_range(SEQLENS, STARTS, MASK_NEEDED, T, b, split, SKIP_HOLES, NUM_SPLITS)
        # P and the statistics of a block live in its owner's buffers: rewritten only after the other has said
        # (by publishing its next block) that it is done with them
        my_p, their_p = p_smem.index(W), p_smem.index(1 - W)

        m_i = gl.full([_HEADS], float("-inf"), gl.float32, layout=rows)
        l_i = gl.zeros([_HEADS], gl.float32, layout=rows)
        o0 = gl.zeros([_HEADS, _COLUMNS], gl.float32, layout=o_layout)
        o1 = gl.zeros([_HEADS, _COLUMNS], gl.float32, layout=o_layout)
        o2 = gl.zeros([_HEADS, _COLUMNS], gl.float32, layout=o_layout)
        o3 = gl.zeros([_HEADS, _COLUMNS], gl.float32, layout=o_layout)
        if W == 0:  # block 0 has no predecessor
            if n_blocks > 0:
                s = warpgroup_mma_wait(num_outstanding=0, deps=(_issue_scores(q_smem, k_smem, k_ready, 0, s_layout), ))
                p, alpha, m_i, l_i = _softmax(s, 0, start, end, qk_scale, m_i, l_i, rows, k_smem.dtype)
                _publish(my_p, stats, W, p, alpha, m_i, l_i, published)
                o0, o1, o2, o3 = _accumulate_values(gl.convert_layout(p, p_layout), k_smem, k_empty, 0, V0,
                                                    o0, o1, o2, o3, alpha)
        for i in range(2 - W, n_blocks, 2):  # this warpgroup's blocks after its first step
            s = _issue_scores(q_smem, k_smem, k_ready, i, s_layout)
            # the other's block i - 1: its statistics, and this warpgroup's value columns of it
            alpha, m_i, l_i = _read_published(stats, published, W, i - 1, rows)
            o0, o1, o2, o3 = _issue_values(their_p, k_smem, i - 1, V0, o0, o1, o2, o3, alpha)
            s = warpgroup_mma_wait(num_outstanding=4, deps=(s, ))  # the scores; the value MMAs run on
            p, alpha, m_i, l_i = _softmax(s, i, start, end, qk_scale, m_i, l_i, rows, k_smem.dtype)
            o0, o1, o2, o3 = warpgroup_mma_wait(num_outstanding=0, deps=(o0, o1, o2, o3))
            mbarrier.arrive(k_empty.index((i - 1) % _STAGES), count=1)
            _publish(my_p, stats, W, p, alpha, m_i, l_i, published)  # also: done with their P
            o0, o1, o2, o3 = _accumulate_values(gl.convert_layout(p, p_layout), k_smem, k_empty, i, V0,
                                                o0, o1, o2, o3, alpha)
        if n_blocks > 0:
            if (n_blocks - 1) % 2 != W:  # the last block is the other's
                alpha, m_i, l_i = _read_published(stats, published, W, n_blocks - 1, rows)
                o0, o1, o2, o3 = _accumulate_values(their_p, k_smem, k_empty, n_blocks - 1, V0, o0, o1, o2, o3, alpha)

        seen = l_i > 0
        inv = 1.0 / gl.where(seen, l_i, 1.0)
        heads = head_block * _HEADS + gl.arange(0, _HEADS, layout=rows)
        columns = gl.arange(0, _COLUMNS, layout=gl.SliceLayout(0, o_layout))
        write = (heads < H)[:, None] & mine
        out = O + b * stride_ob + heads[:, None] * stride_oh + split * stride_osplit + columns[None, :] * stride_or
        out_dtype: gl.constexpr = O.dtype.element_ty
        gl.store(out + (V0 + 0) * _COLUMNS * stride_or, (o0 * inv[:, None]).to(out_dtype), mask=write)
        gl.store(out + (V0 + 1) * _COLUMNS * stride_or, (o1 * inv[:, None]).to(out_dtype), mask=write)
        gl.store(out + (V0 + 2) * _COLUMNS * stride_or, (o2 * inv[:, None]).to(out_dtype), mask=write)
        gl.store(out + (V0 + 3) * _COLUMNS * stride_or, (o3 * inv[:, None]).to(out_dtype), mask=write)
        if W == 0 and not DIRECT:
            lse = gl.where(seen, m_i + gl.log2(gl.where(seen, l_i, 1.0)), float("-inf"))  # log2 units
            gl.store(LSE + b * stride_lb + heads * stride_lh + split * stride_lsplit, lse, mask=(heads < H) & mine)

    @gluon.jit
    def _consume_first(args, SKIP_HOLES: gl.constexpr, NUM_SPLITS: gl.constexpr, DIRECT: gl.constexpr):
        _consume(args, 0, SKIP_HOLES, NUM_SPLITS, DIRECT)

    @gluon.jit
    def _consume_second(args, SKIP_HOLES: gl.constexpr, NUM_SPLITS: gl.constexpr, DIRECT: gl.constexpr):
        _consume(args, 1, SKIP_HOLES, NUM_SPLITS, DIRECT)

    @gluon.jit
    def _mla_decode_hopper_kernel(
        latent_desc, rope_desc, QL, QR, SEQLENS, STARTS, MASK_NEEDED, O, LSE,
        stride_qlb, stride_qlh, stride_qlr, stride_qrb, stride_qrh, stride_qrd,
        stride_ob, stride_oh, stride_osplit, stride_or, stride_lb, stride_lh, stride_lsplit,
        H, T, qk_scale,
        SKIP_HOLES: gl.constexpr, NUM_SPLITS: gl.constexpr, DIRECT: gl.constexpr,
    ):
        dtype: gl.constexpr = latent_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [_CHUNKS, _HEADS, _COLUMNS],
                                           gl.NVMMASharedLayout.get_default_for([_HEADS, _COLUMNS], dtype))
        k_smem = gl.allocate_shared_memory(dtype, [_STAGES * _CHUNKS, _KEYS, _COLUMNS], latent_desc.layout)
        p_smem = gl.allocate_shared_memory(dtype, [2, _HEADS, _KEYS],
                                           gl.NVMMASharedLayout.get_default_for([_HEADS, _KEYS], dtype))
        # per consumer: the rescale factor, running max and sum of its last published block (8 rows: a power of 2)
        stats = gl.allocate_shared_memory(gl.float32, [8, _HEADS],
                                          gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
        k_ready = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        published = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(_STAGES):
            mbarrier.init(k_ready.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=2)  # both consumers read every block
        for w in gl.static_range(2):
            mbarrier.init(published.index(w), count=1)

        # The query block (64 heads x 576 columns) into shared memory once, by the default partition's warps.
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        head_blocks = H // _HEADS
        b = gl.program_id(0) // head_blocks
        heads = gl.program_id(0) % head_blocks * _HEADS + gl.arange(0, _HEADS, layout=gl.SliceLayout(1, q_layout))
        columns = gl.arange(0, _COLUMNS, layout=gl.SliceLayout(0, q_layout))
        q_rows = QL + b * stride_qlb + heads[:, None] * stride_qlh
        for c in gl.static_range(_CHUNKS - 1):
            q_smem.index(c).store(gl.load(q_rows + (c * _COLUMNS + columns)[None, :] * stride_qlr))
        q_smem.index(_CHUNKS - 1).store(
            gl.load(QR + b * stride_qrb + heads[:, None] * stride_qrh + columns[None, :] * stride_qrd))
        fence_async_shared()

        args = (latent_desc, rope_desc, q_smem, k_smem, p_smem, stats, k_ready, k_empty, published,
                SEQLENS, STARTS, MASK_NEEDED, O, LSE, H, T, qk_scale,
                stride_ob, stride_oh, stride_osplit, stride_or, stride_lb, stride_lh, stride_lsplit)
        gl.warp_specialize([
            (_consume_first, (args, SKIP_HOLES, NUM_SPLITS, DIRECT)),
            (_consume_second, (args, SKIP_HOLES, NUM_SPLITS, DIRECT)),
            (_load_keys, (args, SKIP_HOLES, NUM_SPLITS, DIRECT)),
        ], [4, 1], [_CONSUMER_REGISTERS, 24])


def mla_decode_hopper_split(q_latent, q_rope, latent, k_rope, partial, lse, cache_seqlens, key_starts, mask_needed,
                            qk_scale: float, num_splits: int, skip_holes: bool):
    """One launch of the Gluon split kernel, with the Triton split kernel's arguments (see `mla_decode_triton`):
    `partial` [B, H, 1, splits, 512] (the output itself, unsqueezed, when splits == 1), `lse` [B, H, 1, splits],
    `qk_scale` = softmax scale x log2(e). `skip_holes`: leave the sequences with `mask_needed` to another launch."""
    batch, heads, _, rank = q_latent.shape
    kv_len = latent.shape[-2]
    layout = gl.NVMMASharedLayout.get_default_for([KEYS, COLUMNS], _GL_DTYPES[latent.dtype])
    latent_desc = TensorDescriptor.from_tensor(latent.view(batch * kv_len, rank), [KEYS, COLUMNS], layout)
    rope_desc = TensorDescriptor.from_tensor(k_rope.view(batch * kv_len, ROPE), [KEYS, COLUMNS], layout)
    launch(
        _mla_decode_hopper_kernel, (batch * (heads // HEADS), num_splits),
        latent_desc, rope_desc, q_latent, q_rope, cache_seqlens, key_starts, mask_needed, partial, lse,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(3),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(3),
        partial.stride(0), partial.stride(1), partial.stride(3), partial.stride(4),
        lse.stride(0), lse.stride(1), lse.stride(3),
        heads, kv_len, qk_scale,
        SKIP_HOLES=skip_holes, NUM_SPLITS=num_splits, DIRECT=num_splits == 1,
        num_warps=4, maxnreg=MAX_REGISTERS,
    )


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16} if HAS_GLUON else {}
