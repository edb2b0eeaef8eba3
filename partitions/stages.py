"""Cut a captured graph into stage programs.

A stage program takes the tensors it reads (``inputs``, positional) and returns the tensors it computes
that later stages or the caller need (``computed``). Tensors made earlier and needed after the stage pass
through it untouched (``carried``); the runtime forwards them; of parallel branch stages, the first carries
them. Shape arithmetic and weight-only values that
a stage needs but did not make are recomputed inside it, so only batched activations cross a cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from partitions.capture import CapturedGraph, get_attr


@dataclass
class StageProgram:
    gm: fx.GraphModule
    inputs: list[str]
    computed: list[str]
    carried: list[str]

    @property
    def sends(self) -> list[str]:
        """Payload keys after this stage, in order: carried, then computed."""
        return self.carried + self.computed


def stage_program(cg: CapturedGraph, start: int, end: int, carry_until: int | None = None) -> StageProgram:
    """The program of units ``start:end`` of ``cg``; parameters are shared with ``cg.gm``, not copied.

    ``carry_until``: forward values made before ``start`` that are read at or after this unit (default
    ``end``: a sequential stage); ``None`` for a parallel branch other than the first, which forwards nothing.
    """
    nodes = {name for u in cg.units[start:end] for name in u.nodes}
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    root: dict[str, object] = {}
    inputs: list[str] = []
    batch_source: list[fx.Node] = []

    def fetch(arg: fx.Node) -> fx.Node:
        if arg.name in env:
            return env[arg.name]
        cls = cg.classes[arg.name]
        if arg.name in nodes:
            raise AssertionError(f"{arg.name} used before it is computed")
        if cls in ("input", "tensor"):
            name = cg.value_name(arg)
            ph = graph.placeholder(_safe(name))
            ph.meta.update(arg.meta)
            inputs.append(name)
            batch_source.append(ph)
            env[arg.name] = ph
        elif cls == "param":
            root[str(arg.target)] = get_attr(cg.gm, str(arg.target))
            env[arg.name] = graph.get_attr(str(arg.target))
        elif cls in ("const", "sym"):
            env[arg.name] = _recompute(arg)
        else:
            raise AssertionError(f"{arg.name} ({cls}) cannot cross a cut; units must keep it inside a stage")
        return env[arg.name]

    def _recompute(arg: fx.Node) -> fx.Node:
        # sym_size of a tensor this stage does not have: read the batch size off a tensor it does have.
        src = arg.args[0] if arg.args else None
        is_batch_size = arg.target is torch.ops.aten.sym_size.int and arg.args[1] == 0
        if is_batch_size and isinstance(src, fx.Node) and src.name not in env:
            if not batch_source:
                raise AssertionError(f"stage {start}:{end} has no batched input to read the batch size from")
            return graph.call_function(torch.ops.aten.sym_size.int, (batch_source[0], 0))
        return copy(arg)

    def copy(n: fx.Node) -> fx.Node:
        for a in n.all_input_nodes:
            fetch(a)
        new = graph.node_copy(n, lambda a: env[a.name])
        if n.op == "call_module":
            root[str(n.target)] = cg.gm.get_submodule(str(n.target))
        env[n.name] = new
        return new

    ordered = [cg.node(name) for u in cg.units[start:end] for name in u.nodes]
    for n in ordered:  # placeholders first, in order of first use
        for a in n.all_input_nodes:
            if a.name not in nodes and cg.classes[a.name] in ("input", "tensor"):
                fetch(a)
    for n in ordered:
        copy(n)

    computed = [name for name, v in cg.values.items() if start <= v.producer < end and v.last_use >= end]
    carried = (
        []
        if carry_until is None
        else [name for name, v in cg.values.items() if v.producer < start and v.last_use >= carry_until]
    )
    by_value = {cg.value_name(cg.node(n)): n for n in nodes}
    graph.output(tuple(env[by_value[name]] for name in computed))
    graph.lint()
    return StageProgram(fx.GraphModule(_Root(root), graph), inputs, computed, carried)


class _Root(nn.Module):
    """Holds a stage's parameters and submodules under their original qualified names."""

    def __init__(self, attrs: dict[str, object]) -> None:
        super().__init__()
        for qualname, obj in sorted(attrs.items()):
            *path, leaf = qualname.split(".")
            owner: nn.Module = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            if isinstance(obj, nn.Module):
                owner.add_module(leaf, obj)
            elif isinstance(obj, nn.Parameter):
                owner.register_parameter(leaf, obj)
            elif obj is None or isinstance(obj, torch.Tensor):
                owner.register_buffer(leaf, obj)
            else:
                raise TypeError(f"{qualname} is a {type(obj).__name__}: not a module, parameter or buffer")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)
