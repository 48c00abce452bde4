"""`python -m latentmill`: the same as the `latentmill` command."""

from latentmill.cli import main

main()
