"""`scatlas serve` over real HTTP: uvicorn on a free port of 127.0.0.1 serving a small synthetic index, every route
exercised with httpx: the token (401s), uploads refused at the door (not an h5ad, too large, unknown label key,
bad or file-reading predicates), annotate / search / hunt jobs and their files, a job that fails with the CLI's
message, the API's annotate against the CLI's, concurrent jobs on the shared index, the queue limit, and the
removal of finished jobs after the retention time."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata
import h5py
import httpx
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scatlas.cli import cli
from scatlas.index import build_index
from tests.conftest import PLANTED

TOKEN = "test-token-7Qm2v9XkLp3sWz8R"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free port of 127.0.0.1; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def world(planted_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The planted world of conftest.py (its index has label heads and a reference map) and ``small``: the first 40
    cells of its query."""
    small = tmp_path_factory.mktemp("server_small") / "small.h5ad"
    anndata.read_h5ad(planted_world["query"])[:40].copy().write_h5ad(small)
    return {**planted_world, "small": small}


@pytest.fixture(scope="module")
def server(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from scatlas.server import create_app

    work = tmp_path_factory.mktemp("serve_work")
    app = create_app(world["index"], token=TOKEN, work_dir=work, workers=2)
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield {"url": url, "client": client, "app": app, "work": work}


def upload(client: httpx.Client, route: str, path: Path | None, data: dict[str, Any] | None = None,
           content: bytes | None = None, name: str | None = None, headers: dict[str, str] | None = None
           ) -> httpx.Response:
    body = content if content is not None else Path(path).read_bytes()  # type: ignore[arg-type]
    return client.post(route, files={"file": (name or (path.name if path else "x.h5ad"), body)}, data=data or {},
                       headers=AUTH if headers is None else headers)


def wait(client: httpx.Client, job: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        state = client.get(f"/api/jobs/{job}", headers=AUTH).json()
        seen.append(state["progress"])
        if state["status"] in ("done", "failed"):
            assert seen == sorted(seen) and all(0 <= p <= 1 for p in seen)  # progress never goes back
            return state
        time.sleep(0.2)
    raise AssertionError(f"job {job} still {state['status']} after {timeout} s")


def submit(client: httpx.Client, route: str, path: Path, data: dict[str, Any] | None = None) -> dict[str, Any]:
    r = upload(client, route, path, data)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/api/jobs/{r.json()['job']}"
    return wait(client, r.json()["job"])


def cli_run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)


def job_dirs(work: Path) -> list[Path]:
    return [p for p in (work / "jobs").iterdir() if p.is_dir()]


# -- access --------------------------------------------------------------------------------------------------------


def test_health_and_the_token(server: dict[str, Any], world: dict[str, Path]) -> None:
    c, work = server["client"], server["work"]
    r = c.get("/api/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    before = len(job_dirs(work))
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        for method, route in (("GET", "/api/index"), ("GET", "/api/overview"), ("GET", "/api/map.png"),
                              ("GET", "/api/jobs/AAAAAAAAAAAAAAAAAAAAAAAA"),
                              ("GET", "/api/jobs/AAAAAAAAAAAAAAAAAAAAAAAA/predictions.csv")):
            r = c.request(method, route, headers=headers)
            assert r.status_code == 401 and "token" in r.json()["error"], (route, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        for route in ("/api/annotate", "/api/search", "/api/hunt"):
            r = upload(c, route, world["small"], headers=headers)
            assert r.status_code == 401, r.text
    assert len(job_dirs(work)) == before  # nothing was stored for a refused request
    info = c.get("/api/index", headers=AUTH)
    assert info.status_code == 200
    cli_info = json.loads(cli_run("info", str(world["index"]), "--json").output)
    assert info.json() == {**cli_info, "path": world["index"].name}  # `scatlas info --json`, the path's name only
    overview = c.get("/api/overview", headers=AUTH).json()
    assert overview["has_map"] and overview["label_column"] == "cell_type"
    assert set(overview["labels_by_dataset"]) == {d["dataset_id"] for d in cli_info["datasets"]}
    png = c.get("/api/map.png", headers=AUTH)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG") and png.headers["content-type"] == "image/png"


def test_page_static_files_and_unknown_routes(server: dict[str, Any]) -> None:
    c = server["client"]
    page = c.get("/")
    assert page.status_code == 200 and 'data-token-required="true"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    for name in ("app.js", "style.css"):
        r = c.get(f"/static/{name}")
        text = r.text.replace('"http://www.w3.org/2000/svg"', "")  # SVG's namespace name, not an address loaded
        assert r.status_code == 200 and "http://" not in text and "https://" not in text
    for route in ("/static/index.html", "/static/..%2Fapp.py", "/docs", "/openapi.json", "/redoc", "/api/nothing"):
        r = c.get(route, headers=AUTH)
        assert r.status_code == 404 and "error" in r.json(), route
    r = c.delete("/api/index", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


# -- jobs ----------------------------------------------------------------------------------------------------------


def test_annotate_job_gives_the_cli_predictions(server: dict[str, Any], world: dict[str, Path],
                                                 tmp_path: Path) -> None:
    c = server["client"]
    state = submit(c, "/api/annotate", world["query"], {"label_key": "cell_type"})
    assert state["status"] == "done" and state["progress"] == 1.0 and state["error"] is None, state
    assert set(state["files"]) == {"predictions.csv", "annotated.h5ad", "report.json", "umap.png"}
    result = state["result"]
    query = anndata.read_h5ad(world["query"])
    assert result["cells"] == query.n_obs and result["map"] is True
    hist = result["labels"]["cell_type"]["confidence_histogram"]
    assert len(hist["counts"]) == 20 and sum(hist["counts"]) == query.n_obs
    base = f"/api/jobs/{state['job']}"
    api = pd.read_csv(io.BytesIO(c.get(f"{base}/predictions.csv", headers=AUTH).content), keep_default_na=False)
    assert api.columns[0] == "cell" and api["cell"].tolist() == query.obs_names.tolist()

    out = tmp_path / "cli.h5ad"
    done = cli_run("annotate", str(world["query"]), "--index", str(world["index"]), "--out", str(out),
                   "--no-progress")
    assert done.exit_code == 0, done.output
    obs = anndata.read_h5ad(out).obs
    compared = [col for col in api.columns[1:]]
    assert {"cell_type_pred", "cell_type_confidence", "cell_type_level"} <= set(compared)
    for col in compared:
        theirs = obs[col]
        if pd.api.types.is_numeric_dtype(theirs) and not pd.api.types.is_bool_dtype(theirs):
            ours = pd.to_numeric(api[col], errors="coerce").to_numpy(dtype=float)
            assert np.allclose(ours, theirs.to_numpy(dtype=float), rtol=1e-5, atol=1e-6, equal_nan=True), col
        else:
            assert api[col].astype(str).tolist() == theirs.astype(str).tolist(), col
    annotated = anndata.read_h5ad(io.BytesIO(c.get(f"{base}/annotated.h5ad", headers=AUTH).content))
    assert "X_atlas_umap" in annotated.obsm and annotated.obs["cell_type_pred"].tolist() == obs["cell_type_pred"].tolist()
    report = c.get(f"{base}/report.json", headers=AUTH).json()
    assert report["labels"]["cell_type"]["counts"] == json.loads(out.with_suffix(".report.json").read_text())["labels"]["cell_type"]["counts"]
    png = c.get(f"{base}/umap.png", headers=AUTH)
    assert png.content.startswith(b"\x89PNG") and "sandbox" in png.headers["content-security-policy"]
    assert not (Path(server["work"]) / "jobs" / state["job"] / "query.h5ad").exists()  # the upload is dropped
    # a file of another kind of job, and names that are no file of this one
    for name in ("hits.csv", "query.h5ad", ".scatlas-job", "..%2F..%2Fstore.json", "%2Fetc%2Fpasswd"):
        assert c.get(f"{base}/{name}", headers=AUTH).status_code == 404, name


def test_search_job(server: dict[str, Any], world: dict[str, Path]) -> None:
    c = server["client"]
    state = submit(c, "/api/search", world["query"], {"k": "5", "mode": "cells", "cells_where": f"cell_type = '{PLANTED}'"})
    assert state["status"] == "done", state
    n_planted = int((anndata.read_h5ad(world["query"], backed="r").obs["cell_type"] == PLANTED).sum())
    assert state["result"]["query"]["cells_used"] == n_planted
    assert state["result"]["hit_labels"][0][0] == PLANTED
    hits = pd.read_csv(io.BytesIO(c.get(f"/api/jobs/{state['job']}/hits.csv", headers=AUTH).content))
    assert len(hits) == 5 * n_planted and {"query_cell", "soma_joinid", "similarity", "cell_type"} <= set(hits.columns)
    enr = pd.read_csv(io.BytesIO(c.get(f"/api/jobs/{state['job']}/enrichment.csv", headers=AUTH).content))
    assert {"column", "group", "qvalue"} <= set(enr.columns)
    state = submit(c, "/api/search", world["query"], {"k": "7", "mode": "centroid", "where": "dataset_id = 'synth-000'"})
    hits = pd.read_csv(io.BytesIO(c.get(f"/api/jobs/{state['job']}/hits.csv", headers=AUTH).content))
    assert len(hits) == 7 and set(hits["dataset_id"]) == {"synth-000"}


def test_hunt_job(server: dict[str, Any], world: dict[str, Path]) -> None:
    c = server["client"]
    state = submit(c, "/api/hunt", world["query"], {"positive": f"cell_type = '{PLANTED}'", "background": "1000",
                                                    "where": "dataset_id = 'synth-000'"})
    assert state["status"] == "done", state
    result = state["result"]
    assert result["classifier"]["positives"] > 20 and 0 < result["hits"] <= result["sweep"]["hits"]
    assert result["sweep"]["stages"].startswith(("stage 1 only", "two stages"))
    assert result["sweep"]["training_positive_hits"] == 0  # the query is held out of the atlas: none of its cells
    hits = pd.read_csv(io.BytesIO(c.get(f"/api/jobs/{state['job']}/hits.csv", headers=AUTH).content))
    assert len(hits) == result["hits"] and set(hits["dataset_id"]) == {"synth-000"}
    assert (hits["cell_type"] == PLANTED).mean() > 0.8
    page = c.get(f"/api/jobs/{state['job']}/report.html", headers=AUTH)
    assert page.headers["content-type"].startswith("text/html") and "sandbox" in page.headers["content-security-policy"]
    assert "<h1>Rare-cell hunt report</h1>" in page.text and 'src="data:image/png;base64,' in page.text
    assert "from the sweep of this job, among the atlas cells where dataset_id = " in page.text
    # the group sizes are those of the filtered atlas: one dataset holds every hit, as many as it has cells of it
    by_dataset = {g["group"]: g for g in result["by"].get("dataset_id", [])}
    assert set(by_dataset) == {"synth-000"} and by_dataset["synth-000"]["qvalue"] == 1.0
    assert "http" not in page.text.split("<body>", 1)[1].replace("http-equiv", "")
    assert c.get(f"/api/jobs/{state['job']}/enrichment.png", headers=AUTH).content.startswith(b"\x89PNG")
    assert c.get(f"/api/jobs/{state['job']}/scores.png", headers=AUTH).content.startswith(b"\x89PNG")


def test_a_job_that_fails_says_what_the_cli_says(server: dict[str, Any], world: dict[str, Path],
                                                  tmp_path: Path) -> None:
    c = server["client"]
    q = anndata.read_h5ad(world["small"])
    q.var_names = [f"ENSG9{i:010d}" for i in range(q.n_vars)]  # no gene of the atlas
    q.var = q.var.drop(columns=[c for c in q.var.columns], errors="ignore")
    path = tmp_path / "nogenes.h5ad"
    q.write_h5ad(path)
    state = submit(c, "/api/annotate", path)
    assert state["status"] == "failed" and state["result"] is None and state["files"] == []
    done = CliRunner().invoke(cli, ["annotate", str(path), "--index", str(world["index"]), "--out",
                                    str(tmp_path / "o.h5ad"), "--no-progress"])
    assert done.exit_code == 1
    cli_error = done.output.strip().splitlines()[-1].removeprefix("Error: ")
    assert state["error"] == cli_error.replace(str(path), "nogenes.h5ad"), (state["error"], cli_error)
    assert "Traceback" not in state["error"] and str(server["work"]) not in state["error"]
    r = c.get(f"/api/jobs/{state['job']}/predictions.csv", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"] == f"the job failed, so it has no files: {state['error']}"


def test_job_messages_and_reports_speak_of_the_upload_and_the_api(server: dict[str, Any], world: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    from scatlas.server.jobs import Job, JobManager, server_paths

    c = server["client"]
    state = submit(c, "/api/annotate", world["small"])
    report = c.get(f"/api/jobs/{state['job']}/report.json", headers=AUTH).json()
    assert report["query"]["source"] == "small.h5ad"
    assert report["index"]["path"] == world["index"].name  # the name, not the server's path
    state = submit(c, "/api/search", world["small"], {"k": "5"})
    report = c.get(f"/api/jobs/{state['job']}/report.json", headers=AUTH).json()
    assert report["query"]["source"] == "small.h5ad"
    assert str(world["index"]) not in json.dumps(report)
    # what the CLI prints as WARNING lines reaches the client: one label under where= is confident by construction
    from scatlas.index import AtlasIndex

    with AtlasIndex.open(world["index"]) as idx, idx.cursor() as con:
        label = con.execute("SELECT cell_type FROM cells WHERE cell_type IS NOT NULL LIMIT 1").fetchone()[0]
    state = submit(c, "/api/annotate", world["small"], {"where": f"cell_type = '{label}'"})
    assert state["status"] == "done", state
    assert any("confidence 1 by construction" in w for w in state["result"]["warnings"]), state["result"]
    empty = tmp_path / "nocells.h5ad"
    anndata.read_h5ad(world["small"])[:0].copy().write_h5ad(empty)
    state = submit(c, "/api/annotate", empty)
    assert state["status"] == "failed" and "the query 'nocells.h5ad' has no cells" in state["error"], state
    job = Job("x" * 24, "annotate", tmp_path / "job", upload_name="q.h5ad")
    from scatlas.query.search import no_expression_error

    for hint in ("pass --allow-species-mismatch (allow_species_mismatch=True in Python) to go on anyway",
                 "or lower the threshold with --min-gene-overlap.", "(choose another with --x-layer)",
                 str(no_expression_error(3)).split("wrong matrix read ", 1)[1].split(", or the genes")[0]):
        text = JobManager(tmp_path / "jm").public_text(job, f"the query is wrong: {hint}")
        assert hint not in text and "this server" in text and "scatlas command" in text, text
    manager = JobManager(tmp_path / "jm2", hidden_paths=server_paths(tmp_path / "idx" / "versions" / "0002",
                                                                     tmp_path / "store"))
    text = manager.public_text(job, f"the atlas store {tmp_path / 'store'} is not reachable from "
                                    f"{tmp_path / 'idx' / 'versions' / '0002'} ({tmp_path / 'idx'})")
    assert str(tmp_path) not in text and text == "the atlas store store is not reachable from 0002 (idx)", text
    # only where a path stands as one: not inside another path or a URL; HTML-escaped forms too
    from scatlas.server.jobs import hide_paths

    assert hide_paths("see /X/data and https://x.org/data/help", {"/data": "data"}) == \
        "see /X/data and https://x.org/data/help"
    assert hide_paths("at /srv/o&#x27;brien/idx.", {"/srv/o'brien/idx": "idx"}) == "at idx."
    manager.shutdown()


def test_jobs_run_at_once_on_the_shared_index(server: dict[str, Any], world: dict[str, Path]) -> None:
    """Three annotate jobs and a search at once (two worker threads, one index): all give the same answers."""
    c = server["client"]
    ids: list[str] = []
    threads = [threading.Thread(target=lambda route: ids.append(upload(c, route, world["query"]).json()["job"]),
                                args=(route,))
               for route in ("/api/annotate", "/api/annotate", "/api/search", "/api/annotate")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    states = [wait(c, job) for job in ids]
    assert all(s["status"] == "done" for s in states), [s["error"] for s in states]
    tables = [c.get(f"/api/jobs/{s['job']}/predictions.csv", headers=AUTH).content for s in states
              if s["kind"] == "annotate"]
    assert len(tables) == 3 and tables[0] == tables[1] == tables[2]


# -- refused at the door -------------------------------------------------------------------------------------------


def _hdf5_not_anndata(path: Path) -> bytes:
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(10)
    return path.read_bytes()


def test_bad_uploads_are_refused_before_a_job(server: dict[str, Any], world: dict[str, Path], tmp_path: Path) -> None:
    c, work = server["client"], server["work"]
    before = len(job_dirs(work))
    q = world["small"]
    cases = [
        ("/api/annotate", dict(content=b"cell,gene\n1,2\n", name="q.csv"), "not an .h5ad"),
        ("/api/annotate", dict(content=_hdf5_not_anndata(tmp_path / "x.h5"), name="x.h5ad"), "not an AnnData"),
        ("/api/annotate", dict(content=b"", name="empty.h5ad"), "'empty.h5ad' is empty"),
        ("/api/annotate", dict(data={"label_key": "favourite_colour"}), "unknown label key"),
        ("/api/annotate", dict(data={"label_key": ["cell_type", "no_such"]}), "unknown label key"),
        ("/api/annotate", dict(data={"min_confidence": "2"}), "min_confidence"),
        ("/api/annotate", dict(data={"min_confidence": "high"}), "min_confidence"),
        ("/api/annotate", dict(data={"colour": "blue"}), "unknown form field"),
        ("/api/annotate", dict(data={"where": "cell_typo = 'B cell'"}), "unknown column"),
        ("/api/annotate", dict(data={"where": "cell_type = 'no such type'"}), "matches no cell"),
        ("/api/search", dict(data={"mode": "sideways"}), "mode"),
        ("/api/search", dict(data={"k": "0"}), "k must be"),
        ("/api/search", dict(data={"cells_where": "cell_type = 'no such type'"}), "matches none"),
        ("/api/hunt", dict(data={}), "positive predicate"),
        ("/api/hunt", dict(data={"positive": "cell_type = 'no such type'"}), "at least 3"),
        ("/api/hunt", dict(data={"positive": "cell_type = ", "background": "10"}), "positive predicate"),
    ]
    for route, kwargs, words in cases:
        r = upload(c, route, q, **kwargs)  # type: ignore[arg-type]
        assert r.status_code == 400, (route, kwargs, r.text)
        assert words in r.json()["error"], (words, r.json())
        assert "Traceback" not in r.text and str(work) not in r.text
    r = c.post("/api/annotate", content=b"file=x", headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]
    r = c.post("/api/annotate", content=b"--xx\r\nbroken", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 400
    r = c.post("/api/annotate", files={"other": ("q.h5ad", q.read_bytes())}, headers=AUTH)
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    assert len(job_dirs(work)) == before  # refused uploads leave nothing behind


FILE_READS = [
    "read_csv('/etc/passwd') IS NOT NULL",
    "cell_type IN (SELECT column0 FROM read_csv('/etc/passwd'))",
    "length(read_text('/etc/passwd')) > 0",
    "cell_type = 'x'; COPY cells TO '{out}'",
    "cell_type = 'x') UNION ALL (SELECT 1",
    "1 = 1; ATTACH '{db}' AS other",
    "1 = 1; INSTALL httpfs",
    "1 = 1; LOAD httpfs",
    "EXISTS (SELECT * FROM glob('/etc/*'))",
    "cell_type = getenv('HOME')",
]


def test_predicates_cannot_read_files_or_run_statements(server: dict[str, Any], world: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """Through every predicate of every route: refused with a 400, before any job, and nothing written."""
    c, work = server["client"], server["work"]
    before = len(job_dirs(work))
    out, db = tmp_path / "leak.csv", tmp_path / "other.duckdb"
    for template in FILE_READS:
        text = template.format(out=out, db=db)
        for route, data in (("/api/annotate", {"where": text}), ("/api/search", {"where": text}),
                            ("/api/search", {"cells_where": text}), ("/api/hunt", {"positive": text}),
                            ("/api/hunt", {"positive": f"cell_type = '{PLANTED}'", "where": text})):
            r = upload(c, route, world["small"], data)
            assert r.status_code == 400, (route, data, r.text)
            assert "root:" not in r.text and "Traceback" not in r.text
    assert not out.exists() and not db.exists()
    assert len(job_dirs(work)) == before


# -- limits, retention, a server without a token -------------------------------------------------------------------


def test_upload_cap_queue_limit_retention_and_local_only(world: dict[str, Path], tmp_path: Path) -> None:
    from scatlas.server import create_app

    work = tmp_path / "work"
    app = create_app(world["index"], work_dir=work, max_upload_mb=0.5, workers=1, retention_s=1.0,
                     cleanup_every_s=0.2, max_pending=3)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        big = b"\x89HDF\r\n\x1a\n" + bytes(700_000)
        r = upload(c, "/api/annotate", None, content=big, name="big.h5ad", headers={})
        assert r.status_code == 413 and "0.5 MiB" in r.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap is met while streaming
            boundary = b"BOUNDARY"
            yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.h5ad"\r\n\r\n'
            for _ in range(12):
                yield bytes(64 * 1024)
            yield b"\r\n--" + boundary + b"--\r\n"

        r = c.post("/api/annotate", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=BOUNDARY"})
        assert r.status_code == 413, r.text
        assert job_dirs(work) == []

        jobs = app.state.scatlas.jobs
        held = [jobs.new_job("annotate") for _ in range(3)]  # three uploads in progress fill the queue
        r = upload(c, "/api/annotate", world["small"], headers={})
        assert r.status_code == 503 and r.headers["retry-after"] == "60"
        for job in held:
            jobs.discard(job)

        state = submit(c, "/api/annotate", world["small"])  # no token on this server: no header needed
        assert state["status"] == "done"
        job_dir = work / "jobs" / state["job"]
        assert job_dir.is_dir()
        deadline = time.monotonic() + 20
        while job_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not job_dir.exists()
        assert c.get(f"/api/jobs/{state['job']}").status_code == 404

        # without a token only a loopback host name is answered, and only same-origin API calls
        assert c.get("/api/index", headers={"Host": "attacker.example"}).status_code == 421
        assert c.get("/api/index", headers={"Host": "localhost"}).status_code == 200
        assert c.get("/api/index", headers={"Origin": "http://attacker.example"}).status_code == 403
        assert c.get("/api/index", headers={"Origin": url}).status_code == 200
    assert not (work / "jobs").exists() or job_dirs(work) == []


def test_work_dir_and_bind_rules(world: dict[str, Path], tmp_path: Path) -> None:
    from scatlas.atlas.errors import InputError
    from scatlas.server import check_bind, create_app

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="did not write"):
        create_app(world["index"], work_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    # a work directory a running server holds is refused to a second one (which would delete its jobs' files)
    first = create_app(world["index"], work_dir=tmp_path / "work")
    (tmp_path / "work" / "jobs" / "j1").mkdir()
    (tmp_path / "work" / "jobs" / "j1" / ".scatlas-job").write_text("")
    with pytest.raises(InputError, match="in use by another running server"):
        create_app(world["index"], work_dir=tmp_path / "work")
    assert (tmp_path / "work" / "jobs" / "j1").is_dir()
    first.state.scatlas.close()
    create_app(world["index"], work_dir=tmp_path / "work").state.scatlas.close()  # free again once it stopped
    with pytest.raises(InputError, match="lies inside a scatlas index"):  # its jobs would sit in the index
        create_app(world["index"], work_dir=world["index"] / "jobs")
    assert not (world["index"] / "jobs").exists()
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(InputError, match="127.0.0.1 only"):
            check_bind(host, None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(InputError, match="at least 16"):
        check_bind("0.0.0.0", "short")
    r = CliRunner().invoke(cli, ["serve", "--index", str(world["index"]), "--host", "0.0.0.0"], env={"SCATLAS_TOKEN": ""})
    assert r.exit_code == 1 and "Error: without a token the server listens on 127.0.0.1 only" in r.output
    r = CliRunner().invoke(cli, ["serve", "--index", str(tmp_path / "nothing"), "--port", str(free_port())],
                           env={"SCATLAS_TOKEN": ""})
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "Traceback" not in r.output
    with socket.socket() as busy:  # a port in use: said before the banner, before the index is loaded
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = CliRunner().invoke(cli, ["serve", "--index", str(world["index"]), "--port", str(port)],
                               env={"SCATLAS_TOKEN": ""})
    assert r.exit_code == 1, r.output
    assert r.output == f"Error: port {port} on 127.0.0.1 is in use; choose another with --port\n"


def test_an_index_without_map_or_heads(world: dict[str, Path], tmp_path: Path) -> None:
    """Served as well: no atlas map (404 saying why), annotate by the neighbour vote, no umap.png."""
    from scatlas.server import create_app

    build_index(world["root"] / "atlas", tmp_path / "index", embedder_options={"n_hvg": 250, "n_components": 20},
                label_keys=(), reference_map=False, progress=False)
    app = create_app(tmp_path / "index", token=TOKEN, work_dir=tmp_path / "work", workers=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/api/overview", headers=AUTH).json()["has_map"] is False
        r = c.get("/api/map.png", headers=AUTH)
        assert r.status_code == 404 and "no reference map" in r.json()["error"]
        state = submit(c, "/api/annotate", world["small"])
        assert state["status"] == "done" and state["result"]["map"] is False, state
        assert "umap.png" not in state["files"] and state["result"]["labels"]["cell_type"]["predicted_by"] == "knn"
        r = c.get(f"/api/jobs/{state['job']}/umap.png", headers=AUTH)
        assert r.status_code == 404 and "no reference map" in r.json()["error"]


def test_a_hunt_without_the_atlas_store_names_no_server_path(world: dict[str, Path], tmp_path: Path) -> None:
    """docs/server.md: clients are not told the server's paths, the atlas store's included (a server given an index
    whose store is not reachable: the hunt's gene comparison is skipped, saying why, without the path)."""
    from scatlas.server import create_app

    atlas = tmp_path / "private" / "atlas"
    shutil.copytree(world["root"] / "atlas", atlas)
    build_index(atlas, tmp_path / "index", embedder_options={"n_hvg": 250, "n_components": 20}, label_keys=(),
                reference_map=False, progress=False)
    shutil.rmtree(atlas)
    app = create_app(tmp_path / "index", token=TOKEN, work_dir=tmp_path / "work", workers=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        state = submit(c, "/api/hunt", world["query"], {"positive": f"cell_type = '{PLANTED}'", "background": "1000"})
        assert state["status"] == "done" and state["result"]["de_skipped"], state
        texts = [json.dumps(state), c.get(f"/api/jobs/{state['job']}/report.html", headers=AUTH).text,
                 c.get(f"/api/jobs/{state['job']}/report.json", headers=AUTH).text]
        assert not [t for t in texts if str(tmp_path) in t], [t[:2000] for t in texts if str(tmp_path) in t]


def test_internal_errors_answer_500_without_a_traceback(server: dict[str, Any], world: dict[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import scatlas.server.app as app_module

    c, state = server["client"], server["app"].state.scatlas
    monkeypatch.setattr(state.shared, "overview", {"broken": object()})  # not JSON: the route itself fails
    r = c.get("/api/overview", headers=AUTH)
    assert r.status_code == 500 and r.json() == {"error": "internal server error (the server's log has the details)"}

    def crash(*args: Any) -> dict[str, Any]:
        raise ZeroDivisionError("secret internals")

    monkeypatch.setattr(app_module, "run_annotate", crash)  # a job that fails by a bug, not by its input
    state_ = submit(c, "/api/annotate", world["small"])
    assert state_["status"] == "failed" and "internal error" in state_["error"] and "secret" not in state_["error"]


def test_the_job_modules_are_loaded_before_any_job_runs(world: dict[str, Path], tmp_path: Path) -> None:
    """An annotate and a hunt submitted together right after start imported the same packages from two threads and
    both failed (a half-initialised module); the app now loads them when it is made: in a fresh process, all are
    loaded once create_app returns."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = (
        "import sys\n"
        "from scatlas.server.app import JOB_MODULES, create_app\n"
        "before = [m for m in JOB_MODULES if m in sys.modules]\n"
        "app = create_app(sys.argv[1], work_dir=sys.argv[2])\n"
        "after = [m for m in JOB_MODULES if m not in sys.modules]\n"
        "app.state.scatlas.close()\n"
        "print('before', before, 'missing after', after)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(world["index"]), str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "missing after []" in done.stdout, done.stdout


def test_an_update_on_disk_after_the_start_is_said(world: dict[str, Path], tmp_path: Path) -> None:
    """The server keeps serving the version it opened; once `build --update` commits a newer one, the index summary
    and the page's warnings say so and that a restart serves it."""
    import json
    import shutil

    from scatlas.server import create_app

    index = tmp_path / "index"
    shutil.copytree(world["index"], index)
    app = create_app(index, token=TOKEN, work_dir=tmp_path / "work", workers=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert "newer_on_disk" not in c.get("/api/index", headers=AUTH).json()
        manifest = json.loads((index / "manifest.json").read_text())
        (index / "versions" / "0002").mkdir(parents=True)  # as an update commits version 2
        (index / "versions" / "0002" / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
        (index / "current.json").write_text(json.dumps({"version": 2, "dir": "versions/0002"}))
        note = c.get("/api/index", headers=AUTH).json()["newer_on_disk"]
        assert "version 2" in note and "serves version 1" in note and "restart" in note
        assert note in c.get("/api/overview", headers=AUTH).json()["warnings"]
        # build --overwrite: version 1 again, another build (the server compared version numbers only)
        (index / "current.json").unlink()
        (index / "manifest.json").write_text(json.dumps({**manifest, "created_again": True}))  # another build id
        note = c.get("/api/index", headers=AUTH).json()["newer_on_disk"]
        assert "rebuilt after the server started" in note and "restart" in note
        assert c.get("/api/index", headers=AUTH).json()["path"] == "index"  # the name, not the server's path


def test_a_search_of_too_many_hit_rows_is_refused(server: dict[str, Any], world: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Uploaded cells x k bounds the hits held in memory and written; the upload cap does not."""
    import scatlas.server.app as app_module

    monkeypatch.setattr(app_module, "MAX_HIT_ROWS", 100)
    r = upload(server["client"], "/api/search", world["small"], {"k": "5"})  # 40 cells x 5 = 200 rows
    assert r.status_code == 400 and "40 cells x k=5 would make 200 hit rows, over the 100" in r.json()["error"]
    r = upload(server["client"], "/api/search", world["small"], {"k": "2"})
    assert r.status_code == 202, r.text
    wait(server["client"], r.json()["job"])


def test_queued_jobs_dropped_at_shutdown_leave_no_upload(tmp_path: Path) -> None:
    """docs/server.md: an upload is deleted when its job ends; a job that never ran ends at shutdown."""
    from scatlas.server.jobs import JobManager

    manager = JobManager(tmp_path / "work", workers=1)
    (tmp_path / "work" / "jobs").mkdir(parents=True, exist_ok=True)
    started, release = threading.Event(), threading.Event()

    def blocking(job: Any) -> dict[str, Any]:
        started.set()
        release.wait(30)
        return {}

    running, queued = manager.new_job("annotate"), manager.new_job("annotate")
    (queued.directory / "query.h5ad").write_bytes(b"upload")
    manager.submit(running, blocking)
    manager.submit(queued, lambda job: {})
    assert started.wait(30)
    threading.Timer(0.5, release.set).start()
    manager.shutdown()
    assert running.status == "done" and not queued.directory.exists()


def test_cancel_drops_a_queued_job_stops_a_running_one_and_deletes_a_finished_one(tmp_path: Path) -> None:
    """docs/server.md, "Jobs": DELETE /api/jobs/ID; a running job stops at its next progress step."""
    from scatlas.index.progress import progress_bar
    from scatlas.server.jobs import JobManager

    manager = JobManager(tmp_path / "work", workers=1)
    (tmp_path / "work" / "jobs").mkdir(parents=True, exist_ok=True)
    started, steps = threading.Event(), []

    def stepping(job: Any) -> dict[str, Any]:  # the library's loops: a progress bar step per chunk
        job.stage("annotate", 0.02, 0.9, 10.0)
        with progress_bar(False, total=10_000) as bar:
            for _ in range(10_000):
                started.set()
                steps.append(1)
                time.sleep(0.01)
                bar.update(1)
        return {"finished": True}

    running, queued = manager.new_job("annotate"), manager.new_job("annotate")
    (running.directory / "out.csv").write_text("partial")
    manager.submit(running, stepping)
    manager.submit(queued, lambda job: {"ran": True})
    assert started.wait(30)
    assert manager.cancel(queued) == "cancelled"
    assert queued.status == "cancelled" and not queued.directory.exists() and queued.to_json()["files"] == []
    assert manager.cancel(running) == "cancelling"
    state = running.to_json()  # the job may have reached its next step already
    assert state["stage"] == "cancelling" or state["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while running.status == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.status == "cancelled" and running.result is None and running.error is None
    assert not running.directory.exists() and len(steps) < 10_000
    assert queued.result is None  # the dropped job never ran
    assert manager.counts()["cancelled"] == 2
    assert manager.cancel(queued) == "deleted" and manager.get(queued.id) is None  # a cancelled job, deleted

    finished = manager.new_job("search")
    manager.submit(finished, lambda job: {})
    deadline = time.monotonic() + 30
    while finished.status != "done" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.cancel(finished) == "deleted"
    assert manager.get(finished.id) is None and not finished.directory.exists()
    manager.shutdown()


def test_delete_over_http(server: dict[str, Any], world: dict[str, Path]) -> None:
    client = server["client"]
    state = submit(client, "/api/search", world["small"], {"k": "3"})
    assert state["status"] == "done"
    assert client.delete(f"/api/jobs/{state['job']}").status_code == 401  # the token is needed
    r = client.delete(f"/api/jobs/{state['job']}", headers={**AUTH, "Origin": "http://evil.example"})
    assert r.status_code == 403  # another site's page may not delete a lab's job
    assert client.get(f"/api/jobs/{state['job']}", headers=AUTH).json()["status"] == "done"
    r = client.delete(f"/api/jobs/{state['job']}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"job": state["job"], "status": "deleted"}
    assert client.get(f"/api/jobs/{state['job']}", headers=AUTH).status_code == 404
    assert client.get(f"/api/jobs/{state['job']}/hits.csv", headers=AUTH).status_code == 404
    assert not any(p.name == state["job"] for p in job_dirs(server["work"]))
    assert client.delete(f"/api/jobs/{state['job']}", headers=AUTH).status_code == 404
