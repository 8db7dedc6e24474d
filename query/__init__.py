"""scatlas ``query``: label transfer from an atlas index (``annotate``) and rare-cell hunting
(``query.hunt``).

Public API::

    from scatlas.query import annotate
    result = annotate("query.h5ad", "atlas_index", label_keys=["cell_type"], truth_key="cell_type")
    result.predictions            # <key>_pred, _level, _confidence, _unknown_reason, ... per query cell
    result.write("annotated.h5ad", neighbors_parquet="nn.parquet", report_json="report.json")
"""

from scatlas.query.annotate import AnnotationResult, annotate
from scatlas.query.evaluate import confusion_table, evaluate_labels
from scatlas.query.vote import UNKNOWN, Votes, vote, vote_weights

__all__ = [
    "UNKNOWN",
    "AnnotationResult",
    "Votes",
    "annotate",
    "confusion_table",
    "evaluate_labels",
    "vote",
    "vote_weights",
]
