"""``main``: parse the command line, run the command, and turn any error into one line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import TextIO

from captum_nmf.cli.allocator import keep_freed_memory
from captum_nmf.cli.commands import COMMANDS
from captum_nmf.cli.errors import flag_spelling
from captum_nmf.cli.parser import build_parser
from captum_nmf.cli.threads import fit_threads_to_cpus

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used by the console script).

    Like the ``captum-nmf`` process, the calling process then keeps glibc's
    freed memory (unless ``--return-memory``) and runs torch on no more
    threads than the CPUs it may use (:mod:`captum_nmf.cli.allocator`,
    :mod:`captum_nmf.cli.threads`).

    Args:
        argv (Sequence[str], optional): the arguments.
                    Default: None (``sys.argv[1:]``)

    Returns:
        *int*: 0 on success, 1 on an error (one line on stderr), 130 on Ctrl-C;
        bad usage exits 2 through argparse.
    """
    args = build_parser().parse_args(argv)
    if not args.return_memory:
        keep_freed_memory()  # this process is ours: no page faults per batch (allocator.py)
    try:
        fit_threads_to_cpus()  # no more threads than a container's CPU quota (threads.py)
        with warnings.catch_warnings(), _library_log(args.debug):
            if not args.debug:  # one line each, as errors are (Python's own format with --debug)
                warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"captum-nmf: interrupted{_after_interrupt(args)}", file=sys.stderr)
        return 130
    except Exception as exc:  # every error becomes one line unless --debug
        if args.debug:
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"captum-nmf: error: {flag_spelling(message)}", file=sys.stderr)
        return 1


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A warning as one line ``captum-nmf: warning: <message>`` on stderr, in flag spelling."""
    text = str(message).splitlines()[0] if str(message) else category.__name__
    print(f"captum-nmf: warning: {flag_spelling(text)}", file=sys.stderr if file is None else file)


class _FirstLine(logging.Formatter):
    """A library log record as ``captum-nmf: <its first line>`` (tracebacks under --debug)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"captum-nmf: {record.getMessage().splitlines()[0]}"


@contextlib.contextmanager
def _library_log(debug: bool) -> Iterator[None]:
    """The library's log records on stderr while a command runs: first lines, all with --debug.

    A cohort logs each failed slide with its traceback; without a handler Python
    would print every traceback (30 lines for two slides), besides the one-line
    failures the command prints itself.
    """
    logger = logging.getLogger("captum_nmf")
    handler = logging.StreamHandler(sys.stderr)
    if not debug:
        handler.setFormatter(_FirstLine())
    before = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # not twice through a handler of the root logger
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = before


def _after_interrupt(args: argparse.Namespace) -> str:
    """What an interrupted command kept, and how to go on (only ``explain`` resumes)."""
    if args.command != "explain":
        return ""
    if len(args.slide) > 1 or args.ray is not None:  # a cohort skips what is finished
        return " (finished slides and chunks are kept; run the same command again to go on)"
    return " (finished chunks are kept; rerun with --resume)"
