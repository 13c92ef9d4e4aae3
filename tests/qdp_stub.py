"""A stand-in for ``tensorrt`` / ``tensorrt.plugin`` that records the plugin definitions.

TensorRT cannot be installed where deploykit's tests run, so the plugin modules are imported
against this stub: each decorator records its function, and the AOT implementation can be
called with tensor descriptors whose shape expressions are plain integers (``is_constant``)
or unknowns, to check what it returns (kernel name, PTX, launch grid, extra arguments). It
mirrors only the parts of the API the plugins use.
"""

from __future__ import annotations

import enum
import importlib
import sys
import types


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7


class Expr:
    """A shape expression: an int when constant, a named unknown otherwise."""

    def __init__(self, value, constant: bool = True):
        self.value, self.is_constant = value, constant

    @property
    def constant_value(self) -> int:
        assert self.is_constant, f"{self.value} is not constant"
        return self.value

    def _op(self, other, fn, sym):
        o = other if isinstance(other, Expr) else Expr(other)
        if self.is_constant and o.is_constant:
            return Expr(fn(self.value, o.value))
        return Expr(f"({self.value} {sym} {o.value})", constant=False)

    def __add__(self, o): return self._op(o, lambda a, b: a + b, "+")
    def __radd__(self, o): return Expr(o)._op(self, lambda a, b: a + b, "+")
    def __sub__(self, o): return self._op(o, lambda a, b: a - b, "-")
    def __rsub__(self, o): return Expr(o)._op(self, lambda a, b: a - b, "-")
    def __mul__(self, o): return self._op(o, lambda a, b: a * b, "*")
    def __rmul__(self, o): return Expr(o)._op(self, lambda a, b: a * b, "*")
    def __floordiv__(self, o): return self._op(o, lambda a, b: a // b, "//")
    def __rfloordiv__(self, o): return Expr(o)._op(self, lambda a, b: a // b, "//")

    def __repr__(self):
        return f"Expr({self.value!r})"


def value(x):
    return x.value if isinstance(x, Expr) else x


class TensorDesc:
    def __init__(self, dtype: DataType, shape):
        self.dtype = dtype
        self.shape_expr = [d if isinstance(d, Expr) else Expr(d, constant=not isinstance(d, str)) for d in shape]

    def like(self):
        return TensorDesc(self.dtype, list(self.shape_expr))


class KernelLaunchParams:
    grid_x = grid_y = grid_z = 1
    block_x = block_y = block_z = 1
    shared_mem = 0


class SymInt32:
    def __init__(self, expr):
        self.expr = expr


class SymIntExprs(list):
    def __init__(self, n: int):
        super().__init__([None] * n)


class AutoTuneCombination:
    def __init__(self, *args):
        self.positions: dict[int, str] = {}
        self.tactic_ids: list[int] = []

    def pos(self, where, types_):
        for i in ([where] if isinstance(where, int) else where):
            self.positions[i] = types_

    def tactics(self, ids):
        self.tactic_ids = list(ids)


def install(monkeypatch) -> dict[str, dict]:
    """Put the stub in ``sys.modules``; returns ``{kind: {"ns::Op": function}}`` it fills."""
    registry: dict[str, dict] = {"register": {}, "autotune": {}, "aot_impl": {}, "impl": {}}

    def decorator(kind):
        def make(name):
            def record(fn):
                registry[kind][name] = fn
                return fn
            return record
        return make

    plugin = types.ModuleType("tensorrt.plugin")
    for kind in registry:
        setattr(plugin, kind, decorator(kind))
    for cls in (TensorDesc, KernelLaunchParams, SymInt32, SymIntExprs, AutoTuneCombination):
        setattr(plugin, cls.__name__, cls)
    plugin.Tensor = object
    trt = types.ModuleType("tensorrt")
    trt.plugin = plugin
    trt.DataType = DataType
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
    return registry


def import_plugins(monkeypatch, *modules: str) -> dict[str, dict]:
    registry = install(monkeypatch)
    for module in modules:
        monkeypatch.delitem(sys.modules, module, raising=False)
        importlib.import_module(module)
        monkeypatch.delitem(sys.modules, module, raising=False)    # no stub-bound module left behind
    return registry
