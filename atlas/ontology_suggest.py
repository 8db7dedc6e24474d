"""Close Cell Ontology terms for a label that mapped to none: suggestions for reports, never applied.

A label and each CL name or synonym (normalised: :func:`atlas.ontology.normalise_label`) are compared as sets of
words, each word weighted by how rare it is among the names (inverse document frequency: ``cd4`` tells more than
``cell``); a name scores the harmonic mean of the share of the label's weight it holds and the share of its own
weight the label holds (the naming scheme's words such as ``positive`` or ``alpha``, in a name but not in the label,
count for less: :data:`STRUCTURAL`). "CD4 T cells" thus finds "CD4-positive, alpha-beta T cell" rather than names
that merely look alike letter by letter ("endothelial cell"). Where no name shares enough words (a misspelt label), letter
similarity (difflib) is the fallback.
"""

from __future__ import annotations

import difflib
import math
from collections import defaultdict
from collections.abc import Mapping

MIN_SCORE = 0.5
"""A name sharing less of the weighted words than this is no suggestion (letter similarity is tried instead)."""
STRUCTURAL = frozenset({"positive", "negative", "alpha", "beta", "cell", "lymphocyte", "human"})
"""Words of CL's naming scheme that labels leave out ("CD4 T cells" for "CD4-positive, alpha-beta T cell"): in a
name but not in the label, they count :data:`STRUCTURAL_WEIGHT` of their weight against it ("alpha" and "beta" at
full weight when the label has one of them alone: a label "alpha" names pancreatic cells, not alpha-beta T cells)."""
STRUCTURAL_WEIGHT = 0.25
SPECIFIC_SHARE = 0.1
"""Words in more than this share of the names (``cell``, ``positive``) score, but do not alone make a name a
candidate."""
LETTER_CUTOFF = 0.6
"""difflib's similarity cut for the letter fallback."""


class TermSuggester:
    """Ranks CL names (normalised name or synonym -> term id, each unambiguous) by their words against a label."""

    def __init__(self, by_normalised: Mapping[str, str]) -> None:
        self._names = sorted(by_normalised)
        self._term = [by_normalised[s] for s in self._names]
        self._words = [frozenset(s.split()) for s in self._names]
        df: dict[str, int] = defaultdict(int)
        for words in self._words:
            for w in words:
                df[w] += 1
        n = len(self._names)
        self._idf = {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}
        self._unseen = math.log(1 + n) + 1.0
        self._common = {w for w, c in df.items() if c > SPECIFIC_SHARE * n}
        index: dict[str, list[int]] = defaultdict(list)
        for i, words in enumerate(self._words):
            for w in words:
                index[w].append(i)
        self._index = dict(index)

    def _weight(self, words: frozenset[str]) -> float:
        return sum(self._idf.get(w, self._unseen) for w in words)

    def suggest(self, label: str, n: int) -> list[str]:
        """Up to ``n`` distinct term ids for the normalised, abbreviation-expanded ``label``, best first."""
        words = frozenset(label.split())
        if not words or n < 1:
            return []
        specific = [w for w in words if w in self._index and w not in self._common]
        pool = {i for w in (specific or [w for w in words if w in self._index]) for i in self._index[w]}
        total = self._weight(words)
        # the scheme's words the label itself uses are meant, not scheme; and "alpha" or "beta" alone ("alpha" cells
        # of the pancreas) is not the alpha-beta naming of T cells: neither is discounted then
        structural = STRUCTURAL - words
        if len(words & {"alpha", "beta"}) == 1:
            structural = structural - {"alpha", "beta"}
        scored = []
        for i in pool:
            shared = self._weight(words & self._words[i])
            extra = self._words[i] - words
            own = shared + self._weight(extra - structural) + STRUCTURAL_WEIGHT * self._weight(extra & structural)
            recall, precision = shared / total, shared / own
            score = 2 * recall * precision / (recall + precision) if shared else 0.0
            if score >= MIN_SCORE:
                letters = difflib.SequenceMatcher(None, label, self._names[i]).ratio()
                scored.append((-score, -letters, len(self._names[i]), self._names[i], self._term[i]))
        if not scored:
            close = difflib.get_close_matches(label, self._names, n=4 * n, cutoff=LETTER_CUTOFF)
            scored = [(0.0, float(j), 0, s, self._term[self._names.index(s)]) for j, s in enumerate(close)]
        out: list[str] = []
        for *_rank, _name, term in sorted(scored):
            if term not in out:
                out.append(term)
            if len(out) == n:
                break
        return out
