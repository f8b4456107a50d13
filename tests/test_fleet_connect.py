"""fleet/connect.py: one way from the [fleet] settings to an etcd client, for all three users.

The password file is read the same way by the daemon, its courier and the commands; the
files [fleet] names are checked when config.toml loads; a client certificate is presented
with or without ca_file; TLS failures name the setting to fix. The TLS tests run a real
one-member https etcd with client-certificate auth, and skip where the binary is absent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from aac_tokend.core.config import CONFIG_FILENAME
from aac_tokend.errors import ConfigError, EtcdUnavailableError
from aac_tokend.fleet.connect import (
    MAX_PASSWORD_BYTES,
    check_files,
    connect,
    credentials,
    read_password,
    tls_files,
)
from aac_tokend.fleet.etcd_session import TlsFiles, session_for
from aac_tokend.fleet.settings import FleetSettings
from aac_tokend.host.configfile import load_config

from .etcd_cluster import ETCD, SKIP_REASON, EtcdCluster
from .etcd_cluster import TlsFiles as Pki

#: A loadable config.toml whose [fleet] names files: ``{files}`` is replaced by those lines.
CONFIG = """\
min_margin_seconds = 200
[fleet]
endpoints = ["https://127.0.0.1:23790"]
name = "t"
{files}
"""


def settings(**files: str | None) -> FleetSettings:
    return FleetSettings(endpoints=("https://127.0.0.1:1",), name="t", **files)  # type: ignore[arg-type]


class TestReadPassword:
    """One trailing newline comes off the password, and nothing else; bad files are one line."""

    @pytest.mark.parametrize(
        ("raw", "password"),
        [
            (b"s3cret\n", "s3cret"),
            (b"s3cret\r\n", "s3cret"),
            (b"s3cret", "s3cret"),
            (b"s3cret pass \n", "s3cret pass "),
            (b" \ts3cret\n", " \ts3cret"),
            (b"s3cret\n\n", "s3cret\n"),
            (b"s3cret\r", "s3cret\r"),
        ],
    )
    def test_only_one_trailing_newline_is_removed(
        self, tmp_path: Path, raw: bytes, password: str
    ) -> None:
        """Spaces, tabs and a second newline are part of the password, as etcd allows."""
        path = tmp_path / "pw"
        path.write_bytes(raw)
        assert read_password(str(path)) == password
        found = credentials(settings(user="u", password_file=str(path)))
        assert found is not None and found.password == password

    @pytest.mark.parametrize(
        ("make", "says"),
        [
            (lambda p: None, "No such file"),
            (lambda p: p.mkdir(), "not a regular file"),
            (lambda p: os.mkfifo(p), "not a regular file"),
            (lambda p: p.write_bytes(b"p\xff\xfess\n"), "not UTF-8"),
            (lambda p: p.write_bytes(b"x" * (MAX_PASSWORD_BYTES + 1)), "over 4096 bytes"),
        ],
    )
    def test_an_unusable_file_is_a_one_line_config_error(
        self, tmp_path: Path, make: object, says: str
    ) -> None:
        """Missing, a directory, a FIFO (no hang), not UTF-8 or too large: ConfigError."""
        path = tmp_path / "pw"
        make(path)  # type: ignore[operator]
        with pytest.raises(ConfigError) as caught:
            read_password(str(path))
        message = str(caught.value)
        assert "fleet.password_file" in message and says in message and "\n" not in message


class TestCheckFiles:
    """Loading config.toml checks that each file [fleet] names is a readable regular file."""

    @pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file", "password_file"])
    @pytest.mark.parametrize("what", ["missing", "a directory"])
    def test_an_unusable_file_is_named_at_load(self, tmp_path: Path, key: str, what: str) -> None:
        """The one bad file is named with its dotted key, in one line, at load_config."""
        files = {k: tmp_path / k for k in ("ca_file", "cert_file", "key_file", "password_file")}
        for path in files.values():
            path.write_text("x\n")
        files[key].unlink()
        if what == "a directory":
            files[key].mkdir()
        lines = "\n".join(f'{k} = "{p}"' for k, p in files.items())
        (tmp_path / CONFIG_FILENAME).write_text(CONFIG.format(files=f'user = "u"\n{lines}'))
        with pytest.raises(ConfigError) as caught:
            load_config(tmp_path)
        message = str(caught.value)
        assert f"'fleet.{key}'" in message and str(files[key]) in message
        assert "\n" not in message and str(tmp_path / CONFIG_FILENAME) in message

    def test_readable_files_load(self, tmp_path: Path) -> None:
        """All four readable: the config loads (nothing of the files is kept)."""
        (tmp_path / "pw").write_text("pw\n")
        (tmp_path / CONFIG_FILENAME).write_text(
            CONFIG.format(files=f'user = "u"\npassword_file = "{tmp_path / "pw"}"')
        )
        loaded = load_config(tmp_path).fleet
        assert loaded is not None
        check_files(loaded, "config.toml")


class TestClientCertificate:
    """A client certificate is presented whether or not ca_file is set."""

    def test_cert_without_ca_file_is_presented_with_the_default_trust(self) -> None:
        """cert_file + key_file alone: the session presents them and verifies as requests does."""
        files = tls_files(settings(cert_file="/c.pem", key_file="/c.key"))
        assert files == TlsFiles(None, "/c.pem", "/c.key")
        session = session_for(files)
        assert session.cert == ("/c.pem", "/c.key") and session.verify is True

    def test_no_tls_settings_mean_no_tls_files(self) -> None:
        """Without ca_file or cert_file the session is requests' own (https still verified)."""
        assert tls_files(settings()) is None

    def test_connect_uses_the_password_given_and_reads_no_file(self, tmp_path: Path) -> None:
        """A password handed in (the courier's, from stdin) is used: the file may be gone."""
        gone = settings(user="u", password_file=str(tmp_path / "gone"))
        connect(gone, password="pw")  # no ConfigError: the file is not read
        with pytest.raises(ConfigError, match=r"fleet\.password_file"):
            connect(gone)


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One https member with --client-cert-auth."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    base = tmp_path_factory.mktemp("etcd-tls")
    with EtcdCluster(base, size=1, tls=Pki.make(base / "pki")).running() as c:
        yield c


class TestTlsFailuresNamed:
    """TLS failures say which file and what OpenSSL said, not only "no member answered"."""

    def _settings(self, cluster: EtcdCluster, ca: str) -> FleetSettings:
        pki = cluster.tls
        assert pki is not None
        return FleetSettings(
            endpoints=tuple(cluster.endpoints),
            name="t",
            ca_file=ca,
            cert_file=str(pki.client_cert),
            key_file=str(pki.client_key),
        )

    def test_the_right_files_work(self, tls_etcd: EtcdCluster) -> None:
        """The CA and client certificate of the cluster: a write and a read go through."""
        assert tls_etcd.tls is not None
        client = connect(self._settings(tls_etcd, str(tls_etcd.tls.ca)), timeout=3)
        client.put(b"/aac-tokend/t/k", b"v")
        found = client.get(b"/aac-tokend/t/k")
        assert found is not None and found.value == b"v"

    def test_a_wrong_ca_is_named_as_a_verification_failure(
        self, tls_etcd: EtcdCluster, tmp_path: Path
    ) -> None:
        """Another CA in ca_file: the error names fleet.ca_file and the verification failure."""
        other = Pki.make(tmp_path / "other")
        client = connect(self._settings(tls_etcd, str(other.ca)), timeout=3)
        with pytest.raises(EtcdUnavailableError) as caught:
            client.get(b"/aac-tokend/t/k")
        message = str(caught.value)
        assert f"fleet.ca_file {str(other.ca)!r}" in message and "failed verification" in message
        assert "TLS refused every member" in message and "no member answered" not in message

    def test_a_ca_file_gone_is_named_as_unreadable(
        self, tls_etcd: EtcdCluster, tmp_path: Path
    ) -> None:
        """ca_file removed after start: the error names fleet.ca_file and why it is unusable."""
        client = connect(self._settings(tls_etcd, str(tmp_path / "gone.pem")), timeout=3)
        with pytest.raises(EtcdUnavailableError) as caught:
            client.get(b"/aac-tokend/t/k")
        message = str(caught.value)
        assert "fleet.ca_file" in message and "cannot be read (No such file" in message

    def test_no_client_certificate_is_a_handshake_failure(self, tls_etcd: EtcdCluster) -> None:
        """Without a client certificate the member refuses the handshake: said as TLS."""
        assert tls_etcd.tls is not None
        plain = FleetSettings(
            endpoints=tuple(tls_etcd.endpoints), name="t", ca_file=str(tls_etcd.tls.ca)
        )
        with pytest.raises(EtcdUnavailableError, match="TLS: the handshake failed"):
            connect(plain, timeout=3).get(b"/aac-tokend/t/k")
