"""Expert parallelism: the routed experts of every MoE layer sharded over an `ep` process group.

Layout. The world of `W` ranks is a `(W / P, P)` device mesh with dimensions `("edp", "ep")`: consecutive ranks form an
expert-parallel group (the `ep` dimension, size `P`) and together hold one copy of every expert, rank `r` of the group
holding experts `[r * E / P, (r + 1) * E / P)`. Ranks with the same `ep` coordinate hold the same experts and form the
`edp` ("expert data parallel") dimension. Everything else in the model (attention, routers, shared experts, embeddings)
is replicated or sharded over all `W` ranks by DDP / FSDP2 as usual, and every rank reads its own data.

Dispatch and combine. Each MoE layer routes its tokens locally (the routers are replicated), then
1. sorts the (token, slot) pairs by expert, counts the pairs per expert and exchanges the counts (`all_to_all_single`);
2. sends each pair's hidden state to the rank holding its expert (`all_to_all_single` with uneven splits);
3. runs the local experts through the model's own experts implementation (eager, grouped_mm, ...) with unit weights;
4. sends the outputs back (the reverse `all_to_all_single`) and combines the `k` outputs of every token in fp32 with
   its routing weights, in slot order.
The all-to-alls are differentiable (the backward of one is the reverse all-to-all), all index operations are
permutations (deterministic backward), and the results equal the unsharded layer's up to fp32 summation order.

Sharding is a class swap of the experts module, the way FSDP2's `fully_shard` works: the module keeps its name, its
parameters' names (`...mlp.experts.gate_up_proj`) and its experts implementation; only its parameters shrink to the
local experts and its forward gains the dispatch. Gradients: with DDP the expert parameters are excluded from DDP and
reduced here; with FSDP2 they are `fully_shard`-ed over the `edp` mesh before `accelerator.prepare` (which skips
modules that are already sharded) and rescaled here. Either way an expert's gradient ends up as the mean over all `W`
ranks' losses, exactly as DDP gives every other parameter.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` along dim 0 with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, tensor, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        output = tensor.new_empty((sum(output_splits), *tensor.shape[1:]))
        dist.all_to_all_single(output, tensor.contiguous(), output_splits, input_splits, group=group)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = grad_output.new_empty((sum(ctx.input_splits), *grad_output.shape[1:]))
        dist.all_to_all_single(
            grad_input, grad_output.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group
        )
        return grad_input, None, None, None


def all_to_all(tensor: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable `all_to_all_single`: rows `input_splits[j]` go to rank j, `output_splits[j]` come from rank j."""
    return _AllToAll.apply(tensor, output_splits, input_splits, group)


class ExpertParallelMixin:
    """Mixed into the class of a routed-experts module whose parameters hold only this rank's experts."""

    ep_group = None
    ep_size: int = 1
    ep_rank: int = 0
    num_global_experts: int = 0

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        num_tokens, top_k = top_k_index.shape
        hidden = hidden_states.shape[-1]
        device = hidden_states.device
        output_dtype = hidden_states.dtype
        # Exchange activations in the dtype the experts compute in: autocast's (bf16 rather than the fp32 residual
        # stream: what autocast would cast them to anyway), or FSDP2's param_dtype.
        if torch.is_autocast_enabled(device.type):
            hidden_states = hidden_states.to(torch.get_autocast_dtype(device.type))
        elif self.gate_up_proj.dtype != hidden_states.dtype:
            hidden_states = hidden_states.to(self.gate_up_proj.dtype)
        experts, ranks, local = self.num_global_experts, self.ep_size, self.num_experts

        # (token, slot) pairs sorted by global expert: consecutive runs per destination rank, then per local expert.
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        with torch.no_grad():
            send_counts = torch.bincount(flat, minlength=experts)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)  # [source rank, local expert]
            send_splits = send_counts.view(ranks, local).sum(dim=1).tolist()
            recv_splits = recv_counts.view(ranks, local).sum(dim=1).tolist()
            local_ids = torch.arange(local, device=device).repeat(ranks).repeat_interleave(recv_counts)

        # One row per pair (expand + reshape, then a permutation: a deterministic backward, no scatter-add).
        pairs = hidden_states.unsqueeze(1).expand(num_tokens, top_k, hidden).reshape(num_tokens * top_k, hidden)
        received = all_to_all(pairs.index_select(0, order), recv_splits, send_splits, self.ep_group)
        ones = torch.ones(received.shape[0], 1, dtype=top_k_weights.dtype, device=device)
        expert_out = super().forward(received, local_ids.unsqueeze(1), ones)
        if received.requires_grad and not expert_out.requires_grad:
            # No token reached this rank's experts (an implementation may then skip them entirely): keep both
            # all-to-alls in the graph, since their backwards are collectives the other ranks will be waiting in.
            expert_out = expert_out + received.sum() * 0
        returned = all_to_all(expert_out, send_splits, recv_splits, self.ep_group)

        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=device)
        per_slot = returned.index_select(0, inverse).view(num_tokens, top_k, hidden)
        accumulate = torch.promote_types(hidden_states.dtype, torch.float32)
        combined = (per_slot.to(accumulate) * top_k_weights.to(accumulate).unsqueeze(-1)).sum(dim=1)
        return combined.to(output_dtype)


_EP_CLASSES: dict[type, type] = {}


def _expert_parallel_class(cls: type) -> type:
    if cls not in _EP_CLASSES:
        _EP_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallelMixin, cls), {})
    return _EP_CLASSES[cls]


def is_routed_experts(module: nn.Module) -> bool:
    """A stacked routed-experts module: `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] parameters."""
    return (
        isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)
        and isinstance(getattr(module, "down_proj", None), nn.Parameter)
        and isinstance(getattr(module, "num_experts", None), int)
        and not isinstance(module, ExpertParallelMixin)
    )


def check_expert_parallel_size(expert_parallel_size: int, world_size: int, num_experts: int):
    """Raise a `ValueError` saying what to change when the sizes do not fit together."""
    if expert_parallel_size < 1:
        raise ValueError(f"--expert_parallel_size must be >= 1, got {expert_parallel_size}.")
    if num_experts % expert_parallel_size:
        raise ValueError(
            f"The model's n_routed_experts={num_experts} is not divisible by --expert_parallel_size="
            f"{expert_parallel_size}: every rank of an expert-parallel group must hold the same number of experts. "
            f"Use a divisor of {num_experts}."
        )
    if world_size % expert_parallel_size:
        raise ValueError(
            f"The world size ({world_size} process{'es' if world_size != 1 else ''}) is not divisible by "
            f"--expert_parallel_size={expert_parallel_size}. Launch a multiple of {expert_parallel_size} processes, "
            f"e.g. `accelerate launch --num_processes {expert_parallel_size} ...` or "
            f"`torchrun --nproc_per_node {expert_parallel_size} ...`."
        )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's experts in full: FSDP2 shards (DTensors over `edp`) gathered, plain tensors as they are."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor()
    return tensor


class ExpertParallel:
    """Expert-parallel sharding of a model's routed experts and the bookkeeping that goes with it."""

    def __init__(self, expert_parallel_size: int, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Expert parallelism needs torch.distributed: launch with accelerate or torchrun.")
        self.world_size = dist.get_world_size()
        self.size = expert_parallel_size
        self.mesh = init_device_mesh(
            device_type, (self.world_size // self.size, self.size), mesh_dim_names=("edp", "ep")
        )
        self.ep_group = self.mesh["ep"].get_group()
        self.edp_group = self.mesh["edp"].get_group()
        self.rank = self.mesh["ep"].get_local_rank()
        self.modules: dict[str, nn.Module] = {}  # name in the unwrapped model -> sharded experts module
        self.fsdp = False

    # ----------------------------------------------------------------------------------------------------- sharding

    def shard(self, model: nn.Module) -> list[str]:
        """Keep only this rank's experts in every routed-experts module; returns their parameter names."""
        names = []
        for name, module in list(model.named_modules()):
            if not is_routed_experts(module):
                continue
            experts = module.num_experts
            check_expert_parallel_size(self.size, self.world_size, experts)
            local = experts // self.size
            rows = slice(self.rank * local, (self.rank + 1) * local)
            for param_name in ("gate_up_proj", "down_proj"):
                full = getattr(module, param_name)
                sliced = nn.Parameter(full.detach()[rows].clone(), requires_grad=full.requires_grad)
                setattr(module, param_name, sliced)
                names.append(f"{name}.{param_name}")
            module.__class__ = _expert_parallel_class(type(module))
            module.num_global_experts, module.num_experts = experts, local
            module.ep_group, module.ep_size, module.ep_rank = self.ep_group, self.size, self.rank
            self.modules[name] = module
        if not self.modules:
            raise ValueError("--expert_parallel_size > 1, but the model has no routed-experts modules to shard.")
        self.param_names = names
        return names

    def exclude_from_ddp(self, model: nn.Module):
        """DDP must neither broadcast nor average the expert parameters: each rank holds different experts."""
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, self.param_names)

    def fully_shard(self, fsdp_plugin):
        """FSDP2 over the `edp` mesh for the experts (the rest of the model is sharded by `accelerator.prepare`)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if getattr(fsdp_plugin, "cpu_ram_efficient_loading", False):
            raise ValueError(
                "fsdp_cpu_ram_efficient_loading broadcasts rank 0's weights to every rank, which would overwrite the "
                "other ranks' experts: set `fsdp_cpu_ram_efficient_loading: false` with --expert_parallel_size > 1."
            )
        policy = fsdp_plugin.mixed_precision_policy or MixedPrecisionPolicy()
        kwargs = {
            "mesh": self.mesh["edp"],
            "reshard_after_forward": fsdp_plugin.reshard_after_forward,
            # Same parameter and reduction dtypes as the rest of the model, but the inputs left alone: the routing
            # weights stay fp32 (inside a decoder layer's FSDP unit nothing would cast them) and so does the output.
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype, cast_forward_inputs=False
            ),
        }
        if fsdp_plugin.cpu_offload is not None:
            kwargs["offload_policy"] = fsdp_plugin.cpu_offload
        for module in self.modules.values():
            if policy.param_dtype is not None:
                # accelerate upcasts the model to fp32 master weights for FSDP2 mixed precision, but only the
                # modules it shards itself: experts sharded here in bf16 would mix dtypes in the optimizer step.
                module.float()
            fully_shard(module, **kwargs)
        self.fsdp = True

    # ---------------------------------------------------------------------------------------------------- gradients

    def expert_parameters(self) -> list[nn.Parameter]:
        return [getattr(m, n) for m in self.modules.values() for n in ("gate_up_proj", "down_proj")]

    @torch.no_grad()
    def finish_gradients(self):
        """Make each expert gradient the mean over all ranks' losses; call once per optimizer step, after backward.

        The all-to-all backward already summed the contributions of the `ep` group's tokens; ranks holding the same
        experts (`edp`) are summed here (DDP) or were averaged by FSDP2's reduce-scatter.
        """
        for param in self.expert_parameters():
            if param.grad is None:  # no token reached these experts on any rank of the group: a zero gradient
                param.grad = torch.zeros_like(param)
            if self.fsdp:
                param.grad.mul_(1.0 / self.size)  # FSDP2 divided the edp sum by W / P
            else:
                if self.world_size > self.size:
                    dist.all_reduce(param.grad, group=self.edp_group)
                param.grad.mul_(1.0 / self.world_size)

    @torch.no_grad()
    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Global gradient norm (replicated parameters counted once, every expert once) and clipping to `max_norm`."""
        expert_ids = {id(p) for p in self.expert_parameters()}
        params = [p for p in parameters if p.grad is not None]
        shared = [p.grad for p in params if id(p) not in expert_ids]
        experts = [p.grad for p in params if id(p) in expert_ids]
        shared_sq = _squared_norm(shared)
        expert_sq = _squared_norm(experts)
        dist.all_reduce(expert_sq, group=self.ep_group)
        total = (shared_sq + expert_sq).sqrt()
        if max_norm and max_norm > 0 and math.isfinite(max_norm):
            coef = min(1.0, max_norm / (total.item() + 1e-6))
            if coef < 1.0:
                for p in params:
                    p.grad.mul_(coef)
        return total

    # -------------------------------------------------------------------------------------------------- checkpoints

    @torch.no_grad()
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All experts' rows of an expert-sharded tensor (collective over the `ep` group), on the CPU."""
        local = _local(tensor).detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.ep_group)
        return torch.cat(parts, dim=0).cpu()

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        rows = full.shape[0] // self.size
        return full[self.rank * rows : (self.rank + 1) * rows]

    @torch.no_grad()
    def assign(self, target: torch.Tensor, full: torch.Tensor):
        """Copy this rank's rows of `full` into `target` (a plain tensor or an FSDP2 DTensor shard)."""
        rows = self.local_rows(full)
        if hasattr(target, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            rows = distribute_tensor(
                rows.to(device=target.device, dtype=target.dtype), target.device_mesh, target.placements,
                src_data_rank=None,
            )
            target.to_local().copy_(rows.to_local())
        else:
            target.copy_(rows.to(device=target.device, dtype=target.dtype))

    def full_expert_state_dict(self) -> dict[str, torch.Tensor]:
        """`{parameter name: all experts}` for every sharded parameter (collective)."""
        return {
            f"{name}.{param_name}": self.gather(getattr(module, param_name))
            for name, module in self.modules.items()
            for param_name in ("gate_up_proj", "down_proj")
        }

    def checkpoint_state(self, optimizer) -> "ExpertParallelCheckpoint":
        return ExpertParallelCheckpoint(self, optimizer)


class ExpertParallelCheckpoint:
    """The experts' weights and optimizer states, all experts gathered: registered with
    `accelerator.register_for_checkpointing`, so `save_state` / `load_state` carry what each rank alone holds.

    accelerate writes one copy of the model and optimizer (the main process's); the expert entries there are only
    that rank's shard, and this object, loaded after them, puts every rank's own experts back.
    """

    def __init__(self, expert_parallel: ExpertParallel, optimizer):
        self.ep = expert_parallel
        self.optimizer = optimizer

    def _optimizer_state(self):
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        return optimizer.state

    def state_dict(self) -> dict:
        state = self._optimizer_state()
        experts, moments = {}, {}
        for name, module in self.ep.modules.items():
            for param_name in ("gate_up_proj", "down_proj"):
                key = f"{name}.{param_name}"
                param = getattr(module, param_name)
                experts[key] = self.ep.gather(param)
                moments[key] = {
                    k: self.ep.gather(v) if torch.is_tensor(v) and v.shape == param.shape else v
                    for k, v in state.get(param, {}).items()
                }
        return {"expert_parallel_size": self.ep.size, "experts": experts, "optimizer": moments}

    def load_state_dict(self, saved: dict):
        state = self._optimizer_state()
        for name, module in self.ep.modules.items():
            for param_name in ("gate_up_proj", "down_proj"):
                key = f"{name}.{param_name}"
                param = getattr(module, param_name)
                self.ep.assign(param, saved["experts"][key])
                param_state = state.setdefault(param, {})
                for k, v in saved["optimizer"].get(key, {}).items():
                    if torch.is_tensor(v) and v.dim() == param.dim() and v.shape[0] == self.ep.size * param.shape[0]:
                        if k not in param_state:
                            param_state[k] = torch.zeros_like(param)
                        self.ep.assign(param_state[k], v)
                    else:
                        param_state[k] = v


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Squared 2-norm of `grads` over their full (unsharded) extent, as a plain fp32 scalar.

    Computed with `torch.nn.utils.get_total_norm` (per mesh for FSDP2 shards), the function `clip_grad_norm_` uses, so
    the replicated parameters' share is bit-identical to an unsharded run's.
    """
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    groups: dict[int | None, list[torch.Tensor]] = {}
    for grad in grads:
        mesh = getattr(grad, "device_mesh", None)
        groups.setdefault(None if mesh is None else id(mesh), []).append(grad)
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        total = total + norm.float().to(device).pow(2)
    return total
