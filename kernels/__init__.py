"""Triton kernels for modeling_moe; each with a pure PyTorch reference."""
