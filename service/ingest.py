"""Sources of URI ingest: where the front end may fetch a video from, and how.

Rules (the proto's ``IngestVideoRequest`` states them for callers):

* ``s3://BUCKET/KEY``: read with the server's S3 settings and credentials, never the caller's;
  only from a bucket (or ``bucket/prefix``) listed in ``Settings.ingest_s3_buckets``, and never
  from the server's own blob store (that would hand out other tenants' videos by id). The key is
  taken literally (no URL decoding).
* ``https://``: the certificate is checked (``Settings.ingest_ca_bundle``, else the system's CAs).
  ``http://`` only when every address of the host is in ``Settings.allow_networks``.
* Address rules from :mod:`moments.core.netrules`: no credentials in the URI, every resolved address
  public unless allow-listed; the connection goes to a checked address (the URL's host becomes the
  Host header and the TLS server name), so a second DNS answer cannot redirect it.
* Redirects: at most ``Settings.ingest_max_redirects``, each hop checked again by the same rules.
* The answer must be 200; a Content-Length over ``max_upload_bytes`` is refused before the body.
* Proxy variables of the environment are ignored (a proxy would bypass the address rules).

A refused URI is :class:`~moments.core.errors.InvalidArgument` (field ``source_uri``); a source
that cannot be reached, times out or answers with an error is
:class:`~moments.core.errors.FailedPrecondition` with reason ``SOURCE_UNAVAILABLE``.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx

from moments.core import errors
from moments.core.config import Settings
from moments.core.netrules import Target, check_url, parse_networks

FIELD = "source_uri"
CHUNK_BYTES = 1024 * 1024
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
"""A source silent for this long (no byte) is given up."""
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
HTTP_SCHEMES = ("https", "http")
UNAVAILABLE = "SOURCE_UNAVAILABLE"


def unavailable(uri: str, why: str) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(f"cannot fetch {_shown(uri)}: {why}", reason=UNAVAILABLE,
                                     metadata={"source_uri": _shown(uri)})


@dataclass
class Source:
    """An opened source: its size if it said so, a name, and its bytes in order (blocking)."""

    uri: str
    size_bytes: int | None
    filename: str
    chunks: Iterator[bytes]
    close: Callable[[], None] = field(default=lambda: None)


def open_source(uri: str, settings: Settings, *, resolve: Callable = socket.getaddrinfo) -> Source:
    """Check ``uri`` against the rules and start reading it (blocking: call from a thread)."""
    scheme = uri.partition(":")[0].lower()
    if scheme == "s3":
        return _open_s3(uri, settings)
    if scheme in HTTP_SCHEMES:
        return _open_http(uri, settings, resolve)
    raise errors.InvalidArgument(
        f"URI scheme {scheme or '(none)'!r} is not accepted; use s3://, https:// (or http:// for an "
        "allow-listed network)", field=FIELD)


# --------------------------------------------------------------------------------- s3://


def parse_s3_sources(spec: str) -> list[tuple[str, str]]:
    """``"media, inbox/incoming/"`` -> [("media", ""), ("inbox", "incoming/")]."""
    out = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        bucket, _, prefix = item.partition("/")
        out.append((bucket, prefix))
    return out


def _open_s3(uri: str, settings: Settings) -> Source:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not uri.lower().startswith("s3://") or not bucket or not key:
        raise errors.InvalidArgument("an s3 URI is s3://BUCKET/KEY", field=FIELD)
    allowed = parse_s3_sources(settings.ingest_s3_buckets)
    if not allowed:
        raise errors.InvalidArgument("s3:// ingest is off on this server (no ingest_s3_buckets)", field=FIELD)
    if settings.s3_bucket and bucket == settings.s3_bucket and key.startswith(settings.s3_prefix):
        raise errors.InvalidArgument("the server's own blob store is not an ingest source", field=FIELD)
    if not any(bucket == b and key.startswith(prefix) for b, prefix in allowed):
        raise errors.InvalidArgument(f"s3://{bucket}/{key} is outside the buckets this server ingests from",
                                     field=FIELD)
    from botocore.exceptions import BotoCoreError, ClientError

    from moments.core.s3_blobs import error_code, shared_client

    try:
        reply = shared_client(settings).get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise unavailable(uri, f"the S3 server answered {error_code(exc) or 'an error'}") from exc
    except BotoCoreError as exc:
        raise unavailable(uri, f"the S3 server is unreachable ({exc})") from exc
    body = reply["Body"]

    def chunks() -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(CHUNK_BYTES)
        except (BotoCoreError, OSError) as exc:
            raise unavailable(uri, f"the transfer broke off ({exc})") from exc

    return Source(uri, int(reply["ContentLength"]), key.rsplit("/", 1)[-1], chunks(), body.close)


# ------------------------------------------------------------------------------- https://


def _open_http(uri: str, settings: Settings, resolve: Callable) -> Source:
    allow = parse_networks(settings.allow_networks)
    verify = ssl.create_default_context(cafile=settings.ingest_ca_bundle or None)
    client = httpx.Client(verify=verify, trust_env=False, follow_redirects=False,
                          timeout=httpx.Timeout(min(READ_TIMEOUT_S, settings.ingest_timeout_s),
                                                connect=min(CONNECT_TIMEOUT_S, settings.ingest_timeout_s)))
    url = uri
    try:
        for _ in range(settings.ingest_max_redirects + 1):
            target = check_url(url, schemes=HTTP_SCHEMES, allow=allow, field=FIELD, resolve=resolve)
            if target.scheme == "http" and not all(_in(a, allow) for a in target.addresses):
                raise errors.InvalidArgument("http:// is accepted only for allow-listed networks; use https://",
                                             field=FIELD)
            response = _get(client, url, target)
            if response.status_code in REDIRECT_CODES:
                location = response.headers.get("location", "")
                response.close()
                if not location:
                    raise unavailable(uri, f"HTTP {response.status_code} without a Location")
                url = urljoin(url, location)
                continue
            return _body(uri, url, response, settings, client)
        raise unavailable(uri, f"more than {settings.ingest_max_redirects} redirects")
    except BaseException:
        client.close()
        raise


def _in(address: str, allow) -> bool:
    import ipaddress

    return any(ipaddress.ip_address(address) in net for net in allow)


def _get(client: httpx.Client, url: str, target: Target) -> httpx.Response:
    """GET ``url`` from one of the target's checked addresses (the first that connects)."""
    parts = urlsplit(url)
    reason = ""
    for address in target.addresses:
        literal = f"[{address}]" if ":" in address else address
        pinned = urlunsplit((parts.scheme, f"{literal}:{target.port}", parts.path or "/", parts.query, ""))
        request = client.build_request(
            "GET", pinned, headers={"Host": parts.netloc.rpartition("@")[2], "Accept-Encoding": "identity"},
            extensions={"sni_hostname": target.host} if target.scheme == "https" else {})
        try:
            return client.send(request, stream=True)
        except httpx.ConnectError as exc:  # refused, unreachable, TLS handshake or certificate
            reason = str(exc) or type(exc).__name__
        except httpx.TimeoutException:
            reason = "timed out"
        except httpx.HTTPError as exc:
            raise unavailable(url, str(exc) or type(exc).__name__) from exc
    raise unavailable(url, reason or "no address connects")


def _body(uri: str, url: str, response: httpx.Response, settings: Settings, client: httpx.Client) -> Source:
    if response.status_code != 200:
        response.close()
        raise unavailable(url, f"the server answered HTTP {response.status_code}")
    length = response.headers.get("content-length")
    size = int(length) if length and length.isdigit() else None
    if size is not None and size > settings.max_upload_bytes:
        response.close()
        raise errors.InvalidArgument(f"the source has {size} bytes, over the limit of {settings.max_upload_bytes}",
                                     field=FIELD)

    def chunks() -> Iterator[bytes]:
        try:
            yield from response.iter_raw(CHUNK_BYTES)
        except httpx.TimeoutException as exc:
            raise unavailable(url, "the transfer stalled (no data within the read timeout)") from exc
        except httpx.HTTPError as exc:
            raise unavailable(url, f"the transfer broke off ({exc})") from exc

    def close() -> None:
        response.close()
        client.close()

    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return Source(uri, size, name, chunks(), close)


def _shown(uri: str) -> str:
    """The URI without its query (signed URLs keep their signatures out of messages)."""
    return uri.split("?", 1)[0]
