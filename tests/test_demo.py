"""`latentmill demo` runs the demo recipe offline end to end."""

import json
import shutil

import pytest

from tests.conftest import report_section

pytestmark = pytest.mark.slow  # end to end: real downloads, Ray, training runs


def test_demo_runs_every_stage_offline(tmp_path, run_cli):
    work = tmp_path / "work"
    result = run_cli("demo", "--work", work, "--steps", "4", "--vae-steps", "40")
    assert result.exit_code == 0, result.output
    report = json.loads((work / "report" / "demo.json").read_text())
    assert report["prefilter"]["kept_rows"] < report["prefilter"]["input_rows"]
    assert {s["rule"] for s in report["prefilter"]["steps"] if s["dropped"]} >= {"min_side", "max_pwatermark"}
    assert {"http_404", "timeout", "opted_out"} <= set(report["download"]["failures"])
    downloaded = report["download"]["success"]
    assert report["score"]["scored"] == downloaded > 10
    kept = report["select"]["kept"]
    assert 0 < kept < downloaded
    latents = report["encode"]["128"]
    assert latents["dropped"]["not_selected"] == downloaded - kept
    assert latents["samples"] + sum(latents["dropped"].values()) == downloaded
    fitted = report["fit-head"]["aesthetic_fit"]
    assert fitted["task"] == "regression" and fitted["validation"] >= 20
    assert (
        fitted["spearman"] > 0.3
    )  # held out: the head ranks unseen images by their labels, well above chance
    assert_fitted_head_decides(work)
    assert report["train"]["main"]["step"] == 4
    # the demo's VAE, fitted on the selected pictures, reconstructs them better than its random init
    assert report["vae"]["psnr_fitted_db"] > report["vae"]["psnr_random_init_db"] + 1
    manifest = json.loads((work / "latents-128" / "manifest.json").read_text())
    assert manifest["encode_config"]["vae"] == str(work / "vae") and manifest["scaling_factor"] != 0.18215
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(work / "export")
    image = pipe("a cat", num_inference_steps=2, height=256, width=256, output_type="np").images[0]
    assert image.shape == (256, 256, 3)
    assert report["buckets"]["images"] == kept
    assert (work / "report" / "buckets.png").stat().st_size > 1000

    # the report of the same work folder: every section, rendered by headless Chromium without errors
    result = run_cli("report", work)
    assert result.exit_code == 0, result.output
    page = (work / "report" / "index.html").read_text()
    for section in (
        "funnel",
        "scores",
        "heads",
        "buckets",
        "thumbnails",
        "vae",
        "runs",
        "loss",
        "samples",
        "settings",
    ):
        assert f'<section id="{section}">' in page
    assert "Dropped, by rule" in page and "<td>prefilter</td><td>min_side</td>" in page  # each rule's count
    assert "<b>main</b>: step 4 of 4" in report_section(page, "runs")
    assert "(seed 0)" in report_section(page, "samples")  # the prompts and seeds under the grids
    assert "<summary>select</summary>" in report_section(page, "settings")
    assert "Dropped: min_side" in page and "Kept" in page and page.count("data:image/png;base64,") > 15
    assert (
        "aesthetic_fit from AESTHETIC_SCORE" in page and 'alt="aesthetic_fit against AESTHETIC_SCORE"' in page
    )
    assert "What these grids can and cannot show" in page and 'alt="VAE reconstructions"' in page
    assert 'src="http' not in page  # self-contained: every image inline
    render_in_chromium(work / "report" / "index.html", tmp_path)


def assert_fitted_head_decides(work):
    """The sample labels photographs higher than flat synthetic pictures: the rule on the fitted head must
    keep photographs and drop synthetic pictures, not cut at random."""
    import pandas as pd

    scores = pd.concat(pd.read_parquet(p) for p in sorted((work / "scores").glob("*.parquet")))
    selection = pd.concat(pd.read_parquet(p) for p in sorted((work / "selection").glob("*.parquet")))
    table = scores.merge(selection, on="key")
    table["photo"] = table["url"].str.contains("/photo/")
    by_head = table["reason"] == "aesthetic_fit >= 5.5"
    assert by_head.sum() > 10
    assert (~table.loc[by_head, "photo"]).mean() > 0.9  # what the head drops is synthetic
    judged = table[table["reason"].isin(["", "aesthetic_fit >= 5.5"])]  # images the head decided on
    photos, synthetic = judged[judged["photo"]], judged[~judged["photo"]]
    assert photos["keep"].mean() > 0.8 and synthetic["keep"].mean() < 0.5


def chromium_flags(tmp_path):
    """Chromium's path and the flags of a headless, offline run with its profile under tmp_path."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed for this test: .ci/run installs Debian's chromium package"
    return chromium, [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--enable-logging=stderr",
        "--v=0",
    ]


def render_in_chromium(page, tmp_path):
    import subprocess

    chromium, flags = chromium_flags(tmp_path)
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0
    for section in ("funnel", "scores", "heads", "buckets", "thumbnails", "vae", "loss", "samples"):
        assert f'id="{section}"' in dom.stdout
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console_errors == []
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, "--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
