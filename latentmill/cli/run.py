"""`latentmill recipes` (and `recipes show`), `run` and `status`."""

from __future__ import annotations

import click

from latentmill.cli.options import Location, click_options, config_from, given_on_command_line
from latentmill.curate.executors import ExecutorConfig
from latentmill.stages import STAGE_NAMES


@click.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx):
    """List the shipped recipes, one line each; `recipes show NAME` prints one.

    \b
    Examples:
      latentmill recipes
      latentmill recipes show demo > my-recipe.yaml
    """
    if ctx.invoked_subcommand is None:
        from latentmill.recipe import list_recipes

        for name, description in list_recipes().items():
            click.echo(f"{name:<28}{description}")


@recipes.command("show")
@click.argument("name")
def show(name):
    """Print the YAML of a shipped recipe (or of a recipe file), to read or to copy and edit.

    \b
    Example:
      latentmill recipes show laion-aesthetics-v2-5plus
    """
    from latentmill.recipe import recipe_text

    click.echo(recipe_text(name), nl=False)


@click.command()
@click.argument("recipe")
@click.option("--urls", type=Location(exists=True), help="The URL table (for recipes that read one).")
@click.option("-w", "--work", default="work", show_default=True, type=Location(), help="Work folder.")
@click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe value."
)
@click.option(
    "--until",
    type=click.Choice(STAGE_NAMES),
    help="Stop after this stage.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print which stages would be kept, run or redone, and why; run none."
)
@click_options(ExecutorConfig)
@click.pass_context
def run(ctx, recipe, urls, work, overrides, until, dry_run, **kwargs):
    """Run RECIPE (a shipped name or a YAML file) stage by stage into WORK; re-run to continue a stopped run.

    Like make: a stage finished with the same settings and inputs is kept; one whose settings or inputs
    changed is redone, with every stage after it that reads what it makes. The plan is printed first.

    \b
    Examples:
      latentmill run laion-aesthetics-v2-5plus --urls laion.parquet -w work/ --executor ray --ray-address auto
      latentmill run demo -w demo-work --set train.steps=50 --until train
      latentmill run demo -w demo-work --set select.where="['aesthetic_fit >= 5.0']" --dry-run
    """
    from latentmill.recipe import load_recipe
    from latentmill.runner import run_recipe

    # an executor option given here overrides the recipe's executor section, as --set executor.KEY would
    given = given_on_command_line(ExecutorConfig, ctx)
    chosen = config_from(ExecutorConfig, kwargs)
    sets = [f"executor.{key}={getattr(chosen, key)}" for key in given]
    loaded = load_recipe(recipe, sets + list(overrides))
    run_recipe(loaded, work, urls=urls, until=until, log=click.echo, dry_run=dry_run)
    if not dry_run:
        click.echo(f"done: {work}")


@click.command()
@click.argument("work", type=Location(exists=True))
def status(work):
    """Every stage's progress in WORK: shards done of total, samples kept.

    \b
    Example:
      latentmill status work/
    """
    from latentmill.runner import status as run_status

    for row in run_status(work):
        click.echo(f"{row['stage']:<22}{row['done']:<18}{row['detail']}")
