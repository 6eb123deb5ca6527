"""Datasets named by an ``s3://`` or ``https://`` URI: checked against the deployment's allow-lists, then fetched.

Fetching happens here, in the trusted API process, which alone holds the object store's credentials; the
bytes then go through exactly the inspection an upload gets (the sandboxed inspector, which has no network
and no credentials) and are stored through :mod:`app.storage`.

* ``s3://bucket/key``: ``bucket`` must be in ``DISTILLERY_ALLOWED_S3_BUCKETS``; read with the storage's
  endpoint (``DISTILLERY_S3_ENDPOINT_URL``) and boto3's credential chain. Distillery's own storage prefix is
  never readable this way (it holds every tenant's blobs), even when its bucket is allow-listed.
* ``https://host/path``: ``host`` (or ``host:port``) must be in ``DISTILLERY_ALLOWED_HTTP_HOSTS``; plain
  ``http://`` only with ``DISTILLERY_DATASET_ALLOW_HTTP``. Redirects are followed by hand, at most
  :data:`MAX_REDIRECTS`, each hop checked against the same rules, so a listed host cannot send the fetch to
  an unlisted one. No proxy, netrc or credentials from the environment; no user:password in the URI.

Both are bounded by ``DISTILLERY_MAX_UPLOAD_BYTES`` (413) and ``DISTILLERY_DATASET_FETCH_TIMEOUT_SECONDS``
(all of it: connecting, redirects, the body). Refusals are 422 problems with a precise ``detail``:
``invalid_uri``, ``uri_not_enabled`` (that scheme's allow-list is empty), ``uri_not_allowed``,
``uri_not_found``, ``uri_fetch_failed``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from app.catalog.uploads import CHUNK, Received, write_chunks
from app.errors import PayloadTooLarge, Unprocessable
from app.settings import Settings

MAX_REDIRECTS = 5
REMOTE_SCHEMES = ("s3", "https", "http")
_REDIRECTS = {301, 302, 303, 307, 308}


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class HttpUrl:
    url: str

    def __str__(self) -> str:
        return self.url


def _invalid(detail: str) -> Unprocessable:
    return Unprocessable(detail, code="invalid_uri", errors=[{"loc": ["body", "uri"], "msg": detail}])


def _not_allowed(detail: str) -> Unprocessable:
    return Unprocessable(detail, code="uri_not_allowed", errors=[{"loc": ["body", "uri"], "msg": detail}])


def is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in REMOTE_SCHEMES


def parse(uri: str, settings: Settings) -> S3Object | HttpUrl:
    """The object or URL ``uri`` names, once it passes the allow-lists; 422 otherwise."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # e.g. an unbalanced '[' in the host
        raise _invalid(f"the uri is malformed: {exc}") from exc
    if parts.scheme.lower() == "s3":
        return _parse_s3(parts.netloc, parts.path, settings)
    check_http_url(uri, settings)
    return HttpUrl(uri)


def _parse_s3(bucket: str, path: str, settings: Settings) -> S3Object:
    key = path.lstrip("/")
    if not bucket or not key or "\x00" in key:
        raise _invalid("an s3 uri names a bucket and an object key: s3://bucket/path/to/data.npz")
    allowed = settings.allowed_s3_buckets
    if not allowed:
        raise Unprocessable("s3:// datasets are not enabled on this deployment (DISTILLERY_ALLOWED_S3_BUCKETS is "
                            "empty); upload the file instead", code="uri_not_enabled")
    if bucket.lower() not in allowed:
        raise _not_allowed(f"bucket {bucket!r} is not in DISTILLERY_ALLOWED_S3_BUCKETS ({', '.join(allowed)})")
    own = urlsplit(settings.resolved_storage_url)
    own_prefix = own.path.strip("/")
    if own.scheme == "s3" and own.netloc == bucket and (not own_prefix or key.startswith(own_prefix + "/")):
        raise _not_allowed(f"s3://{bucket}/{own_prefix} is Distillery's own blob storage; datasets cannot be "
                           "read from it by uri")
    return S3Object(bucket, key)


def check_http_url(url: str, settings: Settings) -> None:
    """422 unless ``url`` is https (or http where allowed) to an allow-listed host, without credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _invalid(f"the uri is malformed: {exc}") from exc
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("https", "http"):
        raise _invalid("uri must be file://, s3:// or https://")
    if not host:
        raise _invalid(f"{scheme}:// uri without a host")
    if parts.username is not None or parts.password is not None:
        raise _invalid("credentials in the uri (user:password@) are not accepted; use a presigned URL or an "
                       "allow-listed s3:// bucket")
    allowed = settings.allowed_http_hosts
    if not allowed:
        raise Unprocessable("https:// datasets are not enabled on this deployment (DISTILLERY_ALLOWED_HTTP_HOSTS "
                            "is empty); upload the file instead", code="uri_not_enabled")
    if scheme == "http" and not settings.dataset_allow_http:
        raise _not_allowed(f"plain http:// is refused ({host}); use https:// (DISTILLERY_DATASET_ALLOW_HTTP is off)")
    hostport = f"{host}:{port or (443 if scheme == 'https' else 80)}"
    if host not in allowed and hostport not in allowed:
        raise _not_allowed(f"host {hostport} is not in DISTILLERY_ALLOWED_HTTP_HOSTS ({', '.join(allowed)})")


# ---- fetching --------------------------------------------------------------------------------------------
def fetch(source: S3Object | HttpUrl, path: Path, settings: Settings) -> Received:
    """Download ``source`` into the (existing, empty) file ``path``; returns its size and sha256.

    413 past DISTILLERY_MAX_UPLOAD_BYTES; 422 ``uri_not_found`` / ``uri_fetch_failed`` / ``uri_not_allowed`` (a
    redirect off the allow-list)."""
    deadline = time.monotonic() + settings.dataset_fetch_timeout_seconds
    if isinstance(source, S3Object):
        return _fetch_s3(source, path, settings, deadline)
    return _fetch_http(source.url, path, settings, deadline)


def _failed(source: object, why: str) -> Unprocessable:
    return Unprocessable(f"could not fetch {source}: {why}", code="uri_fetch_failed")


def _within(chunks: Iterable[bytes], deadline: float, source: object, settings: Settings) -> Iterator[bytes]:
    for chunk in chunks:
        if time.monotonic() > deadline:
            raise _failed(source, f"it took longer than {settings.dataset_fetch_timeout_seconds:g} s "
                                  "(DISTILLERY_DATASET_FETCH_TIMEOUT_SECONDS)")
        yield chunk


def _too_large(source: object, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{source} holds {size} bytes, more than the limit of {limit} bytes "
                           "(DISTILLERY_MAX_UPLOAD_BYTES)")


def _fetch_s3(obj: S3Object, path: Path, settings: Settings, deadline: float) -> Received:
    from app.storage.s3 import S3Options, is_missing, is_unavailable, s3_client

    client = s3_client(S3Options.from_settings(settings))
    try:
        answer = client.get_object(Bucket=obj.bucket, Key=obj.key)
        size = int(answer.get("ContentLength") or 0)
        if size > settings.max_upload_bytes:
            answer["Body"].close()
            raise _too_large(obj, size, settings.max_upload_bytes)
        try:
            return write_chunks(_within(answer["Body"].iter_chunks(CHUNK), deadline, obj, settings), path,
                                settings.max_upload_bytes, what=str(obj))
        finally:
            answer["Body"].close()
    except (Unprocessable, PayloadTooLarge):
        raise
    except Exception as exc:
        if is_missing(exc):
            raise Unprocessable(f"{obj} does not exist", code="uri_not_found") from exc
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise _failed(obj, f"the object store refused access ({code})") from exc
        if is_unavailable(exc) or code:
            raise _failed(obj, str(exc)[:300]) from exc
        raise


def _fetch_http(url: str, path: Path, settings: Settings, deadline: float) -> Received:
    import httpx

    per_call = min(30.0, settings.dataset_fetch_timeout_seconds)
    with httpx.Client(follow_redirects=False, trust_env=False, timeout=httpx.Timeout(per_call)) as client:
        for _hop in range(MAX_REDIRECTS + 1):
            check_http_url(url, settings)  # every hop, the first one again included
            try:
                with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as r:
                    if r.status_code in _REDIRECTS and "location" in r.headers:
                        target = urljoin(url, r.headers["location"])
                        _check_redirect(url, target, settings)
                        url = target
                        continue
                    if r.status_code in (404, 410):
                        raise Unprocessable(f"{url} answered {r.status_code}: no such file", code="uri_not_found")
                    if r.status_code != 200:
                        raise _failed(url, f"the server answered {r.status_code}")
                    declared = r.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > settings.max_upload_bytes:
                        raise _too_large(url, int(declared), settings.max_upload_bytes)
                    return write_chunks(_within(r.iter_bytes(CHUNK), deadline, url, settings), path,
                                        settings.max_upload_bytes, what=url)
            except httpx.TimeoutException as exc:
                raise _failed(url, f"timed out ({exc.__class__.__name__})") from exc
            except httpx.HTTPError as exc:
                raise _failed(url, f"{exc.__class__.__name__}: {str(exc)[:200]}") from exc
    raise _failed(url, f"more than {MAX_REDIRECTS} redirects")


def _check_redirect(source: str, target: str, settings: Settings) -> None:
    try:
        check_http_url(target, settings)
    except Unprocessable as exc:
        if exc.code in ("uri_not_allowed", "uri_not_enabled"):
            raise _not_allowed(f"{source} redirects to {target}, which is refused: {exc.detail}") from exc
        raise _failed(source, f"it redirects to an unusable location ({exc.detail})") from exc
