"""netswap.client: attach swap areas on a netswap server and move pages to and from them.

    async with await SwapClient.connect("127.0.0.1:50051", token) as client:
        area = await client.swapon("vm1", 1 << 30)
        await area.swap_out([0, 1], two_pages)
        with await area.swap_in([0, 1]) as pages:
            use(pages.view)

netswap.client.sync has the same API for code without an event loop.
"""

from netswap.client.core import Area, AreaInfo, SwapClient, TlsFiles
from netswap.client.errors import (
    AreaNotFound,
    AuthenticationFailed,
    ConnectionLost,
    InvalidRequest,
    NetswapError,
    NoSpace,
    RequestRejected,
    ServerError,
    SizeMismatch,
)
from netswap.client.pool import Lease, PagePool

__all__ = [
    "Area",
    "AreaInfo",
    "AreaNotFound",
    "AuthenticationFailed",
    "ConnectionLost",
    "InvalidRequest",
    "Lease",
    "NetswapError",
    "NoSpace",
    "PagePool",
    "RequestRejected",
    "ServerError",
    "SizeMismatch",
    "SwapClient",
    "TlsFiles",
]
