"""``scatlas embedders`` (the registered embedders) and ``scatlas evaluate`` (which embedder works best on an atlas):
thin commands over :mod:`scatlas.atlas.embed.registry` and :mod:`scatlas.query.evaluate_embedders`.

:mod:`scatlas.cli` registers the commands on its group.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from scatlas.atlas.errors import ScatlasError
from scatlas.atlas.validate import escaped
from scatlas.cli_common import (
    PathArg,
    _echo,
    _make_executor,
    _option_value,
    atlas_option,
    executor_options,
    progress_option,
)


def embedder_rows() -> list[dict[str, Any]]:
    """One row per registered embedder: name, where from, whether it fits on the atlas, how to ask for it, what it
    is (its class docstring's first line), or why it cannot be used (it fails to import)."""
    from scatlas.atlas.embed.registry import registered_embedders

    rows = []
    for entry in registered_embedders().values():
        row: dict[str, Any] = {"name": entry.name, "from": "scatlas (built in)" if entry.builtin else entry.origin,
                               "target": entry.target, "builtin": entry.builtin}
        try:
            cls = entry.load()
        except ScatlasError as exc:
            row.update({"usable": False, "fits": None, "spec": entry.name, "error": str(exc)})
        else:
            option = entry.spec_option(cls)
            doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", (cls.__doc__ or "").strip().split("\n\n")[0]).replace("``", "")
            row.update({"usable": True, "fits": entry.fits(cls),
                        "spec": f"{entry.name}:{option.upper()}" if option else entry.name,
                        "description": " ".join(doc.split())})
        rows.append(row)
    return rows


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def embedders(as_json: bool) -> None:
    """List the registered embedders (for `build --embedder` and `evaluate --embedders`): built in, or from packages
    registering in the `scatlas.embedders` entry-point group (docs/embedders.md); whether each is fitted on the
    atlas; plug-ins that fail to import are listed with the error."""
    rows = embedder_rows()
    if as_json:
        _echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["spec"]) for r in rows)
    origin = max(len(r["from"]) for r in rows)
    _echo(f"{'embedder':<{width}}  {'from':<{origin}}  fits  description")
    for r in rows:
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "no")
        text = r.get("description") or ""
        if not r["usable"]:
            text = f"UNUSABLE: {r['error']}"
        _echo(f"{r['spec']:<{width}}  {r['from']:<{origin}}  {fits:<4}  {text}")


def _embedder_options(values: tuple[str, ...], specs: list[str]) -> dict[str, dict[str, Any]]:
    """``NAME:KEY=VALUE`` items -> {embedder spec: {key: value}} (NAME may hold ':' itself: precomputed:X_uce)."""
    out: dict[str, dict[str, Any]] = {}
    for item in values:
        left, sep, value = item.partition("=")
        name, colon, key = left.rpartition(":")
        if not sep or not colon or not name or not key:
            raise click.BadParameter(f"expected NAME:KEY=VALUE (e.g. pca:n_components=30), got {escaped(item, 80)}",
                                     param_hint="--embedder-option")
        if name not in specs:
            raise click.BadParameter(f"{escaped(name, 60)} is not among --embedders ({', '.join(specs)})",
                                     param_hint="--embedder-option")
        out.setdefault(name, {})[key] = _option_value(value)
    return out


@click.command()
@atlas_option()
@click.option("--label-key", default="cell_type", show_default=True, metavar="COLUMN",
              help="The atlas label column transferred to the held-out cells and scored.")
@click.option("--holdout-key", default="dataset_id", show_default=True, metavar="COLUMN",
              help="The column whose groups are held out in turn (dataset_id, donor_id, ...).")
@click.option("--embedders", "embedder_list", required=True, metavar="NAME[,NAME...]",
              help="Embedders to compare, comma-separated (`scatlas embedders` lists them), e.g. pca,scvi.")
@click.option("--out", "out_dir", type=PathArg(file_okay=False, path_type=Path), required=True,
              help="Output directory: evaluation.json, evaluation.html, evaluation.png.")
@click.option("--max-holdouts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Groups held out (each costs one index build per embedder): the largest ones with enough "
                   "labelled cells.")
@click.option("--min-group-cells", type=click.IntRange(min=1), default=20, show_default=True,
              help="Labelled cells a group needs to be held out.")
@click.option("--embedder-option", multiple=True, metavar="NAME:KEY=VALUE",
              help="An option of one embedder, as build's --embedder-option prefixed with its name, e.g. "
                   "pca:n_components=30 (repeatable).")
@click.option("--k", type=click.IntRange(min=1), default=30, show_default=True, help="Neighbours per cell.")
@click.option("--fit-sample", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Cells (of the rest of the atlas) sampled to fit each embedder.")
@click.option("--max-query-cells", type=click.IntRange(min=1), default=5_000, show_default=True,
              help="Held-out cells evaluated per group (a seeded sample beyond that).")
@click.option("--heads/--no-heads", default=True, show_default=True,
              help="Also train and score the label head (the costliest step on small atlases).")
@click.option("--hunt/--no-hunt", default=True, show_default=True,
              help="Also hunt the atlas' rare labels (under 2% of cells) in the held-out cells.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1_000_000, show_default=True, help="Cells per shard.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where FAISS trains and adds.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for FAISS (default: all cores).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every sample drawn.")
@click.option("--keep-indexes", is_flag=True, help="Keep the per-group indexes under OUT/work (removed by default).")
@executor_options
@progress_option
def evaluate(atlas_dir: Path, label_key: str, holdout_key: str, embedder_list: str, out_dir: Path, max_holdouts: int,
             min_group_cells: int, embedder_option: tuple[str, ...], k: int, fit_sample: int, max_query_cells: int,
             heads: bool, hunt: bool, shard_size: int, device: str, threads: int | None, seed: int,
             keep_indexes: bool, executor: str, ray_address: str | None, cpus_per_task: float,
             progress: bool) -> None:
    """Which embedder works best on this atlas? Hold out groups of --holdout-key in turn; for each embedder, fit it,
    build an index and train the label head on the other cells only, then measure on the held-out cells: label
    transfer macro-F1 (k-NN vote, with and without the MNN shift; label head), batch mixing, label conservation,
    rare-type hunt recall, and seconds per 1,000 cells. Writes OUT/evaluation.json, .html and .png."""
    from scatlas.query.evaluate_embedders import EvaluationSettings, evaluate_embedders

    specs = list(dict.fromkeys(e.strip() for e in embedder_list.split(",") if e.strip()))
    if not specs:
        raise click.BadParameter("name at least one embedder", param_hint="--embedders")
    settings = EvaluationSettings(label_key=label_key, holdout_key=holdout_key, max_holdouts=max_holdouts,
                                  min_group_cells=min_group_cells, k=k, fit_sample=fit_sample,
                                  max_query_cells=max_query_cells, heads=heads, hunt=hunt, seed=seed)
    payload = evaluate_embedders(atlas_dir, out_dir, specs, settings=settings,
                                 embedder_options=_embedder_options(embedder_option, specs), shard_size=shard_size,
                                 device=device, threads=threads, keep_indexes=keep_indexes,
                                 executor=_make_executor(executor, ray_address, cpus_per_task), progress=progress)
    s = payload["settings"]
    _echo(f"held out {s['holdout_key']} = {', '.join(map(str, s['holdouts']))} (each: embedder, index and head "
          "from the other cells only)")
    columns = (("knn_macro_f1", "kNN F1"), ("knn_unaligned_macro_f1", "kNN F1 raw"), ("heads_macro_f1", "head F1"),
               ("batch_mixing", "mixing"), ("label_conservation", "labels kept"), ("hunt_recall", "hunt recall"),
               ("build_seconds_per_1k", "build s/1k"), ("embed_seconds_per_1k", "embed s/1k"))
    width = max(8, *(len(r["embedder"]) for r in payload["embedders"]))
    _echo(f"{'embedder':<{width}}" + "".join(f"  {title:>11}" for _, title in columns))
    for r in payload["embedders"]:
        _echo(f"{r['embedder']:<{width}}" + "".join(
            f"  {'n/a' if r.get(key) is None else format(r[key], '.3f'):>11}" for key, _ in columns))
    for note in _evaluation_notes(payload):
        _echo(f"note: {note}")
    _echo(f"wrote {out_dir / 'evaluation.json'}, {out_dir / 'evaluation.html'}, {out_dir / 'evaluation.png'}")


def _evaluation_notes(payload: dict[str, Any]) -> list[str]:
    """Why a figure of the table is n/a, from the held-out groups' records (one line per cause)."""
    key = payload["settings"].get("label_key", "cell_type")
    notes: list[str] = []
    for r in payload["embedders"]:
        holdouts = r.get("holdouts") or []
        if r.get("knn_macro_f1") is None and holdouts:
            absent = [h for h in holdouts if h.get("labels_absent_from_atlas")]
            if absent and len(absent) == len(holdouts):
                notes.append(
                    f"{r['embedder']}: no label F1: no held-out group's {key} labels occur in the rest of the atlas "
                    "(the groups name their types differently?); map them to Cell Ontology terms "
                    "(`ingest --ontology-map`, `relabel --ontology-map`) so that the same types are one class"
                )
        hunt = {h.get("hunt_note") for h in holdouts if h.get("hunt_note")}
        if r.get("hunt_recall") is None and hunt:
            notes.append(f"{r['embedder']}: no hunt recall: {'; '.join(sorted(hunt))}")
    return list(dict.fromkeys(notes))
