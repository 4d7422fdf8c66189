"""netswap: network swap storage. See netswap.server, netswap.client and netswap.v1."""

__version__ = "0.1.0"
