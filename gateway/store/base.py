"""What a stored response is, and what every store does with one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as stored: JSON texts of the response object, of the request's own input
    items and of the whole conversation up to and including its output (what a later
    ``previous_response_id`` replays)."""

    id: str
    owner: str | None
    created_at: int
    response: str
    input_items: str
    context: str
    #: The first response of its ``previous_response_id`` chain (itself if none).
    root: str = ""
    #: The ids of its input and output items, which an ``item_reference`` may name.
    item_ids: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.response) + len(self.input_items) + len(self.context)


class ResponseStore(Protocol):
    async def put(self, record: StoredResponse) -> None: ...

    async def get(self, response_id: str) -> StoredResponse | None:
        """The record, or None if there is none (or it expired)."""
        ...

    async def find_item(self, owner: str | None, item_id: str) -> StoredResponse | None:
        """The latest of ``owner``'s records holding the item with this id (among its
        ``item_ids``). Item ids are the client's to choose: each owner has its own."""
        ...

    async def owned(
        self, owner: str | None, limit: int, after: str | None = None
    ) -> list[StoredResponse]:
        """Up to ``limit`` of ``owner``'s records, newest first (by ``created_at``, then id),
        those after the record ``after`` only (none if that is not one of ``owner``'s);
        without their ``context`` (an empty text): a listing, not a replay."""
        ...

    async def delete(self, response_id: str) -> bool: ...

    async def aclose(self) -> None: ...
