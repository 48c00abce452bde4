"""`latentmill eval fid A B` and `latentmill eval RUN_OR_PIPELINE --prompts FILE --reference IMAGES`."""

from __future__ import annotations

import json

import click

from latentmill.cli.options import Location
from latentmill.evaluation import CLIP_DEFAULT
from latentmill.train.schedule import SAMPLER_NAMES

FEATURES_HELP = (
    "Feature space: clip:MODEL[:PRETRAINED] (FID in CLIP space; default clip:<--clip-model>), "
    "inception:WEIGHTS_FILE (the standard FID, pytorch-fid's weights), dinov2:FOLDER."
)


class EvalGroup(click.Group):
    """`eval fid A B`, and `eval SOURCE ...` for anything that is not a subcommand's name."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)


@click.group(cls=EvalGroup)
def evaluate():
    """Numbers for what a model makes: CLIP score, FID, KID, precision and recall.

    \b
    Examples:
      latentmill eval fid curated-images/ all-images/ --features clip:ViT-L-14-quickgelu:openai --json
      latentmill eval runs/stage2 --prompts prompts.txt --reference images/ --count 500 -o eval.json
    """


@evaluate.command()
@click.argument("a", type=Location(exists=True))
@click.argument("b", type=Location(exists=True))
@click.option("--features", default="clip:" + CLIP_DEFAULT, show_default=True, help=FEATURES_HELP)
@click.option(
    "--device", default="auto", show_default=True, help="auto (cuda when available), cpu, cuda, ..."
)
@click.option(
    "--kid-only", is_flag=True, help="KID (and precision/recall) without FID: for sets of few images."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (keys fid, kid, ...).")
def fid(a, b, features, device, kid_only, as_json):
    """FID, KID, precision and recall between two image sets: folders of image shards or pictures, or a
    .npz of cached statistics. Statistics of a folder are cached by its content ($LATENTMILL_CACHE).

    \b
    Example:
      latentmill eval fid work-a/images work-b/images --json
    """
    from latentmill.evaluation import compare_sets

    numbers = compare_sets(str(a), str(b), features, device, kid_only)
    click.echo(json.dumps(numbers) if as_json else _lines(numbers))


@evaluate.command("run", hidden=True)
@click.argument("source", type=Location(exists=True))
@click.option(
    "--prompts",
    "prompts_file",
    type=Location(exists=False),
    help="One prompt per line (default: the captions of the run's held-out latents, encode --validation-share).",
)
@click.option(
    "--reference", type=Location(exists=False), help="Images (folder, image shards) or a .npz for FID/KID."
)
@click.option(
    "--count", default=100, show_default=True, type=click.IntRange(min=1), help="Images to generate."
)
@click.option(
    "--clip-model",
    default=CLIP_DEFAULT,
    show_default=True,
    help="open_clip MODEL[:PRETRAINED] of the CLIP score (tag or checkpoint file; none: random, e.g. tiny-rn).",
)
@click.option("--features", default=None, help=FEATURES_HELP)
@click.option("--seed", default=0, show_default=True, type=int, help="Image i is drawn with seed + i.")
@click.option(
    "--sampler",
    type=click.Choice(SAMPLER_NAMES),
    default=None,
    help="As `latentmill sample --sampler` (default: the family's: ddim, or euler).",
)
@click.option("--sampler-steps", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--guidance", default=5.0, show_default=True, type=float)
@click.option("--width", type=click.IntRange(min=8), default=None)
@click.option("--height", type=click.IntRange(min=8), default=None)
@click.option(
    "--device", default="auto", show_default=True, help="auto (cuda when available), cpu, cuda, ..."
)
@click.option("--kid-only", is_flag=True, help="KID without FID (few images).")
@click.option(
    "--negative-prompt", default="", help="What guidance steers away from (default: the empty caption)."
)
@click.option(
    "--text-encoder",
    default=None,
    help="For a run trained on caption states stored in its shards: the text encoder that made them (default: the "
    "one its latents' manifest names).",
)
@click.option(
    "-o",
    "--output",
    type=Location(exists=False, dir_okay=False),
    help="Write the numbers and settings as JSON here.",
)
def run(source, prompts_file, reference, count, clip_model, features, seed, sampler, sampler_steps,
        guidance, width, height, device, kid_only, negative_prompt, text_encoder, output):  # fmt: skip
    """Generate COUNT images of the prompts from a run (its last checkpoint) or a pipeline folder; their
    CLIP score, and FID/KID against --reference."""
    from latentmill.curate.storage import write_json
    from latentmill.errors import InputError
    from latentmill.evaluation import evaluate_run, read_prompts, validation_captions
    from latentmill.progress import progress_bar

    if (width is None) != (height is None):
        raise InputError("eval: give both --width and --height, or neither (the training resolution).")
    prompts = read_prompts(prompts_file) if prompts_file else validation_captions(str(source))
    with progress_bar(count, "eval", "img") as bar:
        numbers = evaluate_run(
            str(source), prompts, str(reference) if reference else None, count, clip_model,
            features, seed, sampler_steps, guidance, (width, height) if width else None, device, kid_only,
            progress=bar.update, text_encoder=text_encoder, negative=negative_prompt, method=sampler,
        )  # fmt: skip
    if output:
        write_json(output, numbers)
    click.echo(_lines(numbers))


def _lines(numbers: dict) -> str:
    shown = {k: v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return "\n".join(
        f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}" for k, v in shown.items()
    )
