"""`edgellm serve`'s options, checked when made: one line naming a bad value and the fix (the CLI prints it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ServeArgs:
    artifact: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    hmac_secret: str | None = None
    hmac_window: float = 300.0
    max_body_bytes: int = 1 << 20
    max_active: int | None = None  # default: the artifact's max_batch
    max_queue: int = 64
    queue_timeout: float = 60.0
    batch_min: int | None = None  # smallest batch decoded with batch_decode; None: measured at start
    threads: int | None = None
    model_id: str | None = None  # default: the artifact directory's name
    log_level: str = "info"
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection is closed after this
    head_timeout: float = 10.0  # a request line + headers must arrive within this (slow-loris clients)
    body_timeout: float = 30.0  # the body must arrive within this once the head has (408 otherwise)

    def __post_init__(self) -> None:
        self.artifact = Path(self.artifact)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a TCP port (0-65535)")
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes {self.max_body_bytes} is too small; use at least 1024")
        if self.max_active is not None and self.max_active < 1:
            raise ValueError(f"--max-active must be >= 1, got {self.max_active}; leave it out to use the artifact's "
                             "max_batch")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.batch_min is not None and self.batch_min < 1:
            raise ValueError(f"--batch-min must be >= 1, got {self.batch_min}; leave it out to measure at start")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}; leave it out to use the physical cores")
        for flag, v in (("--queue-timeout", self.queue_timeout), ("--hmac-window", self.hmac_window),
                        ("keep_alive_timeout", self.keep_alive_timeout), ("head_timeout", self.head_timeout),
                        ("body_timeout", self.body_timeout)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{flag} must be a number of seconds > 0, got {v}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key is empty; pass a non-empty key or leave the option out")
        if self.hmac_secret is not None and not self.hmac_secret:
            raise ValueError("--hmac-secret is empty; pass a non-empty secret or leave the option out")
        self.model_id = self.model_id or self.artifact.resolve().name

    def display(self) -> str:
        d = asdict(self)
        for k in ("api_key", "hmac_secret"):
            d[k] = "(set)" if d[k] else None
        return "\n".join(f"  {k:<15} {v}" for k, v in d.items())
