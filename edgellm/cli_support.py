"""What every command shares: user errors turned into one line, and the printing of a remote generation. Its own
module so that cli.py and the fleet's commands (fleet/cli.py) both import it without importing each other."""

from __future__ import annotations

import click


def known_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are user errors: each becomes one line, exit 1."""
    from .artifact import ArtifactError
    from .config import ConfigError
    from .device_runners.emulate import EmulationError
    from .device_runners.engine import PromptTooLongError
    from .device_runners.text import ChatTemplateError
    from .fleet import FleetError
    from .loaders import SourceError
    from .package import PackageError
    from .quant.convert import WeightMapError
    from .targets import TargetError

    return (ArtifactError, ConfigError, EmulationError, PromptTooLongError, ChatTemplateError, SourceError,
            WeightMapError, TargetError, PackageError, FleetError, ValueError, OSError)


def guard(fn, *args, **kwargs):
    """fn(*args, **kwargs), with a user error (known_errors) turned into a one-line ClickException."""
    try:
        return fn(*args, **kwargs)
    except known_errors() as exc:
        raise click.ClickException(str(exc)) from exc


def echo_stream(messages, device: str | None = None, emulated: bool = False) -> None:
    """Print a remote generation's `piece` messages as they come, then its `stats` line on stderr."""
    for msg in messages:
        if "piece" in msg:
            click.echo(msg["piece"], nl=False)
        elif "stats" in msg:
            s = msg["stats"]
            click.echo()
            click.echo((f"device '{device}': " if device else "")
                       + f"prefill: {s['prompt_tokens']} tokens, {s['prefill_tps']:.1f} tok/s | decode: "
                       f"{s['generated_tokens']} tokens, {s['decode_tps']:.1f} tok/s | finish: {s['finish_reason']}"
                       + (" (emulated: speeds are not the device's)" if emulated else ""), err=True)
