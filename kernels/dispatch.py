"""Where a kernel runs: Triton on CUDA tensors, or on CPU tensors through the interpreter (TRITON_INTERPRET=1, the
tests' path); the PyTorch reference everywhere else."""

import functools
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor, triton_available: bool, reference_env_var: str) -> bool:
    """Whether a kernel should take the Triton path for `tensor`; setting `reference_env_var=1` forces PyTorch."""
    if not triton_available or os.environ.get(reference_env_var, "0") == "1":
        return False
    return tensor.is_cuda or (interpreting() and tensor.device.type == "cpu")


@functools.cache
def cuda_properties(device: torch.device):
    """torch.cuda.get_device_properties(device), looked up once: the launchers ask on every call."""
    return torch.cuda.get_device_properties(device)


def is_sm90(device: torch.device) -> bool:
    """Whether `device` is a Hopper GPU (H100 / H200), where the Gluon kernels run."""
    properties = cuda_properties(device)
    return (properties.major, properties.minor) == (9, 0)


class Choice:
    """A setting among fixed names: the first is the default, an environment variable overrides it, and a value set
    in code overrides both (None: follow the environment again). Read when a kernel runs."""

    def __init__(self, env_var: str, names: tuple, what: str):
        self.env_var, self.names, self.what, self.override = env_var, names, what, None

    def set(self, name: str | None):
        if name is not None and name not in self.names:
            raise ValueError(f"{self.what} {name!r} is not one of {self.names}")
        self.override = name

    def get(self) -> str:
        name = self.override or os.environ.get(self.env_var, self.names[0])
        if name not in self.names:
            raise ValueError(f"{self.env_var}={name!r} is not one of {self.names}")
        return name
