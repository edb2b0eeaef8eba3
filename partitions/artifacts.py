"""Stage shards: one file per stage in the plan directory (:mod:`partitions.storage`), checked against plan.json.

Shards never execute code when loaded: an exported program (``torch.export`` archive: a JSON graph plus raw
tensors) or, for stages that do not export, the stage's weights in safetensors.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from partitions.errors import ArtifactError
from partitions.plan import Artifact
from partitions.storage import read_checked

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
EXPORTED = "exported-program"
MODULE_WEIGHTS = "module-weights"


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
