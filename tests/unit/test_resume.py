"""The stream tracker behind mid-stream failover (``api.resume``): what it asks the first server for,
what the client sees, and the request that carries a broken stream on."""

from __future__ import annotations

import json
from typing import Any

from meshllm.api.resume import StreamTracker, tracker_for


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def token(text: str, tid: int, count: int, *, cid: str = "cmpl-1", final: str | None = None,
          usage: dict[str, int] | None = None) -> bytes:
    payload: dict[str, Any] = {
        "choices": [{"text": text, "index": 0, "finish_reason": final,
                     "logprobs": {"content": [{"id": tid, "token": text, "bytes": list(text.encode())}]}}],
        "id": cid, "object": "text_completion",
        "timings": {"prompt_n": 5, "cache_n": 0, "predicted_n": count}}
    if usage is not None:
        payload["usage"] = usage
    return event(payload)


def client_view(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]


def completion(**extra: Any) -> StreamTracker:
    body = {"model": "m", "prompt": "Once", "max_tokens": 10, "temperature": 0, "stream": True, **extra}
    tracker = tracker_for("/v1/completions", json.dumps(body).encode())
    assert tracker is not None
    return tracker


def test_the_first_request_asks_for_token_ids_and_the_client_never_sees_them() -> None:
    tracker = completion()
    assert json.loads(tracker.first_body()) | {} == {
        "model": "m", "prompt": "Once", "max_tokens": 10, "temperature": 0, "stream": True,
        "timings_per_token": True, "n_probs": 1, "post_sampling_probs": True}
    tracker.begin_segment()
    seen = client_view(tracker.feed(token(" a", 7, 1) + token(" b", 8, 2)[:20]))
    assert [e["choices"][0]["text"] for e in seen] == [" a"]  # the cut event waits for its end
    assert seen[0]["choices"][0]["logprobs"] is None and "timings" not in seen[0]


def test_a_broken_completion_carries_on_from_its_token_ids_with_the_limit_reduced() -> None:
    tracker = completion()
    tracker.begin_segment()
    tracker.feed(token(" a", 7, 1) + token(" b", 8, 2) + token(" c", 9, 3))
    body = json.loads(tracker.resume_body() or b"")
    assert body["prompt"] == ["Once", 7, 8, 9] and body["max_tokens"] == 7

    tracker.begin_segment()  # the replica: a new id, its own counts and usage
    out = tracker.feed(token(" d", 10, 1, cid="cmpl-2")
                       + token("", 11, 7, cid="cmpl-2", final="length",
                               usage={"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15})
                       + b"data: [DONE]\n\n")
    seen = client_view(out)
    assert [e["id"] for e in seen] == ["cmpl-1", "cmpl-1"]
    assert seen[0]["choices"][0]["text"] == " d"
    assert seen[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}
    assert out.endswith(b"data: [DONE]\n\n") and tracker.done


def test_a_held_back_token_ends_the_exact_prefix_and_a_greedy_replica_regenerates_the_rest() -> None:
    tracker = completion()
    tracker.begin_segment()
    # token 2 ended in half a UTF-8 character: llama-server sent nothing for it, then both at once
    tracker.feed(token(" a", 7, 1) + token("é", 5, 3) + token("x", 6, 4))
    body = json.loads(tracker.resume_body() or b"")
    assert body["prompt"] == ["Once", 7] and body["max_tokens"] == 9

    tracker.begin_segment()
    seen = client_view(tracker.feed(token("é", 4, 2) + token("x", 6, 3) + token("y", 12, 4)))
    assert [e["choices"][0]["text"] for e in seen] == ["y"]  # what the client had is dropped


def test_a_sampled_request_gets_the_unexact_rest_as_text() -> None:
    tracker = completion(temperature=0.7)
    tracker.begin_segment()
    tracker.feed(token(" a", 7, 1) + token("é", 5, 3))
    body = json.loads(tracker.resume_body() or b"")
    assert body["prompt"] == ["Once", 7, "é"] and body["max_tokens"] == 7


def test_a_chat_stream_carries_on_as_a_prefilled_assistant_message() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}
    tracker = tracker_for("/v1/chat/completions", json.dumps(body).encode())
    assert tracker is not None
    assert "n_probs" not in json.loads(tracker.first_body())
    tracker.begin_segment()

    def chunk(delta: dict[str, Any], count: int, cid: str = "chatcmpl-1") -> bytes:
        return event({"choices": [{"index": 0, "delta": delta, "finish_reason": None}], "id": cid,
                      "object": "chat.completion.chunk", "timings": {"prompt_n": 9, "cache_n": 0,
                                                                     "predicted_n": count}})

    tracker.feed(chunk({"role": "assistant", "content": None}, 1) + chunk({"content": "Hel"}, 1)
                 + chunk({"content": "lo"}, 2))
    resumed = json.loads(tracker.resume_body() or b"")
    assert resumed["messages"][-1] == {"role": "assistant", "content": "Hello"}
    assert resumed["max_tokens"] == 8
    tracker.begin_segment()
    seen = client_view(tracker.feed(chunk({"role": "assistant", "content": None}, 1, "chatcmpl-2")
                                    + chunk({"content": " there"}, 1, "chatcmpl-2")))
    assert [e["choices"][0]["delta"] for e in seen] == [{"content": " there"}]
    assert seen[0]["id"] == "chatcmpl-1"


def test_requests_it_cannot_carry_on_get_no_tracker() -> None:
    def tracked(path: str, **body: Any) -> bool:
        return tracker_for(path, json.dumps({"model": "m", "stream": True, **body}).encode()) is not None

    assert not tracked("/v1/completions", prompt=["a", "b"])  # several prompts
    assert not tracked("/v1/completions", prompt="a", n=2)
    assert not tracked("/v1/chat/completions", messages=[{"role": "user", "content": "x"}], tools=[{}])
    assert not tracked("/v1/messages", messages=[{"role": "user", "content": "x"}], tools=[{}])
    assert not tracked("/v1/embeddings", input="x")
    assert tracker_for("/v1/completions", b'{"model": "m", "prompt": "a"}') is None  # not streamed


def test_a_sampled_stream_carried_on_by_text_is_carried_on_by_text_again() -> None:
    tracker = completion(temperature=0.7)
    tracker.begin_segment()
    tracker.feed(token(" a", 7, 1) + token("é", 5, 3))
    tracker.resume_body()
    tracker.begin_segment()
    tracker.feed(token(" b", 9, 1) + token(" c", 10, 2))
    body = json.loads(tracker.resume_body() or b"")
    assert body["prompt"] == ["Once", 7, "é b c"] and body["max_tokens"] == 5


def test_a_greedy_chat_stream_is_regenerated_at_the_replica_and_what_the_client_has_is_dropped() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True,
            "temperature": 0}
    tracker = tracker_for("/v1/chat/completions", json.dumps(body).encode())
    assert tracker is not None

    def chunk(delta: dict[str, Any], count: int) -> bytes:
        return event({"choices": [{"index": 0, "delta": delta, "finish_reason": None}], "id": "chatcmpl-9",
                      "timings": {"prompt_n": 9, "cache_n": 0, "predicted_n": count}})

    tracker.begin_segment()
    tracker.feed(chunk({"role": "assistant", "content": None}, 1) + chunk({"content": "Hel"}, 1)
                 + chunk({"content": "lo"}, 2))
    resumed = json.loads(tracker.resume_body() or b"")
    assert resumed["messages"] == body["messages"] and resumed["max_tokens"] == 10
    tracker.begin_segment()
    seen = client_view(tracker.feed(chunk({"role": "assistant", "content": None}, 1) + chunk({"content": "Hel"}, 1)
                                    + chunk({"content": "lo"}, 2) + chunk({"content": " there"}, 3)))
    assert [e["choices"][0]["delta"] for e in seen] == [{"content": " there"}]
