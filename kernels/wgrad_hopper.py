"""The fused experts' weight gradients on Hopper (sm_90), in Gluon, fresh or added into `.grad`:

    dW[e] (+)= A[rows of e]^T @ B[rows of e]     (A [R, M], B [R, N] in expert-sorted row order; dW [E, M, N])

a persistent, warp-specialized grouped GEMM in CUTLASS's ping-pong arrangement. A loader warp streams [64 rows, 128]
tiles of A and B through TMA into a four-stage ring, tile after tile of the program's share of the (expert, M tile,
N tile) list; two consumer warpgroups take alternate output tiles. While one runs its MMAs, the other runs its
epilogue, stored through TMA; when adding into `.grad`, the old gradient tile, fetched through TMA when its tile
started, is added first. Adding moves the gradient twice (V3's expert gradients: 22.5 GB in bf16), which here hides
under the MMAs, where the library path (a fresh product, then an add) pays it in a pass of its own.

Rows of the next expert in an expert's last 64-row step are zeroed in B's tile before its MMA. Experts without rows
add nothing (a fresh gradient gets zeros). Gluon has no CPU interpreter: the CPU tests compile it for sm_90; the GPU
tests compare it with a float64 reference.
"""

from __future__ import annotations

import functools

import torch

from .dispatch import cuda_properties, is_sm90
from .launch import cdiv, launch
from .mla_decode_hopper import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .mla_decode_hopper import _tma_load

    # TMA's shared -> global copy: `async_store` in triton >= 3.7, `async_copy_shared_to_global` before
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

__all__ = ["hopper_wgrad_applies", "wgrad_hopper"]

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64  # an output tile; rows a step
STAGES = 4  # A and B tiles in flight: 4 x 32 KiB, beside two 32 KiB gradient tiles
MAX_REGISTERS = 168  # x 384 threads = the register file, which the partitions share:
CONSUMER_REGISTERS = 232  # each consumer warpgroup's (the loader warp gets 24)


def hopper_wgrad_applies(a_sorted: torch.Tensor, b_sorted: torch.Tensor, into: torch.Tensor | None = None) -> bool:
    """Whether `wgrad_hopper` takes these: bf16 on an sm_90 GPU, contiguous, M (a's columns) a multiple of 128 (an
    output tile never straddles two experts' gradients), N (b's) a multiple of 8 (TMA's 16-byte strides); `into`,
    where given, the [E, M, N] gradient to add into."""
    if not HAS_GLUON or not a_sorted.is_cuda or a_sorted.dim() != 2 or b_sorted.dim() != 2:
        return False
    m, n = a_sorted.shape[1], b_sorted.shape[1]
    if into is not None and not (into.dtype == a_sorted.dtype and into.dim() == 3 and into.shape[1:] == (m, n)
                                 and into.is_contiguous()):
        return False
    return (is_sm90(a_sorted.device)
            and a_sorted.dtype == b_sorted.dtype == torch.bfloat16 and m % BLOCK_M == 0 and n % 8 == 0
            and a_sorted.is_contiguous() and b_sorted.is_contiguous())


if HAS_GLUON:
    _BM, _BN, _CONSUMER_REGISTERS = (gl.constexpr(v) for v in (BLOCK_M, BLOCK_N, CONSUMER_REGISTERS))

    @gluon.jit
    def _tile(OFFSETS, t, tiles_n, tiles_mn):
        """Output tile t of the list: its expert, M and N tile, and the expert's rows [r0, r1)."""
        e = t // tiles_mn
        m_tile = t % tiles_mn // tiles_n
        n_tile = t % tiles_n
        return e, m_tile, n_tile, gl.load(OFFSETS + e), gl.load(OFFSETS + e + 1)

    @gluon.jit
    def _load_operands(args):
        """The loader warp: each output tile's row steps of A and B into the ring, in tile order."""
        (a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, ready, empty, c_ready, turn, OFFSETS, M, num_tiles, tiles_n,
         tiles_mn, _) = args
        STAGES: gl.constexpr = a_smem.shape[0]
        BK: gl.constexpr = a_smem.shape[1]
        step = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            e, m_tile, n_tile, r0, r1 = _tile(OFFSETS, t, tiles_n, tiles_mn)
            for row in range(r0, r1, BK):
                slot = step % STAGES
                mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
                bar = ready.index(slot)
                mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                _tma_load(a_desc, [row, m_tile * _BM], bar, a_smem.index(slot))
                _tma_load(b_desc, [row, n_tile * _BN], bar, b_smem.index(slot))
                step += 1

    @gluon.jit
    def _zero_rows_from(tile, valid):
        """Rows >= `valid` of a [BLOCK_K, 128] operand tile in shared memory set to zero (the next expert's rows)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        rows = gl.arange(0, tile.shape[0], layout=gl.SliceLayout(1, layout))
        values = tile.load(layout)
        tile.store(gl.where((rows < valid)[:, None], values, gl.zeros_like(values)))
        fence_async_shared()  # read next by the MMA (the async proxy)

    @gluon.jit
    def _reduce_tiles(args, W: gl.constexpr):
        """Consumer warpgroup W (0 or 1): every other one of the program's tiles that it writes, each reduced over its
        expert's rows and stored (ACCUMULATE: added into the gradient there). The other warpgroup's tiles only
        advance the ring's count. A fresh gradient's tiles of experts without rows are written too, as zeros.

        The two MMA loops take turns (`turn`), as CUTLASS's ping-pong does: a consumer starts its tile's steps only
        once the other has taken all of the steps before them. Without it, a consumer whose tile starts a ring's
        length or more ahead would wait on a stage's barrier one phase early, whose parity reads as completed."""
        (a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, ready, empty, c_ready, turn, OFFSETS, M, num_tiles, tiles_n,
         tiles_mn, ACCUMULATE) = args
        STAGES: gl.constexpr = a_smem.shape[0]
        BK: gl.constexpr = a_smem.shape[1]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                              instr_shape=[16, _BN, 16])
        my_c, my_c_ready = c_smem.index(W), c_ready.index(W)
        step = 0
        j = 0  # tiles written so far
        c_phase = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            e, m_tile, n_tile, r0, r1 = _tile(OFFSETS, t, tiles_n, tiles_mn)
            steps = gl.cdiv(r1 - r0, BK)
            written = (steps > 0) | (not ACCUMULATE)
            if (j % 2 == W) & written:
                c_row = e * M + m_tile * _BM
                tma.store_wait(0)  # this warpgroup's previous tile has left my_c
                if ACCUMULATE:
                    mbarrier.expect(my_c_ready, c_desc.block_type.nbytes)
                    _tma_load(c_desc, [c_row, n_tile * _BN], my_c_ready, my_c)  # the old gradient, under the MMAs
                mbarrier.wait(turn.index(W), ((j // 2) & 1) ^ (1 - W))  # consumer 0's first turn: a fresh barrier
                acc = gl.zeros([_BM, _BN], gl.float32, layout=acc_layout)
                for k in range(steps):
                    slot = (step + k) % STAGES
                    mbarrier.wait(ready.index(slot), ((step + k) // STAGES) & 1)
                    valid = r1 - r0 - k * BK
                    if valid < BK:
                        _zero_rows_from(b_smem.index(slot), valid)
                    acc = warpgroup_mma(a_smem.index(slot).permute((1, 0)), b_smem.index(slot), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # the previous step's MMA is done
                    if k > 0:
                        mbarrier.arrive(empty.index((step + k - 1) % STAGES), count=1)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                if steps > 0:
                    mbarrier.arrive(empty.index((step + steps - 1) % STAGES), count=1)
                mbarrier.arrive(turn.index(1 - W), count=1)
                if ACCUMULATE:
                    mbarrier.wait(my_c_ready, c_phase)
                    c_phase ^= 1
                    acc += my_c.load(acc_layout).to(gl.float32)
                my_c.store(acc.to(my_c.dtype))
                fence_async_shared()  # read next by the TMA store (the async proxy)
                _tma_store(c_desc, [c_row, n_tile * _BN], my_c)
            step += steps
            j += written.to(gl.int32)
        tma.store_wait(0)

    @gluon.jit
    def _reduce_first(args):
        _reduce_tiles(args, 0)

    @gluon.jit
    def _reduce_second(args):
        _reduce_tiles(args, 1)

    @gluon.jit
    def _wgrad_kernel(a_desc, b_desc, c_desc, OFFSETS, M, num_tiles, tiles_n, tiles_mn, ACCUMULATE: gl.constexpr,
                      BK: gl.constexpr, STAGES: gl.constexpr):
        dtype: gl.constexpr = a_desc.dtype
        a_smem = gl.allocate_shared_memory(dtype, [STAGES, BK, _BM], a_desc.layout)
        b_smem = gl.allocate_shared_memory(dtype, [STAGES, BK, _BN], b_desc.layout)
        c_smem = gl.allocate_shared_memory(dtype, [2, _BM, _BN], c_desc.layout)  # one per consumer
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        c_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # whose MMA loop is next
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)  # one consumer reads each step
        for w in gl.static_range(2):
            mbarrier.init(c_ready.index(w), count=1)
            mbarrier.init(turn.index(w), count=1)
        args = (a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, ready, empty, c_ready, turn, OFFSETS, M, num_tiles,
                tiles_n, tiles_mn, ACCUMULATE)
        gl.warp_specialize([
            (_reduce_first, (args, )),
            (_reduce_second, (args, )),
            (_load_operands, (args, )),
        ], [4, 1], [_CONSUMER_REGISTERS, 24])


@functools.cache
def _shared_layout(block: tuple):
    """The bf16 tiles' shared-memory layout (built once: a layout takes longer to build than a launch)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.bfloat16)


def wgrad_hopper(a_sorted: torch.Tensor, b_sorted: torch.Tensor, offsets: torch.Tensor,
                 into: torch.Tensor | None = None, programs: int | None = None) -> torch.Tensor:
    """dW[e] = a_sorted[offsets[e]:offsets[e + 1]]^T @ b_sorted[offsets[e]:offsets[e + 1]], [E, M, N], as a new
    tensor, or added into `into` in place; returns the gradient written (see the module docstring;
    `hopper_wgrad_applies` says where). `programs`: the persistent grid (default: one an SM)."""
    experts, m, n = offsets.numel() - 1, a_sorted.shape[1], b_sorted.shape[1]
    if a_sorted.shape[0] == 0:  # no rows: nothing to add, or zeros (TMA takes no empty tensor)
        return into if into is not None else a_sorted.new_zeros(experts, m, n)
    grad = into if into is not None else a_sorted.new_empty(experts, m, n)

    def descriptor(tensor, block):
        return TensorDescriptor.from_tensor(tensor, block, _shared_layout(tuple(block)))

    tiles_n = cdiv(n, BLOCK_N)
    tiles_mn = (m // BLOCK_M) * tiles_n
    num_tiles = experts * tiles_mn
    if programs is None:
        programs = cuda_properties(grad.device).multi_processor_count
    if num_tiles:
        launch(
            _wgrad_kernel, (min(num_tiles, programs),),
            descriptor(a_sorted, [BLOCK_K, BLOCK_M]), descriptor(b_sorted, [BLOCK_K, BLOCK_N]),
            descriptor(grad.view(experts * m, n), [BLOCK_M, BLOCK_N]), offsets, m, num_tiles, tiles_n, tiles_mn,
            ACCUMULATE=into is not None, BK=BLOCK_K, STAGES=STAGES, num_warps=4, maxnreg=MAX_REGISTERS,
        )
    return grad
