"""Implementation selection shared by the ops' APIs: a name, or a sequence where the first
name that applies wins."""

from collections.abc import Callable, Sequence

import jax


def first_applicable(
    op: str,
    implementation: str | Sequence[str],
    allowed: Sequence[str],
    applies: Callable[[str], bool],
    detail: Callable[[list[str]], str] = lambda names: "",
) -> str:
    """The first name of ``implementation`` for which ``applies(name)`` holds.

    Args:
      op: the op's name in error messages (``"gmm"``, ``"top_k"``, ...).
      implementation: one name or a sequence of names.
      allowed: every valid name.
      applies: whether a (valid) name can run here.
      detail: the names that were asked for -> text appended to the error when none applies
        (called only then, e.g. to say why a native kernel did not build).

    Raises:
      ValueError: an unknown name (naming the allowed ones), or none of the names applies.
    """
    names = [implementation] if isinstance(implementation, str) else list(implementation)
    for name in names:
        if name not in allowed:
            raise ValueError(f"unknown {op} implementation {name!r}; allowed: {tuple(allowed)}")
    for name in names:
        if applies(name):
            return name
    backend = jax.default_backend()
    raise ValueError(
        f"no {op} implementation among {names} runs on backend {backend!r}{detail(names)}"
    )
