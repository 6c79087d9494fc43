"""TLS for the REST API (issue 15 item 3): a real server with a self-signed pair made at test
time (no key is ever committed), spoken to over HTTPS; and the start-time checks of the files."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from server_harness import Server, run_cli

from appliance.cli import TlsFileError, tls_context
from appliance.config import ServerConfig

# A fast start: the numpy engine, no log replay, no ZeroMQ (nothing here is about ingest).
QUICK = {
    "APP_ENGINE__BACKEND": "numpy",
    "APP_DURABILITY__ENABLED": "false",
    "APP_TRANSPORT__ZMQ__ENABLED": "false",
}


def make_pair(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1 / localhost and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hft-appliance test {name}")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def tls_connect(port: int, cert: Path) -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:port that trusts exactly `cert`."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return trusting(cert).wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def trusting(cert: Path) -> ssl.SSLContext:
    """A client context that trusts exactly `cert` (and checks the host name against it)."""
    return ssl.create_default_context(cafile=str(cert))


def tls_env(cert: Path, key: Path, **more: str) -> dict[str, str]:
    return {
        **QUICK,
        "APP_SERVER__TLS_CERT_FILE": str(cert),
        "APP_SERVER__TLS_KEY_FILE": str(key),
        **more,
    }


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    work = tmp_path_factory.mktemp("tls")
    cert, key = make_pair(work / "pki")
    server = Server(work / "run", tls_env(cert, key), ssl_context=trusting(cert))
    try:
        server.wait_ready()
        yield server, cert
    finally:
        server.stop()


def test_https_with_a_self_signed_certificate(tls_server: tuple[Server, Path]) -> None:
    server, _ = tls_server
    assert server.request("GET", "/health").json == {"status": "ok"}
    assert server.post_batch("TLS", [1.0, 2.0, 3.0]).status == 200
    stats = server.stats("TLS", 1)
    assert stats.status == 200 and stats.json["last"] == 3.0
    starting = [json.loads(line) for line in server.stdout().splitlines() if "starting" in line]
    assert starting[0]["tls"] is True and starting[0]["client_certificates"] is False


def test_the_python_query_client_speaks_https(tls_server: tuple[Server, Path]) -> None:
    from transport.query_client import QueryClient

    server, cert = tls_server
    url = f"https://127.0.0.1:{server.port}"
    with QueryClient(url, timeout_s=10.0, ssl_context=trusting(cert)) as client:
        client.wait_ready(timeout_s=10)
        assert client.add_batch("TLS-CLIENT", [4.0, 6.0]) == 2
        assert client.stats("TLS-CLIENT", 1).avg == 5.0


def test_the_negotiated_protocol_is_tls_1_2_or_later(tls_server: tuple[Server, Path]) -> None:
    server, cert = tls_server
    with tls_connect(server.port, cert) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
    # TLS 1.1 and older: this client's OpenSSL no longer offers them, so the server's refusal is
    # checked on its context (test_tls_context_is_server_side_tls_1_2_or_later).


def test_plain_http_to_the_tls_port_gets_no_answer(tls_server: tuple[Server, Path]) -> None:
    server, _ = tls_server
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/health")
        conn.getresponse().read()
    conn.close()
    assert server.request("GET", "/health").status == 200  # the server is unharmed
    assert "Traceback" not in server.stdout()  # a failed handshake is not an error to log


def test_a_client_that_does_not_trust_the_certificate_fails_verification(
    tls_server: tuple[Server, Path],
) -> None:
    server, _ = tls_server
    conn = http.client.HTTPSConnection(
        "127.0.0.1", server.port, timeout=10, context=ssl.create_default_context()
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/health")
    conn.close()


def test_a_malformed_request_line_over_tls_gets_the_json_400(
    tls_server: tuple[Server, Path],
) -> None:
    server, cert = tls_server
    with tls_connect(server.port, cert) as tls:
        tls.sendall(b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["code"] == "bad_request"


def test_client_certificates_are_required_with_a_client_ca(tmp_path: Path) -> None:
    cert, key = make_pair(tmp_path / "pki")
    client_cert, client_key = make_pair(tmp_path / "pki", "client")
    env = tls_env(cert, key, APP_SERVER__TLS_CLIENT_CA_FILE=str(client_cert))
    with_client_cert = trusting(cert)
    with_client_cert.load_cert_chain(client_cert, client_key)
    server = Server(tmp_path / "run", env, ssl_context=with_client_cert)
    try:
        server.wait_ready()
        assert server.request("GET", "/health").status == 200
        anonymous = http.client.HTTPSConnection(
            "127.0.0.1", server.port, timeout=10, context=trusting(cert)
        )
        # TLS 1.3: the client's handshake ends before the server's refusal, which arrives as
        # an alert at the first read.
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            anonymous.request("GET", "/health")
            anonymous.getresponse().read()
        anonymous.close()
    finally:
        server.stop()


# ----------------------------------------------------------------- start-time checks


def _config(**tls: str) -> ServerConfig:
    return ServerConfig(**tls)


def test_no_tls_files_means_plain_http() -> None:
    assert tls_context(ServerConfig()) is None


def test_tls_context_is_server_side_tls_1_2_or_later(tmp_path: Path) -> None:
    cert, key = make_pair(tmp_path)
    context = tls_context(_config(tls_cert_file=str(cert), tls_key_file=str(key)))
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("missing_cert", "server.tls_cert_file: cannot read"),
        ("missing_key", "server.tls_key_file: cannot read"),
        ("garbage_cert", "server.tls_cert_file:"),
        ("garbage_key", "server.tls_key_file:"),
        ("key_as_cert", "server.tls_cert_file:"),
        ("mismatch", "server.tls_key_file:"),
        ("encrypted_key", "server.tls_key_file:"),
        ("missing_ca", "server.tls_client_ca_file: cannot read"),
    ],
)
def test_unusable_tls_files_are_one_line_naming_the_file(
    tmp_path: Path, broken: str, expected: str
) -> None:
    cert, key = make_pair(tmp_path)
    other_cert, other_key = make_pair(tmp_path, "other")
    files = {"tls_cert_file": str(cert), "tls_key_file": str(key)}
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted.key"
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    files |= {
        "missing_cert": {"tls_cert_file": str(tmp_path / "nope.crt")},
        "missing_key": {"tls_key_file": str(tmp_path / "nope.key")},
        "garbage_cert": {"tls_cert_file": str(garbage)},
        "garbage_key": {"tls_key_file": str(garbage)},
        "key_as_cert": {"tls_cert_file": str(other_key)},
        "mismatch": {"tls_key_file": str(other_key)},
        "encrypted_key": {"tls_key_file": str(encrypted)},
        "missing_ca": {"tls_client_ca_file": str(tmp_path / "nope-ca.crt")},
    }[broken]
    with pytest.raises(TlsFileError) as info:
        tls_context(_config(**files))
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message
    named = {
        "mismatch": other_key,
        "key_as_cert": other_key,
        "encrypted_key": encrypted,
    }.get(broken)
    if named is not None:
        assert str(named) in message
    del other_cert


def test_serve_exits_2_with_one_line_for_a_mismatched_key(tmp_path: Path) -> None:
    cert, _ = make_pair(tmp_path / "pki")
    _, other_key = make_pair(tmp_path / "pki", "other")
    done = run_cli(tmp_path, "serve", env=tls_env(cert, other_key))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "server.tls_key_file" in done.stderr and str(other_key) in done.stderr


def test_serve_exits_2_when_only_the_certificate_is_set(tmp_path: Path) -> None:
    cert, _ = make_pair(tmp_path / "pki")
    done = run_cli(tmp_path, "serve", env={**QUICK, "APP_SERVER__TLS_CERT_FILE": str(cert)})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "server.tls_key_file: required when server.tls_cert_file is set" in done.stderr
