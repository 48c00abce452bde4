"""The `latentmill` command line: a thin layer over the library, subcommands imported on first use.

Exit codes: 0 success, 2 bad usage or bad input (one message naming the file, column or option),
3 nothing left (a stage ran but every input was refused or failed: the message says why and the fix),
1 any other failure (`--debug` shows the traceback).
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from latentmill import __version__

# command -> "module:attribute", imported only when that command runs (so --help never imports torch)
COMMANDS = {
    "urls": ("latentmill.cli.urls:urls", "Inspect and prefilter URL tables (parquet, csv, tsv, jsonl)."),
    "download": (
        "latentmill.cli.download:download",
        "Download a URL table into WebDataset image shards (img2dataset).",
    ),
    "buckets": (
        "latentmill.cli.buckets:buckets",
        "Print the aspect-ratio buckets, or how a dataset falls into them.",
    ),
    "encode": (
        "latentmill.cli.encode:encode",
        "Bucket, resize, crop and VAE-encode images into latent shards.",
    ),
    "encode-text": (
        "latentmill.cli.latents:encode_text",
        "Store each caption's text states beside a latent folder (sdxl, sd3, flux), for train --text-states.",
    ),
    "score": (
        "latentmill.cli.filters:score",
        "Score images with CLIP and predictor heads (aesthetic, unsafe, watermark).",
    ),
    "dedup": (
        "latentmill.cli.dedup:dedup",
        "Find near-duplicate images from the CLIP embeddings (k-means, then pairs within clusters).",
    ),
    "select": (
        "latentmill.cli.select:select",
        "Apply thresholds to the scores; selection parquets and the funnel.",
    ),
    "eval": (
        "latentmill.cli.evaluate:evaluate",
        "CLIP score, FID, KID of a run's images, or between two image sets (`eval fid A B`).",
    ),
    "fit-head": ("latentmill.cli.filters:fit_head", "Fit a linear or MLP head on labelled CLIP embeddings."),
    "convert-head": (
        "latentmill.cli.filters:convert_head",
        "Convert a published predictor (LAION's Keras NSFW zip) to safetensors.",
    ),
    "train": (
        "latentmill.cli.train:train",
        "Train a U-Net straight from latent shards (one GPU, or many with torchrun).",
    ),
    "export": ("latentmill.cli.train:export", "Write a run as a diffusers StableDiffusionPipeline folder."),
    "sample": ("latentmill.cli.train:sample", "Generate images from a run or a diffusers pipeline folder."),
    "merge": (
        "latentmill.cli.train:merge",
        "Merge checkpoints (weighted sum, add-difference), or bake a LoRA adapter in.",
    ),
    "recipes": ("latentmill.cli.run:recipes", "List the shipped recipes."),
    "run": ("latentmill.cli.run:run", "Run a recipe's stages in order into one work folder (resumable)."),
    "status": ("latentmill.cli.run:status", "Show each stage's progress in a work folder."),
    "report": ("latentmill.cli.report:report", "One self-contained HTML page of a work folder."),
    "images": (
        "latentmill.cli.images:images",
        "Look inside image shards, or pack a folder of images into them.",
    ),
    "latents": (
        "latentmill.cli.latents:latents",
        "Check latent shards against their manifest (latents verify).",
    ),
    "cache": (
        "latentmill.cli.cache:cache",
        "Show or free the local copies latentmill holds (remote runs, shard caches).",
    ),
    "serve-images": (
        "latentmill.cli.serve:serve_images",
        "Serve test images (and failure cases) on 127.0.0.1.",
    ),
    "demo": ("latentmill.cli.demo:demo", "Run the pipeline offline on bundled sample images."),
}


class BadInput(click.ClickException):
    """Bad input found by the library: one message, exit code 2."""

    exit_code = 2


class NothingLeftError(click.ClickException):
    """Every input was refused or failed: one message, exit code 3."""

    exit_code = 3


def _set_storage_options(ctx, param, values):
    if values:
        from latentmill.curate.storageoptions import check_options, options, parse_option, set_options

        set_options(check_options(options() | dict(parse_option(v) for v in values), "--storage-option"))


STORAGE_OPTION = click.Option(
    ["--storage-option"],
    multiple=True,
    metavar="KEY=VALUE",
    expose_value=False,
    is_eager=True,
    callback=_set_storage_options,
    help="Passed to fsspec for s3://, gs://… paths (endpoint_url=http://10.0.0.5:9000, anon=true); "
    "credentials come from the usual places (AWS_* variables, AWS_PROFILE, the instance role).",
)


def _with_storage_option(command: click.Command) -> click.Command:
    """Every command takes --storage-option (a group: each of its subcommands)."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _with_storage_option(sub)
    elif STORAGE_OPTION not in command.params:
        command.params.append(STORAGE_OPTION)
    return command


class LazyGroup(click.Group):
    """A group whose subcommands are imported when invoked, not when the group is built."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return _with_storage_option(getattr(importlib.import_module(module), attr))

    def invoke(self, ctx):
        from latentmill.errors import InputError, NothingLeft, TrainingFailed

        try:
            return super().invoke(ctx)
        except InputError as err:
            if os.environ.get("LATENTMILL_DEBUG") == "1":
                raise
            raise BadInput(str(err)) from None
        except NothingLeft as err:
            if os.environ.get("LATENTMILL_DEBUG") == "1":
                raise
            raise NothingLeftError(str(err)) from None
        except TrainingFailed as err:
            if os.environ.get("LATENTMILL_DEBUG") == "1":
                raise
            raise click.ClickException(str(err)) from None  # exit 1: the input was fine, training was not
        except Exception as err:  # an object store's refusal (no bucket, no access, no endpoint): exit 2
            from latentmill.curate.storage import explain

            message = explain(err)
            if message is None or os.environ.get("LATENTMILL_DEBUG") == "1":
                raise
            raise BadInput(message) from None

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="latentmill")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, debug):
    """latentmill: from a table of image URLs to a trained latent-diffusion model.

    Exit codes: 0 success, 2 bad input (the message names it), 3 nothing left (every input refused or
    failed), 1 any other failure.

    \b
    Example, from a LAION-style parquet to image shards:
      latentmill urls inspect laion.parquet
      latentmill urls prefilter laion.parquet -o kept.parquet --min-side 512 --max-pwatermark 0.5
      latentmill download kept.parquet -o images/
    """
    ctx.obj = {"debug": debug}
    _show_warnings_as_messages()
    if debug:
        os.environ["LATENTMILL_DEBUG"] = "1"


def _show_warnings_as_messages() -> None:
    """latentmill's warnings (latentmill.errors.warn) print as one `Warning: ...` line on stderr, every time."""
    import warnings

    from latentmill.errors import LatentmillWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LatentmillWarning):
            click.echo(f"Warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.simplefilter("always", LatentmillWarning)
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and map failures to exit codes 2 (bad input) and 1 (other)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("LATENTMILL_DEBUG") == "1"
    try:
        cli.main(args=args, prog_name="latentmill", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted; re-run the same command to resume.", err=True)
        sys.exit(130)
    except Exception as err:  # the last line of defence: one message, the traceback on --debug
        if debug:
            raise
        click.echo(f"Error: {type(err).__name__}: {err} (run with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)
