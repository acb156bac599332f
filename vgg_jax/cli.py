"""Command-line failures as one clear line: the wrapper every `python -m vgg_jax.X` runs under.

    if __name__ == "__main__":
        from vgg_jax import cli

        cli.run(main)                      # argparse commands
        cli.run(app.run, main, flags_parser=configuration.parse_flags)  # absl ones

`run` calls the command and turns any exception into one line on stderr and
exit status 1, never a traceback:

* the project's own errors (ValueError, FileNotFoundError, FloatingPointError,
  a workdir in use, ...) by their message, which names the problem and the fix;
* OSError by what happened: no space left (naming the newest intact checkpoint of
  the `--workdir`), permission denied, a path through a file, a missing path;
* a config file's syntax error with file, line and the line's text; a config
  file that does not exist; a traceback that absl or ml_collections folded into
  a message, reduced to its last error and the config file's line;
* a command's own exit message (SystemExit) with "Error: " in front where it
  lacks it, so that every failure reads alike;
* anything else as "Error: <type>: <message> (at FILE:LINE)" and how to see the
  traceback: the `--debug` flag (taken out of argv before the command parses it)
  or VGG_JAX_DEBUG=1, with which the exception is raised as it is.

Without --debug, what background threads print while the command runs (a failed
background save: orbax's threads, tensorstore's callbacks, orbax's logged errors)
is one line or nothing, so that a full disk ends in the one line above only.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

DEBUG_ENV = "VGG_JAX_DEBUG"
DEBUG_FLAG = "--debug"
HOW_TO_DEBUG = f"run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback"
_TRACEBACK = "Traceback (most recent call last):"
_NO_SPACE = "No space left on device"
# Failure lines that start so already; every other one gets "Error: " in front.
_OWN_WORDING = ("Error", "Bad command line:")
_ORBAX = f"{os.sep}orbax{os.sep}"  # in the path of orbax's modules, so of their log records


def _expected() -> tuple[type[BaseException], ...]:
    """Errors whose message is written for the user (the project raises these on bad input)."""
    from vgg_jax import workdir_lock

    return (ValueError, FloatingPointError, workdir_lock.WorkdirInUse)


def debug_requested(argv: list[str] | None = None) -> bool:
    """True with VGG_JAX_DEBUG set (not 0/empty) or --debug in argv (default sys.argv)."""
    argv = sys.argv if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or DEBUG_FLAG in argv[1:]


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, as every other failure is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"Bad command line: {message} ({self.prog} --help lists the options).\n")


def integer(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= minimum (a count, a size, a seed)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def output_file(example: str) -> Callable[[str], str]:
    """An argparse `type`: a file to write, not an existing directory ("example" names one)."""

    def parse(text: str) -> str:
        if os.path.isdir(text):
            suggestion = os.path.join(text, example)
            raise argparse.ArgumentTypeError(
                f"{text!r} is a directory: name a file, e.g. {suggestion}"
            )
        return text

    return parse


def integers(minimum: int = 1) -> Callable[[str], tuple[int, ...]]:
    """An argparse `type`: comma-separated integers >= minimum ("256,384,512")."""
    wanted = f"comma-separated integers >= {minimum}"
    return lambda text: _numbers(text, int, wanted, lambda v: v >= minimum)


def positive_numbers() -> Callable[[str], tuple[float, ...]]:
    """An argparse `type`: comma-separated numbers > 0 ("0.1,1,10")."""
    return lambda text: _numbers(text, float, "comma-separated numbers > 0", lambda v: v > 0)


def _numbers(
    text: str, convert: Callable[[str], Any], wanted: str, valid: Callable[[Any], bool]
) -> tuple[Any, ...]:
    """The comma-separated values of `text`, at least one and all valid; else a usage error."""
    try:
        values = tuple(convert(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(valid(v) for v in values):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return values


def run(main: Callable[..., Any], *args: Any, **kwargs: Any) -> NoReturn:
    """Runs `main(*args, **kwargs)` and exits: its int result (0 for anything else) or 1.

    Every exception becomes one line on stderr (see the module docstring); SystemExit
    passes, except that a traceback folded into its message is reduced to one line.
    """
    debug = debug_requested()
    if DEBUG_FLAG in sys.argv[1:]:
        sys.argv = [a for a in sys.argv if a != DEBUG_FLAG]
    quiet = None if debug else _QuietBackground()
    try:
        result = _call(main, debug, *args, **kwargs)
    except SystemExit as e:
        failed = e.code not in (None, 0)
        if quiet and failed and _is_command():
            _exit_now(e.code)  # the hooks stay: background threads may still be failing
        if quiet:
            quiet.close(show_held=not failed)
        raise
    if quiet:
        quiet.close(show_held=True)
    sys.exit(result if isinstance(result, int) else 0)


class _QuietBackground:
    """What background threads would print while a command runs without --debug.

    A failed background save (orbax's) prints from several places: its threads
    (threading.excepthook), tensorstore's callbacks into event loops that orbax closed
    already ("Event loop is closed", through sys.unraisablehook, or sys.excepthook where
    tensorstore calls PyErr_Print) and orbax's logged errors. Orbax raises the failure
    again in the main thread, where it becomes the command's one line; so its logged
    errors are held back until the command ends: dropped if it fails, shown if it ends
    well. Tracebacks in any other log record are dropped.
    """

    def __init__(self) -> None:
        self._hooks = threading.excepthook, sys.excepthook, sys.unraisablehook
        threading.excepthook = _thread_error
        sys.excepthook = _callback_error
        sys.unraisablehook = _unraisable_error
        self._held: list[tuple[logging.Handler, logging.LogRecord]] = []
        self._filters = [(h, self._holder(h)) for h in _log_handlers()]
        for handler, hold in self._filters:
            handler.addFilter(_without_traceback)
            handler.addFilter(hold)

    def _holder(self, handler: logging.Handler) -> Callable[[logging.LogRecord], bool]:
        def hold(record: logging.LogRecord) -> bool:
            if record.levelno >= logging.ERROR and _ORBAX in record.pathname:
                self._held.append((handler, record))
                return False
            return True

        return hold

    def close(self, show_held: bool) -> None:
        """Puts the hooks and log handlers back; shows the held records if `show_held`."""
        threading.excepthook, sys.excepthook, sys.unraisablehook = self._hooks
        for handler, hold in self._filters:
            handler.removeFilter(hold)
        for handler, record in self._held if show_held else ():
            handler.handle(record)
        for handler, _ in self._filters:
            handler.removeFilter(_without_traceback)


def _is_command() -> bool:
    """True when this process is a `python -m vgg_jax.X` command (not a test calling run)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return bool(spec and spec.name.startswith("vgg_jax."))


def _exit_now(code: Any) -> NoReturn:
    """Ends a failed command with its one line, without the interpreter's shutdown: the
    threads of a failed background save (orbax's, their event loops already closed)
    would print tracebacks while it runs."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code if isinstance(code, int) else 1)


def _log_handlers() -> list[logging.Handler]:
    """The root logger's handlers and absl's (which absl's app.run installs later)."""
    from absl import logging as absl_logging

    handlers = list(logging.getLogger().handlers)
    absl = absl_logging.get_absl_handler()
    return handlers + ([absl] if absl not in handlers else [])


def _call(main: Callable[..., Any], debug: bool, *args: Any, **kwargs: Any) -> Any:
    try:
        return main(*args, **kwargs)
    except SystemExit as e:  # a command's own "Error: ..." exit, which may need rewording
        if isinstance(e.code, str) and not debug:
            if _NO_SPACE in e.code:
                sys.exit(_disk_full(None, sys.argv))
            if _TRACEBACK in e.code:
                sys.exit(_fold(e.code))
            line = " ".join(e.code.split())  # tfds's messages, say, have lines of their own
            if not line.startswith(_OWN_WORDING):  # "--scales must be ...", a name not found
                sys.exit(f"Error: {line}")
            if line != e.code.strip():
                sys.exit(line)
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        sys.exit("Interrupted.")
    except Exception as e:  # noqa: BLE001 - the point of this module
        if debug:
            raise
        sys.exit(describe(e, sys.argv))


def _without_traceback(record: logging.LogRecord) -> bool:
    """A logging filter that keeps a record's message but drops its traceback."""
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _callback_error(exc_type: type, error: BaseException, tb: Any) -> None:
    """What a C++ thread's Python callback raised (it reports through sys.excepthook)."""
    from vgg_jax.checkpoints import is_closed_loop_report

    if is_closed_loop_report(error):
        return  # orbax cancelling the tasks of a failed background save: no news
    print(f"Error in a background thread: {describe(error)}", file=sys.stderr)


def _unraisable_error(unraisable: Any) -> None:
    """What a C++ callback could not raise anywhere (tensorstore's, through sys.unraisablehook)."""
    from vgg_jax.checkpoints import is_closed_loop_report

    error = unraisable.exc_value
    if error is None or is_closed_loop_report(error):
        return  # a future of a failed background save finishing after orbax gave up on it
    where = f" in {unraisable.object!r}" if unraisable.object is not None else ""
    print(f"Error ignored{where}: {describe(error)}", file=sys.stderr)


def _thread_error(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        print(f"Error in a background thread: {describe(args.exc_value)}", file=sys.stderr)


def describe(error: BaseException, argv: list[str] | None = None) -> str:
    """The one line (starting 'Error: ') that reports `error`; argv gives the --workdir."""
    argv = argv or []
    if isinstance(error, SyntaxError):
        return _syntax_error(error)
    if _NO_SPACE in _chain_text(error):
        return _disk_full(error, argv)
    if isinstance(error, OSError):
        return _os_error(error)
    message = _one_line(str(error))
    if isinstance(error, _expected()):
        return f"Error: {message}"
    return f"Error: {type(error).__name__}: {message}{_where(error)} ({HOW_TO_DEBUG})."


def _one_line(text: str) -> str:
    text = _fold(text) if _TRACEBACK in text else text
    return " ".join(text.strip().strip("'\"").split())


def _fold(text: str) -> str:
    """A message with a traceback inside (ml_collections does that) as its last error line.

    "flag --config=x.py:v: Error whilst parsing config file: Traceback ... File "x.py",
    line 21, in get_config ... ValueError: Unknown variant 'v'" becomes
    "flag --config=x.py:v: Unknown variant 'v' (x.py, line 21)".
    """
    head = text.split(_TRACEBACK)[0]
    head = head.replace("Error whilst parsing config file:", "").strip()
    tail = text.split(_TRACEBACK)[-1]
    frames = re.findall(r'File "([^"]+)", line (\d+)', tail)
    errors = list(re.finditer(r"\b([A-Z]\w*(?:Error|Exception)): ", tail))
    last = tail[errors[-1].end() :] if errors else tail
    where = ""
    frames = [f for f in frames if "site-packages" not in f[0] and not f[0].startswith("<")]
    if frames:
        where = f" ({frames[-1][0]}, line {frames[-1][1]})"
    return " ".join(f"{head} {last.strip()}{where}".split())


def _syntax_error(error: SyntaxError) -> str:
    line = (error.text or "").strip()
    return (
        f"Error: syntax error in {error.filename}, line {error.lineno}: {line!r} "
        f"({error.msg}); fix that line of the config file."
    )


def _os_error(error: OSError) -> str:
    text = str(error)
    if "Failed loading config file" in text or "Configuration is not available" in text:
        missing = re.search(r"No such file or directory: '([^']+)'", text)
        if missing:
            return f"Error: the config file {missing.group(1)} does not exist; check --config."
        return f"Error: the config file could not be loaded: {_one_line(text)}"
    name = error.filename or ""
    reasons = {
        errno.EACCES: "permission denied: choose a directory you can write, or fix permissions",
        errno.EPERM: "operation not permitted: choose a directory you can write",
        errno.EROFS: "the file system is read-only: choose another directory",
        errno.ENOTDIR: "a part of this path is a file, not a directory",
        errno.EISDIR: "this is a directory, a file is needed",
        errno.ENOENT: "no such file or directory",
        errno.EEXIST: "it exists already",
    }
    reason = reasons.get(error.errno)
    if reason is None:
        return f"Error: {_one_line(text)}"
    if not name:  # raised with a message of the project's own
        return f"Error: {_one_line(error.strerror or text)}"
    return f"Error: {name}: {reason}."


def _chain_text(error: BaseException) -> str:
    """The messages of `error` and its causes (orbax wraps the OSError of a full disk)."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return " ".join(texts)


def _workdir_from(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--workdir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--workdir="):
            return arg.partition("=")[2]
    return None


def _disk_full(error: BaseException | None, argv: list[str]) -> str:
    where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
    line = f"Error: no space left on device{where}."
    workdir = _workdir_from(argv)
    if workdir:
        line += " " + intact_checkpoint_note(workdir)
    return line + " Free some space and run the same command again."


def intact_checkpoint_note(workdir: str) -> str:
    """'The newest intact checkpoint in W is step 30 (a rerun resumes from it).' or why not."""
    from vgg_jax import checkpoints, fileio

    if not fileio.isdir(fileio.join(workdir, checkpoints.STATE_DIR)):
        return f"No checkpoint of {workdir} was saved yet."
    try:
        manager = checkpoints.state_manager(workdir, read_only=True)
        step = checkpoints.newest_intact_step(manager, workdir, lambda _: None, set_aside=False)
    except Exception as e:  # noqa: BLE001 - a note inside an error report must not raise
        return f"The checkpoints of {workdir} could not be checked ({type(e).__name__})."
    if step is None:
        return f"No checkpoint of {workdir} was saved yet."
    return f"The newest intact checkpoint in {workdir} is step {step} (a rerun resumes from it)."


def _where(error: BaseException) -> str:
    """' (at FILE:LINE)' of the innermost frame, to find an unexpected error without --debug."""
    frames = traceback.extract_tb(error.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
