"""The OpenAI-compatible HTTP server: FastAPI routes over one BatchScheduler (one engine thread, one KV cache).

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with SSE streaming), GET /health,
GET /metrics (Prometheus text). /v1/* routes pass the optional API-key and HMAC checks; /health and /metrics carry
no user data and stay open for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from ..device_runners.batch import (BatchScheduler, Failed, Finished, GenRequest, InvalidRequestError,
                                     QueueFullError, Token)
from ..device_runners.engine import Engine, PromptError, PromptTooLongError
from ..device_runners.text import ChatTemplateError
from .args import ServeArgs
from .connection import head_timeout_protocol
from .metrics import Metrics
from .protocol import ParsedRequest, RequestError, parse_chat, parse_completion
from .reasoning import ReasoningParser, starts_in_reasoning
from .security import AuthError, HmacVerifier, check_api_key, is_loopback

log = logging.getLogger("edgellm.serve")


def _error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


MAX_JSON_DEPTH = 32  # an OpenAI request nests 5 deep; chat_template_kwargs may add a few


def _json_response(body: dict, status_code: int = 200, headers: dict | None = None):
    """A JSON response whose rendering cannot fail: ASCII escapes, so a lone surrogate echoed from a request
    cannot make the encoder raise mid-response."""
    from fastapi.responses import Response

    return Response(json.dumps(body, ensure_ascii=True), status_code=status_code, headers=headers,
                    media_type="application/json")


def _reject_constant(name: str):
    raise RequestError(f"the request body holds {name}, which is not JSON; send finite numbers", code="invalid_json")


def _check_json(value) -> None:
    """Refuse what json.loads lets through but nothing downstream can use: nesting deeper than MAX_JSON_DEPTH and
    strings with lone surrogates (from \\ud800-style escapes; they cannot be encoded as UTF-8)."""
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


class Server:
    """Holds the engine, the scheduler and the security checks; `app` is the ASGI application."""

    def __init__(self, args: ServeArgs, engine: Engine | None = None):
        self.args = args
        self.engine = engine or Engine(args.artifact, threads=args.threads)
        self.scheduler = BatchScheduler(self.engine, args.max_active, args.max_queue, args.queue_timeout,
                                        args.batch_min)
        self.hmac = HmacVerifier(args.hmac_secret, args.hmac_window) if args.hmac_secret else None
        self.metrics = Metrics(self.scheduler)
        self.started = time.time()
        self.app = self._build_app()

    # ---- plumbing -----------------------------------------------------------------------------------------------
    def _build_app(self):
        from contextlib import asynccontextmanager

        from fastapi import FastAPI
        from fastapi.responses import PlainTextResponse

        @asynccontextmanager
        async def lifespan(app):
            self.scheduler.start()
            yield
            self.scheduler.stop()

        app = FastAPI(title="edgellm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(RequestError)
        async def _req_err(request, exc: RequestError):
            # a request whose body was not read to the end (408) leaves the connection unusable: close it
            headers = {"Connection": "close"} if exc.status == 408 else None
            return _json_response(_error_body(str(exc), param=exc.param, code=exc.code), exc.status, headers)

        @app.exception_handler(AuthError)
        async def _auth_err(request, exc: AuthError):
            return _json_response(_error_body(str(exc), "authentication_error", code="invalid_auth"), 401,
                                  {"WWW-Authenticate": "Bearer"})

        @app.exception_handler(QueueFullError)
        async def _busy(request, exc: QueueFullError):
            return _json_response(_error_body(str(exc), "server_busy", code="overloaded"), 503,
                                  {"Retry-After": str(max(1, round(exc.retry_after)))})

        @app.exception_handler(Exception)
        async def _internal(request, exc: Exception):
            log.exception("unhandled error on %s", request.url.path)
            return _json_response(_error_body("internal server error; see the server log", "server_error"), 500)

        @app.get("/health")
        async def health():
            """200 and status ok, or 503 naming the problem: the engine thread is gone, or KV pages leaked."""
            s = self.scheduler.stats()
            problem = s.leak or (None if self.scheduler.alive else "the engine thread is not running")
            return _json_response(
                {"status": "error" if problem else "ok", "problem": problem, "model": self.args.model_id,
                 "active": s.active_sequences, "queued": s.queue_length, "kv_pages_in_use": s.kv_pages_in_use,
                 "kv_pages_reserved": s.kv_pages_reserved, "kv_pages_reserved_active": s.kv_pages_reserved_active,
                 "kv_pages_total": s.kv_pages_total}, 503 if problem else 200)

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self.metrics.text(), media_type=self.metrics.content_type)

        @app.get("/v1/models")
        async def models(request: Request):
            await self._authorized_body(request)
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model_id}")
        async def model(model_id: str, request: Request):
            await self._authorized_body(request)
            if model_id != self.args.model_id:
                raise RequestError(f"model {model_id!r} is not served here; this server serves "
                                   f"{self.args.model_id!r}", "model", "model_not_found", 404)
            return self._model_card()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            req = parse_chat(await self._json(request))
            # template + tokenizer off the event loop: a long prompt must not stall the other streams
            prompt_text = await asyncio.to_thread(self._render, req)
            ids = await asyncio.to_thread(self.engine.codec.encode, prompt_text, False)
            reasoning = ReasoningParser(starts_in_reasoning(prompt_text))
            return await self._respond(request, req, ids, "chat", reasoning)

        @app.post("/v1/completions")
        async def completions(request: Request):
            req = parse_completion(await self._json(request))
            ids = req.prompt if isinstance(req.prompt, list) else await asyncio.to_thread(self.engine.codec.encode,
                                                                                           req.prompt)
            return await self._respond(request, req, ids, "text", None)

        return app

    def _model_card(self) -> dict:
        m = self.engine.art.manifest
        return {"id": self.args.model_id, "object": "model", "created": int(self.started), "owned_by": "edgellm",
                "context_window": self.engine.context_window, "max_batch": int(self.engine.runtime["max_batch"]),
                "quant": m.get("quant", {}).get("scheme"), "arch": m.get("model", {}).get("arch")}

    async def _read_body(self, request) -> bytes:
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and len(declared) < 20 and int(declared) > limit:
            raise RequestError(f"request body is {declared} bytes; the limit is {limit} (--max-body-bytes)",
                               code="body_too_large", status=413)
        if declared is not None and declared.isdigit() and len(declared) >= 20:
            raise RequestError(f"request body is over {limit} bytes (--max-body-bytes)", code="body_too_large",
                               status=413)
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(f"request body exceeds {limit} bytes (--max-body-bytes)",
                                       code="body_too_large", status=413)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.args.body_timeout)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {self.args.body_timeout:g} s",
                               code="request_timeout", status=408) from None
        return b"".join(chunks)

    async def _authorized_body(self, request) -> bytes:
        body = await self._read_body(request)
        if self.args.api_key:
            check_api_key(self.args.api_key, request.headers.get("authorization"))
        if self.hmac:
            target = request.scope.get("raw_path") or request.url.path.encode()
            if request.scope.get("query_string"):
                target += b"?" + request.scope["query_string"]
            self.hmac.verify(request.headers.get("x-timestamp"), request.headers.get("x-signature"), request.method,
                             target, body)
        return body

    async def _json(self, request):
        body = await self._authorized_body(request)
        try:
            value = json.loads(body, parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                               code="invalid_json") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise RequestError(f"the request body is not usable JSON: {str(exc)[:200]}", code="invalid_json") from None
        _check_json(value)
        return value

    def _render(self, req: ParsedRequest) -> str:
        try:
            return self.engine.codec.apply_chat_template(req.messages, add_generation_prompt=True,
                                                         **req.template_kwargs)
        except ChatTemplateError as exc:
            raise RequestError(f"chat template: {exc}", "messages") from None
        except Exception as exc:  # jinja errors from a user-supplied message shape
            raise RequestError(f"the chat template failed on these messages: {exc}", "messages") from None

    # ---- generation -----------------------------------------------------------------------------------------------
    async def _respond(self, request, req: ParsedRequest, ids: list[int], kind: str,
                       reasoning: ReasoningParser | None):
        from fastapi.responses import StreamingResponse

        ctx = self.engine.context_window
        if not ids:
            raise RequestError("the prompt is empty", "prompt" if kind == "text" else "messages")
        if len(ids) > ctx - 2:  # the sequence must stay below the window with at least one generated token
            raise RequestError(
                f"the prompt has {len(ids)} tokens but this model's context window is {ctx} tokens (prompt plus "
                f"completion); shorten the prompt or recompile with a larger --context-window",
                "messages" if kind == "chat" else "prompt", "context_length_exceeded")
        max_tokens = min(req.max_tokens or ctx, ctx - 1 - len(ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gen = GenRequest(ids, max_tokens, req.sampling, req.logit_bias,
                         emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        try:
            self.scheduler.submit(gen)
        except PromptTooLongError as exc:
            raise RequestError(str(exc), code="context_length_exceeded") from None
        except PromptError as exc:  # an empty prompt
            raise RequestError(str(exc), "prompt") from None
        except InvalidRequestError as exc:  # token ids outside the vocabulary, ...
            raise RequestError(str(exc), exc.param) from None
        except ValueError as exc:
            raise RequestError(str(exc), "max_tokens") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        meta = dict(id=rid, created=int(time.time()), model=self.args.model_id)
        if req.stream:
            first = await self._first_event(queue, gen, request)
            if isinstance(first, Failed):
                self.scheduler.cancel(gen)
                raise first.error
            return StreamingResponse(self._sse(request, req, gen, queue, first, kind, reasoning, meta),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(self._cancel_on_disconnect(request, gen, queue))
        try:
            text, fin = [], None
            async for ev in self._events(queue, gen, request, None):
                if isinstance(ev, Token):
                    text.append(ev.text)
                elif isinstance(ev, Finished):
                    text.append(ev.tail)
                    fin = ev
                elif isinstance(ev, Failed):
                    raise ev.error
        finally:
            watcher.cancel()
            self.scheduler.cancel(gen)  # no-op when finished; frees the sequence when the client went away
        if fin is None:  # client disconnected
            return _json_response(_error_body("client disconnected", "cancelled"), 499)
        return self._full_response(req, "".join(text), fin, kind, reasoning, meta)

    async def _cancel_on_disconnect(self, request, gen, queue) -> None:
        """Non-streaming requests: the body is read, so the next ASGI message is the client going away."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.scheduler.cancel(gen)
                queue.put_nowait(None)  # wake the waiting handler
                return

    async def _first_event(self, queue, gen, request):
        """Wait for the first event before sending 200, so a queue timeout still becomes a 503."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.scheduler.cancel(gen)
                    return Failed(QueueFullError("client disconnected while queued"))

    async def _events(self, queue, gen, request, first) -> AsyncIterator:
        if first is not None:
            yield first
            if isinstance(first, (Finished, Failed)):
                return
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if ev is None:  # the disconnect watcher woke us
                return
            yield ev
            if isinstance(ev, (Finished, Failed)):
                return

    def _full_response(self, req, text: str, fin: Finished, kind: str, reasoning, meta) -> dict:
        usage = {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
                 "total_tokens": fin.prompt_tokens + fin.completion_tokens}
        if kind == "text":
            return {**meta, "object": "text_completion", "usage": usage,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": fin.reason}]}
        r1, c1 = reasoning.feed(text)
        r2, c2 = reasoning.flush()
        message = {"role": "assistant", "content": c1 + c2}
        if req.return_reasoning and (r1 + r2):
            message["reasoning_content"] = r1 + r2
        return {**meta, "object": "chat.completion", "usage": usage,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": fin.reason}]}

    async def _sse(self, request, req, gen, queue, first, kind, reasoning, meta):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: dict | str | None, finish=None, usage=None, choices=True) -> str:
            body = {**meta, "object": obj}
            if choices:
                c = {"index": 0, "finish_reason": finish, "logprobs": None}
                c.update({"delta": delta or {}} if kind == "chat" else {"text": delta or ""})
                body["choices"] = [c]
            else:
                body["choices"] = []
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def deltas(text: str, final: bool = False):
            if kind == "text":
                return [text] if text else []
            r, c = reasoning.feed(text)
            if final:
                r2, c2 = reasoning.flush()
                r, c = r + r2, c + c2
            out = []
            if r and req.return_reasoning:
                out.append({"reasoning_content": r})
            if c:
                out.append({"content": c})
            return out

        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            async for ev in self._events(queue, gen, request, first):
                if isinstance(ev, Token):
                    for d in deltas(ev.text):
                        yield chunk(d)
                elif isinstance(ev, Finished):
                    for d in deltas(ev.tail, final=True):
                        yield chunk(d)
                    yield chunk(None, finish=ev.reason)
                    if req.include_usage:
                        yield chunk(None, choices=False, usage={
                            "prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                            "total_tokens": ev.prompt_tokens + ev.completion_tokens})
                    yield "data: [DONE]\n\n"
                elif isinstance(ev, Failed):
                    yield f"data: {json.dumps(_error_body(str(ev.error), 'server_error'))}\n\n"
                    return
        finally:
            # runs on normal end, on client disconnect (generator closed / cancelled) and on errors
            self.scheduler.cancel(gen)

    # ---- metrics --------------------------------------------------------------------------------------------------
    def metrics_text(self) -> str:
        return self.metrics.text()


def create_app(args: ServeArgs, engine: Engine | None = None):
    return Server(args, engine).app


def serve(args: ServeArgs) -> None:
    """Load the artifact, start the engine thread and run uvicorn until interrupted."""
    import uvicorn

    if not is_loopback(args.host) and not (args.api_key or args.hmac_secret):
        log.warning("serving on %s without --api-key or --hmac-secret: anyone who can reach this address can use "
                    "the model", args.host)
    server = Server(args)
    log.info("serving %s (%s) on http://%s:%d", args.model_id, args.artifact, args.host, args.port)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                http=head_timeout_protocol(args.head_timeout), timeout_keep_alive=args.keep_alive_timeout)
