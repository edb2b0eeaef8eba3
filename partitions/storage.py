"""Plan directories through pyarrow.fs: local paths or s3://, gs://, hdfs:// URIs.

A plan directory holds ``plan.json``, one shard per stage (:mod:`partitions.artifacts`) and the files the
entrance reads (:mod:`partitions.processing`); each file but ``plan.json`` is checked against the sha256 that
``plan.json`` records. No torch here: the entrance and Ray Data's read tasks read plans without it.
"""

from __future__ import annotations

import hashlib
import os

import pyarrow.fs as pafs

from partitions.errors import ArtifactError
from partitions.plan import PLAN_FILE, Plan


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path behind ``uri``; a plain path is local and may be relative."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ArtifactError(
            f"cannot open {uri!r} ({exc})", "pass a local path or an s3://, gs:// or hdfs:// URI"
        ) from exc


def write_file(uri: str, name: str, data: bytes) -> None:
    """Write ``data`` to ``name`` (a path relative to ``uri``, which may hold folders) in ``uri``."""
    fs, base = resolve(uri)
    path = f"{base}/{name}"
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_file(uri: str, name: str) -> bytes:
    fs, base = resolve(uri)
    try:
        with fs.open_input_stream(f"{base}/{name}") as f:
            return f.readall()
    except (FileNotFoundError, OSError) as exc:
        raise ArtifactError(f"cannot read {name} in {uri!r} ({exc})", "run partserve plan MODEL -o DIR first") from exc


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_plan(uri: str) -> Plan:
    return Plan.from_json(read_file(uri, PLAN_FILE).decode())


def write_plan(uri: str, plan: Plan) -> None:
    write_file(uri, PLAN_FILE, plan.to_json().encode())


def read_checked(uri: str, path: str, expected_sha256: str, what: str = "file") -> bytes:
    """The bytes of ``path`` in the plan at ``uri``, refused unless they match ``expected_sha256``."""
    data = read_file(uri, path)
    digest = sha256(data)
    if digest != expected_sha256:
        raise ArtifactError(
            f"{what} {path} has sha256 {digest[:12]}…, plan.json records {expected_sha256[:12]}…",
            f"the {what} was modified or corrupted; re-run partserve plan",
        )
    return data
