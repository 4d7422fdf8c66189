"""The NBD wire format (doc/proto.md of the NetworkBlockDevice project), server side.

Only what netswap serves: the fixed-newstyle handshake, options EXPORT_NAME,
ABORT, LIST, INFO and GO, simple replies, and commands READ, WRITE, DISC,
FLUSH, TRIM and WRITE_ZEROES. Nothing here knows about slots or RPCs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- handshake -----------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission ----------------------------------------------------------------
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_FAST_ZERO = 1 << 4

# Error values on the wire (Linux errno numbers, as the spec fixes them).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# -- structs (all big-endian) ---------------------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # REPLY_MAGIC, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeros unless NO_ZEROES)
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")  # INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie

# Longest option payload accepted in the handshake: names are at most 4096
# bytes, and a GO/INFO adds a few fields. Longer is a protocol violation.
MAX_OPTION_LENGTH = 4096 + 64
# Option data up to this is read and thrown away with NBD_REP_ERR_TOO_BIG;
# beyond it the client is not worth the bandwidth and the connection closes.
MAX_SKIPPED_OPTION = 1 << 20


# Any length below 2**25 must not be treated as an attack (the spec); a write
# that long is read and refused, a longer one ends the connection.
DOS_LENGTH = 1 << 25

# Command flags each supported command accepts. NO_HOLE costs nothing: every
# area is fully reserved. FUA is not advertised, so not accepted.
ALLOWED_FLAGS = {
    CMD_READ: 0,
    CMD_WRITE: 0,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_NO_HOLE,
}


@dataclass(frozen=True)
class Export:
    """What a client is told about the export."""

    name: str
    description: str
    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_payload: int


def greeting() -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(payload)) + payload


def error_reply(option: int, reply: int, message: str) -> bytes:
    return option_reply(option, reply, message.encode()[:4096])


def export_name_reply(export: Export, no_zeroes: bool) -> bytes:
    reply = EXPORT_NAME_REPLY.pack(export.size, export.flags)
    return reply if no_zeroes else reply + bytes(124)


def info_replies(option: int, export: Export, requested: list[int]) -> list[bytes]:
    """NBD_REP_INFO replies for GO/INFO, then the ACK. Block size goes out unasked:
    the spec lets a server send it, and clients that ignore it get RMW anyway."""
    out = [
        option_reply(option, REP_INFO, INFO_EXPORT_PAYLOAD.pack(INFO_EXPORT, export.size, export.flags)),
        option_reply(
            option,
            REP_INFO,
            INFO_BLOCK_SIZE_PAYLOAD.pack(
                INFO_BLOCK_SIZE, export.min_block, export.preferred_block, export.max_payload
            ),
        ),
    ]
    if INFO_NAME in requested:
        out.append(option_reply(option, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode()))
    if INFO_DESCRIPTION in requested:
        out.append(
            option_reply(option, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + export.description.encode())
        )
    out.append(option_reply(option, REP_ACK))
    return out


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """The payload of NBD_OPT_INFO / NBD_OPT_GO: (export name, info types requested).

    Raises ValueError when the lengths inside do not add up (-> NBD_REP_ERR_INVALID).
    """
    if len(data) < 6:
        raise ValueError("GO/INFO payload shorter than its fixed fields")
    (name_len,) = struct.unpack_from(">I", data, 0)
    if 4 + name_len + 2 > len(data):
        raise ValueError("GO/INFO name length runs past the payload")
    name = data[4 : 4 + name_len].decode("utf-8", errors="strict")
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    rest = data[4 + name_len + 2 :]
    if len(rest) != 2 * count:
        raise ValueError(f"GO/INFO announces {count} info requests but carries {len(rest)} bytes")
    return name, list(struct.unpack(f">{count}H", rest))


def server_list_entry(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def simple_reply(error: int, cookie: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def validate_request(cmd: int, flags: int, offset: int, length: int, export: Export) -> int:
    """The NBD error for a request, or 0 if it may go ahead. Checked before any I/O."""
    allowed = ALLOWED_FLAGS.get(cmd)
    if allowed is None or flags & ~allowed:
        return EINVAL
    if cmd in (CMD_READ, CMD_WRITE) and length > export.max_payload:
        return EINVAL
    if offset + length > export.size:
        # Past the end: writes say "no space", reads and trims "invalid".
        return ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    return 0
