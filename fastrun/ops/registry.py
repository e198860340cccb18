"""The implementation registry: every way fastrun knows to compute an operator.

An implementation is data plus a builder. Registering one is a single decorated function::

    from fastrun import implementation, OpSpec
    from fastrun.ops.builtin import estimates

    @implementation("Conv", "my_conv", version=1, in_format="NCHW", out_format="NCHW",
                    applies=lambda spec: spec.attr("group") == 1,
                    cost=lambda spec: estimates.direct_flops(spec) / 50e6)  # ms at 50 GFLOP/s
    def build_my_conv(spec: OpSpec, consts: dict[int, np.ndarray]):
        w = consts[1]                     # pre-transform weights here, once
        def run(x):                       # x arrives in ``in_format``
            ...
            return y                      # y leaves in ``out_format``
        return run

Two kinds exist:

* ``kind="host"``: the builder returns a Python callable taking the node's runtime
  (non-constant) inputs in order and returning its single output.
* ``kind="onnx"``: the builder returns an :class:`OnnxFragment`, ONNX nodes that onnxruntime
  runs. The executor merges consecutive fragments into one onnxruntime session, so these pay no
  per-node Python dispatch.

The builder sees only an :class:`OpSpec` (shapes, dtype, normalized attributes) and the
constant inputs, never the graph: that is what makes timings reusable across models.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from fastrun.ops import formats
from fastrun.shapes import Shape, dims_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpSpec:
    """What an implementation needs to know about one node, and nothing about the graph.

    ``inputs`` holds the shape of every input (None for an omitted optional input);
    ``const`` marks which of them are constants (weights, biases) known at build time.
    ``attrs`` are the ONNX attributes with defaults filled in (see graph.normalize_attrs).
    ``activation`` is a fused element-wise op that follows the node (``"Relu"``, ``"Clip"``...)
    with ``activation_params`` (Clip: min, max; LeakyRelu: alpha), or None.
    """

    op_type: str
    inputs: tuple[Optional[Shape], ...]
    const: tuple[bool, ...]
    output: Shape
    dtype: str = "float32"
    attrs: tuple[tuple[str, Any], ...] = ()
    activation: Optional[str] = None
    activation_params: tuple[float, ...] = ()
    domain: str = ""

    @property
    def has_sum(self) -> bool:
        """A Conv with a fused residual: input 3 is a runtime tensor added before the activation."""
        return self.op_type == "Conv" and len(self.inputs) > 3 and self.inputs[3] is not None

    def attr(self, name: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    @property
    def runtime_inputs(self) -> list[int]:
        """Indices of the inputs that arrive at run time (the callable's arguments)."""
        return [i for i, (shape, c) in enumerate(zip(self.inputs, self.const)) if not c and shape is not None]

    def to_json(self) -> dict:
        return {
            "op_type": self.op_type,
            "domain": self.domain,
            "inputs": [None if s is None else list(s) for s in self.inputs],
            "const": list(self.const),
            "output": list(self.output),
            "dtype": self.dtype,
            "attrs": {k: v for k, v in self.attrs},
            "activation": self.activation,
            "activation_params": list(self.activation_params),
        }

    @classmethod
    def from_json(cls, d: dict) -> "OpSpec":
        return cls(
            op_type=d["op_type"],
            domain=d.get("domain", ""),
            inputs=tuple(None if s is None else tuple(s) for s in d["inputs"]),
            const=tuple(d["const"]),
            output=tuple(d["output"]),
            dtype=d["dtype"],
            attrs=tuple(sorted((k, _freeze(v)) for k, v in d["attrs"].items())),
            activation=d.get("activation"),
            activation_params=tuple(d.get("activation_params", ())),
        )

    def key(self) -> str:
        """Stable hash of the spec: equal specs profile the same way on the same machine."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:32]

    def describe(self) -> str:
        """Short human-readable form for tables."""
        shapes = dims_text(self.inputs[0]) if self.inputs else "?"
        if self.op_type == "Conv" and len(self.inputs) > 1:
            w = self.inputs[1]
            extra = f" k{dims_text(w[2:])} s{self.attr('strides', [1])[0]}"
            g = self.attr("group", 1)
            return f"{shapes} -> {w[0]}ch{extra}" + (f" g{g}" if g != 1 else "")
        if len(self.inputs) > 1:
            return f"{shapes} @ {dims_text(self.inputs[1])}"
        return shapes


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


@dataclass
class OnnxFragment:
    """ONNX nodes computing one operator, to be merged into an onnxruntime session.

    ``nodes`` read the runtime inputs by the names given to the builder's ``emit`` call and write
    the output name; ``initializers`` are the (pre-transformed) constants the nodes need.
    """

    nodes: list  # list[onnx.NodeProto]
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    opsets: dict[str, int] = field(default_factory=dict)


HostKernel = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Implementation:
    """One registered way of computing ``op_type``.

    ``version`` is part of every cache key: bump it whenever the builder's numerics or speed
    characteristics change, so stale timings are never reused.
    """

    op_type: str
    name: str
    version: int
    in_format: str
    out_format: str
    kind: str  # "host" or "onnx"
    build: Callable
    applies: Callable[[OpSpec], bool]
    heuristic_rank: int
    description: str
    module: str
    sum_input: bool = False
    prepare: Optional[Callable[[], None]] = None  # one-time process-wide setup (JIT compilation)
    cost: Optional[Callable[[OpSpec], float]] = None  # estimated ms for the heuristic plan
    # Computes what direct evaluation computes, up to summation order: False for algorithms that
    # trade accuracy for operations (Winograd, FFT). Exact mode (plan.exact) runs only these.
    exact: bool = True

    @property
    def is_onnxruntime_kernel(self) -> bool:
        """Whether onnxruntime computes it (its kernels, any layout): the baseline host kernels
        are compared with, and what runs merged into onnxruntime sessions."""
        return self.kind == "onnx"

    def input_formats(self, spec: OpSpec) -> tuple[str, ...]:
        """Format of each runtime input: the first in ``in_format``, a fused residual in
        ``out_format`` (it is added to the output), any other plain."""
        fin, fout = resolve_format(self.in_format), resolve_format(self.out_format)
        fmts = []
        for j, i in enumerate(spec.runtime_inputs):
            fmts.append(fin if j == 0 else fout if (spec.has_sum and i == 3) else formats.NCHW)
        return tuple(fmts)

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def formats_ok(self, spec: OpSpec) -> bool:
        fmt_in = resolve_format(self.in_format)
        fmt_out = resolve_format(self.out_format)
        if fmt_in is None or fmt_out is None:
            return False
        return formats.applicable(spec.inputs[0], fmt_in) and formats.applicable(spec.output, fmt_out)

    def accepts(self, spec: OpSpec) -> bool:
        """Whether this implementation can compute ``spec`` (a predicate that raises says no)."""
        if spec.op_type != self.op_type or not self.formats_ok(spec):
            return False
        if spec.has_sum and not self.sum_input:
            return False
        try:
            return bool(self.applies(spec))
        except Exception as exc:  # a buggy predicate must not take profiling down
            log.warning("applicability check of %s raised %s; treating as not applicable", self.id, exc)
            return False


def resolve_format(fmt: str) -> Optional[str]:
    """``"NCHWc"`` (no block) means the machine's native block; None if the machine has none."""
    if fmt == "NCHWc":
        b = formats.native_block_size()
        return formats.blocked(b) if b else None
    return fmt


_REGISTRY: dict[str, Implementation] = {}


def implementation(
    op_type: str,
    name: str,
    *,
    version: int = 1,
    in_format: str = formats.NCHW,
    out_format: Optional[str] = None,
    kind: str = "host",
    applies: Callable[[OpSpec], bool] = lambda spec: True,
    heuristic_rank: int = 100,
    sum_input: bool = False,
    prepare: Optional[Callable[[], None]] = None,
    cost: Optional[Callable[[OpSpec], float]] = None,
    replace: bool = False,
    exact: bool = True,
) -> Callable[[Callable], Callable]:
    """Register the decorated builder as an implementation of ``op_type``.

    ``in_format``/``out_format`` are the formats of the first runtime input and of the output
    (``"NCHWc"`` means the machine's native block). ``heuristic_rank`` orders candidates when no
    profile exists: the lowest-ranked applicable one is the heuristic choice. ``sum_input``
    declares that the builder handles a Conv with a fused residual (``spec.has_sum``: input 3,
    in the output format, added before the activation). ``prepare`` is called once per process
    before the implementation is profiled, outside any time limit (and before the profiler forks
    its workers, which inherit its work): for one-time setup such as JIT compilation.
    ``cost(spec) -> ms`` estimates its time for the heuristic plan, made when nothing was
    measured (``fastrun.ops.builtin.estimates`` has the units); without one it is priced as a
    direct algorithm at the nominal rate, slowed by ``heuristic_rank`` percent. ``exact`` says the
    algorithm computes the direct result up to summation order (False: Winograd, FFT, anything
    approximate): exact mode keeps only exact implementations.
    """
    if kind not in ("host", "onnx"):
        raise ValueError(f"kind must be 'host' or 'onnx', not {kind!r}")

    def register(builder: Callable) -> Callable:
        key = f"{op_type}/{name}"
        if key in _REGISTRY and not replace:
            existing = _REGISTRY[key]
            if existing.module != builder.__module__ or existing.build.__qualname__ != builder.__qualname__:
                raise ValueError(f"implementation {key} is already registered by {existing.module}")
        _REGISTRY[key] = Implementation(
            op_type=op_type,
            name=name,
            version=version,
            in_format=in_format,
            out_format=out_format or in_format,
            kind=kind,
            build=builder,
            applies=applies,
            heuristic_rank=heuristic_rank,
            description=(builder.__doc__ or "").strip().split("\n")[0],
            module=builder.__module__,
            sum_input=sum_input,
            prepare=prepare,
            cost=cost,
            exact=exact,
        )
        return builder

    return register


def unregister(op_type: str, name: str) -> None:
    _REGISTRY.pop(f"{op_type}/{name}", None)


def all_implementations() -> list[Implementation]:
    return sorted(_REGISTRY.values(), key=lambda i: (i.op_type, i.heuristic_rank, i.name))


def get(op_type: str, name: str) -> Implementation:
    try:
        return _REGISTRY[f"{op_type}/{name}"]
    except KeyError:
        raise KeyError(f"implementation {name} of {op_type} is not registered") from None


def by_id(op_type: str, impl_id: str) -> Implementation:
    """The implementation a plan names (``"name@version"``); KeyError saying why if it is gone."""
    impl = get(op_type, impl_id.split("@")[0])
    if impl.id != impl_id:
        raise KeyError(f"implementation {impl_id} changed version (now {impl.id})")
    return impl


def is_onnxruntime_kernel(op_type: str, impl_id: str) -> bool:
    """Whether a plan's or a timing's implementation id names one of onnxruntime's kernels
    (False for one no longer registered)."""
    try:
        return by_id(op_type, impl_id).is_onnxruntime_kernel
    except KeyError:
        return False


def onnxruntime_nchw_kernel(impls: list[Implementation]) -> Optional[Implementation]:
    """The one of ``impls`` that is onnxruntime's kernel in plain NCHW: the node as an onnxruntime
    session of the original model runs it, before its own layout rewrites."""
    return next((i for i in impls if i.is_onnxruntime_kernel and i.in_format == i.out_format == formats.NCHW), None)


def candidates(spec: OpSpec) -> list[Implementation]:
    """Every registered implementation that accepts ``spec``, heuristic order first."""
    return [impl for impl in all_implementations() if impl.accepts(spec)]


def heavy_op_types() -> set[str]:
    """Op types that have registered implementations (the ones fastrun selects for)."""
    return {impl.op_type for impl in all_implementations()}
