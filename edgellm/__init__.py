"""edgellm: compile LLMs for edge devices with Apache TVM Relax (INT4-packed weights, paged KV cache)."""

__version__ = "0.1.0"
