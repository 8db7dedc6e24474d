"""The ``scatlas`` command. Each command is a thin wrapper over a public function of atlas/index/query."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import click

from scatlas import __version__
from scatlas.atlas.errors import ScatlasError
from scatlas.atlas.outputs import (
    check_distinct,
    check_output_file,
)
from scatlas.cli_common import (
    PathArg,
    ScatlasGroup,
    _echo,
    _echo_json,
    _echo_ontology_fill,
    _make_executor,
    _option_value,
    _parse_obs_map,
    _parse_pairs,
    _setup_logging,
    _split_pair,
    _unmapped,
    _value,
    atlas_option,
    executor_options,
    ignore_late_sigint,
    ignore_sigint_safely,
    index_option,
    progress_option,
    query_gene_options,
    query_matrix_option,
)


@click.group(cls=ScatlasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scatlas")
@click.option("-v", "--verbose", count=True, help="Log what each step does (INFO; -vv for debug). By default only "
              "warnings and errors are logged, beside each command's own summary.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors (the default; overrides -v).")
def cli(verbose: int, quiet: bool) -> None:
    """scatlas: a vector-search reference atlas for single-cell RNA-seq.

    \b
    Offline:  scatlas ingest -> scatlas build (then datasets, relabel, remove, build --update, verify, evaluate)
    Query:    scatlas annotate, scatlas search, scatlas hunt train/sweep/report
    Lab:      scatlas serve
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
@click.option("--report", "report_path", type=PathArg(dir_okay=False, path_type=Path), help="Write the ingest report as JSON.")
@click.option("--ontology-map", "ontology_map", type=PathArg(dir_okay=False, path_type=Path), default=None,
              metavar="FILE.csv",
              help="CSV with the columns label,ontology_term_id (Cell Ontology ids): fills the term column of cells "
                   "whose label is listed and whose term is empty; terms the data has are never overwritten.")
@click.option("--ontology-label-key", default="cell_type", show_default=True, metavar="COLUMN",
              help="With --ontology-map: the label column its labels are values of; the terms go to "
                   "COLUMN_ontology_term_id.")
@click.option("--x-layer", default=None, metavar="NAME",
              help="The matrix to read. SOMA experiment: the X layer (default: raw when present, else the only "
                   "one). .h5ad: X, raw (adata.raw.X) or a layer name (layers/NAME also works); default: raw counts "
                   "wherever they are (X, layers['counts'], .raw), else log-normalised values.")
@click.option("--obs-set", multiple=True, metavar="COLUMN=VALUE",
              help="Set COLUMN to VALUE for every cell of every input (repeatable), e.g. tissue=blood; a schema "
                   "column gets the value, another becomes a new column. A column the data has already is refused "
                   "(rename it with --obs-map).")
@click.option("--read-ahead", type=click.IntRange(min=0), default=1, show_default=True,  # = ingestion.DEFAULT_READ_AHEAD
              metavar="CHUNKS",
              help="Chunks read and converted in a thread ahead of the writes (memory: about this many chunks "
                   "more); 0 reads and writes in turn. The stored data are the same.")
@click.option("--allow-species-mismatch", is_flag=True,
              help="Ingest datasets whose genes look like another species than the store's or each other's "
                   "(refused by default: genes are matched by name, so mouse Cd3e would be stored as human CD3E).")
@progress_option
def ingest(sources: tuple[str, ...], atlas_dir: Path, dataset_id: str | None, obs_map: tuple[str, ...], mode: str,
           keep_non_primary: bool, chunk_size: int, report_path: Path | None, ontology_map: Path | None,
           ontology_label_key: str, x_layer: str | None, obs_set: tuple[str, ...], read_ahead: int,
           allow_species_mismatch: bool, progress: bool) -> None:
    """Add .h5ad files or Census-layout TileDB-SOMA experiments (SOURCES) to an atlas store.

    The source column of each --obs-map rename is kept too, under its own name (unless it is a schema column).
    """
    from scatlas.atlas.ingestion import ingest as run_ingest

    if ontology_map is None and click.get_current_context().get_parameter_source(
            "ontology_label_key") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--ontology-label-key only says which column --ontology-map's labels are values of; "
                               "give --ontology-map FILE.csv too, or leave it out")
    constants: dict[str, str] = {}
    for item in obs_set:
        column, value = _split_pair(item, "--obs-set", "COLUMN=VALUE")
        if column in constants:
            raise click.BadParameter(f"column {column!r} given twice", param_hint="--obs-set")
        constants[column] = value
    if report_path is not None:
        check_report_path(report_path, atlas_dir, sources)
    report = run_ingest(list(sources), atlas_dir, dataset_id=dataset_id, obs_map=_parse_obs_map(obs_map), mode=mode,  # type: ignore[arg-type]
                        keep_non_primary=keep_non_primary, chunk_size=chunk_size, progress=progress,
                        ontology_map=ontology_map, ontology_label_key=ontology_label_key, x_layer=x_layer,
                        obs_set=constants, read_ahead=read_ahead, allow_species_mismatch=allow_species_mismatch)
    for d in report.datasets:
        g = d.genes
        _echo(
            f"{d.dataset_id}: {d.n_cells} cells (ids from {d.first_cell_id}), {d.n_skipped_non_primary} non-primary skipped, "
            f"X from {d.x_source} ({d.x_kind}); genes {g['n_genes']}: {g['n_existing']} known, {g['n_new']} new, "
            f"{g['n_with_ensembl']} with Ensembl id, {g['n_symbol_only']} symbol only "
            f"({g['n_symbol_mapped_to_ensembl']} mapped to Ensembl), {g['n_duplicates_dropped']} duplicates dropped"
            + (f", {g['n_unnamed_dropped']} without an Ensembl id or symbol dropped (e.g. spike-ins under a var "
               "index of Ensembl ids)" if g.get("n_unnamed_dropped") else "")
            + (f", {g['n_measured']} measured (the Census presence matrix; the others read as not measured, not as "
               "zero)" if "n_measured" in g else "") + "; "
            f"{d.cells_per_second:.0f} cells/s"
        )
        if d.ontology is not None:
            _echo_ontology_fill(d.dataset_id, d.ontology)
    _echo(f"{atlas_dir}: {report.n_cells_in_store} cells in {len(report.datasets)} new dataset(s)")
    _echo_json(report.to_json(), report_path)


def check_report_path(report_path: Path, atlas_dir: Path, sources: Sequence[str]) -> None:
    """Refuse ``--report`` before anything is ingested where it could not be written afterwards: inside the store
    (which may not exist yet), in a directory this process cannot write to, or over a file it must not replace."""
    check_output_file(report_path, inputs=sources, file_kind="json")
    report, atlas = Path(os.path.abspath(report_path)), Path(os.path.abspath(atlas_dir))
    if atlas == report or atlas in report.parents:
        raise click.BadParameter("the report cannot be written inside the atlas store: give a path outside it",
                                 param_hint="--report")
    parent = next((p for p in report.parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot write in {parent}: give a report path in a directory you can write to",
                                 param_hint="--report")


def _rare_type(cls: Any, name: str, spec: str) -> Any:
    frac, _, where = spec.partition("@")
    datasets = tuple(int(i) for i in where.split(",")) if where else None
    return cls(name, float(frac), datasets=datasets)


@cli.command()
@click.option("--out", "out_dir", type=PathArg(file_okay=False, path_type=Path), help="Write .h5ad files (or .npy for --embeddings) here.")
@atlas_option(required=False)
@click.option("--cells", type=click.IntRange(min=1), default=10_000, show_default=True, help="Total cells (or vectors).")
@click.option("--genes", type=click.IntRange(min=50), default=2000, show_default=True, help="Genes per cell.")
@click.option("--datasets", type=click.IntRange(min=1), default=3, show_default=True, help="Datasets (batches).")
@click.option("--donors", type=click.IntRange(min=1), default=4, show_default=True, help="Donors per dataset.")
@click.option("--rare", multiple=True, metavar="NAME=FRACTION[@I,J]",
              help="Rare population, its fraction where present, optionally the datasets it is in (repeatable; "
                   "default ionocyte=0.002 in about half of the datasets).")
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
    from scatlas.atlas.errors import InputError
    from scatlas.atlas.synthetic import (
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
        _echo(f"wrote {cells} x {dim} synthetic vectors in {clusters} clusters: {', '.join(map(str, paths))}")
        return
    try:
        rare_types = tuple(_rare_type(RareType, name, spec) for name, spec in _parse_pairs(rare, "--rare")) or DEFAULT_RARE_TYPES
    except ValueError as exc:
        raise click.BadParameter(f"expected NAME=FRACTION or NAME=FRACTION@I,J ({exc})", param_hint="--rare") from exc
    try:
        absent_map = {t: tuple(int(i) for i in idx.split(",")) for t, idx in _parse_pairs(absent, "--absent")}
    except ValueError as exc:
        raise click.BadParameter("expected TYPE=I,J with integer dataset indices", param_hint="--absent") from exc
    cfg = SyntheticAtlasConfig(n_cells=cells, n_genes=genes, n_datasets=datasets, n_donors=donors, rare_types=rare_types,
                               absent_types=absent_map, layout=layout, gene_ids=gene_ids, seed=seed)  # type: ignore[arg-type]
    if atlas_dir is not None:
        from scatlas.atlas.synthetic import ingest_synthetic

        report = ingest_synthetic(cfg, atlas_dir, progress=progress)
        _echo(f"{atlas_dir}: ingested {sum(d.n_cells for d in report.datasets)} synthetic cells in "
                   f"{len(report.datasets)} datasets ({report.n_cells_in_store} cells in the store)")
        return
    assert out_dir is not None
    paths = synthesize(cfg, out_dir, overwrite=overwrite)
    _echo(f"wrote {len(paths)} synthetic dataset{'s' if len(paths) != 1 else ''} ({cells} cells x {genes} genes) to {out_dir}")
    for p in paths:
        _echo(f"  {p}")


@cli.command()
@atlas_option()
@index_option
@click.option("--embedder", default="pca", show_default=True, help="pca, precomputed:KEY (an obsm key of the store), uce, scvi, or a plug-in: `scatlas embedders` lists them.")
@click.option("--embedder-option", multiple=True, metavar="NAME=VALUE",
              help="Embedder parameter, e.g. n_components=30 or model_dir=/weights/uce (repeatable).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1_000_000, show_default=True, help="Cells per shard.")
@click.option("--factory", default="auto", show_default=True,
              help="'auto' (exact for small atlases, IVF-PQ + re-ranking for large ones) or a FAISS index_factory string.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where FAISS trains and adds; 'cuda' fails if no GPU is usable.")
@click.option("--no-exact-rerank", is_flag=True,
              help="Store no float16 rounding errors of the vectors (saves 2 bytes per dimension per cell on disk); "
                   "re-ranking then ranks by the float16 vectors, and near-ties at the k-th neighbour may differ "
                   "from the float32 order.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=20_000, show_default=True, help="Cells embedded per chunk.")
@click.option("--fit-sample", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Cells sampled across datasets to fit the embedder.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for FAISS (default: all cores).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling and training.")
@click.option("--overwrite", is_flag=True, help="Replace an existing index directory instead of resuming it.")
@click.option("--label-key", "label_keys", multiple=True, metavar="COLUMN",
              help="Atlas label column to train a supervised label head for, besides cell_type (repeatable; used by "
                   "annotate). Default: cell_type only, when the atlas has it. 'all': every text column with 2 to "
                   "1,000 distinct values (cell_type, tissue, disease, ...). Label values of one Cell Ontology term "
                   "are merged into one class first.")
@click.option("--no-label-heads", is_flag=True, help="Train no label head (annotate then votes by neighbours).")
@click.option("--head-cells-per-label", type=click.IntRange(min=1), default=None,
              help="Atlas cells sampled per label to train a head (default 2,000; spread over datasets).")
@click.option("--no-map", is_flag=True,
              help="Fit no reference map (a 2-D UMAP of 20,000 sampled atlas cells, on which annotate and search "
                   "draw the query; 20-45 s on 2 cores).")
@click.option("--update", is_flag=True,
              help="Bring an existing index up to date with its atlas store: datasets added since become new shards "
                   "(embedded with the index's own embedder), removed ones leave it, relabelled ones get their new "
                   "labels; every setting comes from the index's build record. Refused when the added cells drift "
                   "too far (see --max-far-fraction).")
@click.option("--max-far-fraction", type=click.FloatRange(min=0, max=1, min_open=True), default=0.5,
              show_default=True,
              help="With --update: refuse when more than this fraction of the added cells lie farther from the "
                   "index than 99% of atlas cells lie from their nearest neighbour.")
@click.option("--min-gene-ratio", type=click.FloatRange(min=0, max=1), default=0.5, show_default=True,
              help="With --update: refuse when the added cells detect fewer of the embedder's genes than this "
                   "fraction of what as many atlas cells detect (a gene panel, another species).")
@executor_options
@progress_option
@click.pass_context
def build(ctx: click.Context, atlas_dir: Path, index_dir: Path, embedder: str, embedder_option: tuple[str, ...],
          shard_size: int, factory: str, device: str, no_exact_rerank: bool, chunk_size: int, fit_sample: int,
          threads: int | None, seed: int,
          overwrite: bool, label_keys: tuple[str, ...], no_label_heads: bool, head_cells_per_label: int | None,
          no_map: bool, update: bool, max_far_fraction: float, min_gene_ratio: float, executor: str, ray_address: str | None, cpus_per_task: float,
          progress: bool) -> None:
    """Embed every cell of an atlas store and write a sharded FAISS index (resumes an interrupted build;
    --update brings a built index up to date with its store)."""
    from scatlas.index import build_index, index_info

    if update:
        _build_update(ctx, atlas_dir, index_dir, device, threads, chunk_size, (max_far_fraction, min_gene_ratio),
                      _make_executor(executor, ray_address, cpus_per_task), progress)
        return
    if no_label_heads and label_keys:
        raise click.UsageError("--no-label-heads and --label-key exclude each other")
    options = {k: _option_value(v) for k, v in _parse_pairs(embedder_option, "--embedder-option")}
    keys: tuple[str, ...] | str
    if no_label_heads:
        keys = ()
    elif "all" in label_keys:
        if len(label_keys) > 1:
            raise click.UsageError("--label-key all already names every label column; give it alone")
        keys = "all"
    else:
        keys = ("default", *label_keys)  # cell_type (when the atlas has it) and the columns named
    heads_options = {"max_cells_per_label": head_cells_per_label} if head_cells_per_label else {}
    build_index(atlas_dir, index_dir, embedder=embedder, shard_size=shard_size, factory=factory, device=device,
                chunk_size=chunk_size, fit_sample=fit_sample, overwrite=overwrite, seed=seed, threads=threads,
                embedder_options=options, executor=_make_executor(executor, ray_address, cpus_per_task),
                label_keys=keys, heads_options=heads_options, progress=progress, reference_map=not no_map,
                exact_rerank=not no_exact_rerank)
    _print_info(index_info(index_dir))


_FIXED_BY_BUILD = ("embedder", "embedder_option", "shard_size", "factory", "fit_sample", "seed", "overwrite",
                   "label_keys", "no_label_heads", "head_cells_per_label", "no_map", "no_exact_rerank")


def _build_update(ctx: click.Context, atlas_dir: Path, index_dir: Path, device: str, threads: int | None,
                  chunk_size: int, limits: tuple[float, float], executor: Any, progress: bool) -> None:
    from click.core import ParameterSource

    from scatlas.index import index_info, update_index

    given = [name for name in _FIXED_BY_BUILD if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if given:
        names = ", ".join("--" + n.replace("_", "-").replace("label-keys", "label-key") for n in given)
        raise click.UsageError(f"--update takes every setting from the index's build record; drop {names}")
    chunk = chunk_size if ctx.get_parameter_source("chunk_size") == ParameterSource.COMMANDLINE else None
    report = update_index(atlas_dir, index_dir, device=None if device == "auto" else device, threads=threads,
                          chunk_size=chunk, max_far_fraction=limits[0], min_gene_ratio=limits[1], executor=executor,
                          progress=progress)
    if report.up_to_date:
        _echo(f"index {index_dir} is up to date with {atlas_dir} (version {report.version}); nothing to do")
        return
    _echo(f"updated {index_dir} to version {report.version} in {report.seconds:.1f} s: "
          + "; ".join(report.changes.sentences()))
    if report.drift is not None:
        _echo(f"drift        {report.drift.sentence()}")
    for text in report.warnings:
        _echo(f"warning      {text}")
    _print_info(index_info(index_dir))


def _print_info(info: dict[str, Any]) -> None:
    size = info["size_bytes"]
    recall = info.get("recall")
    _echo(f"index        {info['path']}")
    _echo(f"cells        {info['cells']:,} in {info['shards']} shard(s)")
    genes = info.get("embedder_genes")
    _echo(f"embedder     {info['embedder']} (fingerprint {info['embedder_fingerprint']}), {info['dim']} dims"
          + (f", reads {genes:,} genes (fixed by the build; queries' gene overlap is measured against them)"
             if genes else ""))
    if info.get("reference_map_cells"):
        _echo(f"map          a UMAP of {info['reference_map_cells']:,} atlas cells (annotate and search place queries on it)")
    if info.get("version", 1) > 1:
        _echo(f"version      {info['version']} ({info['updates']} update(s) since the build)")
    rerank_kind = {"all": ", exact top k", "some": ", exact top k in some shards",
                   "none": ", top k by the float16 vectors"}.get(info.get("exact_rerank") or "", "")
    _echo(f"factory      {info['factory']} (" + ("exact search" if info.get("exact") else
                                                f"approximate; nprobe={info.get('nprobe')}, rerank={info.get('rerank')}"
                                                f"{rerank_kind}")
          + ")")
    _echo(f"recall@{info.get('k', 30)}    " + (f"{recall:.4f} measured on {info.get('recall_queries')} atlas cells"
                                                    if recall is not None else "not measured"))
    _echo(f"size on disk {size / 2**20:,.1f} MiB ({info['bytes_per_cell']:,.0f} bytes per cell)")
    heads_s = info.get("heads_seconds")
    if info.get("updated"):  # the heads were trained anew by the last update: their time is the update's
        _echo(f"built        {info.get('built')} in {info.get('build_seconds')} s on {info.get('device')} (the index; "
              "its label heads are the last update's)")
        _echo(f"updated      {info.get('updates')} time(s), last {info.get('updated')} in {info.get('update_seconds')} s"
              + (f" (label heads {heads_s} s)" if heads_s else ""))
    else:
        _echo(f"built        {info.get('built')} in {info.get('total_seconds', info.get('build_seconds'))} s on "
              f"{info.get('device')}" + (f" (index {info.get('build_seconds')} s, label heads {heads_s} s)" if heads_s else ""))
    datasets = info.get("datasets") or []
    if datasets:
        _echo("datasets     " + ", ".join(f"{d['dataset_id']} ({d['cells']:,})" for d in datasets[:10])
              + (f" and {len(datasets) - 10} more" if len(datasets) > 10 else ""))
    labels = info.get("label_columns") or {}
    if labels:
        _echo("labels       " + ", ".join(f"{col} ({n} values)" for col, n in labels.items()))
    for key, c in (info.get("label_classes") or {}).items():
        how = ", ".join(f"{n} by {h}" for h, n in c.get("by_how", {}).items() if n and h != "unmapped")
        _echo(f"classes      {key}: {c['values']} values -> {c['classes']} classes, {c['classes_with_term']} with a Cell "
              f"Ontology term ({how or 'none mapped'})"
              + (f"; no term: {', '.join(_unmapped(v, c.get('suggestions') or {}) for v in c['unmapped'])}"
                 + (" ..." if c["n_unmapped"] > len(c["unmapped"]) else "")
                 + " (give them terms with `scatlas relabel --atlas ATLAS --dataset ID --ontology-map FILE.csv`, "
                 "then `scatlas build --update`)" if c.get("n_unmapped") else ""))
    heads = info.get("label_heads") or {}
    if info.get("label_heads_error"):
        _echo(f"label heads  unusable: {info['label_heads_error']}")
        return
    _echo("label heads  " + ("; ".join(
        f"{key}: {h['classes']} classes, {h['train_cells']:,} training cells ({'+'.join(h['features'])})"
        for key, h in heads.items()) if heads else "none (annotate votes by neighbours)"))


@cli.command()
@click.argument("index_path", required=False, metavar="[INDEX_DIR]",
                type=PathArg(file_okay=False, path_type=Path))
@click.option("--index", "index_dir", type=PathArg(file_okay=False, path_type=Path), default=None,
              help="Index directory written by `scatlas build` (as in build and annotate; or give it as INDEX_DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def info(index_path: Path | None, index_dir: Path | None, as_json: bool) -> None:
    """Show an index: cells, shards, embedder, factory, measured recall, size on disk, bytes per cell, label heads."""
    from scatlas.index import index_info

    path = index_dir if index_path is None else index_path
    if path is None or (index_path is not None and index_dir is not None):
        raise click.UsageError("give the index directory once: `scatlas info --index DIR` or `scatlas info DIR`")
    figures = index_info(path)
    if as_json:
        _echo(json.dumps(figures, indent=2, default=str))
    else:
        _print_info(figures)


def _pair_notes(index_dir: Path, atlas_dir: Path) -> list[str]:
    """Notes when an intact index and an intact store checked together are not index and store of one atlas."""
    from scatlas.atlas.store import AtlasStore
    from scatlas.atlas.validate import escaped
    from scatlas.index import AtlasIndex
    from scatlas.query.hunt.gene_reads import store_differences

    with AtlasIndex.open(index_dir) as idx:
        store = AtlasStore.open(atlas_dir)
        try:
            differences = store_differences(idx, store, every_dataset=True)
            snapshot = {str(d.get("dataset_id")): d for d in idx.manifest.atlas_snapshot.get("datasets") or []
                        if isinstance(d, dict)}
            records = list(store.cell_ranges_records())
        finally:
            store.close()
    if not differences:
        added = [r for r in records if str(r.dataset_id) not in snapshot]
        relabelled = [r for r in records if str(r.dataset_id) in snapshot
                      and snapshot[str(r.dataset_id)].get("obs_revision") not in (None, getattr(r, "obs_revision", None))]
        notes = []
        if added:
            notes.append(f"the store holds {len(added)} dataset(s) ingested after the index was built (e.g. "
                         f"{escaped(added[0].dataset_id, 60)}): `scatlas build --update` adds them")
        if relabelled:
            notes.append(f"{len(relabelled)} dataset(s) of the index were relabelled in the store since (e.g. "
                         f"{escaped(relabelled[0].dataset_id, 60)}): `scatlas build --update` takes the new labels")
        return notes
    return [f"the index was not built from this store as it is now: {'; '.join(differences)} (each is intact on its "
            "own: pair the index with the store it was built from, or bring it up to date with `scatlas build "
            "--update`)"]


@cli.command()
@click.option("--index", "index_dir", type=PathArg(file_okay=False, path_type=Path), default=None,
              help="Index directory to check: every file against the manifest's checksums, shard ids against its ranges.")
@atlas_option(required=False)
@click.option("--json", "as_json", is_flag=True, help="Print what was checked and found as JSON.")
@progress_option
def verify(index_dir: Path | None, atlas_dir: Path | None, as_json: bool, progress: bool) -> None:
    """Read an index and/or an atlas store back whole and check every checksum; exit 1 when anything is wrong."""
    from scatlas.atlas.verify import verify_store
    from scatlas.index.unfinished import BUILDING_FILE
    from scatlas.index.verify import verify_index

    if index_dir is None and atlas_dir is None:
        raise click.UsageError("give --index DIR and/or --atlas DIR")
    found: dict[str, Any] = {}
    if index_dir is not None:
        report = verify_index(index_dir, progress=progress)
        found["index"] = {**report.to_dict(), "problems": [str(p) for p in report.problems]}
    if atlas_dir is not None:
        store = verify_store(atlas_dir, progress=progress)
        found["atlas"] = {"path": store.path, "ok": store.ok, "datasets": store.n_datasets, "cells": store.n_cells,
                          "values": store.n_values, "problems": store.problems, "notes": store.notes}
    if index_dir is not None and atlas_dir is not None and found["index"]["ok"] and found["atlas"]["ok"]:
        found["atlas"]["notes"] = [*found["atlas"]["notes"], *_pair_notes(index_dir, atlas_dir)]
    if as_json:
        _echo(json.dumps(found, indent=2, default=str))
    for what, result in found.items():
        if not as_json:
            state = "intact" if result["ok"] else f"{len(result['problems'])} problem(s)"
            _echo(f"{what} {result['path']}: {state}")
            for line in result["problems"] + [f"note: {n}" for n in result["notes"]]:
                _echo(f"  {line}")
    broken = [what for what, result in found.items() if not result["ok"]]
    if broken == ["index"] and found["index"]["problems"] and all(
            p.startswith(BUILDING_FILE) for p in found["index"]["problems"]):
        raise ScatlasError("the index's build has not finished (above): rerun the same `scatlas build` to finish it")
    if broken:
        raise ScatlasError(
            f"the {' and the '.join(broken)} failed verification (problems listed above): rebuild the index with "
            "`scatlas build --overwrite`, or re-ingest damaged datasets into a new store"
        )


@cli.command()
@click.argument("query_file", type=PathArg(dir_okay=False, path_type=Path))
@index_option
@click.option("--out", "out_h5ad", type=PathArg(dir_okay=False, path_type=Path), required=True,
              help="New .h5ad: the query with <key>_pred, _level, _confidence, _unknown_reason, ... in obs, "
                   "the class probabilities in obsm['<key>_proba'] and, when the index has a reference map, the "
                   "cells' place on it in obsm['X_atlas_umap'] (drawn in OUT's stem + .umap.png).")
@click.option("--label-key", "label_keys", multiple=True, default=("cell_type",), show_default=True,
              help="Atlas metadata column to transfer (repeatable).")
@click.option("--k", type=click.IntRange(min=1), default=30, show_default=True, help="Neighbours per query cell.")
@click.option("--where", default=None, help="SQL filter over the atlas cells, e.g. \"tissue = 'lung'\".")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None,
              help="The confidence (head probability or weighted vote share) an answer needs, a class or a Cell "
                   "Ontology ancestor; below it the cell is 'unknown' (default: 0.5 where at least half of the "
                   "label's classes have CL terms, else 0.3; both measured).")
@click.option("--far-quantile", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Call a cell 'unknown' when its neighbours are less similar than this quantile of the atlas' own "
                   "neighbour similarities (0.001 to turn it on; default: off, the measured default).")
@click.option("--max-votes-per-dataset", type=click.IntRange(min=1), default=None,
              help="Cap on the votes one atlas dataset may cast for a query cell. The cap applies to the "
                   "neighbours' vote: with --predictor auto the labels then come from the vote, not the label "
                   "heads (refused with --predictor heads).")
@click.option("--truth-key", default=None, help="Query obs column with known labels: adds accuracy, macro-F1, "
              "ontology-aware accuracy, calibration error and a confusion matrix.")
@click.option("--ontology-map", "ontology_map", type=PathArg(dir_okay=False, path_type=Path), default=None,
              help="CSV (label,ontology_term_id) giving the --truth-key labels' Cell Ontology terms where neither the "
                   "query nor the atlas does.")
@click.option("--mapping-check/--no-mapping-check", default=True, show_default=True,
              help="Call the cells of a query that maps poorly onto the atlas (another tissue) 'unknown' "
                   "(out_of_atlas) unless they map well on their own; off: only report the verdict.")
@click.option("--allow-species-mismatch", is_flag=True,
              help="Annotate a query whose genes look like another species than the index's (refused otherwise).")
@click.option("--neighbors", "neighbors_path", type=PathArg(dir_okay=False, path_type=Path), default=None,
              help="Neighbours table (Parquet). Default: next to --out.")
@click.option("--report", "report_path", type=PathArg(dir_okay=False, path_type=Path), default=None,
              help="JSON report. Default: next to --out.")
@click.option("--min-gene-overlap", type=click.FloatRange(0, 1), default=None,
              help="Refuse queries carrying less than this fraction of the embedder's genes (default: 0.15 when "
                   "label heads refitted for the query's genes decide every label, else 0.5).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Query cells per batch.")
@click.option("--predictor", type=click.Choice(["auto", "heads", "knn"]), default="auto", show_default=True,
              help="What decides the label: the index's label heads, the neighbours' vote, or heads where trained.")
@click.option("--missing-genes", type=click.Choice(["refit", "impute"]), default="refit", show_default=True,
              help="When the query lacks some of the embedder's genes: refit the label heads on their training "
                   "sample without them (when over 2% are missing; fewer read as with impute), or use the heads as "
                   "trained (missing genes read as their atlas mean).")
@query_matrix_option
@progress_option
def annotate(query_file: Path, index_dir: Path, out_h5ad: Path, label_keys: tuple[str, ...], k: int, where: str | None,
             min_confidence: float | None, far_quantile: float | None, max_votes_per_dataset: int | None,
             truth_key: str | None, ontology_map: Path | None, mapping_check: bool, allow_species_mismatch: bool,
             neighbors_path: Path | None, report_path: Path | None, min_gene_overlap: float | None,
             batch_size: int | None, predictor: str, missing_genes: str, x_layer: str | None, progress: bool) -> None:
    """Annotate QUERY_FILE (.h5ad): embed with the index's embedder, find k nearest atlas cells, answer each label
    (a class, a Cell Ontology ancestor when unsure of the class, or 'unknown')."""
    from scatlas.query import annotate as run_annotate
    from scatlas.query.outputs import remove_stale

    if out_h5ad.suffix.lower() != ".h5ad":
        raise click.BadParameter("the annotated query is written as AnnData: give a path ending in .h5ad",
                                 param_hint="--out")
    if ontology_map is not None and truth_key is None:
        raise click.UsageError("--ontology-map gives Cell Ontology terms to the truth labels of --truth-key; give "
                               "--truth-key COLUMN too, or leave the map out")
    stem = out_h5ad.with_suffix("")
    neighbors_path = neighbors_path or stem.with_name(stem.name + ".neighbors.parquet")
    report_path = report_path or stem.with_name(stem.name + ".report.json")
    default_confusion = stem.with_name(stem.name + ".confusion.png")
    confusion = default_confusion if truth_key else None
    map_png = stem.with_name(stem.name + ".umap.png")  # written when the index has a reference map
    _check_annotate_outputs((query_file, index_dir), out_h5ad, neighbors_path, report_path, confusion, map_png)
    optional: dict[str, Any] = {"min_confidence": min_confidence, "far_quantile": far_quantile,
                                "min_gene_overlap": min_gene_overlap, "batch_size": batch_size}
    result = run_annotate(query_file, index_dir, label_keys=list(label_keys), k=k, where=where,
                          max_votes_per_dataset=max_votes_per_dataset, truth_key=truth_key, progress=progress,
                          ontology_map=ontology_map, check_mapping=mapping_check,
                          allow_species_mismatch=allow_species_mismatch,
                          predictor=predictor, missing_genes=missing_genes,  # type: ignore[arg-type]
                          x_layer=x_layer, **{key: v for key, v in optional.items() if v is not None})
    drawn = map_png if result.placement is not None else None
    evaluated = (result.report.get("evaluation") or {}).values()
    if confusion is not None and all(e.get("n_unlabelled") == e.get("n_cells") for e in evaluated):
        confusion = None  # no cell has a truth label: no matrix to draw (the evaluation says so)
    written = result.write(out_h5ad, neighbors_parquet=neighbors_path, report_json=report_path,
                           confusion_png=confusion, map_png=drawn)
    if confusion is not None and "confusion" not in written:
        confusion = None  # too many labels to draw (logged)
    if confusion is None and default_confusion not in (out_h5ad, neighbors_path, report_path):
        remove_stale(default_confusion, "png")  # an earlier run's matrix would not match these predictions
    if drawn is None:
        remove_stale(map_png, "png")  # an earlier run's map would not show these predictions
    _echo_annotation(result.report)
    _echo(f"wrote {out_h5ad}, {neighbors_path}, {report_path}" + (f", {confusion}" if confusion else "")
          + (f", {drawn}" if drawn else ""))


def _check_annotate_outputs(inputs: tuple[Path, ...], h5ad: Path, neighbors: Path, report: Path,
                            confusion: Path | None, map_png: Path | None = None) -> None:
    """Refuse, before any work, outputs that are inputs, lie inside the index, coincide, or hold other files."""
    check_distinct([h5ad, neighbors, report, confusion, map_png])
    for path, kind in ((h5ad, "h5ad"), (neighbors, "parquet"), (report, "json"), (confusion, "png"), (map_png, "png")):
        if path is not None:
            check_output_file(path, inputs=inputs, file_kind=kind, mark="annotate" if kind == "h5ad" else None)


VOTE_WHY = {"knn_asked": "--predictor knn",
            "max_votes_per_dataset": "--max-votes-per-dataset caps the vote, so label heads are not used",
            "no_label_head": "the index has no label head for it"}
"""The annotate report's ``predicted_by_reason`` as the command line says it."""


def _echo_annotation(report: dict[str, Any]) -> None:
    overlap = report.get("gene_overlap") or {}
    if overlap:
        _echo(f"gene overlap: {overlap.get('n_matched')} of the embedder's {overlap.get('n_target_genes')} genes "
              f"({100 * overlap.get('fraction_of_target', 0):.1f}%)")
    update = report.get("query_update") or {}
    if update.get("query_update"):
        _echo(f"query update: the embedder adapted to the query's {update.get('cells', 0):,} cells of "
              f"{len(update.get('batches', []))} batch(es) it had not seen ({update.get('epochs')} epochs, "
              f"{update.get('seconds')} s)")
    elif update.get("reason"):
        _echo(f"query update: none ({update['reason']})")
    refit = report.get("params", {}).get("heads_refit_for_query_genes")
    if refit and refit.get("keys"):
        _echo(f"label heads for {', '.join(refit['keys'])} refitted for the query's {refit['genes_present']} of "
              f"{refit['genes']} genes ({refit['seconds']} s)")
    params = report.get("params") or {}
    if isinstance(params.get("k_used"), int) and params["k_used"] < params.get("k", 0):
        _echo(f"k: {params['k_used']:,} neighbours per cell (--k {params['k']:,}, but only {params['k_used']:,} "
              "atlas cells searched)")
    mapping = report.get("mapping") or {}
    if mapping.get("verdict") == "maps_poorly":  # the warning, with its reasons, is logged once by annotate()
        reasons = "; ".join(str(r) for r in mapping.get("reasons") or [])
        _echo(f"mapping: the query maps poorly onto the atlas ({reasons or 'score ' + str(mapping.get('score'))}): "
              + (f"{mapping.get('cells_out_of_atlas', 0):,} cells are 'unknown' (out_of_atlas)" if mapping.get("applied")
                 else "cells labelled anyway (--no-mapping-check)")
              + ("; each cell is judged on its own (by its expression)" if mapping.get("cells_judged_by") else ""))
        expression_off = (mapping.get("expression") or {}).get("status") == "off"
        if expression_off and mapping.get("applied") and mapping.get("cells_out_of_atlas", 0) < (mapping.get(
                "n_cells") or report.get("query", {}).get("n_cells") or 0):
            _echo(f"note: cells that map well on their own keep their labels; the gene-space check that could tell "
                  f"them apart is off: {mapping['expression'].get('reason')}")
    elif mapping.get("verdict") == "maps_well":
        evidence = mapping.get("evidence") or {}
        weaker = str(evidence.get("shift_rule", "on")).startswith("off")
        _echo(f"mapping: the query maps onto the atlas (score {mapping.get('score')}: the share of its cells above "
              "the low tail of held-out atlas cells)"
              + (f"; note: {mapping['caveat']}" if mapping.get("caveat") else "")
              + ("; the atlas has one dataset, so how far another lab's data must shift is not judged (only how "
                 "its cells' similarities fall)" if weaker else ""))
        if (mapping.get("expression") or {}).get("cause") == "atlas":  # said for the atlas' make-up, not a choice
            _echo("note: the per-cell expression match is off (" + str(mapping["expression"].get("reason"))
                  + "): cells of another tissue mixed into this query are judged by their similarities alone and may "
                  "keep labels")
    expression = mapping.get("expression") or {}
    cells_out = expression.get("cells_out", expression.get("cells_below"))
    if expression.get("status") == "on" and cells_out:
        strict = expression.get("cuts_applied") == "strict"
        cuts = (expression.get("strict_cuts") if strict else None) or \
            (expression.get("depth_bins") or {}).get("cuts") or [expression.get("cut")]
        span = f"from {min(cuts)} to {max(cuts)}" if len(set(cuts)) > 1 else f"{cuts[0]}"
        _echo(f"expression: {cells_out:,} cells match no atlas cell "
              f"type in gene space (a correlation under the {'strict ' if strict else ''}cut of their number of "
              f"detected genes, {span}"
              + ("; strict: the query as a whole maps poorly, so a cell keeps its label only where it matches well"
                 if strict else "") + ")"
              + (": 'unknown' (out_of_atlas)" if mapping.get("applied") else ": labelled anyway (mapping check off)"))
    elif mapping.get("verdict") == "too_few_cells":
        _echo(f"mapping: no query-level verdict: the query has {mapping.get('n_cells')} cell(s), under the "
              f"{mapping.get('min_cells')} the check needs; each cell is judged on its own "
              f"({mapping.get('cells_out_of_atlas', 0):,} out_of_atlas)")
    for key, lab in report.get("labels", {}).items():
        counts = lab.get("counts", {})
        top = ", ".join(f"{_value(name)} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])[:8])
        by = "label head" if lab.get("predicted_by") == "heads" else \
            f"neighbour vote ({VOTE_WHY.get(lab.get('predicted_by_reason') or '', 'the index has no label head for it')})"
        levels = ", ".join(f"{lv} {n}" for lv, n in lab.get("levels", {}).items())
        _echo(f"{key} (by {by}): unknown rate {100 * lab.get('unknown_rate', 0):.1f}%; levels: {levels}; "
              f"answers: {top or 'none'}")
        ev = report.get("evaluation", {}).get(key)
        if ev:
            _echo_evaluation(key, ev)


def _percent(fraction: float) -> str:
    """A share as a percentage with two significant digits, without exponents (100%, 3.4%, 0.25%)."""
    pct = 100 * float(fraction)
    if pct >= 10:
        return f"{pct:.0f}%"
    return f"{pct:.2g}%" if pct >= 0.01 or pct == 0 else "<0.01%"


def _fmt(value: Any, spec: str = ".3f") -> str:
    """A metric for the terminal: formatted, or 'n/a' when it could not be computed."""
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def _echo_evaluation(key: str, ev: dict[str, Any]) -> None:
    onto = ev.get("ontology") or {}
    if ev.get("n_cells") and ev.get("n_unlabelled") == ev.get("n_cells"):
        _echo(f"{key} vs truth: no query cell has a truth label in the --truth-key column: nothing to score")
        return
    scored = onto.get("n_cells_with_truth_term")
    labelled = (ev.get("n_cells") or 0) - (ev.get("n_unlabelled") or 0)
    scored_on = (f"best class, on the {ev.get('n_known', 0):,} of {labelled:,} labelled cells whose truth is an atlas "
                 "class" if ev.get("n_known", 0) < labelled else "best class")
    flat = f"{key} vs truth: accuracy {_fmt(ev.get('accuracy'))}, macro-F1 {_fmt(ev.get('macro_f1'))} ({scored_on}); "
    if not scored or not isinstance(onto.get("fine_rate"), float):
        _echo(flat + "no truth label has a Cell Ontology term, so no ontology-aware score (give the query's labels "
                     "terms with --ontology-map)")
    else:
        _echo(flat + f"ontology-aware accuracy {_fmt(onto.get('ontology_accuracy'))} of the answered (on the "
                     f"{scored:,} cells whose truth has a Cell Ontology term), {100 * onto['fine_rate']:.1f}% fine"
                     + (f" ({100 * onto['fine_coarser_rate']:.1f}% with a class coarser than the truth)"
                        if (onto.get("fine_coarser_rate") or 0) >= 0.0005 else "") + f", ECE {_fmt(onto.get('ece'))}")
    absent = ev.get("truth_labels_absent_from_atlas") or {}
    if absent:
        names = ", ".join(map(_value, list(absent)[:6])) + (", ..." if len(absent) > 6 else "")
        contained = ev.get("absent_answered_with_a_broader_type")
        _echo(f"{key}: {sum(absent.values()):,} cells have truth labels the atlas does not have ({names}); "
              f"called unknown: {_fmt(ev.get('with_abstention', {}).get('abstention_rate_absent'))}"
              + (f"; answered with a type whose Cell Ontology term contains theirs: {_fmt(contained)}"
                 if contained is not None else ""))


HUNT_STAGES: dict[str, bool | Literal["auto"]] = {"1": False, "2": True, "auto": "auto"}
"""``hunt train --stages`` values -> ``query.hunt.train(two_stage=...)``."""


@cli.group(cls=ScatlasGroup)
def hunt() -> None:
    """Rare-cell hunt: train a classifier on a few known cells, sweep every atlas cell, report the hits."""


@hunt.command("train")
@index_option
@click.option("--cells", "cells_file", type=PathArg(dir_okay=False, path_type=Path), default=None,
              help=".h5ad with the known cells (positives) and other cells (negatives).")
@click.option("--positive", default=None, help="SQL predicate over the --cells obs, e.g. \"cell_type = 'Norn'\" "
              "(as --positive-sql; the older \"cell_type == 'Norn'\" form also works).")
@click.option("--positive-sql", default=None, help="SQL predicate over the atlas cells, for types the atlas already labels.")
@click.option("--out", "out_dir", type=PathArg(file_okay=False, path_type=Path), required=True, help="Classifier directory.")
@click.option("--background", type=click.IntRange(min=0), default=20_000, show_default=True,
              help="Atlas cells sampled as extra negatives.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stages", type=click.Choice(list(HUNT_STAGES)), default=None,
              help="1: the embedding classifier alone; 2: also a gene-level stage 2 that re-scores stage 1's "
                   "candidates from the atlas store (genes standardised per batch); auto: train stage 2 and keep it "
                   "when its cross-validated F1 beats stage 1 alone's.  [default: auto]")
@click.option("--two-stage", is_flag=True, help="The same as --stages 2.")
@query_gene_options
@query_matrix_option
@progress_option
def hunt_train(index_dir: Path, cells_file: Path | None, positive: str | None, positive_sql: str | None, out_dir: Path,
               background: int, device: str, seed: int, stages: str | None, two_stage: bool, min_gene_overlap: float,
               allow_species_mismatch: bool, x_layer: str | None, progress: bool) -> None:
    """Train a class-balanced logistic classifier on known rare cells (on the embedding, and a gene-level stage 2
    where it helps: --stages); cross-validated metrics, calibrated scores."""
    from scatlas.query.hunt import train

    if two_stage and stages not in (None, "2"):
        raise click.UsageError(f"--two-stage means --stages 2, but --stages {stages} was given; give one of them")
    chosen = "2" if two_stage else (stages or "auto")
    clf = train(index_dir, cells_file, positive=positive, positive_sql=positive_sql, background=background,
                device=device, seed=seed, out=out_dir, progress=progress, two_stage=HUNT_STAGES[chosen],
                min_gene_overlap=min_gene_overlap, allow_species_mismatch=allow_species_mismatch, x_layer=x_layer)
    m = clf.metrics
    parts = ", ".join(f"{n:,} {k.replace('_', ' ')}" for k, n in clf.counts.items()  # counts, not the 0/1 flag
                      if k not in ("n_positive", "n_negative", "background_from_labelled_otherwise")
                      and isinstance(n, int) and n)
    _echo(f"classifier {out_dir}: {clf.counts.get('n_positive'):,} positives, {clf.counts.get('n_negative'):,} "
          f"negatives" + (f" ({parts})" if parts else ""))
    _echo(f"stage 1 (embedding), cross-validated: precision {m['precision']:.3f}, recall {m['recall']:.3f}, AUPRC "
          f"{m['auprc']:.3f} at threshold {clf.threshold:.4f}; expected per million atlas cells: false hits "
          f"{m['expected_false_hits_per_million']:.1f}" + _estimate_notes(clf)
          + (f"; all hits {m['expected_hits_per_million']:.1f}" if "expected_hits_per_million" in m else ""))
    counts = clf.counts
    if counts.get("background_from_labelled_otherwise") and counts.get("background_datasets", 0) < counts.get(
            "atlas_datasets", 0):
        _echo(f"note: the negatives come from {counts['background_datasets']} of the atlas' {counts['atlas_datasets']} "
              "datasets (those with cells labelled otherwise): the cross-validated figures hold for them; in the "
              "others, never seen in training, the cut may not carry over (another lab's cells can score lower or "
              "higher): judge their hits by the report's genes, or lower the cut with `hunt sweep --min-probability`")
    choice = clf.params.get("stage_choice")
    if clf.stage2 is None:
        if choice:
            _echo(f"stages: stage 1 alone, chosen by --stages auto ({choice})")
            if (dropped := clf.params.get("stage2_not_kept")) is not None:
                two = dropped["two_stage"]
                _echo(f"stage 2 not kept ({dropped['n_genes']} genes), cross-validated: precision "
                      f"{dropped['precision']:.3f}, recall {dropped['recall']:.3f}, AUPRC {dropped['auprc']:.3f}; "
                      f"two stages: precision {two['precision']:.3f}, recall {two['recall']:.3f}")
        elif chosen == "1":
            _echo("stages: stage 1 alone (--stages 1)")
        else:
            _echo(f"stages: stage 1 alone; no stage 2: {clf.params.get('stage2_skipped', 'not trained')}")
    else:
        if choice:
            _echo(f"stages: two, chosen by --stages auto ({choice})")
        m2 = clf.stage2.metrics
        c1, two = m2["stage1_candidates"], m2["two_stage"]
        _echo(f"stage 1 candidate cut {clf.stage2.stage1_cut:.4f}: recall {c1['recall']:.3f}, passes "
              f"{1e6 * c1['false_positive_rate']:.0f} negatives per million")
        _echo(f"stage 2 ({m2['n_genes']} genes), cross-validated: precision {m2['precision']:.3f}, recall "
              f"{m2['recall']:.3f}, AUPRC {m2['auprc']:.3f} at threshold {clf.stage2.threshold:.4f}")
        one, rows = m2.get("stage1_alone") or {}, m2.get("rows") or {}
        _echo(f"two stages, cross-validated on the {rows.get('positives', '?')} positives and "
              f"{rows.get('negatives', '?')} negatives stage 2 trains on: precision {two['precision']:.3f}, recall "
              f"{two['recall']:.3f}, false hits per million of those negatives "
              f"{two['expected_false_hits_per_million']:.1f}"
              + (f" (stage 1 alone on the same cells: precision {one['precision']:.3f}, recall {one['recall']:.3f}, "
                 f"false hits per million {1e6 * one['false_positive_rate']:.1f})" if one else "")
              + f"; all hits per million atlas cells {two['expected_hits_per_million']:.1f}")
    _echo(f"embedder fingerprint {clf.embedder_fingerprint}")


def _estimate_notes(clf: Any) -> str:
    """What qualifies the false-hit estimate: its 95% upper bound (from how many negatives it was measured on), and
    how far it could go if the background cells set aside as likely unlabelled positives are negatives after all;
    "" when neither applies."""
    m, n = clf.metrics, clf.counts.get("background_excluded_as_likely_positive", 0)
    notes = []
    bound = m.get("false_hits_per_million_95")
    if bound is not None:
        notes.append(f"at most {bound:.1f} at 95% confidence")
    upper = m.get("expected_false_hits_per_million_upper")
    if n and upper is not None and upper > m["expected_false_hits_per_million"]:
        notes.append(f"up to {upper:.1f} if the {n} atlas background cells set aside as likely unlabelled positives "
                     "are not")
    return f" ({'; '.join(notes)})" if notes else ""


@hunt.command("sweep")
@index_option
@click.option("--classifier", "classifier_dir", type=PathArg(file_okay=False, path_type=Path), required=True,
              help="Classifier directory written by `scatlas hunt train`.")
@click.option("--out", "out_dir", type=PathArg(file_okay=False, path_type=Path), required=True,
              help="Sweep directory; hits go to OUT/hits.parquet. Rerun to resume.")
@click.option("--min-score", type=float, default=None, help="Raw score cut-off (default: the classifier's threshold).")
@click.option("--min-probability", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, help="Cut-off on the calibrated probability instead.")
@click.option("--restart", is_flag=True, help="Discard a previous sweep in OUT instead of resuming it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: tuned by timing).")
@click.option("--stage1-only", is_flag=True, help="Skip a two-stage classifier's stage 2 (hits: stage 1's).")
@click.option("--atlas", "atlas_dir", type=PathArg(file_okay=False, path_type=Path), default=None,
              help="Atlas store a two-stage classifier's stage 2 reads (default: the one the index was built from); "
                   "one given that cannot serve (unreachable, other cells) is an error.")
@executor_options
@progress_option
def hunt_sweep(index_dir: Path, classifier_dir: Path, out_dir: Path, min_score: float | None, min_probability: float | None,
               restart: bool, device: str, threads: int | None, stage1_only: bool, atlas_dir: Path | None, executor: str,
               ray_address: str | None, cpus_per_task: float, progress: bool) -> None:
    """Score every cell of every shard from the stored vectors (stage 1); with a two-stage classifier, score the
    candidates' gene features from the atlas store (stage 2); write hits joined with cell metadata."""
    from scatlas.query.hunt import sweep
    from scatlas.query.hunt.sweep import training_sentence

    s = sweep(index_dir, classifier_dir, out_dir, min_score=min_score, min_probability=min_probability, resume=not restart,
              device=device, threads=threads, progress=progress,
              executor=_make_executor(executor, ray_address, cpus_per_task), two_stage=not stage1_only,
              atlas=atlas_dir)
    rate = (f"{s.cells_per_second:,.0f} cells/s, {s.gb_per_second:.2f} GB/s" if s.n_shards_scored
            else "nothing scored in this run: every shard was done before")
    _echo(f"swept {s.n_cells:,} cells in {s.n_shards} shards ({s.n_shards_resumed} resumed) on {s.device}: "
          f"{s.n_hits:,} hits (cut-off {s.cutoff:.4f}, {s.cutoff_source}); {rate}")
    kept = f", stage 2 kept {s.n_stage2_kept:,}" if s.n_stage2_kept is not None else ""
    _echo(f"{s.stages}: stage 1 passed {s.n_stage1_passed:,} cells{kept}")
    if s.n_training_hits:
        _echo(training_sentence(s.n_training_hits, s.n_hits))
    _echo(f"hits: {s.hits_path}")


@hunt.command("report")
@click.argument("hits", type=PathArg(path_type=Path))
@index_option
@click.option("--out", "out_dir", type=PathArg(file_okay=False, path_type=Path), required=True, help="Report directory.")
@click.option("--by", default=None, help="Comma-separated cell columns to break the hits down by (enrichment) "
              "[default: cell_type (the atlas label), donor_id, dataset_id: those the cells table has]. Columns "
              "missing in every cell are left out.")
@click.option("--de", "de_group", default=None, help="Compare hits between the levels of this column instead of "
              "against matched non-hits (e.g. disease).")
@click.option("--de-reference", default=None, help="With --de: the level the others are compared against (e.g. normal).")
@click.option("--atlas", "atlas_dir", type=PathArg(file_okay=False, path_type=Path), default=None,
              help="Atlas store for differential expression (default: the one the index was built from).")
@click.option("--no-de", is_flag=True, help="Skip differential expression.")
@click.option("--de-method", type=click.Choice(["wilcoxon", "t-test"]), default="wilcoxon", show_default=True,
              help="Test per gene, on log1p(CP10k) values.")
@click.option("--where", default=None, metavar="SQL",
              help="Report on the atlas cells matching this predicate only (e.g. \"dataset_id = 'D'\"): hits outside "
                   "it are left out, and group sizes, the hit rate and the non-hits DE compares with come from "
                   "those cells.")
@progress_option
def hunt_report(hits: Path, index_dir: Path, out_dir: Path, by: str | None, de_group: str | None, de_reference: str | None,
                atlas_dir: Path | None, no_de: bool, de_method: str, where: str | None, progress: bool) -> None:
    """Hits by atlas label, donor and dataset (Fisher test, BH q), score histogram, genes up/down vs matched non-hits."""
    from scatlas.query.hunt import report

    columns = None if by is None else tuple(c.strip() for c in by.split(",") if c.strip())
    r = report(hits, index_dir, out_dir, by=columns, de_group=de_group, de_reference=de_reference, atlas=atlas_dir,
               de=not no_de, de_method="t-test" if de_method == "t-test" else "wilcoxon", progress=progress,
               where=where)
    _echo(f"{r.n_hits:,} hits of {r.n_cells:,} cells ({100 * r.hit_rate:.3f}%); by {', '.join(r.by) or 'nothing'}")
    if r.n_training_hits:
        _echo(r.training_sentence())
    if r.left_out:
        _echo(r.left_out_sentence())
    enr = r.enrichment
    for column in r.by:
        top = enr[enr["column"] == column].sort_values("n_hits", ascending=False, kind="stable").head(5)
        _echo(f"{column}: " + ", ".join(f"{_value(g)} {n:,} ({_percent(f)})" for g, n, f in
                                       zip(top["group"], top["n_hits"], top["fraction"], strict=True)))
    if r.de_skipped:
        _echo(f"differential expression skipped: {r.de_skipped}")
    elif r.de is not None and not r.de.empty:
        if r.de_matching:
            _echo(r.de_matching)
        for name, sub in r.de.groupby("comparison", sort=False):
            sig = sub[sub["qvalue"] < 0.05]
            up = sig[sig["log2fc"] > 0].sort_values("log2fc", ascending=False).head(8)["gene_symbol"]
            down = sig[sig["log2fc"] < 0].sort_values("log2fc").head(8)["gene_symbol"]
            line = f"{name}: up {', '.join(map(str, up)) or '-'}; down {', '.join(map(str, down)) or '-'}"
            if up.empty and down.empty and len(sub):
                from scatlas.query.hunt.report import strongest_changes

                top = strongest_changes(sub, 5)
                line += (f" (none at q < 0.05 with {int(sub['n_a'].iloc[0])} vs {int(sub['n_b'].iloc[0])} cells; "
                         "strongest, not significant: " + ", ".join(
                             f"{_value(g)} {'+' if fc > 0 else '-'}" for g, fc in
                             zip(top["gene_symbol"], top["log2fc"], strict=True)) + ")")
            _echo(line)
    for name, path in r.files.items():
        _echo(f"{name}: {path}")


@cli.command()
@click.option("--out", "out_dir", type=PathArg(file_okay=False, path_type=Path), default=Path("demo_out"), show_default=True,
              help="Working directory: created, or emptied when it holds an earlier demo (anything else is refused).")
@click.option("--cells", type=click.IntRange(min=2000), default=12_000, show_default=True, help="Synthetic cells in all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@progress_option
def demo(out_dir: Path, cells: int, seed: int, progress: bool) -> None:
    """Run every stage on a small synthetic atlas: synthesise, ingest, build, annotate, hunt."""
    from scatlas.demo import run_demo

    t = time.perf_counter()
    result = run_demo(out_dir, n_cells=cells, seed=seed, progress=progress, echo=_echo)
    _echo(f"demo finished in {time.perf_counter() - t:.0f} s; outputs in {result.out_dir}")


def main() -> None:
    ignore_sigint_safely()
    try:
        cli(prog_name="scatlas")
    finally:
        ignore_late_sigint()  # the command is done: a Ctrl-C now must not turn its exit status into 130


from scatlas.cli_atlas import datasets, relabel, remove  # noqa: E402  (commands of their own modules)
from scatlas.cli_embed import embedders, evaluate  # noqa: E402
from scatlas.cli_search import search  # noqa: E402
from scatlas.cli_serve import serve  # noqa: E402

cli.add_command(datasets)
cli.add_command(remove)
cli.add_command(relabel)
cli.add_command(search)
cli.add_command(embedders)
cli.add_command(evaluate)
cli.add_command(serve)
