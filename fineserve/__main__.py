"""`python -m fineserve` is the `fineserve` command."""

from fineserve.cli import main

main()
