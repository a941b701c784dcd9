"""OpenAI request bodies -> typed requests (pydantic models), with 400-style errors that name the field and the fix.

`parse_json_body` turns the raw bytes into JSON, refusing what Python's json module lets through but nothing
downstream can use; `parse_chat` / `parse_completion` validate it with the models below (strict types: no "5" for 5,
no true for 1; unknown fields are ignored, as OpenAI clients send many) and return a `ParsedRequest`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..device_runners.sampling import MAX_SEED, SamplingParams

MAX_JSON_DEPTH = 32  # an OpenAI request nests 5 deep; chat_template_kwargs may add a few
MAX_STOP_STRINGS = 16
_TOKEN_ID = re.compile(r"[0-9]{1,12}")


class RequestError(ValueError):
    """HTTP 4xx in OpenAI's error format."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass
class ParsedRequest:
    stream: bool
    include_usage: bool
    max_tokens: int | None
    sampling: SamplingParams
    logit_bias: dict[int, float]
    # chat only
    messages: list[dict] = field(default_factory=list)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    return_reasoning: bool = True
    # completions only
    prompt: str | list[int] | None = None


def _show(v) -> str:
    """A short repr for an error message (a request may hold a 4000-digit integer)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"a {v.bit_length()}-bit integer"
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


# ---- the body --------------------------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise RequestError(f"the request body holds {name}, which is not JSON; send finite numbers", code="invalid_json")


def _check_json(value) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings with lone surrogates (from \\ud800-style escapes; they
    cannot be encoded as UTF-8, so no tokenizer or response encoder can take them)."""
    stack = [(value, 1, "body")]
    while stack:
        v, depth, where = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                                   "send valid Unicode text", code="invalid_json") from None
            continue
        if not isinstance(v, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        items = v.items() if isinstance(v, dict) else enumerate(v)
        for k, item in items:
            if isinstance(k, str):
                stack.append((k, depth, f"{where} (a key)"))
            stack.append((item, depth + 1, f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]"))


def parse_json_body(body: bytes) -> Any:
    """JSON from request bytes: not UTF-8, not JSON, NaN/Infinity, deeper than MAX_JSON_DEPTH, an integer over 4300
    digits or a lone surrogate are a RequestError (400), never an exception of the json module."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise RequestError(f"the request body is not usable JSON: {str(exc)[:200]}", code="invalid_json") from None
    _check_json(value)
    return value


# ---- the models ------------------------------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, hide_input_in_errors=True)


class StreamOptions(_Model):
    include_usage: bool = False


class _Common(_Model):
    n: int | None = None
    stop: Any = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # below sampling.GREEDY_BELOW: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    logit_bias: dict[str, Any] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n is not None and n != 1:
            raise ValueError(f"n = {_show(n)} is not supported; this server returns one choice (n=1)")
        return n

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop):
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in stop)):
            raise ValueError(f"must be a string or a list of up to {MAX_STOP_STRINGS} strings")
        return [s for s in stop if s]  # an empty stop string would end every answer before it starts

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1, got {_show(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias):
        out = {}
        for k, v in (bias or {}).items():
            if not _TOKEN_ID.fullmatch(k):
                raise ValueError(f"key {_show(k)} is not a token id (a decimal integer)")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise ValueError(f"value for {k} must be a number in [-100, 100]")
            out[int(k)] = float(v)
        return out

    def common(self) -> dict:
        try:
            sampling = SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                                      top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
                                      stop=list(self.stop or []))
        except ValueError as exc:  # the fields above should have caught it; never a 500
            raise RequestError(str(exc)) from None
        return dict(stream=bool(self.stream), include_usage=bool(self.stream_options and
                                                                 self.stream_options.include_usage),
                    max_tokens=self.max_completion_tokens or self.max_tokens, sampling=sampling,
                    logit_bias=self.logit_bias or {})


class Message(_Model):
    model_config = ConfigDict(extra="allow")  # other keys (name, tool_calls, ...) go to the chat template
    role: str
    content: Any = None

    @field_validator("content")
    @classmethod
    def _text(cls, content):
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    raise ValueError("only text parts ({'type': 'text', 'text': ...}) are supported")
            return "".join(parts)
        raise ValueError("must be a string or a list of text parts")


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None


class CompletionRequest(_Common):
    prompt: Any
    echo: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise ValueError("must be a string, a list of one string, or a non-empty list of token ids")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo):
        if echo:
            raise ValueError("is not supported")
        return echo


def _validate(model: type[_Model], body: Any) -> _Model:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [p for p in err["loc"] if isinstance(p, (str, int))]
        param = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc)) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        raise RequestError(f"'{param}' {msg}" if param else msg, param) from None


def parse_chat(body: Any) -> ParsedRequest:
    req = _validate(ChatRequest, body)
    messages = [{**(m.model_extra or {}), "role": m.role, "content": m.content} for m in req.messages]
    kwargs = dict(req.chat_template_kwargs or {})
    if req.enable_thinking is not None:
        kwargs["enable_thinking"] = req.enable_thinking
    return ParsedRequest(**req.common(), messages=messages, template_kwargs=kwargs,
                         return_reasoning=True if req.return_reasoning is None else req.return_reasoning)


def parse_completion(body: Any) -> ParsedRequest:
    req = _validate(CompletionRequest, body)
    common = req.common()
    if common["max_tokens"] is None:
        common["max_tokens"] = 16  # OpenAI's default for /v1/completions
    return ParsedRequest(**common, prompt=req.prompt)
