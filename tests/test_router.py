"""The router's selection kernel (kernels/router_topk.py) against MoETopkRouter's PyTorch path in float64."""

import pytest
import torch

from modeling_moe import MoEConfig
from modeling_moe.kernels import router as rt
from modeling_moe.modeling_moe import MoETopkRouter

CASES = {
    "sigmoid": dict(n_routed_experts=64, num_experts_per_tok=6),
    "softmax_experts_not_a_power_of_two": dict(n_routed_experts=6, num_experts_per_tok=2, scoring_func="softmax"),
    "sigmoid_best_groups": dict(n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
                                topk_method="group_limited"),
    "softmax_best_groups": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                                topk_method="group_limited", scoring_func="softmax"),
    "softmax_unnormalised": dict(n_routed_experts=16, num_experts_per_tok=4, scoring_func="softmax",
                                 norm_topk_prob=False),
    "top_1": dict(n_routed_experts=8, num_experts_per_tok=1, routed_scaling_factor=2.5),
    "top_k_is_every_expert_unnormalised": dict(n_routed_experts=8, num_experts_per_tok=8, norm_topk_prob=False,
                                               routed_scaling_factor=1.5),
}


def make_router(seed=0, **overrides):
    config = MoEConfig(**{"norm_topk_prob": True, "routed_scaling_factor": 1.0, **overrides})
    router = MoETopkRouter(config)
    torch.manual_seed(seed)
    router.weight.data.normal_(0, 0.5)
    router.e_score_correction_bias.normal_(0, 0.1)  # the bias steers the choice, not the weights
    return router


def reference(router, logits):
    """MoETopkRouter's PyTorch path in float64: (weights, experts)."""
    router = router.double()
    scores = router.scores(logits.double())
    experts = router.select(scores)
    return router.weights_of(scores, experts), experts


def by_expert(weights, experts, num_experts):
    """[T, E]: each token's weight at its chosen experts, 0 elsewhere (the slots' order aside)."""
    return torch.zeros(weights.shape[0], num_experts, dtype=weights.dtype).scatter_(1, experts.cpu(), weights.cpu())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tokens", [37, 0])
def test_selection_weights_and_gradient_match_the_router(triton_device, case, tokens):
    router = make_router(**CASES[case])
    config = router.config
    experts = config.n_routed_experts
    torch.manual_seed(1)
    logits = (torch.randn(tokens, experts, dtype=torch.float64) * 2).to(triton_device)
    grouped = config.topk_method == "group_limited"
    assert rt.router_topk_applies(logits.float(), config.scoring_func, config.n_group, grouped)

    fp32 = logits.float().requires_grad_()
    weights, chosen = rt.router_topk(fp32, router.e_score_correction_bias.to(triton_device), config.num_experts_per_tok,
                                     config.scoring_func, config.n_group if grouped else 1, config.topk_group,
                                     config.norm_topk_prob, config.routed_scaling_factor)
    wide = logits.cpu().requires_grad_()
    ref_weights, ref_chosen = reference(router, wide)

    assert weights.dtype == torch.float32 and chosen.dtype == torch.int64
    assert chosen.shape == weights.shape == (tokens, config.num_experts_per_tok)
    assert torch.equal(chosen.cpu().sort(dim=1).values, ref_chosen.sort(dim=1).values)
    torch.testing.assert_close(by_expert(weights.double(), chosen, experts),
                               by_expert(ref_weights.detach(), ref_chosen, experts), rtol=1e-6, atol=1e-7)

    # a loss that depends on which expert got which weight, not on the slots' order
    upstream = torch.randn(tokens, experts, dtype=torch.float64)
    (weights.double().cpu() * upstream.gather(1, chosen.cpu())).sum().backward()
    (ref_weights * upstream.gather(1, ref_chosen)).sum().backward()
    torch.testing.assert_close(fp32.grad.double().cpu(), wide.grad, rtol=1e-5, atol=1e-6)  # fp32 vs float64


def test_no_silent_second_derivative(triton_device):
    logits = torch.randn(5, 8, device=triton_device, requires_grad=True)
    weights, _ = rt.router_topk(logits, torch.zeros(8, device=triton_device), top_k=2, scoring_func="sigmoid")
    (grad,) = torch.autograd.grad(weights.square().sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_ties_go_to_the_lower_expert_in_descending_order(triton_device):
    logits = torch.zeros(5, 16, device=triton_device)
    logits[:, 9] = 1.0
    weights, chosen = rt.router_topk(logits, torch.zeros(16, device=triton_device), top_k=4, scoring_func="sigmoid")
    assert chosen.tolist() == [[9, 0, 1, 2]] * 5
    torch.testing.assert_close(weights.sum(dim=1).cpu(), torch.ones(5))


def test_where_it_applies(monkeypatch, triton_device):
    logits = torch.randn(4, 12, device=triton_device)
    assert rt.router_topk_applies(logits, "sigmoid", 1, False)
    assert rt.split_bf16_applies(logits)
    assert not rt.router_topk_applies(logits.double(), "sigmoid", 1, False)  # float64 models: PyTorch
    assert not rt.split_bf16_applies(logits.double())
    assert not rt.router_topk_applies(logits.t(), "sigmoid", 1, False)
    assert not rt.router_topk_applies(logits, "sigmoid", 3, True)  # groups of 4 of 12 experts: PyTorch
    monkeypatch.setenv("MOE_ROUTER_REFERENCE", "1")
    assert not rt.router_topk_applies(logits, "sigmoid", 1, False)
    assert not rt.split_bf16_applies(logits)


def test_the_router_runs_the_kernel_and_matches_its_pytorch_path(monkeypatch, triton_device):
    router = make_router(**CASES["sigmoid_best_groups"]).to(triton_device)
    hidden = torch.randn(23, router.config.hidden_size, device=triton_device, requires_grad=True)
    calls = []
    monkeypatch.setattr(rt.RouterTopK, "apply", lambda *a, _apply=rt.RouterTopK.apply: calls.append(1) or _apply(*a))
    logits, weights, chosen = router(hidden)
    assert calls == [1]
    (weights * torch.arange(1.0, 5.0, device=triton_device)[chosen % 4]).sum().backward()
    grad = hidden.grad.clone()
    hidden.grad = None

    monkeypatch.setenv("MOE_ROUTER_REFERENCE", "1")
    ref_logits, ref_weights, ref_chosen = router(hidden)
    assert calls == [1]
    (ref_weights * torch.arange(1.0, 5.0, device=triton_device)[ref_chosen % 4]).sum().backward()
    torch.testing.assert_close(logits, ref_logits)
    assert torch.equal(chosen.sort(dim=1).values, ref_chosen.sort(dim=1).values)
    experts = router.num_experts
    torch.testing.assert_close(by_expert(weights, chosen, experts), by_expert(ref_weights, ref_chosen, experts))
    torch.testing.assert_close(grad, hidden.grad)


def test_split_kernel_is_the_reference_split_bit_for_bit(monkeypatch, triton_device):
    """`split_bf16` (the router's fp32 weight and gradient in three bf16 pieces) runs the kernel where it applies, and
    the kernel gives its PyTorch ops' pieces exactly."""
    from modeling_moe import modeling_moe as mm

    torch.manual_seed(2)
    t = torch.randn(37, 29) * torch.logspace(-30, 30, 29)  # every binade of use, both signs
    t[0, :6] = torch.tensor([0.0, -0.0, 1.0, -2.5, 1e-40, float(torch.finfo(torch.float32).max)])  # 1e-40: subnormal
    t = t.to(triton_device)
    calls = []
    monkeypatch.setattr(mm, "split_bf16_", lambda *args, _split=rt.split_bf16_: calls.append(1) or _split(*args))
    pieces = mm.split_bf16(t)
    assert calls == [1]
    monkeypatch.setenv("MOE_ROUTER_REFERENCE", "1")
    reference = mm.split_bf16(t)  # the six PyTorch ops
    assert calls == [1]
    assert pieces.dtype == torch.bfloat16 and pieces.shape == (3, 37, 29)
    normal = t.abs() >= torch.finfo(torch.float32).tiny  # subnormals: the kernel may flush them (only 1e-40 here)
    assert torch.equal(pieces.view(torch.int16)[:, normal], reference.view(torch.int16)[:, normal])
    assert torch.equal(pieces.double().sum(0)[normal], t.double()[normal])  # exact
    assert (pieces.double().sum(0) - t.double()).abs().max() < 1e-37
    with pytest.raises(ValueError, match="contiguous fp32"):
        rt.split_bf16_(t.double(), torch.empty(3, 37, 29, dtype=torch.bfloat16, device=triton_device))
