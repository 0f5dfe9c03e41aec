"""Named registries for the axes a run is assembled from: datasets, models, LR schedules, comm hooks.

Each axis keeps one :class:`Registry`: an entry is added in one place (a decorator beside its code), and
everything that offers a choice (the CLI's help, the config validation, the error for an unknown name, the
tests parametrized over the registry) reads it from there. Methods have their own registry in
:mod:`sparsetrain.core.registry`, which works the same way.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Entry", "Registry"]


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered choice: its name, the object it stands for, a one-line help text and free metadata."""

    name: str
    obj: T
    help: str
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Choices of one kind (``"dataset"``, ``"model"``, ...) by lower-case name, in the order they were registered.

    >>> colors = Registry("color")
    >>> @colors.register("red", help="the colour of stop signs")
    ... def red() -> str:
    ...     return "#f00"
    >>> colors.names(), colors.get("red")()
    (['red'], '#f00')
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, help: str | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``.

        ``help`` defaults to the first line of the object's docstring; ``meta`` is kept on the entry for the
        registry's owner (a model's example input shape, a schedule's warm-up rule, ...).
        """
        if not isinstance(name, str) or not name or name != name.lower():
            raise ValueError(f"{self.kind} names are lower-case and non-empty, got {name!r}")

        def decorate(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            doc = inspect.getdoc(obj) or ""
            text = help if help is not None else (doc.splitlines()[0] if doc else "")
            self._entries[name] = Entry(name, obj, text, dict(meta))
            return obj

        return decorate

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching the glob ``pattern``, in registration order."""
        return [n for n in self._entries if fnmatch.fnmatchcase(n, pattern)]

    def entry(self, name: str) -> Entry[T]:
        """The entry registered as ``name``; ValueError naming the choices if there is none."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}")
        return self._entries[name]

    def get(self, name: str) -> T:
        """The object registered as ``name``; ValueError naming the choices if there is none."""
        return self.entry(name).obj

    def check_options(self, name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """``options`` checked against those entry ``name`` declares in its ``options`` meta (option: default), as a
        plain dict; ValueError naming the allowed options for an unknown one, or a value not of its default's type
        (a float option takes an int; an option whose default is None takes an int)."""
        options = dict(options or {})
        declared: Mapping[str, Any] = self.entry(name).meta.get("options", {})
        unknown = sorted(set(options) - set(declared))
        if unknown:
            allowed = ", ".join(f"{k} (default {v!r})" for k, v in declared.items()) or "none"
            names = ", ".join(map(repr, unknown))
            raise ValueError(f"{self.kind} {name!r} has no option {names}; its options: {allowed}")
        for option, value in options.items():
            default = declared[option]
            wanted = (int,) if default is None else (float, int) if isinstance(default, float) else (type(default),)
            # bool is an int in Python: an int option must not silently take True, nor a bool option 1.
            if value is not None and (not isinstance(value, wanted) or isinstance(value, bool) != (bool in wanted)):
                raise ValueError(
                    f"{self.kind} {name!r}: option {option} expects {' or '.join(t.__name__ for t in wanted)}, "
                    f"got {value!r}"
                )
        return options

    def help_text(self) -> str:
        """``"a, b or c"``: the choices, for a one-line option help."""
        names = list(self._entries)
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
