"""scatlas: a vector-search reference atlas for single-cell RNA-seq.

This package holds only the command-line wiring; the work is done by the ``atlas``, ``index`` and ``query``
packages, each usable from Python on its own.
"""

__version__ = "0.1.0"
