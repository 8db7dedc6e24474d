"""The label-transfer benchmark behind ``scripts/bench_annotate.py`` (see that file for what it measures).

Modules: ``pairs`` (reference -> query splits and their files), ``methods`` (scatlas and logreg), ``peers``
(CellTypist, scanpy ingest), ``evaluate`` (scores), ``dropout`` (queries lacking genes), ``tuning`` (``--tune``
and the pick rule), ``scale`` (``--scale-cells``), ``render`` (the Markdown of docs/benchmarks.md), ``run``
(one pair, every method) and ``cli`` (the options and modes).
"""
