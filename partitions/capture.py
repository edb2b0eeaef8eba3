"""Capture a model as a graph of cuttable units.

Two paths, one result (:class:`CapturedGraph`):

* ``export``: ``torch.export`` with a dynamic batch dimension; the graph is the ATen-level program.
* ``modules``: when export fails and the model is an ``nn.Sequential``, its children become the nodes.

A *unit* is the smallest run of graph nodes the planner may cut between: nodes are grouped so that every
value crossing a unit boundary is either a batched tensor (shippable between stages) or cheap to recompute in
the next stage (shape arithmetic, values derived from weights only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from partitions.dtypes import name_of
from partitions.errors import ModelError
from partitions.source import ModelSource
from partitions.types import BATCH, TensorSpec

Method = Literal["export", "modules"]
NodeClass = Literal["input", "param", "const", "sym", "tensor", "other"]
"""How a graph value may cross a cut: ``input``/``tensor`` are shipped; ``param``/``const``/``sym`` are
recomputed by the stage that needs them; ``other`` (lists, unbatched activations) may not cross."""


@dataclass
class Unit:
    """A run of graph nodes that stays together in one stage."""

    name: str
    nodes: list[str]
    module: str
    op: str
    params: list[str] = field(default_factory=list)
    """Qualified names of the parameters and buffers this unit reads first."""


@dataclass
class Value:
    """A shippable tensor read by a later unit: where it is made and where it is last needed."""

    spec: TensorSpec
    producer: int
    """Unit index that computes it; -1 for a model input."""
    last_use: int
    """Last unit index that reads it; ``len(units)`` for a model output."""
    consumers: tuple[int, ...] = ()
    """Every unit index that reads it (``len(units)`` for a model output), ascending."""


@dataclass
class CapturedGraph:
    method: Method
    reason: str
    gm: fx.GraphModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    """Model outputs, named for users; ``output_values`` gives the graph value behind each."""
    output_values: list[str]
    units: list[Unit]
    values: dict[str, Value]
    classes: dict[str, NodeClass]
    unit_of: dict[str, int]
    """Graph node name -> unit index (compute nodes only)."""
    input_names: dict[str, str]
    """Placeholder node name -> the user's input name, which keys payloads everywhere."""

    def value_name(self, node: fx.Node) -> str:
        """The payload key of a graph value: the input name for inputs, else the node name."""
        return self.input_names.get(node.name, node.name)

    def node(self, name: str) -> fx.Node:
        return self._nodes[name]

    def __post_init__(self) -> None:
        self._nodes = {n.name: n for n in self.gm.graph.nodes}


def capture(source: ModelSource) -> CapturedGraph:
    """Capture ``source`` with torch.export, falling back to the children of an ``nn.Sequential``."""
    try:
        gm = _export(source)
        return _build(gm, "export", "torch.export succeeded with a dynamic batch dimension", source)
    except ModelError:
        raise
    except Exception as exc:  # export raises many types; any of them means: use the fallback
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        reason = f"torch.export failed ({type(exc).__name__}: {first_line})"
    if not isinstance(source.module, nn.Sequential):
        raise ModelError(
            f"cannot capture {source.spec}: {reason}, and the model is not an nn.Sequential",
            "make the model exportable (torch.export) or express it as an nn.Sequential of blocks",
        )
    gm = _sequential_graph(source.module, source.example_inputs)
    return _build(gm, "modules", f"{reason}; cut at nn.Sequential children instead", source)


def _export(source: ModelSource) -> fx.GraphModule:
    batch = torch.export.Dim("batch")
    args, kwargs = source.call_args(source.example_inputs)
    dynamic = {k: {0: batch} for k in kwargs} if kwargs else tuple({0: batch} for _ in args)
    gm = torch.export.export(source.module, args, kwargs, dynamic_shapes=dynamic).module()
    # Export keeps runtime checks of ``.to()`` metadata and of symbolic sizes, and with them values nothing
    # else reads (a model's unused logits, an unused branch of its pooling): a cut would turn those into
    # stages that compute nothing. Inputs are checked against the plan before they reach a stage.
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() and n.target not in _RUNTIME_CHECKS)
    gm.recompile()
    return gm


_RUNTIME_CHECKS = (
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
)


def _sequential_graph(module: nn.Sequential, inputs: dict[str, torch.Tensor]) -> fx.GraphModule:
    """An fx graph that calls each child in order, with shapes recorded by running it once."""
    if len(inputs) != 1:
        raise ModelError(f"an nn.Sequential takes one input, the example has {len(inputs)}", "pass one tensor")
    graph = fx.Graph()
    ((name, example),) = inputs.items()
    x = graph.placeholder(name)
    x.meta["example"] = example
    with torch.inference_mode():
        value = example
        for child_name, child in module.named_children():
            value = child(value)
            x = graph.call_module(child_name, (x,))
            x.meta["example"] = value
            x.meta["nn_module_stack"] = {child_name: (child_name, type(child).__qualname__)}
    graph.output((x,))
    return fx.GraphModule(module, graph)


def _tensor_spec(name: str, node: fx.Node, batch_symbol: str | None) -> TensorSpec | None:
    """The spec of a batched tensor value, or None when the node is no such tensor."""
    val = node.meta.get("val", node.meta.get("example"))
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    dims: list[int] = []
    for i, d in enumerate(val.shape):
        if i == 0 and (str(d) == batch_symbol or "example" in node.meta):
            dims.append(BATCH)
        elif isinstance(d, int):
            dims.append(d)
        else:
            return None
    if dims[0] != BATCH:
        return None
    return TensorSpec(name, tuple(dims), name_of(val.dtype))


def _classify(gm: fx.GraphModule, batch_symbol: str | None) -> dict[str, NodeClass]:
    classes: dict[str, NodeClass] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            classes[n.name] = "input"
        elif n.op == "get_attr":
            classes[n.name] = "param"
        elif n.op in ("call_function", "call_module"):
            val = n.meta.get("val", n.meta.get("example"))
            deps = [classes[a.name] for a in n.all_input_nodes]
            if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
                classes[n.name] = "sym"
            elif n.op == "call_function" and all(d in ("param", "const", "sym") for d in deps):
                # Made from weights and sizes alone (``arange(batch)``, ``cls_token.expand(batch, ...)``):
                # recomputed in each stage that reads it, which has a batched input to take the batch size
                # from; a stage of such values alone would have none.
                classes[n.name] = "const"
            elif _tensor_spec(n.name, n, batch_symbol) is not None:
                classes[n.name] = "tensor"
            else:
                classes[n.name] = "other"
    return classes


def is_compute(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_module") and n.target != "_guards_fn"


def _module_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        if isinstance(path, str) and not path.startswith("_empty"):
            return path
    return ""


def _op_name(n: fx.Node) -> str:
    if n.op == "call_module":
        owner = n.graph.owning_module
        assert owner is not None, "a call_module node belongs to a GraphModule's graph"
        return type(owner.get_submodule(str(n.target))).__name__
    name = getattr(n.target, "__name__", str(n.target))
    return str(n.target).removesuffix(".default") if "aten" in str(n.target) else name


_CHEAP_OPS = ("view", "reshape", "permute", "transpose", "getitem", "unbind", "expand", "sym_size", "slice")


def _group_units(gm: fx.GraphModule, classes: dict[str, NodeClass]) -> list[Unit]:
    """Group compute nodes so no list or unbatched activation crosses a unit boundary."""
    compute = [n for n in gm.graph.nodes if is_compute(n)]
    pos = {n.name: i for i, n in enumerate(compute)}
    end = len(compute)
    units: list[Unit] = []
    current: list[fx.Node] = []
    open_until = -1
    for i, n in enumerate(compute):
        current.append(n)
        if classes[n.name] == "other":
            last = max((pos.get(u.name, end) for u in n.users), default=i)
            open_until = max(open_until, last)
        makes_activation = any(classes[x.name] in ("tensor", "other") for x in current)
        if open_until <= i and makes_activation:  # shape arithmetic joins the next unit that does work
            units.append(_make_unit(current))
            current = []
    if current:
        units.append(_make_unit(current))
    return units


def _make_unit(nodes: list[fx.Node]) -> Unit:
    main = next((n for n in nodes if not any(c in _op_name(n) for c in _CHEAP_OPS)), nodes[0])
    return Unit(name=main.name, nodes=[n.name for n in nodes], module=_module_path(main), op=_op_name(main))


def _build(gm: fx.GraphModule, method: Method, reason: str, source: ModelSource) -> CapturedGraph:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = placeholders[0].meta.get("val") if placeholders else None
    batch_symbol = str(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else None
    classes = _classify(gm, batch_symbol)
    units = _group_units(gm, classes)
    unit_of = {name: i for i, u in enumerate(units) for name in u.nodes}

    input_names = list(source.example_inputs)
    if len(placeholders) != len(input_names):
        raise ModelError(
            f"graph has {len(placeholders)} inputs but the example has {len(input_names)}",
            "pass every model input as a tensor in the example inputs",
        )
    rename = {p.name: name for p, name in zip(placeholders, input_names)}
    inputs: list[TensorSpec] = []
    for p, name in zip(placeholders, input_names):
        spec = _tensor_spec(name, p, batch_symbol)
        if spec is None:
            raise ModelError(f"input {name!r} has no batch dimension 0", "give every input a leading batch dim")
        inputs.append(spec)

    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_nodes = [a for a in pytree.tree_leaves(out_node.args) if isinstance(a, fx.Node)]
    output_values = [rename.get(n.name, n.name) for n in out_nodes]
    outputs = []
    for n, user_name in zip(out_nodes, source.output_names(len(out_nodes))):
        spec = _tensor_spec(user_name, n, batch_symbol)
        if spec is None:
            raise ModelError(f"output {user_name!r} is not a batched tensor", "return tensors with a batch dim")
        outputs.append(spec)

    n_units = len(units)
    values: dict[str, Value] = {}
    for n in gm.graph.nodes:
        if classes.get(n.name) not in ("input", "tensor"):
            continue
        producer = unit_of.get(n.name, -1)
        uses = [
            n_units if u.op == "output" else unit_of[u.name] for u in n.users if u.name in unit_of or u.op == "output"
        ]
        last = max(uses, default=producer)
        if last > producer:
            name = rename.get(n.name, n.name)
            spec = _tensor_spec(name, n, batch_symbol)
            assert spec is not None
            values[name] = Value(spec, producer, last, tuple(sorted(set(uses))))

    nodes = {n.name: n for n in gm.graph.nodes}
    seen: set[str] = set()
    for u in units:
        for name in u.nodes:
            node = nodes[name]
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and arg.target not in seen:
                    seen.add(str(arg.target))
                    u.params.append(str(arg.target))
            if node.op == "call_module":
                prefix = str(node.target)
                mod = gm.get_submodule(prefix)
                for pname, _ in list(mod.named_parameters()) + list(mod.named_buffers()):
                    full = f"{prefix}.{pname}"
                    if full not in seen:
                        seen.add(full)
                        u.params.append(full)

    return CapturedGraph(method, reason, gm, inputs, outputs, output_values, units, values, classes, unit_of, rename)


def embedding_limits(cg: CapturedGraph) -> dict[str, tuple[int, int]]:
    """``{input: (0, rows)}`` for each model input that indexes an embedding table directly (``aten.embedding``
    in an exported graph, an ``nn.Embedding`` child in a module graph): ids outside it are no valid input.
    An input indexing several tables gets the smallest."""
    limits: dict[str, tuple[int, int]] = {}
    for n in cg.gm.graph.nodes:
        rows: int | None = None
        indices: object = None
        if n.op == "call_function" and n.target is torch.ops.aten.embedding.default:
            weight, indices = n.args[0], n.args[1]
            val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                val = get_attr(cg.gm, str(weight.target))
            rows = int(val.shape[0]) if isinstance(val, torch.Tensor) else None
        elif n.op == "call_module" and isinstance(embedding := cg.gm.get_submodule(str(n.target)), nn.Embedding):
            rows, indices = embedding.num_embeddings, n.args[0]
        if rows is None or not isinstance(indices, fx.Node) or indices.op != "placeholder":
            continue
        name = cg.input_names.get(indices.name, indices.name)
        low, high = limits.get(name, (0, rows))
        limits[name] = (low, min(high, rows))
    return limits


def get_attr(root: nn.Module, target: str) -> object:
    """The parameter, buffer or submodule at a qualified name (``blocks.0.fc1.weight``)."""
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
