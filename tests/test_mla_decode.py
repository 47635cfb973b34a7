"""MLA decode attention over the latent cache (kernels/mla_decode.py) against a float64 reference written from the math.

Without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set per test by a fixture; the
kernels are defined at their first launch, so the setting applies) in fp32 at tiny shapes; the interpreter's bf16
`tl.dot` is unreliable, so bf16 is checked on a GPU only (`gpu` marker).
"""

import math

import pytest
import torch

from modeling_moe.kernels.mla_decode import (
    key_mask_from_attention_mask,
    key_window,
    mla_decode_attention,
    mla_decode_reference,
    mla_decode_triton,
)
from modeling_moe.modeling_moe import CACHE_FIELD

from .helpers import load_benchmark_script, seeded_model, small_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def math_reference(q_latent, q_rope, latent, k_rope, scale, cache_seqlens=None, key_mask=None):
    """Per (sequence, query token) loop in float64: the keys it may see, a softmax over them, the latent average."""
    q_latent, q_rope, latent, k_rope = (t.double().cpu() for t in (q_latent, q_rope, latent, k_rope))
    batch, heads, q_len, rank = q_latent.shape
    kv_len = latent.shape[1]
    out = torch.zeros(batch, heads, q_len, rank, dtype=torch.float64)
    for b in range(batch):
        filled = kv_len if cache_seqlens is None else int(cache_seqlens[b])
        for i in range(q_len):
            if key_mask is not None and key_mask.dim() == 3:
                keys = [j for j in range(filled) if key_mask[b, i, j]]
            else:
                own_position = filled - q_len + i
                keys = [j for j in range(filled) if j <= own_position and (key_mask is None or key_mask[b, j])]
            if not keys:
                continue  # a query that sees nothing: zeros
            scores = (q_latent[b, :, i] @ latent[b, keys].T + q_rope[b, :, i] @ k_rope[b, keys].T) * scale
            out[b, :, i] = scores.softmax(dim=-1) @ latent[b, keys]
    return out


def random_inputs(batch, heads, q_len, rank, rope, kv_len, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, q_len, rank), (batch, heads, q_len, rope), (batch, kv_len, rank), (batch, kv_len, rope)]
    return [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for shape in shapes]


def left_padding_mask(batch, kv_len, pads):
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    for b, pad in enumerate(pads):
        mask[b, :pad] = False
    return mask


# ---------------------------------------------------------------------------------------------- PyTorch reference


@pytest.mark.parametrize("q_len", [1, 2])
def test_reference_matches_the_math(q_len):
    q_latent, q_rope, latent, k_rope = random_inputs(3, 4, q_len, 32, 8, 40, dtype=torch.float64)
    seqlens = torch.tensor([40, 17, 5])
    per_query = torch.rand(3, q_len, 40, generator=torch.Generator().manual_seed(1)) > 0.3
    for cache_seqlens, key_mask in [
        (None, None),
        (seqlens, None),
        (seqlens, left_padding_mask(3, 40, [0, 9, 2])),
        (seqlens, per_query),
        (None, per_query),
    ]:
        expected = math_reference(q_latent, q_rope, latent, k_rope, 0.3, cache_seqlens, key_mask)
        got = mla_decode_reference(q_latent, q_rope, latent, k_rope, 0.3, cache_seqlens, key_mask)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_fully_masked_queries_give_zeros_not_nan():
    q_latent, q_rope, latent, k_rope = random_inputs(2, 2, 1, 16, 8, 12, dtype=torch.float64)
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1] = False
    out = mla_decode_reference(q_latent, q_rope, latent, k_rope, 0.5, key_mask=key_mask)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    torch.testing.assert_close(out, math_reference(q_latent, q_rope, latent, k_rope, 0.5, key_mask=key_mask))


def test_transformers_masks_become_key_masks():
    allowed = torch.rand(2, 1, 3, 10) > 0.4  # [B, 1, S, T + extra]
    additive = [torch.zeros(2, 1, 3, 10).masked_fill(~allowed, value) for value in
                (torch.finfo(torch.float32).min, float("-inf"), -1e9, -1e4)]
    for mask in (allowed, allowed.long(), *additive):
        key_mask = key_mask_from_attention_mask(mask, batch=2, q_len=3, kv_len=8)
        assert key_mask.dtype == torch.bool and key_mask.tolist() == allowed[:, 0, :, :8].tolist()
    padding = allowed[:, 0, 0]  # 2D padding masks: 1 = attend in any dtype
    for mask in (padding, padding.long(), padding.float()):
        assert key_mask_from_attention_mask(mask, batch=2, q_len=3, kv_len=10).tolist() == padding.tolist()
    broadcast = key_mask_from_attention_mask(allowed[:1, :, -1:], batch=2, q_len=3, kv_len=10)
    assert broadcast.shape == (2, 3, 10) and broadcast[1, 2].tolist() == allowed[0, 0, -1].tolist()
    assert key_mask_from_attention_mask(allowed[:, 0, 0], batch=2, q_len=3, kv_len=10).shape == (2, 10)


def test_key_window_bounds_the_visible_keys_and_flags_holes():
    """Left padding is a window (the mask need not be read); a hole, a per-query mask of several tokens, or visible
    keys past the filled length make the kernel read the mask; a sequence that sees nothing gets an empty window."""
    mask = left_padding_mask(5, 10, [3, 0, 0, 10, 2])
    mask[1, 4] = False  # a hole
    mask[2, 7:] = False  # visible keys stop before the filled length
    seqlens = torch.tensor([10, 10, 10, 10, 6], dtype=torch.int32)
    ends, starts, needed = key_window(mask, seqlens)
    assert ends.tolist() == seqlens.tolist() and starts.tolist() == [3, 0, 0, 10, 2]
    assert needed.tolist() == [False, True, True, False, False]
    for b in range(5):  # the window holds every visible key
        visible = mask[b, : seqlens[b]].nonzero().flatten().tolist()
        assert all(starts[b] <= j < seqlens[b] for j in visible)

    ends, starts, needed = key_window(mask)  # without lengths: each window ends after its last visible key
    assert ends.tolist() == [10, 10, 7, 0, 10] and starts.tolist() == [3, 0, 0, 0, 2]
    assert needed.tolist() == [False, True, False, False, False]

    per_query = mask[:, None, :].expand(5, 2, 10)
    assert key_window(per_query, seqlens)[2].all()  # several query tokens: the mask is the whole rule
    one_token = key_window(mask[:, None, :], seqlens)  # one token: as a [B, T] mask
    assert [t.tolist() for t in one_token] == [t.tolist() for t in key_window(mask, seqlens)]


# ---------------------------------------------------------------------------------------------- Triton kernel


@pytest.mark.parametrize("q_len", [1, 2])
@pytest.mark.parametrize("masking", ["ragged", "left_padding", "holes", "per_query"])
def test_triton_matches_float64_reference(triton_device, q_len, masking):
    """Ragged filled lengths (one sequence shorter than a split), left padding (a window: the mask is not read),
    holes in some sequences of a left-padded batch (the mask is read for those only), and per-query masks, with 2
    and 3 splits (the log-sum-exp merge) and 1 (the direct write)."""
    batch, kv_len = 3, 40
    q_latent, q_rope, latent, k_rope = random_inputs(batch, 4, q_len, 32, 8, kv_len, device=triton_device)
    seqlens = torch.tensor([40, 23, 6], dtype=torch.int32)
    key_mask = None
    if masking == "left_padding":
        key_mask = left_padding_mask(batch, kv_len, [21, 3, 4])  # sequence 0: its first split sees only padding
    elif masking == "holes":
        key_mask = left_padding_mask(batch, kv_len, [5, 3, 0])
        key_mask[0, 9:14] = False  # holes in sequences 0 and 2; sequence 1 is a plain window
        key_mask[2, 2] = False
    elif masking == "per_query":
        key_mask = torch.rand(batch, q_len, kv_len, generator=torch.Generator().manual_seed(2)) > 0.4
        key_mask[2, 0] = False  # a query that sees nothing at all
    scale = 1 / math.sqrt(40)
    expected = math_reference(q_latent, q_rope, latent, k_rope, scale, seqlens, key_mask)
    on = dict(device=triton_device)
    for num_splits in (1, 2, 3):
        got = mla_decode_triton(
            q_latent, q_rope, latent, k_rope, scale,
            cache_seqlens=seqlens.to(**on), key_mask=None if key_mask is None else key_mask.to(**on),
            num_splits=num_splits,
        )
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-5, msg=f"{num_splits} splits")


def test_triton_many_head_tiles_split_sequences_by_their_masks(triton_device):
    """64-row tiles (as the other tests with few-head ones): the sequences whose mask is a plain window (left padding)
    and those with holes go to two launches, each skipping the other's sequences."""
    batch, heads, kv_len = 4, 64, 40
    q_latent, q_rope, latent, k_rope = random_inputs(batch, heads, 1, 16, 8, kv_len, device=triton_device)
    key_mask = left_padding_mask(batch, kv_len, [0, 7, 3, 40])  # the last sequence sees nothing
    key_mask[2, 20:26] = False  # a hole: only sequence 2 reads the mask
    seqlens = torch.tensor([40, 33, 40, 40], dtype=torch.int32)
    expected = math_reference(q_latent, q_rope, latent, k_rope, 0.3, seqlens, key_mask)
    for num_splits in (1, 2):
        got = mla_decode_triton(q_latent, q_rope, latent, k_rope, 0.3, cache_seqlens=seqlens.to(triton_device),
                                key_mask=key_mask.to(triton_device), num_splits=num_splits, block_h=64, block_n=16,
                                num_warps=1 if triton_device == "cpu" else 8, num_stages=1)
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-5, msg=f"{num_splits} splits")


def test_filled_lengths_beyond_the_cache_are_clamped(triton_device):
    """cache_seqlens larger than the cache reads the whole cache, never past it (kernel and reference alike)."""
    q_latent, q_rope, latent, k_rope = random_inputs(2, 4, 1, 16, 8, 12, device=triton_device)
    on = dict(device=triton_device, dtype=torch.int32)
    expected = math_reference(q_latent, q_rope, latent[:, :6], k_rope[:, :6], 0.3)
    window = (latent[:, :6], k_rope[:, :6])  # a view of the first 6 keys of a larger buffer
    for decode in (mla_decode_triton, mla_decode_reference):
        got = decode(q_latent, q_rope, *window, 0.3, cache_seqlens=torch.tensor([9, 6], **on), num_splits=2) \
            if decode is mla_decode_triton else decode(q_latent, q_rope, *window, 0.3, torch.tensor([9, 6], **on))
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-5)


def test_triton_heads_beyond_one_block_and_odd_sizes(triton_device):
    """More heads than a program's block (20 heads: 2 blocks of 16, the second one partly empty), a rank and a
    rotary size that are not powers of two, query and cache dtypes that differ."""
    q_latent, q_rope, latent, k_rope = random_inputs(2, 20, 1, 24, 6, 19, device=triton_device)
    q_latent, q_rope = q_latent.double(), q_rope.double()
    seqlens = torch.tensor([19, 11], dtype=torch.int32, device=triton_device)
    got = mla_decode_triton(q_latent, q_rope, latent, k_rope, 0.2, cache_seqlens=seqlens, num_splits=2, block_h=16)
    assert got.dtype == torch.float64
    expected = math_reference(q_latent, q_rope, latent, k_rope, 0.2, seqlens.cpu())
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value_blocks", [2, 4])
def test_triton_value_columns_split_across_programs(triton_device, value_blocks):
    """The output (value) columns shared among programs: each computes the scores over the whole latent and
    accumulates its columns; a rank that is not a power of two leaves the last block partly empty; left padding,
    several key splits (only one program per split writes the log-sum-exp) and the direct write."""
    batch, kv_len = 2, 37
    q_latent, q_rope, latent, k_rope = random_inputs(batch, 4, 1, 48, 8, kv_len, device=triton_device, seed=3)
    seqlens = torch.tensor([37, 20], dtype=torch.int32)
    key_mask = left_padding_mask(batch, kv_len, [5, 2])
    expected = math_reference(q_latent, q_rope, latent, k_rope, 0.25, seqlens, key_mask)
    for num_splits in (1, 3):
        got = mla_decode_triton(q_latent, q_rope, latent, k_rope, 0.25, cache_seqlens=seqlens.to(triton_device),
                                key_mask=key_mask.to(triton_device), num_splits=num_splits,
                                value_blocks=value_blocks)
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-5, msg=f"{num_splits} splits")
    with pytest.raises(ValueError, match="value_blocks"):
        mla_decode_triton(q_latent, q_rope, latent, k_rope, 0.25, value_blocks=3)


@pytest.mark.parametrize("heads, q_len", [(128, 1), (16, 2), (16, 1)])
def test_triton_gpu_default_tile_configs(triton_device, heads, q_len):
    """The tile configs the launcher picks for bf16 on a GPU (64-row tiles for many heads, 16-32 rows otherwise),
    forced here so that the interpreter also runs them: ragged lengths, keys split across programs."""
    from modeling_moe.kernels.mla_decode import default_config

    config = default_config(heads, q_len, torch.bfloat16, on_gpu=True)
    q_latent, q_rope, latent, k_rope = random_inputs(2, heads, q_len, 16, 8, 150, device=triton_device)
    seqlens = torch.tensor([150, 37], dtype=torch.int32, device=triton_device)
    got = mla_decode_triton(q_latent, q_rope, latent, k_rope, 0.3, cache_seqlens=seqlens, num_splits=2,
                            block_h=config.block_h, block_n=config.block_n, num_warps=config.num_warps,
                            num_stages=config.num_stages)
    expected = math_reference(q_latent, q_rope, latent, k_rope, 0.3, seqlens.cpu())
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-5)


def test_wrapper_compiles_without_graph_breaks(triton_device):
    """mla_decode_attention under torch.compile(fullgraph=True): the mask handling traces, the kernel is one opaque
    op (what a compiled, CUDA-graphed decode step needs). A 4D boolean mask over a partly filled static buffer."""
    q_latent, q_rope, latent, k_rope = random_inputs(2, 4, 1, 16, 8, 24, device=triton_device)
    filled = torch.tensor([13, 20])
    seen = (torch.arange(24) < filled[:, None]) & (torch.arange(24) >= torch.tensor([[4], [0]]))  # left padding
    mask = seen[:, None, None, :].to(triton_device)
    compiled = torch.compile(mla_decode_attention, backend="eager", fullgraph=True)
    got = compiled(q_latent, q_rope, latent[:, None], k_rope[:, None], 0.25, mask, num_splits=2)
    expected = math_reference(q_latent, q_rope, latent, k_rope, 0.25, filled, seen)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- in the model


def recorded_decode_step(model, q_len, attn_implementation):
    """Prefill a left-padded batch into a static cache, then run one q_len-token step; returns each MLA layer's
    absorbed-attention inputs with the output of the model's own PyTorch code."""
    from modeling_moe.cache_moe import MoEStaticCache

    model.set_attn_implementation(attn_implementation)
    ids = torch.randint(3, 97, (2, 7 + q_len), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 7 + q_len, dtype=torch.long)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = MoEStaticCache(model.config, max_cache_len=16)
    calls = []
    attention_class = type(model.model.layers[0].self_attn)
    absorbed = attention_class.absorbed_attention

    def recording(self, *args):
        out = absorbed(self, *args)
        calls.append((self, args[:5], out))  # q_nope, q_rope, latent, k_rope, attention_mask
        return out

    with torch.no_grad():
        model(ids[:, :7], attention_mask=mask[:, :7], position_ids=positions[:, :7], **{CACHE_FIELD: cache})
        attention_class.absorbed_attention = recording
        try:
            model(ids[:, 7:], attention_mask=mask, position_ids=positions[:, 7:], **{CACHE_FIELD: cache})
        finally:
            attention_class.absorbed_attention = absorbed
    assert len(calls) == model.config.num_hidden_layers
    return calls


def through_mla_decode(attention, q_nope, q_rope, latent, k_rope, attention_mask, decode=mla_decode_attention):
    """The model's absorbed attention with its core replaced by `decode`: the CUDA branch of absorbed_attention."""
    w_kv = attention.kv_b_proj.weight.view(attention.num_heads, -1, attention.kv_lora_rank)
    w_uk, w_uv = w_kv.split([attention.qk_nope_head_dim, attention.v_head_dim], dim=1)
    q_latent = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)
    out_latent = decode(q_latent, q_rope, latent, k_rope, attention.scaling, attention_mask)
    return torch.einsum("bhsr,hvr->bshv", out_latent, w_uv)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("q_len", [1, 2])
def test_model_masks_through_mla_decode_match_the_absorbed_path(triton_device, monkeypatch, attn_implementation, q_len):
    """The masks the layers get with a static cache (whole buffer, left padding; boolean for sdpa, additive for
    eager) drive mla_decode_attention (the PyTorch reference, then the Triton kernel) to the model's own result."""
    if triton_device == "cuda":
        pytest.skip("covered on the GPU by test_gpu_generate_with_the_kernel_matches_pytorch")
    model = seeded_model(small_config(), dtype=torch.float32)
    calls = recorded_decode_step(model, q_len, attn_implementation)
    monkeypatch.setenv("MLA_DECODE_REFERENCE", "1")
    for attention, args, expected in calls:
        mask = args[-1]
        assert mask is not None and mask.shape[-1] == 16  # the whole static buffer
        torch.testing.assert_close(through_mla_decode(attention, *args), expected, rtol=1e-5, atol=1e-6)
    monkeypatch.delenv("MLA_DECODE_REFERENCE")
    attention, args, expected = calls[0]
    triton_decode = lambda *a: mla_decode_attention(*a, num_splits=2)  # noqa: E731
    torch.testing.assert_close(through_mla_decode(attention, *args, decode=triton_decode), expected,
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("q_len", [1, 2])
def test_gpu_bf16_at_deepseek_sizes(heads, q_len):
    """r=512, rope=64, bf16 in / fp32 accumulation, ragged lengths with left padding, against float64."""
    batch, kv_len = 4, 2048
    q_latent, q_rope, latent, k_rope = random_inputs(batch, heads, q_len, 512, 64, kv_len, torch.bfloat16, "cuda")
    q_latent, q_rope = q_latent / 8, q_rope / 8  # scores of a realistic spread
    seqlens = torch.tensor([2048, 1500, 777, 64], dtype=torch.int32, device="cuda")
    key_mask = left_padding_mask(batch, kv_len, [0, 300, 5, 10]).cuda()
    scale = 1 / math.sqrt(192)
    got = mla_decode_triton(q_latent, q_rope, latent, k_rope, scale, cache_seqlens=seqlens, key_mask=key_mask)
    expected = mla_decode_reference(
        *(t.double() for t in (q_latent, q_rope, latent, k_rope)), scale, seqlens, key_mask
    )
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)
    # With the mask 4D as the model gets it: the filled length comes from the mask.
    mask4d = key_mask[:, None, None, :].expand(batch, 1, q_len, kv_len).clone()
    mask4d &= torch.arange(kv_len, device="cuda") < seqlens[:, None, None, None]
    own_position = seqlens[:, None] - q_len + torch.arange(q_len, device="cuda")  # [B, S]
    causal = torch.arange(kv_len, device="cuda") <= own_position[..., None]
    mask4d &= causal[:, None]
    got = mla_decode_attention(q_latent, q_rope, latent, k_rope, scale, attention_mask=mask4d)
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_generate_with_the_kernel_matches_pytorch(monkeypatch):
    """Greedy generate (static and dynamic caches, left padding): the kernel route gives the PyTorch route's tokens."""
    import modeling_moe.modeling_moe as modeling

    model = seeded_model(small_config(), dtype=torch.float32).cuda()
    prompts = [[5, 17, 33, 8, 61, 12], [44, 9, 70]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, disable_compile=True)
    with_kernel = {impl: model.generate(ids, cache_implementation=impl, **kwargs) for impl in (None, "static")}
    monkeypatch.setattr(modeling, "mla_decode_attention", None)
    for impl, tokens in with_kernel.items():
        assert model.generate(ids, cache_implementation=impl, **kwargs).tolist() == tokens.tolist()


def test_split_count_fills_whole_waves_of_resident_programs(monkeypatch):
    """The split count from the compiled kernel's occupancy (an H200's SM: 2048 threads, 64K registers, 228 KiB of
    shared memory, 132 SMs), with the resources Triton reported for two tiles (bench_mla_decode.py)."""
    from types import SimpleNamespace

    from modeling_moe.kernels.mla_decode import DecodeConfig, default_num_splits
    from modeling_moe.kernels.offline_compile import programs_per_sm

    h200 = SimpleNamespace(max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536,
                           shared_memory_per_multiprocessor=228 * 1024, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h200)
    gpu = torch.device("cuda", 0)

    def compiled(regs, shared_kib):
        return SimpleNamespace(run=None, n_regs=regs, metadata=SimpleNamespace(shared=shared_kib * 1024))

    few_heads = DecodeConfig(block_h=16, block_s=1, block_n=64, num_warps=4, num_stages=2)
    many_heads = DecodeConfig(block_h=64, block_s=1, block_n=64, num_warps=8, num_stages=2)
    assert programs_per_sm(compiled(183, 92), 4, gpu) == 2  # shared memory: 2 x 93 KiB of 228
    assert programs_per_sm(compiled(254, 216), 8, gpu) == 1  # registers and shared memory: one program
    assert programs_per_sm(compiled(64, 8), 4, gpu) == 8  # registers: 64 x 128 threads = 8K of 64K
    assert programs_per_sm(compiled(32, 4), 4, gpu) == 16  # threads: 16 x 128 = 2048
    # batch 32 x 8192 keys: V2-Lite (one head block) fills 132 x 2 slots with 8 splits (256 programs, no tail)
    assert default_num_splits(32, 1, 8192, few_heads, 2, gpu) == 8
    assert default_num_splits(32, 2, 8192, many_heads, 1, gpu) == 2  # V3: two head blocks, 128 programs
    assert default_num_splits(1, 1, 8192, few_heads, 2, gpu) == 32  # capped by length: >= 4 blocks of keys each
    assert default_num_splits(256, 2, 8192, many_heads, 1, gpu) == 1  # more programs than slots: no split


def test_decode_tiles_compile_for_hopper_without_a_gpu(monkeypatch):
    """benchmarks/kernel_resources.py's MLA path: the split kernel as mla_decode_triton launches it with the model's
    key mask, compiled for sm_90 on any machine; its resources fit an SM and the default 128-head tile holds one
    program per SM, as the H200 reported (session 6)."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    resources = load_benchmark_script("kernel_resources")
    compiled = resources.compile_mla_split_kernel(128, block_h=64, block_n=64, num_warps=8, num_stages=2)
    usage = resources.resource_usage(compiled)
    assert usage.shared_bytes == 216 * 1024 and 0 < usage.registers <= 255
    assert usage.programs_per_sm(8) == 1


def test_tile_config_overrides_the_default_tile(triton_device, monkeypatch):
    """`tile_config` (how benchmarks time a candidate tile inside a model step) reaches the launch, and the result
    still matches the math."""
    from modeling_moe.kernels import mla_decode

    split_kernel, merge_kernel = mla_decode._kernels()
    launched = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((kwargs["BLOCK_H"], kwargs["BLOCK_N"]))
                return split_kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(mla_decode, "_kernels", lambda: (Spy(), merge_kernel))
    q_latent, q_rope, latent, k_rope = random_inputs(2, 4, 1, 16, 8, 24, device=triton_device)
    tile = mla_decode.DecodeConfig(block_h=16, block_s=1, block_n=16, num_warps=1 if triton_device == "cpu" else 4,
                                   num_stages=1)
    with mla_decode.tile_config(tile):
        got = mla_decode_triton(q_latent, q_rope, latent, k_rope, 0.25, num_splits=2)
    assert launched == [(16, 16)] and mla_decode._TILE_OVERRIDE is None
    expected = math_reference(q_latent, q_rope, latent, k_rope, 0.25)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- Gluon split kernel for Hopper


@pytest.mark.parametrize("splits, skip_holes", [(2, True), (1, False)], ids=["split-window", "direct-all"])
def test_hopper_kernel_compiles_for_sm90_without_a_gpu(monkeypatch, splits, skip_holes):
    """The Gluon kernel has no interpreter: on the CPU it is compiled for sm_90 (Triton's bundled ptxas) as
    `mla_decode_triton` launches it (benchmarks/kernel_resources.py's MLA part), and must fit one program per SM: Q,
    four stages of keys and P in the 227 KiB an sm_90 block may use, and its three partitions' register budgets in
    the register file, without spills."""
    from modeling_moe.kernels import mla_decode_hopper

    if not mla_decode_hopper.HAS_GLUON:
        pytest.skip("this triton has no Gluon")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    resources = load_benchmark_script("kernel_resources")
    usage = resources.resource_usage(resources.compile_mla_hopper_kernel(128, splits, skip_holes))
    assert 224 * 1024 <= usage.shared_bytes <= 227 * 1024  # 72 KiB of Q, 4 x 36 KiB of keys, 2 x 4 KiB of P, stats
    assert usage.spill_bytes == 0
    assert usage.registers == mla_decode_hopper.MAX_REGISTERS
    assert usage.programs_per_sm(resources.HOPPER_WARPS) == 1


def test_hopper_kernel_only_where_it_applies():
    """CPU tensors, fp32, several query tokens or a rank other than 512 never reach the Gluon kernel."""
    from modeling_moe.kernels.mla_decode_hopper import hopper_kernel_applies

    q_latent, q_rope, latent, k_rope = random_inputs(2, 64, 1, 512, 64, 128, torch.bfloat16)
    assert not hopper_kernel_applies(q_latent, q_rope, latent, k_rope)  # not on a GPU
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        cuda = [t.cuda() for t in (q_latent, q_rope, latent, k_rope)]
        assert hopper_kernel_applies(*cuda)
        assert not hopper_kernel_applies(*(t.float() for t in cuda))
        assert not hopper_kernel_applies(cuda[0][:, :48], cuda[1][:, :48], *cuda[2:])  # heads not a multiple of 64
        two_tokens = [t.expand(-1, -1, 2, -1) for t in cuda[:2]]
        assert not hopper_kernel_applies(*two_tokens, *cuda[2:])


@pytest.mark.gpu
@pytest.mark.parametrize("heads, splits, masking, dtype, strided_query", [
    (128, None, "left-padding", torch.bfloat16, False), (128, 1, "left-padding", torch.bfloat16, True),
    (64, 3, "holes", torch.bfloat16, False), (256, None, "none", torch.bfloat16, False),
    (128, 2, "left-padding", torch.float16, True),
])
def test_gpu_hopper_kernel_matches_float64(monkeypatch, heads, splits, masking, dtype, strided_query):
    """The Gluon split kernel (sm_90) against the float64 math and the Triton kernel: filled lengths that are not
    multiples of the key block (a full cache, one key, none; odd and even block counts), left padding, one sequence
    with holes in its window (its own Triton launch beside the Gluon one), one to three splits and the default split
    count, bf16 and fp16, a query whose latent columns are not contiguous (nor then the output's)."""
    from modeling_moe.kernels import mla_decode

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel is for sm_90")
    launches = []
    hopper_split = mla_decode.mla_decode_hopper_split
    monkeypatch.setattr(mla_decode, "mla_decode_hopper_split",
                        lambda *args, **kwargs: launches.append(kwargs) or hopper_split(*args, **kwargs))
    batch, kv_len = 5, 1000
    q_latent, q_rope, latent, k_rope = random_inputs(batch, heads, 1, 512, 64, kv_len, dtype, "cuda", seed=3)
    q_latent, q_rope = q_latent / 8, q_rope / 8  # scores of a realistic spread
    if strided_query:  # [B, H, 1, r] over [B, r, H] memory: mla_decode_triton's output (empty_like) strided alike
        q_latent = q_latent.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        assert q_latent.stride(-1) == heads
    seqlens = torch.tensor([1000, 999, 130, 1, 0], dtype=torch.int32, device="cuda")
    key_mask = None
    if masking != "none":
        key_mask = left_padding_mask(batch, kv_len, [0, 200, 64, 0, 0]).cuda()
    if masking == "holes":
        key_mask[1, 500:520] = False
    scale = 1 / math.sqrt(192)
    got = mla_decode_triton(q_latent, q_rope, latent, k_rope, scale, cache_seqlens=seqlens, key_mask=key_mask,
                            num_splits=splits)
    assert len(launches) == 1 and launches[0]["skip_holes"] == (key_mask is not None)
    expected = math_reference(q_latent, q_rope, latent, k_rope, scale, seqlens, key_mask)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=2e-2, atol=2e-2)
    mla_decode.set_split_backend("triton")
    try:
        triton_only = mla_decode_triton(q_latent, q_rope, latent, k_rope, scale, cache_seqlens=seqlens,
                                        key_mask=key_mask, num_splits=splits)
    finally:
        mla_decode.set_split_backend(None)
    assert len(launches) == 1
    torch.testing.assert_close(got, triton_only, rtol=1e-2, atol=1e-2)
