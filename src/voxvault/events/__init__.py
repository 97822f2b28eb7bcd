"""Progress events behind the EventBus port, chosen by URL and imported lazily."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from voxvault.errors import ConfigurationError
from voxvault.events.base import (
    TERMINAL_STATUSES,
    EventBus,
    EventBusClosed,
    ProgressEvent,
    Subscription,
)

__all__ = [
    "TERMINAL_STATUSES",
    "EventBus",
    "EventBusClosed",
    "ProgressEvent",
    "Subscription",
    "open_event_bus",
]

# kind -> (module, factory, extra that provides its dependencies)
_ADAPTERS: dict[str, tuple[str, str, str | None]] = {
    "memory": ("voxvault.events.memory", "InMemoryEventBus", None),
}

# Known kinds this build does not ship: they get a clearer message than "unsupported".
_SCALE_OUT = frozenset({"redis", "rediss"})


def open_event_bus(url: str) -> EventBus:
    """The bus ``url`` names: ``memory`` (or ``memory://``) keeps events in this process."""
    kind = urlsplit(url).scheme if "://" in url else url.strip()
    if kind not in _ADAPTERS:
        known = ", ".join(sorted(_ADAPTERS))
        reason = (
            f"{kind}:// (Redis Streams) comes with the scale-out setup and is not supported in "
            "this build"
            if kind in _SCALE_OUT
            else "unsupported"
        )
        raise ConfigurationError(f"event bus URL {url!r}: {reason}; use one of: {known}")
    module_name, factory_name, extra = _ADAPTERS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # pragma: no cover - depends on which extras are installed
        hint = f"pip install 'voxvault[{extra}]'" if extra else "reinstall voxvault"
        raise ConfigurationError(f"the {kind} event bus needs: {hint} ({exc})") from exc
    bus: EventBus = getattr(module, factory_name).from_url(url)
    return bus
