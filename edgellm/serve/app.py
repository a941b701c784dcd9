"""The OpenAI-compatible server: one BatchScheduler (one engine thread, one KV cache) behind FastAPI.

This module holds `Server` (the engine, the scheduler, auth, and the request-to-events plumbing) and `serve()`;
routes are in routes.py, request models in protocol.py, response shapes in openai_format.py, /metrics in metrics.py,
options in args.py, the uvicorn protocol with a request-head deadline in connection.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from ..device_runners.batch import (BatchScheduler, Failed, Finished, GenRequest, InvalidRequestError,
                                     QueueFullError, Token)
from ..device_runners.engine import Engine, PromptError, PromptTooLongError
from ..device_runners.text import ChatTemplateError
from .args import ServeArgs
from .connection import head_timeout_protocol
from .metrics import Metrics
from .openai_format import StreamChunks, error_body, full_response, json_response
from .protocol import ParsedRequest, RequestError, parse_json_body
from .reasoning import ReasoningParser
from .routes import build_app
from .security import HmacVerifier, check_api_key, is_loopback

log = logging.getLogger("edgellm.serve")

__all__ = ["ServeArgs", "Server", "create_app", "serve"]


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
        self.app = build_app(self)

    # ---- request plumbing -----------------------------------------------------------------------------------------
    def model_card(self) -> dict:
        m = self.engine.art.manifest
        return {"id": self.args.model_id, "object": "model", "created": int(self.started), "owned_by": "edgellm",
                "context_window": self.engine.context_window, "max_batch": self.engine.runtime.max_batch,
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

    async def authorized_body(self, request) -> bytes:
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

    async def json_body(self, request):
        return parse_json_body(await self.authorized_body(request))

    def render(self, req: ParsedRequest) -> str:
        try:
            return self.engine.codec.apply_chat_template(req.messages, add_generation_prompt=True,
                                                         **req.template_kwargs)
        except ChatTemplateError as exc:
            raise RequestError(f"chat template: {exc}", "messages") from None
        except Exception as exc:  # jinja errors from a user-supplied message shape
            raise RequestError(f"the chat template failed on these messages: {exc}", "messages") from None

    # ---- generation -----------------------------------------------------------------------------------------------
    async def respond(self, request, req: ParsedRequest, ids: list[int], kind: str,
                       reasoning: ReasoningParser | None):
        param = "messages" if kind == "chat" else "prompt"
        try:  # the context-window rule is the engine's (Engine.fits); max_tokens is capped at what it leaves
            self.engine.check_prompt(len(ids))
        except PromptTooLongError as exc:
            raise RequestError(str(exc), param, "context_length_exceeded") from None
        except PromptError:
            raise RequestError("the prompt is empty", param) from None
        room = self.engine.max_new_tokens(len(ids))
        max_tokens = min(req.max_tokens or room, room)
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
            from sse_starlette import EventSourceResponse

            chunks = StreamChunks(kind, meta, reasoning, req.return_reasoning, req.include_usage)
            return EventSourceResponse(self._sse(request, gen, queue, first, chunks), sep="\n")
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
            return json_response(error_body("client disconnected", "cancelled"), 499)
        return full_response(kind, "".join(text), fin, reasoning, req.return_reasoning, meta)

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

    async def _sse(self, request, gen, queue, first, chunks: StreamChunks):
        """Server-sent events of one answer; sse-starlette frames them, pings idle streams and cancels this
        generator when the client goes away."""
        from sse_starlette import ServerSentEvent

        def event(data) -> ServerSentEvent:
            return ServerSentEvent(data=data if isinstance(data, str) else json.dumps(data, ensure_ascii=False))

        try:
            for c in chunks.start():
                yield event(c)
            async for ev in self._events(queue, gen, request, first):
                if isinstance(ev, Token):
                    for c in chunks.text(ev.text):
                        yield event(c)
                elif isinstance(ev, Finished):
                    for c in chunks.finish(ev):
                        yield event(c)
                    yield event("[DONE]")
                elif isinstance(ev, Failed):
                    yield event(error_body(str(ev.error), "server_error"))
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
