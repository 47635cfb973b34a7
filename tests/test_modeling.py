"""Model core against float64 references written from the math, independent of the model's code paths."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

import modeling_moe.modeling_moe
from modeling_moe import MoEForCausalLM
from modeling_moe.modeling_moe import (
    CACHE_FIELD,
    MoESparseMoeBlock,
    MoETopkRouter,
    RouterLogits,
    document_indices,
    expert_balance_loss,
    largest,
    let_keyless_queries_see_themselves,
    routed_load,
    router_logits_fp32,
    split_bf16,
)

from .helpers import assert_compiled_training_step_matches, gqa_config, seeded_model, small_config


# ---------------------------------------------------------------- routing and experts


def reference_routing(config, logits, bias):
    """Per-token loop over the routing rules of DeepSeek-V2 (softmax, max-score groups) and V3 (sigmoid, top-2 sums)."""
    experts, k = config.n_routed_experts, config.num_experts_per_tok
    per_group = experts // config.n_group
    weights = torch.zeros(logits.shape[0], experts, dtype=torch.float64)
    for t, row in enumerate(logits.double()):
        scores = row.softmax(-1) if config.scoring_func == "softmax" else row.sigmoid()
        biased = scores + bias.double()
        allowed = list(range(experts))
        if config.topk_method == "group_limited":
            groups = [biased[g * per_group:(g + 1) * per_group] for g in range(config.n_group)]
            rank = [
                (g.max().item() if config.scoring_func == "softmax" else sorted(g.tolist())[-2:][0] + g.max().item())
                for g in groups
            ]
            best = sorted(range(config.n_group), key=lambda g: -rank[g])[: config.topk_group]
            allowed = [e for e in allowed if e // per_group in best]
        chosen = sorted(allowed, key=lambda e: -biased[e].item())[:k]
        w = scores[chosen]
        if config.norm_topk_prob:
            w = w / w.sum()
        weights[t, chosen] = w * config.routed_scaling_factor
    return weights


def reference_moe_block(block, config, x):
    """Every expert on every token, combined with the reference routing weights."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    logits = x2 @ block.gate.weight.double().T
    weights = reference_routing(config, logits, block.gate.e_score_correction_bias)
    out = torch.zeros_like(x2)
    inter = config.moe_intermediate_size
    for e in range(config.n_routed_experts):
        w1 = block.experts.gate_up_proj[e].double()
        h = F.silu(x2 @ w1[:inter].T) * (x2 @ w1[inter:].T)
        out += weights[:, e : e + 1] * (h @ block.experts.down_proj[e].double().T)
    shared = block.shared_experts
    h = F.silu(x2 @ shared.gate_proj.weight.double().T) * (x2 @ shared.up_proj.weight.double().T)
    out += h @ shared.down_proj.weight.double().T
    return out.view(x.shape)


@pytest.mark.parametrize(
    "routing",
    [
        dict(scoring_func="sigmoid", topk_method="group_limited"),
        dict(scoring_func="softmax", topk_method="group_limited", norm_topk_prob=False, routed_scaling_factor=1.0),
        dict(scoring_func="sigmoid", topk_method="greedy", routed_scaling_factor=2.5),
        dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1),
        dict(num_experts_per_tok=1, topk_method="greedy"),
        dict(num_experts_per_tok=8, topk_method="greedy"),
    ],
)
@pytest.mark.parametrize(
    "experts_implementation, dtype, tol", [("eager", torch.float64, 1e-10), ("grouped_mm", torch.float32, 1e-5)]
)
def test_moe_block_matches_reference(routing, experts_implementation, dtype, tol):
    config = small_config(**routing)
    config._experts_implementation = experts_implementation
    torch.manual_seed(1)
    block = MoESparseMoeBlock(config).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(2, 7, config.hidden_size, dtype=dtype)
    out, (router_logits, chosen) = block(x)
    torch.testing.assert_close(out, reference_moe_block(block, config, x).to(dtype), rtol=tol, atol=tol)
    assert router_logits.shape == (14, config.n_routed_experts) and router_logits.dtype == dtype
    assert torch.equal(chosen.sort(dim=-1).values, block.gate.select(block.gate.scores(router_logits)).sort(-1).values)


def test_shared_experts_run_before_the_router():
    """The block launches the shared experts' GEMMs before the router and the routing (they keep the GPU busy while
    the host works through the routing's small kernels), and a block without shared experts still runs."""
    torch.manual_seed(0)
    block = MoESparseMoeBlock(small_config())
    called = []
    for name in ("shared_experts", "gate", "experts"):
        getattr(block, name).register_forward_pre_hook(lambda module, args, name=name: called.append(name))
    block(torch.randn(1, 5, block.gate.config.hidden_size))
    assert called == ["shared_experts", "gate", "experts"]
    unshared = MoESparseMoeBlock(small_config(n_shared_experts=0))
    with torch.no_grad():
        for p in unshared.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(1, 5, unshared.gate.config.hidden_size)
    out, (logits, chosen) = unshared(x)
    routed = unshared.experts(x.view(5, -1), chosen, unshared.gate(x)[1])
    torch.testing.assert_close(out.view(5, -1), routed)


def test_router_logits_stay_fp32_in_bf16_model():
    model = MoEForCausalLM(small_config()).to(torch.bfloat16)
    assert all(r.weight.dtype == torch.bfloat16 for r in model.routers())  # .to() casts; the forward upcasts
    out = model(torch.randint(3, 97, (1, 5)), output_router_logits=True)
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)


def test_experts_implementations_agree_on_loss_and_gradients():
    config = small_config()
    ids = torch.randint(3, 97, (2, 9))
    results = {}
    for impl in ("eager", "grouped_mm"):
        model = seeded_model(config, dtype=torch.float32).train()
        model.set_experts_implementation(impl)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results["eager"][0], results["grouped_mm"][0])
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(grad, results["grouped_mm"][1][name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- attention


def reference_mla(attn, config, x, positions):
    """Naive per-head MLA in float64 from the weights: expanded keys and values, explicit causal softmax."""
    x = x.double()
    heads, nope, rope, vdim = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    if config.q_lora_rank is None:
        q = x @ attn.q_proj.weight.double().T
    else:
        qa = x @ attn.q_a_proj.weight.double().T
        qa = qa * torch.rsqrt(qa.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * attn.q_a_layernorm.weight.double()
        q = qa @ attn.q_b_proj.weight.double().T
    q = q.view(*x.shape[:2], heads, nope + rope)
    kv = x @ attn.kv_a_proj_with_mqa.weight.double().T
    latent, k_rope = kv[..., : config.kv_lora_rank], kv[..., config.kv_lora_rank:]
    latent = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * attn.kv_a_layernorm.weight.double()
    kvb = (latent @ attn.kv_b_proj.weight.double().T).view(*x.shape[:2], heads, nope + vdim)
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, rope, 2, dtype=torch.float64) / rope)
    # The model keeps the frequencies in fp32 like every transformers model: use exactly those values.
    torch.testing.assert_close(attn_inv_freq := attn.rotary_inv_freq.double(), inv_freq, rtol=1e-6, atol=0)
    inv_freq = attn_inv_freq
    angle = positions.double()[..., None] * inv_freq  # [b, s, rope/2]

    def rotate_pairs(v):  # interleaved pairs (v0, v1), (v2, v3), ... as complex numbers
        c = torch.view_as_complex(v.reshape(*v.shape[:-1], -1, 2).contiguous())
        rot = torch.polar(torch.ones_like(angle), angle)
        return torch.view_as_real(c * (rot if v.dim() == 3 else rot[:, :, None])).flatten(-2)

    q_rope = rotate_pairs(q[..., nope:])
    k_rope = rotate_pairs(k_rope)
    scale = 1 / math.sqrt(nope + rope)
    out = torch.zeros(*x.shape[:2], heads, vdim, dtype=torch.float64)
    seq = x.shape[1]
    for h in range(heads):
        scores = q[:, :, h, :nope] @ kvb[:, :, h, :nope].transpose(1, 2) + q_rope[:, :, h] @ k_rope.transpose(1, 2)
        scores = (scores * scale).masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ kvb[:, :, h, nope:]
    return out.flatten(2) @ attn.o_proj.weight.double().T


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_mla_matches_reference(q_lora_rank):
    config = small_config(q_lora_rank=q_lora_rank)
    model = seeded_model(config)
    attn = model.model.layers[0].self_attn
    attn.rotary_inv_freq = model.model.rotary_emb.inv_freq
    x = torch.randn(2, 6, config.hidden_size, dtype=torch.float64)
    positions = torch.arange(6).expand(2, -1)
    out = attn(x, model.model.rotary_emb(x, positions), attention_mask=None)
    torch.testing.assert_close(out, reference_mla(attn, config, x, positions), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make_config", [small_config, gqa_config], ids=["mla", "gqa"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_incremental_decode_equals_full_forward(make_config, attn_implementation):
    """MLA decode runs in absorbed form over the latent cache; it must reproduce the expanded full forward."""
    config = make_config()
    config._attn_implementation = attn_implementation
    model = seeded_model(config)
    ids = torch.randint(3, 97, (2, 11))
    full = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    logits = [out.logits]
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    for step in range(6, 11, 2):  # 2 tokens per step: speculative-verification sized
        out = model(ids[:, step:step + 2], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-9, atol=1e-9)


def test_latent_cache_holds_only_latent_and_rotary_key():
    config = small_config()
    model = seeded_model(config, dtype=torch.bfloat16)
    out = model(torch.randint(3, 97, (3, 10)), use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    per_token = 0
    for layer in cache.layers:
        assert layer.keys.shape == (3, 1, 10, config.kv_lora_rank)
        assert layer.values.shape == (3, 1, 10, config.qk_rope_head_dim)
        per_token += (layer.keys.shape[-1] + layer.values.shape[-1]) * layer.keys.element_size()
    assert per_token == (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * 2


def test_sdpa_and_eager_attention_agree_with_padding():
    config = small_config()
    ids = torch.randint(3, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    logits = {}
    for impl in ("sdpa", "eager"):
        model = seeded_model(config)
        model.set_attn_implementation(impl)
        logits[impl] = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits["sdpa"][0, 3:], logits["eager"][0, 3:])
    torch.testing.assert_close(logits["sdpa"][1], logits["eager"][1])


def test_keyless_queries_see_themselves_in_training_only():
    """Rows of a boolean mask with no visible key get exactly their own (diagonal) position, also when the queries
    are the last of the keys (a cache); the other rows are unchanged. In a training forward of a left-padded batch
    the real tokens' logits are those of the unchanged mask (eval mode), and every gradient is finite."""
    mask = torch.rand(2, 1, 3, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    mask[0, 0, 1] = False
    mask[1, 0, 2] = False
    fixed = let_keyless_queries_see_themselves(mask)
    expected = mask.clone()
    for b, h, i in (~mask.any(dim=-1)).nonzero().tolist():  # includes the two rows emptied above
        expected[b, h, i, i + 5 - 3] = True  # query i's own key position
    assert torch.equal(fixed, expected) and not torch.equal(fixed, mask)

    config = small_config()
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    model = seeded_model(config)
    reference = model(ids, attention_mask=padding).logits  # eval mode: the mask as transformers builds it
    embeds, positions = model.model.embed_tokens(ids), torch.arange(8)[None]
    assert not model.model.causal_mask(embeds, padding, None, positions)[0, 0, :3].any()
    model.train()
    train_mask = model.model.causal_mask(embeds, padding, None, positions)
    assert torch.equal(train_mask[0, 0, :3], torch.eye(3, 8, dtype=torch.bool))  # pad queries see themselves
    logits = model(ids, attention_mask=padding).logits
    torch.testing.assert_close(logits[0, 3:], reference[0, 3:])
    torch.testing.assert_close(logits[1], reference[1])
    logits[padding.bool()].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("make_config", [small_config, gqa_config], ids=["mla", "gqa"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(make_config):
    model = seeded_model(make_config(), dtype=torch.float32)
    prompts = [[5, 17, 33, 8, 61, 12], [44, 9, 70]]
    alone = [
        model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(p):]
        for p in prompts
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, width:]
    for row, expected in zip(batch, alone):
        assert row.tolist() == expected.tolist()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_pretraining_masks_are_built_on_the_device_and_the_same_while_capturing(monkeypatch, implementation):
    """Packed documents (positions given, no cache): the mask transformers builds from the positions, made without
    transformers' host read of them (a GPU sync each forward) and never from the plain positions the model makes
    itself. It and the plain causal mask (sdpa: None, its is_causal) stay the same while a CUDA graph is being
    captured, which transformers treats as tracing (`pretrain --cuda_graph` captures a step after eager ones)."""
    import transformers.masking_utils as masking_utils

    config = small_config(num_hidden_layers=2, num_nextn_predict_layers=1)
    config._attn_implementation = implementation
    model = seeded_model(config).train()
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    embeds = model.model.embed_tokens(ids)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 6, 7]])  # three documents, then one
    expected = create_causal_mask(config, embeds, None, None, packed)  # transformers' own, outside a capture
    if expected is None:  # sdpa: no row packs several documents
        expected = torch.ones(8, 8, dtype=torch.bool).tril()
    plain = model.model.causal_mask(embeds, None, None, None)
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        lambda position_ids: pytest.fail("transformers read the positions on the host"))
    for capturing in (False, True):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        mask = model.model.causal_mask(embeds, None, None, packed)
        if implementation == "eager":  # additive float masks: 0 where attended
            mask, expected_bool = mask == 0, expected == 0
        else:
            expected_bool = expected
        assert torch.equal(mask, expected_bool.expand_as(mask))
        assert mask[0, 0, 5, :4].logical_not().all() and mask[0, 0, 5, 4:6].all()  # document 2 sees itself only
        again = model.model.causal_mask(embeds, None, None, None)
        assert (again is None and plain is None) if implementation == "sdpa" else torch.equal(again, plain)
        model(input_ids=ids, labels=ids, position_ids=packed, use_cache=False).loss.backward()  # MTP's mask too
    assert implementation == "eager" or create_causal_mask(config, embeds, None, None, None) is None


def test_document_indices_start_a_document_wherever_positions_do_not_step_by_one():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [5, 6, 7, 8, 9, 10, 11, 12]])
    assert document_indices(positions).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0] * 8]


def test_a_training_forward_keeps_packed_documents_apart():
    """Packed documents (positions restarting at each one, no attention mask) attend only within themselves: in
    training the model makes no cache unless asked (transformers looks for packed documents only without one)."""
    model = seeded_model(small_config(num_hidden_layers=2)).train()
    docs = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    packed = model(input_ids=docs.reshape(1, 10), position_ids=torch.arange(5).repeat(2)[None])
    assert getattr(packed, CACHE_FIELD) is None
    for i, doc in enumerate(docs):
        alone = model(input_ids=doc[None]).logits
        torch.testing.assert_close(packed.logits[:, 5 * i:5 * i + 5], alone, rtol=1e-5, atol=1e-5)
    # A cache the caller hands in (a prefix, as PEFT's prefix tuning does) is still extended and used.
    prefix = model(input_ids=docs[:1, :3], use_cache=True)
    continued = model(input_ids=docs[:1, 3:], past_key_values=getattr(prefix, CACHE_FIELD))
    assert getattr(continued, CACHE_FIELD).get_seq_length() == 5
    torch.testing.assert_close(continued.logits, model(input_ids=docs[:1]).logits[:, 3:], rtol=1e-5, atol=1e-5)


def test_yarn_scaling_matches_deepseek_formula():
    rope = {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
    }
    config = small_config(rope_parameters=rope)
    attn = MoEForCausalLM(config).model.layers[0].self_attn
    mscale = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert attn.scaling == pytest.approx(mscale**2 / math.sqrt(16))


# ---------------------------------------------------------------- load balancing


def test_balance_loss_matches_formula_and_is_one_when_balanced():
    config = small_config(scoring_func="softmax", topk_method="greedy", num_experts_per_tok=2)
    router = MoESparseMoeBlock(config).gate.double()
    torch.nn.init.zeros_(router.e_score_correction_bias)
    logits = torch.randn(12, 8, dtype=torch.float64)
    probs = logits.softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    f = torch.zeros(8, dtype=torch.float64).index_add_(0, chosen.flatten(), torch.ones(24, dtype=torch.float64))
    f = f * 8 / (2 * 12)
    expected = (f * probs.mean(0)).sum()
    torch.testing.assert_close(expected, expert_balance_loss(router, logits))
    # Per-sequence: the mean of the loss of each half.
    halves = torch.stack([expert_balance_loss(router, part) for part in logits.chunk(2)]).mean()
    torch.testing.assert_close(halves, expert_balance_loss(router, logits, num_sequences=2))
    # Uniform scores with every expert picked equally often give exactly 1.
    assert expert_balance_loss(router, torch.zeros(8, 8, dtype=torch.float64)).item() == pytest.approx(1.0)


def test_balance_loss_counts_the_experts_the_router_chose():
    """Sigmoid scores with a balancing bias: f counts the routed experts (top-k of scores + bias), which a top-k over
    the normalised scores + bias would not give: scores (0.9, 0.8, 0.1, 0.1) with bias 0.42 on expert 2."""
    config = small_config(n_routed_experts=4, num_experts_per_tok=2, scoring_func="sigmoid", topk_method="greedy",
                          n_group=1, topk_group=1)
    router = MoESparseMoeBlock(config).gate.double()
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.42, 0.0]))
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.1]], dtype=torch.float64)
    logits = torch.log(scores / (1 - scores))  # sigmoid(logits) = scores
    assert router.expert_load(logits).tolist() == [[1.0, 1.0, 0.0, 0.0]]  # routed: experts 0 and 1
    normalised = scores / scores.sum()
    expected = (torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64) * 4 / 2 * normalised[0]).sum()
    torch.testing.assert_close(expert_balance_loss(router, logits), expected)


@pytest.mark.parametrize("deterministic", [False, True], ids=["histogram", "scatter_add"])
def test_routed_load_counts_each_sequences_real_choices(deterministic):
    """routed_load against a loop over (sequence, token, slot), with padding; histc's path and, under
    torch.use_deterministic_algorithms, scatter_add's."""
    torch.manual_seed(0)
    sequences, tokens, k, experts = 3, 7, 2, 5
    chosen = torch.stack([torch.randperm(experts)[:k] for _ in range(sequences * tokens)])
    mask = (torch.rand(sequences, tokens) > 0.3).long()
    expected = torch.zeros(sequences, experts, dtype=torch.float64)
    for row, (experts_of_token, real) in enumerate(zip(chosen.tolist(), mask.reshape(-1).tolist())):
        for expert in experts_of_token:
            expected[row // tokens, expert] += real
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        masked = routed_load(chosen, experts, sequences, token_mask=mask, dtype=torch.float64)
        unmasked = routed_load(chosen, experts)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(masked, expected)
    assert unmasked.dtype == torch.float32 and torch.equal(unmasked, torch.bincount(chosen.reshape(-1), minlength=5)
                                                           .float().unsqueeze(0))


def test_largest_picks_in_descending_order_with_ties_to_the_lower_index():
    """`largest` against a sort by (value descending, index ascending), with ties and -inf entries."""
    values = torch.tensor([[0.5, 0.9, 0.5, -math.inf, 0.9, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    picked_values, picked = largest(values, 4)
    for row, (v, i) in enumerate(zip(picked_values.tolist(), picked.tolist())):
        order = sorted(range(values.shape[1]), key=lambda e: (-values[row, e].item(), e))[:4]
        assert i == order and v == [values[row, e].item() for e in order]


def test_padding_takes_no_part_in_the_balance_loss_nor_the_expert_load():
    """A right-padded batch: the padding's router logits count neither in the balance loss (batch-wise: as the
    real tokens alone; sequence-wise: each sequence over its own tokens) nor in the load update_expert_bias reads."""
    config = small_config(output_router_logits=True, router_aux_loss_coef=0.01)
    model = seeded_model(config).train()
    ids = torch.randint(3, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(ids, attention_mask=mask)
    routers = model.routers()
    real = mask.reshape(-1).bool()
    expected = torch.stack([expert_balance_loss(r, l[real]) for r, l in zip(routers, out.router_logits)]).mean()
    torch.testing.assert_close(out.aux_loss, expected)
    router, logits = routers[0], out.router_logits[0]
    per_sequence = (expert_balance_loss(router, logits[:10]) + expert_balance_loss(router, logits[10:16])) / 2
    torch.testing.assert_close(expert_balance_loss(router, logits, 2, token_mask=mask), per_sequence)
    for router in routers:
        router.tokens_per_expert = None
    model(ids, attention_mask=mask)
    load = torch.stack([r.tokens_per_expert for r in routers])
    assert load.sum().item() == 16 * config.num_experts_per_tok * len(routers)  # 16 real tokens, k experts each
    expected_load = torch.stack([r.expert_load(l[real])[0] for r, l in zip(routers, out.router_logits)])
    torch.testing.assert_close(load, expected_load)


def count_tokens(model, batches, **kwargs):
    model.train()
    for ids in batches:
        model(ids, labels=ids, **kwargs).loss.backward()
    return torch.stack([r.tokens_per_expert for r in model.routers()])


def test_update_expert_bias_rule_and_statistics():
    config = small_config(bias_update_speed=0.01)
    model = seeded_model(config, dtype=torch.float32)
    before = torch.stack([r.e_score_correction_bias.clone() for r in model.routers()])
    batches = [torch.randint(3, 97, (2, 8)) for _ in range(3)]  # three micro-batches of one optimizer step
    load = count_tokens(model, batches)
    assert load.sum(dim=-1).tolist() == [3 * 16 * config.num_experts_per_tok] * len(model.routers())
    stats = model.update_expert_bias()
    after = torch.stack([r.e_score_correction_bias for r in model.routers()])
    delta = 0.01 * torch.sign(load.mean(-1, keepdim=True) - load)
    torch.testing.assert_close(after - before, delta - delta.mean(-1, keepdim=True))
    torch.testing.assert_close(stats["tokens_per_expert"], load)
    mean = load.mean(-1)
    torch.testing.assert_close(stats["maxvio"], (load.max(-1).values - mean) / mean)
    assert all(r.tokens_per_expert is None for r in model.routers())  # reset


def test_gradient_checkpointing_counts_once_and_keeps_gradients():
    config = small_config()
    batches = [torch.randint(3, 97, (2, 8))]
    plain = seeded_model(config, dtype=torch.float32)
    load = count_tokens(plain, batches)
    for use_reentrant in (False, True):
        ckpt = seeded_model(config, dtype=torch.float32)
        ckpt.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        torch.testing.assert_close(count_tokens(ckpt, batches), load)
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_eval_forward_counts_nothing():
    model = seeded_model(small_config())
    with torch.no_grad():
        model(torch.randint(3, 97, (2, 8)))
    assert all(r.tokens_per_expert is None for r in model.routers())
    assert model.update_expert_bias()["tokens_per_expert"].sum() == 0


def test_generation_in_training_mode_counts_nothing():
    """RL rollouts generate with the model in training mode: those tokens are not trained on, so they are not counted
    as expert load, and the training flag is back afterwards."""
    model = seeded_model(small_config(), dtype=torch.float32).train()
    seen = []
    hook = model.routers()[0].register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.generate(torch.randint(3, 97, (2, 8)), max_new_tokens=3, do_sample=False)
    hook.remove()
    assert seen and not any(seen)  # every decoding forward ran in eval mode
    assert model.training and all(r.tokens_per_expert is None for r in model.routers())


def test_balanced_routing_is_driven_by_bias_updates():
    """With a router that sends every token to the same experts, the bias updates alone spread the load."""
    config = small_config(bias_update_speed=0.01, topk_method="greedy", n_group=1, topk_group=1)
    model = seeded_model(config, dtype=torch.float32)
    with torch.no_grad():
        for router in model.routers():
            router.weight.normal_(0, 0.3)
            router.e_score_correction_bias.zero_()
            router.e_score_correction_bias[:3] = 0.3  # experts 0-2 take every token
    ids = torch.randint(3, 97, (4, 16))
    maxvio = []
    for _ in range(30):
        model.zero_grad()
        count_tokens(model, [ids])
        maxvio.append(model.update_expert_bias()["maxvio"])
    assert (maxvio[0] > 0.6).all()
    assert (torch.stack(maxvio[-5:]).mean(0) < 0.3 * maxvio[0]).all()


def test_aux_losses_and_router_logits_in_output():
    config = small_config(output_router_logits=True, router_aux_loss_coef=0.1, seq_aux_loss_coef=0.2)
    model = seeded_model(config, dtype=torch.float32).train()
    ids = torch.randint(3, 97, (2, 8))
    out = model(ids, labels=ids)
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    assert len(out.router_logits) == moe_layers
    routers = model.routers()
    aux = torch.stack([expert_balance_loss(r, l) for r, l in zip(routers, out.router_logits)]).mean()
    seq = torch.stack([expert_balance_loss(r, l, 2) for r, l in zip(routers, out.router_logits)]).mean()
    torch.testing.assert_close(out.aux_loss, aux)
    plain = model(ids, labels=ids, output_router_logits=False)
    assert plain.aux_loss is None and plain.router_logits is None
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + 0.1 * aux + 0.2 * seq, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- multi-token prediction


def test_mtp_loss_matches_manual_computation_and_is_skipped_at_inference():
    config = small_config(num_nextn_predict_layers=2, mtp_loss_weight=0.5)
    model = seeded_model(config).train()  # no dropout: train mode only switches the MTP loss on
    ids = torch.randint(3, 97, (2, 10))
    out = model(ids, labels=ids)
    hidden = model.model(ids).last_hidden_state
    positions = torch.arange(10).unsqueeze(0)
    losses = []
    for depth, layer in enumerate(model.model.mtp_layers, start=1):
        keep = 10 - depth
        emb = model.model.embed_tokens(ids[:, depth:])
        h = layer.eh_proj(torch.cat([layer.enorm(emb), layer.hnorm(hidden[:, :keep])], -1))
        pe = model.model.rotary_emb(h, positions[:, :keep])
        h = h + layer.self_attn(layer.input_layernorm(h), pe, None)
        h = h + layer.mlp(layer.post_attention_layernorm(h))[0]
        logits = model.lm_head(layer.norm(h))
        # position i of depth d predicts token i + d + 1
        losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, depth + 1:].reshape(-1)))
        hidden = layer.norm(h)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    # transformers' causal-LM loss upcasts the logits to fp32 whatever the model's dtype.
    torch.testing.assert_close(out.loss.double(), ce + 0.5 * torch.stack(losses).mean(), rtol=1e-6, atol=1e-6)
    # Evaluation reports the plain LM loss and inference ignores the MTP modules entirely.
    model.eval()
    torch.testing.assert_close(model(ids, labels=ids).loss.double(), ce, rtol=1e-6, atol=1e-6)
    without = MoEForCausalLM(small_config()).double().eval()
    without.set_experts_implementation("eager")
    without.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(without(ids).logits, model(ids).logits)


def test_losses_of_micro_batches_with_num_items_in_batch_add_up_to_the_batch_loss():
    """transformers' Trainer with gradient accumulation passes num_items_in_batch and sums the micro-batches' losses:
    the MTP and balance terms then count once, as in one forward over the whole batch (equal counted tokens in each
    micro-batch, and a linear balance term: the sequence-wise loss of one sequence per micro-batch)."""
    config = small_config(num_nextn_predict_layers=2, mtp_loss_weight=0.5, seq_aux_loss_coef=0.1)
    model = seeded_model(config).train()
    ids = torch.randint(3, 97, (2, 10))
    whole = model(ids, labels=ids).loss
    counted = 2 * 9
    halves = [model(ids[i:i + 1], labels=ids[i:i + 1], num_items_in_batch=torch.tensor(counted)).loss for i in (0, 1)]
    torch.testing.assert_close(sum(halves), whole, rtol=1e-6, atol=1e-6)  # the router and losses run in fp32


def test_mtp_depth_without_counted_labels_adds_zero_not_nan():
    config = small_config(num_nextn_predict_layers=2, mtp_loss_weight=0.5)
    model = seeded_model(config).train()
    ids = torch.randint(3, 97, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]  # only the main loss's first target: no MTP depth has a label
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, out.lm_loss)


# ---------------------------------------------------------------- bookkeeping


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_parameter_counts_total_and_activated(tie_word_embeddings):
    config = small_config(num_nextn_predict_layers=1, tie_word_embeddings=tie_word_embeddings)
    model = MoEForCausalLM(config)
    counts = model.num_parameters_summary()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    h, i, e, k = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts, config.num_experts_per_tok
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    mtp = sum(p.numel() for p in model.model.mtp_layers.parameters())
    inactive_experts = moe_layers * (e - k) * 3 * h * i
    expected = counts["total"] - config.vocab_size * h - mtp - inactive_experts
    assert counts["activated"] == expected
    assert counts["mtp"] == mtp and counts["embedding"] == config.vocab_size * h


def _grouped_mm_backward_traces() -> bool:
    """Whether transformers' grouped_mm CPU fallback has a traceable backward (a custom op; transformers 5.17's is a
    Python loop over `offs.tolist()`, which no fullgraph compile can trace)."""
    import transformers.integrations.moe  # noqa: F401  (registers the ops)

    return hasattr(torch.ops.transformers, "grouped_mm_fallback_backward")


def test_split_bf16_pieces_sum_exactly_to_the_fp32_tensor():
    t = torch.randn(1000) * torch.logspace(-30, 30, 1000)
    pieces = split_bf16(t)
    assert pieces.shape == (3, 1000) and pieces.dtype == torch.bfloat16
    assert torch.equal(pieces.double().sum(0), t.double())
    assert (pieces[1].double().abs() <= 2 ** -7 * t.double().abs()).all()  # each piece below the one before


def test_split_bf16_stays_exact_compiled():
    t = torch.randn(4096)
    assert torch.equal(torch.compile(split_bf16)(t).double().sum(0), t.double())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_router_logits_on_bf16_tensor_cores_are_as_exact_as_an_fp32_gemm(device, weight_dtype):
    """Logits and both gradients against float64, within a small multiple of the error of `F.linear` on fp32 copies
    (what runs on a CPU, and transformers' router everywhere) on the same inputs (Hopper's tensor cores accumulate
    fp32 with 3-4x cuBLAS's fp32 GEMM's error at the bench shapes); the input gradient within bf16 rounding. Odd
    sizes, both weight dtypes the router's weight takes (fp32 as the model keeps it, bf16 after `.to(bf16)`)."""
    gen = torch.Generator().manual_seed(0)
    tokens, hidden, experts = 301, 257, 72
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16).requires_grad_()
    weight = (0.02 * torch.randn(experts, hidden, generator=gen)).to(device, weight_dtype).requires_grad_()
    grad = torch.randn(tokens, experts, generator=gen).to(device)
    logits = RouterLogits.apply(x, weight)
    logits.backward(grad)
    x64, w64, g64 = x.detach().double(), weight.detach().double(), grad.double()
    fp32_logits = F.linear(x.detach().float(), weight.detach().float())
    fp32_grad_weight = grad.t() @ x.detach().float()
    ref_logits, ref_grad_x, ref_grad_w = x64 @ w64.t(), g64 @ w64, g64.t() @ x64
    assert logits.dtype == torch.float32 and weight.grad.dtype == weight_dtype and x.grad.dtype == torch.bfloat16
    scale = ref_logits.abs().max()
    fp32_logits_error = (fp32_logits.double() - ref_logits).abs().max()
    assert (logits.double() - ref_logits).abs().max() <= 4 * fp32_logits_error + 1e-7 * scale
    fp32_error = (fp32_grad_weight.double() - ref_grad_w).abs().max() + 1e-7 * ref_grad_w.abs().max()
    rounding = 2 ** -8 * ref_grad_w.abs() if weight_dtype == torch.bfloat16 else 0  # a bf16 weight's gradient is bf16
    assert ((weight.grad.double() - ref_grad_w).abs() <= 4 * fp32_error + rounding).all()
    torch.testing.assert_close(x.grad.double(), ref_grad_x, rtol=2 ** -8, atol=2 ** -8 * ref_grad_x.abs().max().item())


def test_router_logits_on_a_cpu_are_fp32_linear(monkeypatch):
    monkeypatch.setattr(RouterLogits, "apply", None)  # never called here
    x, weight = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).bfloat16(), torch.randn(8, 16)
    assert torch.equal(router_logits_fp32(x, weight), F.linear(x.float(), weight))
    assert router_logits_fp32(x.double(), weight).dtype == torch.float64


@pytest.mark.gpu
def test_gpu_router_runs_on_tensor_cores_also_compiled(monkeypatch):
    """A bf16 model's router on a GPU takes `RouterLogits` from ROUTER_TENSOR_CORE_MIN_MACS on, a decode-sized batch
    the fp32 GEMM; under torch.compile (as the pretraining trainer's regional compilation runs it) its forward and
    backward give eager's logits, routing and gradients."""
    config = small_config(n_routed_experts=16, num_experts_per_tok=4, hidden_size=256)
    router = MoETopkRouter(config).cuda()
    torch.nn.init.normal_(router.weight, std=0.02)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    calls = []
    apply = RouterLogits.apply
    monkeypatch.setattr(RouterLogits, "apply", lambda *args: calls.append(1) or apply(*args))
    router(x[:16])
    assert not calls
    monkeypatch.setattr(modeling_moe.modeling_moe, "ROUTER_TENSOR_CORE_MIN_MACS", 512 * 256 * 16)
    router(x[:16])
    assert not calls
    results = []
    for fn in (router, torch.compile(router, fullgraph=True)):  # compiled: RouterLogits at any size
        x.grad = router.weight.grad = None
        logits, weights, indices = fn(x)
        (logits.square().mean() + weights.sum()).backward()
        results.append((logits, weights, indices, x.grad, router.weight.grad))
        assert len(calls) == 1 and router.weight.dtype == torch.float32  # the eager call's (a trace counts no call)
    exact = x.detach().double() @ router.weight.detach().double().t()
    for logits, *_ in results:
        assert (logits.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    (logits, weights, indices, grad_x, grad_w), compiled = results
    torch.testing.assert_close(compiled[0], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled[2].sort(-1).values, indices.sort(-1).values)
    # eager runs the selection kernel (experts by descending score), compiled torch.topk (its own order)
    by_expert = [torch.zeros_like(logits).scatter_(1, i, w) for w, i in ((weights, indices), compiled[1:3])]
    torch.testing.assert_close(by_expert[1], by_expert[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[3], grad_x)
    torch.testing.assert_close(compiled[4], grad_w, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not _grouped_mm_backward_traces(), reason="this transformers' grouped_mm CPU fallback backward "
                    "does not trace under torch.compile (fixed in later transformers)")
def test_expert_load_is_the_routing_used_also_in_a_fullgraph_compiled_training_step():
    """The counted load equals what the experts received (captured at their input, MTP included), and a training
    forward + backward compiles as one graph (no graph break in the counting) with the same loss, counts and grads."""
    config = small_config(num_nextn_predict_layers=1)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    model = seeded_model(config, dtype=torch.float32).train()
    received = {}
    moe_blocks = [layer.mlp for layer in [*model.model.layers, *model.model.mtp_layers] if layer.is_moe]
    for block in moe_blocks:
        block.experts.register_forward_pre_hook(
            lambda module, args, block=block: received.__setitem__(block, torch.bincount(
                args[1].flatten(), minlength=config.n_routed_experts).float()))
    compiled_model = seeded_model(config, dtype=torch.float32).train()
    assert_compiled_training_step_matches(model, compiled_model, ids)
    assert len(received) == len(moe_blocks) == len(model.routers())
    for block in moe_blocks:
        torch.testing.assert_close(block.gate.tokens_per_expert, received[block], rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_left_padded_training_step_of_length_64_mod_128_has_finite_gradients():
    """The shape of a countdown GRPO step: 192 tokens, left padding, bf16, SDPA with moe-100m's unequal head dims
    (qk 96, v 64: PyTorch picks cuDNN on H100/H200). Gradients are finite; pytorch/pytorch#196678 makes them NaN when
    a query row has no key, which the raw SDPA call below shows on the torch builds that have the bug."""
    config = small_config(hidden_size=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, kv_lora_rank=64,
                          max_position_embeddings=512)
    model = MoEForCausalLM(config).to("cuda", torch.bfloat16).train()
    ids = torch.randint(3, 97, (4, 192), device="cuda")
    padding = torch.ones_like(ids)
    padding[:, :40] = 0
    model(ids, attention_mask=padding).logits[padding.bool()].float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    q = torch.randn(4, 4, 192, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4, 4, 192, 96, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(4, 4, 192, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(192, 192, dtype=torch.bool, device="cuda").tril()[None, None].repeat(4, 1, 1, 1)
    mask[..., :40] = False  # left padding: the first 40 queries see no key
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().sum().backward()
    print(f"raw SDPA with keyless rows: {int((~torch.isfinite(q.grad)).sum())} non-finite query gradients")
