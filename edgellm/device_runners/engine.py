"""Engine: load an artifact with the TVM runtime only, keep a paged KV cache, stream text.

Nothing here imports the TVM compiler; the artifact's manifest says everything (function names, shapes, tokenizer),
so a device that has only libtvm_runtime runs it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from ..artifact import Artifact, ArtifactError, Manifest
from .host import host_info
from .kv_pages import EXTRA_PAGES, GRAPH_BATCH_BOUND
from .sampling import Sampler, SamplingParams
from .text import StopMatcher, StreamDecoder, TextCodec

log = logging.getLogger("edgellm.engine")
_NEVER = 1 << 30  # a batch_min no batch reaches


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
    finish_reason: FinishReason | str = ""  # "" until the generation ends
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes from prefill's logits; decode steps = generated - 1
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def _check_runnable_here(m: Manifest) -> None:
    """Refuse, with the fix, an artifact whose host code is for another CPU or that ships objects, not a library."""
    import platform

    if m.lib.endswith(".tar"):
        raise ArtifactError(f"artifact for {m.preset} holds object files for static linking into an app "
                            "(see `edgellm package` and docs/targets.md); it cannot be loaded by this runner")
    triple = (m.host_triple or "").split("-")[0]
    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    if triple and triple not in (here, "arm64" if here == "aarch64" else here):
        hint = " or here with `--emulate` (qemu)" if triple == "aarch64" and m.device == "cpu" else ""
        raise ArtifactError(f"artifact was built for {triple} ({m.preset}) and this machine is {here}; run it on "
                            f"the device{hint}")


def _token_limit(m: Manifest, index: list[dict]) -> int:
    """Token ids a client may send are [0, this): the smallest of the config's vocab_size and the rows of the
    embedding and output-head tensors actually stored (the params index), so an edited manifest cannot widen it."""
    rows = [int(e["shape"][0]) for e in index
            if e.get("shape") and any(k in e["name"] for k in ("embed_tokens.", "lm_head."))]
    vocab = int(m.config.get("vocab_size", 0))
    return max(0, min([vocab, *rows]))


class FinishReason(str, Enum):
    """Why a generation ended: one vocabulary for `Engine.generate_ids`, the batch scheduler, `edgellm run` and the
    server's metrics (the OpenAI formatting maps it onto OpenAI's names). Members are strings ("stop" == STOP)."""

    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_new_tokens / max_tokens reached
    CONTEXT = "context"  # the context window is full: no further token can be fed
    CANCELLED = "cancelled"  # the caller went away (or the server stopped)
    ERROR = "error"  # the request failed on the engine

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__


FINISH_REASONS: tuple[FinishReason, ...] = tuple(FinishReason)


def host_argmax(logits: np.ndarray) -> int:
    """The greedy token of host logits: numpy's argmax (the first of equal maxima), a NaN never chosen (as the
    Sampler and the device argmax treat it)."""
    flat = logits.reshape(-1)
    i = int(np.argmax(flat))
    if np.isnan(flat[i]):  # argmax returns the first NaN when there is one
        i = int(np.argmax(np.where(np.isnan(flat), -np.inf, flat)))
    return i


class Sequence:
    """One KV-cache sequence of an Engine, for step-by-step use (a thin view over the Engine's step API)."""

    def __init__(self, engine: Engine, seq_id: int):
        self.engine, self.id = engine, seq_id

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return self.engine.sequence_length(self.id)

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Append `ids` (chunked); logits of the last one, float32 [vocab]."""
        return self.engine.prefill(self.id, ids)

    def decode(self, token: int) -> np.ndarray:
        """Append `token`; logits of the next one, float32 [vocab]."""
        return self.engine.decode([self.id], [token])[0]

    def decode_greedy(self, token: int) -> int:
        """Append `token`; return the most likely next one (on the device where the artifact has `argmax`)."""
        return self.engine.decode_greedy([self.id], [token])[0]

    def greedy_chain(self, token: int, n: int) -> Iterator[int]:
        """Append `token`, then yield the next n greedy tokens (Engine.greedy_chain)."""
        return self.engine.greedy_chain(self.id, token, n)


class _DeviceTokens:
    """The last tokens the device argmax produced, kept on the device ([b, 1] int32): the next greedy step feeds
    them to `decode`/`batch_decode` as they are, with no host-to-device copy."""

    def __init__(self):
        self.values: tuple[int, ...] = ()
        self.tensor = None


class Engine:
    def __init__(self, artifact: str | Path, device: str | None = None, threads: int | None = None, verify: bool = True,
                 random_weights: int | None = None, expect_digest: str | None = None):
        """random_weights=SEED: generate parameters from the index's shapes instead of reading the shards (for
        benchmarking models too big to ship to a device; outputs are meaningless). Never the default.
        expect_digest: refuse the artifact unless its root digest (printed by compile and run) starts with this."""
        self.art = Artifact.open(artifact, verify=verify, skip_params=random_weights is not None,
                                 expect_digest=expect_digest)
        m = self.info = self.art.info  # the typed manifest
        if m.shapes_only and random_weights is None:
            raise ArtifactError(f"{artifact} was compiled with shapes only (no weights, for benchmarks); run it with "
                                "random weights (Engine(random_weights=SEED)) or compile it from a checkpoint")
        _check_runnable_here(m)
        from ..runtime.devices import open_device  # --device KIND[:N] (vulkan:N is TVM's webgpu:N)

        # loads what the device needs before the module: the CUDA runtime, or the WebGPU plugin (checks the adapter)
        self.device_info = open_device(device, self.art.manifest, self.art.param_index())
        dev_kind = self.device_info.kind
        from .. import _tvm

        self._tvm = _tvm
        self.threads = 0  # CPU threads of TVM's pool (0: not a CPU artifact)
        if dev_kind == "cpu":
            self.threads = _tvm.set_cpu_threads(threads or host_info().physical_cores)
        self.dev = _tvm.device(dev_kind, self.device_info.index)
        # a twin library where the adapter runs it (--opt webgpu_subgroups=auto), else the artifact's own
        lib, lanes = self.art.lib_for_subgroups(int(self.device_info.details.get("subgroup_lanes") or 0))
        if lanes:
            self.device_info.details["kernel_subgroup_lanes"] = lanes
        self.lib = lib  # the library loaded, relative to the artifact
        self.vm = _tvm.vm(_tvm.load_module(self.art.path(lib)), self.dev)
        source = self.art.iter_params() if random_weights is None else self.art.random_params(random_weights)
        self.params = _tvm.array([_tvm.tensor(np.ascontiguousarray(a), self.dev) for _, a in source])
        self.runtime = m.runtime  # RuntimeShape: context_window, prefill_chunk, page_size, max_batch
        self.context_window = m.runtime.context_window
        self.chunk = m.runtime.prefill_chunk
        self.codec = TextCodec.of_artifact(self.art)
        self.eos_ids = set(m.eos_token_ids)
        self.vocab_size = _token_limit(m, self.art.param_index())
        g = _tvm.get_global_func
        functions = m.functions
        # edgellm's own paged KV cache (CUDA, --opt cuda_kv=owned): the cache is tensors the functions take, and
        # decode is one CUDA graph (kernels/owned_kv.py); otherwise TVM's PagedKVCache object
        self.owned_kv = "create_tir_paged_kv_cache" not in functions
        if self.owned_kv:
            self._init_owned_kv(m)
        else:
            self._add_seq = g("vm.builtin.kv_state_add_sequence")
            self._remove_seq = g("vm.builtin.kv_state_remove_sequence")
            self._begin = g("vm.builtin.kv_state_begin_forward")
            self._end = g("vm.builtin.kv_state_end_forward")
            # the cache copies a forward's page tables to the device at its first attention call; asking for the
            # query positions right after begin_forward does it before the forward's first kernel (on an H100,
            # layer 0 had waited ~25 us mid-step for that copy and the stream event behind it)
            self._sync_aux = g("vm.builtin.attention_kv_cache_get_query_positions")
            S = _tvm.ShapeTuple
            self.kv = self.vm["create_tir_paged_kv_cache"](
                S([m.runtime.max_batch]), S([self.context_window * m.runtime.max_batch]),
                S([self.chunk]), S([m.runtime.page_size]), S([0]))
        self._next_seq = 0
        self._lengths: dict[int, int] = {}  # live sequence -> tokens in its cache
        self.last_stats = GenerationStats()
        self.has_batch_decode = "batch_decode" in functions
        self.has_device_argmax = "argmax" in functions
        # the owned cache's greedy step with the argmax in its graph, advancing its own ids and position
        # (models/llama.py decode_greedy); greedy_chain takes it unless decode_in_graph is False (an A/B knob)
        self.has_decode_greedy = "decode_greedy" in functions
        self.decode_in_graph = True
        # the rule `decode` follows when not told: one `batch_decode` call for this many sequences or more, below it
        # the static-shape `decode` per sequence (its GEMV kernels beat the dynamic batch GEMM at small b on CPU);
        # `calibrate_batch_min` measures the crossover
        self.batch_min = 2 if self.has_batch_decode else _NEVER
        # input ids go through device buffers kept per batch size: a fresh tensor per step cost a cudaMalloc, a
        # cudaMemGetInfo and a cudaFree per token (40-130 us of host time on an H100 machine)
        self._ids_bufs: dict[int, object] = {}
        self._argmax = self.vm["argmax"] if self.has_device_argmax else None
        self._fns: dict[str, object] = {}  # VM function handles, looked up once (a lookup per token is host time)
        self._last_tokens = _DeviceTokens()
        # greedy_chain keeps one decode step queued ahead of the host where it can (owned CUDA cache + device
        # argmax); False runs it step by step (an A/B knob for benchmarks)
        self.decode_ahead = True
        self._ahead = None  # (CudaAsync, pinned buffers, events), made on first use
        self._reads = None  # the WebGPU plugin's (read_begin, read_end), looked up on first use
        self._shapes: dict[tuple[tuple[int, ...], int], tuple] = {}  # ShapeTuples per (sequences, tokens each)
        if not self.owned_kv:
            self._free_pages_fn = g("vm.builtin.attention_kv_cache_get_num_available_pages")
        self.total_pages = self.free_pages()  # nothing is cached yet

    def _init_owned_kv(self, m: Manifest) -> None:
        """The owned cache's page tensor [L, pages + scratch + control, 2, KV, 16, D] on the device and its host
        bookkeeping (device_runners/kv_pages.py): max_batch sequences of a full context window, as TVM's cache is
        sized."""
        from .kv_pages import PagePool, control_page

        cfg = m.config
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        self._max_pages = -(-self.context_window // 16)
        self._pool = PagePool(self._max_pages * m.runtime.max_batch, self._max_pages)
        kv_heads = int(cfg["num_key_value_heads"])
        shape = (int(cfg["num_hidden_layers"]), self._pool.total + EXTRA_PAGES, 2, kv_heads, 16, head_dim)
        self.kv = self._tvm.runtime.empty(shape, "float16", self.dev)
        control = control_page(self._tvm, self.kv)  # starts at zero: words the decode kernels count blocks with
        control.copyfrom(np.zeros(control.shape, np.int32))
        # per batch size: device buffers for the ids [b, 1], positions [b] and page table [b, max_pages]. A captured
        # decode graph replays on the addresses it saw, so these same buffers go to every call. (Three buffers,
        # not views of one: TVM hands a view to kernels with a byte_offset, which they refuse.)
        self._aux: dict[int, list] = {}

    def _aux_for(self, b: int) -> list:
        aux = self._aux.get(b)
        if aux is None:
            host = [np.zeros((b, 1), np.int32), np.zeros(b, np.int32), np.zeros((b, self._max_pages), np.int32)]
            aux = self._aux[b] = [host, [self._tvm.tensor(h, self.dev) for h in host], None]
        return aux

    # ---- the context-window rule ------------------------------------------------------------------------------
    def fits(self, n_tokens: int, room: int = 1) -> bool:
        """The context-window rule, the one place it is written: a sequence whose cache holds `n_tokens` tokens
        (at least one) leaves `room` more places free (1: the next token can still be fed). A prompt of n tokens
        can run iff fits(n); generation goes on while fits(len(prompt + generated)); scoring uses room=0."""
        return n_tokens > 0 and n_tokens + room <= self.context_window

    def check_prompt(self, n_tokens: int, room: int = 1) -> None:
        """Raise PromptError (empty) or PromptTooLongError (the numbers and the fix) unless fits(n_tokens, room)."""
        if n_tokens <= 0:
            raise PromptError("the prompt is empty after tokenization; give at least one token of text")
        if not self.fits(n_tokens, room):
            raise PromptTooLongError(
                f"prompt has {n_tokens} tokens but the artifact's context window is {self.context_window}"
                + (" (and one more is needed to generate)" if room else "")
                + "; shorten the prompt or recompile with --context-window"
            )

    def check_ids(self, ids) -> None:
        """Raise ValueError naming the first id that is not an integer in [0, vocab_size): the kernels index the
        embedding with it unchecked (on a GPU, a read outside the table)."""
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t!r} is not in this model's vocabulary [0, {self.vocab_size}); pass ids "
                                 "the artifact's tokenizer produced")

    def max_new_tokens(self, n_prompt: int) -> int:
        """The most tokens a prompt of `n_prompt` tokens can generate before the context window is full (the last
        one generated is never fed, so it needs no place in the cache)."""
        return max(self.context_window - n_prompt, 0)

    # ---- step API: sequences in the paged KV cache, forwarded by one chunk or one token ------------------------
    def add_sequence(self) -> int:
        """A new, empty sequence in the KV cache; returns its id (ids are never reused). Free it with
        `remove_sequence` (or use `with engine.sequence()`)."""
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        if self.owned_kv:
            self._pool.add(seq)
        else:
            self._add_seq(self.kv, seq)
        self._lengths[seq] = 0
        return seq

    def remove_sequence(self, seq: int) -> None:
        """Free `seq`'s KV pages and forget its cached ShapeTuples."""
        try:
            if self.owned_kv:
                self._pool.remove(seq)
            else:
                self._remove_seq(self.kv, seq)
        finally:
            self._lengths.pop(seq, None)
            for key in [k for k in self._shapes if seq in k[0]]:
                del self._shapes[key]

    def sequence_length(self, seq: int) -> int:
        """Tokens in `seq`'s cache."""
        try:
            return self._lengths[seq]
        except KeyError:
            raise ValueError(f"sequence {seq} is not in the KV cache (add_sequence() makes one; removed ones are "
                             "gone)") from None

    def free_pages(self) -> int:
        """KV-cache pages no sequence holds."""
        if self.owned_kv:
            return self._pool.free
        return int(self._free_pages_fn(self.kv))

    def pages_in_use(self) -> int:
        return self.total_pages - self.free_pages()

    def prefill(self, seq: int, ids: list[int]) -> np.ndarray:
        """Append `ids` to `seq` in chunks of the artifact's prefill_chunk (a caller interleaving prefill with
        decode passes one chunk at a time); logits after the last one, float32 [vocab]."""
        n = self.sequence_length(seq) + len(ids)
        self.check_prompt(n)
        self.check_ids(ids)
        out = None
        for i in range(0, len(ids), self.chunk):
            out = self._forward("prefill", [seq], ids[i : i + self.chunk])
            self._lengths[seq] += len(ids[i : i + self.chunk])
        return out.numpy().reshape(-1)

    def decode(self, seqs: list[int], tokens: list[int], batched: bool | None = None) -> np.ndarray:
        """Append tokens[i] to seqs[i], one token each; logits of every sequence's next token, float32 [b, vocab].
        batched: True runs one `batch_decode` call, False the static-shape `decode` per sequence, None follows
        `self.batch_min` (batched once b >= batch_min)."""
        return np.concatenate([out.numpy().reshape(len(s), -1) for s, out in self._decode(seqs, tokens, batched)])

    def decode_greedy(self, seqs: list[int], tokens: list[int], batched: bool | None = None) -> list[int]:
        """As `decode`, but return each sequence's most likely next token. Where the artifact has `argmax` (CUDA
        builds) it runs on the device: 4 bytes a sequence come back instead of the logits, and the next step feeds
        the ids from the device as they are."""
        out = []
        for s, logits in self._decode(seqs, tokens, batched):
            if self._argmax is None:
                out.extend(host_argmax(row) for row in logits.numpy().reshape(len(s), -1))
                continue
            ids = self._argmax(logits)
            values = ids.numpy().reshape(-1).tolist()
            self._last_tokens.values, self._last_tokens.tensor = tuple(values), ids
            out.extend(values)
        return out

    def greedy_chain(self, seq: int, token: int, n: int) -> Iterator[int]:
        """Feed `token` to `seq`, then decode greedily: yield n tokens, each as soon as it is known; every token but
        the last is fed in turn (n decode steps). `sequence_length(seq)` counts the tokens fed so far.

        Where the artifact has a device argmax on the owned CUDA cache or on a Vulkan device, one step runs ahead
        of the host: step k + 1 is queued, its input id on the device from step k's argmax, before step k's token
        is read back, so the GPU does not idle while the host reads a token and launches the next step (~80 us a
        step on an H200 through CUDA; through Vulkan the host's recording and submits of a whole step). Closing
        the iterator early waits for the queued step; that step's token is then in the cache (one more than the
        caller took). Elsewhere each step is `decode_greedy`."""
        if n <= 0:
            return
        self.check_ids([token])
        length = self.sequence_length(seq)
        if length + n > self.context_window:
            raise PromptTooLongError(f"sequence {seq} holds {length} tokens; {n} decode steps would make "
                                     f"{length + n} and the artifact's context window is {self.context_window}")
        if self.decode_ahead and self._webgpu_reads() is not None:
            yield from self._chain_ahead_webgpu(seq, token, n)
            return
        ahead = self._decode_ahead_state()
        if ahead is None:
            for _ in range(n):
                token = self.decode_greedy([seq], [token])[0]
                yield token
            return
        yield from self._chain_ahead(ahead, seq, token, n)

    def _decode_ahead_state(self):
        """(CudaAsync, pinned buffers) for greedy_chain's queued steps, or None where they do not apply."""
        if not (self.decode_ahead and self.owned_kv and self._argmax is not None and self.device_info.kind == "cuda"):
            return None
        if self._ahead is None:
            from ..runtime.cuda_async import CudaAsync, CudaAsyncError

            if not CudaAsync.available():
                return None
            cu = CudaAsync(self.device_info.index)
            ring = {"pos": cu.pinned((2, 1), np.int32), "pt": cu.pinned((2, 1, self._max_pages), np.int32),
                    "ids": cu.pinned((1, 1), np.int32), "out": cu.pinned((2, 1), np.int32),
                    "events": [cu.event(), cu.event()]}
            if self.has_decode_greedy:  # decode_greedy's tokens land in mapped host memory, by position parity
                try:
                    ring["sink"], address = cu.mapped((2,), np.int32)
                except CudaAsyncError as e:  # no mapped memory here: decode + copies between steps instead
                    log.warning("decode_greedy needs mapped host memory (%s); greedy chains copy between steps", e)
                    self.has_decode_greedy = False
                else:
                    ring["d_sink"] = self._tvm.tensor(np.array([address], np.int64), self.dev)
            self._ahead = (cu, ring)
        return self._ahead

    def _webgpu_reads(self):
        """(read_begin, read_end) of the WebGPU plugin's async device-to-host reads, for greedy_chain on TVM's cache
        with a device argmax through Vulkan; None elsewhere (or a prebuilt plugin without them)."""
        if self._argmax is None or self.owned_kv or self.device_info.kind != "webgpu":
            return None
        if self._reads is None:
            g = self._tvm.get_global_func
            begin, end = g("edgellm.webgpu.read_begin", True), g("edgellm.webgpu.read_end", True)
            self._reads = (begin, end) if begin is not None and end is not None else ()
        return self._reads or None

    def _chain_ahead_webgpu(self, seq: int, token: int, n: int) -> Iterator[int]:
        """greedy_chain with one step queued ahead on TVM's paged cache through the WebGPU plugin. Step k: the
        cache's begin_forward (its page tables go to the device in queue order, behind step k - 1), `decode` on
        the ids tensor step k - 1's argmax wrote, the argmax, and an async read of its token (the plugin submits
        the step with the read and does not wait); then step k - 1's token is waited for, alone, while step k runs.
        Every input of step k is on the device or copied in queue order, so the host never waits mid-chain for
        anything but a token."""
        read_begin, read_end = self._webgpu_reads()
        dev_id = self.device_info.index
        arr = self._ids_tensor("decode", [seq], [token])
        pending = []  # tickets of steps queued and not yet read, oldest first
        try:
            for k in range(n):
                ids = self._argmax(self._forward("decode", [seq], None, arr))
                pending.append(read_begin(ids))
                self._lengths[seq] += 1
                arr = ids  # the next step's input: this step's token, on the device
                if k > 0:  # step k - 1's token, while step k runs
                    yield int(np.frombuffer(read_end(dev_id, pending.pop(0)), np.int32)[0])
            yield int(np.frombuffer(read_end(dev_id, pending.pop(0)), np.int32)[0])
        finally:
            for ticket in pending:  # closed early: the queued step finishes before the iterator does
                read_end(dev_id, ticket)

    def _chain_ahead(self, ahead, seq: int, token: int, n: int) -> Iterator[int]:
        """greedy_chain with one step queued ahead (see there). Step k uses slot k % 2 of the pinned buffers: its
        page row (and, step by step, its position) goes to the device from there, its token comes back there, its
        event marks both done. Slot k % 2 is written again at step k + 2, after step k's event was waited for in
        step k + 1.

        With `decode_greedy` (decode_in_graph) a step's graph ends with the argmax and feeds the next step itself:
        the token into the ids buffer, the position one further, and the token into mapped host memory at slot
        position % 2. Only step 0's id and position and a new page row (once per 16 tokens) are copied. Without it,
        each step copies its position, copies step k - 1's argmax into the ids on the device, runs `decode` and
        the argmax kernels, and copies the token back."""
        cu, ring = ahead
        (_, _, _), (d_ids, d_pos, d_pt), _ = aux = self._aux_for(1)
        in_graph = self.decode_in_graph and self.has_decode_greedy
        f = self._fn("decode_greedy" if in_graph else "decode")
        events = ring["events"]
        base = self._pool.length(seq)  # step k's position is base + k

        def token_of(k: int) -> int:
            return int(ring["sink"][(base + k) & 1] if in_graph else ring["out"][k & 1][0])

        cu.set_device()
        last, prev_ids = None, None  # slot of the last step queued; its argmax on the device (step by step)
        try:
            for k in range(n):
                slot = k & 1
                pos, pt = ring["pos"][slot], ring["pt"][slot]
                pos[0] = self._pool.length(seq)
                self._pool.append_many([seq], 1)  # all or none: a full cache raises before anything is queued
                self._pool.row(seq, pt[0])
                if k == 0 or not in_graph:
                    cu.to_device(d_pos, pos)
                if aux[2] is None or not np.array_equal(aux[2], pt):  # page rows change once per 16 tokens
                    cu.to_device(d_pt, pt)
                    aux[2] = pt.copy()
                if k == 0:
                    ring["ids"][0, 0] = token
                    cu.to_device(d_ids, ring["ids"])
                elif not in_graph:
                    cu.on_device(d_ids, prev_ids, 4)
                self._lengths[seq] += 1
                if in_graph:
                    f(d_ids, self.kv, d_pt, d_pos, ring["d_sink"], self.params)
                else:
                    prev_ids = self._argmax(f(d_ids, self.kv, d_pt, d_pos, self.params))
                    cu.to_host(ring["out"][slot], prev_ids)
                cu.record(events[slot])
                last = slot
                if k > 0:  # step k - 1's token, while step k runs
                    cu.wait(events[1 - slot])
                    yield token_of(k - 1)
            cu.wait(events[last])
            yield token_of(n - 1)
        finally:
            if last is not None:
                cu.wait(events[last])  # nothing of this chain is left running on the pinned buffers

    def calibrate_batch_min(self, n: int, reps: int = 3) -> int:
        """Smallest batch for which one `batch_decode` call beats per-sequence `decode` calls, measured now on n
        throwaway sequences (n + 1 means never batch). Returns it; set `self.batch_min` to make it the rule."""
        if n <= 1 or not self.has_batch_decode:
            return 1 if n <= 1 else _NEVER
        seqs = [self.add_sequence() for _ in range(n)]
        try:
            for s in seqs:
                self.prefill(s, [0])

            def timed(b: int, batched: bool) -> float:
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    self.decode(seqs[:b], [0] * b, batched=batched)
                    best = min(best, time.perf_counter() - t0)
                return best

            single, b2, bn = timed(1, False), timed(2, True), timed(n, True)
        finally:
            for s in seqs:
                self.remove_sequence(s)
        for b in range(1, n + 1):
            predicted = b2 + (bn - b2) * (b - 2) / max(n - 2, 1) if b >= 2 else b2
            if predicted < b * single:
                chosen = b
                break
        else:
            chosen = n + 1  # never batch: decode alone always won
        log.info("decode %.1f ms, batch_decode(2) %.1f ms, batch_decode(%d) %.1f ms -> batch_decode from b=%d",
                 single * 1e3, b2 * 1e3, n, bn * 1e3, chosen)
        return max(chosen, 1)

    @contextlib.contextmanager
    def sequence(self) -> Iterator[Sequence]:
        """A KV-cache sequence for step-by-step use: `seq.prefill(ids)`, then `seq.decode(token)`; removed on exit."""
        seq = self.add_sequence()
        try:
            yield Sequence(self, seq)
        finally:
            self.remove_sequence(seq)

    # ---- forwards -----------------------------------------------------------------------------------------------
    def _decode(self, seqs: list[int], tokens: list[int], batched: bool | None):
        """Check, then run one decode step: an iterable of (the sequences, their logits on the device) per forward.
        Forwards run as it is consumed; read each output before taking the next."""
        if len(seqs) != len(tokens) or not seqs:
            raise ValueError(f"decode needs one token per sequence, got {len(seqs)} sequences and {len(tokens)} "
                             "tokens")
        self.check_ids(tokens)
        for s in seqs:
            n = self.sequence_length(s) + 1
            if not self.fits(n):
                raise PromptTooLongError(f"sequence {s} would hold {n} tokens and the artifact's context window is "
                                         f"{self.context_window} (one more is needed to generate)")
        if batched is None:
            batched = len(seqs) >= self.batch_min
        if batched and not self.has_batch_decode:
            raise ValueError(f"artifact {self.art.root} has no batch_decode function; decode with batched=False "
                             "or recompile it with this edgellm version")
        if not batched:
            # one forward at a time, each consumed by the caller before the next runs (a replayed graph writes the
            # same output tensor every step)
            return self._decode_each(seqs, tokens)
        if self.owned_kv and len(seqs) > GRAPH_BATCH_BOUND:  # the bound batch_decode's storage is planned for
            return (part for i in range(0, len(seqs), GRAPH_BATCH_BOUND)
                    for part in self._decode(seqs[i:i + GRAPH_BATCH_BOUND], tokens[i:i + GRAPH_BATCH_BOUND], True))
        out = self._forward("batch_decode", seqs, tokens)
        for s in seqs:
            self._lengths[s] += 1
        return [(seqs, out)]

    def _decode_each(self, seqs: list[int], tokens: list[int]) -> Iterator[tuple[list[int], object]]:
        for s, t in zip(seqs, tokens):
            out = self._forward("decode", [s], [t])
            self._lengths[s] += 1
            yield [s], out

    def _ids_tensor(self, fn: str, seqs: list[int], ids: list[int]):
        if fn == "prefill" or fn == "prefill_logits":  # prompt chunks vary in length: a tensor each
            return self._tvm.tensor(np.asarray(ids, dtype=np.int32).reshape(1, -1), self.dev)
        if tuple(ids) == self._last_tokens.values:  # the device argmax's output: already there
            return self._last_tokens.tensor
        buf = self._ids_bufs.get(len(ids))
        if buf is None:
            buf = self._ids_bufs[len(ids)] = self._tvm.tensor(np.zeros((len(ids), 1), np.int32), self.dev)
        buf.copyfrom(np.asarray(ids, dtype=np.int32).reshape(-1, 1))
        return buf

    def _fn(self, name: str):
        """The VM function `name`, looked up once (a lookup per token is host time)."""
        f = self._fns.get(name)
        if f is None:
            f = self._fns[name] = self.vm[name]
        return f

    def _forward(self, fn: str, seqs: list[int], ids: list[int] | None, arr=None):
        """One forward of `fn` (prefill: ids are one chunk of seqs[0]; decode/batch_decode: one id per sequence,
        or `arr`, the ids already on the device); the output tensor stays on the device."""
        if self.owned_kv:
            return self._forward_owned(fn, seqs, ids)
        if arr is None:
            arr = self._ids_tensor(fn, seqs, ids)
        per = len(ids) if fn.startswith("prefill") else 1
        key = (tuple(seqs), per)  # ShapeTuples made once (about 2 us each per call on a CPU of this machine's class)
        shapes = self._shapes.get(key)
        if shapes is None:
            S = self._tvm.ShapeTuple
            shapes = self._shapes[key] = (S(list(seqs)), S([per] * len(seqs)))
        self._begin(self.kv, *shapes)
        try:
            self._sync_aux(self.kv)
            out = self._fn(fn)(arr, self.kv, self.params)
        finally:
            self._end(self.kv)
        return out[0]

    def _forward_owned(self, fn: str, seqs: list[int], ids: list[int]):
        """The owned cache's forward: pages for the new tokens, then one copy of ids (decode), positions and page
        rows into the batch size's fixed buffer, then the call (decode replays its CUDA graph)."""
        b = len(seqs)
        decode = not fn.startswith("prefill")
        per = 1 if decode else len(ids)
        aux = self._aux_for(b)
        (h_ids, h_pos, h_pt), (d_ids, d_pos, d_pt), last_pt = aux
        for r, s in enumerate(seqs):
            h_pos[r] = self._pool.length(s)
        self._pool.append_many(seqs, per)  # all or none: a full cache changes nothing
        for r, s in enumerate(seqs):
            self._pool.row(s, h_pt[r])
        d_pos.copyfrom(h_pos)
        if last_pt is None or not np.array_equal(last_pt, h_pt):  # page rows change once per 16 tokens
            d_pt.copyfrom(h_pt)
            aux[2] = h_pt.copy()
        if decode:
            if tuple(ids) == self._last_tokens.values:  # the device argmax's output: copied on the device
                d_ids.copyfrom(self._last_tokens.tensor)
            else:
                h_ids[:, 0] = ids
                d_ids.copyfrom(h_ids)
            arr = d_ids
        else:
            arr = self._tvm.tensor(np.asarray(ids, dtype=np.int32).reshape(1, -1), self.dev)
        return self._fn(fn)(arr, self.kv, d_pt, d_pos, self.params)

    # ---- whole jobs ---------------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """One prefill and one greedy decode step on a throwaway sequence: the first calls pay for the thread pool's
        start and first touches of memory, which would otherwise land in the first request's figures."""
        with self.sequence() as seq:
            seq.prefill([0])
            seq.decode_greedy(0)

    def score(self, ids: list[int]) -> np.ndarray:
        """Logits [n, vocab] for every position of `ids` (teacher forcing), float32."""
        self.check_prompt(len(ids), room=0)
        self.check_ids(ids)
        with self.sequence() as seq:
            outs = [self._forward("prefill_logits", [seq.id], ids[i : i + self.chunk]).numpy()
                    for i in range(0, len(ids), self.chunk)]
            return np.concatenate(outs, axis=1)[0]

    def score_decode(self, ids: list[int]) -> np.ndarray:
        """Logits [n, vocab] for every position of `ids` as generation computes them: position 0 from a one-token
        prefill, position i from the decode step that feeds ids[i] (teacher forcing through the decode kernels:
        the GEMVs, the decode attention, the head), float32."""
        self.check_prompt(len(ids), room=0)
        self.check_ids(ids)
        with self.sequence() as seq:
            rows = [seq.prefill(ids[:1])]
            rows += [seq.decode(t) for t in ids[1:]]
            return np.stack(rows)

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
        self.check_prompt(len(ids))
        stats = self.last_stats = GenerationStats(prompt_tokens=len(ids))
        if max_new_tokens <= 0:  # nothing asked for: not even the prefill runs
            stats.finish_reason = FinishReason.LENGTH
            return
        sampler, history = Sampler(sampling), list(ids)
        with self.sequence() as seq:
            t0 = time.perf_counter()
            logits = seq.prefill(ids)
            stats.prefill_seconds = time.perf_counter() - t0
            tok = sampler(logits, history)
            # greedy: the tokens after the first come from one chain of decode steps (one step queued ahead on the
            # owned CUDA cache), as many steps as the checks below can ask for
            steps = (self.greedy_chain(seq.id, tok, min(max_new_tokens - 1, self.context_window - len(ids) - 1))
                     if sampling.greedy else None)
            try:
                yield from self._generate_loop(seq, tok, history, stats, max_new_tokens, sampler, steps)
            finally:
                if steps is not None:
                    steps.close()

    def _generate_loop(self, seq: Sequence, tok: int, history: list[int], stats: GenerationStats,
                       max_new_tokens: int, sampler: Sampler, steps: Iterator[int] | None) -> Iterator[int]:
        decode_t = 0.0
        while True:
            if tok in self.eos_ids:
                stats.finish_reason = FinishReason.STOP
                return
            history.append(tok)
            stats.token_ids.append(tok)
            stats.generated_tokens += 1
            yield tok
            if stats.generated_tokens >= max_new_tokens:
                stats.finish_reason = FinishReason.LENGTH
                return
            if not self.fits(len(history)):
                stats.finish_reason = FinishReason.CONTEXT
                return
            t1 = time.perf_counter()
            if steps is not None:  # greedy: no logits on the host, the argmax runs on the device where it can
                tok = next(steps)
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
                self.last_stats.finish_reason = FinishReason.STOP
