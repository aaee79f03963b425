"""TLS and mutual TLS, with a throwaway certificate authority made by `cryptography`."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from opspawn.opscore.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from security_support import Keys, bearer

from opscore.domain.access import Role
from opscore.domain.clock import FakeClock
from opscore.protocol.errors import ConfigurationError
from opscore.server.app import OpsCoreServer
from opscore.server.config import Settings

TIMEOUT = 5.0


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Issued:
    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path


class Authority:
    """A CA that issues server and client certificates into a directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} CA"))
            .issuer_name(_name(f"{name} CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.path = directory / f"{name}-ca.pem"
        self.path.write_bytes(self.pem)

    def issue(self, cn: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
        cert = builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        issued = Issued(cert, _pem_key(key), self.dir / f"{cn}.pem", self.dir / f"{cn}.key")
        issued.cert_path.write_bytes(cert)
        issued.key_path.write_bytes(issued.key)
        return issued


@dataclass
class Pki:
    ca: Authority
    server: Issued
    client: Issued
    rogue: Authority  # an unrelated CA
    rogue_client: Issued  # a client certificate the server must not accept
    rogue_server: Issued  # a server certificate clients must not accept


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(directory, "trusted"), Authority(directory, "rogue")
    return Pki(
        ca=ca,
        server=ca.issue("server", server=True),
        client=ca.issue("client", server=False),
        rogue=rogue,
        rogue_client=rogue.issue("rogue-client", server=False),
        rogue_server=rogue.issue("rogue-server", server=True),
    )


def tls_settings(settings: Settings, pki: Pki, *, mutual: bool = False, **more: Any) -> Settings:
    update: dict[str, Any] = {"tls_cert": pki.server.cert_path, "tls_key": pki.server.key_path}
    if mutual:
        update["tls_client_ca"] = pki.ca.path
    return settings.model_copy(update={**update, **more})


@pytest.fixture
async def channels() -> AsyncIterator[list[grpc.aio.Channel]]:
    opened: list[grpc.aio.Channel] = []
    yield opened
    for channel in opened:
        await channel.close()


async def list_agents(
    channels: list[grpc.aio.Channel],
    address: str,
    credentials: grpc.ChannelCredentials | None,
    metadata: Any = None,
    options: Any = None,
) -> grpc.StatusCode:
    """ListAgents over a new channel; returns OK or the failure's code."""
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials, options=options)
    )
    channels.append(channel)
    stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    try:
        await stub.ListAgents(lifecycle_pb2.ListAgentsRequest(), metadata=metadata, timeout=TIMEOUT)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def trust(pki: Pki, client: Issued | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.pem)
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.pem, private_key=client.key, certificate_chain=client.cert
    )


OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


async def test_tls_with_trusted_root_works(
    start_server: Any, settings: Settings, clock: FakeClock, pki: Pki, channels: Any
) -> None:
    """A TLS client trusting the CA talks to a TLS server (by IP and by name)."""
    server = await start_server(tls_settings(settings, pki), clock)
    assert await list_agents(channels, server.address, trust(pki)) == OK
    assert await list_agents(channels, f"localhost:{server.port}", trust(pki)) == OK


async def test_plaintext_client_is_refused_by_tls_server(
    start_server: Any, settings: Settings, clock: FakeClock, pki: Pki, channels: Any
) -> None:
    """A plaintext channel to a TLS server fails with UNAVAILABLE."""
    server = await start_server(tls_settings(settings, pki), clock)
    assert await list_agents(channels, server.address, None) == UNAVAILABLE


async def test_untrusted_or_misnamed_server_is_refused(
    start_server: Any,
    settings: Settings,
    store_url: Any,
    clock: FakeClock,
    pki: Pki,
    channels: Any,
) -> None:
    """A client refuses a server certificate from another CA or for another name."""
    server = await start_server(tls_settings(settings, pki), clock)
    rogue_root = grpc.ssl_channel_credentials(root_certificates=pki.rogue.pem)
    assert await list_agents(channels, server.address, rogue_root) == UNAVAILABLE
    wrong_name = [("grpc.ssl_target_name_override", "ops.example.com")]
    assert await list_agents(channels, server.address, trust(pki), options=wrong_name) == (
        UNAVAILABLE
    )
    impostor = tls_settings(
        settings,
        pki,
        tls_cert=pki.rogue_server.cert_path,
        tls_key=pki.rogue_server.key_path,
        db=store_url("impostor"),
    )
    other = await start_server(impostor, clock)
    assert await list_agents(channels, other.address, trust(pki)) == UNAVAILABLE


async def test_mtls_requires_a_client_certificate_from_the_ca(
    start_server: Any, settings: Settings, clock: FakeClock, pki: Pki, channels: Any
) -> None:
    """With tls_client_ca: no client cert or a foreign one fails; the CA's one works."""
    server = await start_server(tls_settings(settings, pki, mutual=True), clock)
    assert await list_agents(channels, server.address, trust(pki)) == UNAVAILABLE
    assert await list_agents(channels, server.address, trust(pki, pki.rogue_client)) == (
        UNAVAILABLE
    )
    assert await list_agents(channels, server.address, None) == UNAVAILABLE
    assert await list_agents(channels, server.address, trust(pki, pki.client)) == OK


async def test_tls_and_operator_keys_together(
    start_server: Any, settings: Settings, clock: FakeClock, pki: Pki, channels: Any
) -> None:
    """Over mTLS a token is still required: a client certificate is not a credential."""
    keys = Keys.fresh()
    cfg = tls_settings(settings, pki, mutual=True, api_keys=keys.api_keys)
    server = await start_server(cfg, clock)
    creds = trust(pki, pki.client)
    assert await list_agents(channels, server.address, creds) == grpc.StatusCode.UNAUTHENTICATED
    assert await list_agents(channels, server.address, creds, bearer(keys[Role.VIEWER])) == OK
    assert await list_agents(channels, server.address, trust(pki), bearer(keys[Role.VIEWER])) == (
        UNAVAILABLE
    )


@pytest.mark.parametrize(
    "files",
    [
        {"tls_cert": "server"},
        {"tls_key": "server"},
        {"tls_client_ca": "ca"},
        {"tls_cert": "missing", "tls_key": "missing"},
    ],
    ids=["cert-only", "key-only", "client-ca-only", "unreadable"],
)
def test_incomplete_tls_settings_refuse_to_start(
    settings: Settings, pki: Pki, tmp_path: Path, files: dict[str, str]
) -> None:
    """Half-configured or unreadable TLS files are a ConfigurationError, not plaintext."""
    paths = {
        "server": pki.server.cert_path,
        "ca": pki.ca.path,
        "missing": tmp_path / "nope.pem",
    }
    update: dict[str, Any] = {}
    for field, which in files.items():
        update[field] = pki.server.key_path if field == "tls_key" else paths[which]
    with pytest.raises(ConfigurationError):
        OpsCoreServer(settings.model_copy(update=update), FakeClock())


async def test_cli_talks_mutual_tls_from_environment(
    start_server: Any, settings: Settings, clock: FakeClock, pki: Pki
) -> None:
    """The `opscore` client commands use TLS (and a client certificate) from
    OPSCORE_CLIENT_TLS_*; without them the same command fails with exit code 1."""
    server = await start_server(tls_settings(settings, pki, mutual=True), clock)
    base = {**os.environ, "OPSCORE_ADDRESS": f"localhost:{server.port}"}
    tls = {
        "OPSCORE_CLIENT_TLS_CA": str(pki.ca.path),
        "OPSCORE_CLIENT_TLS_CERT": str(pki.client.cert_path),
        "OPSCORE_CLIENT_TLS_KEY": str(pki.client.key_path),
    }

    async def cli(env: dict[str, str]) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "opscore", "agent", "list", "--json",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, (out or err).decode()

    code, out = await cli({**base, **tls})
    assert code == 0, out
    assert json.loads(out) == []
    code, out = await cli(base)
    assert code == 1 and out.startswith("opscore:"), out
