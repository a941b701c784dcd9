"""Quantization: the scheme table, the numpy reference and the TIR kernels that decode packed weights."""

from .schemes import SCHEMES, QuantScheme, get_scheme

__all__ = ["SCHEMES", "QuantScheme", "get_scheme"]
