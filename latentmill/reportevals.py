"""The report's evaluation curves: what `train --eval-every` logged besides the loss (CLIP score, FID, KID
against step; the validation loss is drawn with the training loss)."""

from __future__ import annotations

from latentmill.curate.records import read_log
from latentmill.layout import Layout
from latentmill.reporthtml import Markup, concat, html, image

CURVES = (("clip_score", "CLIP score"), ("fid", "FID"), ("kid", "KID"))


def eval_section(lay: Layout) -> Markup | None:
    body = []
    for run in lay.run_folders():
        log = run / "log.jsonl"
        if not log.exists():
            continue
        chart = _chart(read_log(log))
        if chart:
            body.append(html("<h3>{}</h3>{}", run.name, image(f"evaluation {run.name}", chart)))
    return concat(body) or None


def _chart(entries: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latentmill.report import _figure_uri

    curves = [
        (key, title, [(e["step"], e[key]) for e in entries if isinstance(e.get(key), (int, float))])
        for key, title in CURVES
    ]
    curves = [c for c in curves if c[2]]
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
    for ax, (_, title, points) in zip(axes[0], curves, strict=True):
        ax.plot([s for s, _ in points], [v for _, v in points], "o-", color="#4C72B0", markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    return _figure_uri(fig)
