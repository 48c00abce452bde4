"""The demo runs offline end to end on the bundled samples."""

import json


def test_demo_runs_the_existing_stages_offline(tmp_path, run_cli):
    work = tmp_path / "work"
    result = run_cli("demo", "--work", work, "--processes", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((work / "report" / "demo.json").read_text())
    assert report["prefilter"]["kept_rows"] < report["prefilter"]["input_rows"]
    assert {s["rule"] for s in report["prefilter"]["steps"] if s["dropped"]} >= {"min_side", "max_pwatermark"}
    assert report["download"]["success"] == report["image_shards"]["samples"] > 10
    assert {"http_404", "timeout", "opted_out"} <= set(report["download"]["failures"])
    assert report["image_shards"]["decode_errors"] == {}
    assert report["score"]["scored"] == report["image_shards"]["samples"]
    kept = report["select"]["kept"]
    assert 0 < kept < report["image_shards"]["samples"]
    assert report["buckets"]["images"] == kept
    assert report["latents"]["dropped"]["not_selected"] == report["image_shards"]["samples"] - kept
    assert report["latents"]["samples"] + sum(report["latents"]["dropped"].values()) == report["image_shards"]["samples"]
    assert report["latents"]["samples"] > 10 and (work / "latents" / "manifest.json").exists()
    assert (work / "report" / "buckets.png").stat().st_size > 1000
