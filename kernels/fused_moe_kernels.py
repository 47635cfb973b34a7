"""Triton kernels of the fused MoE experts (imported lazily: only when the Triton path runs).

Layout shared by every kernel: the N = T * k (token, expert) slots are sorted by expert (stable), `perm[i]` is the
slot at sorted position i (slot = t * k + j, so its token is perm[i] // k), `inv[slot]` its sorted position, and
`offsets[e]:offsets[e + 1]` the sorted rows of expert e. The row-tiled ("M-grouped") GEMMs walk a tile list built on
the GPU (`tile_expert[i]`, `tile_row[i]`): each tile holds at most BLOCK_M rows of a single expert, so tiles never
cross an expert boundary and no activation is padded or copied; the grid is a fixed upper bound on the number of
tiles (cdiv(N, BLOCK_M) + E), the programs past the real tile count exit at once. An expert's last tile, at most half
full, runs as a tile of BLOCK_M // 2 rows (HALF_TILES: both tile heights are compiled into one kernel, a branch per
program). No host sync anywhere.

Index arithmetic that can pass 2^31 (expert * stride, row * stride) is done in int64.

WEIGHT_TMA (the row-tiled GEMMs): the expert weights, the operand that is never gathered, are read through a TMA
descriptor over the stacked weights [E, rows, cols] (block [1, ., .]) instead of pointer loads: the copy engine moves
the tiles, rows or columns past this expert's extent read 0, and the pointer arithmetic leaves the main loop.
"""

import triton
import triton.language as tl


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M consecutive row tiles share each column tile (weights stay in L2)."""
    num_pid_in_group = GROUP_M * num_n
    group_id = pid // num_pid_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_pid_in_group) % group_size
    pid_n = (pid % num_pid_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _tile_bounds(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, num_experts):
    """Row tile pid_m of the tile list: its expert (num_experts for a tile past the last one: the caller returns) and
    its sorted rows [row_start, row_end) (at most BLOCK_M of them: the caller takes the first BLOCK_M)."""
    expert = tl.load(tile_expert_ptr + pid_m)
    row_start = tl.load(tile_row_ptr + pid_m)
    # a tile past the last one reads offsets[E] = N (offsets has E + 1 entries), so its loads stay in bounds
    row_end = tl.load(offsets_ptr + tl.minimum(expert, num_experts - 1) + 1)
    return expert, row_start, row_end


@triton.jit
def _half_tile(row_start, row_end, BLOCK_M: tl.constexpr, HALF_TILES: tl.constexpr):
    """Whether this row tile runs as BLOCK_M // 2 rows: an expert's last tile, half empty or more (HALF_TILES). With
    ~256 rows an expert (V3), tiles of 128 rows compute ~25% more rows than exist; half tiles halve that."""
    if HALF_TILES:
        return row_end - row_start <= BLOCK_M // 2
    else:
        return False


@triton.jit
def _tile_rows(row_start, row_end, perm_ptr, BLOCK_M: tl.constexpr):
    """The tile's first BLOCK_M sorted rows (int64), their mask, and their slots (0 where masked)."""
    offs_m = row_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    slot = tl.load(perm_ptr + offs_m, mask=mask_m, other=0)
    return offs_m.to(tl.int64), mask_m, slot


@triton.jit
def _wrap(offs, size, EVEN: tl.constexpr):
    """Load indices of a tile that may pass `size`: the last tile wraps (in bounds; those entries are never stored).
    When it divides evenly the indices stay as they are, which keeps their contiguity visible (vector loads)."""
    if EVEN:
        return offs
    else:
        return offs % size


@triton.jit
def _weight_tile(desc, expert, k0, n0, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, B_KN: tl.constexpr):
    """[BLOCK_K, BLOCK_N] tile of expert `expert`'s B[k, n] through a TMA descriptor over the stacked weights,
    stored [E, K, N] (B_KN) or [E, N, K] (then read transposed); past the expert's K or N it reads 0."""
    if B_KN:
        return desc.load([expert, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    else:
        return tl.trans(desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K))


@triton.jit
def _row_tile_matmul(a_ptr, b_ptr, a_row_offs, offs_n_ld, K, stride_ak, stride_bk, stride_bn, b_desc, expert, n0,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     WEIGHT_TMA: tl.constexpr, B_KN: tl.constexpr, DOT_PREC: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 tile of A @ B: A's rows start at a_ptr + a_row_offs (element offsets, int64), B[k, n]
    at b_ptr + k*stride_bk + n*stride_bn (b_ptr: the expert's B), columns offs_n_ld, K reduced in BLOCK_K steps;
    with WEIGHT_TMA, B's tiles come from b_desc (expert `expert`, columns from n0) instead."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row_offs[:, None] + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n_ld[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        if WEIGHT_TMA:
            b = _weight_tile(b_desc, expert, k * BLOCK_K, n0, BLOCK_K, BLOCK_N, B_KN)
        elif EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _schedule_kernel(offsets_ptr, tile_expert_ptr, tile_row_ptr, num_experts, max_tiles,
                     BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """For each of this program's BLOCK_T tile ids, its expert and first row. Every program computes the per-expert
    tile counts and their prefix sum (E loads), so the programs need not wait on one another."""
    cum, first, start = _expert_tiles(offsets_ptr, num_experts, BLOCK_M, BLOCK_E)
    _write_tiles(tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T), cum, first, start, tile_expert_ptr, tile_row_ptr,
                 num_experts, max_tiles, BLOCK_M, BLOCK_E)


@triton.jit
def _expert_tiles(offsets_ptr, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per expert (BLOCK_E >= E lanes): the running total of its and the earlier experts' row tiles, its first tile
    id, its first sorted row."""
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < num_experts
    start = tl.load(offsets_ptr + offs_e, mask=mask_e, other=0)
    end = tl.load(offsets_ptr + offs_e + 1, mask=mask_e, other=0)
    tiles = (end - start + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, axis=0)
    return cum, cum - tiles, start


@triton.jit
def _write_tiles(t, cum, first, start, tile_expert_ptr, tile_row_ptr, num_experts, max_tiles,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Tile ids t of the tile list: their expert and first row (from `_expert_tiles`). Ids past the real count get
    expert = num_experts (the GEMM programs on them return at once)."""
    offs_e = tl.arange(0, BLOCK_E)
    expert = tl.sum((cum[None, :] <= t[:, None]).to(tl.int32), axis=1)
    expert = tl.minimum(expert, num_experts)
    onehot = offs_e[None, :] == expert[:, None]
    first_e = tl.sum(tl.where(onehot, first[None, :], 0), axis=1)
    start_e = tl.sum(tl.where(onehot, start[None, :], 0), axis=1)
    row = start_e + (t - first_e) * BLOCK_M
    mask_t = t < max_tiles
    tl.store(tile_expert_ptr + t, expert.to(tl.int32), mask=mask_t)
    tl.store(tile_row_ptr + t, row.to(tl.int32), mask=mask_t)


# Routing: a stable counting sort of the N slots by expert in three launches (count, scan, place) over blocks of
# BLOCK_N consecutive slots. Expert ids outside [0, E) sort last, as if expert E (past offsets[E]: no GEMM reads
# them), so that perm and inv stay a permutation whatever the ids.


@triton.jit
def _block_experts(index_ptr, N, num_experts, BLOCK_N: tl.constexpr):
    """This program's block of slots: their offsets within the block, their experts (int32; E for an id outside
    [0, E)) and which are slots (< N)."""
    local = tl.arange(0, BLOCK_N)
    slot = tl.program_id(0) * BLOCK_N + local
    expert = tl.load(index_ptr + slot, mask=slot < N, other=0).to(tl.int32)
    expert = tl.where((expert >= 0) & (expert < num_experts), expert, num_experts)
    return local, expert, slot < N


@triton.jit
def _route_count_kernel(index_ptr, counts_ptr, N, num_experts, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """counts[b, e]: the slots of block b routed to expert e (e = E: those with an id out of range)."""
    _, expert, is_slot = _block_experts(index_ptr, N, num_experts, BLOCK_N)
    counts = tl.histogram(expert, BLOCK_E, mask=is_slot)
    tl.store(counts_ptr + tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E), counts)


@triton.jit
def _route_scan_kernel(counts_ptr, base_ptr, offsets_ptr, num_blocks, num_experts,
                       BLOCK_E: tl.constexpr, CHUNK_B: tl.constexpr):
    """One program: offsets[e] (the sorted rows of expert e start there; e = 0..E), and base[b, e] = the sorted
    position of block b's first slot of expert e minus block b's slots of experts below e, so that the place kernel's
    slot at position p of the block sorted by expert goes to base[b, e] + p."""
    offs_e = tl.arange(0, BLOCK_E)
    total = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b0 in range(0, num_blocks, CHUNK_B):
        rows = b0 + tl.arange(0, CHUNK_B)
        total += tl.sum(tl.load(counts_ptr + rows[:, None] * BLOCK_E + offs_e[None, :],
                                mask=rows[:, None] < num_blocks, other=0), axis=0)
    start = tl.cumsum(total, axis=0) - total
    tl.store(offsets_ptr + offs_e, start, mask=offs_e <= num_experts)
    for b0 in range(0, num_blocks, CHUNK_B):
        rows = b0 + tl.arange(0, CHUNK_B)
        ptrs = rows[:, None] * BLOCK_E + offs_e[None, :]
        counts = tl.load(counts_ptr + ptrs, mask=rows[:, None] < num_blocks, other=0)
        first = start[None, :] + tl.cumsum(counts, axis=0) - counts  # + earlier blocks' slots of expert e
        below = tl.cumsum(counts, axis=1) - counts
        tl.store(base_ptr + ptrs, first - below, mask=rows[:, None] < num_blocks)
        start += tl.sum(counts, axis=0)


@triton.jit
def _route_place_kernel(index_ptr, base_ptr, perm_ptr, inv_ptr, N, num_experts,
                        offsets_ptr, tile_expert_ptr, tile_row_ptr, max_tiles,
                        BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, TILE_BLOCK_M: tl.constexpr,
                        BLOCK_T: tl.constexpr):
    """perm[dest] = slot and inv[slot] = dest for this block's slots, dest being the slot's position in the stable
    sort by expert: the block sorted by (expert, slot) in registers, then offset by base[b, expert].

    TILE_BLOCK_M > 0: the programs also write the tile list of the row-tiled GEMMs with BLOCK_M = TILE_BLOCK_M (as
    `_schedule_kernel`, from the offsets the scan wrote), BLOCK_T tile ids at a time in steps of the grid: one launch
    less before GEMM1."""
    local, expert, is_slot = _block_experts(index_ptr, N, num_experts, BLOCK_N)
    key = tl.sort(tl.where(is_slot, expert, BLOCK_E) * BLOCK_N + local)  # past N: last
    expert = key // BLOCK_N
    slot = tl.program_id(0) * BLOCK_N + key % BLOCK_N
    is_slot = expert < BLOCK_E
    dest = tl.load(base_ptr + tl.program_id(0) * BLOCK_E + expert, mask=is_slot, other=0) + local
    tl.store(perm_ptr + dest, slot, mask=is_slot)
    tl.store(inv_ptr + slot, dest, mask=is_slot)
    if TILE_BLOCK_M > 0:
        cum, first, start = _expert_tiles(offsets_ptr, num_experts, TILE_BLOCK_M, BLOCK_E)
        for t0 in range(tl.program_id(0) * BLOCK_T, max_tiles, tl.num_programs(0) * BLOCK_T):
            _write_tiles(t0 + tl.arange(0, BLOCK_T), cum, first, start, tile_expert_ptr, tile_row_ptr, num_experts,
                         max_tiles, TILE_BLOCK_M, BLOCK_E)


@triton.jit
def _gemm1_swiglu_kernel(
    x_ptr, w_ptr, w_desc, h_ptr, gu_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, perm_ptr,
    H, I, num_m_tiles, top_k, num_experts,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wk,
    stride_hm, stride_hn, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, STORE_GU: tl.constexpr, WEIGHT_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
    HALF_TILES: tl.constexpr,
):
    """h[rows, n] = silu(x[tok] @ Wg[e].T) * (x[tok] @ Wu[e].T), the token gather fused into the A loads.

    Two accumulators (gate and up columns n of the same tile), SwiGLU in the epilogue; optionally stores the
    pre-activations (gate | up) for the backward."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m_tiles, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _tile_bounds(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, num_experts)
    if expert >= num_experts:
        return
    args = (x_ptr, w_ptr, w_desc, h_ptr, gu_ptr, perm_ptr, expert, row_start, row_end, pid_n, H, I, top_k,
            stride_xt, stride_xh, stride_we, stride_wn, stride_wk, stride_hm, stride_hn, stride_gm, stride_gn)
    if _half_tile(row_start, row_end, BLOCK_M, HALF_TILES):
        _gemm1_swiglu_tile(*args, BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN_K, STORE_GU, WEIGHT_TMA, DOT_PREC)
    else:
        _gemm1_swiglu_tile(*args, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, STORE_GU, WEIGHT_TMA, DOT_PREC)


@triton.jit
def _gemm1_swiglu_tile(
    x_ptr, w_ptr, w_desc, h_ptr, gu_ptr, perm_ptr, expert, row_start, row_end, pid_n, H, I, top_k,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wk, stride_hm, stride_hn, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    STORE_GU: tl.constexpr, WEIGHT_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
):
    rows, mask_m, slot = _tile_rows(row_start, row_end, perm_ptr, BLOCK_M)
    tok = (slot // top_k).to(tl.int64)  # rows past the expert read token 0: finite, never stored
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n_ld = offs_n % I  # columns past I wrap: in bounds, never stored
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xh
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    bg_ptrs = w_base + offs_n_ld[None, :] * stride_wn + offs_k[:, None] * stride_wk
    bu_ptrs = bg_ptrs + I * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < H - k * BLOCK_K, other=0.0)
        if WEIGHT_TMA:  # W[e] is [2I, H]: gate rows n, up rows I + n (a gate tile past I reads up rows, never stored)
            bg = _weight_tile(w_desc, expert, k * BLOCK_K, pid_n * BLOCK_N, BLOCK_K, BLOCK_N, False)
            bu = _weight_tile(w_desc, expert, k * BLOCK_K, I + pid_n * BLOCK_N, BLOCK_K, BLOCK_N, False)
        elif EVEN_K:
            bg = tl.load(bg_ptrs)
            bu = tl.load(bu_ptrs)
        else:
            bg = tl.load(bg_ptrs, mask=offs_k[:, None] < H - k * BLOCK_K, other=0.0)
            bu = tl.load(bu_ptrs, mask=offs_k[:, None] < H - k * BLOCK_K, other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_xh
        bg_ptrs += BLOCK_K * stride_wk
        bu_ptrs += BLOCK_K * stride_wk
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    mask = mask_m[:, None] & (offs_n[None, :] < I)
    tl.store(h_ptr + rows[:, None] * stride_hm + offs_n[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty), mask=mask)
    if STORE_GU:
        g_ptrs = gu_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn
        tl.store(g_ptrs, acc_g.to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(g_ptrs + I * stride_gn, acc_u.to(gu_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, b_desc, c_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, perm_ptr,
    N, K, num_m_tiles, num_experts, top_k,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, WEIGHT_TMA: tl.constexpr, B_KN: tl.constexpr,
    GATHER_A: tl.constexpr, DOT_PREC: tl.constexpr, HALF_TILES: tl.constexpr,
):
    """C[rows, n] = A[rows] @ B[e] over the row tiles of each expert (A and C in sorted row order); B[e][k, n] at
    b + e*stride_be + k*stride_bk + n*stride_bn, so both a weight and its transpose are read in place.
    GATHER_A: A is per token, and row r reads A[perm[r] // top_k] (the gather fused into the A loads)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _tile_bounds(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, num_experts)
    if expert >= num_experts:
        return
    args = (a_ptr, b_ptr, b_desc, c_ptr, perm_ptr, expert, row_start, row_end, pid_n, N, K, top_k,
            stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn)
    if _half_tile(row_start, row_end, BLOCK_M, HALF_TILES):
        _grouped_gemm_tile(*args, BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, WEIGHT_TMA, B_KN, GATHER_A,
                           DOT_PREC)
    else:
        _grouped_gemm_tile(*args, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, WEIGHT_TMA, B_KN, GATHER_A, DOT_PREC)


@triton.jit
def _grouped_gemm_tile(
    a_ptr, b_ptr, b_desc, c_ptr, perm_ptr, expert, row_start, row_end, pid_n, N, K, top_k,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    WEIGHT_TMA: tl.constexpr, B_KN: tl.constexpr, GATHER_A: tl.constexpr, DOT_PREC: tl.constexpr,
):
    rows, mask_m, slot = _tile_rows(row_start, row_end, perm_ptr, BLOCK_M)
    # rows past the expert read row (or token) 0: in bounds, never stored
    if GATHER_A:
        a_rows = (slot // top_k).to(tl.int64)
    else:
        a_rows = tl.where(mask_m, rows, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _row_tile_matmul(a_ptr, b_ptr + expert.to(tl.int64) * stride_be, a_rows * stride_am,
                           _wrap(offs_n, N, EVEN_N), K, stride_ak, stride_bk, stride_bn, b_desc, expert,
                           pid_n * BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, WEIGHT_TMA, B_KN, DOT_PREC)
    mask = mask_m[:, None] & (offs_n[None, :] < N)
    tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _dgrad_h_kernel(
    dy_ptr, down_ptr, down_desc, dgu_ptr, gu_ptr, wh_ptr, topk_w_ptr, dw_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr, perm_ptr,
    I, H, num_m_tiles, top_k, num_experts,
    stride_dyt, stride_dyh, stride_de, stride_dh, stride_di, stride_dgm, stride_dgn,
    stride_gm, stride_gn, stride_hm, stride_hn, stride_dw,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, WEIGHT_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
    HALF_TILES: tl.constexpr,
):
    """Backward of GEMM2 + SwiGLU + combine weights: dA = dY[tok] @ Wd[e] ([rows, I], the gather fused into the A
    loads), and in the epilogue, per row r of the tile and its columns n:
        dw_partial[pid_n, r] = sum_n dA[r, n] h[r, n]              (routing-weight gradient, per column tile)
        dh = w[r] dA;  dgate = dh up silu'(gate);  dup = dh silu(gate)   -> dgu [N, 2I]
    with h recomputed from the saved gu = (gate | up), and w[r] h[r] written to wh_ptr (wgrad_down's B operand, so
    that GEMM needs no scaling)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m_tiles, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _tile_bounds(pid_m, tile_expert_ptr, tile_row_ptr, offsets_ptr, num_experts)
    if expert >= num_experts:
        return
    args = (dy_ptr, down_ptr, down_desc, dgu_ptr, gu_ptr, wh_ptr, topk_w_ptr, dw_ptr, perm_ptr, expert, row_start,
            row_end, pid_n, I, H, top_k, stride_dyt, stride_dyh, stride_de, stride_dh, stride_di, stride_dgm,
            stride_dgn, stride_gm, stride_gn, stride_hm, stride_hn, stride_dw)
    if _half_tile(row_start, row_end, BLOCK_M, HALF_TILES):
        _dgrad_h_tile(*args, BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, WEIGHT_TMA, DOT_PREC)
    else:
        _dgrad_h_tile(*args, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, WEIGHT_TMA, DOT_PREC)


@triton.jit
def _dgrad_h_tile(
    dy_ptr, down_ptr, down_desc, dgu_ptr, gu_ptr, wh_ptr, topk_w_ptr, dw_ptr, perm_ptr, expert, row_start, row_end,
    pid_n, I, H, top_k, stride_dyt, stride_dyh, stride_de, stride_dh, stride_di, stride_dgm, stride_dgn,
    stride_gm, stride_gn, stride_hm, stride_hn, stride_dw,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    WEIGHT_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
):
    rows, mask_m, slot = _tile_rows(row_start, row_end, perm_ptr, BLOCK_M)
    tok = (slot // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _row_tile_matmul(dy_ptr, down_ptr + expert.to(tl.int64) * stride_de, tok * stride_dyt,
                           _wrap(offs_n, I, EVEN_N), H, stride_dyh, stride_dh, stride_di, down_desc, expert,
                           pid_n * BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, WEIGHT_TMA, True, DOT_PREC)
    mask = mask_m[:, None] & (offs_n[None, :] < I)
    g_ptrs = gu_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn
    wh_ptrs = wh_ptr + rows[:, None] * stride_hm + offs_n[None, :] * stride_hn
    dgu_ptrs = dgu_ptr + rows[:, None] * stride_dgm + offs_n[None, :] * stride_dgn
    gate = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(g_ptrs + I * stride_gn, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(topk_w_ptr + slot, mask=mask_m, other=0.0).to(tl.float32)
    dw = _swiglu_backward_tile(acc, gate, up, w, wh_ptrs, dgu_ptrs, dgu_ptrs + I * stride_dgn, mask)
    tl.store(dw_ptr + pid_n * stride_dw + rows, dw, mask=mask_m)


@triton.jit
def _swiglu_kernel(gu_ptr, h_ptr, N, I, stride_gm, stride_gn, stride_hm, stride_hn,
                   BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """h = silu(gate) * up for gu = (gate | up) [N, 2I] (GEMM1's epilogue, where the library ran the GEMM)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (offs_r[:, None] < N) & (offs_n[None, :] < I)
    rows = offs_r.to(tl.int64)[:, None]
    g_ptrs = gu_ptr + rows * stride_gm + offs_n[None, :] * stride_gn
    gate = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(g_ptrs + I * stride_gn, mask=mask, other=0.0).to(tl.float32)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + rows * stride_hm + offs_n[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_tile(da, gate, up, w, wh_ptrs, dgate_ptrs, dup_ptrs, mask):
    """The SwiGLU backward of one tile (da = dL/dh unscaled, gate, up in fp32; w the rows' routing weights): dh = w da,
    dgate = dh up silu'(gate) and dup = dh silu(gate) stored; h = silu(gate) up recomputed and w h stored at
    wh_ptrs. Returns the rows' sums of da h (their routing-weight gradients)."""
    sig = tl.sigmoid(gate)
    silu = gate * sig
    h = (silu * up).to(wh_ptrs.dtype.element_ty)  # the h GEMM2 consumed, up to rounding
    tl.store(wh_ptrs, (h.to(tl.float32) * w[:, None]).to(wh_ptrs.dtype.element_ty), mask=mask)
    dw = tl.sum(da * h.to(tl.float32), axis=1)
    dh = da * w[:, None]
    tl.store(dup_ptrs, (dh * silu).to(dup_ptrs.dtype.element_ty), mask=mask)
    tl.store(dgate_ptrs, (dh * up * (sig + silu * (1.0 - sig))).to(dgate_ptrs.dtype.element_ty), mask=mask)
    return dw


@triton.jit
def _swiglu_backward_kernel(
    da_ptr, dgu_ptr, gu_ptr, wh_ptr, topk_w_ptr, perm_ptr, dw_ptr, N, I,
    stride_dam, stride_dan, stride_dgm, stride_dgn, stride_gm, stride_gn, stride_hm, stride_hn,
    BY_SLOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """`_dgrad_h_kernel`'s epilogue as a pass of its own, after a plain GEMM wrote dA = dY[tok] @ Wd[e] into da: dgu's
    gate half (each element is read before its own position is overwritten) or a tensor of its own. Per sorted row r,
    over all I columns:
    dw[r] = sum_n dA[r, n] h[r, n] (whole rows: one partial; BY_SLOT: stored at dw[perm[r]], the slot's), and dgate,
    dup from dh = w[r] dA; wh as there."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < N
    rows = offs_r.to(tl.int64)
    slot = tl.load(perm_ptr + offs_r, mask=mask_r, other=0)
    w = tl.load(topk_w_ptr + slot, mask=mask_r, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for n0 in range(0, I, BLOCK_I):
        offs_n = n0 + tl.arange(0, BLOCK_I)
        mask = mask_r[:, None] & (offs_n[None, :] < I)
        dgu_ptrs = dgu_ptr + rows[:, None] * stride_dgm + offs_n[None, :] * stride_dgn
        da_ptrs = da_ptr + rows[:, None] * stride_dam + offs_n[None, :] * stride_dan
        g_ptrs = gu_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn
        wh_ptrs = wh_ptr + rows[:, None] * stride_hm + offs_n[None, :] * stride_hn
        da = tl.load(da_ptrs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(g_ptrs + I * stride_gn, mask=mask, other=0.0).to(tl.float32)
        dw += _swiglu_backward_tile(da, gate, up, w, wh_ptrs, dgu_ptrs, dgu_ptrs + I * stride_dgn, mask)
    if BY_SLOT:
        tl.store(dw_ptr + slot, dw, mask=mask_r)
    else:
        tl.store(dw_ptr + offs_r, dw, mask=mask_r)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, b_ptr, c_ptr, c_desc, op_desc, perm_ptr, offsets_ptr,
    M, N, top_k, num_experts,
    stride_ar, stride_am, stride_br, stride_bn, stride_ce, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr, ACCUMULATE: tl.constexpr, C_TMA: tl.constexpr,
    OPERAND_TMA: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """C[e] = sum over the rows r of expert e of A[r]^T B[r] ([M, N] per expert; the reduction runs over the
    expert's sorted rows, so no tile crosses an expert and experts without tokens get zeros), or C[e] += that sum
    with ACCUMULATE (added in fp32 and rounded once).

    GATHER_A / GATHER_B: that operand's row r is the per-token row perm[r] // top_k. C_TMA: C's tile is written (and
    with ACCUMULATE read) through c_desc, a TMA descriptor over C [E, M, N] with block [1, BLOCK_M, BLOCK_N], which
    clips at each expert's M and N edges.
    OPERAND_TMA: the operand that is not gathered (exactly one is) comes through op_desc, a TMA descriptor over it
    ([rows, M] or [rows, N], block [BLOCK_K, BLOCK_M or BLOCK_N]), for each of the expert's whole K blocks; the last,
    partial block (rows past the expert belong to the next one) takes masked pointer loads.
    PERSISTENT: a 1-D grid of programs walks the (expert, M tile, N tile) tiles in steps of the grid; otherwise the
    grid is (M tiles x N tiles, experts), a tile a program."""
    tiles_mn = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        # With TMA stores, a tile's gradient drains while the program reduces its next tile (sm_90: the store's
        # wait lands before the next tile's store); a program of one tile holds its SM slot until the store lands.
        for tile in range(tl.program_id(0), tiles_mn * num_experts, tl.num_programs(0)):
            _wgrad_tile(
                tile // tiles_mn, tile % tiles_mn, a_ptr, b_ptr, c_ptr, c_desc, op_desc, perm_ptr, offsets_ptr,
                M, N, top_k, stride_ar, stride_am, stride_br, stride_bn, stride_ce, stride_cm, stride_cn,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, GATHER_A, GATHER_B, EVEN_M, EVEN_N, DOT_PREC,
                ACCUMULATE, C_TMA, OPERAND_TMA,
            )
    else:
        _wgrad_tile(
            tl.program_id(1), tl.program_id(0), a_ptr, b_ptr, c_ptr, c_desc, op_desc, perm_ptr, offsets_ptr,
            M, N, top_k, stride_ar, stride_am, stride_br, stride_bn, stride_ce, stride_cm, stride_cn,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, GATHER_A, GATHER_B, EVEN_M, EVEN_N, DOT_PREC,
            ACCUMULATE, C_TMA, OPERAND_TMA,
        )


@triton.jit
def _wgrad_step(acc, r0, slot, end, offs_k, offs_m_ld, offs_n_ld, m0, n0, a_ptr, b_ptr, op_desc, perm_ptr, top_k,
                stride_ar, stride_am, stride_br, stride_bn, BLOCK_K: tl.constexpr, GATHER_A: tl.constexpr,
                GATHER_B: tl.constexpr, DOT_PREC: tl.constexpr, WHOLE: tl.constexpr):
    """acc += A^T B over the K block at the sorted rows r0 + offs_k (`slot`: their slots); returns acc and the next
    block's slots. WHOLE: every row is the expert's, and the operand that is not gathered comes through op_desc;
    otherwise pointer loads, rows from `end` on masked to 0."""
    r = r0 + offs_k
    mask_r = r < end
    if GATHER_A:
        ra = (slot // top_k).to(tl.int64)
    else:
        ra = r.to(tl.int64)
    if GATHER_B:
        rb = (slot // top_k).to(tl.int64)
    else:
        rb = r.to(tl.int64)
    a_ptrs = a_ptr + ra[None, :] * stride_ar + offs_m_ld[:, None] * stride_am
    b_ptrs = b_ptr + rb[:, None] * stride_br + offs_n_ld[None, :] * stride_bn
    if WHOLE and not GATHER_A:
        a = tl.trans(op_desc.load([r0, m0]))
    elif WHOLE:
        a = tl.load(a_ptrs)
    else:
        a = tl.load(a_ptrs, mask=mask_r[None, :], other=0.0)
    if WHOLE and not GATHER_B:
        b = op_desc.load([r0, n0])
    elif WHOLE:
        b = tl.load(b_ptrs)
    else:
        b = tl.load(b_ptrs, mask=mask_r[:, None], other=0.0)
    if GATHER_A or GATHER_B:
        slot = tl.load(perm_ptr + r0 + BLOCK_K + offs_k, mask=r0 + BLOCK_K + offs_k < end, other=0)
    return tl.dot(a, b, acc, input_precision=DOT_PREC), slot


@triton.jit
def _wgrad_tile(
    expert, tile_mn, a_ptr, b_ptr, c_ptr, c_desc, op_desc, perm_ptr, offsets_ptr,
    M, N, top_k, stride_ar, stride_am, stride_br, stride_bn, stride_ce, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr, ACCUMULATE: tl.constexpr, C_TMA: tl.constexpr,
    OPERAND_TMA: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of C[expert] (`_grouped_wgrad_kernel`); tile_mn numbers the expert's tiles."""
    pid_m, pid_n = _swizzle(tile_mn, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m_ld = _wrap(offs_m, M, EVEN_M)
    offs_n_ld = _wrap(offs_n, N, EVEN_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The next K block's slots are loaded one iteration ahead (a loop-carried value), so no tile address depends on
    # a load of the same iteration: Triton's pipeliner divides the stages by the loads' indirection depth, and with
    # the slots loaded in-loop the tiles got 2 buffers at 3-4 stages (sm_90 compile; now one per stage)
    if GATHER_A or GATHER_B:
        slot = tl.load(perm_ptr + start + offs_k, mask=start + offs_k < end, other=0)
    else:
        slot = offs_k
    whole_end = start
    if OPERAND_TMA:  # whole K blocks: no masks, the sorted operand through TMA
        whole_end = start + (end - start) // BLOCK_K * BLOCK_K
        for r0 in range(start, whole_end, BLOCK_K):
            acc, slot = _wgrad_step(acc, r0, slot, end, offs_k, offs_m_ld, offs_n_ld, pid_m * BLOCK_M,
                                    pid_n * BLOCK_N, a_ptr, b_ptr, op_desc, perm_ptr, top_k, stride_ar, stride_am,
                                    stride_br, stride_bn, BLOCK_K, GATHER_A, GATHER_B, DOT_PREC, True)
    for r0 in range(whole_end, end, BLOCK_K):  # the rest (all of it without OPERAND_TMA): masked pointer loads
        acc, slot = _wgrad_step(acc, r0, slot, end, offs_k, offs_m_ld, offs_n_ld, pid_m * BLOCK_M, pid_n * BLOCK_N,
                                a_ptr, b_ptr, op_desc, perm_ptr, top_k, stride_ar, stride_am, stride_br, stride_bn,
                                BLOCK_K, GATHER_A, GATHER_B, DOT_PREC, False)
    if C_TMA:  # one bulk copy a tile, issued asynchronously, instead of per-thread addresses, masks and stores
        tile = [expert, pid_m * BLOCK_M, pid_n * BLOCK_N]
        if ACCUMULATE:
            acc += c_desc.load(tile).reshape(BLOCK_M, BLOCK_N).to(tl.float32)
        c_desc.store(tile, acc.to(c_ptr.dtype.element_ty).reshape(1, BLOCK_M, BLOCK_N))
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        c_ptrs = (c_ptr + expert.to(tl.int64) * stride_ce + offs_m.to(tl.int64)[:, None] * stride_cm
                  + offs_n[None, :] * stride_cn)
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    y_ptr, inv_ptr, w_ptr, out_ptr, T, H,
    stride_ym, stride_yh, stride_ot, stride_oh,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, HAS_W: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * y[inv[t * k + j]] in fp32, j in order (deterministic; no atomics). The k loop is
    unrolled (TOP_K is a constant), so all k gathered rows are in flight at once."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_h[None, :] < H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slot = offs_t.to(tl.int64) * TOP_K + j
        pos = tl.load(inv_ptr + slot, mask=mask_t, other=0).to(tl.int64)
        y = tl.load(y_ptr + pos[:, None] * stride_ym + offs_h[None, :] * stride_yh, mask=mask, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + slot, mask=mask_t, other=0.0).to(tl.float32)
            acc += y.to(tl.float32) * w[:, None]
        else:
            acc += y.to(tl.float32)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_h[None, :] * stride_oh,
             acc.to(out_ptr.dtype.element_ty), mask=mask)
