"""Untrusted .h5ad files that name other files as the source of their contents (external links, external raw
storage, virtual datasets) or declare data they do not store, and SOMA experiments whose members lie elsewhere:
refused before anything is read, by ingest, annotate and the server's upload check alike, with a message that
names no other file's contents."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from scatlas.atlas.errors import InputError
from scatlas.atlas.sources.h5ad import open_h5ad
from scatlas.atlas.sources.hdf5_checks import declared_size
from scatlas.cli import cli
from scatlas.server.uploads import check_h5ad, read_obs
from tests.conftest import make_adata

SECRET = b"root:x:0:0:TOP-SECRET-LINE\n" * 20


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A plain .h5ad and crafted variants of it; ``secret`` is a file none may read."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    other = tmp_path / "other.h5ad"
    make_adata(50, 40, seed=2).write_h5ad(other)
    plain = tmp_path / "plain.h5ad"
    make_adata(50, 40, seed=1).write_h5ad(plain)
    out = {"plain": plain, "secret": secret}

    def variant(name: str, edit) -> None:
        path = tmp_path / f"{name}.h5ad"
        path.write_bytes(plain.read_bytes())
        with h5py.File(path, "r+") as f:
            edit(f)
        out[name] = path

    def external_storage(f: h5py.File) -> None:
        attrs = dict(f["obs/donor_id"].attrs)
        del f["obs/donor_id"]
        d = f["obs"].create_dataset("leak", shape=(50,), dtype="u1", external=[(str(secret), 0, 50)])
        for k, v in attrs.items():
            d.attrs[k] = v

    def external_link(f: h5py.File) -> None:
        del f["obs"]
        f["obs"] = h5py.ExternalLink(str(other), "/obs")

    def virtual(f: h5py.File) -> None:
        layout = h5py.VirtualLayout(shape=(50,), dtype="u1")
        with h5py.File(other, "r") as o:
            source = o["obs/cell_type/codes"]
            layout[:] = h5py.VirtualSource(str(other), source.name, shape=source.shape, dtype=source.dtype)
        f["uns"].create_virtual_dataset("mirror", layout)

    def unwritten(f: h5py.File) -> None:  # 2e9 declared values, none stored
        f["uns"].create_dataset("big", shape=(2_000_000_000,), dtype="u1", chunks=(1 << 20,), fillvalue=7)

    def soft_link(f: h5py.File) -> None:  # inside the file: harmless, accepted
        f["uns"]["alias"] = h5py.SoftLink("/obs")

    for name, edit in [("external_storage", external_storage), ("external_link", external_link),
                       ("virtual", virtual), ("unwritten", unwritten), ("soft_link", soft_link)]:
        variant(name, edit)
    return out


CRAFTED = {
    "external_storage": "a dataset stored in an external file",
    "external_link": "an external link to another file",
    "virtual": "a virtual dataset",
    "unwritten": "declares 2,000,000,000 bytes but the file stores",
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_files_are_refused_by_every_reader(files, kind):
    with pytest.raises(InputError, match=CRAFTED[kind]):
        open_h5ad(files[kind])
    with pytest.raises(InputError, match=CRAFTED[kind]):
        check_h5ad(files[kind], files[kind].stat().st_size, name=f"{kind}.h5ad")


def test_plain_files_and_links_inside_the_file_are_read(files):
    for name in ("plain", "soft_link"):
        source = open_h5ad(files[name])
        assert source.n_obs == 50
        source.close()
        assert check_h5ad(files[name], files[name].stat().st_size, name="x.h5ad") == 50
        assert len(read_obs(files[name])) == 50


@pytest.mark.parametrize("command", ["ingest", "annotate"])
def test_the_cli_refuses_a_file_reading_another_before_writing(files, tmp_path, command, planted_world):
    """``ingest`` stored /etc/passwd's bytes in cells.duckdb through external storage; now: a clean Error."""
    out = tmp_path / "out"
    args = (["ingest", str(files["external_storage"]), "--atlas", str(out)] if command == "ingest" else
            ["annotate", str(files["external_storage"]), "--index", str(planted_world["index"]), "--out",
             str(out / "a.h5ad")])
    result = CliRunner().invoke(cli, ["-q", *args, "--no-progress"])
    assert result.exit_code != 0
    assert result.output.startswith("Error: ") and "a dataset stored in an external file" in result.output
    assert "TOP-SECRET" not in result.output and "Traceback" not in result.output
    assert not any(p.is_file() and b"TOP-SECRET" in p.read_bytes() for p in tmp_path.rglob("*") if p.name !=
                   "secret.txt" and p.is_file())


def test_the_server_refuses_tables_over_its_budget(files, monkeypatch):
    """A compressed file can declare a thousand times its size in obs columns, which are read whole."""
    import scatlas.server.uploads as uploads

    monkeypatch.setattr(uploads, "MAX_TABLE_BYTES", 1000)
    with pytest.raises(InputError, match="obs and var tables hold .* GiB once read"):
        check_h5ad(files["plain"], files["plain"].stat().st_size, name="plain.h5ad")


def test_a_soma_experiment_whose_member_lies_elsewhere_is_refused(tmp_path):
    """The TileDB twin of an external link: an experiment whose obs member names another experiment's obs."""
    import os
    import shutil

    import tiledbsoma
    import tiledbsoma.io

    from scatlas.atlas import ingest

    victim, evil = str(tmp_path / "victim"), str(tmp_path / "evil")
    ad = make_adata(60, 40, seed=3)
    tiledbsoma.io.from_anndata(evil, ad, measurement_name="RNA")
    ad.obs["cell_type"] = ad.obs["cell_type"].astype(str) + " SECRET"
    tiledbsoma.io.from_anndata(victim, ad, measurement_name="RNA")
    with tiledbsoma.Experiment.open(evil, "w") as e:
        del e["obs"]
    with tiledbsoma.Experiment.open(evil, "w") as e, tiledbsoma.DataFrame.open(os.path.abspath(victim + "/obs")) as o:
        e.set("obs", o, use_relative_uri=False)
    shutil.rmtree(evil + "/obs")
    with pytest.raises(InputError, match="its member 'obs' lies outside the experiment"):
        ingest([evil], tmp_path / "atlas", progress=False)
    assert ingest([victim], tmp_path / "atlas2", progress=False).datasets  # a plain experiment is read


def test_a_soma_member_escaping_through_encoded_slashes_is_refused(tmp_path):
    """A member URI read one way by the check and another by TileDB (``%2F`` decoded or not, then ``..``) is
    refused; an experiment under a directory whose name holds ``%`` is still read."""
    import shutil

    import tiledbsoma
    import tiledbsoma.io

    from scatlas.atlas import ingest

    evil, victim = tmp_path / "up" / "exp", tmp_path / "victim" / "exp"
    ad = make_adata(60, 40, seed=3)
    tiledbsoma.io.from_anndata(str(evil), ad, measurement_name="RNA")
    ad.obs["cell_type"] = ad.obs["cell_type"].astype(str) + " SECRET"
    tiledbsoma.io.from_anndata(str(victim), ad, measurement_name="RNA")
    (evil / "a%2Fb%2Fc").mkdir()
    crafted = f"file://{evil}/a%2Fb%2Fc/../../../victim/exp/obs"
    with tiledbsoma.Experiment.open(str(evil), "w") as e:
        del e["obs"]
    with tiledbsoma.Experiment.open(str(evil), "w") as e, tiledbsoma.DataFrame.open(str(victim / "obs")) as o:
        e._set_element("obs", uri=crafted, relative=False, soma_object=o)
    shutil.rmtree(evil / "obs", ignore_errors=True)
    with pytest.raises(InputError, match="its member 'obs' lies outside the experiment"):
        ingest([str(evil)], tmp_path / "atlas", progress=False)

    odd = tmp_path / "pct%41" / "exp"
    odd.parent.mkdir()
    tiledbsoma.io.from_anndata(str(odd), make_adata(60, 40, seed=4), measurement_name="RNA")
    assert ingest([str(odd)], tmp_path / "atlas2", progress=False).datasets


def _declared_cells(path: Path, n: int) -> None:
    """A small compressed file declaring ``n`` cells: a one-byte text index and zero indptr (most of it unwritten
    in a real attack; here written, so that only the counts decide)."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        obs = f.create_group("obs")
        obs.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index",
                          "column-order": np.array([], dtype=h5py.string_dtype())})
        d = obs.create_dataset("_index", data=np.full(n, b"a", dtype="S1"), compression="gzip")
        d.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        var = f.create_group("var")
        var.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index",
                          "column-order": np.array([], dtype=h5py.string_dtype())})
        g = var.create_dataset("_index", data=np.array([f"G{i}" for i in range(10)], dtype=h5py.string_dtype()))
        g.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array([n, 10])})
        X.create_dataset("indptr", data=np.zeros(n + 1, dtype="i8"), compression="gzip")
        X.create_dataset("data", shape=(0,), dtype="f4")
        X.create_dataset("indices", shape=(0,), dtype="i4")


def test_the_server_counts_cells_and_text_before_reading(tmp_path, monkeypatch):
    """A few megabytes can declare 1e8 cells whose one-byte names become 1e8 Python strings (a 1 MB upload took a
    server from 0.5 to 1.6 GB, a 4 MB one to 4.6 GB): the cells are capped, and text counts as strings, before any
    of it is read. Here at a small scale, the caps lowered."""
    import scatlas.server.uploads as uploads

    path = tmp_path / "many.h5ad"
    _declared_cells(path, 5000)
    with h5py.File(path, "r") as f:  # 5,000 one-byte names: 5 kB declared, ~0.3 MB read
        size, rows = declared_size(f["obs"], "x")
        assert size >= 5000 * 50 and rows == 5000
    monkeypatch.setattr(uploads, "MAX_UPLOAD_CELLS", 4999)
    with pytest.raises(InputError, match="holds 5,000 cells, over the 4,999 this server takes in one upload"):
        check_h5ad(path, path.stat().st_size, name="many.h5ad")
    monkeypatch.setattr(uploads, "MAX_UPLOAD_CELLS", 5000)
    monkeypatch.setattr(uploads, "MAX_TABLE_BYTES", 100_000)
    with pytest.raises(InputError, match="obs and var tables hold .* GiB once read"):
        check_h5ad(path, path.stat().st_size, name="many.h5ad")
    monkeypatch.setattr(uploads, "MAX_TABLE_BYTES", 4 * 2**30)
    assert check_h5ad(path, path.stat().st_size, name="many.h5ad") == 5000


def test_a_reader_failure_does_not_repeat_the_file_s_text(files, tmp_path):
    """anndata's messages quote attribute values: a 200 kB column name came back as a 200 kB `Error:` line."""
    path = tmp_path / "longcol.h5ad"
    path.write_bytes(files["plain"].read_bytes())
    with h5py.File(path, "r+") as f:
        f["obs"].attrs["column-order"] = np.array(["Z" * 200_000 + "\nError: injected line"],
                                                  dtype=h5py.string_dtype())
    result = CliRunner().invoke(cli, ["-q", "ingest", str(path), "--atlas", str(tmp_path / "atlas")])
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output[:500]
    assert "ZZZZ" not in result.output and "injected" not in result.output and len(result.output) < 2000
    assert "could not read the AnnData structure (" in result.output


def test_a_soma_member_that_cannot_be_opened_is_an_input_error(tmp_path):
    """A member URI TileDB cannot open (missing, or a form it does not normalise) gave a traceback."""
    import shutil

    import tiledbsoma
    import tiledbsoma.io


    exp = tmp_path / "exp"
    tiledbsoma.io.from_anndata(str(exp), make_adata(60, 40, seed=5), measurement_name="RNA")
    with tiledbsoma.Experiment.open(str(exp), "w") as e:
        del e["obs"]
    with tiledbsoma.Experiment.open(str(exp), "w") as e, tiledbsoma.DataFrame.open(str(exp / "obs")) as o:
        e._set_element("obs", uri=f"file://{exp}/missing_obs", relative=False, soma_object=o)
    shutil.rmtree(exp / "obs", ignore_errors=True)
    result = CliRunner().invoke(cli, ["-q", "ingest", str(exp), "--atlas", str(tmp_path / "atlas")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "a member of the experiment (obs, the measurement, var or X) cannot be opened" in result.output
