"""The one atomic-write helper: all or nothing, and no temp file after any failure."""

import pytest

from gnr import atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = atomic.write_text(tmp_path / "state.json", "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_remove_stale_removes_only_temp_files(tmp_path):
    keep = [tmp_path / "step-000000002.pt", tmp_path / "mlflow-spool.jsonl", tmp_path / ".hidden.tmp"]
    stale = [tmp_path / "step-000000003.pt.tmp", atomic.temp_path(tmp_path / "step-000000004.pt")]
    for p in keep + stale:
        p.write_bytes(b"x")
    assert sorted(atomic.remove_stale(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(keep)
