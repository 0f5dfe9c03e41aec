"""Zero-invariant groups (ZIGs) of a network, found from its torch.fx graph.

A zero-invariant group is a set of parameter slices that, set to zero together, remove one structure's effect on
the output: an output channel (or unit) of a Conv/Linear layer with its bias, the scale and shift of every batch
norm the channel passes through, and the input slices of every layer that reads it. Once its producing slices
(weight row, bias, batch-norm scale and shift) are zero, the channel is exactly zero wherever it goes, so the
consumers' input slices can be cut and the network is physically smaller with identical outputs
(:func:`sparsetrain.structured.slim`).

How the groups are found: the model is traced with ``torch.fx`` and its shapes propagated on a sample; every
tensor is then followed as a *channel set* (the channels of axis 1) through the graph:

- a Conv1d/Conv2d (``groups=1``) or Linear reads its input's channel set (the input slices of its weight) and
  starts a new channel set of its own output channels (weight rows and bias);
- a depthwise convolution (``groups == in_channels == out_channels``) and a batch norm keep the channel set,
  adding their per-channel parameters to it (running statistics are carried along for slimming);
- zero-preserving element-wise operations (ReLU and its kin, dropout, pooling, spatial means) keep it;
- a residual addition ties the channel sets it joins into one: channel ``c`` of either side is removable only
  together with channel ``c`` of the other;
- a flatten after a convolution maps channel ``c`` to its block of ``H*W`` (or ``L``) consecutive features, so
  the next Linear's input slices are blocks.

The model's input channels and the network's output units are never grouped. Anything else (a concatenation,
attention, a layer norm over channels, an activation with ``f(0) != 0`` such as a sigmoid, a module called twice)
is refused with :class:`UnsupportedModel`, naming the first operation the analysis cannot follow.

References: Chen et al., "Only Train Once: A One-Shot Neural Network Training And Pruning Framework",
NeurIPS 2021, arXiv 2107.07467 (zero-invariant groups); Chen et al., "OTOv2: Automatic, Generic, User-Friendly",
ICLR 2023, arXiv 2303.06862 (groups found automatically from the trace graph).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..errors import ConfigError, first_line

__all__ = [
    "CONSUMER",
    "NORM",
    "PRODUCER",
    "STATS",
    "ChannelSet",
    "Group",
    "Groups",
    "Member",
    "Slice",
    "UnsupportedModel",
    "groups",
]

# The roles of a tensor in a channel set. PRODUCER and NORM make the channel's value: zeroing their slices zeroes
# the channel (they are the zero-invariant part). CONSUMER slices read the channel and are cut with it. STATS are
# batch-norm running statistics (buffers, not parameters): cut with the channel, never masked.
PRODUCER, NORM, STATS, CONSUMER = "producer", "norm", "stats", "consumer"
ZERO_INVARIANT_ROLES = (PRODUCER, NORM)


class UnsupportedModel(ConfigError):
    """The model holds an operation the group analysis cannot follow (a ``ValueError``; exit code 2 in the CLI)."""


@dataclass(frozen=True)
class Member:
    """One tensor of a channel set: channel ``c`` is ``tensor[..., c*block:(c+1)*block, ...]`` along ``dim``."""

    name: str  # qualified parameter or buffer name, as in model.state_dict()
    module: str  # qualified name of the module that owns it
    dim: int
    block: int  # consecutive entries per channel along dim: H*W for a Linear after a flatten, 1 otherwise
    role: str  # PRODUCER, NORM, STATS or CONSUMER
    buffer: bool


@dataclass(frozen=True)
class Slice:
    """The part of one tensor that belongs to a group: ``tensor.narrow(dim, start, stop - start)``."""

    name: str
    dim: int
    start: int
    stop: int
    role: str
    buffer: bool

    def of(self, tensor: Tensor) -> Tensor:
        """This slice of ``tensor`` (a view)."""
        return tensor.narrow(self.dim, self.start, self.stop - self.start)


@dataclass(frozen=True)
class Group:
    """One zero-invariant group: channel ``index`` of channel set ``channel_set``.

    Attributes:
        name: ``"<channel set>[<index>]"``, e.g. ``"layer1.0.conv1[3]"``.
        slices: every tensor slice of the channel (parameters and running statistics).
        size: parameter elements in the group (buffers not counted).
        flops: forward multiply-accumulates per sample of its weight slices (``sparsetrain.flops`` convention):
            what removing this group alone saves.
    """

    name: str
    channel_set: str
    index: int
    slices: tuple[Slice, ...]
    size: int
    flops: int

    @property
    def params(self) -> tuple[Slice, ...]:
        """The parameter slices (what a group mask covers)."""
        return tuple(s for s in self.slices if not s.buffer)

    @property
    def zero_invariant(self) -> tuple[Slice, ...]:
        """The slices that make the channel's value (weight rows, biases, batch-norm scale and shift)."""
        return tuple(s for s in self.slices if s.role in ZERO_INVARIANT_ROLES)


@dataclass(frozen=True)
class ChannelSet:
    """Channels that share one structure: the output channels of one or more layers tied by residual additions.

    ``name`` is the first producing layer in graph order; ``width`` the number of channels (= groups);
    ``members`` every tensor sliced by channel.
    """

    name: str
    width: int
    members: tuple[Member, ...]

    def slices(self, index: int) -> tuple[Slice, ...]:
        """The slices of channel ``index``."""
        return tuple(
            Slice(m.name, m.dim, index * m.block, (index + 1) * m.block, m.role, m.buffer) for m in self.members
        )

    def channel_matrix(self, tensors: Mapping[str, Tensor], roles: Sequence[str]) -> list[Tensor]:
        """For each member of ``roles``: its tensor from ``tensors`` as ``(width, -1)``, row ``c`` = channel ``c``."""
        out = []
        for m in self.members:
            if m.role in roles and m.name in tensors:
                out.append(tensors[m.name].detach().movedim(m.dim, 0).reshape(self.width, -1))
        return out


@dataclass
class Groups(Sequence[Group]):
    """The zero-invariant groups of a model: a sequence of :class:`Group`, with the channel sets they come from.

    Attributes:
        sets: the prunable channel sets, in graph order.
        fixed: channel sets left out, with the reason (the model's input, the network output, ...).
        dense_flops: forward FLOPs per sample of the whole model (every weight counted).
    """

    sets: tuple[ChannelSet, ...]
    fixed: dict[str, str]
    dense_flops: int
    _groups: tuple[Group, ...] = field(default=(), repr=False)

    @overload
    def __getitem__(self, index: int) -> Group: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Group]: ...
    def __getitem__(self, index: int | slice) -> Group | Sequence[Group]:
        return self._groups[index]

    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[Group]:
        return iter(self._groups)

    def channel_set(self, name: str) -> ChannelSet:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(f"no channel set {name!r}; the sets are: {', '.join(s.name for s in self.sets)}")

    def param_names(self) -> list[str]:
        """Every parameter some group slices, in model order of first appearance."""
        seen: dict[str, None] = {}
        for s in self.sets:
            for m in s.members:
                if not m.buffer:
                    seen.setdefault(m.name)
        return list(seen)

    def table(self) -> str:
        """One line per channel set: channels, parameters and FLOPs per group (sums over its channels)."""
        rows = [("channel set", "channels", "params", "FLOPs", "tensors")]
        for s in self.sets:
            members = [g for g in self._groups if g.channel_set == s.name]
            tensors = sorted({m.name for m in s.members if not m.buffer})
            rows.append((s.name, str(s.width), f"{sum(g.size for g in members):,}",
                         f"{sum(g.flops for g in members):,}", str(len(tensors))))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]  # fmt: skip
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self._groups)} groups in {len(self.sets)} channel sets; dense forward FLOPs "
                     f"{self.dense_flops:,} per sample")  # fmt: skip
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ what the graph may hold
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Tanh,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
# Functions and methods that act per channel and map 0 to 0 (f(0) = 0), with the tensor as first argument.
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardtanh, torch.tanh, F.dropout, F.dropout1d, F.dropout2d,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    torch.mean, torch.amax, torch.sum,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "contiguous", "mean", "amax", "sum"}
_ADD = {operator.add, operator.iadd, torch.add}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_SUPPORTED_TEXT = (
    "supported: Conv1d/Conv2d (groups=1 or depthwise), Linear, BatchNorm1d/2d, ReLU-like activations with "
    "f(0)=0, dropout, pooling, spatial means, flatten and residual addition"
)


def _describe(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[str(node.target)]).__name__})"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    if node.op == "get_attr":
        return f"direct use of the tensor {node.target!r} in forward"
    target = node.target
    name = getattr(target, "__name__", str(target))
    module = getattr(target, "__module__", None) or ""
    return f"function {module + '.' if module and module != '_operator' else ''}{name}"


@dataclass
class _Space:
    width: int
    members: list[Member] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)  # module names, graph order
    fixed: str | None = None  # why the set is not prunable


@dataclass(frozen=True)
class _Channels:
    """A tensor whose axis 1 holds the channels of ``space`` (``block`` features per channel after a flatten)."""

    space: int
    block: int = 1


class _Analysis:
    """Union-find over channel sets, filled by one walk over the traced graph."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph, modules: Mapping[str, nn.Module]) -> None:
        self.model = model
        self.modules = modules
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.info: dict[torch.fx.Node, _Channels | None] = {}
        self.calls: dict[str, int] = {}
        for node in graph.nodes:
            self.info[node] = self._visit(node)

    # ----------------------------------------------------------------- union-find
    def new(self, width: int, fixed: str | None = None) -> int:
        self.spaces.append(_Space(width, fixed=fixed))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if a > b:
            a, b = b, a  # the older set names the union (graph order)
        sa, sb = self.spaces[a], self.spaces[b]
        sa.members += sb.members
        sa.producers += sb.producers
        sa.fixed = sa.fixed or sb.fixed
        self.parent[b] = a
        return a

    def add(self, space: int, module: str, attr: str, dim: int, role: str, block: int = 1) -> None:
        owner = self.modules[module]
        tensor = getattr(owner, attr, None)
        if not isinstance(tensor, Tensor):
            return  # bias=None, a norm without running statistics
        name = f"{module}.{attr}" if module else attr
        buffer = attr in owner._buffers
        self.spaces[self.find(space)].members.append(Member(name, module, dim, block, role, buffer))

    # ----------------------------------------------------------------- the walk
    def _fail(self, node: torch.fx.Node, why: str = "") -> UnsupportedModel:
        what = _describe(node, self.modules)
        return UnsupportedModel(
            f"structured pruning cannot follow {what} (graph node {node.name!r}){': ' + why if why else ''}; "
            f"{_SUPPORTED_TEXT}"
        )

    @staticmethod
    def _shape(node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def _input(self, node: torch.fx.Node, arg: Any) -> _Channels:
        info = self.info.get(arg) if isinstance(arg, torch.fx.Node) else None
        if info is None:
            raise self._fail(node, "its input is not a tensor the analysis follows")
        return info

    def _visit(self, node: torch.fx.Node) -> _Channels | None:
        shape = self._shape(node)
        if node.op == "output":
            for arg in node.all_input_nodes:
                info = self.info.get(arg)
                if info is not None:
                    root = self.find(info.space)
                    self.spaces[root].fixed = self.spaces[root].fixed or "the network's output"
            return None
        if node.op == "placeholder":
            if shape is None:
                return None
            if len(shape) < 2:
                raise UnsupportedModel(
                    f"the model input {node.name!r} has shape {shape}; expected (batch, channels, ...)"
                )
            return _Channels(self.new(shape[1], fixed="the model's input"))
        if node.op == "get_attr":
            raise self._fail(node, "parameters must be used through their modules")
        if shape is None:
            return None  # sizes, dims and other non-tensor values: they carry no channels
        if node.op == "call_module":
            return self._module(node, shape)
        if (node.op == "call_function" and node.target in _ADD) or (
            node.op == "call_method" and node.target in ("add", "add_")
        ):
            return self._add(node, shape)
        if (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _ELEMENTWISE_METHODS
        ):
            return self._same_channels(node, shape)
        if (node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _RESHAPE_METHODS
        ):
            return self._reshape(node, shape)
        raise self._fail(node)

    def _same_channels(self, node: torch.fx.Node, shape: tuple[int, ...]) -> _Channels:
        """A per-channel operation: the output's axis 1 must be the input's (reductions over other axes only)."""
        info = self._input(node, node.args[0])
        before = self._shape(node.args[0])
        if before is None or len(shape) < 2 or shape[:2] != before[:2]:
            raise self._fail(node, f"it changes the shape {before} to {shape}, not per channel")
        if info.block != 1 and shape != before:
            raise self._fail(node, "it pools flattened features")
        return info

    def _add(self, node: torch.fx.Node, shape: tuple[int, ...]) -> _Channels:
        args = [a for a in node.args if isinstance(a, torch.fx.Node) and self.info.get(a) is not None]
        if len(args) != 2 or len(node.args) != 2 or node.kwargs:
            raise self._fail(node, "only the sum of two tensors (a residual addition) keeps channels zero")
        a, b = (self.info[x] for x in args)
        shapes = [self._shape(x) for x in args]
        if shapes[0] != shapes[1] or a.block != b.block:
            raise self._fail(node, f"it broadcasts shapes {shapes[0]} and {shapes[1]}")
        return _Channels(self.union(a.space, b.space), a.block)

    def _reshape(self, node: torch.fx.Node, shape: tuple[int, ...]) -> _Channels:
        info = self._input(node, node.args[0])
        before = self._shape(node.args[0])
        assert before is not None
        if shape == before:
            return info
        if len(shape) == 2 and len(before) > 2 and shape[0] == before[0] and shape[1] == math.prod(before[1:]):
            return _Channels(info.space, info.block * math.prod(before[2:]))
        raise self._fail(node, f"it reshapes {before} to {shape}; only a flatten from axis 1 keeps channels apart")

    def _module(self, node: torch.fx.Node, shape: tuple[int, ...]) -> _Channels:
        name = str(node.target)
        module = self.modules[name]
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1:
                raise self._fail(node, "a module with parameters called more than once shares them between channels")
        if isinstance(module, _ELEMENTWISE_MODULES):
            return self._same_channels(node, shape)
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise self._fail(node, f"it flattens axes {module.start_dim}..{module.end_dim}, not 1..-1")
            return self._reshape(node, shape)
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            info = self._input(node, node.args[0])
            if info.block != 1:
                raise self._fail(node, "a batch norm over flattened features")
            if not module.affine:
                root = self.find(info.space)
                self.spaces[root].fixed = self.spaces[root].fixed or f"batch norm {name!r} has no scale and shift"
            for attr in ("weight", "bias"):
                self.add(info.space, name, attr, 0, NORM)
            for attr in ("running_mean", "running_var"):
                self.add(info.space, name, attr, 0, STATS)
            return info
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            info = self._input(node, node.args[0])
            if info.block != 1:
                raise self._fail(node, "a convolution over flattened features")
            if module.groups == module.in_channels == module.out_channels and module.groups > 1:
                # Depthwise: output channel c reads only input channel c, so it continues the same channel set.
                self.add(info.space, name, "weight", 0, PRODUCER)
                self.add(info.space, name, "bias", 0, PRODUCER)
                return info
            if module.groups != 1:
                raise self._fail(node, f"grouped convolution (groups={module.groups} of {module.in_channels} channels)")
            self.add(info.space, name, "weight", 1, CONSUMER)
            return self._produce(name, module.out_channels)
        if isinstance(module, nn.Linear):
            info = self._input(node, node.args[0])
            before = self._shape(node.args[0])
            if before is None or len(before) != 2:
                raise self._fail(node, f"a Linear over a tensor of shape {before}; only (batch, features) is followed")
            self.add(info.space, name, "weight", 1, CONSUMER, info.block)
            return self._produce(name, module.out_features)
        raise self._fail(node)

    def _produce(self, name: str, width: int) -> _Channels:
        space = self.new(width)
        self.spaces[space].producers.append(name)
        self.add(space, name, "weight", 0, PRODUCER)
        self.add(space, name, "bias", 0, PRODUCER)
        return _Channels(space)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001 - fx raises TraceError, TypeError, NotImplementedError, ...
        raise UnsupportedModel(
            f"structured pruning cannot trace {type(model).__name__} with torch.fx ({first_line(error)}); the "
            "forward must have no Python control flow on tensor values"
        ) from None


def _positions(graph: torch.fx.Graph, modules: Mapping[str, nn.Module], batch: int) -> dict[str, int]:
    """Output positions per sample of each Conv1d/Conv2d/Linear, from the propagated shapes.

    The convention of :mod:`sparsetrain.flops` (one FLOP = one multiply-accumulate of a weight; a layer applies each
    weight once per output position), read from the graph rather than by a second forward pass, so that it also
    works on the meta device.
    """
    positions: dict[str, int] = {}
    for node in graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Linear):
            units = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            shape = _Analysis._shape(node)
            assert shape is not None
            positions[str(node.target)] = positions.get(str(node.target), 0) + math.prod(shape) // units // batch
    return positions


def groups(model: nn.Module, sample: Tensor) -> Groups:
    """The zero-invariant groups of ``model``: one per prunable output channel (or unit), with sizes and FLOPs.

    Args:
        model: the network (not modified; its modes are restored after the one forward pass on ``sample``).
        sample: an input batch, ``(batch, channels, ...)``; only its shape matters (a meta tensor works).

    Returns:
        :class:`Groups`: a sequence of :class:`Group` (name, parameter slices with their index ranges, size,
        forward FLOPs) in graph order, with the channel sets they belong to (``.sets``) and ``.table()``.

    Raises:
        UnsupportedModel (a ValueError): the first operation the analysis cannot follow, by name.

    Reference: Chen et al., "Only Train Once", NeurIPS 2021, arXiv 2107.07467; OTOv2, ICLR 2023, arXiv 2303.06862.
    """
    graph_module = _trace(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # batch norms must not update their statistics on the sample
        with torch.no_grad():
            ShapeProp(graph_module).propagate(sample)
    finally:
        for module, mode in modes:
            module.training = mode
    modules = dict(model.named_modules())
    analysis = _Analysis(model, graph_module.graph, modules)
    positions = _positions(graph_module.graph, modules, int(sample.shape[0]))
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    dense_flops = sum(positions[name] * modules[name].weight.numel() for name in positions)

    sets: list[ChannelSet] = []
    fixed: dict[str, str] = {}
    found: list[Group] = []
    for index in sorted({analysis.find(i) for i in range(len(analysis.spaces))}):
        space = analysis.spaces[index]
        if not space.producers:
            continue  # the model's input: nothing produces it
        name = space.producers[0]
        if space.fixed is not None:
            fixed[name] = space.fixed
            continue
        for member in space.members:
            size = state[member.name].shape[member.dim]
            if size != space.width * member.block:  # an internal inconsistency, never a user's mistake
                raise RuntimeError(f"{member.name}: axis {member.dim} has {size}, channel set {name!r} expects "
                                   f"{space.width} x {member.block}")  # fmt: skip
        channel_set = ChannelSet(name, space.width, tuple(space.members))
        sets.append(channel_set)
        size, flops = 0, 0
        for member in space.members:
            if member.buffer:
                continue
            tensor = state[member.name]
            per_channel = tensor.numel() // tensor.shape[member.dim] * member.block
            size += per_channel
            if member.name == f"{member.module}.weight" and member.module in positions:
                flops += positions[member.module] * per_channel
        for c in range(space.width):
            found.append(Group(f"{name}[{c}]", name, c, channel_set.slices(c), size, flops))
    return Groups(tuple(sets), fixed, dense_flops, tuple(found))
