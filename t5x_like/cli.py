"""One error format for every command line: an expected user error is one line,
``error: ...`` on stderr, exit status 2; an unexpected error keeps its traceback.

Expected means: a usage or flag error, or a ``ValueError`` / ``KeyError`` /
``OSError`` family error that this project's own code raised on purpose (its
innermost frame lies in ``t5x_like``, ``configs`` or ``launch``), which is how
config checks, readers and resolvers report bad input, naming the field, file
or line. The same class raised inside jax, numpy or orbax is a bug or an
environment problem and keeps its traceback. ``T5X_LIKE_TRACEBACK=1`` shows the
traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

USAGE_EXIT = 2
_REPO = Path(__file__).resolve().parent.parent
_OUR_CODE = tuple(str(_REPO / d) + os.sep for d in ("t5x_like", "configs", "launch"))
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError)


def _raised_by_us(error: BaseException) -> bool:
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_OUR_CODE)


def is_user_error(error: BaseException) -> bool:
    from absl import app, flags

    if isinstance(error, (app.UsageError, flags.Error, argparse.ArgumentError)):
        return True
    return isinstance(error, _USER_ERRORS) and _raised_by_us(error)


def message(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:  # str(KeyError) adds quotes
        return str(error.args[0])
    return str(error).strip() or type(error).__name__


def exit_with(error: BaseException | str) -> NoReturn:
    text = error if isinstance(error, str) else message(error)
    print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


def guarded(function: Callable) -> Callable:
    """``function`` with expected user errors turned into ``error: ...`` and exit 2."""

    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as e:
            if is_user_error(e) and not os.environ.get("T5X_LIKE_TRACEBACK"):
                exit_with(e)
            raise

    wrapper.__name__ = getattr(function, "__name__", "wrapper")
    wrapper.__doc__ = function.__doc__
    return wrapper


def run_absl(main: Callable, flags_parser: Callable | None = None) -> None:
    """``absl.app.run`` with the error format above for flag parsing and ``main``.

    A config file's own error (an unknown ``:variant``) surfaces while the flags parse,
    so the parser is guarded too."""
    from absl import app, flags

    def parse(argv):
        try:
            return (flags_parser or flags.FLAGS)(argv)
        except SystemExit as e:  # absl ends --help with status 1; help asked for is a success
            if e.code == 1 and any(a in ("--help", "-h", "--helpfull", "-?") for a in argv[1:]):
                sys.exit(0)
            raise
        except flags.Error as e:
            # config_flags wraps a config file's exception; the cause is the message.
            cause = e.__cause__ or e.__context__
            if cause is not None and is_user_error(cause):
                exit_with(cause)
            exit_with(e)
        except app.UsageError as e:
            exit_with(e)

    app.run(guarded(main), flags_parser=guarded(parse))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line format: ``error: ... (see PROG --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        exit_with(f"{message} (see {self.prog} --help)")
