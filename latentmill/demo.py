"""The offline demo: the `demo` recipe (sample images on a loopback server, tiny models) end to end, then
a bucket chart, a JSON summary and the HTML report in WORK/report.

A random VAE would decode every sample to noise, so between `select` and `encode` the demo fits the tiny
VAE for a minute on the selected pictures (curate.vaefit) and encodes with it: the sample grids are then
pictures, and the report shows the VAE's reconstructions beside the originals. `latentmill run demo`
skips that step and keeps the recipe's random `tiny` VAE (the data flow, not the pictures)."""

from __future__ import annotations

from pathlib import Path

from latentmill.curate.bucketstats import bucket_distribution, plot_distribution
from latentmill.curate.storage import write_json
from latentmill.curate.vaefit import VaeFitConfig, fit_vae
from latentmill.layout import Layout
from latentmill.recipe import load_recipe
from latentmill.runner import run_recipe
from latentmill.stages import section


def run_demo(work: str | Path, log=print, overrides: list[str] = (), vae_steps: int = 300) -> dict:
    """Run the demo recipe into `work`; return what each stage reported. Re-running continues a stopped demo."""
    lay = Layout(work)
    report = run_recipe(load_recipe("demo", list(overrides)), lay.work, until="select", log=log)
    report["vae"] = fit_vae(lay.images, lay.selection, lay.vae, VaeFitConfig(steps=vae_steps), log=log)
    # the fitted VAE replaces the recipe's random one (an override, so an explicit --set still wins)
    recipe = load_recipe("demo", [f"encode.vae={lay.vae}", *overrides])
    report |= run_recipe(recipe, lay.work, start="encode", log=log)
    resolution = recipe["encode"]["resolution"]
    buckets = section(recipe, "encode").buckets()  # the encode stage's own bucket set
    distribution = bucket_distribution(lay.images, buckets, lay.selection)
    chart = plot_distribution(distribution, lay.report / "buckets.png")
    log(
        f"[buckets] {distribution['images']} selected images in "
        f"{sum(r['count'] > 0 for r in distribution['buckets'])} buckets at {resolution} px: {chart}"
    )
    report["buckets"] = distribution
    write_json(lay.report / "demo.json", report)
    from latentmill.report import build_report

    log(f"[report] {build_report(lay.work)}")
    return report
