"""``python -m partserve``: the same as the ``partserve`` command."""

from partserve.cli import main

main(prog_name="partserve")
