"""GenerateStream's HTTP framing (sdk/http_transport.py), read from bytes as a response would give them:
chunks in order, a failure frame raised with its status code, a stream cut mid-frame reported as such.
The whole path through Ray Serve runs in tests/test_ray.py."""

from __future__ import annotations

import io

import grpc
import pytest
from moecluster.protos import frontend_pb2
from moecluster.sdk.http_transport import CHUNK, FAILURE, HttpCallError, _Frames, frame


def chunk(row: int, *tokens: int) -> bytes:
    return frame(CHUNK, frontend_pb2.GenerateChunk(row=row, tokens=list(tokens)).SerializeToString())


class Answer(io.BytesIO):
    """An HTTP response's body, handing out at most 3 bytes a read, as a socket may."""

    def read(self, size: int = -1) -> bytes:
        return super().read(min(size, 3) if size >= 0 else size)


def test_chunks_come_in_order_and_the_stream_ends_between_frames():
    frames = _Frames(Answer(chunk(0, 5) + chunk(1, 7) + chunk(0, 6, 9)))
    assert [(c.row, list(c.tokens)) for c in frames] == [(0, [5]), (1, [7]), (0, [6, 9])]
    assert frames._answer.closed  # read to its end: the response is closed


def test_a_failure_frame_raises_its_code_and_reason():
    frames = _Frames(Answer(chunk(0, 5) + frame(FAILURE, b"UNAVAILABLE: no live copy of expert (0, 3)")))
    assert next(frames).tokens == [5]
    with pytest.raises(HttpCallError, match="no live copy of expert") as failed:
        next(frames)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and frames._answer.closed


@pytest.mark.parametrize("cut", [2, 7])  # inside the next frame's header, inside its payload
def test_a_stream_cut_mid_frame_is_unavailable(cut):
    whole = chunk(0, 5) + chunk(1, 300, 301)
    frames = _Frames(Answer(whole[:len(chunk(0, 5)) + cut]))
    assert next(frames).row == 0
    with pytest.raises(HttpCallError, match="broke off mid-frame") as broke:
        next(frames)
    assert broke.value.code() == grpc.StatusCode.UNAVAILABLE
