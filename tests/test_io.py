import os

import pytest

from mustat._io import atomic_write, write_json


def test_atomic_write_replaces_and_respects_umask(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_json(target, {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "r.csv"
    target.write_text("old")

    def boom(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]
