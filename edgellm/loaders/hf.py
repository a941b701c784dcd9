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
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SourceError(f"{index} has no weight_map of tensor name -> shard file; fix or replace it")
        if any(Path(f).name != f for f in weight_map.values()):
            raise SourceError(f"{index} names shard files outside {folder}; shards must sit beside it")
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
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in tensors:
                        raise SourceError(f"tensor {name!r} appears in two shards ({file.name} and another)")
                    tensors[name] = TensorRef(name, tuple(sl.get_shape()), str(sl.get_dtype()), _lazy(file, name))
        except SourceError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError (not exported) or OSError
            raise SourceError(f"{file} is not a readable safetensors file ({exc}); re-export or re-download it") from None
    return tensors


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"{path} is not valid JSON ({exc}); fix or replace it") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} holds a JSON {type(data).__name__}, not an object; fix or replace it")
    return data


def _tokenizer_config(folder: Path) -> dict:
    cfg = {}
    tc = folder / "tokenizer_config.json"
    if tc.exists():
        cfg = _read_json(tc)
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        cfg["chat_template"] = _read_text(jinja)
    for key in ("added_tokens_decoder",):  # large and already inside tokenizer.json
        cfg.pop(key, None)
    gen = folder / "generation_config.json"
    if gen.exists():
        cfg["generation_config"] = _read_json(gen)
    return cfg


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{path} is not UTF-8 text; replace it with the model's own file") from None


def load_hf(folder: Path) -> ModelSource:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise SourceError(f"{folder} has no config.json; a Hugging Face checkpoint folder needs one")
    raw = _read_json(cfg_path)
    config = ModelConfig.from_hf(raw)
    gen = folder / "generation_config.json"
    if gen.exists():  # generation_config's eos list is the one chat models stop on
        eos = _read_json(gen).get("eos_token_id")
        if eos is not None:
            config.eos_token_ids = sorted(set(config.eos_token_ids) | set([eos] if isinstance(eos, int) else eos))
    tok = folder / "tokenizer.json"
    if not tok.exists():
        raise SourceError(f"{folder} has no tokenizer.json (the fast-tokenizer file); export it with transformers")
    files = _safetensor_files(folder)
    tensors = _read_tensors(files)
    from ..quant.gptq_awq import read_format, wrap_tensors

    fmt = read_format(raw, folder)  # GPTQ / AWQ: packed linears exposed as X.weight with their exact values
    if fmt is not None:
        tensors = wrap_tensors(tensors, fmt)
    h = hashlib.sha256()
    for f in [cfg_path, *files]:
        h.update(f"{f.name}:{sha256_of(f)}\n".encode())
    return ModelSource(
        kind="hf",
        path=folder,
        config=config,
        tensors=tensors,
        tokenizer_json=_read_text(tok),
        tokenizer_config=_tokenizer_config(folder),
        sha256=h.hexdigest(),
    )
