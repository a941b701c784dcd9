"""The fleet's Click commands (`device serve`, `devices`, `report`) and the --tracker paths of run / bench; the
main cli.py adds them, so its own hunks stay small."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from ..cli_support import echo_stream
from ..cli_support import guard as _guard


def _need(tracker, key):
    from . import FleetError

    if not tracker or not key:
        raise FleetError("--tracker HOST:PORT and --key KEY go together (the tracker and the device key to use)")


def bench_on_device(tracker, key, artifact, n_prompt, n_gen, reps, warmup, threads, fmt, expect_digest=None) -> str:
    from ..artifact import Artifact
    from ..device_runners.bench import BenchRecord, format_records
    from .client import Device

    _need(tracker, key)
    art = Artifact.open(artifact, verify=True, expect_digest=expect_digest)
    with Device(tracker, key) as dev:
        dev.check_arch(art)
        sent = dev.push(art)
        click.echo(f"device '{key}' ({dev.identity.get('name')}, {dev.identity.get('machine')}"
                   f"{', emulated ' + dev.identity['emulated'] if dev.identity.get('emulated') else ''}): artifact "
                   f"{art.digest[:12]} {'uploaded and verified' if sent else 'already present'}", err=True)
        rows = dev.bench(art, n_prompt, n_gen, reps, warmup, threads)
    return format_records([BenchRecord(**r) for r in rows], fmt)


def run_on_device(tracker, key, artifact, prompt, max_tokens, chat, sampling, threads) -> None:
    from ..artifact import Artifact
    from .client import Device

    _need(tracker, key)
    art = Artifact.open(artifact, verify=True)
    req = {"prompt": prompt, "chat": chat, "max_new_tokens": max_tokens, "sampling": asdict(sampling),
           "threads": threads}
    with Device(tracker, key) as dev:
        dev.check_arch(art)
        dev.push(art)
        echo_stream(dev.run(art, req), device=key, emulated=bool(dev.identity.get("emulated")))


@click.group()
def device():
    """Run this machine as a fleet device (TVM RPC server + edgellm runner)."""


@device.command("serve")
@click.option("--tracker", required=True, metavar="HOST:PORT", help="The TVM RPC tracker to register with.")
@click.option("--key", required=True, help="Device key hosts ask for (e.g. rpi5, orin).")
@click.option("--name", default=None, help="This device's name in records (default: the host name).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the RPC server binds to.")
@click.option("--port", default=9090, show_default=True, help="First port to try (up to --port-end).")
@click.option("--port-end", type=int, default=None, help="End of the port range (default: --port + 100).")
@click.option("--advertise", default=None, metavar="ADDR",
              help="Address the tracker gives hosts (default: the one it sees this device connect from).")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Where uploaded artifacts are kept, one folder per root digest (default ~/.cache/edgellm/fleet).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--emulate", default=None, metavar="CORE",
              help="Serve as an emulated aarch64 board (e.g. cortex-a76 for a Pi 5): the arm64 root's Python under "
                   "qemu-aarch64-static (scripts/arm64-rootfs.sh); its records say emulated.")
def serve(tracker, key, name, host, port, port_end, advertise, cache, threads, emulate):
    """Serve edgellm's runner through TVM's RPC server, registered with TRACKER under KEY (runs until killed)."""
    from .device import serve as run_server
    from .device import serve_emulated

    args = (tracker, key, name, host, port, port_end, advertise, cache, threads)
    if emulate:
        raise SystemExit(_guard(serve_emulated, emulate, *args))
    _guard(run_server, *args)


@click.command()
@click.option("--tracker", required=True, metavar="HOST:PORT", help="The TVM RPC tracker.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def devices(tracker, as_json):
    """List the tracker's device keys: devices, free, busy, queued requests."""
    import json

    from .client import format_devices, list_devices

    rows = _guard(list_devices, tracker)
    if as_json:
        click.echo(json.dumps([{**asdict(r), "busy": r.busy} for r in rows], indent=1))
    else:
        click.echo(format_devices(rows) if rows else f"no devices registered at {tracker}")


@click.command()
@click.argument("records", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Markdown report to write.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Grouped bar chart (PNG) to write.")
def report(records, output, plot):
    """One llama-bench style table over devices and artifacts from bench's JSON/JSONL records."""
    from .report import load_records, write_report

    recs = _guard(load_records, records)
    _guard(write_report, recs, output, plot)
    click.echo(f"wrote {output}" + (f" and {plot}" if plot else "") + f" ({len(recs)} records)", err=True)
