"""Which family runs which tool type: the ``botworker.tools`` entry-point group, read once per process.

Built-in families are registered by setup.py exactly as a third party's package would register its own::

    entry_points={"botworker.tools": ["http = botworker.tools.http", ...]}

so a deployment adds a tool type by ``pip install``-ing a package that declares one more entry point. A type
claimed by two families, or a plugin that fails to import or lacks ``TYPES``/``run``, is a configuration error at
start-up (exit 3), never a surprise at the first message. When botworker runs from a source tree that was not
installed (no entry points at all), the built-in families are used and a warning says plugins are not loaded.
"""

from __future__ import annotations

import functools
import importlib
import logging
from importlib.metadata import entry_points
from typing import Any

from ..errors import ConfigError
from . import Family

log = logging.getLogger(__name__)
GROUP = "botworker.tools"
BUILTIN = {
    "platform": "botworker.tools.platform",
    "http": "botworker.tools.http",
    "database": "botworker.tools.database",
    "sandboxed": "botworker.tools.sandboxed",
    "workflow": "botworker.tools.workflow",
}


def load() -> dict[str, Family]:
    """tool type -> family, from the entry points (or the built-ins when botworker is not installed)."""
    found = {(ep.name, ep.value): ep for ep in entry_points(group=GROUP)}  # a dist seen twice on sys.path: once
    sources: list[tuple[str, Any]] = []
    if not any(value in BUILTIN.values() for _, value in found):
        log.warning("botworker is not installed (no %s entry points): using the built-in tool types only", GROUP)
        sources = [
            (f"{name} = {module}", lambda m=module: importlib.import_module(m)) for name, module in BUILTIN.items()
        ]
    for (name, value), ep in sorted(found.items()):
        sources.append((f"{name} = {value}", ep.load))
    registry: dict[str, Family] = {}
    origin: dict[str, str] = {}
    for label, loader in sources:
        try:
            family = loader()
        except Exception as exc:  # a plugin's import error, whatever it is, is reported as configuration
            raise ConfigError(f"tool plugin {label} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        types = getattr(family, "TYPES", None)
        if (
            not isinstance(types, tuple)
            or not all(isinstance(t, str) for t in types)
            or not callable(getattr(family, "run", None))
        ):
            raise ConfigError(f"tool plugin {label} must define TYPES (a tuple of strings) and run(call, tool, ctx)")
        for tool_type in types:
            if tool_type in registry:
                raise ConfigError(f"tool type {tool_type!r} is registered twice: by {origin[tool_type]} and {label}")
            registry[tool_type], origin[tool_type] = family, label
    return registry


@functools.cache
def default() -> dict[str, Family]:
    """This process's registry (loaded at first use; the supervisor loads it at start-up to fail early)."""
    return load()
