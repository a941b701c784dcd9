"""uvicorn's HTTP/1.1 protocol with a deadline for the request head.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but once a client has sent a single byte of
a request it waits for the rest for ever: a client that opens connections and sends half a request line holds
them (and their file descriptors) as long as it likes. This protocol arms a timer when a connection opens and after
each response; if a whole request head (request line and headers) has not arrived when it fires, the connection is
closed. The body is bounded separately, by the app (`ServeArgs.body_timeout`).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def head_timeout_protocol(head_timeout: float) -> type[H11Protocol]:
    """An H11Protocol subclass for uvicorn's `http=` setting that closes connections whose request head is not
    complete `head_timeout` seconds after the connection opened or the previous response ended."""

    class HeadTimeoutH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._arm_head_timer()  # before super(): a pipelined request it starts counts as arrived
            super().on_response_complete()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.cycle is not self._head_cycle:  # a request head arrived since the timer was armed
                return
            if not self.transport.is_closing():
                self.logger.debug("closing a connection whose request head took over %g s", head_timeout)
                self.transport.close()

    return HeadTimeoutH11
