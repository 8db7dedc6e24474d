"""Outputs renamed into place from temporary files get the mode the umask gives a plainly created file (mkstemp's
0o600 would hide a lab's shared index and results from the other users)."""

from __future__ import annotations

import os
import stat

import pytest

from scatlas.atlas.atomic import default_file_mode, write_json_atomic
from scatlas.query.outputs import atomic_path


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_outputs_follow_the_umask(tmp_path, umask):
    assert default_file_mode() == 0o666 & ~umask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    record = write_json_atomic(tmp_path / "record.json", {"a": 1})
    with atomic_path(tmp_path / "out.csv") as tmp:
        tmp.write_text("a,b\n")
    assert _mode(record) == _mode(tmp_path / "out.csv") == _mode(plain) == 0o666 & ~umask
