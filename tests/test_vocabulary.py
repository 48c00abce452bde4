"""One vocabulary: every command's options and every recipe key come from the stage configs, a bad value in
any recipe section stops `run` before any stage, old flag spellings still work, the README names every
command."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click
import pytest
import yaml

from latentmill.cli import COMMANDS, LazyGroup, cli
from latentmill.curate.download import DownloadConfig
from latentmill.curate.encode import EncodeConfig
from latentmill.curate.executors import ExecutorConfig
from latentmill.curate.pack import PackConfig
from latentmill.curate.prefilter import PrefilterConfig
from latentmill.curate.tables import DEFAULT_COLUMNS
from latentmill.errors import LatentmillWarning
from latentmill.filters.dedup import DedupConfig
from latentmill.filters.fithead import FitHeadConfig
from latentmill.filters.select import SelectConfig
from latentmill.recipe import RUN_MANAGED
from latentmill.schema import flag_of, kind_of, spec_of
from latentmill.stages import LISTS, SECTIONS
from latentmill.train.commandconfigs import ExportConfig, MergeConfig, SampleConfig
from latentmill.train.config import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _score_config():
    from latentmill.filters.score import ScoreConfig

    return ScoreConfig


COLUMNS = {f"{role}_col" for role in DEFAULT_COLUMNS}  # --url-col ...: the `columns` field, a flag per role
# command -> (stage configs its options come from, options that name its inputs and outputs, not settings)
COMMAND_CONFIGS = {
    ("urls", "prefilter"): (
        (PrefilterConfig,),
        {
            "output",
            *COLUMNS,
        },
    ),
    ("download",): (
        (DownloadConfig,),
        {
            "output",
            "retry_folder",
            "only_reason",
            "overwrite",
            *COLUMNS,
        },
    ),
    ("score",): (
        (None, ExecutorConfig),
        {"output", "overwrite"},
    ),  # None: ScoreConfig, imported lazily (torch)
    ("select",): ((SelectConfig,), {"output"}),
    ("dedup",): ((DedupConfig, ExecutorConfig), {"output", "images"}),
    ("fit-head",): (
        (FitHeadConfig,),
        {"output", "embeddings", "scores", "labels", "add_column", "overwrite"},
    ),
    ("encode",): ((EncodeConfig, ExecutorConfig), {"output", "selection", "overwrite"}),
    ("buckets",): ((EncodeConfig,), {"images", "selection", "plot", "as_json"}),
    ("train",): ((TrainConfig,), {"output", "config_file"}),
    ("export",): ((ExportConfig,), {"output"}),
    ("sample",): ((SampleConfig,), {"output", "to_folder"}),
    ("merge",): ((MergeConfig,), {"output"}),
    ("images", "pack"): ((PackConfig,), {"output", "overwrite"}),
    ("run",): ((ExecutorConfig,), {"urls", "work", "overrides", "until", "dry_run"}),
}
# where a flag is not --KEY: a repeatable option takes the singular, the executor's kind is --executor
FLAG_EXCEPTIONS = {
    "prefilter.allow_hosts": "--allow-host",
    "download.allow_hosts": "--allow-host",
    "score.heads": "--head",
    "train.sample_prompts": "--sample-prompt",
    "sample.prompts": "--prompt",
    "executor.kind": "--executor",
}


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        command = command.get_command(click.Context(command), name)
    return command


def _configs(classes):
    return [c or _score_config() for c in classes]


@pytest.mark.parametrize("path", list(COMMAND_CONFIGS), ids=[" ".join(p) for p in COMMAND_CONFIGS])
def test_every_option_of_a_command_comes_from_its_stage_configs(path):
    classes, io_options = COMMAND_CONFIGS[path]
    fields = {f.name: (cls, f) for cls in _configs(classes) for f in cls.option_fields() if spec_of(f).cli}
    options = {
        p.name: p
        for p in _command(path).params
        if isinstance(p, click.Option) and p.name not in ("help", "storage_option")  # every command's
    }
    visible = {name: p for name, p in options.items() if not p.hidden}
    for name, param in visible.items():
        if name in io_options:
            continue
        assert name in fields, (
            f"{' '.join(path)} {param.opts}: not a field of {[c.__name__ for c in _configs(classes)]}"
        )
        cls, field = fields[name]
        assert flag_of(field) in param.opts or param.opts[0].startswith(flag_of(field))
        assert param.help == spec_of(field).help
        default = None if field.default is dataclasses.MISSING else field.default
        if kind_of(cls, field)[0] != "list":
            assert param.default == default, (name, param.default, default)
        if spec_of(field).choices:
            assert list(param.type.choices) == [str(c) for c in spec_of(field).choices]
    if path != ("buckets",):  # buckets shows the bucket subset of the encode options
        for name, (cls, _) in fields.items():
            assert name in visible, f"{cls.__name__}.{name} has no option in `latentmill {' '.join(path)}`"
    for name, param in options.items():  # the hidden ones are the old spellings of a field's flag
        if param.hidden:
            field_name = name.split("__old")[0]
            assert field_name in fields and param.opts[0] in spec_of(fields[field_name][1]).old


def test_flags_are_the_recipe_keys_with_dashes():
    commands = [("sample", SampleConfig), ("merge", MergeConfig)]  # configs of commands outside recipes
    for name, cls in [*((n, f()) for n, f in SECTIONS.items()), *LISTS.items(), *commands]:
        for field in cls.option_fields():
            expected = FLAG_EXCEPTIONS.get(f"{name}.{field.name}", "--" + field.name.replace("_", "-"))
            assert flag_of(field) == expected, (name, field.name, flag_of(field))


def test_recipe_sections_are_exactly_the_stage_configs():
    expected = {
        "urls",
        "prefilter",
        "download",
        "pack",
        "score",
        "dedup",
        "select",
        "encode",
        "train",
        "export",
        "executor",
    }
    assert set(SECTIONS) == expected
    assert SECTIONS["score"]() is _score_config() and SECTIONS["train"]() is TrainConfig
    assert LISTS["fit_head"] is FitHeadConfig
    for name, factory in SECTIONS.items():  # every key a recipe may set is a declared, checked field
        cls = factory()
        allowed = {f.name for f in dataclasses.fields(cls)} - RUN_MANAGED.get(name, set())
        assert allowed <= {f.name for f in cls.option_fields()}, name


def _bad_values() -> list[tuple[str, str, object]]:
    """(section, key, a value its config refuses) for every key with a range or a set of choices."""
    cases = []
    for name, factory in [*SECTIONS.items(), *LISTS.items()]:
        cls = factory() if name in SECTIONS else factory
        for field in cls.option_fields():
            spec = spec_of(field)
            if field.name in RUN_MANAGED.get(name, set()):
                continue
            if spec.choices:
                cases.append((name, field.name, "no-such-choice"))
            elif spec.low is not None:
                kind = kind_of(cls, field)[0]
                cases.append((name, field.name, int(spec.low) - 1 if kind == "int" else spec.low - 0.5))
            elif kind_of(cls, field)[0] == "bool":
                cases.append((name, field.name, "sometimes"))
    return cases


BAD = _bad_values()


@pytest.mark.parametrize("section, key, value", BAD, ids=[f"{s}.{k}" for s, k, _ in BAD])
def test_a_bad_value_in_any_recipe_section_stops_run_before_any_stage(section, key, value, run_cli, tmp_path):
    recipe = {
        "urls": {"source": "file", "path": str(tmp_path / "urls.csv")},
        "score": {"save_embeddings": True},
        "fit_head": [{"target": "AESTHETIC_SCORE"}],
        "stages": [{"name": "main", "resolution": 256}],
    }
    if section in LISTS:
        recipe[section][0][key] = value
    else:
        recipe.setdefault(section, {})[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    work = tmp_path / "work"
    result = run_cli("run", path, "-w", work)
    assert result.exit_code == 2, result.output
    where = f"{section}[0].{key}" if section in LISTS else f"{section}.{key}"
    assert where in result.output, result.output
    assert not work.exists()  # nothing ran, nothing was written


def test_the_bad_value_cases_cover_every_section():
    assert {s for s, _, _ in BAD} == set(SECTIONS) | set(LISTS)
    assert len(BAD) > 60


def test_old_flag_spellings_still_work_with_a_warning(run_cli):
    new = run_cli("buckets", "--resolution", "256", "--bucket-min-side", "192", "--json")
    old = run_cli("buckets", "--resolution", "256", "--min-side", "192", "--json")
    assert new.exit_code == old.exit_code == 0
    assert "--min-side is now --bucket-min-side" in old.output and "is now" not in new.output
    assert old.output.splitlines()[-1] == new.output.splitlines()[-1]  # the same buckets
    wrong = run_cli("buckets", "--resolution", "256", "--min-side", "0")
    assert wrong.exit_code == 2 and "--min-side" in wrong.output  # checked like the new spelling


def test_old_recipe_keys_still_work_with_a_warning(tmp_path):
    from latentmill.recipe import load_recipe
    from latentmill.stages import section

    path = tmp_path / "old.yaml"
    path.write_text(
        yaml.safe_dump({"prefilter": {"min_side_px": 512}, "download": {"timeout_s": 7, "threads": 8}})
    )
    with pytest.warns(LatentmillWarning, match="prefilter.min_side_px is now prefilter.min_side"):
        recipe = load_recipe(str(path))
    assert section(recipe, "prefilter").min_side == 512
    assert section(recipe, "download").timeout == 7 and section(recipe, "download").http_threads == 8


def test_the_old_fit_heads_section_still_works_with_a_warning(tmp_path):
    from latentmill.recipe import load_recipe

    path = tmp_path / "old.yaml"
    path.write_text(
        yaml.safe_dump({"score": {"save_embeddings": True}, "fit_heads": [{"target": "AESTHETIC_SCORE"}]})
    )
    with pytest.warns(LatentmillWarning, match="the section fit_heads is now fit_head"):
        recipe = load_recipe(str(path))
    assert recipe["fit_head"] == [{"target": "AESTHETIC_SCORE"}] and "fit_heads" not in recipe


def test_sample_takes_its_old_steps_flag_with_a_warning(run_cli, tmp_path):
    result = run_cli("sample", tmp_path, "--prompt", "x", "--steps", "5")
    assert "--steps is now --sampler-steps" in result.output
    assert result.exit_code == 2 and str(tmp_path) in result.output  # then: not a run nor a pipeline


def test_run_executor_options_override_the_recipe_section(run_cli, tmp_path, monkeypatch):
    import latentmill.curate.raycluster
    import latentmill.runner

    # the option's spelling is under test here, not the cluster (test_rayedges.py checks addresses)
    monkeypatch.setattr(latentmill.curate.raycluster, "checked_address", lambda address, *a: address)
    seen = {}
    monkeypatch.setattr(
        latentmill.runner, "run_recipe", lambda recipe, *a, **k: seen.setdefault("recipe", recipe)
    )
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump({"executor": {"kind": "ray", "actors": 4}}))
    assert run_cli("run", path, "-w", tmp_path / "w", "--executor", "local").exit_code == 0
    assert seen["recipe"]["executor"] == {"kind": "local", "actors": 4}
    seen.clear()
    assert run_cli("run", path, "-w", tmp_path / "w", "--address", "auto").exit_code == 0  # the old spelling
    assert seen["recipe"]["executor"] == {"kind": "ray", "actors": 4, "ray_address": "auto"}
    seen.clear()
    assert (
        run_cli("run", path, "-w", tmp_path / "w").exit_code == 0
    )  # nothing given: the recipe's own section
    assert seen["recipe"]["executor"] == {"kind": "ray", "actors": 4}
    assert (
        run_cli("run", path, "-w", tmp_path / "w", "--threads", "2").exit_code == 2
    )  # no option accepted and ignored


def _all_commands() -> list[str]:
    names = []
    for name in LazyGroup().list_commands(None):
        command = _command((name,))
        if isinstance(command, click.Group):
            names += [f"{name} {sub}" for sub in command.list_commands(click.Context(command))]
        else:
            names.append(name)
    return names


def test_the_readme_documents_every_command():
    text = README.read_text()
    missing = [name for name in _all_commands() if not re.search(rf"latentmill {re.escape(name)}\b", text)]
    assert not missing, f"README.md shows no example of: {', '.join(missing)}"
    assert set(COMMANDS) <= {n.split()[0] for n in _all_commands()}


def test_the_readme_examples_use_no_old_spelling():
    examples = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S))
    # latentmill's own lines: `ray start --address` is Ray's flag, not our old spelling of --ray-address
    examples = "\n".join(line for line in examples.splitlines() if "ray start" not in line)
    assert "latentmill run" in examples and "latentmill encode" in examples
    for old in ("--lr ", "--address ", "--max-aspect-ratio", "--threads ", "--allow-private-addresses"):
        assert old not in examples, old
    assert not re.search(r"latentmill (encode|buckets)[^\n]*--(min|max)-side", examples)


def test_the_readme_recipe_table_names_exactly_the_shipped_recipes():
    from latentmill.recipe import list_recipes

    table = README.read_text().split("| recipe | what it does |", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"^\| `([\w.-]+)`", table, flags=re.M)) | set(
        re.findall(r"`, `([\w.-]+)` \|", table)
    )
    assert named == set(list_recipes())
    examples = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S))
    for name in re.findall(r"latentmill run ([\w.-]+)", examples):
        assert name in list_recipes(), name
