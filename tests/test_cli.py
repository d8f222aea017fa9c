"""The CLI entry point: help works, bad input is one line and exit code 2."""
import subprocess
import sys

from vldus import cli


def test_help_lists_registered_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for module in cli.COMMAND_MODULES:
        __import__(module)
    assert "usage: vldus" in out


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "vldus.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "vldus" in r.stdout
