"""Usage errors of the real entry point (`glsd_cli.cli:main`): one line on stderr, exit code 2, no
traceback — whatever click typer runs on (typer 0.26+ carries its own copy, which raises none of
click's exception classes; that is how a fresh install once turned every usage error into a traceback).
Also `glsd --version`."""
from importlib import metadata

import pytest

import glsd_cli
from tests.cli_helpers import run_cli


@pytest.mark.parametrize("args,needles", [
    (["--bogus"], ["No such option: --bogus", "'glsd --help'"]),                         # unknown option
    (["pretrain", "--bogus"], ["No such option: --bogus", "'glsd pretrain --help'"]),   # ... of a command
    (["pretrain", "--epoch", "3"], ["No such option: --epoch", "--epochs"]),            # with did-you-mean
    (["knn-eval"], ["Missing argument", "checkpoint", "'glsd knn-eval --help'"]),       # missing argument
    (["export", "some/run"], ["Missing option", "--out"]),                              # missing option
    (["pretrain", "--epochs", "abc"], ["Invalid value for '--epochs'", "integer"]),     # bad value
    (["pretrian"], ["No such command 'pretrian'", "Did you mean 'pretrain'?"]),         # unknown command
    (["presets", "show"], ["Missing argument", "'glsd presets show --help'"]),          # in a sub-app
])
def test_usage_errors_are_one_line_and_exit_2(args, needles, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle.lower() in err.lower()  # click writes an argument's name in capitals or not
    assert "Traceback" not in err + out and out == ""


def test_bare_command_prints_its_help(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 2  # click's convention for a command group called without a command
    assert "pretrain" in out + err and "Traceback" not in out + err


def test_version_is_the_package_metadata(capsys):
    code, out, err = run_cli(["--version"], capsys)
    try:
        expected = metadata.version("glsd")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        expected = "0+unknown"
    assert code == 0 and out == f"glsd {expected}\n" and err == ""
    assert glsd_cli.__version__ == expected


def test_a_usage_error_comes_back_before_any_heavy_import():
    """`glsd --bogus` in a fresh interpreter: exit 2 with one line, and the command line was read without
    loading torch or pydantic (it once took ~7 s on the development machine, since a command module
    imported the dense probe for its default learning rates; a harness's timeout then saw exit 124)."""
    import subprocess
    import sys

    probe = ("import sys\nsys.argv = ['glsd', '--bogus']\nfrom glsd_cli.cli import main\ntry:\n    main()\n"
             "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'pydantic' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "No such option: --bogus" in done.stderr
