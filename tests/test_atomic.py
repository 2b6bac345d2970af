"""nanoseek.atomic.write_atomic: the whole new file or the old one, and no temporary left behind."""

import pytest

from nanoseek.atomic import write_atomic


def test_writes_text_and_bytes_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "run.json"
    assert write_atomic(p, "héllo\n") == p and p.read_text(encoding="utf-8") == "héllo\n"
    write_atomic(p, b"\x89PNG")
    assert p.read_bytes() == b"\x89PNG"
    assert [q.name for q in tmp_path.iterdir()] == ["run.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "eval.json"
    p.write_text("old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("nanoseek.atomic.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(p, "new")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["eval.json"]      # the temporary was removed
