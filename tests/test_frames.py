"""Frames: the fast token encoding is byte-identical to the general one."""

from __future__ import annotations

import pytest

from tokenbridge.gateway import encodings
from tokenbridge.gateway.encodings.native_sse import NativeSSE, sse_message
from tokenbridge.gateway.frames import Batch, Frame
from tokenbridge.wire.events import Event

SSE = encodings.get("native_sse")
assert isinstance(SSE, NativeSSE)


@pytest.mark.parametrize(
    "text", ["plain", ' "quoted" ', "new\nline", "\u2028 sep", "emoji \U0001f600", "\\", ""]
)
def test_token_fast_path_matches_general_encoding(text: str) -> None:
    event = Event("token", "g_1", 7, 1700000000123, text)
    frame = Frame("1700000000123-4", "ab12", event)
    assert SSE.encode_frame(frame) == sse_message("token", event.to_data(), "ab12:1700000000123-4")


def test_batch_joins_encodings_once_and_cuts_at_the_seam() -> None:
    frames = [Frame(f"{i}-0", "e", Event("token", "g_1", i, 1, str(i))) for i in range(1, 4)]
    batch = Batch(frames)
    assert SSE.encode_batch(batch) == b"".join(SSE.encode_frame(f) for f in frames)
    assert [f.entry_id for f in batch.after((1, 0)).frames] == ["2-0", "3-0"]
    assert batch.after((0, 5)) is batch
