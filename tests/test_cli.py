"""cli.run: every failure one line on stderr and a non-zero exit; --debug shows the traceback."""

import errno
import logging
import sys

import pytest

from vgg_jax import cli, workdir_lock


def _exit_line(main, capsys, *args):
    with pytest.raises(SystemExit) as e:
        cli.run(main, *args)
    assert e.value.code not in (0, None)
    return str(e.value.code)


def _raise(error):
    def main():
        raise error

    return main


def test_expected_errors_give_their_message(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog"])
    assert _exit_line(_raise(ValueError("bad\n  value")), capsys) == "Error: bad value"
    assert _exit_line(_raise(workdir_lock.WorkdirInUse("in use")), capsys) == "Error: in use"
    assert _exit_line(_raise(FileNotFoundError("X is missing")), capsys) == "Error: X is missing"


def test_os_errors_say_what_happened(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog"])
    denied = PermissionError(errno.EACCES, "Permission denied", "/w/x")
    assert _exit_line(_raise(denied), capsys) == (
        "Error: /w/x: permission denied: choose a directory you can write, or fix permissions."
    )
    through_file = NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/sub")
    assert "a part of this path is a file" in _exit_line(_raise(through_file), capsys)


def test_full_disk_names_the_workdir_state(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog", "--workdir", str(tmp_path)])
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    line = _exit_line(_raise(full), capsys)
    assert line.startswith(f"Error: no space left on device ({tmp_path / 'x'}).")
    assert f"No checkpoint of {tmp_path} was saved yet." in line
    # A command that caught it itself and exited with its own message is reworded too.
    line = _exit_line(_raise(SystemExit("Error: RESOURCE_EXHAUSTED: No space left on device")),
                      capsys)  # fmt: skip
    assert line.startswith("Error: no space left on device.") and "Free some space" in line


def test_unexpected_errors_name_type_place_and_how_to_debug(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog"])
    line = _exit_line(_raise(KeyError("params")), capsys)
    assert line.startswith("Error: KeyError: params (at ") and __file__ in line
    assert line.endswith("(run with --debug or VGG_JAX_DEBUG=1 for the traceback).")


def test_debug_flag_or_variable_reraises(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "--debug", "x"])
    seen = []
    with pytest.raises(KeyError):
        cli.run(lambda: seen.append(list(sys.argv)) or {}["missing"])
    assert seen == [["prog", "x"]]  # --debug is taken out before the command parses argv
    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(KeyError):
        cli.run(_raise(KeyError("k")))


def test_syntax_error_and_folded_tracebacks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog"])
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\ny = (\n")
    try:
        compile(bad.read_text(), str(bad), "exec")
    except SyntaxError as e:
        error = e
    line = _exit_line(_raise(error), capsys)
    assert line.startswith(f"Error: syntax error in {bad}, line 2: 'y = ('")
    folded = (
        "Bad command line: flag --config=c.py:v: Error whilst parsing config file:  Traceback "
        '(most recent call last):   File "/x/site-packages/m.py", line 9, in parse   File "c.py", '
        "line 21, in get_config     raise ValueError(f'...') ValueError: Unknown variant 'v'."
    )
    assert _exit_line(_raise(SystemExit(folded)), capsys) == (
        "Bad command line: flag --config=c.py:v: Unknown variant 'v'. (c.py, line 21)"
    )


def test_int_results_are_exit_codes_and_logged_tracebacks_dropped(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: 3)
    assert e.value.code == 3
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:

        def main():
            try:
                raise RuntimeError("inner")
            except RuntimeError:
                logging.getLogger("some.lib").exception("a thread failed")
            return 0

        with pytest.raises(SystemExit):
            cli.run(main)
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert "a thread failed" in err and "Traceback" not in err
