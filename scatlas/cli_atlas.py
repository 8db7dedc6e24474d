"""``scatlas datasets``, ``scatlas remove``, ``scatlas relabel``: thin commands over :mod:`scatlas.atlas.lifecycle`.

:mod:`scatlas.cli` registers the commands on its group.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from scatlas.atlas.validate import escaped
from scatlas.cli_common import PathArg, _echo, _echo_json, _echo_ontology_fill, _split_pair, atlas_option

if TYPE_CHECKING:
    from scatlas.atlas.lifecycle import RelabelReport


def _values(top: list[tuple[str | None, int]]) -> str:
    """``'value' cells, ...`` (values escaped and capped; a missing value shown as such)."""
    return ", ".join(f"{'(missing)' if v is None else escaped(v, 40)} {n:,}" for v, n in top)


def _obs_pairs(values: tuple[str, ...]) -> list[tuple[str, str]]:
    """The ``--obs-map SOURCE=TARGET`` items as pairs, in order."""
    return [_split_pair(item, "--obs-map", "SOURCE=TARGET", show_item=lambda text: escaped(text, 60))
            for item in values]


@click.command()
@atlas_option()
@click.option("--json-out", "json_out", type=PathArg(dir_okay=False, path_type=Path), default=None,
              metavar="FILE", help="Also write the listing as JSON.")
def datasets(atlas_dir: Path, json_out: Path | None) -> None:
    """List the datasets of an atlas store: cells, ids, genes, X, source, revision, labels.

    Label columns are the text columns with 2 to 1,000 distinct values in the dataset, shown with their 10 most
    frequent values.
    """
    from scatlas.atlas.lifecycle import list_datasets

    listing = list_datasets(atlas_dir)
    unused = f" ({listing.n_unused_ids:,} ids unused: removed datasets or failed ingests)" if listing.n_unused_ids else ""
    _echo(f"{atlas_dir}: {len(listing.datasets)} dataset(s), {listing.n_cells:,} cells, {listing.n_genes:,} genes; "
          + (f"cell ids below {listing.obs_high_water:,} taken{unused}" if listing.obs_high_water
             else "no cell id taken"))
    for d in listing.datasets:
        genes = "genes unknown" if d.n_genes is None else (
            f"{d.n_genes:,} genes ({d.n_genes_added:,} added to the atlas"
            + (f"; {d.n_genes_measured:,} measured, the Census presence matrix" if d.n_genes_measured is not None
               else "") + ")")
        _echo(f"{d.dataset_id}: {d.n_cells:,} cells (ids {d.start}-{d.stop - 1}), {genes}, X {d.x_kind} from "
              f"{d.x_source}")
        _echo(f"  source {d.source} ({d.source_format}), ingested {d.ingested_at or '?'}, obs revision {d.obs_revision}")
        for col in d.label_columns:
            terms = "" if col.n_with_term is None else f"; {col.n_with_term:,} cells with a Cell Ontology term"
            _echo(f"  {col.name} ({col.n_values:,} values{terms}): {_values(col.top)}")
    _echo_json(listing.to_json(), json_out)


@click.command()
@atlas_option()
@click.option("--dataset", "dataset_ids", multiple=True, required=True, metavar="ID",
              help="A dataset to remove (repeatable); `scatlas datasets` lists them.")
def remove(atlas_dir: Path, dataset_ids: tuple[str, ...]) -> None:
    """Remove datasets from an atlas store; their ids are never reused.

    store.json (the commit point) is rewritten without them, then their rows leave the cell table; an interrupted
    remove is finished by the next command that writes to the store. The removed cells' expression data stays in
    the TileDB-SOMA experiment as an unused id range: disk space is not reclaimed (re-ingest into a new store
    for that).
    """
    from scatlas.atlas.lifecycle import remove_datasets

    report = remove_datasets(atlas_dir, dataset_ids)
    for dataset_id, n_cells, start, stop in report.removed:
        _echo(f"removed {dataset_id}: {n_cells:,} cells (ids {start}-{stop - 1})")
    for dataset_id in report.finished_earlier:
        _echo(f"{dataset_id}: already removed by an interrupted remove, now finished")
    _echo(f"{atlas_dir}: {report.n_datasets} dataset(s), {report.n_cells:,} cells left; {report.n_unused_ids:,} cell "
          "ids unused and never reused; their expression data stays on disk (space is not reclaimed)")


@click.command()
@atlas_option()
@click.option("--dataset", "dataset_ids", required=True, multiple=True, metavar="ID",
              help="The dataset to relabel (repeatable: each in turn, each its own revision).")
@click.option("--obs-map", "obs_map", multiple=True, metavar="SOURCE=TARGET",
              help="Copy the dataset's obs column SOURCE onto the column TARGET, e.g. celltype=cell_type "
                   "(repeatable; the pairs apply at once).")
@click.option("--ontology-map", "ontology_map", type=PathArg(dir_okay=False, path_type=Path), default=None,
              metavar="FILE.csv",
              help="CSV with the columns label,ontology_term_id: refill TARGET_ontology_term_id from it (without "
                   "it, those terms are cleared for the dataset: they described the old labels). Given alone, "
                   "without --obs-map: fill the empty terms of the dataset's labels (--ontology-label-key).")
@click.option("--ontology-label-key", default="cell_type", show_default=True, metavar="COLUMN",
              help="With --ontology-map alone: the label column whose values the map's labels are.")
def relabel(atlas_dir: Path, dataset_ids: tuple[str, ...], obs_map: tuple[str, ...], ontology_map: Path | None,
            ontology_label_key: str) -> None:
    """Re-apply an obs mapping to the stored metadata of a dataset, or give its labels Cell Ontology terms.

    Mends a forgotten `ingest --obs-map` without re-ingesting: each SOURCE=TARGET copies a column the store kept
    (an obs column under its original name) onto a column of the store (not soma_joinid, dataset_id, obs_id or
    is_primary_data). The values (and terms) a TARGET held are kept in a column TARGET_revN (N: the revision they
    belonged to; their terms in TARGET_revN_ontology_term_id): the command prints the --obs-map pairs that put
    them back. With --ontology-map alone it mends a forgotten
    `ingest --ontology-map`. The dataset's obs revision is bumped, so an index built before sees the change
    (`scatlas build --update` gives it the new labels).
    """
    from scatlas.atlas.errors import ScatlasError
    from scatlas.atlas.lifecycle import check_datasets_exist, relabel_dataset
    from scatlas.atlas.validate import escaped_list

    check_datasets_exist(atlas_dir, dataset_ids)  # an unknown id is refused before any dataset is changed
    done: list[str] = []
    for dataset_id in dict.fromkeys(dataset_ids):
        try:
            report = relabel_dataset(atlas_dir, dataset_id, _obs_pairs(obs_map), ontology_map=ontology_map,
                                     ontology_label_key=ontology_label_key)
        except ScatlasError as exc:
            if done:  # the ones before stay relabelled: say which
                exc.args = (f"{exc} (relabelled before it: {escaped_list(done)})",)
            raise
        done.append(report.dataset_id)
        _echo_relabel(report)


def _echo_relabel(report: RelabelReport) -> None:
    """What a relabel of one dataset did (:class:`atlas.lifecycle.RelabelReport`)."""
    _echo(f"{report.dataset_id}: {report.n_cells:,} cells, obs revision {report.obs_revision}")
    for col in report.columns:
        more = f" (of {col.n_values:,})" if col.n_values > len(col.values) else ""
        if col.terms != "filled":
            _echo(f"  {col.source} -> {col.target}: {col.n_changed:,} cells changed; values{more}: "
                  f"{_values(col.values)}")
        if col.kept_as:
            kept = f"{col.kept_as}" + (f" (their terms: {col.kept_terms_as})" if col.kept_terms_as else "")
            back = f"--obs-map {col.kept_as}={col.target}" + (
                f" --obs-map {col.kept_terms_as}={col.term_column}" if col.kept_terms_as else "")
            _echo(f"  the values {col.target} held are kept in {kept}; to put them back: {back}")
        elif col.kept_terms_as:
            _echo(f"  the terms {col.term_column} held are kept in {col.kept_terms_as}")
        if col.terms == "cleared":
            _echo(f"  {col.term_column}: cleared for this dataset (the terms described the old labels; give "
                  "--ontology-map to refill them)")
        elif col.ontology is not None:
            _echo_ontology_fill(report.dataset_id, col.ontology)
