"""``python -m refute`` runs the command line."""

from refute.cli import main

main()
