import json
import subprocess
import sys

import pytest

from xkv.cli import build_parser, main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "config" in out


@pytest.mark.parametrize("command", ["demo", "eval", "report", "config"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: xkv " + command in capsys.readouterr().out


def test_config_prints_checks_and_writes(tmp_path, capsys):
    assert main(["config"]) == 0
    assert json.loads(capsys.readouterr().out)["group_size"] == 8
    path = tmp_path / "c.yaml"
    assert main(["config", "--write", str(path)]) == 0
    capsys.readouterr()
    assert main(["config", str(path)]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"group_size": 0}')
    assert main(["config", str(bad)]) == 2
    assert "group_size" in capsys.readouterr().err


def test_parser_has_a_subcommand_per_job():
    actions = [a for a in build_parser()._actions if a.dest == "command"]
    assert set(actions[0].choices) == {
        "demo",
        "eval",
        "report",
        "compress",
        "ask",
        "analyze",
        "tune",
        "bench",
        "config",
    }


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out_json = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "xkv.cli", "demo", "--context-tokens", "1200", "--quiet", "--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out_json.read_text())["rows"]
    assert [row["correct"] for row in rows] == [True, True]
    assert rows[1]["context_compression_factor"] >= 3.9
    assert "saved" in proc.stdout
