"""``python -m passbridge``: the CLI."""

from passbridge.cli import main

main()
