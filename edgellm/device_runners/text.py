"""Tokenizer + chat template, UTF-8-safe streaming detokenization, stop strings."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    pass


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """A chat template compiled once (sandboxed, with the helpers transformers gives templates)."""
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ChatTemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not parse: {exc}") from None


def render_chat_template(template: str, messages: list[dict], cfg: dict, add_generation_prompt: bool = True,
                         **extra) -> str:
    import jinja2

    try:
        return _compiled_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=cfg.get("bos_token", ""), eos_token=cfg.get("eos_token", ""), **extra)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from None


class TextCodec:
    """tokenizer.json + tokenizer_config.json (chat template, bos/eos) of an artifact."""

    def __init__(self, tokenizer_dir: Path | None, add_bos: bool = False, bos_id: int | None = None, *,
                 files: tuple[Path, Path | None] | None = None):
        """files=(tokenizer.json, tokenizer_config.json or None) names the files exactly (an artifact passes its
        checked paths); otherwise both are looked up in tokenizer_dir."""
        tok_path, cfg_path = files or (tokenizer_dir / "tokenizer.json", tokenizer_dir / "tokenizer_config.json")
        try:
            self.tok = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # the tokenizers library raises a bare Exception for a bad file
            raise ChatTemplateError(f"{tok_path} does not load as a tokenizer ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                                    "recompile from a model with a valid tokenizer.json") from None
        self.cfg = json.loads(cfg_path.read_text()) if cfg_path is not None and cfg_path.exists() else {}
        self.add_bos, self.bos_id = add_bos, bos_id

    @classmethod
    def of_artifact(cls, art) -> "TextCodec":
        """The codec of an opened artifact (artifact.Artifact): its checked tokenizer files and the manifest's bos."""
        m = art.info
        return cls(None, add_bos=m.add_bos_token, bos_id=m.bos_token_id,
                   files=(art.path("tokenizer/tokenizer.json"), art.listed("tokenizer/tokenizer_config.json")))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        template = self.cfg.get("chat_template")
        if not template:
            raise ChatTemplateError("this model has no chat template; use --no-chat for raw completion")
        return render_chat_template(template, messages, self.cfg, add_generation_prompt, **extra)


class StreamDecoder:
    """Turns a growing token list into text pieces, never splitting a multi-byte UTF-8 character.

    The tokenizers library's `DecodeStream` does the work (HF's two-offset method in Rust: text decoded from a prefix
    window, only the part past it is new, a piece ending in U+FFFD is held back until a later token completes it);
    this class adds `flush()` for what is still held back when generation ends.
    """

    def __init__(self, codec: TextCodec):
        from tokenizers.decoders import DecodeStream

        self.codec, self.ids = codec, []
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held_from = 0  # ids[_held_from:] produced no text yet

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self._stream.step(self.codec.tok, token)
        if not piece:
            return ""
        self._held_from = len(self.ids)
        return piece

    def flush(self) -> str:
        """Whatever is still held back at the end of generation (U+FFFD for an incomplete character)."""
        context = self.ids[max(self._held_from - 1, 0) : self._held_from]  # the token before, for decoders that
        held = self.ids[self._held_from :]  # treat a sequence's first token specially (a leading space)
        self._held_from = len(self.ids)
        self._stream = type(self._stream)(skip_special_tokens=True)  # as after a piece: no window carried over
        if not held:
            return ""
        return self.codec.decode(context + held)[len(self.codec.decode(context)) :]


class StopMatcher:
    """Streams text through, holding back any tail that could start a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        cut = min((self.pending.find(s) for s in self.stops if s in self.pending), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
