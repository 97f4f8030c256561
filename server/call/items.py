"""The conversation's items as a call changes them: the client's edits (create, retrieve, truncate,
delete), the user items a turn commits, and the transcripts the responder sends for spoken ones.

The call owns one `Items` (`Call.items`, as it owns a `ReplyFlow` and a `Listening`). It keeps the
client's view of the conversation (server/realtime/conversation.py) and the responder session's history
in step: an edit is checked against the first, applied to the second, then announced.
"""

from __future__ import annotations

import logging
from typing import Protocol

from pipeline.responder import (
    START,
    Reply,
    ResponderSession,
    TranscriptDelta,
    TranscriptDone,
    TranscriptFailed,
)
from server.call.replies import ReplyFlow
from server.config import Config
from server.realtime import events, fields
from server.realtime import protocol as P
from server.realtime.conversation import Conversation
from server.realtime.events import new_id as _new_id


class Call(Protocol):
    """What the items read and call of the call that owns them (server/call/call.py)."""

    config: Config
    conversation: Conversation
    log: logging.LoggerAdapter
    replies: ReplyFlow
    session: ResponderSession

    def send(self, message: dict) -> None: ...

    def charge(self, event: P.ClientEvent) -> None: ...


class Items:
    def __init__(self, call: Call) -> None:
        self._call = call
        self._cut_ms: dict[str, int] = {}  # assistant item -> the audio_end_ms it was truncated to

    def create(self, event: P.ItemCreate) -> None:
        """A text message of any role, at the end or where `previous_item_id` says. A user message cuts
        off the reply playing (the user spoke); text of another role (a system note, a tool result, a
        synced history) goes in without interrupting."""
        call, conversation = self._call, self._call.conversation
        item_id, previous = event.item_id, event.previous_item_id
        if item_id is not None and conversation.get(item_id) is not None:
            raise fields.ProtocolError(
                "item_create_duplicate_item_id",
                f"an item with id {item_id!r} is already in the conversation",
                event.event_id,
                "item.id",
            )
        if previous is not None and previous != P.ROOT and conversation.get(previous) is None:
            raise fields.ProtocolError(
                "item_create_invalid_previous_item_id",
                f"previous_item_id {previous!r} is not in the conversation: the item was not added",
                event.event_id,
                "previous_item_id",
            )
        if previous == conversation.last_id():
            previous = None  # right after the last item: at the end
        after = None if previous is None else START if previous == P.ROOT else conversation.ref(previous)
        if event.role == "user":
            call.replies.interrupt("user_message")
            if call.config.logging.log_user_content:
                call.log.info("user text: %r", event.text)
        try:
            if event.role == "user" and after is None:
                call.session.add_text(event.text)
            else:
                call.session.add_message(event.role, event.text, after)
        except NotImplementedError as exc:
            raise fields.ProtocolError("unsupported_value", str(exc), event.event_id, "item.role") from None
        item = events.message_item(item_id or _new_id("item"), event.role, event.text)
        previous_id = conversation.add(item, after=previous)
        call.send(events.event("conversation.item.added", previous_item_id=previous_id, item=item))
        call.send(events.event("conversation.item.done", previous_item_id=previous_id, item=item))

    def user_item_committed(self, item_id: str | None, text: str | None) -> None:
        """A user item is final: spoken (committed, transcript null) or typed. GA lifecycle events."""
        call = self._call
        item = events.user_item(item_id or _new_id("item"), text)
        previous = call.conversation.add(item)
        if text is None:
            call.send(
                events.event("input_audio_buffer.committed", previous_item_id=previous, item_id=item["id"])
            )
        call.send(events.event("conversation.item.added", previous_item_id=previous, item=item))
        call.send(events.event("conversation.item.done", previous_item_id=previous, item=item))

    async def transcripts(self) -> None:
        """The responder's transcripts of spoken user items, as Realtime events on those items (and in the
        items `conversation.item.retrieve` returns). An item deleted meanwhile gets none."""
        call = self._call
        async for event in call.session.transcripts():
            item_id = call.conversation.user_item_id(event.item)
            if item_id is None:
                continue
            if isinstance(event, TranscriptDelta):
                call.send(events.transcription_delta(item_id, event.text))
            elif isinstance(event, TranscriptDone):
                call.conversation.replace(events.user_item(item_id, None, transcript=event.text))
                call.send(events.transcription_completed(item_id, event.text, event.audio_ms / 1000))
            elif isinstance(event, TranscriptFailed):
                call.send(events.transcription_failed(item_id, event.code, event.message))

    def edit(self, event: P.ItemRetrieve | P.ItemDelete | P.ItemTruncate) -> None:
        """`conversation.item.retrieve`, `.truncate` or `.delete` of an item in the conversation."""
        item = self._call.conversation.get(event.item_id)
        if item is None:
            kind = {P.ItemRetrieve: "retrieve", P.ItemDelete: "delete", P.ItemTruncate: "truncate"}[
                type(event)
            ]
            raise fields.ProtocolError(
                f"item_{kind}_invalid_item_id",
                f"Item with item_id {event.item_id!r} not found in this conversation",
                event.event_id,
                "item_id",
            )
        if isinstance(event, P.ItemRetrieve):
            self._call.send(events.event("conversation.item.retrieved", item=item))
            return
        ref = self._call.conversation.ref(event.item_id)
        if isinstance(event, P.ItemTruncate):
            self._truncate(event, ref)
        else:
            self._delete(event, ref)

    def _truncate(self, event: P.ItemTruncate, ref: int | Reply | None) -> None:
        call = self._call
        if not isinstance(ref, Reply):
            raise fields.ProtocolError(
                "invalid_value", "only assistant items can be truncated", event.event_id, "item_id"
            )
        cut_ms = self._cut_ms.get(event.item_id)
        if cut_ms is not None and event.audio_end_ms >= cut_ms:
            raise fields.ProtocolError(
                "invalid_value",
                f"the item was truncated at {cut_ms} ms already; a truncate can only shorten it",
                event.event_id,
                "audio_end_ms",
            )
        call.charge(event)
        self._cut_ms[event.item_id] = event.audio_end_ms
        call.replies.truncate(event.item_id, ref, event.audio_end_ms)
        call.send(
            events.event(
                "conversation.item.truncated",
                item_id=event.item_id,
                content_index=0,
                audio_end_ms=event.audio_end_ms,
            )
        )

    def _delete(self, event: P.ItemDelete, ref: int | Reply | None) -> None:
        call = self._call
        current = call.replies.current
        if isinstance(ref, Reply) and current is not None and current.item_id == event.item_id:
            raise fields.ProtocolError(
                "invalid_value",
                "this item's response is in progress (generating or playing): "
                "cancel it first (response.cancel), then delete the item",
                event.event_id,
                "item_id",
            )  # once cut off it may go at once: the responder stops it before it edits the history
        if isinstance(ref, int) and call.replies.generating_items:
            raise fields.ProtocolError(
                "conversation_already_has_active_response",
                "a response is in progress and may "
                "be answering this item: delete message items after its response.done",
                event.event_id,
                "item_id",
            )
        if ref is not None:
            call.charge(event)
            try:
                call.session.delete_item(ref)
            except NotImplementedError as exc:
                raise fields.ProtocolError("unsupported_value", str(exc), event.event_id, "item_id") from None
        call.conversation.remove(event.item_id)
        self._cut_ms.pop(event.item_id, None)
        call.send(events.event("conversation.item.deleted", item_id=event.item_id))
