"""Hydra's config composition errors as one `error:` line (exit 2) instead of its multi-line report.

Hydra prints a refused override (`optim.lr=abc`, `model.typo=1`, `attention=foo`, a syntax error) over several
lines plus a hint about HYDRA_FULL_ERROR, and exits 1. `one_line_config_errors` wraps an `@hydra.main` entry
point: it asks Hydra to raise instead of print (HYDRA_FULL_ERROR=1, unless the user set it to see the full
trace), and turns an error raised while composing (no job has started, so no HydraConfig is set) into one line.
An exception raised by the job itself is left alone: Python prints its traceback, as Hydra's would.
"""

from __future__ import annotations

import functools
import os
import sys

from gpt_lightning.common.cli import EXIT_USER_ERROR


def one_line(error: BaseException) -> str:
    """The message of a Hydra/OmegaConf composition error, and of its OmegaConf cause, on one line."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, OverrideParseException):
        return override_parse_error(error.override, _flatten(error.message))
    parts = [_flatten(str(error))]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        parts.append(_flatten(str(cause)))
    return ": ".join(p.rstrip(".") for p in parts if p)


def override_parse_error(override: str, reason: str) -> str:
    """A command-line override Hydra's grammar refused, named; a value with `=` in it (`best-step=3.ckpt`, the
    checkpoint callback's file names) gets the quoting that reads it as one value."""
    message = f"cannot parse the override {override!r}: {reason.rstrip('.')}"
    key, sep, value = override.partition("=")
    if sep and "=" in value and not value.startswith(("'", '"')):
        quoted = f'{key}="{value}"'
        message += f"; a value with '=' in it must be quoted for Hydra: '{quoted}'"
    return message


def _flatten(text: str) -> str:
    """Drop OmegaConf's `full_key:`/`object_type=` lines, Hydra's search path and '+key' hint; join the rest."""
    out: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        if line.startswith(("Config search path", "See https://hydra.cc")):
            break
        if not line.strip() or line.startswith("To append to your config"):
            continue
        if line.startswith("\t"):  # Hydra lists a group's options one per tab-indented line
            options.append(line.strip())
            continue
        if line.startswith("    "):  # OmegaConf's full_key / reference_type / object_type
            continue
        if options:
            out[-1] += " " + ", ".join(options)
            options = []
        out.append(line.strip())
    if options:
        out[-1] += " " + ", ".join(options)
    return "; ".join(line.rstrip(".") for line in out)


def one_line_config_errors(hydra_main):
    """Wrap a `@hydra.main` function: a config that cannot be composed is one `error:` line and exit status 2."""

    @functools.wraps(hydra_main)
    def main(*args, **kwargs):
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's full report
            return hydra_main(*args, **kwargs)
        from hydra.core.hydra_config import HydraConfig
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        os.environ["HYDRA_FULL_ERROR"] = "1"  # raise, don't print: read only when Hydra catches an error
        try:
            return hydra_main(*args, **kwargs)
        except (HydraException, OmegaConfBaseException) as e:
            if HydraConfig.initialized():  # raised by a job, not by composing its config: keep the traceback
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        finally:
            os.environ.pop("HYDRA_FULL_ERROR", None)

    return main
