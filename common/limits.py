"""Constants of the netswap.v1 contract that both ends must agree on."""

import re

PAGE_SIZE = 4096

# Area and principal names. Never used as a path component as-is: the file
# store hex-encodes them, so "." and ".." (which match) are harmless.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")

# Slack on top of the page blob for the rest of a SwapOut/SwapIn message
# (handle, packed slots, tags). Slots cost at most 10 bytes each as varints.
MESSAGE_OVERHEAD = 64 * 1024


def max_message_bytes(max_batch_pages: int) -> int:
    """Largest message either side needs for batches of `max_batch_pages` pages."""
    return max_batch_pages * (PAGE_SIZE + 10) + MESSAGE_OVERHEAD
