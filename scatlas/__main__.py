"""``python -m scatlas``: the ``scatlas`` command."""

from scatlas.entry import main

main()
