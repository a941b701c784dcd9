"""OpenAI request bodies -> typed requests, with 400-style errors that name the field and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import re

from ..device_runners.sampling import MAX_SEED, SamplingParams


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
    """A short repr for an error message (a request may hold a 4000-digit integer, whose repr raises)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"a {v.bit_length()}-bit integer"
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _get(body: dict, name: str, types: type | tuple, default=None, check=None, hint: str = ""):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and types in (int, float, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {v!r}", name)
    if not isinstance(v, types):
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise RequestError(f"'{name}' must be {want}, got {type(v).__name__}", name)
    if check is not None and not check(v):
        raise RequestError(f"'{name}' = {_show(v)} is out of range{': ' + hint if hint else ''}", name)
    return v


_TOKEN_ID = re.compile(r"[0-9]{1,12}")


def _common(body: Any) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    n = _get(body, "n", int, 1)
    if n != 1:
        raise RequestError(f"'n' = {_show(n)} is not supported; this server returns one choice (n=1)", "n")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = stop
    else:
        raise RequestError("'stop' must be a string or a list of up to 16 strings", "stop")
    stops = [s for s in stops if s]  # an empty stop string would end every answer before it starts
    max_tokens = _get(body, "max_completion_tokens", int, None) or _get(body, "max_tokens", int, None)
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
    # temperatures below sampling.GREEDY_BELOW are greedy; NaN and infinities never get here (json refuses them)
    temperature = float(_get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "use 0..2"))
    top_p = float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "use (0, 1]"))
    seed = _get(body, "seed", int, None, lambda v: 0 <= v <= MAX_SEED, "use an integer in [0, 2**64)")
    bias_in = _get(body, "logit_bias", dict, {})
    logit_bias = {}
    for k, v in bias_in.items():
        if not _TOKEN_ID.fullmatch(k):
            raise RequestError(f"'logit_bias' key {_show(k)} is not a token id (a decimal integer)", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise RequestError(f"'logit_bias' value for {k} must be a number in [-100, 100]", "logit_bias")
        logit_bias[int(k)] = float(v)
    stream = bool(_get(body, "stream", bool, False))
    opts = _get(body, "stream_options", dict, {})
    try:
        sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, stop=list(stops))
    except ValueError as exc:  # the checks above should have caught it; never a 500
        raise RequestError(str(exc)) from None
    return dict(
        stream=stream, include_usage=bool(opts.get("include_usage", False)), max_tokens=max_tokens,
        sampling=sampling, logit_bias=logit_bias,
    )


def _text_of(content: Any, i: int) -> str:
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
                raise RequestError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat(body: Any) -> ParsedRequest:
    common = _common(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        messages.append({**{k: v for k, v in m.items() if k not in ("content",)}, "content": _text_of(m.get("content"), i)})
    kwargs = dict(_get(body, "chat_template_kwargs", dict, {}))
    enable_thinking = _get(body, "enable_thinking", bool, None)
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    return_reasoning = _get(body, "return_reasoning", bool, True)
    return ParsedRequest(**common, messages=messages, template_kwargs=kwargs, return_reasoning=return_reasoning)


def parse_completion(body: Any) -> ParsedRequest:
    common = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass
    elif not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string, a list of one string, or a list of token ids", "prompt")
    if body.get("echo"):
        raise RequestError("'echo' is not supported", "echo")
    if common["max_tokens"] is None:
        common["max_tokens"] = 16  # OpenAI's default for /v1/completions
    return ParsedRequest(**common, prompt=prompt)
