"""``python -m verifier`` runs the ``refute`` command line."""

from verifier.main import main

main()
