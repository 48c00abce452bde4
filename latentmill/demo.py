"""The offline demo: the `demo` recipe (sample images on a loopback server, tiny random models) end to end,
then a bucket chart and a JSON summary in WORK/report. The models are tiny and random: the point is the
data flow, not the pictures."""

from __future__ import annotations

from pathlib import Path

from latentmill.curate.atomic import write_json
from latentmill.curate.buckets import make_buckets
from latentmill.curate.bucketstats import bucket_distribution, plot_distribution
from latentmill.layout import Layout
from latentmill.recipe import load_recipe
from latentmill.runner import run_recipe


def run_demo(work: str | Path, log=print, overrides: list[str] = ()) -> dict:
    """Run the demo recipe into `work`; return what each stage reported. Re-running continues a stopped demo."""
    lay = Layout(work)
    recipe = load_recipe("demo", list(overrides))
    report = run_recipe(recipe, lay.work, log=log)
    resolution = recipe["encode"]["resolution"]
    distribution = bucket_distribution(lay.images, make_buckets(resolution), lay.selection)
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
