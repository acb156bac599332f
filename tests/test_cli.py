"""cli.run: every failure one line on stderr and a non-zero exit; --debug shows the traceback."""

import argparse
import errno
import logging
import sys
import threading

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
    # A command's own exit line is worded the same way, once.
    assert _exit_line(_raise(SystemExit("--scales must be integers.")), capsys) == (
        "Error: --scales must be integers."
    )
    assert _exit_line(_raise(SystemExit("Error: X.")), capsys) == "Error: X."
    assert _exit_line(_raise(SystemExit("Bad command line: Y.")), capsys) == "Bad command line: Y."
    # A message with lines of its own (tfds's "not prepared" text, in train's exit) is one line.
    tfds_like = "Error: Dataset not found.\n  Manual directory: /x\n\nPlease download."
    line = _exit_line(_raise(SystemExit(tfds_like)), capsys)
    assert line == "Error: Dataset not found. Manual directory: /x Please download."


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


def _late_tensorstore_future():
    """What a failed background save leaves: a tensorstore future, awaited on an event loop
    that is closed already, finishes (its callback cannot reach the loop)."""
    import asyncio

    import tensorstore as ts

    promise, future = ts.Promise.new()

    async def start():
        next(future.__await__())  # awaited, as by a task that never resumes

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    loop.close()
    thread = threading.Thread(target=promise.set_result, args=(1,))
    thread.start()
    thread.join()


def _orbax_error_record(message):
    record = logging.LogRecord("absl", logging.ERROR, "/x/orbax/checkpoint/f.py", 1, message,
                               None, None)  # fmt: skip
    logging.getLogger("absl").handle(record)


def test_failed_background_save_prints_nothing_but_the_one_line(monkeypatch, capfd):
    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # not pytest's
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:

        def main():
            _late_tensorstore_future()
            _orbax_error_record("background save thread failed")
            raise OSError(errno.ENOSPC, "No space left on device")

        line = _exit_line(main, capfd)
        assert line.startswith("Error: no space left on device")
        err = capfd.readouterr().err
        assert "Traceback" not in err and "Event loop is closed" not in err
        assert "background save thread failed" not in err  # the one line says it
        # A command that ends well shows orbax's errors after all: nothing is lost.
        with pytest.raises(SystemExit):
            cli.run(lambda: _orbax_error_record("a recovered error"))
        assert "a recovered error" in capfd.readouterr().err
        monkeypatch.setenv(cli.DEBUG_ENV, "1")  # --debug: everything as it comes
        hooks = sys.unraisablehook, sys.excepthook, threading.excepthook
        with pytest.raises(SystemExit):
            cli.run(lambda: _orbax_error_record("shown at once"))
        assert "shown at once" in capfd.readouterr().err
        seen = []
        with pytest.raises(SystemExit):
            cli.run(lambda: seen.append((sys.unraisablehook, sys.excepthook, threading.excepthook)))
        assert seen == [hooks]
    finally:
        logging.getLogger().removeHandler(handler)


def test_list_flags_read_comma_separated_numbers_or_give_a_usage_error():
    assert cli.integers(1)("256, 384,512,") == (256, 384, 512)
    for bad in ("256;384", "", " , ", "1.5", "0", "32,-4"):  # Q = 0 was a ZeroDivisionError
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers >= 1"):
            cli.integers(1)(bad)
    assert cli.integers(0)("0,3") == (0, 3)
    with pytest.raises(argparse.ArgumentTypeError, match="integers >= 0, got '1,-2'"):
        cli.integers(0)("1,-2")
    assert cli.positive_numbers()("0.5,10") == (0.5, 10.0)
    for bad in ("0,1", "x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="numbers > 0"):
            cli.positive_numbers()(bad)
    for bad in ("3,4", "x", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match="an integer >= 1"):
            cli.integer(1)(bad)


def test_usage_errors_are_one_line_naming_the_argument_and_help(capsys):
    parser = cli.ArgumentParser(prog="python -m vgg_jax.probe")
    parser.add_argument("image")
    parser.add_argument("--top", type=cli.integer(1), default=5)
    parser.add_argument("--limit", type=cli.integer(0), default=0)
    parser.add_argument("--mode", choices=("dense", "multicrop"))
    assert parser.parse_args(["x.png", "--top", "1", "--limit", "0"]).top == 1
    for argv, words in (
        (["x.png", "--top", "0"], "argument --top: must be an integer >= 1, got '0'"),
        (["x.png", "--limit", "-1"], "argument --limit: must be an integer >= 0, got '-1'"),
        (["x.png", "--top", "two"], "argument --top: must be an integer >= 1, got 'two'"),
        (["x.png", "--mode", "crop"], "argument --mode: invalid choice: 'crop'"),
        ([], "the following arguments are required: image"),
    ):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Bad command line: {words}"), lines
        assert lines[0].endswith("(python -m vgg_jax.probe --help lists the options).")


def test_every_list_flag_of_the_commands_is_parsed_with_its_default(capsys):
    from vgg_jax import evaluate, transfer

    args = transfer.parse_args(["--weights", "w", "--dataset", "caltech101"])
    assert args.classes == () and args.train_per_class == (30,) and args.scales is None
    assert args.c_grid == tuple(float(c) for c in transfer.DEFAULT_C_GRID)
    assert transfer.parse_args(["--classes", "0,9", "--c-grid", "1"]).classes == (0, 9)
    assert evaluate.parse_args(["--workdir", "w", "--scales", "32,64"]).scales == (32, 64)
    for parse, flag, value in (
        (evaluate.parse_args, "--scales", "0"),
        (transfer.parse_args, "--train-per-class", "ten"),
        (transfer.parse_args, "--c-grid", "0,1"),
    ):
        with pytest.raises(SystemExit) as e:
            parse(["--workdir", "w", flag, value])
        assert e.value.code == 2
        assert f"Bad command line: argument {flag}: must be" in capsys.readouterr().err


def test_an_output_flag_that_names_a_directory_is_a_usage_error(tmp_path, capsys):
    from vgg_jax import evaluate

    assert cli.output_file("r.json")(str(tmp_path / "r.json")) == str(tmp_path / "r.json")
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--workdir", "w", "--output", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --output: '{tmp_path}' is a directory: name a file, e.g. " in err
    assert str(tmp_path / "results.json") in err


def test_python_m_vgg_jax_lists_every_command_and_only_commands(capsys):
    import os
    import re

    import vgg_jax
    from vgg_jax import __main__ as commands

    package = os.path.dirname(vgg_jax.__file__)
    runnable = sorted(
        name[:-3]
        for name in os.listdir(package)
        if name.endswith(".py") and name != "__main__.py"
        and re.search('^if __name__ == "__main__":', open(os.path.join(package, name)).read(), re.M)
    )  # fmt: skip
    assert sorted(name for name, _ in commands.COMMANDS) == runnable
    commands.main()
    assert "  features       activations of named layers" in capsys.readouterr().out


def test_help_of_the_absl_commands_is_their_usage_and_exit_0(capsys):
    from vgg_jax import configuration, localize_eval, train

    for usage, prog in ((train.USAGE, "vgg_jax.train"), (localize_eval.USAGE, "vgg_jax.localize")):
        with pytest.raises(SystemExit) as e:  # absl's own --help exits 1 with the docstring
            configuration.flags_parser(usage)(["prog", "--config", "c.py", "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m {prog} ")
    with pytest.raises(SystemExit) as e:
        localize_eval.main(["prog", "trian", "--config", "c.py"])
    assert e.value.code == 2
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err
