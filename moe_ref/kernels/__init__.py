"""Kernels: the grouped matmul of the experts (:mod:`~moe_ref.kernels.grouped_mm`) and its Triton backend
(:mod:`~moe_ref.kernels.triton_gmm`, imported only when used)."""

from .grouped_mm import ALL_BACKENDS, BACKENDS, default_backend, grouped_mm

__all__ = ["grouped_mm", "default_backend", "BACKENDS", "ALL_BACKENDS"]
