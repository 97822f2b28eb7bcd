"""Health, readiness and storage accounting."""

from __future__ import annotations

from fastapi import APIRouter

from voxvault.api.deps import VaultDep
from voxvault.models import StorageInfo

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (it says nothing of the backends; see /readyz)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(vault: VaultDep) -> dict[str, str]:
    """Every backend answers now; 503 with the error body when one does not."""
    await vault.check_ready()
    return {"status": "ready"}


@router.get("/v1/storage-info")
async def storage_info(vault: VaultDep) -> StorageInfo:
    """Backends in use, what they hold, and free space where the backend knows it."""
    return await vault.storage_info()
