"""The compressed-model directory: loads without executing code, like any other MODEL spec.

Layout::

    DIR/compressed.json      manifest: format, source model, input names, what was done
    DIR/model.pt2            torch.export archive (JSON graph + raw tensors), batch dimension dynamic
    DIR/inputs.safetensors   example inputs (batch dimension 0)
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from partitions.errors import ModelError
from partitions.source import forward_args, takes_keywords

MANIFEST = "compressed.json"
PROGRAM = "model.pt2"
INPUTS = "inputs.safetensors"
FORMAT = "partserve-compressed/1"


def save_compressed(path: str, model: nn.Module, example: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Export ``model`` on ``example`` (inputs in ``forward``'s order) with a dynamic batch and write ``path``."""
    from partitions.compress.quantize import exportable

    example = {k: v.detach().cpu().contiguous() for k, v in example.items()}
    if next(iter(example.values())).shape[0] < 2:
        example = {k: torch.cat([v, v]) for k, v in example.items()}  # batch 1 would be specialised by export
    batch = torch.export.Dim("batch")
    model = exportable(model).cpu()
    params = inspect.signature(model.forward).parameters
    by_keyword = takes_keywords(model, example)
    args, kwargs = forward_args(example, by_keyword)
    dynamic: Any = {k: {0: batch} for k in kwargs} if by_keyword else tuple({0: batch} for _ in args)
    if not by_keyword and any(p.kind is p.VAR_POSITIONAL for p in params.values()):
        dynamic = (dynamic,)  # forward(*args): the spec of the whole tuple
    try:
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic)
    except Exception as exc:  # export raises many types
        raise ModelError(
            f"the compressed model does not export ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            "compress a model torch.export can capture with a dynamic batch dimension",
        ) from exc
    os.makedirs(path, exist_ok=True)
    torch.export.save(program, os.path.join(path, PROGRAM))
    save_file(example, os.path.join(path, INPUTS))
    meta = {"format": FORMAT, "inputs": list(example), **manifest}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(meta, f, indent=1, default=str)


def read_manifest(path: str) -> dict[str, Any]:
    with open(os.path.join(path, MANIFEST)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path} holds format {meta.get('format')!r}, not {FORMAT!r}", "re-run partserve compress")
    return meta


def load_compressed(path: str, options: dict[str, Any], batch_size: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The module and example inputs (``batch_size`` is applied by the caller) of a compressed directory."""
    if options:
        raise ModelError(f"a compressed model takes no options, got {sorted(options)}", "drop the -O options")
    meta = read_manifest(path)
    module = torch.export.load(os.path.join(path, PROGRAM)).module()
    # The program was exported in eval mode, so eval() is a no-op; drop export's refusal so callers may call it.
    del module.train, module.eval
    inputs = load_file(os.path.join(path, INPUTS))
    return module, {name: inputs[name] for name in meta["inputs"]}
