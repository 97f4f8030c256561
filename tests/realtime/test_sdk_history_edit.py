"""History editing over the WebSocket with the official `openai` SDK: `conversation.item.delete` and
`conversation.item.truncate` of an older item, against the echo responder (its history) and GLM-4-Voice on
demo weights (the next turn's prompt, read from the engine's state)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from server.echo import EchoResponder
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


@pytest.fixture
async def glm_ws(demo_dir) -> AsyncIterator[RunningServer]:
    async with glm_server_with_key(demo_dir, API_KEY) as running:
        yield running


async def _typed_turn(conn, s: Session, text: str) -> tuple[str, str]:
    """A typed message and its reply; returns (user item id, assistant item id)."""
    mark = len(s.events)
    await conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )
    await conn.response.create()
    done = await s.wait_for("response.done", 60, after=mark)
    assert done["response"]["status"] == "completed", done
    return s.of_type("conversation.item.done", mark)[0]["item"]["id"], done["response"]["output"][0]["id"]


async def _request(conn, s: Session, event: dict, answer: str) -> dict:
    mark = len(s.events)
    await conn.send(event)
    return await s.wait_for(answer, 10, after=mark)


async def test_delete_and_truncate_older_items_echo(echo_ws):
    async with _client(echo_ws).realtime.connect(model="gpt-realtime") as conn:
        s = Session(conn)
        try:
            await s.wait_for("session.created", 5)
            user_a, reply_a = await _typed_turn(conn, s, "apples")
            user_b, reply_b = await _typed_turn(conn, s, "bananas")
            session = next(iter(echo_ws.server.calls.values())).session
            assert isinstance(echo_ws.server.responder, EchoResponder)

            await conn.conversation.item.delete(item_id=user_a)
            deleted = await s.wait_for("conversation.item.deleted", 5)
            assert deleted["item_id"] == user_a
            error = await _request(
                conn, s, {"type": "conversation.item.retrieve", "item_id": user_a}, "error"
            )
            assert error["error"]["code"] == "item_retrieve_invalid_item_id"
            assert [(h.role, h.text) for h in session.history if h.role == "user"] == [("user", "bananas")]

            # truncate an assistant item that is not the latest: its reply keeps what was heard
            truncated = await _request(
                conn,
                s,
                {
                    "type": "conversation.item.truncate",
                    "item_id": reply_a,
                    "content_index": 0,
                    "audio_end_ms": 0,
                },
                "conversation.item.truncated",
            )
            assert truncated["item_id"] == reply_a
            assert [h.audio_ms for h in session.history if h.role == "assistant"][0] == 0

            deleted = await _request(
                conn, s, {"type": "conversation.item.delete", "item_id": reply_b}, "conversation.item.deleted"
            )
            assert deleted["item_id"] == reply_b
            assistant = [h.text for h in session.history if h.role == "assistant"]
            assert len(assistant) == 1 and "apples" in assistant[0]
            error = await _request(
                conn,
                s,
                {
                    "type": "conversation.item.truncate",
                    "item_id": user_b,
                    "content_index": 0,
                    "audio_end_ms": 0,
                },
                "error",
            )
            assert error["error"]["code"] == "invalid_value"  # a user item has no audio of ours to cut
            assert [e["error"]["code"] for e in s.of_type("error")] == [
                "item_retrieve_invalid_item_id",
                "invalid_value",
            ]
        finally:
            s.close()


async def test_delete_user_item_leaves_the_glm_prompt(glm_ws):
    """Typed turns A and B, A's user item deleted: turn C's prompt (the engine's state) no longer holds A's
    text, the KV cache is the history's prefix, and deleting the reply in progress is refused."""
    from pipeline.lm.prompt import ASSISTANT_METADATA, user_turn_ids

    async with _client(glm_ws).realtime.connect(model="gpt-realtime") as conn:
        s = Session(conn)
        try:
            await s.wait_for("session.created", 5)
            user_a, _ = await _typed_turn(conn, s, "Remember apples.")
            await _typed_turn(conn, s, "Remember bananas.")
            await conn.conversation.item.delete(item_id=user_a)
            assert (await s.wait_for("conversation.item.deleted", 5))["item_id"] == user_a

            mark = len(s.events)
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "And now?"}],
                }
            )
            await conn.response.create()
            added = await s.wait_for("response.output_item.added", 20, after=mark)
            await conn.conversation.item.delete(item_id=added["item"]["id"])  # its reply is in progress
            error = await s.wait_for("error", 20, after=mark)
            assert error["error"]["code"] == "invalid_value" and "in progress" in error["error"]["message"]
            await s.wait_for("response.done", 60, after=mark)

            call = next(iter(glm_ws.server.calls.values()))
            await settled(glm_ws.server.responder.engine)
            d = call.session.dialogue
            tok = glm_ws.server.responder.engine.scheduler.m.text
            prompt = d.last_reply.gen.prompt_ids
            header = [tok.assistant_id, *tok.encode(ASSISTANT_METADATA)]
            a_text = user_turn_ids(tok, text="Remember apples.")[
                1 : -len(header)
            ]  # A's words, without the roles
            b_block = user_turn_ids(tok, text="Remember bananas.")
            windows = {tuple(prompt[i : i + len(a_text)]) for i in range(len(prompt))}
            assert tuple(a_text) not in windows
            assert tuple(b_block) in {tuple(prompt[i : i + len(b_block)]) for i in range(len(prompt))}
            ids = d.history.ids()
            assert d.cache.token_ids == ids[: d.cache.length] and d.cache.length >= len(ids) - 1
        finally:
            s.close()
