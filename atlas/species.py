"""Which species a list of gene identifiers comes from: Ensembl id prefixes first, else the casing of symbols.

Gene matching is case-insensitive (:mod:`atlas.genes`), so a mouse query (``Cd3e``) matches a human embedder's genes
(``CD3E``) almost entirely and is embedded as if it were human; this guess lets callers refuse such a pair first.
Ensembl ids name the species (``ENSG`` human, ``ENSMUSG`` mouse, ...). Symbols only tell a convention apart: human
symbols are upper case (``CD3E``), mouse and rat ones title case (``Cd3e``, called ``"mouse"``: the basis says
"mouse or rat"), zebrafish ones lower case (``cd3e``). Mouse symbols upper-cased (some pipelines do so to match
human genes) still name genes that only mouse has: RIKEN clones (``1110017D15RIK``), predicted genes
(``GM12345``) and the ``H2-`` MHC genes; enough of them in an upper-case list make it mouse, not human. Human symbols
title-cased still name the ``HLA-`` MHC genes; enough of them make a title-case list human.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MIN_INFORMATIVE = 50
"""Fewest identifiers that say something about the species (Ensembl ids, or symbols with a clear casing)."""
MIN_MAJORITY = 0.8
"""Share of the informative identifiers that must agree for a guess."""
MIN_MOUSE_ONLY = 5
"""Fewest mouse-only symbols (RIKEN clones, ``Gm`` genes, the ``H2-`` MHC genes; any casing) that make an
upper-case list mouse: human gene lists hold none (checked on every human file of the shared data), a mouse list
of 2,000-3,000 genes a few dozen."""
MIN_HUMAN_ONLY = 5
"""Fewest human-only symbols (the ``HLA-`` MHC genes; any casing) that make a title-case list human (human symbols
title-cased, as some pipelines do to match mouse genes)."""

ENSEMBL_PREFIXES: dict[str, str] = {
    "ENSG": "human",
    "ENSMUSG": "mouse",
    "ENSRNOG": "rat",
    "ENSDARG": "zebrafish",
    "ENSMMUG": "macaque",
    "ENSMFAG": "macaque",
    "ENSPTRG": "chimpanzee",
    "ENSSSCG": "pig",
    "ENSBTAG": "cow",
    "ENSCAFG": "dog",
    "ENSGALG": "chicken",
    "ENSXETG": "frog",
    "ENSOARG": "sheep",
    "ENSECAG": "horse",
    "ENSOCUG": "rabbit",
    "ENSCJAG": "marmoset",
}
"""Ensembl gene-id prefix -> species."""

SYMBOL_SPECIES: dict[str, tuple[str, ...]] = {
    "upper": ("human",),
    "title": ("mouse", "rat"),
    "lower": ("zebrafish",),
}
"""Symbol casing -> the species using that convention (the first one is the guess)."""
_SYMBOL_WORDS = {"upper": "upper-case symbols (as human)", "title": "title-case symbols (as mouse or rat)",
                 "lower": "lower-case symbols (as zebrafish)"}

_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G)\d{6,}(\.\d+)?$")
_ORF_RE = re.compile(r"^C\d+orf\d+")  # human open reading frames (C1orf159): lower case inside, still human
_MOUSE_RE = re.compile(r"^(\d+[A-Z]\d+Rik|Gm\d+|mt-[A-Z][a-z0-9]*)$")  # 1110017D15Rik, Gm12345, mt-Co1
# no human gene is named so
_MOUSE_ONLY_RE = re.compile(r"^(\d+[A-Z]\d+RIK|GM\d{3,}|H2-[A-Z][A-Z0-9]*)$", re.IGNORECASE)
_HUMAN_ONLY_RE = re.compile(r"^HLA-[A-Z][A-Z0-9]*$", re.IGNORECASE)  # the human MHC; mouse names it H2-


@dataclass(frozen=True)
class SpeciesGuess:
    """The guess of :func:`guess_species`.

    ``species``: ``"human"``, ``"mouse"``, ``"rat"``, ``"zebrafish"``, ... or None when undecided; ``candidates``:
    every species consistent with the evidence (``("mouse", "rat")`` from title-case symbols); ``basis``: one
    sentence saying why; ``source``: ``"ensembl"``, ``"symbols"`` or None; ``counts``: informative identifiers
    per species (Ensembl) or per casing (symbols); ``n_identifiers``: identifiers looked at.
    """

    species: str | None
    candidates: tuple[str, ...]
    basis: str
    source: str | None
    counts: dict[str, int] = field(default_factory=dict)
    n_identifiers: int = 0

    def compatible(self, other: SpeciesGuess) -> bool:
        """False only when both guesses are decided and no species is consistent with both."""
        if self.species is None or other.species is None:
            return True
        return bool(set(self.candidates) & set(other.candidates))

    def to_dict(self) -> dict[str, Any]:
        return {"species": self.species, "candidates": list(self.candidates), "basis": self.basis,
                "source": self.source, "counts": dict(self.counts), "n_identifiers": self.n_identifiers}


def symbol_casing(symbol: str) -> str | None:
    """``"upper"`` (CD3E), ``"title"`` (Cd3e, 1110017D15Rik), ``"lower"`` (cd3e) or None (no clear convention)."""
    s = symbol.strip()
    if _MOUSE_RE.match(s):
        return "title"
    if _ORF_RE.match(s):
        return "upper"
    letters = [c for c in s if c.isalpha()]
    if len(letters) < 2:
        return None
    if all(c.isupper() for c in letters):
        return "upper"
    if all(c.islower() for c in letters):
        return "lower"
    first = next(i for i, c in enumerate(s) if c.isalpha())
    if s[first].isupper() and all(c.islower() for c in s[first + 1 :] if c.isalpha()):
        return "title"
    return None


def _decide(counts: Counter[str], n_total: int, what: str, min_informative: int, min_majority: float
            ) -> tuple[str | None, str, str]:
    """(winner key or None, its share as text, the basis sentence)."""
    n = sum(counts.values())
    if n < min_informative:
        return None, "", f"only {n:,} of {n_total:,} identifiers are informative {what} (at least {min_informative} needed)"
    top, count = counts.most_common(1)[0]
    share = count / n
    if share < min_majority:
        mix = ", ".join(f"{k} {v:,}" for k, v in counts.most_common(3))
        return None, "", f"no clear majority among {n:,} {what} ({mix}; {100 * min_majority:.0f}% needed)"
    return top, f"{100 * share:.0f}%", ""


def guess_species(
    identifiers: Iterable[object], *, min_informative: int = MIN_INFORMATIVE, min_majority: float = MIN_MAJORITY
) -> SpeciesGuess:
    """The species of gene ``identifiers`` (Ensembl ids and/or symbols): decided on Ensembl ids when at least
    ``min_informative`` are given, else on symbol casing; None unless ``min_majority`` of the informative ones
    agree."""
    ens: Counter[str] = Counter()
    casing: Counter[str] = Counter()
    n_total = mouse_only = human_only = 0
    for raw in identifiers:
        if raw is None:
            continue
        value = str(raw).strip()
        if not value or value.lower() == "nan":
            continue
        n_total += 1
        m = _ENSEMBL_RE.match(value)
        if m:
            ens[m.group(1)] += 1
            continue
        kind = symbol_casing(value)
        if kind is not None:
            casing[kind] += 1
        mouse_only += bool(_MOUSE_ONLY_RE.match(value))
        human_only += bool(_HUMAN_ONLY_RE.match(value))
    if sum(ens.values()) >= min_informative:
        by_species: Counter[str] = Counter()
        for prefix, count in ens.items():
            by_species[ENSEMBL_PREFIXES.get(prefix, f"unknown ({prefix})")] += count
        top, share, why = _decide(by_species, n_total, "Ensembl ids", min_informative, min_majority)
        if top is None or top.startswith("unknown"):
            return SpeciesGuess(None, (), why or f"{share} of Ensembl ids have a prefix of no known species",
                                "ensembl", dict(by_species), n_total)
        prefix = next(p for p, s in ENSEMBL_PREFIXES.items() if s == top and ens.get(p))
        basis = f"{share} of {sum(by_species.values()):,} Ensembl ids are {prefix}"
        return SpeciesGuess(top, (top,), basis, "ensembl", dict(by_species), n_total)
    top, share, why = _decide(casing, n_total, "gene symbols", min_informative, min_majority)
    if top is None:
        return SpeciesGuess(None, (), why, "symbols" if casing else None, dict(casing), n_total)
    if top == "upper" and mouse_only >= MIN_MOUSE_ONLY:
        basis = (f"{share} of {sum(casing.values()):,} cased gene symbols are upper case, but {mouse_only:,} of them "
                 "name mouse-only genes (RIKEN clones like 1110017D15RIK, predicted genes like GM12345, H2- MHC "
                 "genes): mouse symbols upper-cased")
        return SpeciesGuess("mouse", ("mouse",), basis, "symbols", {**casing, "mouse_only": mouse_only}, n_total)
    if top == "title" and human_only >= MIN_HUMAN_ONLY and human_only > mouse_only:
        basis = (f"{share} of {sum(casing.values()):,} cased gene symbols are title case, but {human_only:,} of them "
                 "name human-only genes (the HLA- MHC genes; mouse names them H2-): human symbols title-cased")
        return SpeciesGuess("human", ("human",), basis, "symbols", {**casing, "human_only": human_only}, n_total)
    candidates = SYMBOL_SPECIES[top]
    basis = f"{share} of {sum(casing.values()):,} cased gene symbols are {_SYMBOL_WORDS[top]}"
    return SpeciesGuess(candidates[0], candidates, basis, "symbols", dict(casing), n_total)


def guess_species_of_genes(genes: Any) -> SpeciesGuess:
    """:func:`guess_species` of a :class:`~atlas.genes.GeneVocabulary` (its Ensembl ids and its symbols)."""
    values = [*genes.feature_id, *genes.feature_name]
    return guess_species(v for v in values if v)


def first_mismatch(named: Sequence[tuple[str, SpeciesGuess]]) -> tuple[tuple[str, SpeciesGuess], tuple[str, SpeciesGuess]] | None:
    """The first two of the named guesses that no one species is consistent with (:meth:`SpeciesGuess.compatible`),
    or None when all can be one species."""
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1 :]:
            if not a.compatible(b):
                return (name_a, a), (name_b, b)
    return None
