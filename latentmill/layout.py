"""The work folder of `latentmill run`: every path a stage reads or writes, named once. The stage table
(latentmill.stages) names these attributes as each stage's inputs and outputs.

WORK/urls/        the URL table (or the demo's sample.parquet), kept.parquet and its funnel
WORK/images/      image shards (img2dataset), with _latentmill/summary.json
WORK/scores/      score parquets; WORK/embeddings/ the CLIP embeddings beside them
WORK/heads/       heads fitted by the fit-head stage
WORK/dedup/       duplicate parquets, funnel.json, _work/ (the passes' intermediate files)
WORK/selection/   selection parquets, funnel.json, plots/
WORK/vae/         the demo's fitted tiny VAE (the demo only)
WORK/latents-RES/ latent shards at one resolution, manifest.json
WORK/runs/NAME/   training runs (checkpoints, log.jsonl)
WORK/export/      the exported model (a diffusers pipeline, or a LoRA file)
WORK/report/      the HTML report and its pictures
WORK/lineage/     each stage's record of what it last finished from (latentmill.plan)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from latentmill.curate.storage import location
from latentmill.filters.embeddings import embeddings_folder

LATENTS_PREFIX = "latents-"


@dataclass(frozen=True)
class Layout:
    work: Path

    def __post_init__(self):
        object.__setattr__(self, "work", location(self.work))  # a folder, or a prefix in an object store

    def paths(self, name: str) -> list[Path]:
        """The paths behind a stage input or output name: one path, or every latents-RES folder and run."""
        if name == "latents":
            return list(self.latent_folders().values())
        if name == "runs":
            return self.run_folders()
        return [getattr(self, name)]

    def present(self, name: str) -> bool:
        paths = self.paths(name)
        return bool(paths) and all(p.exists() for p in paths)

    def describe(self, name: str) -> str:
        """How messages name a stage input: its path, or the pattern of its folders."""
        patterns = {"latents": f"{LATENTS_PREFIX}RES/", "runs": "runs/NAME/"}
        return str(self.work / patterns[name]) if name in patterns else str(getattr(self, name))

    @property
    def urls(self) -> Path:
        return self.work / "urls"

    @property
    def sample_table(self) -> Path:
        return self.urls / "sample.parquet"

    @property
    def server_port(self) -> Path:
        return self.urls / "server-port.txt"

    @property
    def kept(self) -> Path:
        return self.urls / "kept.parquet"

    @property
    def kept_funnel(self) -> Path:
        return self.urls / "kept.funnel.json"

    @property
    def images(self) -> Path:
        return self.work / "images"

    @property
    def download_summary(self) -> Path:
        return self.images / "_latentmill" / "summary.json"

    @property
    def scores(self) -> Path:
        return self.work / "scores"

    @property
    def embeddings(self) -> Path:
        return embeddings_folder(self.scores)

    @property
    def heads(self) -> Path:
        return self.work / "heads"

    def head(self, column: str) -> Path:
        return self.heads / f"{column}.safetensors"

    @property
    def dedup(self) -> Path:
        return self.work / "dedup"

    @property
    def selection(self) -> Path:
        return self.work / "selection"

    @property
    def select_funnel(self) -> Path:
        return self.selection / "funnel.json"

    @property
    def vae(self) -> Path:
        return self.work / "vae"

    def latents(self, resolution: int) -> Path:
        return self.work / f"{LATENTS_PREFIX}{resolution}"

    def latent_folders(self) -> dict[int, Path]:
        """resolution -> folder, for every latents-RES folder present."""
        found = {}
        for path in self.work.glob(f"{LATENTS_PREFIX}*"):
            suffix = path.name[len(LATENTS_PREFIX) :]
            if path.is_dir() and suffix.isdigit():
                found[int(suffix)] = path
        return dict(sorted(found.items()))

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    def run(self, name: str) -> Path:
        return self.runs / name

    def run_folders(self) -> list[Path]:
        """The training runs (runs/.replaced/ holds runs a changed recipe replaced)."""
        if not self.runs.exists():
            return []
        return sorted(p for p in self.runs.iterdir() if p.is_dir() and not p.name.startswith("."))

    @property
    def export(self) -> Path:
        return self.work / "export"

    @property
    def lineage(self) -> Path:
        return self.work / "lineage"

    @property
    def report(self) -> Path:
        return self.work / "report"
