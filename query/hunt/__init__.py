"""The rare-cell hunt: train a classifier on a few labelled cells, sweep the whole atlas, report where hits are.

Public API::

    from scatlas.query.hunt import train, sweep, report, HuntClassifier

    clf = train(index, "kidney.h5ad", positive="cell_type = 'Norn cell'", background=20_000, out="norn.clf")
    summary = sweep(index, clf, "norn_sweep")              # -> norn_sweep/hits.parquet
    result = report(summary.hits_path, index, "norn_report")  # by atlas label, donor, dataset

Modules: :mod:`~query.hunt.train` (positives, background, CV, calibration, threshold), :mod:`~query.hunt.classifier`
(the saved model), :mod:`~query.hunt.sweep` and :mod:`~query.hunt.kernels` (scoring stored float16 vectors),
:mod:`~query.hunt.report`, :mod:`~query.hunt.enrichment` and :mod:`~query.hunt.de`.
"""

from scatlas.query.hunt.classifier import HuntClassifier
from scatlas.query.hunt.report import ReportResult, report
from scatlas.query.hunt.sweep import SweepSummary, sweep
from scatlas.query.hunt.train import train

__all__ = ["HuntClassifier", "ReportResult", "SweepSummary", "report", "sweep", "train"]
