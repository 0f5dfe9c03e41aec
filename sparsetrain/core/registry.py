"""Methods registered by name: ``@register("acdc")`` on a Sparsifier subclass, ``create("acdc", model, ...)``."""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any

from torch import nn

from .capabilities import check_capabilities
from .sparsifier import Sparsifier

_REGISTRY: dict[str, type[Sparsifier]] = {}


def register(name: str):
    """Class decorator: register a Sparsifier subclass under a lower-case ``name``.

    Refuses a class whose ``capabilities`` is not a :class:`~sparsetrain.core.Capability`, or whose flags disagree
    with the queries it overrides (``check_capabilities``).
    """
    if name != name.lower() or not name:
        raise ValueError(f"method names are lower-case and non-empty, got {name!r}")

    def decorate(cls: type[Sparsifier]) -> type[Sparsifier]:
        if not (isinstance(cls, type) and issubclass(cls, Sparsifier)):
            raise ValueError(f"method {name!r}: only Sparsifier subclasses can be registered, got {cls!r}")
        check_capabilities(cls)
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching the glob ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_method(name: str) -> type[Sparsifier]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _REGISTRY[name]


def common_options() -> dict[str, Any]:
    """The keywords every method accepts (``Sparsifier``'s own), with defaults."""
    return _options(Sparsifier)


def method_options(name: str) -> dict[str, Any]:
    """Every keyword a method accepts (its own and the common ones), with defaults."""
    return _options(get_method(name))


def _options(cls: type[Sparsifier]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, Sparsifier)):
            continue
        for param in inspect.signature(klass.__init__).parameters.values():
            if param.kind is param.KEYWORD_ONLY:
                options[param.name] = None if param.default is param.empty else param.default
    return options


def method_summary(name: str) -> str:
    """First line of the method's docstring."""
    doc = inspect.getdoc(get_method(name)) or ""
    return doc.splitlines()[0] if doc else ""


def create(name: str, model: nn.Module, *, sparsity: float | None = None, **config: Any) -> Sparsifier:
    """Build the sparsifier registered as ``name`` for ``model``.

    Example::

        sparsifier = sparsetrain.create("acdc", model, sparsity=0.9, total_epochs=100,
                                        steps_per_epoch=len(loader))
        sparsifier.attach(optimizer)
    """
    cls = get_method(name)
    allowed = method_options(name)
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(
            f"method {name!r} has no option {', '.join(map(repr, unknown))}; its options are: "
            f"{', '.join(sorted(k for k in allowed if k != 'sparsity'))}"
        )
    return cls(model, sparsity=sparsity, **config)
