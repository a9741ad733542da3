"""The ``puregmm`` command line: ``fit``, ``score``, ``sample``, ``impute`` and ``demo``.

The CLI only reads files, calls the library and writes files; all maths is in the library.
The parser is in :mod:`puregmm._cli_parser`, the commands in :mod:`puregmm._cli_fit` and
:mod:`puregmm._cli_use`; this module is the entry point and maps errors to exit codes:

* 0: success.
* 2: bad usage or bad input, one line on stderr, no traceback: a ``ValueError`` (which includes
  ``UnicodeDecodeError``), a path that is missing, in the way or not writable
  (``FileNotFoundError``, ``FileExistsError``, ``PermissionError``, ``IsADirectoryError``,
  ``NotADirectoryError``), and an ``OSError`` the environment causes (disk full, read-only file
  system, name too long, symlink loop). Set ``PUREGMM_TRACEBACK=1`` to see the traceback too.
* 1: anything else, a genuine bug, with its traceback.
* 130: interrupted (Ctrl-C); a file being written is left as it was.

Every file the CLI writes (model, checkpoint, report, picture, scores, samples, imputed data,
points) is checked before any work and written whole or not at all, to the resolved target,
never over an input (:mod:`puregmm._files`).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Sequence

import torch

from puregmm._cli_common import PROG, UsageError
from puregmm._cli_fit import CHECKPOINT
from puregmm._cli_parser import build_parser

__all__ = ["CHECKPOINT", "PROG", "UsageError", "build_parser", "main"]

BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# OSErrors the user's environment causes, not puregmm: a full disk, a read-only file system, ...
BAD_ERRNO = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG", "ENAMETOOLONG", "ELOOP", "EACCES", "EPERM", "ENXIO", "ETXTBSY")
    if hasattr(errno, name)
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # e.g. `puregmm score ... | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_bad_input(err):
            traceback.print_exc()
            print(
                f"{PROG} {args.command}: unexpected error (a bug? please report it with the traceback above)",
                file=sys.stderr,
            )
            return 1
        if os.environ.get("PUREGMM_TRACEBACK"):
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


def is_bad_input(err: BaseException) -> bool:
    """Whether ``err`` is the user's input or environment (exit 2) rather than a bug (exit 1)."""
    return isinstance(err, BAD_INPUT) or (isinstance(err, OSError) and err.errno in BAD_ERRNO)


def one_line(err: BaseException) -> str:
    """The error's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(err).split()) or type(err).__name__
