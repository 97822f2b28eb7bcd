"""The HTTP API front-end."""

from voxvault.api.app import create_app

__all__ = ["create_app"]
