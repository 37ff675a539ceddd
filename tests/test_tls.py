"""TLS and mutual TLS on the gRPC port, with real certificates made here by ``openssl``: a CA,
a server certificate for 127.0.0.1 and a client certificate, both signed by the CA."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.valuerank.v1 import recommender_pb2 as pb
from protos.valuerank.v1 import recommender_pb2_grpc as pb_grpc
from serving.config import ServeConfig

pytestmark = pytest.mark.integration


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificates to test TLS with")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=valuerank test CA",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN=valuerank test {name}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        (d / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(d / f"{name}.ext"),
            "-out",
            str(d / f"{name}.pem"),
        )
    return {p.stem + p.suffix: p for p in d.iterdir()}


def _channel(target: str, pki: dict[str, Path], client_cert: bool) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca.pem"].read_bytes(),
        private_key=pki["client.key"].read_bytes() if client_cert else None,
        certificate_chain=pki["client.pem"].read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(target, credentials)


def _serving(channel: grpc.Channel) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), timeout=120, wait_for_ready=True
    )
    for response in watch:
        if response.status == health_pb2.HealthCheckResponse.SERVING:
            watch.cancel()
            return


def _recommend(channel: grpc.Channel) -> pb.RecommendResponse:
    request = pb.RecommendRequest(user_id=3, surface="ecommerce_recommendation", k=3)
    return pb_grpc.RecommenderStub(channel).Recommend(request, timeout=10)


def test_tls_serves_a_client_that_trusts_the_ca_and_no_plaintext_one(
    serving_assets: Any, start_grpc_server: Any, pki: dict[str, Path]
) -> None:
    config = ServeConfig(port=0, grace_s=1.0, tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]))
    server = start_grpc_server(serving_assets.load(), config)
    channel = _channel(server.target, pki, client_cert=False)
    _serving(channel)
    assert len(_recommend(channel).items) == 3
    with pytest.raises(grpc.RpcError) as plaintext:
        _recommend(grpc.insecure_channel(server.target))
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate(
    serving_assets: Any, start_grpc_server: Any, pki: dict[str, Path]
) -> None:
    config = ServeConfig(
        port=0,
        grace_s=1.0,
        tls_cert=str(pki["server.pem"]),
        tls_key=str(pki["server.key"]),
        tls_client_ca=str(pki["ca.pem"]),
    )
    server = start_grpc_server(serving_assets.load(), config)
    with_cert = _channel(server.target, pki, client_cert=True)
    _serving(with_cert)
    assert len(_recommend(with_cert).items) == 3
    with pytest.raises(grpc.RpcError) as anonymous:
        _recommend(_channel(server.target, pki, client_cert=False))
    assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_go_together() -> None:
    with pytest.raises(ValueError, match="go together"):
        ServeConfig(tls_cert="server.pem")
    with pytest.raises(ValueError, match="mutual TLS"):
        ServeConfig(tls_client_ca="ca.pem")
