"""DreamBooth: the subject's latents, the class images' latents of prior preservation and their weight."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from latentmill.errors import InputError
from latentmill.schema import opt


@dataclass
class DreamBoothSettings:
    instance: str | None = opt(
        None, "DreamBooth: the subject's latent folder (instead of SHARDS), with --class-data.", path=True
    )
    class_data: str | None = opt(
        None,
        "DreamBooth prior preservation: latents of the subject's class; each step adds their weighted loss.",
        path=True,
    )
    prior_loss_weight: float = opt(1.0, "DreamBooth: weight of the class images' loss.", low=0.0)

    def check_section(self) -> None:
        if self.instance and self.shards:
            raise InputError(
                f"{self.name('instance')} and SHARDS both given: give the subject's latents once, "
                f"as SHARDS or as --instance."
            )
        if self.instance and not self.class_data:
            raise InputError(
                f"{self.name('instance')} is DreamBooth's subject and needs {self.name('class_data')} "
                f"(the class images' latents); to fine-tune on the folder alone, give it as SHARDS."
            )
        if self.instance and self.class_data and _same_place(self.instance, self.class_data):
            raise InputError(
                f"{self.name('class_data')} {self.class_data} is the {self.name('instance')} folder: prior "
                f"preservation needs latents of other images of the class (make them with `latentmill "
                f"sample --to-folder`, then pack and encode them)."
            )


def _same_place(a: str, b: str) -> bool:
    """Two folders given as paths or URLs name the same place (links and trailing slashes aside)."""
    from latentmill.curate.storage import is_remote

    if is_remote(a) or is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()
