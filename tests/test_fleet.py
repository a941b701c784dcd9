"""The fleet (issue 17), all on 127.0.0.1: one TVM RPC tracker and one device server (key `host`) shared by the
module; every wait is bounded."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

try:  # TVM's tracker needs tornado and cloudpickle (the test and fleet extras)
    import cloudpickle  # noqa: F401
    import tornado  # noqa: F401
except ImportError as exc:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"the fleet tests need {exc.name}: pip install -e '.[test]'", allow_module_level=True)

from edgellm.artifact import Artifact, write_manifest  # noqa: E402
from edgellm.cli import cli  # noqa: E402
from edgellm.fleet import FleetError  # noqa: E402
from edgellm.fleet.client import Device, list_devices, remote_bench  # noqa: E402
from pi_emulation import arm64_root  # noqa: E402,F401  (fixture)

BENCH = ["-p", "8", "-n", "4", "--reps", "2", "--warmup", "0"]


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_server(tracker: str, key: str, cache: Path, name: str | None = None, extra: tuple[str, ...] = ()
                 ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgellm.cli", "device", "serve", *extra, "--tracker", tracker, "--key", key,
           "--host", "127.0.0.1", "--port", "9300", "--port-end", "9400", "--cache", str(cache)] + (["--name", name] if name else [])
    log = open(cache.parent / f"server-{key}.log", "wb")  # a file, not a pipe nobody drains
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ.copy())
    log.close()
    try:
        wait_for(lambda: any(r.key == key and r.free for r in list_devices(tracker)) or proc.poll() is not None,
                 120, f"device server {key} to register")
    except AssertionError:
        stop(proc)
        raise
    assert proc.poll() is None, (cache.parent / f"server-{key}.log").read_text()[-2000:]
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop the server we started and its session processes (its own process group, by id); SIGKILL if SIGTERM
    is not enough within 10 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
    addr = f"127.0.0.1:{tracker.port}"
    cache = tmp_path_factory.mktemp("device-cache")
    proc = start_server(addr, "host", cache, name="ci-host")
    yield {"tracker": addr, "cache": cache}
    stop(proc)
    tracker.terminate()


@pytest.fixture(scope="module")
def art(compiled):
    return compiled("llama", "q0f32")


def variant(src: Path, dst: Path, **manifest_changes) -> Artifact:
    """A copy of `src` with manifest fields changed (so a new root digest), manifest and digest rewritten."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for k, v in manifest_changes.items():
        m[k] = {**m[k], **v} if isinstance(v, dict) else v
    write_manifest(dst, m)
    return Artifact.open(dst, verify=False)


def test_bench_through_tracker_carries_device_identity(fleet, art):
    r = CliRunner().invoke(cli, ["bench", str(art), "--tracker", fleet["tracker"], "--key", "host", *BENCH,
                                 "--format", "json"])
    assert r.exit_code == 0, r.output
    recs = json.loads(r.stdout)
    assert [x["test"] for x in recs] == ["pp8", "tg4"]
    digest = Artifact.open(art, verify=False).digest
    for x in recs:
        ident = x["identity"]
        assert ident["name"] == "ci-host" and ident["machine"] == platform.machine()
        assert ident["artifact_digest"] == digest and ident["emulated"] is None
        assert ident["tvm_compiler_loaded"] is False  # the device server runs the runtime library only
        assert x["avg_ts"] > 0 and len(x["samples_ns"]) == 2
    assert (fleet["cache"] / digest / ".edgellm-installed").is_file()
    again = CliRunner().invoke(cli, ["bench", str(art), "--tracker", fleet["tracker"], "--key", "host", *BENCH])
    assert again.exit_code == 0 and "already present" in again.stderr and "tg4" in again.stdout
    mixed = CliRunner().invoke(cli, ["bench", str(art), "--tracker", fleet["tracker"], "--key", "host", "--device", "cpu"])
    assert mixed.exit_code != 0 and "--device" in mixed.output


def test_run_streams_the_device_tokens(fleet, art):
    args = [str(art), "Hello there", "--no-chat", "-n", "12"]
    local = CliRunner().invoke(cli, ["run", *args])
    remote = CliRunner().invoke(cli, ["run", *args, "--tracker", fleet["tracker"], "--key", "host"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    assert remote.stdout == local.stdout and "device 'host'" in remote.stderr


def test_devices_lists_keys(fleet):
    r = CliRunner().invoke(cli, ["devices", "--tracker", fleet["tracker"], "--json"])
    assert r.exit_code == 0, r.output
    (row,) = [x for x in json.loads(r.stdout) if x["key"] == "host"]
    assert row["total"] == 1 and row["free"] + row["busy"] == 1
    bad = CliRunner().invoke(cli, ["devices", "--tracker", "nowhere"])
    assert bad.exit_code != 0 and "not HOST:PORT" in bad.output


def test_tampered_upload_refused_on_the_device(fleet, art, tmp_path):
    bad = variant(art, tmp_path / "tampered", note="tamper test")
    shard = sorted(bad.root.glob("params/shard_*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with Device(fleet["tracker"], "host") as dev:
        with pytest.raises(FleetError, match=r"params/shard_000.bin fails its sha256 check"):
            dev.push(bad)
        assert dev.call("check", "has", bad.digest) == "0"
    assert not (fleet["cache"] / bad.digest).exists()


def test_other_architecture_refused_before_upload(fleet, art, tmp_path):
    other = "aarch64" if platform.machine() != "aarch64" else "x86_64"
    foreign = variant(art, tmp_path / "foreign", target={"host_triple": f"{other}-linux-gnu", "preset": "rpi5"})
    with pytest.raises(FleetError, match=rf"built for {other} .* is {platform.machine()}"):
        remote_bench(fleet["tracker"], "host", foreign.root, n_prompt=8, n_gen=4, reps=1)
    assert not (fleet["cache"] / foreign.digest).exists()


def test_two_requests_for_one_key_queue(fleet, art):
    got: dict = {}
    holder = Device(fleet["tracker"], "host")  # the only `host` device is now busy

    def second():
        try:
            got["records"] = remote_bench(fleet["tracker"], "host", art, queue_timeout=120, n_prompt=8, n_gen=4,
                                          reps=1)
        except Exception as exc:  # noqa: BLE001
            got["error"] = exc

    t = threading.Thread(target=second)
    t.start()
    wait_for(lambda: any(r.key == "host" and r.pending == 1 for r in list_devices(fleet["tracker"])), 30,
             "the second request to wait in the tracker's queue")
    assert t.is_alive() and not got
    assert holder.call("identity", "identity")  # the first session is still served
    holder.close()
    t.join(120)
    assert not t.is_alive() and "error" not in got, got
    assert [r["test"] for r in got["records"]] == ["pp8", "tg4"]


def test_server_killed_mid_run_gives_a_clear_error(fleet, art, tmp_path):
    proc = start_server(fleet["tracker"], "victim", tmp_path / "cache")
    got: dict = {}
    try:
        dev = Device(fleet["tracker"], "victim")
        a = Artifact.open(art)
        dev.push(a)

        def long_bench():
            try:
                dev.bench(a, n_prompt=64, n_gen=64, reps=10_000)
            except Exception as exc:  # noqa: BLE001
                got["error"] = exc

        t = threading.Thread(target=long_bench)
        t.start()
        time.sleep(1.0)
        assert t.is_alive()
        stop(proc, signal.SIGKILL)  # as a power cut would: no clean-up on the device
        t.join(30)
        assert not t.is_alive()
    finally:
        stop(proc)
    err = got.get("error")
    assert isinstance(err, FleetError) and "device 'victim' failed during bench (it crashed" in str(err), err
    wait_for(lambda: all(r.key != "victim" for r in list_devices(fleet["tracker"])), 30,
             "the tracker to drop the dead server")
    with Device(fleet["tracker"], "host") as dev:  # the queue still serves the other devices
        assert dev.identity["name"] == "ci-host"


def test_report_over_devices(fleet, art, tmp_path):
    remote = tmp_path / "remote.json"
    local = tmp_path / "local.jsonl"
    r1 = CliRunner().invoke(cli, ["bench", str(art), "--tracker", fleet["tracker"], "--key", "host", *BENCH,
                                  "--format", "json"])
    r2 = CliRunner().invoke(cli, ["bench", str(art), *BENCH, "--format", "jsonl"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    remote.write_text(r1.stdout)
    local.write_text(r2.stdout)
    out, png = tmp_path / "report.md", tmp_path / "report.png"
    r = CliRunner().invoke(cli, ["report", str(remote), str(local), "-o", str(out), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| "))
    assert header.split("|")[1].strip() == "device"  # varies: ci-host vs this machine's name
    assert "| scheme |" not in header and "scheme q0f32" in text  # constant: on the line above the table
    rows = [line for line in text.splitlines() if line.startswith("| ci-host |")]
    assert len(rows) == 2 and "build: edgellm" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](report.png)" in text
    bad = tmp_path / "bad.json"
    bad.write_text('[{"test": "pp8"}]')
    r = CliRunner().invoke(cli, ["report", str(bad), "-o", str(tmp_path / "x.md")])
    assert r.exit_code != 0 and "not an edgellm bench record" in r.output and not (tmp_path / "x.md").exists()



def test_emulated_pi5_device(fleet, art, preset_build, arm64_root, tmp_path):
    """An aarch64 device server under qemu (key rpi5) benchmarks a tiny rpi5 artifact (the session's shared rpi5
    build, tests/conftest.py preset_build); its records say aarch64 and emulated, and an x86 artifact is refused
    before upload. The report labels the emulated speeds."""
    pi_art = preset_build("rpi5")
    proc = start_server(fleet["tracker"], "rpi5", tmp_path / "cache", name="pi5-emu",
                        extra=("--emulate", "cortex-a76"))
    try:
        r = CliRunner().invoke(cli, ["bench", str(pi_art), "--tracker", fleet["tracker"], "--key", "rpi5", *BENCH,
                                     "--format", "json"])
        assert r.exit_code == 0, r.output
        wrong = CliRunner().invoke(cli, ["bench", str(art), "--tracker", fleet["tracker"], "--key", "rpi5", *BENCH])
    finally:
        stop(proc)
    recs = json.loads(r.stdout)
    assert [x["test"] for x in recs] == ["pp8", "tg4"]
    for x in recs:
        ident = x["identity"]
        assert ident["machine"] == "aarch64" and ident["emulated"] == "cortex-a76" and ident["name"] == "pi5-emu"
        assert ident["tvm_compiler_loaded"] is False and x["target"] == "rpi5"
    assert wrong.exit_code != 0 and f"built for {platform.machine()}" in wrong.output and "is aarch64" in wrong.output
    host = CliRunner().invoke(cli, ["bench", str(art), "--tracker", fleet["tracker"], "--key", "host", *BENCH,
                                    "--format", "json"])
    assert host.exit_code == 0, host.output
    (tmp_path / "pi.json").write_text(r.stdout)
    (tmp_path / "host.json").write_text(host.stdout)
    out = tmp_path / "report.md"
    rep = CliRunner().invoke(cli, ["report", str(tmp_path / "host.json"), str(tmp_path / "pi.json"), "-o", str(out)])
    assert rep.exit_code == 0, rep.output
    text = out.read_text()
    assert text.count("| pi5-emu (emulated cortex-a76) |") == 2 and text.count("| ci-host |") == 2
    assert "(emulated)" in text and "say nothing about the board" in text
