"""One small registry type, one instance per kind of part.

Parts register themselves where they are defined::

    @HALTING.register("mlp_gate")
    class MLPGate(HaltingPolicy): ...

and the builder (``zoo/build.py``) is the one place that looks names up. Names are
the public contract: they are what a :class:`~zoo.config.ModelConfig` stores, so a
config round-trips through JSON.

Parts defined outside the library are *plugins*: a module that registers them when it
is imported. A registry remembers the module that registered each name, so a checkpoint
can record it and :func:`zoo.load` can name it (:func:`plugin_parts`,
:func:`require_parts`); loading never imports code because a file says so. Plugins come
in three ways:

* ``import my_parts`` in your own code (or :func:`import_plugins`);
* ``--plugin MODULE`` on every recipe's command line (:func:`add_plugin_option`);
* an installed package's entry point in the group ``ponder_zoo.plugins``
  (:data:`PLUGIN_GROUP`), imported the first time a registry is asked for a name it does
  not hold, or for its list of names.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")

__all__ = [
    "Registry",
    "MODELS",
    "BLOCKS",
    "RECURRENCES",
    "HALTING",
    "CACHES",
    "REGISTRIES",
    "PARTS",
    "PLUGIN_GROUP",
    "available",
    "import_plugins",
    "add_plugin_option",
    "load_installed_plugins",
    "plugin_parts",
    "require_parts",
]

PLUGIN_GROUP = "ponder_zoo.plugins"
"""The entry-point group through which installed packages register parts."""


class Registry(Generic[T]):
    """A name -> object table for one kind of part.

    Args:
        kind: what the registry holds, used in error messages (``"halting"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._modules: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name``.

        Raises:
            ValueError: ``name`` is already taken in this registry.
        """

        def decorate(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T, module: str | None = None) -> None:
        """Registers ``obj`` under ``name``; a duplicate name raises ``ValueError``.

        Args:
            name: the public name.
            obj: what the name stands for.
            module: the module that registers it (default: ``obj.__module__``).
        """
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is already registered (by {self._entries[name]!r}); "
                f"pick another name"
            )
        self._entries[name] = obj
        self._modules[name] = module or getattr(obj, "__module__", None) or "?"

    def get(self, name: str) -> T:
        """Returns the entry called ``name``.

        Raises:
            ValueError: unknown name; the message lists the valid names and the closest one.
        """
        if name not in self:
            raise ValueError(self.unknown_message(name))
        return self._entries[name]

    def module_of(self, name: str) -> str:
        """The module that registered ``name`` (``"zoo.halting.act"``, ``"kl_halting"``)."""
        self.get(name)
        return self._modules[name]

    def is_builtin(self, name: str) -> bool:
        """Whether the library itself registers ``name``."""
        module = self.module_of(name)
        return module == "zoo" or module.startswith("zoo.")

    def unknown_message(self, name: object) -> str:
        """The error text for an unknown ``name``: valid names and the nearest match."""
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; valid {self.kind} names: {', '.join(names)}"

    def names(self) -> list[str]:
        """The registered names, sorted (installed plugins' included)."""
        load_installed_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name not in self._entries:
            load_installed_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


MODELS: Registry = Registry("model")
BLOCKS: Registry = Registry("block")
RECURRENCES: Registry = Registry("recurrence")
HALTING: Registry = Registry("halting")
CACHES: Registry = Registry("cache")

REGISTRIES: dict[str, Registry] = {
    "model": MODELS,
    "block": BLOCKS,
    "recurrence": RECURRENCES,
    "halting": HALTING,
    "cache": CACHES,
}


PARTS: dict[str, Registry] = {
    "block": BLOCKS,
    "recurrence": RECURRENCES,
    "halting": HALTING,
    "cache": CACHES,
}
"""The config fields that name a part, and the registry each is looked up in."""


def available(kind: str) -> list[str]:
    """The sorted names registered for ``kind``.

    Args:
        kind: one of ``"model"``, ``"block"``, ``"recurrence"``, ``"halting"``, ``"cache"``.

    Example:
        >>> import zoo
        >>> zoo.available("cache")
        ['kv_reuse', 'kv_share', 'recompute', 'recursion_wise']
    """
    if kind not in REGISTRIES:
        raise ValueError(f"unknown registry kind {kind!r}; valid kinds: {', '.join(REGISTRIES)}")
    return REGISTRIES[kind].names()


# Plugins ---------------------------------------------------------------------------------

_installed_loaded = False


def load_installed_plugins() -> list[str]:
    """Imports the installed packages' plugins (entry points in :data:`PLUGIN_GROUP`), once.

    A package registers its parts by declaring, in its ``pyproject.toml``::

        [project.entry-points."ponder_zoo.plugins"]
        my_parts = "my_package.parts"

    The registries call this the first time they are asked for a name they do not hold (or
    for their names), so installed parts are found without an import of your own. A
    plugin that fails to import is skipped with a warning.

    Returns:
        the entry points imported by this call (``name = value``), empty after the first.
    """
    global _installed_loaded
    if _installed_loaded:
        return []
    _installed_loaded = True
    loaded = []
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
        except Exception as err:  # a broken plugin must not break unrelated names
            warnings.warn(
                f"ponder-zoo plugin {point.name} = {point.value} (entry point group {PLUGIN_GROUP}) "
                f"failed to import and is skipped: {type(err).__name__}: {err}",
                stacklevel=2,
            )
            continue
        loaded.append(f"{point.name} = {point.value}")
    return loaded


def import_plugins(modules: Iterable[str]) -> list[ModuleType]:
    """Imports plugin modules so that the parts they define register.

    Args:
        modules: dotted module names (``"kl_halting"``, ``"my_package.parts"``), importable
            from ``sys.path``, or paths of ``.py`` files (imported under the file's stem, so
            ``path/to/kl_halting.py`` is the module ``kl_halting``). A module already
            imported is not imported again.

    Returns:
        the modules, in order.

    Raises:
        ValueError: a module cannot be found (the message says how to make it importable).

    Example:
        >>> from zoo.registry import import_plugins
        >>> [m.__name__ for m in import_plugins(["zoo.halting.act"])]   # any module imports
        ['zoo.halting.act']
    """
    if isinstance(modules, str):
        raise ValueError(f"import_plugins takes a list of modules, got the string {modules!r}; pass [{modules!r}]")
    imported = []
    for spec in modules:
        if spec.endswith(".py") or "/" in spec or "\\" in spec:
            imported.append(_import_file(Path(spec)))
            continue
        try:
            imported.append(importlib.import_module(spec))
        except ModuleNotFoundError as err:
            if err.name is None or not (spec == err.name or spec.startswith(err.name + ".")):
                raise  # the plugin itself imports something missing: its own error says what
            raise ValueError(
                f"cannot import plugin module {spec!r} ({err}); make it importable (run from its "
                f"folder with PYTHONPATH=., or pip install its package), or pass the path of its "
                f"file, e.g. --plugin path/to/{spec.rsplit('.', 1)[-1]}.py"
            ) from None
    return imported


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ValueError(f"plugin file {path} does not exist; pass a module name or the path of a .py file")
    name = path.stem
    module = sys.modules.get(name)
    if module is not None:
        if Path(getattr(module, "__file__", "") or "").resolve() != path.resolve():
            raise ValueError(
                f"plugin file {path} would be the module {name!r}, but a module of that name is already "
                f"imported from {getattr(module, '__file__', None)}; rename the file"
            )
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def add_plugin_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the recipes' repeatable ``--plugin MODULE`` option (read it with :func:`import_plugins`).

    Example:
        >>> import argparse
        >>> from zoo.registry import add_plugin_option
        >>> parser = add_plugin_option(argparse.ArgumentParser())
        >>> parser.parse_args(["--plugin", "kl_halting", "--plugin", "parts/gates.py"]).plugin
        ['kl_halting', 'parts/gates.py']
    """
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module (or .py file) that registers parts before anything is built or "
        "loaded; repeatable",
    )
    return parser


def plugin_parts(config: Any) -> list[dict[str, str]]:
    """The parts of ``config`` that the library does not define, with the module of each.

    What :func:`zoo.save` records in a checkpoint, so that loading it where the part is
    missing can say which module to import.

    Args:
        config: a :class:`~zoo.config.ModelConfig`.

    Returns:
        ``[{"kind": "halting", "name": "kl", "module": "kl_halting"}, ...]``, empty for a
        model of built-in parts only.
    """
    return [
        {"kind": kind, "name": getattr(config, kind), "module": registry.module_of(getattr(config, kind))}
        for kind, registry in PARTS.items()
        if not registry.is_builtin(getattr(config, kind))
    ]


def require_parts(config: dict[str, Any], plugins: Any, source: str) -> None:
    """Checks that every part a stored config names is registered; never imports anything.

    Args:
        config: the stored config (``ModelConfig.to_dict`` form).
        plugins: the stored :func:`plugin_parts` record (anything else counts as none).
        source: what is being read, for the message (a path).

    Raises:
        ValueError: a part is not registered; the message names the module that registered
            it when the file was written, and how to import it.
    """
    recorded = {}
    if isinstance(plugins, list):
        recorded = {
            (p.get("kind"), p.get("name")): p.get("module") for p in plugins if isinstance(p, dict)
        }
    for kind, registry in PARTS.items():
        name = config.get(kind) if isinstance(config, dict) else None
        if not isinstance(name, str) or name in registry:
            continue
        module = recorded.get((kind, name))
        if module is None:
            raise ValueError(
                f"{source}: {registry.unknown_message(name)}. If a plugin defines it, import its "
                f"module first (a recipe takes --plugin MODULE)"
            )
        if module == "__main__":
            raise ValueError(
                f"{source} uses {kind} {name!r}, which the script that saved it defined (module "
                f"'__main__'); move the class into a module, import it, and load again"
            )
        raise ValueError(
            f"{source} uses {kind} {name!r}, registered by the module {module!r} when it was saved. "
            f"Loading never imports code a file names: import it first (import {module}; a recipe "
            f"takes --plugin {module}), then load again"
        )

