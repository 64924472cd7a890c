"""The ``adaptsoup`` command: the Typer app, its entry point (one-line errors, exit 2), and where each
command lives: ``info`` (:mod:`adaptsoup_cli.info`), ``export`` / ``predict`` (:mod:`adaptsoup_cli.deploy`),
``adapt`` (:mod:`adaptsoup_cli.adapt`), ``mix`` / ``interpolate`` (:mod:`adaptsoup_cli.mix`), ``tta``
(:mod:`adaptsoup_cli.tta`), ``bench ...`` (:mod:`adaptsoup_cli.bench`).  Commands import torch, timm and the
benchmarks only when they run.

Errors a user can fix (bad paths, bad options, unreadable checkpoints) print one line and exit 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import click
import typer

from adaptsoup.errors import AdaptsoupError
from adaptsoup_cli import adapt, bench, deploy, estimate, info, mix, tta
from adaptsoup_cli.common import err

app = typer.Typer(
    name="adaptsoup",
    help="Self-Soupervision: make a deployed ViT robust to distribution shift without target labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(info.info)
app.command()(deploy.export)
app.command()(deploy.predict)
app.command()(adapt.adapt)
app.command()(mix.mix)
app.command()(mix.interpolate)
app.command()(tta.tta)
app.command()(estimate.estimate)
app.add_typer(bench.bench_app, name="bench")


# ----------------------------------------------------------------------------------------------------------------


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """The click exception class ``name`` from click and, where Typer vendors its own click, from Typer's."""
    found = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored  # typer >= 0.20 ships its own click

        found.append(getattr(vendored, name))
    except (ImportError, AttributeError):
        pass
    return tuple(found)


NO_ARGS = _click_exceptions("NoArgsIsHelpError") if hasattr(click.exceptions, "NoArgsIsHelpError") else _click_exceptions("UsageError")[1:]
USAGE = _click_exceptions("UsageError")
ABORT = _click_exceptions("Abort")


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point: one-line errors, exit 2 for usage and input errors."""
    try:
        code = app(args=argv, standalone_mode=False, prog_name="adaptsoup")
    except NO_ARGS:
        code = 2  # the help text has been shown
    except USAGE as exc:
        err.print(f"adaptsoup: error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        code = 2
    except AdaptsoupError as exc:
        err.print(f"adaptsoup: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        code = 2
    except OSError as exc:  # a destination that cannot be written, a disk that is full ...: one line, not a traceback
        err.print(f"adaptsoup: error: {os_error_line(exc)}", markup=False, highlight=False, soft_wrap=True)
        code = 2
    except (KeyboardInterrupt, *ABORT):
        err.print("adaptsoup: interrupted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


def os_error_line(exc: OSError) -> str:
    """``Permission denied: /path/file`` (both file names for a rename), on one line."""
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    text = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"{text}: {' -> '.join(names)}" if names else text


if __name__ == "__main__":
    main()
