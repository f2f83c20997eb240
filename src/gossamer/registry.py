"""Name -> object registries, so every part is selectable from a config by name.

Installed packages add parts through the ``gossamer.plugins`` entry point group (see
docs/api.md): :func:`load_plugins` imports each entry point once (a module registers its
parts when imported; a callable is also called). The CLI loads plugins at start, the Python
API before a run, and a registry loads them on a lookup miss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Generic, TypeVar

from gossamer.errors import UserError

T = TypeVar("T")

PLUGIN_GROUP = "gossamer.plugins"


class PluginError(UserError):
    """An installed plugin failed to load; the message is one line naming it."""


class Registry(Generic[T]):
    """A named table of parts (datasets, partitioners, topologies, models, algorithms...).

    >>> topologies = Registry("topology")
    >>> @topologies.register("ring")
    ... def ring(n): ...
    >>> topologies.get("ring")  # doctest: +ELLIPSIS
    <function ring at ...>
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator registering a part as ``name``; a taken name is an error unless
        ``replace`` (e.g. a notebook cell run twice)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._items and not replace:
                old = self._items[name]
                where = getattr(old, "__module__", None)
                by = f" (by {where})" if where else ""
                raise ValueError(f"{self.kind} {name!r} is already registered{by}; choose another "
                                 "name, or pass replace=True to replace it")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            pass
        note = ""
        try:
            load_plugins()
        except PluginError as exc:
            note = f" ({exc})"
        if name in self._items:
            return self._items[name]
        known = ", ".join(sorted(self._items))
        raise KeyError(f"unknown {self.kind} {name!r}; known: {known}{note}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if name in self._items:
            return True
        try:
            load_plugins()
        except PluginError:
            pass                         # reported by get(), the CLI and gossamer.run
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


_plugin_errors: list[str] | None = None      # None: not loaded yet


def load_plugins() -> list[str]:
    """Import every ``gossamer.plugins`` entry point once; return their names.

    An entry point names a module (importing it registers its parts) or a callable
    (``package.module:register``), which is called with no arguments. A plugin that fails
    raises :class:`PluginError`, one line naming it; later calls raise the same error
    without importing anything again.
    """
    global _plugin_errors
    if _plugin_errors is None:
        _plugin_errors = []            # set first: a plugin's own lookups must not recurse
        for ep in _entry_points():
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, ModuleType):
                    obj()
            except Exception as exc:   # noqa: BLE001  (any failure of user code is one line)
                text = " ".join(str(exc).split()) or type(exc).__name__
                _plugin_errors.append(f"plugin {ep.name!r} ({ep.value}) failed to load: "
                                      f"{type(exc).__name__}: {text}")
            else:
                _loaded.append(ep.name)
    if _plugin_errors:
        more = len(_plugin_errors) - 1
        raise PluginError(_plugin_errors[0] + (f" (and {more} more plugin(s))" if more else ""))
    return list(_loaded)


_loaded: list[str] = []


def _entry_points() -> list:
    from importlib.metadata import entry_points

    seen, out = set(), []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: (e.name, e.value)):
        if (ep.name, ep.value) not in seen:      # a distribution found twice on sys.path
            seen.add((ep.name, ep.value))
            out.append(ep)
    return out


def loaded_plugins() -> list[str]:
    """The names of the plugins loaded so far (without loading any)."""
    return list(_loaded)


def reset_plugins() -> None:
    """Forget that plugins were loaded (tests); registered parts stay registered."""
    global _plugin_errors
    _plugin_errors = None
    _loaded.clear()
