"""Recipes parsed in bounds: a YAML bomb of nested aliases, a value nested thousands deep or a huge file is
exit 2 naming the source and the limit, for recipe files, `train --config` and `--set` alike."""

from __future__ import annotations

import resource

import pytest


@pytest.mark.parametrize(
    "case",
    [
        "recipe-aliases",
        "recipe-deep",
        "config-aliases",
        "config-deep",
        "set-aliases",
        "set-deep",
        "recipe-big",
    ],
)
def test_yaml_beyond_its_bounds_is_refused_naming_the_source(case, tmp_path, run_cli):
    where, kind = case.split("-")
    value = {
        "aliases": "["
        + ", ".join(
            ["&a0 [1, 2, 3, 4, 5, 6, 7, 8]"]
            + [
                f"&a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
                for i in range(1, 9)
            ]
        )
        + "]",  # noqa: E501
        "deep": "[" * 5000 + "]" * 5000,
        "big": '"' + "x" * 1_200_000 + '"',
    }[kind]
    limit = {"aliases": "once its aliases are expanded", "deep": "nested deeper than 32 levels",
             "big": "a recipe is at most 1,000,000"}[kind]  # fmt: skip
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, hard))  # a bomb would hit this, not the machine
    try:
        if where == "recipe":
            path = tmp_path / "r.yaml"
            path.write_text(f"select: {{where: {value}}}\n")
            result = run_cli("run", path, "-w", tmp_path / "work", "--dry-run")
            source = str(path)
        elif where == "config":
            path = tmp_path / "c.yaml"
            path.write_text(f"steps: {value}\n")
            result = run_cli("train", tmp_path / "latents", "-o", tmp_path / "run", "--config", path)
            source = str(path)
        else:
            result = run_cli(
                "run", "demo", "-w", tmp_path / "work", "--dry-run", "--set", f"select.where={value}"
            )
            source = "--set select.where"
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert result.exit_code == 2, result.output[-2000:]
    assert source in result.output and limit in result.output, result.output[-2000:]
    assert "Traceback" not in result.output
