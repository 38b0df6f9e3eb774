"""One implementation registry for every op: a record per implementation, one selection.

In the style of tokamax's ragged_dot: each op (gmm, dispatch, top_k, combine_grad) is an `Op`
holding one `Impl` record per implementation, and `Op.select` picks one by name, by a list of
names (the first that applies wins) or, for None, by the backend's order of preference. Every
fact about an implementation (where it runs, whether it runs interpreted, whether it gathers
rows itself, why it does not apply here) is a field of its record.
"""

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    Attributes:
      name: what `implementation=` names it by.
      module: the module with its functions, or its import path (imported on first use).
      backends: the backends it runs on compiled; None for any.
      interpretable: a Pallas kernel that runs on any backend in interpret mode.
      gathers_rows: reads operand rows by index itself (e.g. gmm's `lhs_rows`), instead of
        being handed gathered rows.
      unavailable: `() -> reason or None`, e.g. why a native kernel did not build.
      rejects: `(**problem) -> reason or None`: why it cannot run this problem (dtypes,
        shapes), phrased to follow its name ("needs ..."); the problem's keys are the op's.
      preferred: `(**problem) -> bool`: whether the default picks it for this problem where
        it applies (a measured crossover, e.g. a largest k); names given explicitly skip it.
    """

    name: str
    module: str | ModuleType | None = None
    backends: tuple[str, ...] | None = None
    interpretable: bool = False
    gathers_rows: bool = False
    unavailable: Callable[[], str | None] = lambda: None
    rejects: Callable[..., str | None] = lambda **problem: None
    preferred: Callable[..., bool] = lambda **problem: True

    def why_not(self, backend: str, interpret: bool, problem: dict[str, Any]) -> str | None:
        """Why this implementation cannot run here, or None when it can."""
        on_backend = self.backends is None or backend in self.backends
        if not (on_backend or (interpret and self.interpretable)):
            where = "any backend interpreted" if self.interpretable else "those backends"
            return f"runs on {self.backends} (or {where}), not {backend!r}"
        missing = self.unavailable()
        return f"is unavailable: {missing}" if missing else self.rejects(**problem)

    def load(self) -> ModuleType:
        """The implementation's module."""
        if isinstance(self.module, str):
            return importlib.import_module(self.module)
        return self.module


def native_cpu(module: ModuleType, **traits) -> Impl:
    """The `cpu_ffi` record of a native CPU kernel module (one with `why_unavailable`)."""
    return Impl("cpu_ffi", module, ("cpu",), unavailable=module.why_unavailable, **traits)


@dataclasses.dataclass(frozen=True)
class Op:
    """An op's implementations and its backends' orders of preference.

    Attributes:
      name: the op's name in error messages.
      impls: one record per implementation.
      defaults: backend -> names in order of preference for `implementation=None`; the key
        `"*"` serves any other backend. The last name of each list must always apply.
    """

    name: str
    impls: tuple[Impl, ...]
    defaults: dict[str, tuple[str, ...]]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.impls)

    def __getitem__(self, name: str) -> Impl:
        return next(i for i in self.impls if i.name == name)

    def select(
        self, implementation: str | Sequence[str] | None, *, interpret=False, **problem
    ) -> Impl:
        """The implementation to run on `jax.default_backend()`.

        Args:
          implementation: a name, a sequence of names (the first that applies wins) or None
            (the first of the backend's defaults that applies and is preferred).
          interpret: Pallas kernels apply on any backend when interpreted.
          **problem: the op's problem description for `rejects` / `preferred`.

        Raises:
          ValueError: an unknown name (naming the allowed ones), or none of the names applies
            (saying why for each).
        """
        backend = jax.default_backend()
        interpret = bool(interpret)
        if implementation is None:
            names = self.defaults.get(backend, self.defaults["*"])
            fits = lambda i: (
                i.why_not(backend, interpret, problem) is None and i.preferred(**problem)
            )
            return next((self[n] for n in names if fits(self[n])), self[names[-1]])
        names = [implementation] if isinstance(implementation, str) else list(implementation)
        for name in names:
            if name not in self.names:
                raise ValueError(
                    f"unknown {self.name} implementation {name!r}; allowed: {self.names}"
                )
        reasons = []
        for name in names:
            why = self[name].why_not(backend, interpret, problem)
            if why is None:
                return self[name]
            reasons.append(f"{name} {why}")
        raise ValueError(
            f"no {self.name} implementation among {names} runs on backend {backend!r} "
            f"(interpret={interpret}; {'; '.join(reasons)})"
        )

    def resolve(
        self, implementation: str | Sequence[str] | None = None, *, interpret=False, **problem
    ) -> str:
        """The name `select` picks (each op's `resolve_implementation`)."""
        return self.select(implementation, interpret=interpret, **problem).name
