"""Mutual TLS between a cluster's own parts: controller, frontends, workers, trainers.

Without it, anyone who reaches a worker's or the controller's port can call it: load experts, move
them, scale the cluster. With it, every one of those servers requires a certificate signed by the
cluster's CA, and every channel between the parts presents one and checks the server's.

    MOECLUSTER_INTERNAL_TLS=/etc/moecluster/internal-tls   # holds ca.crt, tls.crt, tls.key

That layout is a Kubernetes TLS Secret's with its CA (what cert-manager writes), so a Secret mounted
as a folder is used as it is. Every part presents the same name, SERVER_NAME, whatever address it is
reached at (pod IPs change): the certificate says "a part of this cluster", the CA says which cluster.
`moectl up --internal-tls` makes a CA and one certificate for a local cluster and keeps no CA key, so
nothing can issue another. Bulk expert copies (`bulk.py`), raw sockets, are wrapped in the same mutual
TLS. The API a frontend serves to users is not internal: API keys and its own TLS guard it (`access.py`).

Certificates are read when a server starts listening, and again at a handshake after they changed (a
renewed Secret); a channel reads them when it is made.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import tempfile
from pathlib import Path

import grpc

log = logging.getLogger(__name__)
ENV = "MOECLUSTER_INTERNAL_TLS"
SERVER_NAME = "moecluster-internal"
FILES = ("ca.crt", "tls.crt", "tls.key")
VALID_DAYS = 3650  # a local cluster's: it is remade with the cluster


def folder(explicit: str | os.PathLike | None = None) -> Path | None:
    """The folder of this process's cluster certificates (`explicit`, else $MOECLUSTER_INTERNAL_TLS); None: plaintext.
    ValueError when it lacks a file, so a misconfigured part fails at start, not at its first call."""
    chosen = explicit or os.environ.get(ENV)
    if not chosen:
        return None
    path = Path(chosen)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"internal TLS folder {path} lacks {', '.join(missing)} (set by {ENV}: it needs ca.crt, "
                         "tls.crt and tls.key)")
    return path


def channel_credentials(path: Path) -> tuple[grpc.ChannelCredentials, list[tuple[str, object]]]:
    """(credentials, channel options) for a channel to another part: the cluster's CA, and our certificate."""
    ca, cert, key = ((path / name).read_bytes() for name in FILES)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return credentials, [("grpc.ssl_target_name_override", SERVER_NAME)]


def server_credentials(path: Path) -> grpc.ServerCredentials:
    """A server requiring a client certificate from the cluster's CA; re-read at a handshake after a file changed.
    One port only (gRPC consumes the first certificate of the credentials it binds)."""

    def stamps() -> tuple:
        return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in ((path / n).stat() for n in FILES))

    def load() -> grpc.ServerCertificateConfiguration:
        ca, cert, key = ((path / name).read_bytes() for name in FILES)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    seen = [stamps()]

    def fetch() -> grpc.ServerCertificateConfiguration | None:  # gRPC asks at each new handshake
        try:
            now = stamps()
            if now == seen[0]:
                return None
            seen[0] = now
            log.info("internal TLS certificates re-read from %s", path)
            return load()
        except OSError as err:  # a Secret being swapped: the last good ones stay
            log.warning("cannot read the internal TLS certificates (%s): keeping those read before", err)
            return None

    return grpc.dynamic_ssl_server_credentials(load(), fetch, require_client_authentication=True)


def pems(path: Path) -> dict[str, str]:
    """The folder's files as text: what a process on another machine is handed (a Ray actor), to `install`."""
    return {name: (path / name).read_text() for name in FILES}


def install(files: dict[str, str]) -> Path:
    """Writes `pems`' files into a private folder of this process and makes it this process's certificates (and its
    children's): how a part started on another machine gets them."""
    path = Path(tempfile.mkdtemp(prefix="moecluster-internal-tls-"))  # mode 0700
    for name in FILES:
        target = path / name
        target.touch(mode=0o600)
        target.write_text(files[name])
    os.environ[ENV] = str(path)
    return path


def socket_context(path: Path, server_side: bool) -> ssl.SSLContext:
    """The same mutual TLS for a raw socket (bulk expert copies): the cluster's CA, our certificate, and the
    peer's required (a server's named SERVER_NAME). Made per connection, so a renewed folder is used at once."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH,
                                         cafile=str(path / "ca.crt"))
    context.load_cert_chain(path / "tls.crt", path / "tls.key")
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def generate(path: str | os.PathLike, cluster: str) -> Path:
    """A CA for `cluster` and one certificate it signs, for client and server, as ca.crt, tls.crt, tls.key in
    `path` (made private). The CA's key is not kept: rotating means making the folder again."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, issuer: x509.Name, public_key, signer, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])).issuer_name(issuer)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
        if not ca:
            builder = (builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"moecluster {cluster} CA")])
    ca = certificate(f"moecluster {cluster} CA", ca_name, ca_key.public_key(), ca_key, ca=True)
    cert = certificate(SERVER_NAME, ca_name, key.public_key(), ca_key, ca=False)
    pem = serialization.Encoding.PEM
    for name, data in (("ca.crt", ca.public_bytes(pem)), ("tls.crt", cert.public_bytes(pem)),
                       ("tls.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))):
        target = path / name
        target.touch(mode=0o600)
        target.write_bytes(data)
    return path
