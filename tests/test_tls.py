"""TLS and mTLS on a real front end, with certificates made by openssl for the test."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from moments.app.client import MomentsClient

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
         "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name in ("server", "client"):
        _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _run("openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1", "-extfile", str(ext),
             "-out", str(d / f"{name}.pem"))
    return d


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mtls(redis_server, stack_factory, pki, mutual):
    redis_server.client().flushall()
    ca = (pki / "ca.pem").read_bytes()
    with stack_factory(workers=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                       tls_client_ca=str(pki / "ca.pem") if mutual else "") as front:
        cert = (pki / "client.pem").read_bytes() if mutual else None
        key = (pki / "client.key").read_bytes() if mutual else None
        with MomentsClient(front.target, tls_root_ca=ca, tls_cert=cert, tls_key=key) as client:
            assert list(client.list_videos()) == []
        with MomentsClient(front.target) as plaintext:
            with pytest.raises(grpc.RpcError) as err:
                list(plaintext.list_videos())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        if mutual:
            with MomentsClient(front.target, tls_root_ca=ca) as no_cert:
                with pytest.raises(grpc.RpcError) as err:
                    list(no_cert.list_videos())
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
