"""The conversation as the client sees it: item ids, their order and content (GA item lifecycle).

Only bookkeeping for the events (`previous_item_id`, `conversation.item.retrieve`, `.delete`,
`.truncate`); what the model keeps is the responder's history, which the call edits through the
responder contract.
"""

from __future__ import annotations

MAX_ITEMS = 1_000  # a long call's oldest items leave the record (retrieve then says not found)


class Conversation:
    def __init__(self) -> None:
        self._items: dict[str, dict] = {}  # item_id -> item object, in conversation order

    def add(self, item: dict) -> str | None:
        """Append an item; returns the id of the item before it (`previous_item_id`)."""
        previous = next(reversed(self._items), None)
        self._items[item["id"]] = item
        while len(self._items) > MAX_ITEMS:
            del self._items[next(iter(self._items))]
        return previous

    def replace(self, item: dict) -> None:
        if item["id"] in self._items:
            self._items[item["id"]] = item

    def get(self, item_id: str) -> dict | None:
        return self._items.get(item_id)

    def remove(self, item_id: str) -> dict | None:
        return self._items.pop(item_id, None)

    def after(self, item_id: str) -> list[str]:
        """Ids of the items that follow `item_id`."""
        ids = list(self._items)
        return ids[ids.index(item_id) + 1:] if item_id in self._items else []

    def __len__(self) -> int:
        return len(self._items)
