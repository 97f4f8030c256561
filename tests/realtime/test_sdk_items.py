"""Conversation items beyond the user's turns, with the official `openai` SDK over the WebSocket: text
items of every role with the client's ids, `previous_item_id` (root, mid-conversation, unknown), replies
with no new input, `response.metadata` and `response.instructions`, and the error shape (OpenAI's codes,
the causing `event_id` on each). Against the echo responder (its history) and GLM-4-Voice on demo weights
(the next reply's prompt, read from the engine's state)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers.engine import settled
from tests.helpers.rtc_client import RunningServer, glm_server_with_key, start_server
from tests.realtime.test_sdk_websocket import API_KEY, Session, _client


@pytest.fixture
async def echo_ws():
    running = await start_server(overrides={"auth": {"api_key": API_KEY}})
    try:
        yield running
    finally:
        await running.runner.cleanup()


def _message(role: str, text: str, item_id: str | None = None, part: str = "input_text") -> dict:
    item = {"type": "message", "role": role, "content": [{"type": part, "text": text}]}
    return item if item_id is None else {**item, "id": item_id}


async def _send(conn, s: Session, event: dict, answer: str) -> dict:
    mark = len(s.events)
    await conn.send(event)
    return await s.wait_for(answer, 10, after=mark)


async def test_items_keep_client_ids_and_places(echo_ws):
    async with _client(echo_ws).realtime.connect(model="gpt-realtime") as conn:
        s = Session(conn)
        try:
            await s.wait_for("session.created", 5)
            create = {"type": "conversation.item.create"}
            added = await _send(
                conn, s, {**create, "item": _message("user", "first", "user_1")}, "conversation.item.added"
            )
            assert added["item"]["id"] == "user_1" and added["previous_item_id"] is None
            done = await s.wait_for("conversation.item.done", 5)
            assert done["item"]["id"] == "user_1"

            system = _message("system", "Be brief.", "sys_1")
            added = await _send(
                conn, s, {**create, "item": system, "previous_item_id": "root"}, "conversation.item.added"
            )
            assert added["previous_item_id"] is None and added["item"]["role"] == "system"
            assistant = _message("assistant", "Earlier answer.", "asst_1", part="output_text")
            added = await _send(
                conn, s, {**create, "item": assistant, "previous_item_id": "sys_1"}, "conversation.item.added"
            )
            assert added["previous_item_id"] == "sys_1"
            assert added["item"]["content"] == [{"type": "output_text", "text": "Earlier answer."}]
            session = next(iter(echo_ws.server.calls.values())).session
            assert [(h.role, h.text) for h in session.history] == [
                ("system", "Be brief."),
                ("assistant", "Earlier answer."),
                ("user", "first"),
            ]

            retrieved = await _send(
                conn,
                s,
                {"type": "conversation.item.retrieve", "item_id": "asst_1"},
                "conversation.item.retrieved",
            )
            assert retrieved["item"]["id"] == "asst_1"
            deleted = await _send(
                conn, s, {"type": "conversation.item.delete", "item_id": "sys_1"}, "conversation.item.deleted"
            )
            assert deleted["item_id"] == "sys_1"
            assert [h.role for h in session.history] == ["assistant", "user"]

            # a reply with no new input; metadata comes back on response.created and response.done
            mark = len(s.events)
            await conn.send(
                {
                    "type": "response.create",
                    "event_id": "ev_greet",
                    "response": {"instructions": "Greet.", "metadata": {"client_event_id": "ev_greet"}},
                }
            )
            created = await s.wait_for("response.created", 10, after=mark)
            done = await s.wait_for("response.done", 30, after=mark)
            assert created["response"]["metadata"] == {"client_event_id": "ev_greet"}
            assert done["response"]["metadata"] == {"client_event_id": "ev_greet"}
            assert done["response"]["status"] == "completed" and not s.of_type("error", mark)
        finally:
            s.close()


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        ({"type": "response.cancel"}, "response_cancel_not_active", None),
        (
            {"type": "conversation.item.retrieve", "item_id": "nope"},
            "item_retrieve_invalid_item_id",
            "item_id",
        ),
        ({"type": "conversation.item.delete", "item_id": "nope"}, "item_delete_invalid_item_id", "item_id"),
        (
            {"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 0},
            "item_truncate_invalid_item_id",
            "item_id",
        ),
        (
            {"type": "conversation.item.create", "item": _message("user", "hi", "x" * 33)},
            "string_above_max_length",
            "item.id",
        ),
        (
            {"type": "conversation.item.create", "item": _message("user", "hi", "a b")},
            "invalid_value",
            "item.id",
        ),
        (
            {"type": "conversation.item.create", "item": _message("user", "hi", "dup")},
            "item_create_duplicate_item_id",
            "item.id",
        ),
        (
            {"type": "conversation.item.create", "item": _message("user", "hi"), "previous_item_id": "nope"},
            "item_create_invalid_previous_item_id",
            "previous_item_id",
        ),
        (
            {"type": "conversation.item.create", "item": {"type": "function_call_output", "output": "{}"}},
            "unsupported_value",
            "item.type",
        ),
        (
            {"type": "response.create", "response": {"conversation": "none"}},
            "unsupported_value",
            "response.conversation",
        ),
        (
            {"type": "response.create", "response": {"metadata": {"k": 1}}},
            "invalid_value",
            "response.metadata",
        ),
    ],
)
async def test_errors_name_the_event_and_use_openai_codes(echo_ws, event, code, param):
    # the ping at the end is ours: its pong comes to a client that asks for our events
    extra_query = {"glm4voice_events": "on"}
    async with _client(echo_ws).realtime.connect(model="gpt-realtime", extra_query=extra_query) as conn:
        s = Session(conn)
        try:
            await s.wait_for("session.created", 5)
            await _send(
                conn,
                s,
                {"type": "conversation.item.create", "item": _message("user", "x", "dup")},
                "conversation.item.done",
            )
            error = await _send(conn, s, {**event, "event_id": "ev_bad"}, "error")
            assert error["error"]["code"] == code and error["error"]["param"] == param
            assert (
                error["error"]["type"] == "invalid_request_error" and error["error"]["event_id"] == "ev_bad"
            )
            if code == "response_cancel_not_active":
                assert error["error"]["message"].startswith("Cancellation failed")
            # refused means not added: the conversation still answers a ping
            await _send(conn, s, {"type": "glm4voice.ping"}, "glm4voice.pong")
        finally:
            s.close()


@pytest.fixture
async def glm_ws(demo_dir) -> AsyncIterator[RunningServer]:
    async with glm_server_with_key(demo_dir, API_KEY) as running:
        yield running


async def test_items_placed_mid_conversation_reach_the_glm_prompt(glm_ws):
    """A typed turn and its reply, then a system item placed right after the user item and an assistant
    text item first of all: the next reply's prompt holds both at those places (GLM-4 chat blocks)."""
    from pipeline.lm.prompt import message_block_ids, reply_header_ids, user_block_ids

    async with _client(glm_ws).realtime.connect(model="gpt-realtime") as conn:
        s = Session(conn)
        try:
            await s.wait_for("session.created", 5)
            await conn.conversation.item.create(item=_message("user", "Remember apples.", "user_a"))
            mark = len(s.events)
            await conn.response.create()
            assert (await s.wait_for("response.done", 60, after=mark))["response"]["status"] == "completed"
            create = {"type": "conversation.item.create"}
            await _send(
                conn,
                s,
                {
                    **create,
                    "item": _message("system", "Apples are red.", "sys_a"),
                    "previous_item_id": "user_a",
                },
                "conversation.item.done",
            )
            await _send(
                conn,
                s,
                {
                    **create,
                    "item": _message("assistant", "Hello.", "hi", "output_text"),
                    "previous_item_id": "root",
                },
                "conversation.item.done",
            )
            mark = len(s.events)
            await conn.response.create()
            assert (await s.wait_for("response.done", 60, after=mark))["response"]["status"] == "completed"
            assert not s.of_type("error")

            call = next(iter(glm_ws.server.calls.values()))
            tok = glm_ws.server.responder.engine.scheduler.m.text
            d = call.session.dialogue
            prompt = d.last_reply.gen.prompt_ids[len(d.history.system_ids) :]
            header = reply_header_ids(tok)
            want_start = (
                message_block_ids(tok, "assistant", "Hello.")
                + user_block_ids(tok, text="Remember apples.")
                + message_block_ids(tok, "system", "Apples are red.")
                + header
            )
            assert prompt[: len(want_start)] == want_start and prompt[-len(header) :] == header
        finally:
            s.close()


async def test_a_cut_reply_can_be_deleted_at_once(glm_ws):
    """An agent that interrupts a reply before any of it played deletes its item right after
    `response.cancel` (LiveKit's truncate at 0 ms): deleted without an error, and its ids gone from the
    model's history; a reply still current is refused."""
    async with _client(glm_ws).realtime.connect(model="gpt-realtime") as conn:
        s = Session(conn)
        try:
            await s.wait_for("session.created", 5)
            await conn.conversation.item.create(item=_message("user", "Tell me a story.", "user_a"))
            mark = len(s.events)
            await conn.response.create()
            item_id = (await s.wait_for("response.output_item.added", 30, after=mark))["item"]["id"]
            await s.wait_for("response.output_audio.delta", 30, after=mark)  # some of it is in the history
            refused = await _send(conn, s, {"type": "conversation.item.delete", "item_id": item_id}, "error")
            assert refused["error"]["code"] == "invalid_value"
            await conn.send({"type": "response.cancel"})
            deleted = await _send(
                conn, s, {"type": "conversation.item.delete", "item_id": item_id}, "conversation.item.deleted"
            )
            assert deleted["item_id"] == item_id
            assert (await s.wait_for("response.done", 60, after=mark))["response"]["status"] == "cancelled"
            assert [e["error"]["code"] for e in s.of_type("error")] == ["invalid_value"]

            from pipeline.lm.prompt import user_turn_ids

            await settled(glm_ws.server.responder.engine)
            call = next(iter(glm_ws.server.calls.values()))
            tok = glm_ws.server.responder.engine.scheduler.m.text
            d = call.session.dialogue
            # the reply's ids left; its header stays behind the user item (docs/lm.md)
            rest = d.history.ids()[len(d.history.system_ids) :]
            assert rest == user_turn_ids(tok, text="Tell me a story.")
        finally:
            s.close()
