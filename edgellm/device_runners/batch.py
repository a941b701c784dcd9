"""Continuous batching over one Engine: many sequences share its paged KV cache, decode runs batched.

The TVM VM is not thread-safe, so every model call happens on ONE worker thread (`BatchScheduler`'s loop).
Callers `submit()` a `GenRequest` from any thread and receive events through the request's `emit` callback (called
on the worker thread; the server forwards them into asyncio with `call_soon_threadsafe`).

Each loop iteration:
  1. drop cancelled sequences (their KV pages are free before the next forward), expire requests queued too long;
  2. admit queued requests while a sequence slot is free and the KV pages they may need are unreserved
     (a request reserves ceil(min(prompt + max_tokens, context) / page_size) pages, so a running sequence never
     finds the cache full mid-decode);
  3. prefill ONE chunk of one admitted prompt (long prompts interleave with decode instead of stalling it);
  4. one decode step for every sequence that has a token to feed: `batch_decode` (ids [b, 1] -> logits [b, 1, vocab])
     once b reaches `batch_min`, below it the static-shape `decode` per sequence (its GEMV kernels beat the dynamic
     batch GEMM at small b on CPU). `batch_min=None` measures both at start and picks the crossover. Where every
     sequence of the step is greedy (no logit_bias) and the artifact has `argmax` (CUDA), the argmax runs on the
     device and only the token ids come back.

The model is driven through the Engine's public step API only (add_sequence, prefill, decode, decode_greedy,
remove_sequence, pages_in_use); the context-window rule is `Engine.fits`, finish reasons are `FinishReason`.
"""

from __future__ import annotations

import collections
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engine import Engine, FinishReason, PromptTooLongError
from .sampling import Sampler, SamplingParams
from .text import StopMatcher, StreamDecoder

log = logging.getLogger("edgellm.batch")


class QueueFullError(RuntimeError):
    """The wait queue is full (or a queued request waited too long): retry later (HTTP 503 + Retry-After)."""

    def __init__(self, msg: str, retry_after: float = 1.0):
        super().__init__(msg)
        self.retry_after = retry_after


class BatchDecodeMissingError(ValueError):
    pass


class InvalidRequestError(ValueError):
    """A request the engine must not run (token ids outside the vocabulary, ...): HTTP 400 naming `param`."""

    def __init__(self, msg: str, param: str | None = None):
        super().__init__(msg)
        self.param = param


# ---- events (emitted on the worker thread) ---------------------------------------------------------------------
@dataclass
class Token:
    text: str  # may be "" while a multi-byte character or a possible stop string is held back
    token_id: int


@dataclass
class Finished:
    reason: FinishReason  # stop | length | context | cancelled
    prompt_tokens: int
    completion_tokens: int
    tail: str = ""  # text held back until the end (stop-string prefix, incomplete UTF-8)


@dataclass
class Failed:
    error: Exception


Event = Token | Finished | Failed


@dataclass
class GenRequest:
    ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logit_bias: dict[int, float] = field(default_factory=dict)
    emit: Callable[[Event], None] = lambda ev: None
    # set by the scheduler
    cancelled: bool = False
    submitted_at: float = 0.0


class _Active:
    """A running sequence: KV-cache id, sampler, detokenizer, stop matcher."""

    def __init__(self, req: GenRequest, engine: Engine, pages: int):
        self.req, self.pages = req, pages
        self.seq: int | None = None  # the KV-cache sequence, added last (nothing to free if the rest fails)
        self.prefilled = 0  # prompt tokens already in the cache
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.history = list(req.ids)
        self.generated = 0
        self.sampler = Sampler(req.sampling)
        self.detok = StreamDecoder(engine.codec)
        self.stops = StopMatcher(req.sampling.stop)
        self.bias: np.ndarray | None = None
        # the next token is the argmax of the raw logits, which the device can take where the artifact has `argmax`
        self.device_greedy = engine.has_device_argmax and req.sampling.greedy and not req.logit_bias

    def biased(self, logits: np.ndarray) -> np.ndarray:
        if not self.req.logit_bias:
            return logits
        if self.bias is None:
            self.bias = np.zeros(logits.shape[-1], np.float32)
            for tok, b in self.req.logit_bias.items():
                if 0 <= tok < self.bias.shape[0]:
                    self.bias[tok] = b
        return logits + self.bias


@dataclass
class SchedulerStats:
    """A consistent snapshot for /metrics and /health."""

    queue_length: int = 0
    active_sequences: int = 0
    kv_pages_total: int = 0
    kv_pages_in_use: int = 0
    kv_pages_reserved: int = 0  # the scheduler's reservation count
    kv_pages_reserved_active: int = 0  # the pages the active sequences reserved: equal to the above, or a leak
    prefill_tokens_total: int = 0
    prefill_seconds_total: float = 0.0
    decode_tokens_total: int = 0
    decode_seconds_total: float = 0.0
    decode_steps_total: int = 0
    batch_decode_calls_total: int = 0
    batch_min: int = 0
    prefill_tps_recent: float = 0.0
    decode_tps_recent: float = 0.0
    finished: dict[str, int] = field(default_factory=lambda: collections.Counter())
    rejected_total: int = 0

    @property
    def leak(self) -> str | None:
        """Why the page accounting is wrong, or None. Both conditions hold in every consistent snapshot."""
        if self.kv_pages_reserved != self.kv_pages_reserved_active:
            return (f"{self.kv_pages_reserved} KV pages reserved but the {self.active_sequences} active sequences "
                    f"hold {self.kv_pages_reserved_active}")
        if self.active_sequences == 0 and self.kv_pages_in_use:
            return f"{self.kv_pages_in_use} KV pages in use with no active sequence"
        return None


class BatchScheduler:
    RECENT_SECONDS = 10.0

    def __init__(self, engine: Engine, max_active: int | None = None, max_queue: int = 64,
                 queue_timeout: float = 30.0, batch_min: int | None = None):
        if not engine.has_batch_decode:
            functions = engine.info.functions
            raise BatchDecodeMissingError(
                f"artifact {engine.art.root} has no batch_decode function (it lists {sorted(functions)}); "
                "recompile it with this edgellm version to serve it")
        self.engine = engine
        cap = engine.runtime.max_batch
        self.max_active = min(max_active or cap, cap)
        if self.max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self.page_size = engine.runtime.page_size
        self.total_pages = engine.total_pages  # what admission reserves from (a test may lower it)
        self._cond = threading.Condition()
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._active: list[_Active] = []
        self._reserved = 0
        self._stop = False
        self._stats = SchedulerStats(kv_pages_total=self.total_pages)
        self._recent: collections.deque[tuple[float, str, int, float]] = collections.deque()
        self._thread: threading.Thread | None = None
        if batch_min is not None and batch_min < 1:
            raise ValueError(f"batch_min must be >= 1 (or None to measure), got {batch_min}")
        self.batch_min = batch_min

    # ---- any thread ---------------------------------------------------------------------------------------------
    def start(self) -> BatchScheduler:
        if self.batch_min is None:
            self.batch_min = self.calibrate()
        self._thread = threading.Thread(target=self._run, name="edgellm-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """The worker thread runs (False before start() and after stop())."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout)

    def pages_needed(self, n_prompt: int, max_tokens: int) -> int:
        """KV pages a request may fill: its prompt plus the tokens it may generate (max_tokens, or fewer where the
        context window ends first: `Engine.max_new_tokens`)."""
        tokens = n_prompt + min(max_tokens, self.engine.max_new_tokens(n_prompt))
        return math.ceil(tokens / self.page_size)

    def check(self, req: GenRequest) -> None:
        """Everything about `req` that could fail on the engine thread, checked on the caller's: raises
        PromptTooLongError, InvalidRequestError or ValueError."""
        self.engine.check_prompt(len(req.ids))
        if req.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {req.max_tokens}", "max_tokens")
        vocab = self.engine.vocab_size
        for what, ids in (("prompt", req.ids), ("logit_bias", req.logit_bias)):
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab:
                    shown = t if isinstance(t, numbers.Integral) and abs(t) < 2**64 else f"{type(t).__name__} value"
                    raise InvalidRequestError(f"{what} token id {shown} is outside this model's vocabulary "
                                              f"[0, {vocab})", what)
        if not isinstance(req.sampling, SamplingParams):
            raise InvalidRequestError("sampling must be a SamplingParams", "sampling")
        req.sampling.__post_init__()  # again: fields may have been set after construction
        Sampler(req.sampling)  # the generator is made again at admission; this raises here if it cannot be

    def submit(self, req: GenRequest) -> None:
        """Queue `req`; raises PromptTooLongError, InvalidRequestError or QueueFullError at once instead of queueing
        the impossible."""
        self.check(req)
        need = self.pages_needed(len(req.ids), req.max_tokens)
        if need > self.total_pages:
            raise ValueError(f"the prompt plus max_tokens needs {need} KV pages but the cache has {self.total_pages}; "
                             "lower max_tokens")
        with self._cond:
            if self._stop:
                raise QueueFullError("the server is shutting down", retry_after=5)
            if len(self._pending) >= self.max_queue and not self._can_admit_now(req):
                self._stats.rejected_total += 1
                raise QueueFullError(
                    f"{len(self._active)} sequences running and {len(self._pending)} requests queued "
                    f"(--max-queue {self.max_queue}); retry later", retry_after=self._retry_after())
            req.submitted_at = time.monotonic()
            self._pending.append(req)
            self._cond.notify_all()

    def cancel(self, req: GenRequest) -> None:
        """Stop `req` (client gone): its sequence and KV pages are freed before the next forward."""
        with self._cond:
            req.cancelled = True
            self._cond.notify_all()

    def stats(self) -> SchedulerStats:
        with self._cond:
            s = self._stats
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - self.RECENT_SECONDS:
                self._recent.popleft()
            rate = {}
            for kind in ("prefill", "decode"):
                toks = sum(r[2] for r in self._recent if r[1] == kind)
                secs = sum(r[3] for r in self._recent if r[1] == kind)
                rate[kind] = toks / secs if secs else 0.0
            return SchedulerStats(
                queue_length=len(self._pending), active_sequences=len(self._active),
                kv_pages_total=s.kv_pages_total, kv_pages_in_use=s.kv_pages_in_use, kv_pages_reserved=self._reserved,
                kv_pages_reserved_active=sum(a.pages for a in self._active),
                prefill_tokens_total=s.prefill_tokens_total, prefill_seconds_total=s.prefill_seconds_total,
                decode_tokens_total=s.decode_tokens_total, decode_seconds_total=s.decode_seconds_total,
                decode_steps_total=s.decode_steps_total, batch_decode_calls_total=s.batch_decode_calls_total,
                batch_min=self.batch_min or 0, prefill_tps_recent=rate["prefill"],
                decode_tps_recent=rate["decode"], finished=collections.Counter(s.finished),
                rejected_total=s.rejected_total)

    def _retry_after(self) -> float:
        return 1.0 + len(self._pending) / max(self.max_active, 1)

    def _can_admit_now(self, req: GenRequest) -> bool:
        return (not self._pending and len(self._active) < self.max_active
                and self._reserved + self.pages_needed(len(req.ids), req.max_tokens) <= self.total_pages)

    def calibrate(self, reps: int = 3) -> int:
        """Smallest batch for which one `batch_decode` call beats per-sequence `decode` calls (measured now)."""
        return self.engine.calibrate_batch_min(self.max_active, reps)

    # ---- worker thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                with self._cond:
                    if self._stop:
                        break
                    if not self._active and not self._pending:
                        self._cond.wait(timeout=1.0)
                        continue
                    expired, new, refused = self._admit_locked()
                for req in expired:
                    self._emit(req, Failed(QueueFullError(
                        f"request waited over {self.queue_timeout:g} s for a free sequence; retry later",
                        retry_after=self._retry_after())))
                for req, exc in refused:
                    self._emit(req, Failed(RuntimeError(f"this request could not start: {exc}")))
                self._drop_cancelled()
                if new:
                    self._update_pages()
                self._prefill_step()
                self._decode_step()
            except Exception:  # last resort: every per-request step below contains its own failures
                log.exception("engine loop iteration failed; failing the active sequences")
                for act in list(self._active):
                    self._finish(act, None, error=RuntimeError("internal engine error; see the server log"))
        for act in list(self._active):
            self._finish(act, FinishReason.CANCELLED)

    def _admit_locked(self) -> tuple[list[GenRequest], list[_Active], list[tuple[GenRequest, Exception]]]:
        """Admit what fits. A request whose setup fails is refused alone (nothing reserved, no sequence left)."""
        expired, new, refused, now = [], [], [], time.monotonic()
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        while self._pending and len(self._active) < self.max_active:
            req = self._pending[0]
            need = self.pages_needed(len(req.ids), req.max_tokens)
            if self._reserved + need > self.total_pages:
                break
            self._pending.popleft()
            if req.cancelled:
                continue
            try:
                act = _Active(req, self.engine, need)
                act.seq = self.engine.add_sequence()
            except Exception as exc:
                log.exception("could not start a request")
                self._stats.finished[FinishReason.ERROR] += 1
                refused.append((req, exc))
                continue
            self._reserved += need
            self._active.append(act)
            new.append(act)
        keep = collections.deque()
        for req in self._pending:
            if req.cancelled:
                continue
            if now - req.submitted_at > self.queue_timeout:
                expired.append(req)
                self._stats.rejected_total += 1
            else:
                keep.append(req)
        self._pending = keep
        return expired, new, refused

    def _drop_cancelled(self) -> None:
        for act in [a for a in self._active if a.req.cancelled]:
            self._finish(act, FinishReason.CANCELLED)

    def _prefill_step(self) -> None:
        act = next((a for a in self._active if a.prefilled < len(a.req.ids)), None)
        if act is None:
            return
        chunk = act.req.ids[act.prefilled : act.prefilled + self.engine.chunk]
        t0 = time.perf_counter()
        try:
            logits = self.engine.prefill(act.seq, chunk)
        except Exception as exc:
            log.exception("prefill failed")
            self._finish(act, None, error=RuntimeError(f"prefill failed: {exc}"))
            return
        dt = time.perf_counter() - t0
        act.prefilled += len(chunk)
        self._account("prefill", len(chunk), dt)
        self._update_pages()  # before any event goes out, so /metrics never lags what a client saw
        if act.prefilled == len(act.req.ids):
            self._sample(act, logits)

    def _decode_step(self) -> None:
        batch = [a for a in self._active if a.next_token is not None]
        if not batch:
            return
        t0 = time.perf_counter()
        tokens = [a.next_token for a in batch]
        batched = len(batch) >= self.batch_min
        e = self.engine
        if batched:
            seqs = [a.seq for a in batch]
            try:  # the device argmax where every sequence is greedy; otherwise logits for the host's samplers
                outs = (e.decode_greedy(seqs, tokens, batched=True) if all(a.device_greedy for a in batch)
                        else list(e.decode(seqs, tokens, batched=True)))
            except Exception as exc:  # one call for all of them: they fail together, the queue goes on
                log.exception("batch_decode failed")
                for act in batch:
                    self._finish(act, None, error=RuntimeError(f"decode failed: {exc}"))
                return
        else:
            outs = []
            for act, t in zip(list(batch), tokens):
                try:
                    outs.append(e.decode_greedy([act.seq], [t], batched=False)[0] if act.device_greedy
                                else e.decode([act.seq], [t], batched=False)[0])
                except Exception as exc:
                    log.exception("decode failed")
                    self._finish(act, None, error=RuntimeError(f"decode failed: {exc}"))
                    batch.remove(act)
        dt = time.perf_counter() - t0
        self._account("decode", len(batch), dt)
        with self._cond:
            self._stats.decode_steps_total += 1
            self._stats.batch_decode_calls_total += batched
        self._update_pages()
        for act, out in zip(batch, outs):
            act.history.append(act.next_token)
            act.next_token = None
            self._sample(act, out)

    def _sample(self, act: _Active, out: np.ndarray | int) -> None:
        """Pick the next token (from logits, or the device argmax's token id), emit its text, and finish the
        sequence if it is done; a failure here ends this sequence alone."""
        try:
            tok = out if isinstance(out, int) else act.sampler(act.biased(out), act.history)
            self._take(act, tok)
        except Exception as exc:
            log.exception("sampling failed")
            self._finish(act, None, error=RuntimeError(f"sampling failed: {exc}"))

    def _take(self, act: _Active, tok: int) -> None:
        if tok in self.engine.eos_ids:
            return self._finish(act, FinishReason.STOP)
        act.generated += 1
        text = act.stops.feed(act.detok.push(tok))
        self._emit(act.req, Token(text, tok))
        if act.stops.stopped:
            return self._finish(act, FinishReason.STOP)
        if act.generated >= act.req.max_tokens:
            return self._finish(act, FinishReason.LENGTH)
        if not self.engine.fits(len(act.history) + 1):  # prompt + generated, `tok` included
            return self._finish(act, FinishReason.CONTEXT)
        act.next_token = tok

    def _finish(self, act: _Active, reason: FinishReason | None, error: Exception | None = None) -> None:
        if act in self._active:
            try:
                self.engine.remove_sequence(act.seq)
            except Exception:
                log.exception("removing sequence %d failed", act.seq)
            used = self.engine.pages_in_use()
            with self._cond:  # one snapshot: the sequence, its reservation and its pages go together
                self._active.remove(act)
                self._reserved -= act.pages
                self._stats.kv_pages_in_use = used
                self._stats.finished[reason or FinishReason.ERROR] += 1
        if error is not None:
            self._emit(act.req, Failed(error))
            return
        tail = ""
        if reason != FinishReason.CANCELLED:
            tail = (act.stops.feed(act.detok.flush()) if not act.stops.stopped else "") + act.stops.flush()
        self._emit(act.req, Finished(reason, len(act.req.ids), act.generated, tail))

    def _emit(self, req: GenRequest, ev: Event) -> None:
        try:
            req.emit(ev)
        except Exception:  # a closed event loop or a bad callback must not stop the engine
            log.debug("dropping event for a request whose consumer is gone", exc_info=True)

    def _account(self, kind: str, tokens: int, seconds: float) -> None:
        with self._cond:
            if kind == "prefill":
                self._stats.prefill_tokens_total += tokens
                self._stats.prefill_seconds_total += seconds
            else:
                self._stats.decode_tokens_total += tokens
                self._stats.decode_seconds_total += seconds
            self._recent.append((time.monotonic(), kind, tokens, seconds))
            if len(self._recent) > 100_000:
                self._recent.popleft()

    def _update_pages(self) -> None:
        used = self.engine.pages_in_use()
        with self._cond:
            self._stats.kv_pages_in_use = used


__all__ = ["BatchScheduler", "GenRequest", "Token", "Finished", "Failed", "FinishReason", "QueueFullError",
           "PromptTooLongError", "BatchDecodeMissingError", "InvalidRequestError"]
