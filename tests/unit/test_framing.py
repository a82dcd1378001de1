"""Frames, JSON messages and stream headers: round trips, incremental decoding, and refusals."""

from __future__ import annotations

import struct

import anyio
import pytest

from meshllm.transport import (FrameChannel, FrameDecoder, FrameError, StreamKind, decode_message,
                               encode_frame, encode_message, memory_byte_channel_pair)
from meshllm.transport.stream import decode_stream_header, encode_stream_header

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("payloads", [
    [b""],
    [b"x"],
    [b"a", b"", b"bc"],
    [bytes(range(256)) * 300],
    [b"\x00\x00\x00\x05", b"hello"],  # payloads that look like length prefixes
])
@pytest.mark.parametrize("piece", [1, 3, 4, 5, 1000, 1 << 20])
def test_frames_survive_any_split(payloads: list[bytes], piece: int) -> None:
    wire = b"".join(encode_frame(p) for p in payloads)
    decoder = FrameDecoder()
    out: list[bytes] = []
    for start in range(0, len(wire), piece):
        out += decoder.decode(wire[start:start + piece])
    assert out == payloads
    assert decoder.buffered == 0
    decoder.finish()


def test_pop_returns_one_frame_and_take_rest_the_bytes_after_it() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"head") + b"raw bytes")
    assert decoder.pop() == b"head"
    assert decoder.take_rest() == b"raw bytes"
    assert decoder.pop() is None


def test_oversize_length_is_refused_from_its_four_bytes_and_stays_refused() -> None:
    decoder = FrameDecoder(max_size=1024)
    with pytest.raises(FrameError, match="exceeds the maximum"):
        decoder.feed(struct.pack(">I", 1025))
    assert decoder.buffered == 0
    with pytest.raises(FrameError):
        decoder.feed(encode_frame(b"fine"))
    with pytest.raises(FrameError):
        decoder.pop()


def test_default_maximum_is_16_mib() -> None:
    FrameDecoder().feed(struct.pack(">I", 16 * 1024 * 1024))
    with pytest.raises(FrameError):
        FrameDecoder().feed(struct.pack(">I", 16 * 1024 * 1024 + 1))


def test_encoding_refuses_what_the_decoder_would_refuse() -> None:
    with pytest.raises(FrameError):
        encode_frame(b"x" * 11, max_size=10)


def test_end_of_stream_inside_a_frame_is_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"abcdef")[:-1])
    with pytest.raises(FrameError, match="inside a frame"):
        decoder.finish()


@pytest.mark.parametrize("payload", [
    b"\xff\xfe not utf-8",
    b"not json",
    b"[1, 2]",
    b'"a string"',
    b"[" * 100_000,
    b"",
])
def test_decode_message_refuses_anything_but_a_json_object(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_message(payload)


def test_message_round_trip() -> None:
    message = {"t": "x", "n": 3, "nested": {"list": [1, "ü"]}}
    frame = encode_message(message)
    (payload,) = FrameDecoder().decode(frame)
    assert decode_message(payload) == message


@pytest.mark.parametrize("kind", list(StreamKind))
def test_stream_header_names_each_kind(kind: StreamKind) -> None:
    (payload,) = FrameDecoder().decode(encode_stream_header(kind))
    assert decode_stream_header(payload) is kind


@pytest.mark.parametrize("payload", [b'{"kind":"bogus"}', b'{"kind":3}', b"{}", b"\x00"])
def test_stream_header_refuses_unknown_kinds(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_stream_header(payload)


async def test_frame_channel_over_a_memory_pair() -> None:
    left, right = memory_byte_channel_pair()
    sender, receiver = FrameChannel(left), FrameChannel(right, read_size=7)
    async with left, right, anyio.create_task_group() as tg:
        async def send_all() -> None:
            await sender.send_message({"hello": 1})
            await sender.send_frame(b"\x00" * 100_000)
            await sender.send_message({"bye": True})
            await left.send_eof()
        tg.start_soon(send_all)
        assert await receiver.receive_message() == {"hello": 1}
        assert await receiver.receive_frame() == b"\x00" * 100_000
        assert await receiver.receive_message() == {"bye": True}
        assert await receiver.receive_message() is None


async def test_frame_channel_refuses_oversize_and_truncated_frames() -> None:
    left, right = memory_byte_channel_pair()
    async with left, right:
        await left.send(struct.pack(">I", 2048))
        with pytest.raises(FrameError):
            await FrameChannel(right, max_size=1024).receive_frame()

    left, right = memory_byte_channel_pair()
    async with left, right:
        await left.send(encode_frame(b"complete")[:-2])
        await left.send_eof()
        with pytest.raises(FrameError):
            await FrameChannel(right).receive_frame()
