"""Token sampling on the host (numpy): greedy, temperature, top-k, top-p, repetition penalty, seeded.

Every value SamplingParams accepts samples without NaN: temperatures below GREEDY_BELOW are greedy (dividing by
1e-320 overflows), infinite scaled logits are handled as the limit they stand for, and a distribution that ends up
empty falls back to the argmax.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: logits / T would overflow float64 for T ~ 1e-308
MAX_SEED = 2**64 - 1


def _show(v) -> str:
    """repr for a message; a huge integer (a request may carry one) as its size."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"a {v.bit_length()}-bit integer"
    return repr(v)[:80]


def _number(v, flag: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{flag} must be a number, got {_show(v)}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ValueError(f"{flag} must be a finite number, got {_show(v)}")
    return f


@dataclass
class SamplingParams:
    temperature: float = 0.0  # below GREEDY_BELOW (0 included) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = self.temperature = _number(self.temperature, "temperature")
        if t < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {t}")
        p = self.top_p = _number(self.top_p, "top_p")
        if not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {_show(self.top_k)}")
        r = self.repetition_penalty = _number(self.repetition_penalty, "repetition_penalty")
        if r <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {_show(self.seed)}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {_show(self.stop)}")

    @property
    def greedy(self) -> bool:
        """The token is the argmax of the raw logits (no temperature, no penalty): it can be taken on the device."""
        return self.temperature < GREEDY_BELOW and self.repetition_penalty == 1.0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        logits = logits.astype(np.float64, copy=True).reshape(-1)
        logits[np.isnan(logits)] = -np.inf  # a NaN logit is never chosen
        p = self.p
        if p.repetition_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < logits.shape[0])]
            vals = logits[seen]
            with np.errstate(over="ignore"):  # a huge penalty may push a logit to -inf: never chosen, as meant
                logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature < GREEDY_BELOW:
            return int(np.argmax(logits))
        if p.top_k and p.top_k < logits.shape[0]:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = logits / p.temperature
        top = scaled.max()
        if top == np.inf:  # the limit of the softmax: uniform over the infinite logits
            probs = (scaled == np.inf).astype(np.float64)
        elif top == -np.inf:  # nothing left (every logit -inf): the argmax is as good as any
            return int(np.argmax(logits))
        else:
            probs = np.exp(scaled - top)  # the largest term is exp(0) = 1, so the sum is >= 1
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))
