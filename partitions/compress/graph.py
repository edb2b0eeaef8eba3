"""Find which layers can lose output channels, and which layers must then lose the matching inputs.

The model is traced with ``torch.fx.symbolic_trace`` and its shapes recorded on the example inputs. From each
Conv2d or Linear (the *producer*) the trace is followed through channel-preserving operations (activations,
dropout, pooling, BatchNorm, elementwise ops with a scalar, flatten) to the Conv2d or Linear layers that read
its channels (the *consumers*). A producer is prunable only if every path ends in such a consumer: a residual
add, a concatenation, a LayerNorm or the model output would need a rewrite this module does not do.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from partitions.errors import ModelError

PRUNABLE = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_SAME_SHAPE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ELU,
    nn.Dropout, nn.Dropout2d, nn.Identity,
)  # fmt: skip
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.hardswish, F.elu, F.dropout, torch.relu, torch.sigmoid,
    torch.tanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}  # fmt: skip
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "mean", "amax"}
_RESHAPES = {torch.flatten, "flatten", "view", "reshape"}
_SCALAR_OPS = {operator.add, operator.mul, operator.sub, operator.truediv}


@dataclass
class Consumer:
    name: str
    """Qualified name of a Conv2d or Linear that reads the producer's channels."""
    spread: int
    """Input columns per producer channel: 1, or the spatial size (H x W) when a flatten lies between."""


@dataclass
class PruneGroup:
    """A producer layer with everything that must shrink with its output channels."""

    producer: str
    channels: int
    norms: list[str] = field(default_factory=list)
    """BatchNorm layers on the path (their per-channel parameters and statistics shrink too)."""
    consumers: list[Consumer] = field(default_factory=list)


def prunable(model: nn.Module, name: str) -> nn.Conv2d | nn.Linear:
    """The Conv2d or Linear layer ``name`` of ``model`` (a group's producer or consumer)."""
    module = model.get_submodule(name)
    if not isinstance(module, PRUNABLE):
        raise TypeError(f"{name} is a {type(module).__name__}, not a Conv2d or Linear")
    return module


def norm(model: nn.Module, name: str) -> nn.BatchNorm1d | nn.BatchNorm2d:
    """The BatchNorm layer ``name`` of ``model`` (in a group's ``norms``)."""
    module = model.get_submodule(name)
    if not isinstance(module, NORMS):
        raise TypeError(f"{name} is a {type(module).__name__}, not a BatchNorm1d or BatchNorm2d")
    return module


@dataclass
class Structure:
    groups: dict[str, PruneGroup]
    """Prunable producers by qualified name, in graph order."""
    refused: dict[str, str]
    """Conv2d/Linear layers that cannot be pruned, with the reason."""


def analyze(model: nn.Module, example: dict[str, torch.Tensor]) -> Structure:
    """Trace ``model`` on ``example`` (inputs in ``forward``'s order) and find its prune groups."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # tracing raises many types (control flow, unsupported ops)
        raise ModelError(
            f"cannot trace the model with torch.fx ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            "structured pruning needs a model torch.fx.symbolic_trace can follow; quantize it instead",
        ) from exc
    ShapeProp(gm).propagate(*example.values())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    groups: dict[str, PruneGroup] = {}
    refused: dict[str, str] = {}
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if not isinstance(module, PRUNABLE):
            continue
        name = str(node.target)
        try:
            if calls[name] > 1:
                raise _Refuse("it is called more than once")
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise _Refuse(f"it is a grouped convolution (groups={module.groups})")
            groups[name] = _follow(gm, node, calls)
        except _Refuse as why:
            refused[name] = str(why)
    return Structure(groups, refused)


class _Refuse(Exception):
    pass


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise _Refuse(f"{node.name} does not produce a single tensor")
    return tuple(meta.shape)


def _follow(gm: fx.GraphModule, producer: fx.Node, calls: Counter) -> PruneGroup:
    """Walk from ``producer`` to its consumers, tracking the channel axis and columns per channel."""
    shape = _shape(producer)
    channels = shape[1] if isinstance(_module(gm, producer), nn.Conv2d) else shape[-1]
    group = PruneGroup(str(producer.target), channels)
    todo = [(producer, 1 if isinstance(_module(gm, producer), nn.Conv2d) else len(shape) - 1, 1)]
    while todo:
        node, axis, spread = todo.pop()
        for user in node.users:
            if user.op == "output":
                raise _Refuse("its channels reach the model output")
            if [a for a in user.all_input_nodes if a is not node]:
                raise _Refuse(f"its channels meet another value at {user.name} (a residual add, concat or reshape)")
            module = _module(gm, user)
            if module is not None and calls[user.target] > 1:
                raise _Refuse(f"{user.target} is called more than once")
            if isinstance(module, PRUNABLE):
                _check_consumer(module, user, axis, spread, len(_shape(node)))
                group.consumers.append(Consumer(str(user.target), spread))
                continue
            todo.append((user, *_pass_through(module, user, node, axis, spread, channels)))
            if isinstance(module, NORMS):
                group.norms.append(str(user.target))
    return group


def _check_consumer(module: nn.Module, user: fx.Node, axis: int, spread: int, rank: int) -> None:
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or axis != 1 or spread != 1):
        raise _Refuse(f"{user.target} is a grouped convolution or reads a reshaped tensor")
    if isinstance(module, nn.Linear) and axis != rank - 1:
        raise _Refuse(f"{user.target} does not read the channel axis")


def _pass_through(
    module: nn.Module | None, user: fx.Node, src: fx.Node, axis: int, spread: int, channels: int
) -> tuple[int, int]:
    """The channel axis and spread after ``user``, or :class:`_Refuse` if it does not keep channels apart."""
    before, after = _shape(src), _shape(user)
    target = user.target if user.op in ("call_function", "call_method") else None
    if isinstance(module, NORMS):
        ok = axis == 1 and spread == 1
    elif isinstance(module, nn.Flatten) or target in _RESHAPES:
        if after == before:
            return axis, spread
        flat = len(before) > 2 and axis == 1 and after == (before[0], math.prod(before[1:]))
        if not flat:
            raise _Refuse(f"{user.name} reshapes its channels")
        return 1, spread * math.prod(before[2:])
    elif isinstance(module, _SAME_SHAPE_MODULES + _POOL_MODULES) or target in _PASS_FUNCTIONS:
        ok = True
    elif user.op == "call_method" and target in _PASS_METHODS:
        ok = target not in ("mean", "amax") or after == before[:2]
    elif target in _SCALAR_OPS:
        ok = True  # other tensor operands were refused by the caller
    else:
        what = type(module).__name__ if module is not None else getattr(user.target, "__name__", user.target)
        raise _Refuse(f"{user.name} ({what}) is not rewritable")
    if not ok or len(after) <= axis or after[axis] != channels * spread or after[:1] != before[:1]:
        raise _Refuse(f"{user.name} does not keep the channel axis")
    return axis, spread
