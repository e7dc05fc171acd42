"""`python -m mta_cli ...` runs the `mta` command line (as under `torchrun -m mta_cli`)."""

from mta_cli.cli import main

main()
