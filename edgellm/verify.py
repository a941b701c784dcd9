"""edgellm verify: how close an artifact's next-token distributions are to a reference's, teacher-forced over a text.

For every chunk of the text (chunks fit the artifact's context window) both models see the same token ids and
give logits for every position; position i predicts token i+1. Measured per position, then averaged over all
positions of all chunks:
  top-1 agreement   argmax(artifact) == argmax(reference)
  KL                KL(reference || artifact) = sum_v p_ref(v) (log p_ref(v) - log p_art(v)), in nats
  perplexity        exp(mean negative log-likelihood of the text's next tokens), for the artifact and the reference
The reference is transformers fp32 reading the artifact's source model when torch and transformers are installed,
otherwise a q0f32 build of that source compiled here into a temporary folder, or whatever --reference names (a model
or another artifact). The source is checked against the manifest's sha256 before it is used.

The artifact is driven only through the Engine's public API (`Engine(...)`, `prompt_ids`, `score`,
`context_window`, `vocab_size`, `art.manifest`), all in `EngineScorer`.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import importlib.util
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

BUILTIN_TEXT = "built-in"
REFERENCE_KINDS = ("auto", "transformers", "q0f32")
PATHS = ("prefill", "decode")  # how the artifact computes each position's logits
DEFAULT_CHUNK_TOKENS = 256


class VerifyError(ValueError):
    """A verify run that cannot be made as asked; the message names the value and the fix."""


# ---- the measures (pure numpy; tests check them against hand-computed values) --------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Sums:
    """Per-position measures summed over positions; `metrics()` turns them into means. Sums add across chunks."""

    positions: int = 0
    agree: int = 0
    kl: float = 0.0
    nll: float = 0.0  # the artifact's
    ref_nll: float = 0.0

    def __add__(self, o: Sums) -> Sums:
        return Sums(self.positions + o.positions, self.agree + o.agree, self.kl + o.kl, self.nll + o.nll,
                    self.ref_nll + o.ref_nll)

    def metrics(self) -> Metrics:
        n = max(self.positions, 1)
        ppl, ref_ppl = math.exp(self.nll / n), math.exp(self.ref_nll / n)
        return Metrics(positions=self.positions, agreement=self.agree / n, mean_kl=self.kl / n, perplexity=ppl,
                       ref_perplexity=ref_ppl, ppl_increase=ppl / ref_ppl - 1.0)


@dataclass
class Metrics:
    positions: int  # predicted positions (tokens of the chunk minus one)
    agreement: float  # fraction of positions with the same top-1 token, 0..1
    mean_kl: float  # mean KL(reference || artifact), nats
    perplexity: float  # the artifact's on the text
    ref_perplexity: float  # the reference's on the same positions
    ppl_increase: float  # perplexity / ref_perplexity - 1 (0.081 = +8.1%)


def compare_logits(ref_logits: np.ndarray, art_logits: np.ndarray, targets: np.ndarray) -> Sums:
    """ref_logits, art_logits: [n, vocab] for n positions; targets: [n] the token each position should predict."""
    if ref_logits.shape != art_logits.shape or ref_logits.shape[0] != len(targets):
        raise VerifyError(f"logits of shape {ref_logits.shape} (reference) and {art_logits.shape} (artifact) for "
                          f"{len(targets)} targets cannot be compared; both must be [positions, vocab]")
    lr, la = log_softmax(ref_logits), log_softmax(art_logits)
    rows = np.arange(len(targets))
    t = np.asarray(targets, dtype=np.int64)
    kl = (np.exp(lr) * (lr - la)).sum(axis=-1)
    return Sums(positions=len(t), agree=int((lr.argmax(-1) == la.argmax(-1)).sum()), kl=float(kl.sum()),
                nll=float(-la[rows, t].sum()), ref_nll=float(-lr[rows, t].sum()))


# ---- text and chunks --------------------------------------------------------------------------------------------
def builtin_text() -> str:
    """The package's public-domain prose (edgellm/data/verify_text.txt), header lines removed."""
    raw = (importlib.resources.files("edgellm") / "data" / "verify_text.txt").read_text(encoding="utf-8")
    return _strip_header(raw)


def _strip_header(raw: str) -> str:
    lines = raw.splitlines()
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        i += 1
    return "\n".join(lines[i:]).strip() + "\n"


def read_text(path: Path | None) -> tuple[str, str]:
    """(name, text): the built-in set for None, else the UTF-8 file at `path` (scored whole)."""
    if path is None:
        return BUILTIN_TEXT, builtin_text()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VerifyError(f"--text {path} is not UTF-8 text; re-encode it (e.g. iconv -t UTF-8)") from None
    except OSError as exc:
        raise VerifyError(f"--text {path} cannot be read ({exc.strerror}); pass a readable text file") from None
    if not text.strip():
        raise VerifyError(f"--text {path} is empty; pass a file with some prose in it")
    return str(path), text


def make_chunks(ids: list[int], chunk_tokens: int, bos: int | None = None) -> list[list[int]]:
    """Consecutive pieces of `ids`, each at most `chunk_tokens` long (with `bos` in front when given); a last piece
    that would leave nothing to predict (under 2 tokens) is dropped."""
    body = chunk_tokens - (bos is not None)
    if body < 1:
        raise VerifyError(f"chunks of {chunk_tokens} tokens leave no room for text; use --chunk-tokens 2 or more")
    out = []
    for i in range(0, len(ids), body):
        piece = ([bos] if bos is not None else []) + ids[i : i + body]
        if len(piece) >= 2:
            out.append(piece)
    return out


def score_chunks(ref_logits: Callable[[list[int]], np.ndarray], art_logits: Callable[[list[int]], np.ndarray],
                 chunks: list[list[int]], body: int) -> tuple[list[ChunkResult], Metrics]:
    """Both logits functions over every chunk (ids -> [n, vocab]); per-chunk results and the totals over all
    positions. `body`: text tokens per chunk (for the chunks' start offsets)."""
    results, total = [], Sums()
    for i, piece in enumerate(chunks):
        s = compare_logits(ref_logits(piece)[:-1], art_logits(piece)[:-1], np.asarray(piece[1:]))
        total = total + s
        results.append(ChunkResult(index=i, start=i * body, tokens=len(piece), metrics=s.metrics()))
        log.info("chunk %d: top-1 %.1f%%", i, 100 * results[-1].metrics.agreement)
    return results, total.metrics()


# ---- scorers: ids -> logits [n, vocab] --------------------------------------------------------------------------
class EngineScorer:
    """An edgellm artifact. Every call into the Engine is here. path: "prefill" scores a chunk in one forward
    (`prefill_logits`); "decode" feeds it one decode step a token after a one-token prefill, the kernels that
    generate text (`Engine.score_decode`)."""

    def __init__(self, path: Path, threads: int | None, device: str | None = None, mode: str = "prefill"):
        from .device_runners.engine import Engine

        self.mode = mode
        self.engine = Engine(path, device=device, threads=threads)
        self.manifest = self.engine.art.manifest
        self.context_window = self.engine.context_window
        self.vocab_size = self.engine.vocab_size
        tok = self.manifest.get("tokenizer", {})
        self.bos = tok.get("bos_token_id") if tok.get("add_bos_token") else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no BOS (make_chunks puts one in front of each chunk when the model wants it)."""
        ids = self.engine.prompt_ids(text, chat=False)
        return ids[1:] if self.bos is not None and ids[:1] == [self.bos] else ids

    def logits(self, ids: list[int]) -> np.ndarray:
        score = self.engine.score_decode if self.mode == "decode" else self.engine.score
        return score(ids)[:, : self.vocab_size]

    @property
    def device(self) -> str:
        return self.engine.device_info.describe()


class TransformersScorer:
    """transformers in fp32 reading an HF folder or a GGUF file (the same way tests/conftest.py's hf_smollm2 does)."""

    def __init__(self, path: Path, threads: int | None = None, model=None):
        """model: an fp32 transformers model already loaded from `path` (tests share one); else it is loaded here."""
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self.path = Path(path)
        if threads:
            torch.set_num_threads(threads)
        if model is not None:
            self.model = model
        else:
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # stderr keeps the one-line verdict; the GGUF reader's own tqdm bar
            noise = io.StringIO()  # ignores that switch, so stderr is held while loading (logged at debug level)
            try:
                with contextlib.redirect_stderr(noise):
                    if path.is_dir():
                        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
                    else:
                        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                          dtype=torch.float32)
            finally:
                log.debug("transformers loading %s: %s", path, noise.getvalue())
                if bar:
                    hf_logging.enable_progress_bar()
        self.model.eval()
        self.vocab_size = int(self.model.config.vocab_size)

    def logits(self, ids: list[int]) -> np.ndarray:
        with self._torch.no_grad():
            out = self.model(self._torch.tensor([ids], dtype=self._torch.long)).logits[0]
        return out.float().numpy()[:, : self.vocab_size]


def transformers_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


# ---- the API ----------------------------------------------------------------------------------------------------
@dataclass
class VerifyArgs:
    artifact: Path
    reference: Path | None = None  # a model (HF folder, .gguf) or an artifact; None: the artifact's own source
    reference_kind: str = "auto"  # for a model reference: auto (transformers if installed, else q0f32) | transformers | q0f32
    text: Path | None = None  # None: the built-in text set
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # capped at the context window(s)
    max_chunks: int | None = None
    threads: int | None = None
    min_agreement: float | None = None  # percent: fail below it
    max_ppl_increase: float | None = None  # percent: fail above it
    path: str = "prefill"  # the artifact's path: prefill (one forward a chunk) | decode (one decode step a token)
    device: str | None = None  # the artifact's device (KIND[:N], e.g. vulkan:1); None: its target's, index 0

    def __post_init__(self) -> None:
        self.artifact = Path(self.artifact)
        self.reference = Path(self.reference) if self.reference is not None else None
        if self.reference_kind not in REFERENCE_KINDS:
            raise VerifyError(f"reference kind {self.reference_kind!r} is unknown; use one of {', '.join(REFERENCE_KINDS)}")
        if self.path not in PATHS:
            raise VerifyError(f"path {self.path!r} is unknown; use one of {', '.join(PATHS)}")
        if self.chunk_tokens < 2:
            raise VerifyError(f"--chunk-tokens {self.chunk_tokens} is too small; a chunk needs at least 2 tokens")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise VerifyError(f"--max-chunks {self.max_chunks} is out of range: it must be >= 1")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 100:
            raise VerifyError(f"--min-agreement {self.min_agreement} is out of range: it is a percentage, 0 to 100")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise VerifyError(f"--max-ppl-increase {self.max_ppl_increase} is out of range: it is a percentage >= 0")


@dataclass
class ChunkResult:
    index: int
    start: int  # offset of the chunk's first text token in the text's ids
    tokens: int  # ids fed (BOS included)
    metrics: Metrics


@dataclass
class VerifyResult:
    artifact: str
    scheme: str
    target: str
    reference: str  # what the reference is, in words
    reference_kind: str  # transformers | q0f32 | artifact
    source_check: str  # how the reference relates to the artifact's recorded source
    text: str  # BUILTIN_TEXT or the file
    text_tokens: int
    chunk_tokens: int
    path: str  # the artifact's: prefill | decode
    device: str  # where the artifact ran
    chunks: list[ChunkResult]
    total: Metrics
    bounds: dict = field(default_factory=dict)  # min_agreement / max_ppl_increase, percent, as given
    failures: list[str] = field(default_factory=list)  # one line per bound not met

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def table(self) -> str:
        how = ("one forward a chunk" if self.path == "prefill"
               else "one decode step a token after a one-token prefill")
        head = (f"verify {self.artifact} ({self.scheme}, {self.target})\n"
                f"artifact path: {self.path} ({how}) on {self.device}\n"
                f"reference: {self.reference}\nsource: {self.source_check}\n"
                f"text: {self.text} ({self.text_tokens} tokens, {len(self.chunks)} chunks of <= {self.chunk_tokens})\n")
        cols = f"{'chunk':>6} {'tokens':>7} {'top-1':>7} {'mean KL':>9} {'ppl':>9} {'ref ppl':>9} {'ppl +':>8}"
        rows = [cols, "-" * len(cols)]

        def row(name: str, tokens: int, m: Metrics) -> str:
            return (f"{name:>6} {tokens:>7} {100 * m.agreement:>6.1f}% {m.mean_kl:>9.4f} {m.perplexity:>9.3f} "
                    f"{m.ref_perplexity:>9.3f} {100 * m.ppl_increase:>+7.2f}%")

        rows += [row(str(c.index), c.tokens, c.metrics) for c in self.chunks]
        rows += ["-" * len(cols), row("total", sum(c.tokens for c in self.chunks), self.total)]
        return head + "\n".join(rows)


def check_source(manifest: dict) -> tuple[Path, str]:
    """The artifact's recorded source model, checked against the manifest's sha256: (path, sha256). VerifyError when
    it is not recorded, missing or changed."""
    from .loaders import SourceError, open_model

    model = manifest.get("model", {})
    src, want = model.get("source"), model.get("source_sha256")
    fix = "pass the model it was compiled from, or a reference artifact, with --reference MODEL_OR_ARTIFACT"
    if not src:
        raise VerifyError(f"the artifact's manifest records no source model; {fix}")
    path = Path(src)
    if not path.exists():
        raise VerifyError(f"the artifact's source model {src} is missing (recorded at compile time); {fix}")
    try:
        got = open_model(path).sha256
    except SourceError as exc:
        raise VerifyError(f"the artifact's source model {src} cannot be read ({exc}); {fix}") from None
    if want and got != want:
        raise VerifyError(f"the artifact's source model {src} has changed since compile (sha256 {got[:16]}..., "
                          f"manifest {want[:16]}...); {fix}, or recompile the artifact")
    return path, got


def _model_sha(path: Path) -> str:
    from .loaders import open_model

    return open_model(path).sha256


def _q0f32_build(source: Path, context_window: int, chunk: int, into: Path) -> Path:
    from .compile import CompileArgs, compile_model
    from .config import RuntimeOptions

    out = into / "reference-q0f32"
    log.warning("building a q0f32 reference from %s into a temporary folder (transformers is not used)", source)
    rt = RuntimeOptions(context_window=context_window, prefill_chunk=min(chunk, 256))
    compile_model(CompileArgs(model=str(source), output=out, target="host", quant="q0f32", runtime=rt))
    return out


def _reference(args: VerifyArgs, art: EngineScorer, tmp: Path,
               loaded: TransformersScorer | None) -> tuple[Callable, str, str, str, object]:
    """(logits function, description, kind, source check, scorer) of the reference asked for."""
    threads = args.threads
    if loaded is not None:  # a transformers model the caller loaded from the artifact's source
        source, sha = check_source(art.manifest)
        if loaded.path.resolve() != source.resolve():
            raise VerifyError(f"the loaded reference reads {loaded.path}, not the artifact's source {source}; load "
                              "the source or pass the model with --reference")
        note = f"{source} matches the manifest (sha256 {sha[:16]}...)"
        return loaded.logits, f"transformers fp32 reading {source}", "transformers", note, loaded
    if args.reference is not None and (args.reference / "manifest.json").exists():  # another artifact
        ref = EngineScorer(args.reference, threads)
        same = ref.manifest.get("model", {}).get("source_sha256") == art.manifest.get("model", {}).get("source_sha256")
        desc = f"artifact {args.reference} ({ref.manifest['quant']['scheme']}, {ref.manifest['target']['preset']})"
        note = "same source sha256 as the artifact" if same else "compiled from a different source than the artifact"
        return ref.logits, desc, "artifact", note, ref
    if args.reference is not None:
        if not args.reference.exists():
            raise VerifyError(f"--reference {args.reference} does not exist; pass a model (HF folder or .gguf) or an "
                              "artifact folder")
        source, sha = args.reference, _model_sha(args.reference)
        want = art.manifest.get("model", {}).get("source_sha256")
        note = ("given with --reference; same sha256 as the artifact's source" if sha == want
                else "given with --reference; differs from the artifact's recorded source")
    else:
        source, sha = check_source(art.manifest)
        note = f"{source} matches the manifest (sha256 {sha[:16]}...)"
    kind = args.reference_kind
    if kind == "auto":
        kind = "transformers" if transformers_available() else "q0f32"
    if kind == "transformers":
        if not transformers_available():
            raise VerifyError("the transformers reference needs torch and transformers (pip install torch "
                              "transformers); or use the q0f32 reference")
        try:
            ref = TransformersScorer(source, threads)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a model it cannot read
            if args.reference_kind == "transformers":
                raise VerifyError(f"transformers cannot read {source} ({type(exc).__name__}: {exc}); use the q0f32 "
                                  "reference instead") from None
            log.warning("transformers cannot read %s (%s); using a q0f32 build", source, exc)
            kind = "q0f32"
        else:
            return ref.logits, f"transformers fp32 reading {source}", "transformers", note, ref
    built = _q0f32_build(source, art.context_window, args.chunk_tokens, tmp)
    ref = EngineScorer(built, threads)
    return ref.logits, f"edgellm q0f32 of {source}, compiled for this run", "q0f32", note, ref


def _bounds(args: VerifyArgs, total: Metrics) -> list[str]:
    out = []
    if args.min_agreement is not None and 100 * total.agreement < args.min_agreement:
        out.append(f"top-1 agreement {100 * total.agreement:.2f}% is below --min-agreement {args.min_agreement:g}%")
    if args.max_ppl_increase is not None and 100 * total.ppl_increase > args.max_ppl_increase:
        out.append(f"perplexity increase {100 * total.ppl_increase:+.2f}% ({total.perplexity:.3f} vs reference "
                   f"{total.ref_perplexity:.3f}) is above --max-ppl-increase {args.max_ppl_increase:g}%")
    return out


def verify(args: VerifyArgs, loaded_reference: TransformersScorer | None = None) -> VerifyResult:
    """Score the artifact and the reference on the text, chunk by chunk; the result carries every bound not met.
    loaded_reference: the source already loaded in transformers (used instead of loading it again; the source is
    still checked against the manifest)."""
    text_name, text = read_text(args.text)
    if loaded_reference is not None and args.reference is not None:
        raise VerifyError("give either a reference path or a loaded reference model, not both")
    art = EngineScorer(args.artifact, args.threads, device=args.device, mode=args.path)
    with tempfile.TemporaryDirectory(prefix="edgellm-verify-") as tmp:
        ref_logits, desc, kind, note, ref = _reference(args, art, Path(tmp), loaded_reference)
        if ref.vocab_size != art.vocab_size:
            raise VerifyError(f"the reference has {ref.vocab_size} vocabulary entries and the artifact "
                              f"{art.vocab_size}; compare models that share a tokenizer")
        ids = art.encode(text)
        if isinstance(ref, EngineScorer) and ref.encode(text) != ids:
            raise VerifyError(f"the reference artifact {args.reference} tokenizes the text differently from the "
                              "artifact; compare artifacts of the same model")
        window = min(art.context_window, getattr(ref, "context_window", art.context_window))
        chunk = min(args.chunk_tokens, window)
        chunks = make_chunks(ids, chunk, art.bos)[: args.max_chunks]
        if not chunks:
            raise VerifyError(f"the text {text_name} has {len(ids)} token(s); give at least 2 tokens of text")
        results, totals = score_chunks(ref_logits, art.logits, chunks, chunk - (art.bos is not None))
    m = art.manifest
    return VerifyResult(artifact=str(args.artifact), scheme=m["quant"]["scheme"], target=m["target"]["preset"],
                        reference=desc, reference_kind=kind, source_check=note, text=text_name, text_tokens=len(ids),
                        chunk_tokens=chunk, path=args.path, device=art.device, chunks=results, total=totals,
                        bounds={"min_agreement": args.min_agreement, "max_ppl_increase": args.max_ppl_increase},
                        failures=_bounds(args, totals))
