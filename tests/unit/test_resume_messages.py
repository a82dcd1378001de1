"""The tracker behind mid-stream failover of Anthropic's ``/v1/messages`` (``api.resume_messages``):
what the client sees across two servers, and the request that carries a broken message on."""

from __future__ import annotations

import json
from typing import Any

from meshllm.api.resume import tracker_for
from meshllm.api.resume_messages import MessagesTracker

USER = [{"role": "user", "content": "Tell me a story"}]


def ev(kind: str, **payload: Any) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **payload}).encode() + b"\n\n"


def opening(mid: str = "msg-1") -> bytes:
    return (ev("message_start", message={"id": mid, "type": "message", "role": "assistant", "content": [],
                                         "usage": {"input_tokens": 5, "output_tokens": 0}})
            + ev("content_block_start", index=0, content_block={"type": "text", "text": ""}))


def delta(text: str) -> bytes:
    return ev("content_block_delta", index=0, delta={"type": "text_delta", "text": text})


def closing(tokens: int, reason: str = "max_tokens") -> bytes:
    return (ev("content_block_stop", index=0)
            + ev("message_delta", delta={"stop_reason": reason, "stop_sequence": None}, usage={"output_tokens": tokens})
            + ev("message_stop"))


def seen(out: bytes) -> list[dict[str, Any]]:
    events = []
    for raw in out.split(b"\n\n"):
        if raw:
            name, data = raw.split(b"\n")
            payload = json.loads(data[6:])
            assert name == b"event: " + payload["type"].encode()  # the event line still names its data
            events.append(payload)
    return events


def texts(out: bytes) -> list[str]:
    return [e["delta"]["text"] for e in seen(out) if e["type"] == "content_block_delta"]


def tracker(**extra: Any) -> MessagesTracker:
    body = {"model": "m", "max_tokens": 10, "stream": True, "messages": USER, **extra}
    found = tracker_for("/v1/messages", json.dumps(body).encode())
    assert isinstance(found, MessagesTracker)
    return found


def test_a_greedy_message_is_regenerated_at_the_replica_and_the_client_sees_each_piece_once() -> None:
    t = tracker(temperature=0)
    assert json.loads(t.first_body())["messages"] == USER
    t.begin_segment()
    first = t.feed(opening() + delta("Once") + delta(" upon") + delta(" a")[:15])  # broken mid-event
    assert texts(first) == ["Once", " upon"]
    body = json.loads(t.resume_body() or b"")
    assert body == {"model": "m", "max_tokens": 10, "stream": True, "messages": USER, "temperature": 0}

    t.begin_segment()
    out = t.feed(opening("msg-2") + delta("Once") + delta(" upon") + delta(" a") + delta(" time") + closing(4, "end_turn"))
    kinds = [e["type"] for e in seen(out)]
    assert kinds == ["content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert texts(out) == [" a", " time"]
    assert seen(out)[3]["usage"] == {"output_tokens": 4}  # the replica generated the whole message
    assert t.done and t.done_tail == b""


def test_a_sampled_message_goes_on_from_its_text_as_a_prefill_with_the_limit_and_usage_carried() -> None:
    t = tracker(temperature=0.7)
    t.begin_segment()
    t.feed(opening() + delta("Once") + delta(" upon"))
    body = json.loads(t.resume_body() or b"")
    assert body["messages"] == [*USER, {"role": "assistant", "content": "Once upon"}]
    assert body["max_tokens"] == 8

    t.begin_segment()  # llama-server repeats the prefill at the head of its first delta
    out = t.feed(opening("msg-2") + delta("Once upon a") + delta(" time") + closing(2))
    assert texts(out) == [" a", " time"]
    assert [e for e in seen(out) if e["type"] == "message_delta"][0]["usage"] == {"output_tokens": 4}

    again = t.resume_body()  # the message ended: nothing to carry on
    assert again is None


def test_a_second_failover_carries_on_from_everything_the_client_has() -> None:
    t = tracker(temperature=0.7)
    t.begin_segment()
    t.feed(opening() + delta("a"))
    t.resume_body()
    t.begin_segment()
    t.feed(opening() + delta("a b") + delta(" c"))
    body = json.loads(t.resume_body() or b"")
    assert body["messages"][-1] == {"role": "assistant", "content": "a b c"}
    assert body["max_tokens"] == 7
    assert len(body["messages"]) == 2  # one prefill, not one per failover


def test_messages_it_cannot_continue_end_as_before() -> None:
    thinking = tracker(temperature=0)
    thinking.begin_segment()
    thinking.feed(ev("message_start", message={"id": "m"})
                  + ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}))
    assert thinking.resume_body() is None

    prefilled = tracker(temperature=0.7, messages=[*USER, {"role": "assistant", "content": "Once"}])
    prefilled.begin_segment()
    prefilled.feed(opening() + delta(" upon"))
    assert prefilled.resume_body() is None  # the client's own prefill: sampled text cannot be added to it

    garbage = tracker(temperature=0)
    garbage.begin_segment()
    assert garbage.feed(b"data: {not json\n\n") == b"data: {not json\n\n"  # passed on untouched
    assert garbage.resume_body() is None

    spent = tracker(temperature=0.7, max_tokens=2)
    spent.begin_segment()
    spent.feed(opening() + delta("a") + delta(" b"))
    assert spent.resume_body() is None  # the limit is reached: nothing left to generate
