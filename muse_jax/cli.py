"""How every muse_jax command reports a user error: one line on stderr, exit code 2 (issue #19).

A *user error* is a bad path, a bad value, an incompatible checkpoint or workdir: something the user fixes by
changing the command, not the code. It prints

    error: <what> (<file/field>): <why>

on stderr and exits with `EXIT_USAGE`. Anything else is a bug and keeps its traceback. `--debug` (or
`MUSE_DEBUG=1`) shows the traceback of a user error too.

Exit codes shared by every CLI (documented in WORKSPACE.md, "Errors and recovery"):

| code | meaning |
|---|---|
| 0 | done, every output written |
| 1 | a bug (traceback printed) |
| 2 | user error (one line on stderr); nothing was changed that a rerun cannot redo |
| 3 | partial: finished, but some inputs were skipped (listed in the command's `summary.json`) |
| 75 | preempted (SIGTERM): a checkpoint was saved, rerun the same command to resume (EX_TEMPFAIL, requeue) |
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Sequence

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_PREEMPTED = 75


class UserError(ValueError):
  """A problem the user fixes by changing the command. `str()` is the one-line message (without `error: `).

  Args:
    what: what is wrong, e.g. "not a finite positive number".
    where: the file, flag or config field, e.g. "--mpp" or "config.data.mpp" or "runs/x/config.json".
    why: optional detail (what was given, what is expected, how to fix it).
  """

  def __init__(self, what: str, where: str | None = None, why: str | None = None):
    self.what, self.where, self.why = what, where, why
    msg = what + (f" ({where})" if where else "") + (f": {why}" if why else "")
    super().__init__(msg)


def format_error(e: BaseException) -> str:
  """The one line printed for a user error."""
  msg = " ".join(str(e).split()) or type(e).__name__
  return f"error: {msg}"


# Exception types that are user errors wherever they come from a CLI's own validation. `FileNotFoundError` and
# `NotADirectoryError` come from opening user paths; library code raises `UserError` for everything else.
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError,
                                                     IsADirectoryError)


def _debug_requested(argv: Sequence[str] | None) -> bool:
  args = sys.argv[1:] if argv is None else list(argv)
  return "--debug" in args or os.environ.get("MUSE_DEBUG", "") not in ("", "0")


def strip_debug(argv: Sequence[str] | None) -> list[str] | None:
  """`argv` without `--debug` (so argparse / absl do not see it); None stays None (= sys.argv[1:])."""
  if argv is None:
    if "--debug" in sys.argv:
      sys.argv[:] = [a for a in sys.argv if a != "--debug"]
    return None
  return [a for a in argv if a != "--debug"]


def run(main: Callable[[list[str] | None], int | None], argv: Sequence[str] | None = None,
        user_errors: tuple[type[BaseException], ...] = USER_ERROR_TYPES) -> int:
  """Calls `main(argv)`; a user error becomes one stderr line and `EXIT_USAGE`. Returns the exit code."""
  debug = _debug_requested(argv)
  return _call(main, strip_debug(argv), debug, user_errors)


def _call(main: Callable, args, debug: bool, user_errors: tuple[type[BaseException], ...]) -> int:
  """`main(args)` as an exit code: its return value (None = 0), or `EXIT_USAGE` after printing a user error."""
  try:
    rc = main(args)
  except user_errors as e:
    if debug:
      raise
    print(format_error(e), file=sys.stderr, flush=True)
    return EXIT_USAGE
  return EXIT_OK if rc is None else int(rc)


class ArgumentParser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` whose errors (unknown flag, missing or mistyped value) are `UserError`s.

  Under `run` a command-line mistake is then one line and exit 2 like any other user error, instead of the usage
  text; `--help` still prints the usage and exits 0.
  """

  def error(self, message: str):
    raise UserError(message, "command line", f"see {self.prog} --help")


# ---------------------------------------------------------------------------------------------------------------
# Value checks shared by the CLIs. Each raises UserError naming the field.


def positive(value: Any, where: str, *, allow_zero: bool = False, upper: float | None = None,
             unit: str = "") -> float:
  """A finite number > 0 (>= 0 with allow_zero, <= upper if given). Returns it as float."""
  try:
    if isinstance(value, bool):
      raise TypeError
    v = float(value)
  except (TypeError, ValueError):
    raise UserError("not a number", where, f"got {value!r}") from None
  u = f" {unit}" if unit else ""
  if not math.isfinite(v):
    raise UserError("not a finite number", where, f"got {value!r}")
  if v < 0 or (v == 0 and not allow_zero):
    raise UserError(f"must be {'>= 0' if allow_zero else '> 0'}", where, f"got {v:g}{u}")
  if upper is not None and v > upper:
    raise UserError(f"must be <= {upper:g}{u}", where, f"got {v:g}{u}")
  return v


def in_range(value: Any, where: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
  """A finite number in [lo, hi] (open ends as flagged). Returns it as float."""
  try:
    if isinstance(value, bool):
      raise TypeError
    v = float(value)
  except (TypeError, ValueError):
    raise UserError("not a number", where, f"got {value!r}") from None
  ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  if not ok:
    raise UserError(f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}", where,
                    f"got {value!r}")
  return v


MPP_RANGE = (0.01, 10.0)
"""Resolutions a command accepts, in µm/px: from far beyond optical resolution to a low-power thumbnail."""


def mpp(value: Any, where: str) -> float:
  """A resolution in µm/px: a finite number in `MPP_RANGE`. Returns it as float."""
  v = positive(value, where, unit="µm/px")
  if not MPP_RANGE[0] <= v <= MPP_RANGE[1]:
    raise UserError(f"must be in [{MPP_RANGE[0]:g}, {MPP_RANGE[1]:g}] µm/px", where, f"got {v:g} µm/px")
  return v


def positive_int(value: Any, where: str, *, allow_zero: bool = False) -> int:
  """An int > 0 (>= 0 with allow_zero)."""
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    value = int(value)
  if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
    raise UserError("not an integer", where, f"got {value!r}")
  v = int(value)
  if v < 0 or (v == 0 and not allow_zero):
    raise UserError(f"must be {'>= 0' if allow_zero else '> 0'}", where, f"got {v}")
  return v


def run_absl(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None,
             user_errors: tuple[type[BaseException], ...] = USER_ERROR_TYPES) -> None:
  """`absl.app.run(main)` with this module's error contract; exits (never returns).

  A bad flag (unknown, wrong type, missing required flag, a config override that does not parse) and a user error
  raised by `main` print one line `error: ...` on stderr and exit `EXIT_USAGE`; `main`'s return value is the exit
  code. `--debug` (or `MUSE_DEBUG=1`, which it sets for library code) shows tracebacks. absl's INFO logging is off
  unless `--verbosity` (or `-v`) is given.
  """
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  debug = _debug_requested(argv)
  if debug:
    os.environ["MUSE_DEBUG"] = "1"
  argv2 = strip_debug(argv)

  def parse(args: list[str]) -> list[str]:
    try:
      return flags.FLAGS(args)
    except (flags.Error, *user_errors) as e:
      if debug:
        raise
      print(format_error(e), file=sys.stderr, flush=True)
      sys.exit(EXIT_USAGE)
    except SystemExit as e:  # absl's --help / --helpfull print the usage and exit 1: asked for, so 0
      if e.code == 1 and any(a.split("=")[0] in ("--help", "-h", "-?", "--helpfull", "--helpshort", "--helpxml")
                             for a in args[1:]):
        sys.exit(EXIT_OK)
      raise

  def wrapped(args: list[str]) -> int:
    if not (flags.FLAGS["verbosity"].present or debug):
      absl_logging.set_verbosity(absl_logging.WARNING)
    return _call(main, args, debug, user_errors)

  app.run(wrapped, argv=argv2, flags_parser=parse)
