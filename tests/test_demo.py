"""`latentmill demo` runs the demo recipe offline end to end."""

import json


def test_demo_runs_every_stage_offline(tmp_path, run_cli):
    work = tmp_path / "work"
    result = run_cli("demo", "--work", work, "--steps", "4")
    assert result.exit_code == 0, result.output
    report = json.loads((work / "report" / "demo.json").read_text())
    assert report["prefilter"]["kept_rows"] < report["prefilter"]["input_rows"]
    assert {s["rule"] for s in report["prefilter"]["steps"] if s["dropped"]} >= {"min_side", "max_pwatermark"}
    assert {"http_404", "timeout", "opted_out"} <= set(report["download"]["failures"])
    downloaded = report["download"]["success"]
    assert report["score"]["scored"] == downloaded > 10
    kept = report["select"]["kept"]
    assert 0 < kept < downloaded
    latents = report["encode"]["256"]
    assert latents["dropped"]["not_selected"] == downloaded - kept
    assert latents["samples"] + sum(latents["dropped"].values()) == downloaded
    assert report["train"]["main"]["step"] == 4
    assert report["buckets"]["images"] == kept
    assert (work / "report" / "buckets.png").stat().st_size > 1000
