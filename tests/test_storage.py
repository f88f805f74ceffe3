"""The pieces of the shared-storage check (orchestrator/storage.py), on real files.

The check itself, on a real two-node cluster with a folder only one node sees, is in
tests/test_multinode.py.
"""

from __future__ import annotations

import pytest

from orchestrator import launch, storage
from orchestrator.errors import UserError


@pytest.mark.parametrize(
    ("path", "remote"),
    [
        ("s3://bucket/ray", True),
        ("gs://bucket/ray", True),
        ("abfs://container@account.dfs.core.windows.net/ray", True),
        ("hdfs://namenode:8020/ray", True),
        ("file:///mnt/shared/ray", False),
        ("/mnt/shared/ray", False),
        ("outputs/ray", False),
        ("/data/odd://name", False),  # a path that merely contains '://'
    ],
)
def test_only_object_store_uris_skip_the_check(path, remote):
    assert storage.is_remote_uri(path) is remote


def test_marker_is_seen_with_its_token_only(tmp_path):
    marker, token = storage.write_marker(str(tmp_path / "ckpt"))
    assert marker.parent == tmp_path / "ckpt" / storage.MARKER_DIR
    assert storage.sees_marker(str(marker), token)
    assert not storage.sees_marker(str(marker), "another token")  # a stale marker is no proof
    marker.unlink()
    assert not storage.sees_marker(str(marker), token)  # missing: False, never an exception


def test_file_uri_writes_to_the_path(tmp_path):
    marker, _ = storage.write_marker(f"file://{tmp_path}")
    assert marker.is_relative_to(tmp_path)


def test_unwritable_storage_names_the_key(tmp_path):
    (tmp_path / "a-file").write_text("")  # a folder cannot be made under a file, even by root
    with pytest.raises(UserError) as info:
        storage.write_marker(str(tmp_path / "a-file" / "ckpt"))
    assert info.value.key == "cluster.storage_path"
    assert "s3://" in info.value.fix


def test_error_names_the_blind_nodes_and_the_fixes():
    error = storage.not_shared_error("/local/ray", ["10.0.0.7", "10.0.0.9"], 3)
    line = error.one_line()
    assert line.startswith("cluster.storage_path: '/local/ray' is node-local: 2 of")
    assert "10.0.0.7, 10.0.0.9" in line and "s3://" in line and "shared storage" in line


def test_object_store_uri_needs_no_cluster():
    # Returns before asking Ray anything: no Ray is running in this process.
    launch.check_storage_shared("s3://bucket/ray")
