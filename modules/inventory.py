"""Stock queries for the warehouse: async functions, a tenant-restricted call, a sibling helper."""

import asyncio
from typing import Annotated

from msgspec import Meta

from . import _stock

__all_exposed__ = [
    "stock_level",
    {"name": "reserve", "tenants": ["acme"], "timeout": 2.0},
    {"name": "slow_report", "timeout": 1.0, "doc": "A report that takes `seconds` to build."},
]


async def stock_level(sku: str, warehouse: str = "main") -> dict[str, object]:
    """How many items of `sku` a warehouse holds: `POST /rest/stock_level/apple`."""
    return {"sku": sku, "warehouse": warehouse, "level": _stock.LEVELS.get(sku, 0)}


async def reserve(sku: str, qty: Annotated[int, Meta(gt=0)]) -> dict[str, object]:
    """Take `qty` items of `sku` out of stock, all or none; only the `acme` tenant may call it.

    `reserved` is `qty`, or 0 when fewer are left: a short stock is an answer, not a failure.
    """
    reserved, left = await _stock.take(sku, qty)
    return {"sku": sku, "reserved": reserved, "left": left}


async def slow_report(seconds: float = 0.1) -> str:
    await asyncio.sleep(seconds)
    return f"report built in {seconds:g} s"
