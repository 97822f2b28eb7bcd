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
    "redis": ("voxvault.events.redis", "RedisEventBus", "redis"),
    "rediss": ("voxvault.events.redis", "RedisEventBus", "redis"),
}


def open_event_bus(url: str) -> EventBus:
    """The bus ``url`` names: ``memory`` (or ``memory://``) keeps events in this process;
    ``redis://host:6379/0`` (or ``rediss://``, TLS) shares them between processes through Redis
    Streams, with keys under ``?prefix=`` (default ``voxvault:events``)."""
    kind = urlsplit(url).scheme if "://" in url else url.strip()
    if kind not in _ADAPTERS:
        known = ", ".join(sorted(_ADAPTERS))
        raise ConfigurationError(f"event bus URL {url!r}: unsupported; use one of: {known}")
    module_name, factory_name, extra = _ADAPTERS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # pragma: no cover - depends on which extras are installed
        hint = f"pip install 'voxvault[{extra}]'" if extra else "reinstall voxvault"
        raise ConfigurationError(f"the {kind} event bus needs: {hint} ({exc})") from exc
    bus: EventBus = getattr(module, factory_name).from_url(url)
    return bus
