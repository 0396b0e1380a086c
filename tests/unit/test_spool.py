"""The MLflow spool keeps every acknowledged call, also after a process was killed mid-append."""

from gnr.spool import Spool, compact


def test_an_append_after_a_torn_line_is_kept_and_only_the_torn_line_is_skipped(tmp_path):
    spool = Spool(tmp_path / "mlflow-spool.jsonl")
    spool.append({"op": "tags", "tags": {"a": "1"}})
    with open(spool.path, "a") as f:  # killed mid-append: half a line, no newline
        f.write('{"op": "metrics", "metr')
    spool.append({"op": "tags", "tags": {"b": "2"}})
    assert spool.read() == [{"op": "tags", "tags": {"a": "1"}}, {"op": "tags", "tags": {"b": "2"}}]
    spool.replace(spool.read()[1:])
    assert len(spool) == 1
    spool.replace([])
    assert not spool.path.exists() and spool.read() == []


def test_compact_sends_a_repeated_artifact_once_at_its_last_place():
    ops = [{"op": "artifact", "path": "last.pt"}, {"op": "tags", "tags": {}}, {"op": "artifact", "path": "last.pt"}]
    assert compact(ops) == ops[1:]
