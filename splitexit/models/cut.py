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

import torch.fx as fx
from torch import nn

from splitexit.errors import SplitPointError
from splitexit.models.staged import StagedModel

__all__ = ["cut_model", "valid_split_points"]


def _is_plain_sequential(model: nn.Module) -> bool:
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


def _cut_graph(model: nn.Module, point: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    traced = _trace(model)
    points = _graph_points(model, traced)
    if point not in points:
        reason = (
            "more than one value would cross the cut there (a skip connection, a reused "
            "input or a module called more than once)"
            if point in dict(model.named_modules())
            else "no submodule has that name"
        )
        raise SplitPointError(
            f"cannot cut {type(model).__name__} at {point!r}: {reason}; valid split points "
            f"(where exactly one tensor crosses) are: {', '.join(points) or '(none)'}"
        )
    cut = points[point]
    nodes = list(traced.graph.nodes)
    head_nodes = _head_set(traced.graph, cut)
    assert head_nodes is not None  # checked by _graph_points

    head_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node in head_nodes or node.op == "placeholder":
            env[node] = head_graph.node_copy(node, lambda n: env[n])
    head_graph.output(env[cut])

    tail_graph = fx.Graph()
    env = {cut: tail_graph.placeholder("x")}
    output = nodes[-1]
    for node in nodes:
        if node.op in ("placeholder", "output") or node is cut:
            continue
        in_tail = node not in head_nodes
        if in_tail or (node.op == "get_attr" and any(u not in head_nodes for u in node.users)):
            env[node] = tail_graph.node_copy(node, lambda n: env[n])
    tail_graph.output(fx.map_arg(output.args[0], lambda n: env[n]))

    name = type(model).__name__
    return _graph_module(model, head_graph, f"{name}Head"), _graph_module(
        model, tail_graph, f"{name}Tail"
    )


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
