"""The conversation as the client sees it: item ids, their order and content (GA item lifecycle).

Only bookkeeping for the events (`previous_item_id`, `conversation.item.retrieve`, `.delete`,
`.truncate`); what the model keeps is the responder's history, which the call edits through the
responder contract. Items keep the client's ids when it names them.
"""

from __future__ import annotations

from pipeline.responder import Reply
from server.realtime.protocol import ROOT

MAX_ITEMS = 1_000  # a long call's oldest items leave the record (retrieve then says not found)


class Conversation:
    def __init__(self) -> None:
        self._items: dict[str, dict] = {}  # item_id -> item object, in conversation order
        self._refs: dict[str, int | Reply] = {}  # item_id -> the item as the responder knows it
        self._messages = 0  # message items so far: the next one's index for the responder session

    def add(self, item: dict, reply: Reply | None = None, after: str | None = None) -> str | None:
        """Add an item at the end, first (`after` ROOT) or right after the item `after` (which must be
        here); returns the id of the item before it (`previous_item_id`). A message item (user or any
        text) takes the next index - the session counts its `commit_audio` / `add_text` / `add_message`
        calls the same way; an assistant reply is known by its `reply`."""
        ids = list(self._items)
        index = len(ids) if after is None else 0 if after == ROOT else ids.index(after) + 1
        previous = ids[index - 1] if index > 0 else None
        if index == len(ids):
            self._items[item["id"]] = item
        else:
            order = [*ids[:index], item["id"], *ids[index:]]
            self._items[item["id"]] = item
            self._items = {item_id: self._items[item_id] for item_id in order}
        if reply is not None:
            self._refs[item["id"]] = reply
        else:
            self._refs[item["id"]] = self._messages
            self._messages += 1
        while len(self._items) > MAX_ITEMS:
            oldest = next(iter(self._items))
            del self._items[oldest]
            self._refs.pop(oldest, None)
        return previous

    def last_id(self) -> str | None:
        return next(reversed(self._items), None)

    def replace(self, item: dict) -> None:
        if item["id"] in self._items:
            self._items[item["id"]] = item

    def get(self, item_id: str) -> dict | None:
        return self._items.get(item_id)

    def ref(self, item_id: str) -> int | Reply | None:
        """What `ResponderSession.delete_item` takes for this item (a message index or a Reply)."""
        return self._refs.get(item_id)

    def user_item_id(self, index: int) -> str | None:
        """The id of the user item with this index (None: deleted, or out of the record)."""
        return next((i for i, ref in self._refs.items() if ref == index and not isinstance(ref, Reply)), None)

    def remove(self, item_id: str) -> dict | None:
        self._refs.pop(item_id, None)
        return self._items.pop(item_id, None)

    def after(self, item_id: str) -> list[str]:
        """Ids of the items that follow `item_id`."""
        ids = list(self._items)
        return ids[ids.index(item_id) + 1 :] if item_id in self._items else []

    def __len__(self) -> int:
        return len(self._items)
