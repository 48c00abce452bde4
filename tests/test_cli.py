"""The command-line root: lazy loading, help, version, exit codes."""

import subprocess
import sys

import pytest

from latentmill import __version__
from latentmill.cli import COMMANDS

GROUPS = {"urls": ["inspect", "prefilter"], "images": ["inspect"], "recipes": [None, "show"]}
SUBCOMMANDS = [[name, sub] for name in COMMANDS for sub in GROUPS.get(name, [None])]
SUBCOMMANDS = [[c for c in command if c] for command in SUBCOMMANDS]


def test_every_command_is_listed_in_the_root_help(run_cli):
    result = run_cli("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(run_cli, command):
    result = run_cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "latentmill" in result.output


def test_short_help_flag_and_version(run_cli):
    assert run_cli("-h").exit_code == 0
    result = run_cli("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_root_help_imports_neither_torch_nor_img2dataset():
    code = (
        "import sys\n"
        "from latentmill.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'img2dataset', 'pyarrow', 'open_clip', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "latentmill", *map(str, args)], capture_output=True, text=True
    )


def test_bad_input_exits_2_with_one_message(tmp_path):
    result = _run("urls", "inspect", tmp_path / "missing.parquet")
    assert result.returncode == 2
    assert "missing.parquet: no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_usage_exits_2(tmp_path):
    result = _run("urls", "prefilter", tmp_path / "x.parquet")  # no -o
    assert result.returncode == 2
    assert "-o" in result.stderr


def test_other_failures_exit_1_and_debug_shows_the_traceback(tmp_path, sample_table):
    table, _ = sample_table
    too_long = tmp_path / ("x" * 300)  # the file system refuses the name: not a bad input of ours
    result = _run("download", table, "-o", too_long)
    assert result.returncode == 1, result.stderr
    assert "File name too long" in result.stderr and "--debug" in result.stderr
    assert "Traceback" not in result.stderr
    debug = _run("--debug", "download", table, "-o", too_long)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_the_report_loss_chart_reads_past_a_cut_off_log_line(tmp_path):
    from latentmill.report import _loss_chart

    log = tmp_path / "log.jsonl"
    log.write_text(
        '{"step": 1, "loss": 0.5}\n[1, 2]\n{"step": 2, "loss": "x"}\n{"step": 3, "loss": 0.4}\n{"step": 4, "lo'
    )
    chart = _loss_chart(log)
    assert chart is not None


def test_options_on_the_command_line_count_for_a_config_files_rules(tmp_path, run_cli):
    """`train --config FILE --model M`: the file has no `model:`, the command line gives it; the rules between
    settings see both (the next refusal is about the latents, not "give --model")."""
    (tmp_path / "style.yaml").write_text("steps: 3\nlearning_rate: 5.0e-5\n")
    (tmp_path / "none").mkdir()
    given = run_cli(
        "train",
        tmp_path / "none",
        "-o",
        tmp_path / "r",
        "--config",
        tmp_path / "style.yaml",
        "--model",
        "tiny",
    )
    assert given.exit_code == 2 and "no latent shards" in given.output, given.output
    missing = run_cli("train", tmp_path / "none", "-o", tmp_path / "r", "--config", tmp_path / "style.yaml")
    assert missing.exit_code == 2 and "give --model" in missing.output
