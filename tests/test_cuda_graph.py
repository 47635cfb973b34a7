"""trainers/cuda_graph.py: `GraphedStep` against the same steps run eagerly (GPU), and its checks (CPU)."""

import pytest
import torch

from modeling_moe.trainers.cuda_graph import GraphedStep


def test_needs_an_eager_step_before_the_capture():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda inputs: inputs, warmup=0)


def test_warmup_steps_run_eagerly_then_the_capture_needs_cuda_inputs():
    calls = []
    step = GraphedStep(lambda inputs: calls.append(inputs) or inputs * 2, warmup=2)
    x = torch.ones(3)
    assert torch.equal(step(x), x * 2) and torch.equal(step(x), x * 2) and len(calls) == 2
    with pytest.raises(ValueError, match="inputs are CUDA tensors"):
        step(x)
    assert not step.captured


def test_replayed_inputs_must_keep_the_captured_structure_shapes_and_dtypes():
    step = GraphedStep(lambda inputs: inputs)
    step.static_inputs = [{"input_ids": torch.zeros(2, 4, dtype=torch.long)}]
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        step._copy_in([{"input_ids": torch.zeros(2, 5, dtype=torch.long)}])
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        step._copy_in([{"input_ids": torch.zeros(2, 4, dtype=torch.int32)}])
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        step._copy_in([{"labels": torch.zeros(2, 4, dtype=torch.long)}])
    step._copy_in([{"input_ids": torch.ones(2, 4, dtype=torch.long)}])
    assert step.static_inputs[0]["input_ids"].eq(1).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_replayed_training_steps_equal_eager_ones():
    """A small model's steps (forward, backward, capturable TritonAdamW with a scheduled learning rate) eager twice,
    then captured and replayed on new inputs: the parameters equal the same steps run eagerly, bit for bit, and the
    outputs are the last replay's."""
    from modeling_moe.kernels.adamw import TritonAdamW

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).cuda()
        optimizer = TritonAdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), capturable=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))

        def step(batch):
            loss = (model(batch["x"]) - batch["y"]).square().mean()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return {"loss": loss.detach(), "grad_norm": norm}

        return model, scheduler, step

    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [{"x": torch.randn(32, 64, device="cuda", generator=g), "y": torch.randn(32, 64, device="cuda",
                                                                                      generator=g)}
               for _ in range(6)]
    results = {}
    for graphed in (False, True):
        model, scheduler, step = make()
        run = GraphedStep(step, warmup=2) if graphed else step
        outputs = []
        for batch in batches:
            out = run(batch)
            outputs.append({k: v.clone() for k, v in out.items()})
            scheduler.step()
        results[graphed] = [p.detach().clone() for p in model.parameters()], outputs
        assert not graphed or run.captured
    for a, b in zip(results[False][0], results[True][0]):
        assert torch.equal(a, b)
    for a, b in zip(results[False][1], results[True][1]):
        assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["grad_norm"], b["grad_norm"])
