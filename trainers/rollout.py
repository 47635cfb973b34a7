"""Rollouts of a LoRA policy through a merged copy of it, so that they can run as CUDA graphs.

PEFT applies LoRA on the routed experts (`target_parameters`) by parametrizing the stacked expert weights for the time
of every forward: the storage of those parameters is swapped during the call and the compiled graph breaks at every
layer, so a decode step captured in CUDA graphs would read stale memory. RL trainers that generate with a separate
inference engine (TRL with vLLM) sync merged weights into it instead; `MergedRolloutModel` does the same within the
process: a plain copy of the base model whose weights are base + LoRA delta, refreshed in place (same storage, so
captured graphs stay valid) before the first generation after each optimizer step. It costs one more copy of the
weights in memory.

    rollout = MergedRolloutModel(peft_model)
    rollout.attach(trainer)   # peft_model.generate now generates with the copy; trainer steps mark it stale
"""

from __future__ import annotations

import copy
import logging
import re

import torch
from transformers import TrainerCallback

logger = logging.getLogger("modeling_moe.trainers.rollout")

PEFT_PREFIX = "base_model.model."
# PEFT's `modules_to_save` (`--lora_modules_to_save`): a trained copy per adapter beside the frozen original.
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.([^.]+)\.")


def plain_name(peft_name: str) -> str:
    """A PEFT-wrapped model's parameter or module name -> the base model's own name."""
    name = peft_name[len(PEFT_PREFIX):] if peft_name.startswith(PEFT_PREFIX) else peft_name
    return name.replace(".base_layer", "")


def lora_targets(peft_model) -> dict[str, list]:
    """Base-model tensor name -> the LoRA layers that add a delta to it (active, unmerged adapters)."""
    from peft.tuners.lora import LoraLayer

    targets = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
            weight = f"{plain_name(name)}.{getattr(module, 'parameter_name', 'weight')}"
            targets.setdefault(weight, []).append(module)
    return targets


class MergedRolloutModel(TrainerCallback):
    """A plain (PEFT-free) copy of `peft_model`'s base model holding the merged weights, used for generation."""

    def __init__(self, peft_model):
        self.peft_model = peft_model
        base = peft_model.get_base_model()
        self.sources = {}
        for name, tensor in base.state_dict(keep_vars=True).items():
            if ".lora_" in name or ".original_module." in name:
                continue
            saved = _MODULES_TO_SAVE.search(name)
            if saved:  # the active adapter's trained copy stands for the module
                if saved.group(1) != peft_model.active_adapter:
                    continue
                name = name.replace(saved.group(0), ".")
            self.sources[plain_name(name)] = tensor
        self.targets = lora_targets(peft_model)
        with torch.device(base.device):
            self.model = type(base)._from_config(copy.deepcopy(base.config), dtype=base.dtype)
        self.model.generation_config = copy.deepcopy(base.generation_config)
        self.model.requires_grad_(False).eval()
        own = self.model.state_dict(keep_vars=True)
        missing = sorted(set(own) - set(self.sources))
        if missing:
            raise ValueError(f"the rollout copy has tensors the policy lacks: {missing[:5]}")
        self.tensors = {name: own[name] for name in self.sources}
        self.stale = True
        self.original_generate = None

    @torch.no_grad()
    def sync(self):
        """Copy base + LoRA delta into the copy's tensors, in place (computed in fp32, stored in their dtype)."""
        for name, target in self.tensors.items():
            value = self.sources[name].detach()
            layers = self.targets.get(name)
            if layers:
                value = value.float()
                for layer in layers:
                    for adapter in layer.active_adapters:
                        if adapter in layer.lora_A:
                            value = value + layer.get_delta_weight(adapter).float()
            target.copy_(value)
        self.stale = False

    def generate(self, *args, **kwargs):
        """`peft_model.generate`, run by the merged copy (synced first when the policy changed)."""
        if self.stale:
            self.sync()
        return self.model.generate(*args, **kwargs)

    def attach(self, trainer):
        """Route `trainer`'s generations through the copy and mark it stale after every optimizer step."""
        self.original_generate = self.peft_model.generate
        self.peft_model.generate = self.generate
        trainer.add_callback(self)
        extra = sum(t.numel() * t.element_size() for t in self.tensors.values())
        logger.info("rollouts through a merged copy of the policy (%.2f GB more), synced after each optimizer step",
                    extra / 1e9)
        return self

    def on_step_end(self, args, state, control, **kwargs):
        self.stale = True


__all__ = ["MergedRolloutModel", "lora_targets", "plain_name"]
