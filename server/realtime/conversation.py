"""The conversation as the client sees it: item ids, their order and content (GA item lifecycle).

Only bookkeeping for the events (`previous_item_id`, `conversation.item.retrieve`, `.delete`,
`.truncate`); what the model keeps is the responder's history, which the call edits through the
responder contract.
"""

from __future__ import annotations

from pipeline.responder import Reply

MAX_ITEMS = 1_000  # a long call's oldest items leave the record (retrieve then says not found)


class Conversation:
    def __init__(self) -> None:
        self._items: dict[str, dict] = {}  # item_id -> item object, in conversation order
        self._refs: dict[str, int | Reply] = {}  # item_id -> the item as the responder knows it
        self._user_items = 0  # user items so far: the next one's index for `ResponderSession.delete_item`

    def add(self, item: dict, reply: Reply | None = None) -> str | None:
        """Append an item; returns the id of the item before it (`previous_item_id`). A user item takes the
        next user index (the session counts its `commit_audio` / `add_text` calls the same way); an
        assistant item is known by its `reply`."""
        previous = next(reversed(self._items), None)
        self._items[item["id"]] = item
        if item.get("role") == "user":
            self._refs[item["id"]] = self._user_items
            self._user_items += 1
        elif reply is not None:
            self._refs[item["id"]] = reply
        while len(self._items) > MAX_ITEMS:
            oldest = next(iter(self._items))
            del self._items[oldest]
            self._refs.pop(oldest, None)
        return previous

    def replace(self, item: dict) -> None:
        if item["id"] in self._items:
            self._items[item["id"]] = item

    def get(self, item_id: str) -> dict | None:
        return self._items.get(item_id)

    def ref(self, item_id: str) -> int | Reply | None:
        """What `ResponderSession.delete_item` takes for this item (a user index or a Reply)."""
        return self._refs.get(item_id)

    def remove(self, item_id: str) -> dict | None:
        self._refs.pop(item_id, None)
        return self._items.pop(item_id, None)

    def after(self, item_id: str) -> list[str]:
        """Ids of the items that follow `item_id`."""
        ids = list(self._items)
        return ids[ids.index(item_id) + 1 :] if item_id in self._items else []

    def __len__(self) -> int:
        return len(self._items)
