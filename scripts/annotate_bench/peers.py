"""The peers CellTypist and scanpy ingest, run in the project's environment or, failing that, in another
interpreter (a venv with older scikit-learn and pynndescent in front of the project's packages)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .common import ENTRY, LABEL, log
from .methods import Prepared, ref_query


def _write_lognorm_pair(p: Prepared, genes: Any | None, tag: str) -> tuple[Path, Path, int]:
    """Reference and query log1p(CP10k) over ``genes`` (None: all reference genes) as plain h5ad files."""
    import anndata
    import pandas as pd

    X, y, Xq, yq, genes = ref_query(p, genes)
    names = pd.Index([str(k) if k else f"gene{i}" for i, k in enumerate(genes.keys)]).astype(str)
    names = pd.Index(pd.Series(names).where(~names.duplicated(), names + "_dup")).astype(str)
    ref = anndata.AnnData(
        X=X,
        obs=pd.DataFrame({LABEL: y}, index=[f"r{i}" for i in range(X.shape[0])]),
        var=pd.DataFrame(index=names),
    )
    qry = anndata.AnnData(
        X=Xq, obs=pd.DataFrame(index=[f"q{i}" for i in range(Xq.shape[0])]), var=pd.DataFrame(index=names)
    )
    rp, qp = p.work / f"{tag}_ref.h5ad", p.work / f"{tag}_query.h5ad"
    ref.write_h5ad(rp)
    qry.write_h5ad(qp)
    return rp, qp, len(names)


def celltypist_worker(ref: str, query: str, out: str) -> None:
    """Train and apply CellTypist (runs in whatever interpreter executes this script)."""
    import anndata
    import celltypist
    import sklearn

    t0 = time.perf_counter()
    r = anndata.read_h5ad(ref)
    q = anndata.read_h5ad(query)
    model = celltypist.train(r, labels=LABEL, check_expression=False, n_jobs=2)
    pred = celltypist.annotate(q, model=model, majority_voting=False)
    labels = pred.predicted_labels["predicted_labels"].astype(str).tolist()
    Path(out).write_text(
        json.dumps(
            {
                "labels": labels,
                "wall_s": round(time.perf_counter() - t0, 3),
                "sklearn": sklearn.__version__,
                "celltypist": celltypist.__version__,
                "python": sys.executable,
            }
        )
    )


def ingest_worker(ref: str, query: str, out: str) -> None:
    """scanpy PCA + neighbours on the reference, then ``sc.tl.ingest`` (kNN labels) of the query."""
    import anndata
    import scanpy as sc
    import sklearn

    t0 = time.perf_counter()
    r = anndata.read_h5ad(ref)
    q = anndata.read_h5ad(query)
    # scipy sparse *arrays* broke sc.tl.ingest in one test (FACTS.md): dense float32 inputs (small here).
    r.X = np.asarray(r.X.toarray() if hasattr(r.X, "toarray") else r.X, dtype=np.float32)
    q.X = np.asarray(q.X.toarray() if hasattr(q.X, "toarray") else q.X, dtype=np.float32)
    r.obs[LABEL] = r.obs[LABEL].astype("category")
    sc.pp.pca(r, n_comps=min(50, r.n_obs - 1, r.n_vars - 1))
    sc.pp.neighbors(r)
    sc.tl.ingest(q, r, obs=LABEL, embedding_method="pca")  # no UMAP was computed on the reference
    from importlib.metadata import version

    Path(out).write_text(
        json.dumps(
            {
                "labels": q.obs[LABEL].astype(str).tolist(),
                "wall_s": round(time.perf_counter() - t0, 3),
                "sklearn": sklearn.__version__,
                "pynndescent": version("pynndescent"),
                "python": sys.executable,
            }
        )
    )


WORKERS: dict[str, Callable[[str, str, str], None]] = {
    "celltypist": celltypist_worker,
    "scanpy_ingest": ingest_worker,
}


def run_peer(p: Prepared, method: str, python: str | None) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Run a peer in the project's environment; if that fails and ``python`` is given, in that interpreter."""
    t0 = time.perf_counter()
    genes = (
        None if method == "celltypist" else p.hvg
    )  # CellTypist: all genes; ingest: the same HVGs as logreg
    rp, qp, n_genes = _write_lognorm_pair(p, genes, method)
    prep_s = time.perf_counter() - t0
    out = p.work / f"{method}_out.json"
    info: dict[str, Any] = {"n_genes": n_genes}
    try:  # in the project's environment first
        WORKERS[method](str(rp), str(qp), str(out))
        res = json.loads(out.read_text())
        info.update(env="project", wall_s=round(res["wall_s"] + prep_s, 3), sklearn=res["sklearn"])
        return np.asarray(res["labels"], dtype=object), info
    except Exception as exc:
        info["project_env_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        log.warning("%s in the project environment failed: %s", method, info["project_env_error"])
    if not python:
        return None, info
    cmd = [python, str(ENTRY), "--worker", method, str(rp), str(qp), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(p.work))
    if proc.returncode != 0:
        info["other_env_error"] = (
            proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"
        )
        return None, info
    res = json.loads(out.read_text())
    env = f"scikit-learn {res['sklearn']}" + (
        f", pynndescent {res['pynndescent']}" if "pynndescent" in res else ""
    )
    info.update(
        env=env, python=res["python"], wall_s=round(res["wall_s"] + prep_s, 3), sklearn=res["sklearn"]
    )
    return np.asarray(res["labels"], dtype=object), info


PEER_PINS = ("scikit-learn==1.5.2", "pynndescent==0.5.13")


def make_peer_venv(path: Path) -> str:
    """A venv whose own site-packages (scikit-learn 1.5.2, pynndescent 0.5.13) come before the project's
    packages: celltypist 1.7.1 needs scikit-learn < 1.6 and scanpy 1.11's ingest breaks with pynndescent
    0.7."""
    import site
    import sysconfig

    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    project = sysconfig.get_paths()["purelib"] or site.getsitepackages()[0]
    (Path(purelib) / "zz_scatlas_project.pth").write_text(project + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *PEER_PINS], check=True)
    return str(python)
