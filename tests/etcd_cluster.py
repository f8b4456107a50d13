"""A real etcd cluster on loopback for the fleet tests: start, kill, pause, restart, stop.

Members listen on free loopback ports with data in a temporary directory, and every process
started here is stopped (SIGTERM, then SIGKILL) by ``stop()``, which the fixtures call even
when a test fails. Timings are scaled down (heartbeat 50 ms, election 500 ms) by flags, not
by code paths of their own. ``TlsFiles`` makes a CA, a server certificate and a client
certificate with ``cryptography`` for the ``--client-cert-auth`` variant. Over 300 lines
because it is the etcd tests' whole rig (cluster, certificates, reply-dropping proxy), shared
by both etcd test files so that neither repeats it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

ETCD = shutil.which("etcd")
SKIP_REASON = "the etcd binary is absent (Debian: etcd-server, installed by .ci/sysdeps)"

#: A member not healthy within this is broken, not slow: a 3-member loopback cluster elects
#: its leader in well under a second with the timings below.
START_TIMEOUT = 15.0


def free_port() -> int:
    """A loopback port free right now (the race with other processes is accepted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class TlsFiles:
    """A CA, one server certificate for 127.0.0.1 and one client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        """Generate the CA and both certificates under ``directory``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            path.chmod(0o600)

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(name("aac-tokend test CA"))
            .issuer_name(name("aac-tokend test CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )

        def leaf(cn: str, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
            key = ec.generate_private_key(ec.SECP256R1())
            # etcd 3.4's JSON gateway dials its own gRPC server with the server certificate,
            # so the server certificate must be good for client authentication as well.
            usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
            if server:
                usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(cn))
                .issuer_name(ca.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            )
            if server:
                builder = builder.add_extension(
                    x509.SubjectAlternativeName(
                        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                    ),
                    critical=False,
                )
            return builder.sign(ca_key, hashes.SHA256()), key

        directory.mkdir(parents=True, exist_ok=True)
        files = cls(
            directory / "ca.pem",
            directory / "server.pem",
            directory / "server-key.pem",
            directory / "client.pem",
            directory / "client-key.pem",
        )
        files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        server_cert, server_key = leaf("127.0.0.1", True)
        files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
        write_key(server_key, files.server_key)
        client_cert, client_key = leaf("root", False)
        files.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
        write_key(client_key, files.client_key)
        return files


@dataclass
class Member:
    """One etcd member: its name, ports, data directory and process (None while down)."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    scheme: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL (the JSON gateway is served there too)."""
        return f"{self.scheme}://127.0.0.1:{self.client_port}"


@dataclass
class EtcdCluster:
    """N members on loopback; ``start()`` waits for health, ``stop()`` always cleans up."""

    base: Path
    size: int = 3
    tls: TlsFiles | None = None
    extra_args: tuple[str, ...] = ()
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        scheme = "https" if self.tls else "http"
        for i in range(self.size):
            self.members.append(
                Member(f"m{i}", free_port(), free_port(), self.base / f"m{i}", scheme)
            )

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL, in member order."""
        return [m.url for m in self.members]

    def _args(self, m: Member) -> list[str]:
        initial = ",".join(f"{o.name}=http://127.0.0.1:{o.peer_port}" for o in self.members)
        args = [
            str(ETCD),
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.url}",
            f"--advertise-client-urls={m.url}",
            f"--listen-peer-urls=http://127.0.0.1:{m.peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{m.peer_port}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=aac-tokend-test",
            # Scaled down for tests: a lost leader is replaced in about a second; the minimum
            # lease TTL etcd grants stays 2 s (1.5 election timeouts, rounded up).
            "--heartbeat-interval=50",
            "--election-timeout=1000",
            "--snapshot-count=10000",
            "--log-level=error",
            "--logger=zap",
        ]
        if self.tls:
            args += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        return args + list(self.extra_args)

    def start(self) -> EtcdCluster:
        """Start every member and wait until each answers its health check."""
        for m in self.members:
            self.start_member(m, wait=False)
        for m in self.members:
            self.wait_healthy(m)
        return self

    @contextlib.contextmanager
    def running(self) -> Iterator[EtcdCluster]:
        """The cluster started, and stopped at the end of the block (also if starting failed)."""
        try:
            yield self.start()
        finally:
            self.stop()

    def start_member(self, m: Member, *, wait: bool = True) -> None:
        """Start (or restart, on its existing data) one member."""
        m.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.base / f"{m.name}.log").open("ab")
        m.proc = subprocess.Popen(self._args(m), stdout=log, stderr=log, start_new_session=True)
        log.close()
        if wait:
            self.wait_healthy(m)

    def _get(self, m: Member, path: str, timeout: float = 1.0) -> requests.Response:
        if self.tls:
            return requests.post(
                m.url + path,
                json={},
                timeout=timeout,
                verify=str(self.tls.ca),
                cert=(str(self.tls.client_cert), str(self.tls.client_key)),
            )
        return requests.post(m.url + path, json={}, timeout=timeout)

    def wait_healthy(self, m: Member) -> None:
        """Wait until ``m`` reports a leader (its status names one)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(f"etcd {m.name} exited: see {self.base / m.name}.log")
            with contextlib.suppress(requests.RequestException, ValueError):
                status = self._get(m, "/v3/maintenance/status").json()
                if int(status.get("leader", 0)):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"etcd {m.name} not healthy within {START_TIMEOUT} s")

    def leader(self) -> Member:
        """The member that is leader now, as the running members agree."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for m in self.members:
                if m.proc is None:
                    continue
                with contextlib.suppress(requests.RequestException, ValueError):
                    status = self._get(m, "/v3/maintenance/status").json()
                    if status.get("leader") == status["header"]["member_id"]:
                        return m
            time.sleep(0.05)
        raise RuntimeError("no leader")

    def kill(self, m: Member) -> None:
        """SIGKILL one member and reap it."""
        if m.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait()
            m.proc = None

    def pause(self, m: Member) -> None:
        """SIGSTOP one member: its sockets stay open and nothing answers."""
        assert m.proc is not None
        m.proc.send_signal(signal.SIGSTOP)

    def resume(self, m: Member) -> None:
        """SIGCONT a paused member."""
        assert m.proc is not None
        m.proc.send_signal(signal.SIGCONT)

    def restore(self) -> None:
        """Every member running again (killed ones restarted, paused ones resumed), healthy."""
        for m in self.members:
            if m.proc is None:
                self.start_member(m, wait=False)  # all first: one alone has no quorum
            else:
                self.resume(m)
        for m in self.members:
            self.wait_healthy(m)

    def stop(self) -> None:
        """Stop every member: SIGCONT and SIGTERM, then SIGKILL whatever is left after 2 s."""
        running = [m for m in self.members if m.proc is not None]
        for m in running:
            assert m.proc is not None
            with contextlib.suppress(ProcessLookupError):
                m.proc.send_signal(signal.SIGCONT)
                m.proc.terminate()
        # A member whose peers are stopping too can spend its whole graceful stop trying to
        # hand over leadership; the data is throw-away, so 2 s (shared by all) is enough.
        deadline = time.monotonic() + 2
        for m in running:
            assert m.proc is not None
            try:
                m.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(m.proc.pid, signal.SIGKILL)
                m.proc.wait()
            m.proc = None


class ReplyDroppingProxy:
    """A loopback TCP proxy that forwards each request to ``upstream`` and drops the reply.

    It waits for the first bytes of etcd's answer (so the request was received and acted
    on), then closes the client's connection without passing them on: a reply lost after
    the write was applied.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.requests_forwarded = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The proxy's URL, to use as an etcd endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
            deadline = time.monotonic() + 5
            forwarded = False
            with contextlib.suppress(OSError):
                while time.monotonic() < deadline:
                    ready, _, _ = select.select([client, up], [], [], 0.5)
                    if up in ready:
                        break  # etcd has answered: the request was received and acted on
                    if client in ready:
                        data = client.recv(65536)
                        if not data:
                            return
                        up.sendall(data)
                        if not forwarded:
                            forwarded = True
                            self.requests_forwarded += 1
            # SO_LINGER 0: a reset, as a middlebox or a dying member would leave it
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        """Stop accepting."""
        self.listener.close()
