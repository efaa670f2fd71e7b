"""``python -m metahpo``: the same as the ``metahpo`` command."""

from metahpo.cli import main

main()
