"""Plan directories through pyarrow.fs: local paths or s3://, gs://, hdfs:// URIs.

A plan directory holds ``plan.json`` and one shard per stage. Shards never execute code when loaded: an
exported program (``torch.export`` archive: a JSON graph plus raw tensors) or, for stages that do not
export, the stage's weights in safetensors.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pyarrow.fs as pafs
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from partitions.errors import ArtifactError
from partitions.plan import PLAN_FILE, Artifact, Plan

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
EXPORTED = "exported-program"
MODULE_WEIGHTS = "module-weights"


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


def encode_stage(
    gm: nn.Module, example: Sequence[torch.Tensor], children: list[str] | None
) -> tuple[bytes, str, torch.export.ExportedProgram | None]:
    """Serialise a stage: an exported program with a dynamic batch (returned too, for the engines to convert),
    else the weights of ``children``."""
    batch = torch.export.Dim("batch")
    try:
        ep = torch.export.export(gm, tuple(example), dynamic_shapes=tuple({0: batch} for _ in example))
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        return buf.getvalue(), EXPORTED, ep
    except Exception:
        if children is None:
            raise
    state = {k: v.detach().contiguous() for k, v in gm.state_dict().items()}
    return save_safetensors(state), MODULE_WEIGHTS, None


def read_shard(uri: str, artifact: Artifact) -> bytes:
    """The shard's bytes, refused unless they match the hash recorded in plan.json."""
    return read_checked(uri, artifact.path, artifact.sha256, "shard")


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


@contextmanager
def _weights_only() -> Iterator[None]:
    """Forbid torch.load's fallback to full unpickling (torch.export.load tries it when the safe load fails),
    so a shard runs no code even if plan.json was rewritten along with it."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[FORCE_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def decode_stage(data: bytes, artifact: Artifact, rebuild_children) -> nn.Module:
    """A module that runs the stage; ``rebuild_children()`` returns the stage's modules on the meta device."""
    if artifact.format == EXPORTED:
        with _weights_only():
            return torch.export.load(io.BytesIO(data)).module()
    if artifact.format == MODULE_WEIGHTS:
        stage = nn.Sequential()
        for name, child in zip(artifact.children, rebuild_children()):
            stage.add_module(name, child)
        stage = stage.to_empty(device="cpu")
        stage.load_state_dict(load_safetensors(data), strict=True)
        return stage
    raise ArtifactError(f"unknown shard format {artifact.format!r}", "re-run partserve plan with this version")
