"""The NBD frontend: a kernel (nbd-client) or QEMU swaps onto a netswap area.

protocol    the NBD wire format: constants, parsing, replies (no slots, no RPCs)
connection  one client connection: handshake and transmission over asyncio
device      byte ranges -> slots; coalescing into RPCs; read-modify-write; retries
serve       `netswap nbd`: swapon, listen, run until signalled
"""
