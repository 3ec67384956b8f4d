"""TLS and mTLS on a real front end, with certificates made by openssl for the test."""

from __future__ import annotations

import shutil

import grpc
import pytest

from moments.app.client import MomentsClient
from tests.pki import make_pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


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
