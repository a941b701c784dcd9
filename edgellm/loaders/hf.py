"""Hugging Face checkpoint folder: config.json, single or sharded safetensors, tokenizer.json, chat template."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from ..config import ModelConfig
from ..artifact import sha256_of
from . import ModelSource, SourceError, TensorRef


def _safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise SourceError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found pickled {', '.join(pickles)}: convert to safetensors; edgellm never unpickles)" if pickles else ""
        raise SourceError(f"no *.safetensors weights in {folder}{hint}")
    return files


def _lazy(file: Path, name: str):
    def load() -> np.ndarray:
        with safe_open(str(file), framework="numpy") as f:
            return f.get_tensor(name)

    return load


def _read_tensors(files: list[Path]) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                if name in tensors:
                    raise SourceError(f"tensor {name!r} appears in two shards ({file.name} and another)")
                tensors[name] = TensorRef(name, tuple(sl.get_shape()), str(sl.get_dtype()), _lazy(file, name))
    return tensors


def _tokenizer_config(folder: Path) -> dict:
    cfg = {}
    tc = folder / "tokenizer_config.json"
    if tc.exists():
        cfg = json.loads(tc.read_text())
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        cfg["chat_template"] = jinja.read_text()
    for key in ("added_tokens_decoder",):  # large and already inside tokenizer.json
        cfg.pop(key, None)
    gen = folder / "generation_config.json"
    if gen.exists():
        cfg["generation_config"] = json.loads(gen.read_text())
    return cfg


def load_hf(folder: Path) -> ModelSource:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise SourceError(f"{folder} has no config.json; a Hugging Face checkpoint folder needs one")
    raw = json.loads(cfg_path.read_text())
    config = ModelConfig.from_hf(raw)
    gen = folder / "generation_config.json"
    if gen.exists():  # generation_config's eos list is the one chat models stop on
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            config.eos_token_ids = sorted(set(config.eos_token_ids) | set([eos] if isinstance(eos, int) else eos))
    tok = folder / "tokenizer.json"
    if not tok.exists():
        raise SourceError(f"{folder} has no tokenizer.json (the fast-tokenizer file); export it with transformers")
    files = _safetensor_files(folder)
    h = hashlib.sha256()
    for f in [cfg_path, *files]:
        h.update(f"{f.name}:{sha256_of(f)}\n".encode())
    return ModelSource(
        kind="hf",
        path=folder,
        config=config,
        tensors=_read_tensors(files),
        tokenizer_json=tok.read_text(),
        tokenizer_config=_tokenizer_config(folder),
        sha256=h.hexdigest(),
    )
