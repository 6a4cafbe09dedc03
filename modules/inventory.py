"""Stock queries for the warehouse: async functions, a tenant-restricted call, a sibling helper."""

import asyncio

from . import _stock

__all_exposed__ = [
    "stock_level",
    {"name": "reserve", "tenants": ["acme"], "timeout": 2.0},
    {"name": "slow_report", "timeout": 1.0, "doc": "A report that takes `seconds` to build."},
]


async def stock_level(sku: str, warehouse: str = "main") -> dict[str, object]:
    """How many items of `sku` a warehouse holds: `POST /rest/stock_level/apple`."""
    return {"sku": sku, "warehouse": warehouse, "level": _stock.LEVELS.get(sku, 0)}


async def reserve(sku: str, qty: int) -> dict[str, object]:
    """Take `qty` items of `sku` out of stock; only the `acme` tenant may call it."""
    if qty <= 0:
        raise ValueError("qty must be positive")
    left = await _stock.take(sku, qty)
    return {"sku": sku, "reserved": qty, "left": left}


async def slow_report(seconds: float = 0.1) -> str:
    await asyncio.sleep(seconds)
    return f"report built in {seconds:g} s"
