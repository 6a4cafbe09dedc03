"""Helper for inventory.py: a file starting with `_` is never scanned, only imported."""

import asyncio

LEVELS = {"apple": 12, "pear": 0, "plum": 40}
_lock = asyncio.Lock()


async def take(sku: str, qty: int) -> tuple[int, int]:
    """Take `qty` of `sku` if that many are left: (how many were taken, how many are left)."""
    async with _lock:
        left = LEVELS.get(sku, 0)
        if left < qty:
            return 0, left
        LEVELS[sku] = left - qty
        return qty, left - qty
