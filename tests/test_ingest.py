"""Ingest by URI against real sources on loopback: an HTTPS server with a CA made by the test, a
plain HTTP one, and a bucket on the S3 server; the address and scheme rules, redirects, error
answers, stalls, caps and sniffing; nothing staged is left behind by a failure."""

from __future__ import annotations

import hashlib
import shutil
import socket

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from moments.app.client import MomentsClient
from moments.core import errors, keys
from moments.core.config import Settings
from moments.service.ingest import open_source
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb
from moments.v1 import moments_pb2_grpc as pb_grpc
from tests.http_source import MediaServer
from tests.media import make_noise_bytes
from tests.pki import make_pki
from tests.stack import staged_uploads, stored_blob_ids

pytestmark = [pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
              pytest.mark.timeout(120)]
LOOPBACK = "127.0.0.0/8,::1"
INBOX = "moments-inbox"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("ingest-pki"), leaves=("server",))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("ingest-videos")
    return {name: write_event_video(root / f"{name}.mp4", [Event(colour, "circle", 1.0, 2.0)], seconds=4, fps=6)
            .read_bytes() for name, colour in (("a", "red"), ("b", "green"), ("c", "blue"), ("d", "yellow"))}


@pytest.fixture(scope="module")
def https(pki, videos):
    with MediaServer(cert=pki / "server.pem", key=pki / "server.key") as server:
        server.files.update({f"{k}.mp4": v for k, v in videos.items()})
        server.files["noise.mp4"] = make_noise_bytes(pki / "noise", 50_000, prefix=b"\0\0\0\x18ftypisom").read_bytes()
        yield server


@pytest.fixture(scope="module")
def inbox(s3_server, videos):
    client = s3_server.client()
    if INBOX not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=INBOX)
    client.put_object(Bucket=INBOX, Key="incoming/match b.mp4", Body=videos["b"])
    client.put_object(Bucket=INBOX, Key="private/secret.mp4", Body=videos["c"])
    return INBOX


def ingest_settings(pki, s3_server, **overrides) -> dict:
    """Front-end settings for ingest: loopback allow-listed, the test CA, the inbox bucket readable."""
    base = dict(allow_networks=LOOPBACK, ingest_ca_bundle=str(pki / "ca.pem"), ingest_s3_buckets=f"{INBOX}/incoming/",
                s3_endpoint_url=s3_server.url, s3_region=s3_server.REGION,
                s3_access_key_id=s3_server.ACCESS_KEY_ID, s3_secret_access_key=s3_server.SECRET_ACCESS_KEY)
    return {**base, **overrides}


@pytest.fixture(scope="module", params=["local", "s3"])
def front(request, redis_server, stack_factory, s3_server, pki, inbox):
    redis_server.client().flushall()
    with stack_factory(workers=0, blob_backend=request.param, **ingest_settings(pki, s3_server)) as s, \
            grpc.insecure_channel(s.target) as channel:
        yield s, pb_grpc.MomentsStub(channel)


def ingest(stub, uri: str, **fields) -> pb.UploadVideoResponse:
    return stub.IngestVideo(pb.IngestVideoRequest(source_uri=uri, **fields), timeout=60)


def refused(stub, uri: str, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        ingest(stub, uri, **fields)
    return err.value


def field_of(exc: grpc.RpcError) -> str:
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
    for d in rpc_status.from_call(exc).details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            return br.field_violations[0].field
    raise AssertionError("no BadRequest")


def unavailable_reason(exc: grpc.RpcError) -> str:
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
    for d in rpc_status.from_call(exc).details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo")


def nothing_staged(s) -> bool:
    pending = redis.Redis.from_url(s.settings.redis_url).zrange(keys.UPLOADS_BY_EXPIRY, 0, -1)
    return staged_uploads(s) == {} and pending == []


# --------------------------------------------------------------------------- what works


def test_https_ingest_stores_the_video_and_dedupes(front, https, videos):
    s, stub = front
    sha = hashlib.sha256(videos["a"]).hexdigest()
    done = ingest(stub, https.url("/files/a.mp4"))
    assert done.video.video_id == sha and not done.deduplicated
    assert done.video.filename == "a.mp4" and done.video.codec == "h264"
    assert abs(done.video.duration.ToNanoseconds() / 1e9 - 4.0) < 0.2
    assert sha in stored_blob_ids(s) and nothing_staged(s)
    assert https.hosts[-1] == f"localhost:{https.port}", "the Host header is not the URL's"
    again = ingest(stub, https.url("/files/a.mp4"))  # fetched again, then found already stored
    assert again.video.video_id == sha and again.deduplicated
    asked = https.requests
    with MomentsClient(s.target) as client:  # the caller says which bytes: no fetch
        known = client.ingest(https.url("/files/a.mp4"), sha256=sha, timeout_s=60)
    assert known.deduplicated and https.requests == asked
    with s.stack.front.uploads.blobs.reader(sha) as path:
        assert path.read_bytes() == videos["a"]


def test_s3_ingest_reads_allowed_buckets_with_the_servers_credentials(front, inbox, videos):
    s, stub = front
    done = ingest(stub, f"s3://{inbox}/incoming/match b.mp4", size_bytes=len(videos["b"]))
    assert done.video.video_id == hashlib.sha256(videos["b"]).hexdigest()
    assert done.video.filename == "match b.mp4"
    assert field_of(refused(stub, f"s3://{inbox}/private/secret.mp4")) == "source_uri"
    assert field_of(refused(stub, "s3://another-bucket/incoming/x.mp4")) == "source_uri"
    err = refused(stub, f"s3://{inbox}/incoming/missing.mp4")
    assert unavailable_reason(err) == "SOURCE_UNAVAILABLE" and "NoSuchKey" in err.details()
    if s.settings.blob_backend == "s3":  # the store itself is never a source
        sha = done.video.video_id
        err = refused(stub, f"s3://{s.settings.s3_bucket}/{s.settings.s3_prefix}blobs/sha256/{sha[:2]}/{sha}")
        assert field_of(err) == "source_uri" and "own blob store" in err.details()
    assert nothing_staged(s)


def test_redirects_are_followed_each_hop_checked_and_bounded(front, https, videos):
    s, stub = front
    assert ingest(stub, https.url("/redirect/3/c.mp4")).video.video_id == hashlib.sha256(videos["c"]).hexdigest()
    err = refused(stub, https.url("/redirect/7/c.mp4"))
    assert unavailable_reason(err) == "SOURCE_UNAVAILABLE" and "more than 5 redirects" in err.details()
    for hop, why in (("file:///etc/passwd", "scheme"), ("http://169.254.169.254/latest/meta-data/", "link-local"),
                     ("ftp://localhost/x.mp4", "scheme")):
        err = refused(stub, https.url(f"/to?url={hop}"))
        assert field_of(err) == "source_uri" and why in err.details(), hop
    assert nothing_staged(s)


# ----------------------------------------------------------------- refused and unreachable


@pytest.mark.parametrize("uri, why", [
    ("file:///etc/passwd", "scheme"),
    ("ftp://localhost/v.mp4", "scheme"),
    ("data:video/mp4;base64,AAAA", "scheme"),
    ("https://user:secret@localhost/v.mp4", "credentials"),
    ("https://10.1.2.3/v.mp4", "private"),
    ("s3://", "s3://BUCKET/KEY"),
])
def test_refused_uris_are_invalid_argument(front, uri, why):
    _, stub = front
    err = refused(stub, uri)
    assert field_of(err) == "source_uri" and why in err.details()


def test_unreachable_sources_and_error_answers_are_failed_precondition(front, https):
    s, stub = front
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    for uri, why in ((f"https://localhost:{dead}/v.mp4", "cannot fetch"), (https.url("/status/404"), "HTTP 404"),
                     (https.url("/status/503"), "HTTP 503")):
        err = refused(stub, uri)
        assert unavailable_reason(err) == "SOURCE_UNAVAILABLE" and why in err.details(), uri
    assert nothing_staged(s)


def test_content_is_capped_sniffed_and_probed_like_an_upload(front, https, videos):
    s, stub = front
    before = stored_blob_ids(s)
    err = refused(stub, https.url("/page"))
    assert field_of(err) == "data" and "text" in err.details()
    err = refused(stub, https.url("/files/noise.mp4"))
    assert field_of(err) == "data"
    err = refused(stub, https.url("/huge"))
    assert field_of(err) == "source_uri" and "over the limit" in err.details()
    err = refused(stub, https.url("/files/d.mp4"), sha256="0" * 64)
    assert field_of(err) == "sha256"
    err = refused(stub, https.url("/files/d.mp4"), size_bytes=len(videos["d"]) + 1)
    assert unavailable_reason(err) == "SOURCE_UNAVAILABLE" and "expected" in err.details()
    assert stored_blob_ids(s) == before and nothing_staged(s)


# --------------------------------------------------------------- rules, without a front end


def rules(pki, s3_server, **overrides) -> Settings:
    return Settings.from_env(environ={}, **ingest_settings(pki, s3_server, **overrides))


def test_connects_to_the_checked_address_with_the_names_tls_identity(pki, s3_server, https, videos):
    """``media.test`` resolves only through the checked lookup: the connection cannot look it up again."""
    seen = []

    def resolve(host, port, type=0):
        seen.append(host)
        return [(socket.AF_INET, type, 0, "", ("127.0.0.1", port))] if host == "media.test" else []

    source = open_source(https.url("/files/a.mp4", host="media.test"), rules(pki, s3_server), resolve=resolve)
    try:
        assert b"".join(source.chunks) == videos["a"]
    finally:
        source.close()
    assert seen == ["media.test"] and https.hosts[-1] == f"media.test:{https.port}"


def test_loopback_needs_the_allow_list_and_http_needs_an_allow_listed_network(pki, s3_server, https, videos):
    with pytest.raises(errors.InvalidArgument, match="loopback"):
        open_source(https.url("/files/a.mp4"), rules(pki, s3_server, allow_networks=""))

    def public(host, port, type=0):
        return [(socket.AF_INET, type, 0, "", ("93.184.216.34", port))]

    with pytest.raises(errors.InvalidArgument, match="http:// is accepted only"):
        open_source("http://media.example/v.mp4", rules(pki, s3_server), resolve=public)
    with MediaServer() as plain:
        plain.files["a.mp4"] = videos["a"]
        source = open_source(plain.url("/files/a.mp4"), rules(pki, s3_server))
        try:
            assert b"".join(source.chunks) == videos["a"]
        finally:
            source.close()


def test_an_untrusted_certificate_is_failed_precondition(pki, s3_server, https):
    with pytest.raises(errors.FailedPrecondition, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        open_source(https.url("/files/a.mp4"), rules(pki, s3_server, ingest_ca_bundle=""))


def test_a_stalled_source_times_out(pki, s3_server, https):
    source = open_source(https.url("/stall/a.mp4"), rules(pki, s3_server, ingest_timeout_s=1.0))
    try:
        with pytest.raises(errors.FailedPrecondition, match="stalled"):
            b"".join(source.chunks)
    finally:
        source.close()


def test_s3_ingest_is_off_without_allowed_buckets(pki, s3_server):
    with pytest.raises(errors.InvalidArgument, match="off"):
        open_source(f"s3://{INBOX}/incoming/x.mp4", rules(pki, s3_server, ingest_s3_buckets=""))

