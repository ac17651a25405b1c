"""Cut any model in two at a named submodule: ``tail(head(x)) == model(x)``.

    StagedModel / nn.Sequential   cut after the named stage (child)
    any other nn.Module           torch.fx trace, cut after the named submodule's call:
        x ─ ... ─ <point> ─┬─ ... ─ y          head = everything <point>'s output depends on
                           └─ one tensor       tail = the rest, fed that one tensor

A cut is refused with :class:`~splitexit.errors.SplitPointError` when any other value would
have to cross it (a skip connection around the point, the raw input reused later, a module
called more than once), and the message names the points where exactly one tensor crosses.
Head and tail share the model's modules, hence its weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, TypeGuard

import torch.fx as fx
from torch import nn

from splitexit.errors import SplitPointError
from splitexit.models.staged import StagedModel

__all__ = ["cut_model", "stage_name", "staged_at", "valid_split_points"]


def _is_plain_sequential(model: nn.Module) -> TypeGuard[nn.Sequential]:
    return isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward


def _as_staged(model: nn.Sequential) -> StagedModel:
    staged = StagedModel(OrderedDict(model.named_children()))
    staged.training = model.training
    return staged


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        traced = fx.symbolic_trace(model)
    except Exception as error:  # fx raises many types for untraceable Python
        raise SplitPointError(
            f"cannot find split points in {type(model).__name__}: torch.fx cannot trace its "
            f"forward ({type(error).__name__}: {error}); express the model as a StagedModel "
            "(or nn.Sequential) of named stages instead"
        ) from error
    traced.graph.eliminate_dead_code()
    return traced


def _module_names(node: fx.Node) -> list[str]:
    """Qualified names of the modules whose forward produced ``node`` (outermost first)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] if isinstance(value, tuple) else key for key, value in stack.items()]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen = {node}
    todo = [node]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _head_set(graph: fx.Graph, cut: fx.Node) -> set[fx.Node] | None:
    """The nodes of the head when cutting after ``cut``, or None if more than ``cut`` crosses."""
    head = _ancestors(cut)
    output = next(n for n in graph.nodes if n.op == "output")
    if output.args[0] is cut:  # nothing left for a tail
        return None
    for node in graph.nodes:
        crosses_from_head = node in head and node is not cut and node.op != "get_attr"
        if (crosses_from_head or node.op == "placeholder") and any(
            user not in head for user in node.users
        ):
            return None
    return head


def _candidates(traced: fx.GraphModule) -> dict[str, fx.Node]:
    """Module name -> the single node that is its output, for modules with one output."""
    nodes = list(traced.graph.nodes)
    spans: dict[str, list[fx.Node]] = {}
    for node in nodes:
        for name in _module_names(node):
            spans.setdefault(name, []).append(node)
    found: dict[str, fx.Node] = {}
    for name, span in spans.items():
        members = set(span)
        outs = [n for n in span if any(user not in members for user in n.users)]
        if len(outs) == 1:
            found[name] = outs[0]
    return found


def _graph_points(model: nn.Module, traced: fx.GraphModule) -> dict[str, fx.Node]:
    order = {node: i for i, node in enumerate(traced.graph.nodes)}
    module_order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    valid = {
        name: node
        for name, node in _candidates(traced).items()
        if _head_set(traced.graph, node) is not None
    }
    ranked = sorted(valid, key=lambda n: (order[valid[n]], module_order.get(n, len(order))))
    return {name: valid[name] for name in ranked}


def valid_split_points(model: nn.Module) -> tuple[str, ...]:
    """The names :func:`cut_model` accepts for ``model``, in execution order."""
    if isinstance(model, StagedModel):
        return model.split_points
    if _is_plain_sequential(model):
        return _as_staged(model).split_points
    return tuple(_graph_points(model, _trace(model)))


def _graph_module(model: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    graph.lint()
    module = fx.GraphModule(model, graph, class_name=name)
    shared = set(model.modules())
    for sub in module.modules():  # containers fx created for attribute paths
        if sub not in shared:
            sub.training = model.training
    return module


def _graph_cuts(
    model: nn.Module, points: Sequence[str]
) -> tuple[fx.Graph, list[tuple[str, fx.Node]]]:
    """Trace ``model``; (point, its cut node) for each of ``points``, in execution order."""
    traced = _trace(model)
    valid = _graph_points(model, traced)
    for point in points:
        if point not in valid:
            reason = (
                "more than one value would cross the cut there (a skip connection, a reused "
                "input or a module called more than once)"
                if point in dict(model.named_modules())
                else "no submodule has that name"
            )
            raise SplitPointError(
                f"cannot cut {type(model).__name__} at {point!r}: {reason}; valid split points "
                f"(where exactly one tensor crosses) are: {', '.join(valid) or '(none)'}"
            )
    order = {node: i for i, node in enumerate(traced.graph.nodes)}
    cuts = sorted({p: valid[p] for p in points}.items(), key=lambda pc: order[pc[1]])
    return traced.graph, cuts


def _segment(
    nodes: list[fx.Node], members: set[fx.Node], start: fx.Node | None, end: Any
) -> fx.Graph:
    """The sub-graph of ``members`` fed by ``start`` (None: the model's input) returning
    ``end`` (a node, or the output node's argument structure for the last segment)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start is not None:
        env[start] = graph.placeholder("x")
    for node in nodes:
        if node in env or node.op == "output":
            continue
        used_here = node.op == "get_attr" and any(u in members for u in node.users)
        if node in members or used_here or (start is None and node.op == "placeholder"):
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(fx.map_arg(end, lambda n: env[n]))
    return graph


def _graph_segments(
    model: nn.Module, points: Sequence[str]
) -> list[tuple[str | None, fx.GraphModule]]:
    """``model`` as consecutive fx segments ending after each of ``points`` (in execution
    order), then the rest: [(point, segment), ..., (None, last segment)]."""
    graph, named_cuts = _graph_cuts(model, points)
    cuts = [node for _, node in named_cuts]
    nodes = list(graph.nodes)
    output = nodes[-1]
    name = type(model).__name__
    segments: list[tuple[str | None, fx.GraphModule]] = []
    done: set[fx.Node] = set()
    start: fx.Node | None = None
    for i, cut in enumerate([*cuts, None]):
        if cut is None:
            members = {n for n in nodes if n not in done and n.op != "output"}
            end = output.args[0]
        else:
            head = _head_set(graph, cut)
            assert head is not None  # checked by _graph_points
            members, end = head - done, cut
        members.discard(start)
        sub = _segment(nodes, members, start, end)
        point = named_cuts[i][0] if cut is not None else None
        segments.append((point, _graph_module(model, sub, f"{name}Segment{i}")))
        done |= members | ({start} if start is not None else set())
        start = cut
    return segments


def _cut_graph(model: nn.Module, point: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    (_, head), (_, tail) = _graph_segments(model, [point])
    name = type(model).__name__
    head.__class__.__name__, tail.__class__.__name__ = f"{name}Head", f"{name}Tail"
    return head, tail


def stage_name(point: str) -> str:
    """The stage name a (possibly dotted) point gets in :func:`staged_at`."""
    return point.replace(".", "_")


def staged_at(model: nn.Module, points: Sequence[str]) -> StagedModel:
    """``model`` as a :class:`StagedModel` whose stages end after each of ``points``.

    A StagedModel comes back as it is and a plain ``nn.Sequential`` as its children (every
    child a stage); any other model is traced with ``torch.fx`` and cut after each point
    (dots in a point's name become underscores: :func:`stage_name`), the last stage named
    ``classifier``. The stages share the model's modules, hence its weights.
    Raises :class:`~splitexit.errors.SplitPointError` naming the valid points.
    """
    if isinstance(model, StagedModel):
        return model
    if _is_plain_sequential(model):
        return _as_staged(model)
    segments = _graph_segments(model, points)
    names = [stage_name(p) for p, _ in segments[:-1] if p is not None]
    last = "classifier" if "classifier" not in names else "output"
    stages = OrderedDict(zip([*names, last], (seg for _, seg in segments), strict=True))
    staged = StagedModel(stages)
    staged.training = model.training
    return staged


def cut_model(model: nn.Module, point: str) -> tuple[nn.Module, nn.Module]:
    """Split ``model`` after submodule ``point`` into ``(head, tail)``.

    A :class:`StagedModel` or plain ``nn.Sequential`` is cut after the stage (child) named
    ``point`` and gives two :class:`StagedModel`; any other model (or a dotted name inside a
    Sequential) is traced with ``torch.fx`` and gives two ``fx.GraphModule``. Either way
    ``tail(head(x))`` computes ``model(x)`` with the same module objects.
    Raises :class:`~splitexit.errors.SplitPointError` listing the valid points.
    """
    if isinstance(model, StagedModel):
        return model.cut(point)
    if _is_plain_sequential(model) and point in _as_staged(model).split_points:
        return _as_staged(model).cut(point)
    return _cut_graph(model, point)
