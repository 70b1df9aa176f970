"""The committed stubs are exactly what the .proto files generate."""

from pathlib import Path

from moecluster.protos import generate


def test_committed_stubs_match_the_protos(tmp_path):
    written = generate.generate(tmp_path)
    assert {p.name for p in written} >= {"tensor_pb2.py", "worker_pb2.py", "worker_pb2_grpc.py", "frontend_pb2.py"}
    for fresh in written:
        committed = Path(generate.HERE) / fresh.name
        assert committed.is_file(), f"{fresh.name} is not committed; run `make protos`"
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale; run `make protos`"


def test_packages_are_versioned():
    from moecluster.protos import frontend_pb2, tensor_pb2, worker_pb2

    assert worker_pb2.DESCRIPTOR.package == "moecluster.worker.v1"
    assert frontend_pb2.DESCRIPTOR.package == "moecluster.frontend.v1"
    assert tensor_pb2.DESCRIPTOR.package == "moecluster.wire.v1"
