"""OpenAI-compatible serving over a device runner: `edgellm serve ARTIFACT` (see docs/serving.md)."""

from .app import ServeArgs, Server, create_app, serve

__all__ = ["ServeArgs", "Server", "create_app", "serve"]
