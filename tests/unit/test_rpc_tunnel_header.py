"""The RPC tunnel's request and reply frames: round trips, and refusals of malformed ones."""

from __future__ import annotations

import pytest

from meshllm.transport import FrameDecoder, FrameError, decode_message, encode_message
from meshllm.tunnels.rpc import (MAX_HEADER, RpcTunnelError, decode_reply, decode_request, encode_reply,
                                 encode_request)


def _payload(frame: bytes) -> bytes:
    decoder = FrameDecoder(max_size=MAX_HEADER)
    decoder.feed(frame)
    payload = decoder.pop()
    assert payload is not None and decoder.buffered == 0
    return payload


@pytest.mark.parametrize("target", ["gemma-3-270m", "Qwen3-30B-A3B#split/abc", "ü" * 100])
def test_a_request_names_its_target(target: str) -> None:
    assert decode_request(_payload(encode_request(target))) == target


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1]", b'{"v": 1}', b'{"target": ""}',
                                     b'{"target": 5}'])
def test_a_malformed_request_is_a_frame_error(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_request(payload)


def test_a_target_too_long_for_a_header_is_refused_when_encoding() -> None:
    with pytest.raises(FrameError):
        encode_request("x" * MAX_HEADER)


def test_an_ok_reply_says_ok_and_decodes_quietly() -> None:
    payload = _payload(encode_reply())
    assert decode_message(payload) == {"ok": True}
    assert decode_reply(payload) is None  # no RpcTunnelError: the session may start


@pytest.mark.parametrize(("frame", "expected"), [
    (encode_reply("no rpc-server for 'm'", code="unknown_target"), "unknown_target: no rpc-server for 'm'"),
    (encode_reply("x" * 10_000, code="rpc_unavailable"), "rpc_unavailable: " + "x" * 512),
    (encode_message({"ok": "yes"}), "refused"),
])
def test_a_refusal_says_why(frame: bytes, expected: str) -> None:
    with pytest.raises(RpcTunnelError, match="^" + expected.split(":")[0]) as info:
        decode_reply(_payload(frame) if len(frame) <= MAX_HEADER + 4 else frame[4:])
    assert str(info.value).startswith(expected)


def test_a_reply_that_is_not_json_is_an_error() -> None:
    with pytest.raises(RpcTunnelError, match="malformed"):
        decode_reply(b"\xff")
