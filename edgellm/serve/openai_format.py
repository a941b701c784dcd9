"""OpenAI response shapes: errors, whole completions, and the chunks of a streamed one (as dicts; the routes send them
as JSON or as server-sent events)."""

from __future__ import annotations

import json

from ..device_runners.batch import Finished
from ..device_runners.engine import FinishReason
from .reasoning import ReasoningParser

# OpenAI's finish_reason for ours: a full context window is "length" there; the others keep their names
OPENAI_FINISH_REASON = {FinishReason.CONTEXT: "length"}


def openai_finish_reason(reason: FinishReason | str) -> str:
    return OPENAI_FINISH_REASON.get(reason, str(reason))


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def json_response(body: dict, status_code: int = 200, headers: dict | None = None):
    """A JSON response whose rendering cannot fail: ASCII escapes, so a lone surrogate echoed from a request
    cannot make the encoder raise mid-response."""
    from fastapi.responses import Response

    return Response(json.dumps(body, ensure_ascii=True), status_code=status_code, headers=headers,
                    media_type="application/json")


def usage(fin: Finished) -> dict:
    return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
            "total_tokens": fin.prompt_tokens + fin.completion_tokens}


def full_response(kind: str, text: str, fin: Finished, reasoning: ReasoningParser | None, return_reasoning: bool,
                  meta: dict) -> dict:
    """A whole `text_completion` (kind "text") or `chat.completion` (kind "chat", reasoning split out)."""
    if kind == "text":
        return {**meta, "object": "text_completion", "usage": usage(fin),
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": openai_finish_reason(fin.reason)}]}
    r1, c1 = reasoning.feed(text)
    r2, c2 = reasoning.flush()
    message = {"role": "assistant", "content": c1 + c2}
    if return_reasoning and (r1 + r2):
        message["reasoning_content"] = r1 + r2
    return {**meta, "object": "chat.completion", "usage": usage(fin),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": openai_finish_reason(fin.reason)}]}


class StreamChunks:
    """The chunks of one streamed answer: `start()`, `text(piece)` per token, `finish(Finished)` at the end."""

    def __init__(self, kind: str, meta: dict, reasoning: ReasoningParser | None, return_reasoning: bool,
                 include_usage: bool):
        self.kind, self.meta, self.reasoning = kind, meta, reasoning
        self.return_reasoning, self.include_usage = return_reasoning, include_usage
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _chunk(self, delta: dict | str | None, finish: str | None = None, usage_: dict | None = None,
               choices: bool = True) -> dict:
        body = {**self.meta, "object": self.object}
        if choices:
            c = {"index": 0, "finish_reason": finish, "logprobs": None}
            c.update({"delta": delta or {}} if self.kind == "chat" else {"text": delta or ""})
            body["choices"] = [c]
        else:
            body["choices"] = []
        if usage_ is not None:
            body["usage"] = usage_
        return body

    def _deltas(self, text: str, final: bool = False) -> list:
        if self.kind == "text":
            return [text] if text else []
        r, c = self.reasoning.feed(text)
        if final:
            r2, c2 = self.reasoning.flush()
            r, c = r + r2, c + c2
        out = []
        if r and self.return_reasoning:
            out.append({"reasoning_content": r})
        if c:
            out.append({"content": c})
        return out

    def start(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})] if self.kind == "chat" else []

    def text(self, piece: str) -> list[dict]:
        return [self._chunk(d) for d in self._deltas(piece)]

    def finish(self, fin: Finished) -> list[dict]:
        out = [self._chunk(d) for d in self._deltas(fin.tail, final=True)]
        out.append(self._chunk(None, finish=openai_finish_reason(fin.reason)))
        if self.include_usage:
            out.append(self._chunk(None, choices=False, usage_=usage(fin)))
        return out
