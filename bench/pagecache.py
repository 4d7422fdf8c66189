"""What a random 4 KiB page write costs in the page cache, by how the file got there.

    .venv/bin/python bench/pagecache.py [--dir DIR] [--mib 256] [--writes 20000]

Why the file store writes in pieces of at most 16 KiB and advises random
access (server/store/file.py): the kernel sizes page-cache folios by the
write or readahead that creates them, and since Linux 6.x ext4 caches large
folios, into which every 4 KiB write walks all of the folio's block buffers.
For each way of filling a fallocate'd file -- written in 4 KiB, 16 KiB,
64 KiB or 1 MiB pieces; or written, dropped from the cache and read back in
1 MiB pieces with and without POSIX_FADV_RANDOM -- it times random 4 KiB
page writes into it, in the same run, and how long the filling writes took
per page. DIR should be on the file system the
store will use (default: a temporary directory under bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

PAGE = 4096
PIECE = 1 << 20


def random_writes(fd: int, size: int, count: int) -> float:
    """Microseconds per random page write."""
    page = memoryview(bytes(PAGE))
    pages = size // PAGE
    start = time.perf_counter()
    for _ in range(count):
        os.pwritev(fd, [page], random.randrange(pages) * PAGE)
    return (time.perf_counter() - start) / count * 1e6


def filled(
    path: Path, size: int, piece: int, *, reread: bool = False, advise_random: bool = False
) -> tuple[int, float]:
    """A new fallocate'd file of `size`, written in `piece`-sized writes (and optionally
    dropped from the page cache and read back in 1 MiB reads): its open descriptor, and
    the microseconds per page the writing took."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.posix_fallocate(fd, 0, size)
    if advise_random:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    data = memoryview(bytes(PIECE))
    start = time.perf_counter()
    for off in range(0, size, piece):
        os.pwritev(fd, [data[:piece]], off)
    fill_us = (time.perf_counter() - start) / (size // PAGE) * 1e6
    if reread:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the cache
        for off in range(0, size, PIECE):
            os.preadv(fd, [bytearray(PIECE)], off)
    return fd, fill_us


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--mib", type=int, default=256, help="file size (default 256 MiB)")
    ap.add_argument("--writes", type=int, default=20000, help="random page writes per case")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size = args.mib << 20
    cases = [(f"written in {p >> 10} KiB pieces", p, False, False) for p in (4096, 16384, 65536, PIECE)]
    cases += [
        ("cold 1 MiB reads, default readahead", 16384, True, False),
        ("cold 1 MiB reads, POSIX_FADV_RANDOM", 16384, True, True),
    ]
    args.dir.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="pagecache-") as tmp:
        for name, piece, reread, advise in cases:
            fd, fill_us = filled(Path(tmp) / "area.data", size, piece, reread=reread, advise_random=advise)
            try:
                results[name] = {
                    "fill_us_per_page": fill_us,
                    "random_write_us": random_writes(fd, size, args.writes),
                }
            finally:
                os.close(fd)
    print(f"random 4 KiB page writes into a {args.mib} MiB file ({os.uname().release})")
    print(f"  {'the file':40} {'filling':>12} {'random write':>13}")
    for name, r in results.items():
        print(f"  {name:40} {r['fill_us_per_page']:6.2f} us/pg {r['random_write_us']:8.1f} us")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
