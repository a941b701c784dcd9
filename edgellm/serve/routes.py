"""The FastAPI application: routes and error handlers over a `Server` (engine, scheduler, auth; serve/app.py).

GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with SSE streaming), GET /health,
GET /metrics (Prometheus text). /v1/* routes pass the optional API-key and HMAC checks; /health and /metrics carry
no user data and stay open for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from ..device_runners.batch import QueueFullError
from .openai_format import error_body, json_response
from .protocol import RequestError, parse_chat, parse_completion
from .reasoning import ReasoningParser, starts_in_reasoning
from .security import AuthError

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger("edgellm.serve")


def build_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        yield
        server.scheduler.stop()

    app = FastAPI(title="edgellm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _req_err(request, exc: RequestError):
        # a request whose body was not read to the end (408) leaves the connection unusable: close it
        headers = {"Connection": "close"} if exc.status == 408 else None
        return json_response(error_body(str(exc), param=exc.param, code=exc.code), exc.status, headers)

    @app.exception_handler(AuthError)
    async def _auth_err(request, exc: AuthError):
        return json_response(error_body(str(exc), "authentication_error", code="invalid_auth"), 401,
                             {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(QueueFullError)
    async def _busy(request, exc: QueueFullError):
        return json_response(error_body(str(exc), "server_busy", code="overloaded"), 503,
                             {"Retry-After": str(max(1, round(exc.retry_after)))})

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return json_response(error_body("internal server error; see the server log", "server_error"), 500)

    @app.get("/health")
    async def health():
        """200 and status ok, or 503 naming the problem: the engine thread is gone, or KV pages leaked."""
        s = server.scheduler.stats()
        problem = s.leak or (None if server.scheduler.alive else "the engine thread is not running")
        return json_response(
            {"status": "error" if problem else "ok", "problem": problem, "model": server.args.model_id,
             "active": s.active_sequences, "queued": s.queue_length, "kv_pages_in_use": s.kv_pages_in_use,
             "kv_pages_reserved": s.kv_pages_reserved, "kv_pages_reserved_active": s.kv_pages_reserved_active,
             "kv_pages_total": s.kv_pages_total}, 503 if problem else 200)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.text(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        await server.authorized_body(request)
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        await server.authorized_body(request)
        if model_id != server.args.model_id:
            raise RequestError(f"model {model_id!r} is not served here; this server serves "
                               f"{server.args.model_id!r}", "model", "model_not_found", 404)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_chat(await server.json_body(request))
        # template + tokenizer off the event loop: a long prompt must not stall the other streams
        prompt_text = await asyncio.to_thread(server.render, req)
        ids = await asyncio.to_thread(server.engine.codec.encode, prompt_text, False)
        reasoning = ReasoningParser(starts_in_reasoning(prompt_text))
        return await server.respond(request, req, ids, "chat", reasoning)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion(await server.json_body(request))
        ids = req.prompt if isinstance(req.prompt, list) else await asyncio.to_thread(server.engine.codec.encode,
                                                                                       req.prompt)
        return await server.respond(request, req, ids, "text", None)

    return app
