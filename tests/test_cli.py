"""The CLI entry point: help works, bad input is one line and exit code 2."""
import subprocess
import sys

from vldus import cli


def test_help_lists_registered_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: vldus" in out and all(command in out for command in cli.COMMANDS)


def test_each_module_registers_the_commands_the_table_names():
    """cli.COMMANDS is what lets a command import its own module alone: it must match what each
    module's add_parser registers."""
    import argparse
    import importlib

    for module in cli.COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).add_parser(sub, argparse.ArgumentParser(add_help=False))
        assert list(sub.choices) == [c for c, m in cli.COMMANDS.items() if m == module], module


def test_a_command_imports_its_own_module_only():
    probe = ("import sys\nfrom vldus import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('MODULES', 'torch' in sys.modules, 'torchvision' in sys.modules)")

    def loaded(*argv: str) -> str:
        r = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1]

    assert loaded("--version") == "MODULES False False"
    assert loaded("train-clip", "--help") == "MODULES True False"
    assert cli.requested_modules(["--help"]) == cli.requested_modules(["nonsense"]) == cli.COMMAND_MODULES
    assert cli.requested_modules(["train-detector", "--config", "x.yaml"]) == ["vldus.detection.train"]


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "vldus.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "vldus" in r.stdout
