"""The answer for each cell from its class probabilities: the class, a Cell Ontology ancestor, or ``unknown``.

When the most probable class holds at least ``min_confidence`` and more than the runner-up, it is the answer
(level ``fine``). Otherwise the probabilities are summed up the Cell Ontology: a term's probability is the sum over
the classes whose own term is that term or one of its descendants. The most specific term holding at least
``min_confidence`` is the answer (level ``ancestor``: "T cell" when CD4 vs CD8 is a coin toss: neither reaches the
cut, or the two are tied; at the default cut of 0.5 a 56/44 split is still a fine answer). Ancestors are answers only among the terms given
as allowed (CELLxGENE's curated cell subclasses, :mod:`atlas.ontology_levels`) and the classes' own terms; a term
that covers every class with a term, or all but :data:`MIN_LEFT_OUT` of their atlas cells, tells nothing the atlas
does not (every PBMC is a "leukocyte", and a few megakaryocytes and stem cells, which are not, do not make it
informative), so it is never an answer. With no such term, or for
labels without ontology terms, the cell is ``unknown`` (``low_confidence``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL_FINE, LEVEL_ANCESTOR, LEVEL_UNKNOWN = "fine", "ancestor", "unknown"
MIN_LEFT_OUT = 0.05
"""An ancestor term must leave out at least this share of the atlas cells whose class has a term (when the cells
per class are known) to be an answer."""
LEVELS = (LEVEL_FINE, LEVEL_ANCESTOR, LEVEL_UNKNOWN)


@dataclass(frozen=True)
class Ontology:
    """The ontology terms an annotation can answer with, for one label key.

    ``classes``: the class names, in the order of the probability columns. ``class_terms``: each class' CL id
    ("" when it has none). ``terms``: the ancestor terms that may be answers, most specific first (fewest classes
    below it, then most ancestors); ``names`` their CL names; ``members``: boolean ``(n_classes, n_terms)``, class j lies under
    term t (its own term is t or a descendant of t).
    """

    classes: tuple[str, ...]
    class_terms: tuple[str, ...]
    terms: tuple[str, ...]
    names: tuple[str, ...]
    members: np.ndarray

    @classmethod
    def flat(cls, classes: Sequence[str]) -> Ontology:
        """No ontology: every answer is a class or ``unknown``."""
        return cls(tuple(classes), tuple("" for _ in classes), (), (), np.zeros((len(classes), 0), dtype=bool))

    @classmethod
    def from_terms(
        cls,
        classes: Sequence[str],
        class_term: Mapping[str, str],
        term_ancestors: Mapping[str, Sequence[str]],
        term_names: Mapping[str, str],
        allowed: Collection[str] | None = None,
        class_cells: Sequence[float] | None = None,
    ) -> Ontology:
        """Build from each class' term (``class_term``, classes without one are absent), each class term's
        ancestors (``term_ancestors``) and the CL names (``term_names``). ``allowed``: the ancestor terms that may
        be answers besides the classes' own terms (None: every ancestor). ``class_cells``: the atlas cells of each
        class (in the order of ``classes``), to leave out terms covering all but :data:`MIN_LEFT_OUT` of them."""
        classes = tuple(classes)
        own = tuple(str(class_term.get(c, "") or "") for c in classes)
        with_term = [j for j, t in enumerate(own) if t]
        lineage = {j: {own[j], *term_ancestors.get(own[j], ())} for j in with_term}
        candidates = sorted({t for j in with_term for t in lineage[j]})
        depth = {t: len(term_ancestors.get(t, ())) for t in candidates}  # more ancestors: more specific
        members = np.array([[t in lineage.get(j, ()) for t in candidates] for j in range(len(classes))], dtype=bool)
        members = members.reshape(len(classes), len(candidates))
        covered = members[with_term].sum(axis=0) if with_term else np.zeros(len(candidates), dtype=int)
        # A term is an answer only if it groups classes (one class' mass is already its fine probability) and
        # leaves out some class with a term (else it says nothing the atlas does not).
        own_terms = {own[j] for j in with_term}
        left_out = np.ones(len(candidates))
        if class_cells is not None and with_term:
            cells = np.asarray(class_cells, dtype=np.float64)[with_term]
            total = cells.sum()
            if total > 0:
                left_out = 1.0 - (cells[:, None] * members[with_term]).sum(axis=0) / total
        useful = [
            i for i, t in enumerate(candidates)
            if 2 <= covered[i] < len(with_term) and left_out[i] >= MIN_LEFT_OUT
            and (allowed is None or t in allowed or t in own_terms)
        ]
        # Most specific first: fewer classes below it, then deeper in the ontology (a descendant covers a subset).
        order = sorted(useful, key=lambda i: (covered[i], -depth[candidates[i]], candidates[i]))
        terms = tuple(candidates[i] for i in order)
        return cls(
            classes=classes,
            class_terms=own,
            terms=terms,
            names=tuple(str(term_names.get(t, t)) for t in terms),
            members=members[:, order] if order else np.zeros((len(classes), 0), dtype=bool),
        )


@dataclass(frozen=True)
class Answers:
    """Per cell: ``fine`` (best class index, -1 when no class has probability), ``fine_proba``, ``runner_up``
    (second class index or -1) and ``runner_up_proba``, ``level`` (index into :data:`LEVELS`), ``term`` (index
    into ``Ontology.terms`` for ancestor answers, else -1) and ``confidence`` (the answer's probability: the
    class' for fine answers and unknowns, the term's summed probability for ancestors)."""

    fine: np.ndarray
    fine_proba: np.ndarray
    runner_up: np.ndarray
    runner_up_proba: np.ndarray
    level: np.ndarray
    term: np.ndarray
    confidence: np.ndarray


def answer(
    proba: np.ndarray, ontology: Ontology, min_confidence: float, preferred: np.ndarray | None = None
) -> Answers:
    """Each row's answer from class probabilities ``proba`` ``(n, n_classes)`` (rows sum to 1, or 0 when no
    class is allowed). ``preferred``: a class index per row that wins ties for the best class (the vote's
    nearest-neighbour tie-break, which names ``fine``), -1 for none; a tie is still no fine answer."""
    p = np.asarray(proba, dtype=np.float64)
    n, c = p.shape
    rows = np.arange(n)
    if c == 0:
        none = np.full(n, -1, dtype=np.int64)
        zero = np.zeros(n, dtype=np.float32)
        return Answers(none, zero, none, zero, np.full(n, 2, np.int8), none.copy(), zero)
    order = np.argsort(-p, axis=1, kind="stable")
    fine = order[:, 0].astype(np.int64)
    fine_p = p[rows, fine]
    if preferred is not None:
        pref = np.asarray(preferred, dtype=np.int64)
        tie = (pref >= 0) & (pref != fine)
        tie[tie] = p[rows[tie], pref[tie]] >= fine_p[tie] * (1 - 1e-6)
        if tie.any():  # the preferred class and the argmax swap places
            order[tie, :2] = np.stack([pref[tie], fine[tie]], axis=1)
            fine = order[:, 0].astype(np.int64)
    if c > 1:
        runner = order[:, 1].astype(np.int64)
        runner_p = p[rows, runner]
    else:
        runner, runner_p = np.full(n, -1, np.int64), np.zeros(n)
    fine = np.where(fine_p > 0, fine, -1)
    runner = np.where(runner_p > 0, runner, -1)
    # a fine answer needs the cut and a lead: a class tied with its runner-up (a vote split evenly) is no answer
    level = np.where((fine >= 0) & (fine_p >= min_confidence) & (fine_p > runner_p * (1 + 1e-6)), 0, 2).astype(np.int8)
    term = np.full(n, -1, dtype=np.int64)
    confidence = fine_p.copy()
    unsure = np.flatnonzero(level == 2)
    if len(unsure) and ontology.terms:
        mass = p[unsure] @ ontology.members.astype(np.float64)  # (m, n_terms), most specific term first
        ok = mass >= min_confidence
        has = ok.any(axis=1)
        first = ok.argmax(axis=1)
        hit = unsure[has]
        term[hit] = first[has]
        level[hit] = 1
        confidence[hit] = mass[has, first[has]]
    return Answers(
        fine=fine,
        fine_proba=fine_p.astype(np.float32),
        runner_up=runner,
        runner_up_proba=runner_p.astype(np.float32),
        level=level,
        term=term,
        confidence=confidence.astype(np.float32),
    )
