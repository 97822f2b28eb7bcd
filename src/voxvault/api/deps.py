"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from voxvault.vault import Vault


async def get_vault(request: Request) -> Vault:
    # async: a plain def would cost a worker-thread hop on every request.
    vault: Vault = request.app.state.vault
    return vault


VaultDep = Annotated[Vault, Depends(get_vault)]
