"""Recipes and the runner: validation, overrides, and the demo recipe end to end, killed and resumed."""

import json
import re
import subprocess
import sys

import pytest

from latentmill.errors import InputError
from latentmill.recipe import list_recipes, load_recipe
from latentmill.stages import section
from tests.conftest import kill_when_done

SMALL = [
    "--set",
    "train.steps=6",
    "--set",
    "train.checkpoint_every=3",
    "--set",
    "train.sample_every=3",
    "--set",
    "train.sample_steps=2",
    "--set",
    "download.processes=1",
    "--set",
    "train.log_every=1",
]


def test_every_shipped_recipe_validates_and_is_listed(run_cli):
    names = list_recipes()
    assert {
        "demo",
        "laion-aesthetics-v2-5plus",
        "laion-aesthetics-6plus",
        "sd-v1-stages",
        "finetune-sd15",
        "lora-sd15",
    } <= set(names)
    for name in names:
        load_recipe(name)
    result = run_cli("recipes")
    assert result.exit_code == 0 and all(name in result.output for name in names)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=5", "unknown key train.stepz. Did you mean 'steps'?"),
        ("trian.steps=5", "unknown section 'trian'. Did you mean 'train'?"),
        ("train.steps=many", "train.steps (--steps) = 'many': use a whole number"),
        ("train.output=/elsewhere", "unknown key train.output"),
        ("steps=5", "write section.key=value"),
    ],
)
def test_validation_errors_name_the_key(override, message, run_cli, tmp_path):
    with pytest.raises(InputError, match=re.escape(message)):
        load_recipe("demo", [override])
    result = run_cli("run", "demo", "-w", tmp_path / "w", "--set", override)
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "w").exists()


def test_overrides_reach_the_stage_configs():
    recipe = load_recipe("demo", ["train.steps=7", "encode.resolution=128", "select.where=['aesthetic > 1']"])
    assert section(recipe, "train", shards="x", output="y").steps == 7
    assert section(recipe, "encode").resolution == 128
    assert section(recipe, "select").where == ["aesthetic > 1"]
    staged = load_recipe("sd-v1-stages")
    assert [s["resolution"] for s in staged["stages"]] == [256, 512]
    assert section(staged, "train", shards="x", output="y").caption_dropout == 0.1


def _run_cmd(work):
    return [sys.executable, "-m", "latentmill", "run", "demo", "-w", str(work), *SMALL]


@pytest.mark.slow
def test_the_demo_recipe_killed_midway_finishes_with_the_same_outputs(tmp_path, run_cli):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    process = subprocess.Popen(
        _run_cmd(killed), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_when_done(process, killed / "scores" / "00000.stats.json")
    assert not (killed / "latents-128").exists(), "the run was not stopped mid-way"
    process = subprocess.Popen(
        _run_cmd(killed), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )  # killed again, mid-training this time
    kill_when_done(process, killed / "runs" / "main" / "checkpoints" / "step-0000003" / "state.json")
    assert not (killed / "runs" / "main" / "checkpoints" / "step-0000006").exists(), (
        "training was not stopped mid-way"
    )
    subprocess.run(_run_cmd(killed), check=True, capture_output=True)
    (reference / "urls").mkdir(parents=True)  # the same server port, so the same URLs in the metadata
    (reference / "urls" / "server-port.txt").write_text((killed / "urls" / "server-port.txt").read_text())
    subprocess.run(_run_cmd(reference), check=True, capture_output=True)

    def outputs(work):
        files = sorted((work / "latents-128").glob("*.tar")) + sorted((work / "scores").glob("*.parquet"))
        files += [work / "runs" / "main" / "checkpoints" / "step-0000006" / "ema.safetensors"]
        return {f.relative_to(work).as_posix(): f.read_bytes() for f in files}

    a, b = outputs(killed), outputs(reference)
    assert a.keys() == b.keys() and len(a) > 3
    assert a == b

    def log(work):  # every step logged once, with the same loss (the rate and the time are the run's own)
        lines = (work / "runs" / "main" / "log.jsonl").read_text().splitlines()
        return [(m["step"], m["loss"], m["lr"], m["grad_norm"]) for m in map(json.loads, lines)]

    assert [step for step, *_ in log(killed)] == [1, 2, 3, 4, 5, 6]
    assert log(killed) == log(reference)
    status = run_cli("status", killed)
    shards = len(list((killed / "images").glob("*.tar")))
    assert (
        status.exit_code == 0
        and "step 6/6" in status.output
        and f"{shards}/{shards} shards" in status.output
        and shards > 1
    )
    assert sorted(p.name for p in (killed / "runs" / "main" / "samples").iterdir()) == [
        "step-0000003.png",
        "step-0000006.png",
    ]


def test_a_stage_does_not_start_before_the_stage_that_writes_its_inputs(tmp_path):
    from latentmill.runner import run_recipe

    recipe = load_recipe("demo")
    with pytest.raises(
        InputError,
        match=r"the encode stage reads \S+/images \(written by the download stage\); \S+/selection "
        r"\(written by the select stage\), not there yet",
    ):
        run_recipe(recipe, tmp_path / "work", start="encode", log=lambda line: None)
    assert not (tmp_path / "work" / "latents-128").exists()


def test_the_stage_table_is_the_recipe_schema_and_the_status_rows():
    from latentmill.runner import status
    from latentmill.stages import LISTS, SECTIONS, STAGES

    # every section a stage reads is a recipe section, with the stage's config class; nothing else is
    for stage in STAGES:
        for name, load in stage.sections.items():
            assert SECTIONS[name]() is load()
    assert set(SECTIONS) == {name for stage in STAGES for name in stage.sections}
    assert set(LISTS) == {"fit_head", "stages"}
    download = next(s for s in STAGES if s.name == "download")
    assert {"download", "pack", "urls"} <= set(download.sections)  # a folder source is packed
    rows = status("/nonexistent-work")
    assert [r["stage"] for r in rows] == [s.name for s in STAGES]
    assert all(r["outputs"] == [] for r in rows)
