"""scatlas: a vector-search reference atlas for single-cell RNA-seq.

``scatlas.atlas`` (store, ingest, embedders), ``scatlas.index`` (sharded FAISS index, metadata) and
``scatlas.query`` (annotate, hunt) do the work, each usable from Python; this package's ``cli`` wires them to the
``scatlas`` command.
"""

__version__ = "0.1.0"
