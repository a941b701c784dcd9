"""The `edgellm` command: each subcommand parses options and calls one API function."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .cli_support import echo_stream
from .cli_support import guard as _guard
from .quant.schemes import HEAD_CHOICES, SCHEMES

DEFAULT_PROMPT = "What is the capital of France?"


class TargetType(click.ParamType):
    name = "target"

    def convert(self, value, param, ctx):
        from .targets import TargetError, resolve

        try:
            resolve(value)
        except TargetError as exc:
            self.fail(str(exc), param, ctx)
        return value


def _positive(**values) -> None:
    """Refuse counts that make no sense (threads 0, -n -3, ...): one line naming the option and the fix."""
    for opt, (value, least) in values.items():
        if value is not None and value < least:
            raise click.ClickException(f"--{opt.replace('_', '-')} {value} is out of range: it must be >= {least}")


def _text_arg(value: str, what: str) -> str:
    """A command-line string that must be valid UTF-8 (Python keeps undecodable bytes as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise click.ClickException(f"the {what} is not valid UTF-8 text; pass it in a UTF-8 locale or re-encode it "
                                   "(e.g. iconv -t UTF-8)") from None
    return value


def _list_opts(ctx, _param, value):
    if value:
        from .kernels.options import describe

        click.echo(describe())
        ctx.exit(0)


def _runner_options(verb: str):
    """The options run and bench share: threads, device, pinned digest, and the fleet's tracker and key."""
    options = [
        click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores)."),
        click.option("--device", default=None, metavar="KIND[:N]",
                     help="Device to run on, e.g. vulkan:1 (the second Vulkan adapter); default: the artifact's, "
                          "index 0."),
        click.option("--expect-digest", default=None, metavar="HEX",
                     help="Refuse the artifact unless its root digest (printed by compile and run) starts with HEX."),
        click.option("--tracker", default=None, metavar="HOST:PORT",
                     help=f"{verb} on a fleet device: the TVM RPC tracker."),
        click.option("--key", default=None,
                     help="With --tracker: the device key (e.g. rpi5); waits in the tracker's queue."),
    ]

    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


@click.group()
@click.option("-v", "--verbose", count=True, help="-v: phase timings; -vv: debug logs.")
@click.version_option(package_name="edgellm")
def cli(verbose: int) -> None:
    """Compile LLMs for edge devices with Apache TVM Relax, run and benchmark the artifacts.

    \b
    edgellm compile --target host --quant q4f32_1 -o dist/smollm2-host
    edgellm run dist/smollm2-host "What is the capital of France?"
    edgellm bench dist/smollm2-host -p 128 -n 128 --reps 5 --format md
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command()
@click.argument("model", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--target", "-t", default="host", show_default=True, type=TargetType(),
              help="Preset name (see `edgellm targets`) or a TVM target JSON.")
@click.option("--quant", "-q", default=None, type=click.Choice(sorted(SCHEMES)),
              help="Weight quantization scheme [default: the source's own grid where one holds it exactly (a GGUF's "
                   "Q4_1 / Q4_0 layers: q4f32_2 on CPUs, q4f16_2 / q4f16_0 on CUDA, Metal, Android; GPTQ / AWQ: "
                   "their import rows), else the target's (`edgellm targets`); the summary's scheme: line says "
                   "which and why].")
@click.option("--head", default=None, type=click.Choice(HEAD_CHOICES),
              help="Precision of the embedding and LM head [default: source-faithful: 8-bit (Q8_0 grid) from a "
                   "Q8_0/F16/BF16/F32 source, the layers' 4-bit from a 4-bit one].")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Artifact directory to create.")
@click.option("--context-window", default=2048, show_default=True, help="Max tokens per sequence (KV cache size).")
@click.option("--prefill-chunk", default=256, show_default=True, help="Max tokens per prefill call.")
@click.option("--page-size", default=16, show_default=True, help="KV cache page size in tokens.")
@click.option("--max-batch", default=1, show_default=True, help="Max concurrent sequences in the KV cache.")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="Write the IR after each phase here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact at --output.")
@click.option("--opt", "opts", multiple=True, metavar="NAME=VALUE",
              help="Kernel option (repeatable), e.g. --opt cuda_gemm=simt; --list-opts lists them.")
@click.option("--list-opts", is_flag=True, is_eager=True, expose_value=False, callback=_list_opts,
              help="List the kernel options and their values, then exit.")
def compile(model, target, quant, head, output, context_window, prefill_chunk, page_size, max_batch, dump_ir,
            overwrite, opts):
    """Compile MODEL (HF checkpoint folder or .gguf; default: embedded SmolLM2-135M-Instruct) into an artifact.

    \b
    edgellm compile --target host -o dist/smollm2-host
    edgellm compile ./Qwen2.5-0.5B-Instruct/ --quant q4f32_1 -o dist/qwen-host
    """
    from .compile import CompileArgs, compile_model
    from .config import RuntimeOptions
    from .kernels import KernelOptions

    args = _guard(lambda: CompileArgs(
        model=str(model) if model else None, output=output, target=target, quant=quant,
        runtime=RuntimeOptions(context_window, prefill_chunk, page_size, max_batch), dump_ir=dump_ir,
        overwrite=overwrite, kernel_options=KernelOptions.parse(opts), head=head))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = _stderr()
    console.print(f"[bold]edgellm compile[/bold]\n{args.display()}")
    columns = (TextColumn("{task.fields[phase]:<9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("", total=None, phase="start")
        state = {"phase": None}

        def progress(name, detail="", done=None, total=None):
            if name != state["phase"]:  # a new phase: log the last one's line, restart the bar
                state["phase"] = name
                console.log(f"{name}: {detail}")
                bar.reset(task, total=total, completed=0, phase=name, description=detail)
            bar.update(task, completed=done if done is not None else 0, total=total,
                       description=detail or bar.tasks[0].description)

        result = _guard(compile_model, args, progress)
    console.print(result.summary())


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("prompt", required=False, default=DEFAULT_PROMPT)
@click.option("--max-tokens", "-n", default=256, show_default=True, help="Max new tokens.")
@click.option("--no-chat", is_flag=True, help="Raw completion: no chat template.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True, help="0 = off.")
@click.option("--repetition-penalty", default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--emulate", is_flag=True, help="Run an aarch64 CPU artifact (rpi4/rpi5) here under qemu-aarch64-static.")
@_runner_options("Run")
def run(artifact, prompt, max_tokens, no_chat, temperature, top_p, top_k, repetition_penalty, seed, stop, threads,
        emulate, device, expect_digest, tracker, key):
    """Stream the model's answer to PROMPT; prefill and decode tok/s go to stderr.

    The speeds are this one request's, after one warm-up step; `edgellm bench` gives steady-state figures.

    \b
    edgellm run dist/smollm2-host "What is the capital of France?"
    edgellm run dist/smollm2-host "Once upon a time" --no-chat --temperature 0.8 --seed 1
    """
    from .device_runners.engine import Engine
    from .device_runners.sampling import SamplingParams

    _positive(max_tokens=(max_tokens, 0), threads=(threads, 1))
    prompt = _text_arg(prompt, "prompt")
    stop = [_text_arg(x, "--stop string") for x in stop]
    sampling = _guard(SamplingParams, temperature, top_p, top_k, repetition_penalty, seed, stop)
    if (tracker or key) and (device or emulate):
        raise click.ClickException("--device / --emulate pick a local device; with --tracker the device is the one "
                                   "serving --key")
    if emulate:
        _guard(_run_emulated, artifact, prompt, max_tokens, not no_chat, sampling, threads)
        return
    if tracker or key:
        _guard(_run_fleet, tracker, key, artifact, prompt, max_tokens, not no_chat, sampling, threads)
        return
    engine = _guard(Engine, artifact, device=device, threads=threads, expect_digest=expect_digest)
    click.echo(f"artifact {artifact}: root digest {engine.art.digest}", err=True)
    if engine.device_info.kind not in ("cpu", "cuda"):
        click.echo(f"device {engine.device_info.describe()}", err=True)
    _guard(engine.warmup)

    def stream():
        for piece in engine.generate(prompt, max_tokens, sampling, chat=not no_chat):
            click.echo(piece, nl=False)
        click.echo()

    _guard(stream)
    s = engine.last_stats
    click.echo(f"prefill: {s.prompt_tokens} tokens, {s.prefill_tps:.1f} tok/s | decode: {s.generated_tokens} tokens, "
               f"{s.decode_tps:.1f} tok/s | finish: {s.finish_reason} (this request; `edgellm bench` for steady state)",
               err=True)


def _run_emulated(artifact, prompt, max_tokens, chat, sampling, threads):
    from dataclasses import asdict

    from .device_runners.emulate import stream_remote

    req = {"op": "run", "prompt": prompt, "chat": chat, "max_new_tokens": max_tokens, "sampling": asdict(sampling),
           "threads": threads}
    echo_stream(stream_remote(artifact, req), emulated=True)


def _run_fleet(tracker, key, artifact, prompt, max_tokens, chat, sampling, threads):
    from .fleet.cli import run_on_device

    run_on_device(tracker, key, artifact, prompt, max_tokens, chat, sampling, threads)


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-p", "--n-prompt", default=128, show_default=True, help="Prompt tokens (test ppN); 0 skips.")
@click.option("-n", "--n-gen", default=128, show_default=True, help="Generated tokens (test tgN); 0 skips.")
@click.option("--reps", default=5, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--format", "fmt", default="md", show_default=True, type=click.Choice(["md", "json", "jsonl", "csv"]))
@_runner_options("Benchmark")
def bench(artifact, n_prompt, n_gen, reps, warmup, fmt, threads, device, expect_digest, tracker, key):
    """Benchmark prefill (ppN) and decode (tgN) llama-bench style; records on stdout, logs on stderr."""
    from .device_runners.bench import format_records, run_bench
    from .device_runners.engine import Engine

    _positive(n_prompt=(n_prompt, 0), n_gen=(n_gen, 0), reps=(reps, 1), warmup=(warmup, 0), threads=(threads, 1))
    if n_prompt == 0 and n_gen == 0:
        raise click.ClickException("-p 0 and -n 0 leave nothing to measure; give -p N (prefill) and/or -n N (decode)")
    if (tracker or key) and device:
        raise click.ClickException("--device picks a local device; with --tracker the device is the one serving --key")
    if tracker or key:
        from .fleet.cli import bench_on_device

        click.echo(_guard(bench_on_device, tracker, key, artifact, n_prompt, n_gen, reps, warmup, threads, fmt,
                          expect_digest))
        return
    engine = _guard(Engine, artifact, device=device, threads=threads, expect_digest=expect_digest)
    info = engine.device_info  # a Vulkan adapter's name and driver go into the records
    records = _guard(run_bench, engine, n_prompt, n_gen, reps, warmup,
                     device_name=info.describe() if info.kind not in ("cpu", "cuda") else None)
    click.echo(format_records(records, fmt))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def targets(as_json):
    """List the target presets."""
    from .targets import table

    rows = table()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("preset", "device", "host", "export", "toolchain", "default quant", "features", "description",
              caption="TVM target JSON per preset: edgellm targets --json")
    for r in rows:
        feats = ", ".join(f"{k}={v}" for k, v in r["features"].items())
        t.add_row(r["name"], r["device"], r["host"], r["export"], r["toolchain"], r["default_quant"], feats,
                  r["description"])
    Console(width=220).print(t)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters(as_json):
    """List this machine's Vulkan adapters (--device vulkan:N for --target vulkan artifacts), with the widest
    --opt webgpu_subgroups each one runs (its subgroups probed once: opens the device)."""
    from .runtime.devices import vulkan_devices

    rows = _guard(vulkan_devices)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("device", "name", "driver", "type", "shader-f16", "subgroup lanes", "--opt webgpu_subgroups",
              caption="no Vulkan adapter found" if not rows else None)
    for r in rows:
        t.add_row(r["device"], r["name"], r["driver"], r["type"], "yes" if r["shader_f16"] else "no",
                  str(r["subgroup_lanes"]), f"up to {r['webgpu_subgroups']}" if r["webgpu_subgroups"] != "off"
                  else "off")
    Console(width=200).print(t)


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback should also set --api-key or --hmac-secret.")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--api-key", envvar="EDGELLM_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (env EDGELLM_API_KEY).")
@click.option("--hmac-secret", envvar="EDGELLM_HMAC_SECRET", default=None,
              help="Require X-Timestamp + X-Signature = hex HMAC-SHA256(secret, timestamp \\n METHOD \\n path \\n body) on /v1/* "
                   "(env EDGELLM_HMAC_SECRET).")
@click.option("--hmac-window", default=300.0, show_default=True,
              help="Seconds a signed request stays valid; replays inside it are refused.")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, help="Largest request body accepted (413 above).")
@click.option("--max-active", type=int, default=None,
              help="Max sequences decoding together (default: the artifact's --max-batch).")
@click.option("--max-queue", default=64, show_default=True, help="Requests that may wait; beyond it: 503 + Retry-After.")
@click.option("--queue-timeout", default=60.0, show_default=True, help="Seconds a request may wait before 503.")
@click.option("--batch-min", type=int, default=None,
              help="Decode with batch_decode from this many active sequences (default: measured at start).")
@click.option("--model-id", default=None, help="Model name reported by /v1/models (default: the artifact folder name).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn log level.")
def serve(artifact, host, port, api_key, hmac_secret, hmac_window, max_body_bytes, max_active, max_queue,
          queue_timeout, batch_min, model_id, threads, log_level):
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, SSE streaming).

    Compile with --max-batch N so N requests decode together on one paged KV cache.

    \b
    edgellm compile --target host --max-batch 8 -o dist/smollm2-serve
    edgellm serve dist/smollm2-serve --port 8000
    edgellm serve dist/smollm2-serve --host 0.0.0.0 --api-key "$KEY" --hmac-secret "$SECRET"
    """
    from .serve.app import ServeArgs
    from .serve.app import serve as run_server

    args = _guard(ServeArgs, artifact=artifact, host=host, port=port, api_key=api_key, hmac_secret=hmac_secret,
                  hmac_window=hmac_window, max_body_bytes=max_body_bytes, max_active=max_active, max_queue=max_queue,
                  queue_timeout=queue_timeout, batch_min=batch_min, threads=threads, model_id=model_id,
                  log_level=log_level)
    _stderr().print(f"[bold]edgellm serve[/bold]\n{args.display()}")
    _guard(run_server, args)


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--platform", "platform_", required=True, type=click.Choice(["android", "ios"]),
              help="android: arm64-v8a Gradle/CMake module; ios: xcframework + .bundle.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Package folder to create.")
@click.option("--name", default="edgellm_model", show_default=True,
              help="C identifier naming lib<name>.a, <name>.h and the weights folder.")
@click.option("--simulator-artifact", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="iOS: a second artifact compiled for arm64-apple-ios*-simulator, added as the simulator slice.")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder at --output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def package(artifact, platform_, output, name, simulator_artifact, overwrite, as_json):
    """Package a compiled Android or iOS ARTIFACT into what an app build links: static library, C header,
    weights bundle and app config (see docs/packaging.md).

    \b
    edgellm compile ./Qwen2.5-0.5B-Instruct/ --target android -o dist/qwen-android
    edgellm package dist/qwen-android --platform android -o dist/qwen-android-pkg
    edgellm package dist/qwen-ios --platform ios -o dist/qwen-ios-pkg --name qwen
    """
    from .package import PackageArgs, package_artifact

    args = _guard(PackageArgs, artifact=artifact, platform=platform_, output=output, name=name,
                  simulator_artifact=simulator_artifact, overwrite=overwrite)
    _stderr().print(f"[bold]edgellm package[/bold]\n{args.display()}")
    result = _guard(package_artifact, args)
    if as_json:
        click.echo(json.dumps({"output": str(result.output), "platform": result.platform, "slices": result.slices,
                               "library": str(result.library), "header": str(result.header),
                               "bundle": str(result.bundle), "system_lib_prefix": result.prefix,
                               "files": result.files, "bytes": result.bytes}))
    else:
        click.echo(result.summary())


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--reference", "-r", type=click.Path(path_type=Path), default=None, metavar="MODEL_OR_ARTIFACT",
              help="Model (HF folder or .gguf) or artifact to compare with; default: the artifact's recorded source.")
@click.option("--reference-kind", default="auto", show_default=True, type=click.Choice(["auto", "transformers", "q0f32"]),
              help="How a model reference runs: transformers fp32, or an edgellm q0f32 build made for this run "
                   "(auto: transformers when installed).")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text file to score; default: the built-in public-domain prose (~2,000 tokens).")
@click.option("--chunk-tokens", default=256, show_default=True, help="Tokens per teacher-forced chunk (capped at the context window).")
@click.option("--max-chunks", type=int, default=None, help="Score only the first N chunks.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json"]))
@click.option("--min-agreement", type=float, default=None, metavar="PCT",
              help="Exit 1 when top-1 agreement is below PCT percent (e.g. 95).")
@click.option("--max-ppl-increase", type=float, default=None, metavar="PCT",
              help="Exit 1 when perplexity exceeds the reference's by more than PCT percent (e.g. 0.5).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--path", "score_path", default="prefill", show_default=True, type=click.Choice(["prefill", "decode"]),
              help="How the artifact computes each position: prefill (one forward a chunk) or decode (one decode "
                   "step a token after a one-token prefill: the kernels that generate text).")
@click.option("--device", default=None, metavar="KIND[:N]",
              help="Device the artifact runs on, e.g. vulkan:1; default: the artifact's, index 0.")
def verify(artifact, reference, reference_kind, text, chunk_tokens, max_chunks, fmt, min_agreement, max_ppl_increase,
           threads, score_path, device):
    """Teacher-forced top-1 agreement, mean KL(reference || artifact) and perplexity of ARTIFACT against a
    reference, per chunk of a text and in total (docs/fidelity.md).

    \b
    edgellm verify dist/smollm2-host
    edgellm verify dist/smollm2-host --reference dist/smollm2-q0f32 --format json
    edgellm verify dist/smollm2-host --text book.txt --min-agreement 95 --max-ppl-increase 1
    edgellm verify dist/smollm2-vulkan --path decode --device vulkan:0
    """
    from .verify import VerifyArgs, verify as run_verify

    _positive(threads=(threads, 1))
    args = _guard(VerifyArgs, artifact=artifact, reference=reference, reference_kind=reference_kind, text=text,
                  chunk_tokens=chunk_tokens, max_chunks=max_chunks, threads=threads, min_agreement=min_agreement,
                  max_ppl_increase=max_ppl_increase, path=score_path, device=device)
    result = _guard(run_verify, args)
    click.echo(json.dumps(result.to_json(), indent=2) if fmt == "json" else result.table())
    if result.failures:
        raise click.ClickException("; ".join(result.failures))


from .fleet.cli import device, devices, report  # noqa: E402  (fleet commands: fleet/cli.py)

cli.add_command(device)
cli.add_command(devices)
cli.add_command(report)


def main() -> None:
    cli(prog_name="edgellm")


if __name__ == "__main__":
    main()
