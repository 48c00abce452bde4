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
        "sd35-finetune",
        "flux-lora",
    } <= set(names)
    for name in names:
        load_recipe(name)
    result = run_cli("recipes")
    assert result.exit_code == 0 and all(name in result.output for name in names)


def test_recipes_show_prints_a_recipe_that_loads_as_it_is(run_cli, tmp_path):
    result = run_cli("recipes", "show", "demo")
    assert result.exit_code == 0 and "fit_head:" in result.output
    (tmp_path / "mine.yaml").write_text(result.output)
    assert load_recipe(str(tmp_path / "mine.yaml")) == load_recipe("demo")
    missing = run_cli("recipes", "show", "dmeo")
    assert missing.exit_code == 2 and "Did you mean 'demo'?" in missing.output


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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One fresh `run demo` (SMALL) for the module, in a process of its own: the reference a killed run
    must equal, and the work folder the make-like test starts from (as a copy). Read, never changed."""
    work = tmp_path_factory.mktemp("demo-run") / "work"
    subprocess.run(_run_cmd(work), check=True, capture_output=True)
    return work


def _same_port(work, reference):
    """`work` will serve the sample images on `reference`'s port: the same URLs in the metadata."""
    (work / "urls").mkdir(parents=True)
    (work / "urls" / "server-port.txt").write_text((reference / "urls" / "server-port.txt").read_text())


@pytest.mark.slow
def test_the_demo_recipe_killed_midway_finishes_with_the_same_outputs(tmp_path, run_cli, demo_run):
    killed, reference = tmp_path / "killed", demo_run
    _same_port(killed, reference)
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
    assert run_cli("report", killed).exit_code == 0  # the report tells the run was resumed, and where
    page = (killed / "report" / "index.html").read_text()
    assert "<b>main</b>: step 6 of 6; resumed at step 3" in page


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


def _mtimes(work):
    return {
        p.relative_to(work).as_posix(): p.stat().st_mtime_ns
        for p in work.rglob("*")
        if p.is_file() and "report" not in p.parts
    }


@pytest.mark.slow
def test_run_works_like_make_and_a_moved_work_folder_is_a_no_op(tmp_path, run_cli, monkeypatch, demo_run):
    import shutil

    work, reference = tmp_path / "work", tmp_path / "reference"
    shutil.copytree(demo_run, work, symlinks=True)  # a finished run, copied: the moves below are of a copy
    before = _mtimes(work)

    # the same recipe again, then from a moved folder: every stage kept, not a file touched
    moved = tmp_path / "moved"
    for folder in (work, moved):
        if folder == moved:
            work.rename(moved)
        again = run_cli("run", "demo", "-w", folder, *SMALL)
        assert again.exit_code == 0, again.output
        stages = ["prefilter", "download", "score", "fit-head", "select", "encode", "train", "export"]
        for stage in stages:
            assert f"[{stage}] keep: up to date" in again.output, again.output
        assert _mtimes(folder) == before
    work = moved

    # from another directory, one holding files named like the recipe's values (user_agent_token:
    # latentmill, vae: tiny): still every stage kept, the records untouched
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "latentmill").mkdir(parents=True)
    (elsewhere / "latentmill" / "x.txt").write_text("a folder named like a setting's value")
    monkeypatch.chdir(elsewhere)
    again = run_cli("run", "demo", "-w", work, *SMALL)
    assert again.exit_code == 0 and again.output.count("keep: up to date") == 8, again.output
    assert _mtimes(work) == before
    monkeypatch.undo()

    # a changed threshold, up to select: select is redone, encode is marked stale
    where = ["--set", "select.where=['aesthetic_fit >= 5.0']"]
    partial = run_cli("run", "demo", "-w", work, *SMALL, *where, "--until", "select")
    assert partial.exit_code == 0, partial.output
    assert "[select] redo: settings.select.where: " in partial.output, partial.output
    assert "[score] keep" in partial.output
    status = run_cli("status", work)
    encode_row = next(line for line in status.output.splitlines() if line.startswith("encode"))
    assert "stale: selection was made again by the select stage" in encode_row
    for row in ("train", "export"):  # and every stage after it
        line = next(line for line in status.output.splitlines() if line.startswith(row))
        assert "which is stale" in line, line

    # the plan, then the run: encode, train and export redone, the stages before select untouched
    plan = run_cli("run", "demo", "-w", work, *SMALL, *where, "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert "[select] keep" in plan.output
    assert "[encode] redo: selection changed (made again by the select stage)" in plan.output
    assert "[train] redo: latents changed" in plan.output and "[export] redo" in plan.output
    upstream = {k: v for k, v in _mtimes(work).items() if k.split("/")[0] in ("images", "scores", "heads")}
    # in a process of its own, as the fresh run below: torch's thread count, and so its float sums, are equal
    result = subprocess.run(_run_cmd(work) + where, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "[score] keep: up to date" in result.stdout and "[encode] redo" in result.stdout
    assert {k: v for k, v in _mtimes(work).items() if k in upstream} == upstream
    assert (work / "runs" / ".replaced" / "main").is_dir()  # the old run moved aside, not deleted
    assert run_cli("report", work).exit_code == 0
    assert "<b>main</b> (replaced by a changed recipe" in (work / "report" / "index.html").read_text()
    assert (
        f"moved the replaced run {work / 'runs' / 'main'} to {work / 'runs' / '.replaced' / 'main'}"
        in result.stdout
    )

    # the same bytes as a fresh run with that threshold
    _same_port(reference, work)
    subprocess.run(_run_cmd(reference) + where, check=True, capture_output=True)

    def outputs(folder):
        files = sorted((folder / "selection").glob("*.parquet")) + sorted(
            (folder / "latents-128").glob("*.tar")
        )
        files += [folder / "runs" / "main" / "checkpoints" / "step-0000006" / "ema.safetensors"]
        return {f.relative_to(folder).as_posix(): f.read_bytes() for f in files}

    a, b = outputs(work), outputs(reference)
    assert a.keys() == b.keys() and len(a) > 3 and a == b


def test_preflight_lists_every_missing_file_and_model_at_once(tmp_path, run_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"urls: {{path: {tmp_path / 'urls.parquet'}}}\n"
        "score: {clip_model: ViT-B-32, pretrained: laion2b_s34b_b79k, aesthetic_head: missing-aesthetic.pth,\n"
        "        heads: [missing-probe.safetensors]}\n"
        "encode: {vae: nobody/no-such-vae}\n"
        f"train: {{model: {tmp_path / 'no-pipeline'}, text_encoder: openclip:ViT-B-32:laion2b_s34b_b79k}}\n"
    )
    result = run_cli("run", recipe, "-w", tmp_path / "work")
    assert result.exit_code == 2, result.output
    for missing in (
        "urls: the URL table " + str(tmp_path / "urls.parquet") + " does not exist",
        "score.aesthetic_head: missing-aesthetic.pth does not exist",
        "score.heads: missing-probe.safetensors does not exist",
        "`hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K open_clip_pytorch_model.bin`",
        "encode.vae: nobody/no-such-vae is not in the local Hugging Face cache: `hf download nobody/no-such-vae`",
        "train.model: " + str(tmp_path / "no-pipeline") + " does not exist",
        "train.text_encoder: open_clip ViT-B-32:laion2b_s34b_b79k",
    ):
        assert missing in result.output, (missing, result.output)
    assert not (tmp_path / "work").exists()  # nothing ran


def test_a_table_the_guard_refuses_whole_gives_the_same_exit_and_hint_on_every_run(server, tmp_path, run_cli):
    from tests.conftest import write_table

    table = write_table(
        tmp_path / "u.parquet", [{"URL": server.url(f"/gen/{i}/320x320.jpg"), "TEXT": "x"} for i in range(3)]
    )
    (tmp_path / "r.yaml").write_text(f"urls:\n  path: {table}\n")
    outcomes = [
        run_cli("run", tmp_path / "r.yaml", "-w", tmp_path / "w", "--until", "download") for _ in range(2)
    ]
    for result in outcomes:
        assert result.exit_code == 3, result.output
        assert "private_address 3" in result.output and "--allow-host" in result.output
