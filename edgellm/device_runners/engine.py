"""Engine: load an artifact with the TVM runtime only, keep a paged KV cache, stream text.

Nothing here imports the TVM compiler; the artifact's manifest says everything (function names, shapes, tokenizer),
so a device that has only libtvm_runtime runs it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifact import Artifact, ArtifactError
from .host import host_info
from .sampling import Sampler, SamplingParams
from .text import StopMatcher, StreamDecoder, TextCodec


class PromptError(ValueError):
    """A prompt the engine cannot run (empty, or longer than the context window)."""


class PromptTooLongError(PromptError):
    pass


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes from prefill's logits; decode steps = generated - 1
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def _check_runnable_here(manifest: dict) -> None:
    """Refuse, with the fix, an artifact whose host code is for another CPU or that ships objects, not a library."""
    import platform

    t = manifest["target"]
    if manifest["lib"].endswith(".tar"):
        raise ArtifactError(f"artifact for {t['preset']} holds object files for static linking into an app "
                            "(see `edgellm package` and docs/targets.md); it cannot be loaded by this runner")
    triple = (t.get("host_triple") or "").split("-")[0]
    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    if triple and triple not in (here, "arm64" if here == "aarch64" else here):
        hint = " or here with `--emulate` (qemu)" if triple == "aarch64" and t.get("device") == "cpu" else ""
        raise ArtifactError(f"artifact was built for {triple} ({t['preset']}) and this machine is {here}; run it on "
                            f"the device{hint}")


def _token_limit(manifest: dict, index: list[dict]) -> int:
    """Token ids a client may send are [0, this): the smallest of the config's vocab_size and the rows of the
    embedding and output-head tensors actually stored (the params index), so an edited manifest cannot widen it."""
    rows = [int(e["shape"][0]) for e in index
            if e.get("shape") and any(k in e["name"] for k in ("embed_tokens.", "lm_head."))]
    vocab = int(manifest["model"]["config"]["vocab_size"])
    return max(0, min([vocab, *rows]))


class Sequence:
    def __init__(self, engine: Engine, seq_id: int):
        self.engine, self.id, self.length = engine, seq_id, 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Append `ids` (chunked); logits of the last one, float32 [vocab]."""
        self.engine._check_length(self.length + len(ids))
        out = self.engine._prefill(self.id, ids)
        self.length += len(ids)
        return out.reshape(-1)

    def decode(self, token: int) -> np.ndarray:
        self.engine._check_length(self.length + 1)
        out = self.engine._forward("decode", self.id, [token])
        self.length += 1
        return out.reshape(-1)

    def decode_greedy(self, token: int) -> int:
        """Append `token`; return the most likely next one. Where the artifact has `argmax` (CUDA builds) it runs
        on the device and 4 bytes come back instead of the logits."""
        self.engine._check_length(self.length + 1)
        out = self.engine._run("decode", self.id, [token])
        self.length += 1
        return self.engine._greedy(out)


class _DeviceToken:
    """The last token the device argmax produced, kept on the device: the next greedy step feeds it to `decode`
    as is, with no host-to-device copy."""

    def __init__(self):
        self.value: int | None = None
        self.tensor = None


class Engine:
    def __init__(self, artifact: str | Path, device: str | None = None, threads: int | None = None, verify: bool = True,
                 random_weights: int | None = None, expect_digest: str | None = None):
        """random_weights=SEED: generate parameters from the index's shapes instead of reading the shards (for
        benchmarking models too big to ship to a device; outputs are meaningless). Never the default.
        expect_digest: refuse the artifact unless its root digest (printed by compile and run) starts with this."""
        self.art = Artifact.open(artifact, verify=verify, skip_params=random_weights is not None,
                                 expect_digest=expect_digest)
        m = self.art.manifest
        if m.get("shapes_only") and random_weights is None:
            raise ArtifactError(f"{artifact} was compiled with shapes only (no weights, for benchmarks); run it with "
                                "random weights (Engine(random_weights=SEED)) or compile it from a checkpoint")
        _check_runnable_here(m)
        from ..runtime.devices import open_device  # --device KIND[:N] (vulkan:N is TVM's webgpu:N)

        # loads what the device needs before the module: the CUDA runtime, or the WebGPU plugin (checks the adapter)
        self.device_info = open_device(device, m, self.art.param_index())
        dev_kind = self.device_info.kind
        from .. import _tvm

        self._tvm = _tvm
        self.threads = 0  # CPU threads of TVM's pool (0: not a CPU artifact)
        if dev_kind == "cpu":
            self.threads = _tvm.set_cpu_threads(threads or host_info().physical_cores)
        self.dev = _tvm.device(dev_kind, self.device_info.index)
        self.vm = _tvm.vm(_tvm.load_module(self.art.lib_path), self.dev)
        source = self.art.iter_params() if random_weights is None else self.art.random_params(random_weights)
        self.params = _tvm.array([_tvm.tensor(np.ascontiguousarray(a), self.dev) for _, a in source])
        self.runtime = m["runtime"]
        self.context_window = int(self.runtime["context_window"])
        self.chunk = int(self.runtime["prefill_chunk"])
        tok = m["tokenizer"]
        self.codec = TextCodec(None, add_bos=tok.get("add_bos_token", False), bos_id=tok.get("bos_token_id"),
                               files=(self.art.path("tokenizer/tokenizer.json"),
                                      self.art.listed("tokenizer/tokenizer_config.json")))
        self.eos_ids = set(tok.get("eos_token_ids") or [])
        self.vocab_size = _token_limit(m, self.art.param_index())
        g = _tvm.get_global_func
        self._add_seq = g("vm.builtin.kv_state_add_sequence")
        self._remove_seq = g("vm.builtin.kv_state_remove_sequence")
        self._begin = g("vm.builtin.kv_state_begin_forward")
        self._end = g("vm.builtin.kv_state_end_forward")
        # the cache copies a forward's page tables to the device at its first attention call; asking for the query
        # positions right after begin_forward does it before the forward's first kernel (on an H100, layer 0 had
        # waited ~25 us mid-step for that copy and the stream event behind it)
        self._sync_aux = g("vm.builtin.attention_kv_cache_get_query_positions")
        S = _tvm.ShapeTuple
        self.kv = self.vm["create_tir_paged_kv_cache"](
            S([int(self.runtime["max_batch"])]), S([self.context_window * int(self.runtime["max_batch"])]),
            S([self.chunk]), S([int(self.runtime["page_size"])]), S([0]))
        self._next_seq = 0
        self.last_stats = GenerationStats()
        # decode's one input token goes through one device buffer: a fresh tensor per step cost a cudaMalloc, a
        # cudaMemGetInfo and a cudaFree per token (40-130 us of host time on an H100 machine)
        self._decode_ids = _tvm.tensor(np.zeros((1, 1), np.int32), self.dev)
        self._argmax = self.vm["argmax"] if "argmax" in m.get("functions", []) else None
        self._fns: dict[str, object] = {}  # VM function handles, looked up once (a lookup per token is host time)
        self._last_token = _DeviceToken()
        self._shapes: dict[tuple[int, int], tuple] = {}

    # ---- low level --------------------------------------------------------------------------------------------
    def _run(self, fn: str, seq: int, ids: list[int]):
        """One forward of `fn` over `ids` for sequence `seq`; the output tensor stays on the device."""
        S = self._tvm.ShapeTuple
        if fn == "decode" and ids[0] == self._last_token.value:  # the device argmax's output: already there
            arr = self._last_token.tensor
        elif fn == "decode":
            arr = self._decode_ids
            arr.copyfrom(np.asarray(ids, dtype=np.int32).reshape(1, 1))
        else:
            arr = self._tvm.tensor(np.asarray(ids, dtype=np.int32).reshape(1, -1), self.dev)
        key = (seq, len(ids))  # ShapeTuples made once (about 2 us each per call on a CPU of this machine's class)
        shapes = self._shapes.get(key)
        if shapes is None:
            shapes = self._shapes[key] = (S([seq]), S([len(ids)]))
        self._begin(self.kv, *shapes)
        self._sync_aux(self.kv)
        f = self._fns.get(fn)
        if f is None:
            f = self._fns[fn] = self.vm[fn]
        out = f(arr, self.kv, self.params)
        self._end(self.kv)
        return out[0]

    def _forward(self, fn: str, seq: int, ids: list[int]) -> np.ndarray:
        return self._run(fn, seq, ids).numpy()

    def _greedy(self, logits) -> int:
        """argmax of a [1, 1, vocab] device tensor: on the device where the artifact has `argmax`."""
        if self._argmax is not None:
            tok = self._argmax(logits)
            self._last_token.value, self._last_token.tensor = int(tok.numpy()[0, 0]), tok
            return self._last_token.value
        return int(np.argmax(logits.numpy().reshape(-1)))

    def _prefill(self, seq: int, ids: list[int], fn: str = "prefill") -> np.ndarray:
        outs = [self._forward(fn, seq, ids[i : i + self.chunk]) for i in range(0, len(ids), self.chunk)]
        return outs[-1] if fn == "prefill" else np.concatenate(outs, axis=1)

    def _new_sequence(self) -> int:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        self._add_seq(self.kv, seq)
        return seq

    def _release_sequence(self, seq: int) -> None:
        """Free `seq`'s KV pages and forget its cached ShapeTuples (sequence ids are never reused)."""
        try:
            self._remove_seq(self.kv, seq)
        finally:
            for key in [k for k in self._shapes if k[0] == seq]:
                del self._shapes[key]

    @contextlib.contextmanager
    def sequence(self) -> Iterator[Sequence]:
        """A KV-cache sequence for step-by-step use: `seq.prefill(ids)`, then `seq.decode(token)`."""
        seq = self._new_sequence()
        try:
            yield Sequence(self, seq)
        finally:
            self._release_sequence(seq)

    def _check_length(self, n: int, room: int = 1) -> None:
        """n tokens in the cache plus `room` more (1 to generate the next one) must fit the context window."""
        if n <= 0:
            raise PromptError("the prompt is empty after tokenization; give at least one token of text")
        if n + room > self.context_window:
            raise PromptTooLongError(
                f"prompt has {n} tokens but the artifact's context window is {self.context_window}"
                + (" (and one more is needed to generate)" if room else "")
                + "; shorten the prompt or recompile with --context-window"
            )

    def warmup(self) -> None:
        """One prefill and one greedy decode step on a throwaway sequence: the first calls pay for the thread pool's
        start and first touches of memory, which would otherwise land in the first request's figures."""
        with self.sequence() as seq:
            seq.prefill([0])
            seq.decode_greedy(0)

    def score(self, ids: list[int]) -> np.ndarray:
        """Logits [n, vocab] for every position of `ids` (teacher forcing), float32."""
        self._check_length(len(ids), room=0)
        with self.sequence() as seq:
            return self._prefill(seq.id, ids, "prefill_logits")[0]

    # ---- text API ---------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[dict], chat: bool = True) -> list[int]:
        if isinstance(prompt, list):
            return self.codec.encode(self.codec.apply_chat_template(prompt), add_bos=False)
        if chat:
            return self.codec.encode(self.codec.apply_chat_template([{"role": "user", "content": prompt}]), add_bos=False)
        return self.codec.encode(prompt)

    def generate_ids(self, ids: list[int], max_new_tokens: int, sampling: SamplingParams | None = None) -> Iterator[int]:
        """Yield generated token ids; stats land in `self.last_stats` when the iterator finishes or is closed."""
        sampling = sampling or SamplingParams()
        self._check_length(len(ids))
        stats = self.last_stats = GenerationStats(prompt_tokens=len(ids))
        if max_new_tokens <= 0:  # nothing asked for: not even the prefill runs
            stats.finish_reason = "length"
            return
        sampler, history = Sampler(sampling), list(ids)
        with self.sequence() as seq:
            t0 = time.perf_counter()
            logits = seq.prefill(ids)
            stats.prefill_seconds = time.perf_counter() - t0
            decode_t = 0.0
            tok = sampler(logits, history)
            while True:
                if tok in self.eos_ids:
                    stats.finish_reason = "stop"
                    return
                history.append(tok)
                stats.token_ids.append(tok)
                stats.generated_tokens += 1
                yield tok
                if stats.generated_tokens >= max_new_tokens:
                    stats.finish_reason = "length"
                    return
                if len(history) >= self.context_window:
                    stats.finish_reason = "context"
                    return
                t1 = time.perf_counter()
                if sampling.greedy:  # no logits on the host: the argmax runs on the device where it can
                    tok = seq.decode_greedy(tok)
                    decode_t += time.perf_counter() - t1
                else:
                    logits = seq.decode(tok)
                    decode_t += time.perf_counter() - t1
                    tok = sampler(logits, history)
                stats.decode_seconds = decode_t

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                 chat: bool = True) -> Iterator[str]:
        """Stream text pieces as tokens decode; stop on EOS, a stop string, max_new_tokens or the context end."""
        sampling = sampling or SamplingParams()
        ids = self.prompt_ids(prompt, chat)
        detok, stops = StreamDecoder(self.codec), StopMatcher(sampling.stop)
        gen = self.generate_ids(ids, max_new_tokens, sampling)
        try:
            for tok in gen:
                piece = stops.feed(detok.push(tok))
                if piece:
                    yield piece
                if stops.stopped:
                    break
            tail = stops.feed(detok.flush()) if not stops.stopped else ""
            tail += stops.flush()
            if tail:
                yield tail
        finally:
            gen.close()
            if stops.stopped:
                self.last_stats.finish_reason = "stop"
