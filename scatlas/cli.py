"""The ``scatlas`` command. Each command is a thin wrapper over a public function of atlas/index/query."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from atlas.errors import ScatlasError
from scatlas import __version__

logger = logging.getLogger("scatlas")


class ScatlasGroup(click.Group):
    """Turns every ScatlasError into ``Error: ...`` on stderr and exit status 1, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ScatlasError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("Interrupted; rerun the same command to resume.", err=True)
            ctx.exit(130)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("numba", "h5py", "matplotlib", "PIL", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- shared option bundles ---------------------------------------------------------------------------------------


def atlas_option(required: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--atlas", "atlas_dir", type=click.Path(file_okay=False, path_type=Path), required=required,
        help="Atlas store directory (TileDB-SOMA experiment + DuckDB cell table).",
    )


def index_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--index", "index_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
        help="Index directory written by `scatlas build`.",
    )(f)


def progress_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")(f)


def _parse_obs_map(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst:
            raise click.BadParameter(f"expected SOURCE=TARGET, got {item!r}", param_hint="--obs-map")
        out[src] = dst
    return out


def _echo_json(payload: Any, path: Path | None) -> None:
    text = json.dumps(payload, indent=2, default=str)
    if path is None:
        return
    path.write_text(text)


@click.group(cls=ScatlasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scatlas")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """scatlas: a vector-search reference atlas for single-cell RNA-seq.

    \b
    Offline:  scatlas ingest -> scatlas build
    Query:    scatlas annotate, scatlas hunt train/sweep/report
    Try it:   scatlas demo
    """
    _setup_logging(verbose, quiet)


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@atlas_option()
@click.option("--dataset-id", default=None, help="Dataset id (single input only). Default: the file stem.")
@click.option("--obs-map", multiple=True, metavar="SOURCE=TARGET", help="Rename an obs column onto the schema (repeatable).")
@click.option("--mode", type=click.Choice(["write", "append"]), default="append", show_default=True,
              help="write: create a new store (refuse an existing one); append: add datasets (create if absent).")
@click.option("--keep-non-primary", is_flag=True, help="Keep cells with is_primary_data == False (Census duplicates).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=10_000, show_default=True, help="Cells per write chunk.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the ingest report as JSON.")
@progress_option
def ingest(sources: tuple[str, ...], atlas_dir: Path, dataset_id: str | None, obs_map: tuple[str, ...], mode: str,
           keep_non_primary: bool, chunk_size: int, report_path: Path | None, progress: bool) -> None:
    """Add .h5ad files or Census-layout TileDB-SOMA experiments (SOURCES) to an atlas store."""
    from atlas.ingestion import ingest as run_ingest

    report = run_ingest(list(sources), atlas_dir, dataset_id=dataset_id, obs_map=_parse_obs_map(obs_map), mode=mode,  # type: ignore[arg-type]
                        keep_non_primary=keep_non_primary, chunk_size=chunk_size, progress=progress)
    for d in report.datasets:
        g = d.genes
        click.echo(
            f"{d.dataset_id}: {d.n_cells} cells (ids from {d.first_cell_id}), {d.n_skipped_non_primary} non-primary skipped, "
            f"X from {d.x_source} ({d.x_kind}); genes {g['n_genes']}: {g['n_existing']} known, {g['n_new']} new, "
            f"{g['n_with_ensembl']} with Ensembl id, {g['n_symbol_only']} symbol only "
            f"({g['n_symbol_mapped_to_ensembl']} mapped to Ensembl), {g['n_duplicates_dropped']} duplicates dropped; "
            f"{d.cells_per_second:.0f} cells/s"
        )
    click.echo(f"{atlas_dir}: {report.n_cells_in_store} cells in {len(report.datasets)} new dataset(s)")
    _echo_json(report.to_json(), report_path)


def _parse_pairs(values: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    out = []
    for item in values:
        key, sep, val = item.rpartition("=")
        if not sep or not key or not val:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint=option)
        out.append((key, val))
    return out


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Write .h5ad files (or .npy for --embeddings) here.")
@atlas_option(required=False)
@click.option("--cells", type=click.IntRange(min=1), default=10_000, show_default=True, help="Total cells (or vectors).")
@click.option("--genes", type=click.IntRange(min=50), default=2000, show_default=True, help="Genes per cell.")
@click.option("--datasets", type=click.IntRange(min=1), default=3, show_default=True, help="Datasets (batches).")
@click.option("--donors", type=click.IntRange(min=1), default=4, show_default=True, help="Donors per dataset.")
@click.option("--rare", multiple=True, metavar="NAME=FRACTION", help="Rare population and its fraction where present (repeatable; default ionocyte=0.002).")
@click.option("--absent", multiple=True, metavar="TYPE=I,J", help="Leave a cell type out of datasets I,J (0-based; repeatable).")
@click.option("--layout", type=click.Choice(["counts", "lognorm+counts", "lognorm", "lognorm+raw"]), default="counts", show_default=True,
              help="What the .h5ad files hold: raw counts in X, or log-normalised X with counts in layers/.raw, or no counts.")
@click.option("--gene-ids", type=click.Choice(["ensembl", "symbol"]), default="ensembl", show_default=True, help="Gene identifiers in var.")
@click.option("--embeddings", is_flag=True, help="Write embedding-level data (ids, vectors, labels .npy) instead of counts.")
@click.option("--dim", type=click.IntRange(min=2), default=128, show_default=True, help="Vector dimension with --embeddings.")
@click.option("--clusters", type=click.IntRange(min=1), default=100, show_default=True, help="Clusters with --embeddings.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed: the same seed gives the same data.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@progress_option
def synth(out_dir: Path | None, atlas_dir: Path | None, cells: int, genes: int, datasets: int, donors: int, rare: tuple[str, ...],
          absent: tuple[str, ...], layout: str, gene_ids: str, embeddings: bool, dim: int, clusters: int, seed: int,
          overwrite: bool, progress: bool) -> None:
    """Generate a synthetic atlas: negative-binomial counts with cell types, batches, donors and rare populations.

    With --out, writes one .h5ad per dataset; with --atlas, ingests it straight into an atlas store.
    """
    from atlas.errors import InputError
    from atlas.synthetic import (
        DEFAULT_RARE_TYPES,
        RareType,
        SyntheticAtlasConfig,
        SyntheticEmbeddingConfig,
        synthesize,
    )

    if (out_dir is None) == (atlas_dir is None) and not (embeddings and out_dir is not None):
        raise InputError("give exactly one of --out DIR (write files) or --atlas DIR (ingest into a store)")
    if embeddings:
        if out_dir is None:
            raise InputError("--embeddings writes .npy files: give --out DIR")
        ecfg = SyntheticEmbeddingConfig(n=cells, d=dim, n_clusters=clusters, seed=seed)
        paths = synthesize(ecfg, out_dir, fmt="npy", overwrite=overwrite)
        click.echo(f"wrote {cells} x {dim} synthetic vectors in {clusters} clusters: {', '.join(map(str, paths))}")
        return
    try:
        rare_types = tuple(RareType(name, float(frac)) for name, frac in _parse_pairs(rare, "--rare")) or DEFAULT_RARE_TYPES
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--rare") from exc
    try:
        absent_map = {t: tuple(int(i) for i in idx.split(",")) for t, idx in _parse_pairs(absent, "--absent")}
    except ValueError as exc:
        raise click.BadParameter("expected TYPE=I,J with integer dataset indices", param_hint="--absent") from exc
    cfg = SyntheticAtlasConfig(n_cells=cells, n_genes=genes, n_datasets=datasets, n_donors=donors, rare_types=rare_types,
                               absent_types=absent_map, layout=layout, gene_ids=gene_ids, seed=seed)  # type: ignore[arg-type]
    if atlas_dir is not None:
        from atlas.synthetic_store import ingest_synthetic

        report = ingest_synthetic(cfg, atlas_dir, progress=progress)
        click.echo(f"{atlas_dir}: ingested {sum(d.n_cells for d in report.datasets)} synthetic cells in "
                   f"{len(report.datasets)} datasets ({report.n_cells_in_store} cells in the store)")
        return
    assert out_dir is not None
    paths = synthesize(cfg, out_dir, overwrite=overwrite)
    click.echo(f"wrote {len(paths)} synthetic datasets ({cells} cells x {genes} genes) to {out_dir}")
    for p in paths:
        click.echo(f"  {p}")


def main() -> None:
    cli(prog_name="scatlas")

