"""Tensor codec and chunked streams."""

from concurrent import futures

import pytest
import torch
from moecluster.protos import tensor_pb2
from moecluster.wire import streaming
from moecluster.wire.tensors import DTYPES, WireError, decode, encode


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 5), (4, 0, 3), (2, 3, 7)])
def test_round_trip_is_bit_exact(dtype, shape):
    tensor = (torch.randn(shape) * 100).to(dtype)
    back = decode(encode(tensor))
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_payload_is_raw_bytes_not_repeated_floats():
    tensor = torch.randn(256, 64)
    message = encode(tensor)
    assert len(message.data) == tensor.numel() * 4
    assert message.ByteSize() < len(message.data) * 1.01


def test_non_contiguous_input_is_encoded_in_logical_order():
    tensor = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    assert torch.equal(decode(encode(tensor)), tensor)


@pytest.mark.parametrize(
    "message, fragment",
    [
        (tensor_pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8), "unknown dtype"),
        (tensor_pb2.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 15), "do not match shape"),
        (tensor_pb2.Tensor(dtype="float32", shape=[-1], data=b""), "negative dimension"),
        (tensor_pb2.Tensor(dtype="int64", shape=[3], data=b"\0" * 8), "24 bytes expected"),
    ],
)
def test_malformed_tensors_say_what_is_wrong(message, fragment):
    with pytest.raises(WireError, match=fragment):
        decode(message)


def test_unsupported_dtype_refused_on_encode():
    with pytest.raises(WireError, match="cannot travel"):
        encode(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5000])
def test_split_join_round_trip(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    chunks = list(streaming.split(payload, chunk_bytes=1000))
    assert len(chunks) == max(1, -(-size // 1000))
    assert all(len(c.data) <= 1000 for c in chunks) and chunks[-1].last
    assert streaming.join(iter(chunks), limit_bytes=10_000) == payload


def test_join_detects_corruption_truncation_and_oversize():
    payload = b"x" * 2500
    chunks = list(streaming.split(payload, chunk_bytes=1000))
    corrupted = [tensor_pb2.Chunk(data=c.data.replace(b"x", b"y", 1), total_size=c.total_size, last=c.last,
                                  crc32=c.crc32) if i == 1 else c for i, c in enumerate(chunks)]
    with pytest.raises(WireError, match="checksum"):
        streaming.join(iter(corrupted), limit_bytes=10_000)
    with pytest.raises(WireError, match="before its last chunk"):
        streaming.join(iter(chunks[:-1]), limit_bytes=10_000)
    with pytest.raises(WireError, match="over the limit"):
        streaming.join(iter(chunks), limit_bytes=2000)
    extra = chunks[:-1] + [tensor_pb2.Chunk(data=b"x" * 900, last=True, crc32=chunks[-1].crc32)]
    with pytest.raises(WireError, match="more than the 2500 announced"):
        streaming.join(iter(extra), limit_bytes=10_000)


def test_streaming_threshold_is_about_one_mebibyte():
    assert not streaming.needs_streaming(1 << 20)
    assert streaming.needs_streaming((1 << 20) + 1)


def test_a_port_another_grpc_server_holds_is_refused_not_shared(checkpoints):
    """gRPC's default SO_REUSEPORT would let two servers split one port's connections; ours bind or fail."""
    import grpc
    from moecluster.wire import endpoints
    from moecluster.workers.server import WorkerServer

    holder = grpc.server(futures.ThreadPoolExecutor(1))  # gRPC's defaults: SO_REUSEPORT on
    port = holder.add_insecure_port("127.0.0.1:0")
    holder.start()
    try:
        with pytest.raises(RuntimeError, match="Failed to bind"):
            endpoints.server(1).add_insecure_port(f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            WorkerServer(checkpoints["qwen3_moe"], [], port=port)
    finally:
        holder.stop(0)


def test_a_stream_is_asked_again_while_its_server_is_away_and_only_then():
    """`stream_again_on_unavailable` against real gRPC: nobody listening (UNAVAILABLE) is tried again until
    the window ends, or until a server comes up at that port; any other status is raised at once."""
    import socket
    import threading

    import grpc
    from moecluster.wire import endpoints, retry

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    answers = {"Count": lambda request, context: iter([b"1", b"2"]),
               "Refuse": lambda request, context: context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no")}
    handler = grpc.method_handlers_generic_handler("t.T", {
        name: grpc.unary_stream_rpc_method_handler(fn) for name, fn in answers.items()})

    def serve():
        server = endpoints.server(2, handlers=[handler])
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        return server

    with endpoints.channel(f"127.0.0.1:{port}") as channel:
        opened, notes = [], []

        def call(name):
            def open_stream(left):
                opened.append(left)
                return channel.unary_stream(f"/t.T/{name}")(b"", timeout=left)
            return open_stream

        with pytest.raises(grpc.RpcError) as away:  # nobody there, no window: one try
            list(retry.stream_again_on_unavailable(call("Count"), timeout=5, window_s=0, on_retry=notes.append))
        assert away.value.code() == grpc.StatusCode.UNAVAILABLE and len(opened) == 1 and notes == []

        opened.clear()
        with pytest.raises(grpc.RpcError):  # nobody there for the whole window: tried again, said once
            list(retry.stream_again_on_unavailable(call("Count"), timeout=5, window_s=0.5,
                                                   on_retry=lambda err: f"away: {err.code().name}"))
        assert len(opened) >= 3

        opened.clear()
        later = threading.Timer(0.3, lambda: servers.append(serve()))  # the server (re)starts mid-outage
        servers = []
        later.start()
        try:
            got = list(retry.stream_again_on_unavailable(call("Count"), timeout=10, window_s=10,
                                                         on_retry=lambda err: f"away: {err.code().name}"))
            assert got == ["away: UNAVAILABLE", b"1", b"2"] and len(opened) >= 2
            opened.clear()
            with pytest.raises(grpc.RpcError) as refused:  # an answer, not an outage: never asked again
                list(retry.stream_again_on_unavailable(call("Refuse"), timeout=5, window_s=5))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(opened) == 1
        finally:
            later.join()
            for server in servers:
                server.stop(0)


def test_a_channel_waits_out_a_slow_handshake():
    """A peer whose connection takes 400 ms to answer (busy, or TLS across machines): the call succeeds. With
    gRPC's min_reconnect_backoff_ms at 100 (its floor for one connection attempt), it failed UNAVAILABLE."""
    import socket
    import threading
    import time

    import grpc
    from moecluster.wire import endpoints

    handler = grpc.method_handlers_generic_handler("t.T", {"Echo": grpc.unary_unary_rpc_method_handler(
        lambda request, context: request)})
    server = endpoints.server(2, handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    front = socket.create_server(("127.0.0.1", 0))
    stopped = threading.Event()

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def relay() -> None:  # accepts at once, forwards nothing for 400 ms: a handshake that takes that long
        front.settimeout(0.2)
        while not stopped.is_set():
            try:
                conn, _ = front.accept()
            except OSError:
                continue
            time.sleep(0.4)
            back = socket.create_connection(("127.0.0.1", port))
            for a, b in ((conn, back), (back, conn)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=relay, daemon=True).start()
    try:
        with endpoints.channel(f"127.0.0.1:{front.getsockname()[1]}") as channel:
            assert channel.unary_unary("/t.T/Echo")(b"hi", timeout=10) == b"hi"
    finally:
        stopped.set()
        front.close()
        server.stop(0)
