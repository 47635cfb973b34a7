"""Where a kernel runs: Triton on CUDA tensors, or on CPU tensors through the interpreter (TRITON_INTERPRET=1, the
tests' path); the PyTorch reference everywhere else."""

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor, triton_available: bool, reference_env_var: str) -> bool:
    """Whether a kernel should take the Triton path for `tensor`; setting `reference_env_var=1` forces PyTorch."""
    if not triton_available or os.environ.get(reference_env_var, "0") == "1":
        return False
    return tensor.is_cuda or (interpreting() and tensor.device.type == "cpu")
