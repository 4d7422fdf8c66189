"""Pieces shared by netswap.server and netswap.client: wire constants, sizes, the event loop."""
