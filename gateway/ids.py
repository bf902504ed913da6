"""Object ids that sort by creation time.

Stores list a key's responses by ``created_at`` (whole seconds), then by id: with random ids,
two responses made in the same second came back in either order (a chat page reloaded right
after a new conversation began could open the older one). An id's first 16 hex digits are its
creation time in nanoseconds, the last 16 are random.
"""

from __future__ import annotations

import secrets
import time


def ordered_hex() -> str:
    """32 hex digits, later ones sorting after earlier ones (to the nanosecond)."""
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"
