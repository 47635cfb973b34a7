"""The cross-entropy row kernel and the chunked causal-LM loss against float64 math and transformers' loss on the
whole logits, and the model's skip_logits."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_moe.kernels.linear_cross_entropy import (
    add_product_,
    chunked_causal_lm_loss,
    cross_entropy_rows_,
    cross_entropy_rows_reference,
    default_chunk_tokens,
)

from .helpers import seeded_model, small_config


def reference(hidden, weight, labels, num_items_in_batch=None, shift_labels=None):
    """The math in float64 on the whole logits: position i predicts labels[i + 1] (or shift_labels[i])."""
    if shift_labels is None:
        shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    logits = (hidden @ weight.t()).flatten(0, 1)
    targets = shift_labels.flatten()
    counted = targets != -100
    losses = torch.logsumexp(logits, -1) - logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    total = (losses * counted).sum()
    return total / (counted.sum() if num_items_in_batch is None else num_items_in_batch)


def test_reference_is_transformers_loss():
    hidden, weight, labels = inputs()
    torch.testing.assert_close(reference(hidden, weight, labels).float(),
                               ForCausalLMLoss(hidden @ weight.t(), labels, weight.shape[0]))


def inputs(batch=3, seq=11, hidden_size=16, vocab=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :4] = -100  # a masked prompt
    labels[2, 7] = -100
    return hidden, weight, labels


def value_and_grads(fn, hidden, weight, labels, **kwargs):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(hidden, weight, labels, **kwargs)
    (loss * 1.7).backward()  # an upstream gradient other than 1
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_tokens", [1, 5, 33, 64])  # one token a chunk, a ragged last chunk, one chunk
@pytest.mark.parametrize("reduction", ["mean", "num_items_in_batch", "shift_labels"])
def test_matches_transformers_loss_and_gradients(chunk_tokens, reduction):
    hidden, weight, labels = inputs()
    kwargs = {}
    if reduction == "num_items_in_batch":
        kwargs["num_items_in_batch"] = torch.tensor(40)
    elif reduction == "shift_labels":
        kwargs["shift_labels"] = torch.roll(labels, 3, dims=1)
    expected = value_and_grads(reference, hidden, weight, labels, **kwargs)
    got = value_and_grads(chunked_causal_lm_loss, hidden, weight, labels, chunk_tokens=chunk_tokens, **kwargs)
    for name, e, g in zip(("loss", "grad hidden", "grad weight"), expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_matches_the_fp32_reference_within_bf16_tolerance():
    hidden, weight, labels = inputs(batch=3, seq=64, hidden_size=32, vocab=300, seed=1)
    expected = value_and_grads(reference, hidden, weight, labels)
    got = value_and_grads(chunked_causal_lm_loss, hidden.bfloat16(), weight.bfloat16(), labels, chunk_tokens=48)
    for name, e, g in zip(("loss", "grad hidden", "grad weight"), expected, got):
        assert g.dtype == torch.bfloat16 or name == "loss"
        assert ((g.double() - e).abs().max() / e.abs().max()).item() < 2e-2, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_weight_gradient_chunks_add_into_an_fp32_accumulator(device):
    """Each chunk's weight gradient goes into the fp32 accumulator: on CUDA through one GEMM that adds in place, the
    bf16 product never rounded (so within fp32 error of float64, where rounding it to bf16 first is ~1e-3 off); on the
    CPU the product is formed in bf16, then added."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(300, 256, generator=gen).bfloat16().to(device)
    b = torch.randn(256, 200, generator=gen).bfloat16().to(device)
    acc = torch.randn(300, 200, generator=gen).to(device)
    before = acc.clone()
    expected = before.double() + a.double() @ b.double()
    out = add_product_(acc, a, b)
    assert out.data_ptr() == acc.data_ptr() and acc.dtype == torch.float32
    if device == "cuda":
        assert ((acc.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5
    else:
        assert torch.equal(acc, before + (a @ b).float())


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, labels = inputs()
    with torch.no_grad():
        got = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=4)
    assert not got.requires_grad
    torch.testing.assert_close(got, reference(hidden, weight, labels).detach())


def row_math(logits, targets, ignore_index=-100):
    """Float64, row by row: loss = logsumexp - target logit; gradient = softmax - one-hot; ignored rows give 0."""
    logits = logits.double().cpu()
    losses, grads = [], []
    for row, target in zip(logits, targets.tolist()):
        if target == ignore_index:
            losses.append(torch.zeros((), dtype=torch.float64))
            grads.append(torch.zeros_like(row))
            continue
        probs = torch.exp(row - row.max()) / torch.exp(row - row.max()).sum()
        losses.append(-torch.log(probs[target]))
        grads.append(probs - torch.nn.functional.one_hot(torch.tensor(target), row.numel()).double())
    return torch.stack(losses), torch.stack(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 37, 64, 200])  # one column, ragged and whole blocks of the interpreter's 64
def test_row_kernel_matches_the_math(triton_device, dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(9, vocab, generator=gen) * 4).to(dtype)
    logits[3, :] = logits[3, 0]  # a flat row
    targets = torch.randint(0, vocab, (9,), generator=gen)
    targets[[1, 6]] = -100
    targets[0] = vocab - 1  # the last column
    losses_expected, grad_expected = row_math(logits, targets)
    buffer = logits.to(triton_device, copy=True)
    losses = cross_entropy_rows_(buffer, targets.to(triton_device))
    assert losses.dtype == torch.float32 and buffer.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-3)
    torch.testing.assert_close(losses.double().cpu(), losses_expected, **tolerance)
    torch.testing.assert_close(buffer.double().cpu(), grad_expected, **tolerance)
    without_grad = logits.to(triton_device, copy=True)
    torch.testing.assert_close(cross_entropy_rows_(without_grad, targets.to(triton_device), with_grad=False), losses)
    assert torch.equal(without_grad.cpu(), logits)  # untouched
    reference_losses, reference_grad = cross_entropy_rows_reference(logits.double(), targets)
    torch.testing.assert_close(reference_losses, losses_expected)
    torch.testing.assert_close(reference_grad, grad_expected)


def test_row_kernel_no_rows_and_bad_layouts(triton_device):
    assert cross_entropy_rows_(torch.zeros(0, 5, device=triton_device), torch.zeros(0, dtype=torch.long,
                                                                                    device=triton_device)).numel() == 0
    with pytest.raises(ValueError, match="contiguous rows"):
        cross_entropy_rows_(torch.zeros(5, 4).t(), torch.zeros(4, dtype=torch.long))
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    strided = torch.tensor([1, 0, 9, 0, 3, 0, 7, 0])[::2]  # targets at stride 2
    expected, _ = row_math(logits, strided.contiguous())
    got = cross_entropy_rows_(logits.to(triton_device, copy=True), strided.to(triton_device), with_grad=False)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    # A target that is not a column (nor ignore_index) never reads another row's logit: it fails the asynchronous
    # check. On CUDA that is a device-side assert, as in torch's own cross_entropy, after which the process's CUDA
    # context is unusable (every later test would fail), so it is checked on the CPU.
    for outside in (10, -1):
        with pytest.raises(RuntimeError):
            cross_entropy_rows_(logits.clone(), torch.tensor([1, outside, 2, 3]))


def test_chunked_loss_through_the_kernel(triton_device):
    """The chunked loss with the Triton rows (fp32) against the float64 math."""
    hidden, weight, labels = inputs()
    expected = value_and_grads(reference, hidden, weight, labels)
    on = dict(device=triton_device, dtype=torch.float32)
    got = value_and_grads(chunked_causal_lm_loss, hidden.to(**on), weight.to(**on), labels.to(triton_device),
                          chunk_tokens=7)
    for name, e, g in zip(("loss", "grad hidden", "grad weight"), expected, got):
        torch.testing.assert_close(g.double().cpu(), e, rtol=1e-5, atol=1e-6, msg=name)
    # the targets, checked once for all chunks, still stop one outside the vocabulary (on the CPU: see above)
    if triton_device == "cpu":
        for outside in (weight.shape[0], -1):
            bad = labels.clone()
            bad[1, 3] = outside
            with pytest.raises(RuntimeError):
                chunked_causal_lm_loss(hidden.to(**on), weight.to(**on), bad, chunk_tokens=7)


def test_errors_and_chunk_size():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="targets for"):
        chunked_causal_lm_loss(hidden, weight, labels[:, :5])
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="chunk_tokens"):
            chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=bad)
    hidden = hidden.clone().requires_grad_()
    loss = chunked_causal_lm_loss(hidden, weight, labels) + 0.5 * hidden.square().sum()
    with pytest.raises(RuntimeError, match="no second derivative"):  # the gradients come from the forward
        torch.autograd.grad(loss, hidden, create_graph=True)
    assert default_chunk_tokens(32000) == 2048 and default_chunk_tokens(129280) == 512
    assert default_chunk_tokens(32000, 2) == 4096 and default_chunk_tokens(129280, 2) == 1024
    assert default_chunk_tokens(50) == 8192 and default_chunk_tokens(10**8) == 256


def test_default_chunk_counts_the_logits_dtype(monkeypatch):
    """Without chunk_tokens the chunk holds CHUNK_BYTES of logits in the dtype the product has: the operands', or
    autocast's."""
    from modeling_moe.kernels import linear_cross_entropy as lce

    chunks = []
    apply = lce.LinearCrossEntropySum.apply
    monkeypatch.setattr(lce.LinearCrossEntropySum, "apply", lambda *a: chunks.append(a[4]) or apply(*a))
    monkeypatch.setattr(lce, "CHUNK_BYTES", 4 * 16 * 256)  # 256 fp32 logits of a 16-wide vocabulary...
    hidden, weight, labels = inputs(vocab=16)
    hidden, weight = hidden.detach().float(), weight.detach().float()
    chunked_causal_lm_loss(hidden, weight, labels)
    chunked_causal_lm_loss(hidden.bfloat16(), weight.bfloat16(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_causal_lm_loss(hidden, weight, labels)
    assert chunks == [256, 512, 512]  # ... or 512 in bf16


@pytest.mark.parametrize("mtp", [0, 1])
def test_model_skip_logits_gives_the_same_loss_and_gradients(mtp):
    """Training forward with skip_logits: no logits, the same objective, LM loss and gradients (MTP included)."""
    config = small_config(num_nextn_predict_layers=mtp, tie_word_embeddings=True, seq_aux_loss_coef=0.01)
    model = seeded_model(config).train()
    ids = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    results = []
    for skip in (False, True):
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, skip_logits=skip)
        out.loss.backward()
        assert (out.logits is None) == skip
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach().double(), out.lm_loss.detach().double(), grads))
    (loss, lm_loss, grads), (skip_loss, skip_lm_loss, skip_grads) = results
    # transformers' loss upcasts the logits "to float": float32 even in a float64 model; the chunked loss keeps float64
    torch.testing.assert_close(skip_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(skip_lm_loss, lm_loss, rtol=1e-6, atol=1e-6)
    assert lm_loss < loss  # the objective adds the sequence aux loss (and the MTP loss) to the LM loss
    assert skip_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(skip_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="needs `labels`"):
        model(input_ids=ids, skip_logits=True)
