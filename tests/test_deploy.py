"""deploy/nginx.conf as shipped, in a real nginx on loopback in front of a real gateway.

The file is only changed where it names hosts: the upstreams become the test gateway, the
listen ports free loopback ports, the certificate a self-signed one for 127.0.0.1. So a change
to the file that breaks STT1 behind it (a URI part on proxy_pass re-encodes the target, and
every signature over it breaks) or that this nginx cannot load fails here.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import client as stt1_client
from conftest import FIXTURES, ROOT, free_port, secured_server

SHIPPED = ROOT / "deploy" / "nginx.conf"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        pytest.fail("nginx is not installed: run `bash tests/system-deps.sh` (Debian: apt-get install nginx)")
    return found


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def local_config(shipped: str, folder: Path, gateway_port: int, tls_port: int, plain_port: int) -> str:
    """The shipped server blocks with their hosts, ports and certificate made local, inside the
    main context the file expects its includer to give (events, http, temp paths)."""
    upstreams = re.findall(r"^\s*server \d+\.\d+\.\d+\.\d+:\d+;.*$", shipped, re.M)
    assert upstreams, "deploy/nginx.conf has no upstream servers to point at the gateway"
    conf = shipped.replace(upstreams[0], f"    server 127.0.0.1:{gateway_port};")
    for line in upstreams[1:]:
        conf = conf.replace(line, "")
    changes = [
        (r"listen 443 ssl", f"listen 127.0.0.1:{tls_port} ssl"),
        (r"listen 80;", f"listen 127.0.0.1:{plain_port};"),
        (r"ssl_certificate\s+\S+;", f"ssl_certificate {folder}/cert.pem;"),
        (r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {folder}/key.pem;"),
    ]
    for pattern, local in changes:
        conf, count = re.subn(pattern, local, conf)
        assert count == 1, f"deploy/nginx.conf: expected one `{pattern}`"
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temps = "".join(f"    {kind}_temp_path {folder}/{kind};\n" for kind in kinds)
    return (
        f"daemon off;\nmaster_process off;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log info;\n"
        f"events {{ worker_connections 64; }}\nhttp {{\n    access_log off;\n{temps}{conf}\n}}\n"
    )


@contextlib.contextmanager
def nginx(folder: Path, config: str, tls_port: int) -> Iterator[None]:
    (folder / "nginx.conf").write_text(config)
    command = [nginx_binary(), "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(folder / "nginx.conf")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"this nginx refuses deploy/nginx.conf:\n{checked.stderr}"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", tls_port), 0.2):
                break
            assert process.poll() is None, (folder / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not listen within 10 s"
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def behind_nginx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, int, int, Path]]:
    """A gateway behind deploy/nginx.conf; yields the credential (its url the nginx origin), the
    nginx TLS and plain ports, and the CA file that verifies nginx."""
    cert, _ = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # client.py verifies with the default CA paths
    tls_port, plain_port = free_port(), free_port()
    with secured_server(FIXTURES / "e2e", tmp_path, public_url=f"https://127.0.0.1:{tls_port}") as gateway:
        config = local_config(SHIPPED.read_text(), tmp_path, gateway.settings.port, tls_port, plain_port)
        with nginx(tmp_path, config, tls_port):
            yield gateway.cred, tls_port, plain_port, cert


def test_calls_through_the_shipped_nginx_config_verify_both_ways(  # type: ignore[no-untyped-def]
    behind_nginx: tuple[Path, int, int, Path], caplog
) -> None:
    """Every call is signed over its exact target and verified on its answer: a target that
    nginx normalised or re-encoded on the way would be a 401, an altered answer a forgery."""
    cred, tls_port, plain_port, cert = behind_nginx
    with stt1_client.Client(cred) as api:
        assert api.call("add", a=1, b=2) == 3
        awkward = "a b/é?&%2F#x"  # percent-encoded in the target: %20, %2F, %C3%A9, %3F, %26, %25, %23
        assert api.call("echo", awkward) == awkward
        assert "add" in api.catalog()
    origin = f"https://127.0.0.1:{tls_port}"
    verify = ssl.create_default_context(cafile=cert)
    health = httpx.get(f"{origin}/healthz", verify=verify)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    # nginx's $request_id (32 hex digits) reaches the gateway, which logs and echoes it; a client's
    # own id is kept (it was replaced: the console showed an id the gateway's log did not have).
    assert re.fullmatch(r"[0-9a-f]{32}", health.headers["x-request-id"])
    mine = httpx.get(f"{origin}/healthz", verify=verify, headers={"X-Request-Id": "6fff1ebbdc189835"})
    assert mine.headers["x-request-id"] == "6fff1ebbdc189835"
    with stt1_client.Client(cred) as api, pytest.raises(stt1_client.ServerError) as failed:
        api.call("boom")
    assert failed.value.request_id is not None and f"request {failed.value.request_id}: `boom` raised" in caplog.text
    assert httpx.get(f"{origin}/metrics", verify=verify).status_code == 403  # only for 10.0.0.0/8
    redirect = httpx.get(f"http://127.0.0.1:{plain_port}/rest/add?x=1")
    assert redirect.status_code == 308 and redirect.headers["location"] == "https://127.0.0.1/rest/add?x=1"


def test_a_uri_part_on_proxy_pass_breaks_signatures_as_the_file_warns(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The warning in deploy/nginx.conf, shown: with `proxy_pass http://gateways/;` nginx decodes
    the path and encodes it again its own way, so a signed target it spells differently (a `/`
    or `&` in var1) is not the one that arrives."""
    cert, _ = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    tls_port, plain_port = free_port(), free_port()
    shipped = SHIPPED.read_text()
    with_uri_part, count = re.subn(r"proxy_pass http://gateways;(\s+#)", r"proxy_pass http://gateways/;\1", shipped)
    assert count == 1
    with secured_server(FIXTURES / "e2e", tmp_path, public_url=f"https://127.0.0.1:{tls_port}") as gateway:
        config = local_config(with_uri_part, tmp_path, gateway.settings.port, tls_port, plain_port)
        with nginx(tmp_path, config, tls_port), stt1_client.Client(gateway.cred) as api:
            assert api.call("add", a=1, b=2) == 3  # a plain target survives
            assert api.call("echo", "a%2F") == "a%2F"  # %252F: decoded, then encoded the same again
            with pytest.raises(stt1_client.Unauthorized):
                api.call("echo", "a/b")  # signed as a%2Fb, arrives as a/b
