"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

Everything runs as plain local processes in one temp dir, listening on
127.0.0.1 only, on free ports:

- etcd (no fsync: test data is throwaway);
- kube-apiserver with ``--authorization-mode=Node,RBAC``, the default
  admission plugins, a self-made CA, serving cert and service-account key, so
  ``kubectl create token`` works and RBAC is enforced for every identity but
  the admin (a client cert in ``system:masters``);
- kube-controller-manager with all default controllers (deployments,
  replicasets, garbage collector, namespaces, service accounts, endpoint
  slices, node lifecycle, ...), each controller with its own service-account
  credentials, as in a real cluster.

There is no scheduler, kubelet or kube-proxy: ``fake_kubelet.FakeKubelet`` plays
those for one node.

Service ClusterIPs come from ``127.16.0.0/16`` so that the fake kube-proxy can
listen on them without touching network interfaces (all of 127/8 is local on
Linux).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

SERVICE_CIDR = "127.16.0.0/16"
HOST = "127.0.0.1"


class CommandFailed(subprocess.CalledProcessError):
    """A CalledProcessError whose message carries the command's output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout or ''}\nstderr:\n{self.stderr or ''}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"({e})"
    return "\n".join(text.splitlines()[-lines:])


# --- PKI -------------------------------------------------------------------------------------------

def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _cert(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, ca: bool = False,
          sans: list[x509.GeneralName] | None = None, client: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=7))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


@dataclass
class Pki:
    """Paths of the PEM files the control plane uses."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        ca_key = _key()
        ca_name = _name("moecluster-e2e-ca")
        ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
        serving_key = _key()
        # The first IP of the service range is the `kubernetes` Service's ClusterIP.
        first_service_ip = next(ipaddress.ip_network(SERVICE_CIDR).hosts())
        sans = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                          "kubernetes.default.svc.cluster.local")]
        sans += [x509.IPAddress(ipaddress.ip_address(HOST)), x509.IPAddress(first_service_ip)]
        serving = _cert(_name("kube-apiserver"), serving_key, ca_name, ca_key, sans=sans)
        admin_key = _key()
        admin = _cert(_name("e2e-admin", "system:masters"), admin_key, ca_name, ca_key, client=True)
        sa_key = _key()
        paths = cls(*(directory / n for n in ("ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "admin.crt",
                                              "admin.key", "sa.key", "sa.pub")))
        paths.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        paths.ca_key.write_bytes(_pem_key(ca_key))
        paths.serving_cert.write_bytes(serving.public_bytes(serialization.Encoding.PEM))
        paths.serving_key.write_bytes(_pem_key(serving_key))
        paths.admin_cert.write_bytes(admin.public_bytes(serialization.Encoding.PEM))
        paths.admin_key.write_bytes(_pem_key(admin_key))
        paths.sa_key.write_bytes(_pem_key(sa_key))
        paths.sa_pub.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
        return paths


def write_kubeconfig(path: Path, server: str, ca_cert: Path, *, user: dict) -> Path:
    """Kubeconfig as JSON (valid YAML) with one cluster, user and context."""
    import base64
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
        "clusters": [{"name": "e2e", "cluster": {"server": server,
                                                 "certificate-authority-data": base64.b64encode(ca_cert.read_bytes()).decode()}}],
        "users": [{"name": "e2e", "user": user}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
    }
    path.write_text(json.dumps(config, indent=1))
    path.chmod(0o600)
    return path


# --- processes -------------------------------------------------------------------------------------

class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1; ``start()``, then ``stop()``.

    bins: {"ETCD": path, "KUBE_APISERVER": path, "KUBE_CONTROLLER_MANAGER": path, "KUBECTL": path}.
    """

    def __init__(self, bins: dict[str, str], work_dir: Path) -> None:
        self.bins = bins
        self.work_dir = Path(work_dir)
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.api_port = free_port()
        self.api_url = f"https://{HOST}:{self.api_port}"
        self.pki: Pki | None = None
        self.kubeconfig = self.work_dir / "admin.kubeconfig"

    # Logs of each component: <log_dir>/<name>.log
    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.log_path(name), "ab")
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.work_dir)
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def _wait(self, what: str, name: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode} while waiting for {what}\n"
                                   f"{self.tails([name], 60)}")
            try:
                if check():
                    return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})\n"
                           f"{self.tails([name], 60)}")

    def ssl_context(self) -> ssl.SSLContext:
        assert self.pki
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    def get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        """GET on the API server as admin: (status, body)."""
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),  # loopback: never via a proxy
                                                 urllib.request.HTTPSHandler(context=self.ssl_context()))
            with opener.open(self.api_url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def start(self) -> None:
        self.pki = pki = Pki.create(self.work_dir / "pki")
        write_kubeconfig(self.kubeconfig, self.api_url, pki.ca_cert, user={
            "client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)})

        etcd_client, etcd_peer = free_port(), free_port()
        self._spawn("etcd", [
            self.bins["ETCD"], "--name=e2e", f"--data-dir={self.work_dir / 'etcd'}",
            f"--listen-client-urls=http://{HOST}:{etcd_client}", f"--advertise-client-urls=http://{HOST}:{etcd_client}",
            f"--listen-peer-urls=http://{HOST}:{etcd_peer}", f"--initial-advertise-peer-urls=http://{HOST}:{etcd_peer}",
            f"--initial-cluster=e2e=http://{HOST}:{etcd_peer}", "--unsafe-no-fsync", "--log-level=warn",
            "--quota-backend-bytes=2147483648",
        ])

        def etcd_healthy() -> bool:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://{HOST}:{etcd_client}/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"
        self._wait("etcd /health", "etcd", etcd_healthy, 30)

        self._spawn("kube-apiserver", [
            self.bins["KUBE_APISERVER"], f"--etcd-servers=http://{HOST}:{etcd_client}",
            f"--bind-address={HOST}", f"--advertise-address={HOST}", f"--secure-port={self.api_port}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # No real endpoints to reconcile for the `kubernetes` Service: the API server is on loopback.
            "--endpoint-reconciler-type=none",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            "--allow-privileged=true", "--profiling=false", "--v=1",
            f"--cert-dir={self.work_dir / 'apiserver-certs'}",
        ])

        def api_ready() -> bool:
            status, _ = self.get("/readyz", timeout=3)
            return status == 200
        self._wait("kube-apiserver /readyz", "kube-apiserver", api_ready, 120)

        kcm_kubeconfig = self.kubeconfig  # admin: KCM only uses it to mint each controller's own SA token
        self._spawn("kube-controller-manager", [
            self.bins["KUBE_CONTROLLER_MANAGER"], f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}", f"--authorization-kubeconfig={kcm_kubeconfig}",
            f"--bind-address={HOST}", f"--secure-port={free_port()}",
            f"--cert-dir={self.work_dir / 'kcm-certs'}",
            "--controllers=*", "--use-service-account-credentials=true", "--leader-elect=false",
            f"--root-ca-file={pki.ca_cert}", f"--service-account-private-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--horizontal-pod-autoscaler-sync-period=2s",  # HPA tests need not wait the default 15 s
            "--profiling=false", "--v=1",
        ])

        # The serviceaccount controller creating `default` proves KCM works; pods need that SA to be admitted.
        def default_sa() -> bool:
            status, _ = self.get("/api/v1/namespaces/default/serviceaccounts/default", timeout=3)
            return status == 200
        self._wait("kube-controller-manager to create ServiceAccount default/default", "kube-controller-manager",
                   default_sa, 90)

    def stop(self) -> None:
        """SIGTERM every process group we started (reverse order), SIGKILL what is left after 10 s."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        # etcd's data (~60 MB of preallocated WAL) is worthless after the session; the logs stay.
        shutil.rmtree(self.work_dir / "etcd", ignore_errors=True)

    def tails(self, names: list[str] | None = None, lines: int = 40) -> str:
        """The last lines of each component's log, for failure reports."""
        names = names or list(self.procs)
        return "\n".join(f"----- {self.log_path(n)} (last {lines} lines) -----\n{tail(self.log_path(n), lines)}"
                         for n in names)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, kubeconfig: str | os.PathLike | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [self.bins["KUBECTL"], f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, argv, result.stdout, result.stderr)
        return result

    def token_kubeconfig(self, namespace: str, serviceaccount: str) -> Path:
        """A kubeconfig that authenticates as ServiceAccount namespace/serviceaccount (a 2 h bound token)."""
        assert self.pki
        token = self.kubectl("create", "token", serviceaccount, "-n", namespace, "--duration=2h").stdout.strip()
        path = self.work_dir / f"{namespace}-{serviceaccount}.kubeconfig"
        return write_kubeconfig(path, self.api_url, self.pki.ca_cert, user={"token": token})
