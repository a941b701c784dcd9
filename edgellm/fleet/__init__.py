"""A fleet of benchmark devices behind TVM's RPC tracker (issue 17).

device.py runs on a device: TVM's own RPC server (registered with the tracker under a key, runtime library only)
with edgellm's runner exposed as RPC functions (`edgellm.fleet.*`). client.py is the host side: it asks the tracker
for a device by key, uploads an artifact through TVM's RPC upload (verified on the device against the manifest's
sha256 before anything is loaded; skipped when the device already holds the same root digest), and runs `bench`
or `run` there. report.py turns the records into a llama-bench style table and a bar chart. No protocol of ours:
the wire is TVM's RPC, the queue is the tracker's.
"""

from __future__ import annotations


class FleetError(RuntimeError):
    """A user-fixable fleet problem (tracker unreachable, no such key, device gone, wrong architecture); the
    message is one line naming the bad value and the fix."""


def parse_tracker(addr: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); anything else raises FleetError."""
    host, sep, port = str(addr).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FleetError(f"--tracker {addr!r} is not HOST:PORT (e.g. 192.168.1.10:9190)")
    return host.strip("[]"), int(port)
