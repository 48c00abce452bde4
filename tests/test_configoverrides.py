"""`train --config FILE`: every key of the file can be set or overridden on the command line (the options
typed win, as `run --set` wins over a recipe), tested for every TrainConfig option."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from latentmill.recipe import RUN_MANAGED
from latentmill.schema import flag_of, kind_of, spec_of
from latentmill.train.config import TrainConfig

# what a file cannot hold: the keys a recipe's runner sets itself (latentmill/recipe.py RUN_MANAGED)
NOT_IN_FILES = RUN_MANAGED.get("train", set())
FIELDS = [f for f in TrainConfig.option_fields() if spec_of(f).cli and f.name not in NOT_IN_FILES]
LORA = {"model": "org/a-pretrained-model", "lora_rank": 2}
TI = {
    "model": "org/a-pretrained-model",
    "textual_inversion": "<tok>",
    "init_word": "cat",
    "text_encoder": "PIPELINE",
}
# the settings a key needs beside it to be valid at all (the rules between settings), in the file
COMPANIONS = {
    "shuffle_tags": {"text_encoder": "clip-tiny"},
    "tag_dropout": {"text_encoder": "clip-tiny"},
    "lora_rank": {"model": "org/a-pretrained-model"},
    "lora_alpha": LORA,
    "lora_text_encoder": LORA | {"text_encoder": "PIPELINE"},
    "text_encoder_targets": LORA | {"lora_text_encoder": True, "text_encoder": "PIPELINE"},
    "text_encoder_lr": LORA | {"lora_text_encoder": True, "text_encoder": "PIPELINE"},
    "textual_inversion": TI | {"textual_inversion": None},
    **{key: TI for key in ("vectors", "placeholder", "ti_templates")},
    "init_word": TI | {"init_word": None},
    "instance": {"class_data": "PIPELINE"},
    "eval_shards": {"eval_every": 5},
    "eval_prompts": {"eval_every": 5},
}
# values of a form of their own
VALUES = {"cache_limit": ("1GB", "2GB"), "textual_inversion": ("<from-file>", "<from-cli>")}


def _two_values(field, tmp_path):
    """(the file's value, the command line's value and how it is typed) for `field`, both valid, different."""
    spec = spec_of(field)
    if field.name in VALUES:
        a, b = VALUES[field.name]
        return a, b, [flag_of(field), b]
    kind, _, element = kind_of(TrainConfig, field)
    flag = flag_of(field)
    if kind == "bool":  # the file says no; the flag says yes
        return False, True, [flag]
    if spec.choices:
        choices = [c for c in spec.choices if c is not None]
        return choices[-1], choices[0], [flag, str(choices[0])]
    if kind in ("int", "float"):
        low = spec.low if spec.low is not None else 0
        if spec.high is not None:
            a, b = low + (spec.high - low) / 4, low + (spec.high - low) / 2
        else:
            a, b = low + 2, low + 3
        a, b = (int(a), int(b)) if kind == "int" else (float(a), float(b))
        return a, b, [flag, str(b)]
    if kind == "list":
        if element in (int, float):
            return [element(1), element(2)], [element(2), element(3)], [flag, f"{element(2)},{element(3)}"]
        return ["from the file"], ["from the command line"], [flag, "from the command line"]
    if spec.path or spec.model:  # a path: two that exist
        for name in ("file-side", "command-line-side"):
            (tmp_path / name).mkdir(exist_ok=True)
        return str(tmp_path / "file-side"), str(tmp_path / "command-line-side"), [flag, str(tmp_path / "command-line-side")]  # fmt: skip
    return "from the file", "from the command line", [flag, "from the command line"]


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_every_config_key_is_overridden_by_its_option(field, tmp_path, monkeypatch, run_cli):
    import latentmill.cli.train as cli_train

    file_value, cli_value, typed = _two_values(field, tmp_path)
    companions = {
        k: str(tmp_path) if v == "PIPELINE" else v for k, v in COMPANIONS.get(field.name, {}).items()
    }
    body = (
        {"model": "tiny"} | {k: v for k, v in companions.items() if v is not None} | {field.name: file_value}
    )
    if field.name == "eval_reference":
        (tmp_path / "prompts.txt").write_text("a cat\n")
        body |= {"eval_every": 5, "eval_prompts": str(tmp_path / "prompts.txt")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(body))
    shards = [] if field.name == "instance" else [tmp_path]  # DreamBooth's subject instead of SHARDS
    seen, original = {}, cli_train.config_from

    class Captured(Exception):
        pass

    def capture(cls, kwargs, **extra):
        if cls is TrainConfig:
            seen.update(kwargs)
            raise Captured
        return original(cls, kwargs, **extra)

    monkeypatch.setattr(cli_train, "config_from", capture)
    from_file = run_cli("train", *shards, "-o", tmp_path / "run", "--config", tmp_path / "config.yaml")
    assert isinstance(from_file.exception, Captured), from_file.output
    assert _same(seen[field.name], file_value), f"the file's {field.name} was not taken"
    seen.clear()
    both = run_cli("train", *shards, "-o", tmp_path / "run", "--config", tmp_path / "config.yaml", *typed)
    assert isinstance(both.exception, Captured), both.output
    assert _same(seen[field.name], cli_value), f"{typed} did not override the file's {field.name}"


def _same(got, wanted) -> bool:
    if isinstance(got, tuple):
        got = list(got)
    return got == wanted


def test_every_option_is_covered():
    declared = {
        f.name for f in dataclasses.fields(TrainConfig) if spec_of(f) and spec_of(f).cli
    } - NOT_IN_FILES
    assert {f.name for f in FIELDS} == declared and len(FIELDS) > 60
