"""The durable webhook outbox: endpoints, signed deliveries, retries with backoff.

Events (``result.finalized``, ``result.disputed``, ``dispute.verdict``,
``dispute.disclosure_requested``) are written as
:class:`~challenge.records.WebhookDelivery` rows by :func:`enqueue` *in the caller's transaction*:
the row commits (or rolls back) together with the state change that caused it (the outbox
pattern), so an event is never announced for a change that did not happen and never lost for one
that did. :func:`deliver_due` later POSTs the due rows, one transaction per delivery, and retries
failures with exponential backoff until ``max_attempts``.

Delivery contract (for receivers)
---------------------------------
* ``POST <url>`` with body = the event payload as canonical JSON (UTF-8, sorted keys, no
  whitespace), ``Content-Type: application/json`` and the headers

  - ``X-Refute-Event``: the event name;
  - ``X-Refute-Delivery``: the event id (stable across retries);
  - ``X-Refute-Timestamp``: Unix seconds when this attempt was signed;
  - ``X-Refute-Signature``: ``v1=<hex HMAC-SHA256(secret, f"{timestamp}." + body)>``.

  :func:`verify_signature` checks a request the way a receiver should (constant-time compare,
  stale or future timestamps refused).
* Any 2xx answer marks the delivery DELIVERED; anything else (including redirects, which are not
  followed, and timeouts) is a failed attempt.
* Delivery is **at least once**: a worker that crashes between the POST and the commit of its
  outcome leaves the row PENDING and it is sent again. Receivers must deduplicate on
  ``X-Refute-Delivery``.

Concurrency: on PostgreSQL each delivery is claimed with ``SELECT … FOR UPDATE SKIP LOCKED`` and
its row lock is held until its outcome commits, so any number of workers can run
:func:`deliver_due` and each due delivery is attempted by exactly one of them per round. SQLite
has no row locks: there the outcome update is conditional (an attempt is never counted twice), but
two concurrent workers could both POST the same delivery, so a SQLite deployment runs one webhook
worker.

Targets: endpoint URLs are validated at registration (http/https, a host, no credentials) and
loopback, private, link-local and otherwise non-global IP literals (and ``localhost``) are refused
unless ``allow_loopback=True`` (tests, local development). A host *name* can resolve (or be
rebound) to such an address, so every delivery resolves the name again (:func:`resolve_target`)
and checks **every** address it gets: if any is loopback, private, link-local, multicast,
unspecified or otherwise non-global, the attempt is refused and recorded on the delivery
(``last_error`` starts with ``refused target:``) unless private targets are allowed. The request
then connects to the checked address itself (the URL carries the IP; the ``Host`` header and, for
https, the TLS server name carry the original name), so nothing is resolved twice and a DNS answer
cannot change between the check and the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from challenge.outbox import (
    DELIVERED,
    EVENTS,
    FAILED,
    PENDING,
    STATUSES,
    WebhookError,
    canonical_json,
    utc,
)
from challenge.records import Network, WebhookDelivery, WebhookEndpoint

#: Request headers (see the module docstring).
HEADER_EVENT = "X-Refute-Event"
HEADER_DELIVERY = "X-Refute-Delivery"
HEADER_TIMESTAMP = "X-Refute-Timestamp"
HEADER_SIGNATURE = "X-Refute-Signature"
SIGNATURE_VERSION = "v1"

#: Backoff: 2**attempts seconds, capped, plus up to this fraction of it as jitter.
BACKOFF_CAP_S = 3600
JITTER_FRACTION = 0.25

MAX_URL_LENGTH = 2000
MAX_ERROR_LENGTH = 500
USER_AGENT = "refute-webhooks/1"


# --- time ------------------------------------------------------------------------------------


def _unix(moment: datetime) -> int:
    return int(utc(moment).timestamp())


# --- endpoints -------------------------------------------------------------------------------


def _non_global_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` denotes literally, if it is not a public (global) one.

    Besides the canonical forms this also catches the legacy IPv4 spellings the C resolver
    accepts (``127.1``, ``2130706433``, ``0x7f000001``) and IPv4-mapped IPv6 addresses.
    """
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return None if address.is_global else address


def validate_url(url: str, *, allow_loopback: bool = False) -> str:
    """Check an endpoint URL; return it unchanged or raise :class:`WebhookError`."""
    if not isinstance(url, str) or not url:
        raise WebhookError("webhook url must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookError(f"webhook url is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        raise WebhookError("webhook url must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise WebhookError(f"webhook url is malformed: {exc}") from exc
    if parts.scheme.lower() not in {"http", "https"}:
        raise WebhookError(f"webhook url must be http or https, not {parts.scheme or 'none'!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookError("webhook url has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookError("webhook url must not embed credentials")
    if port == 0:
        raise WebhookError("webhook url has port 0")
    if not allow_loopback:
        if host == "localhost" or host.endswith(".localhost"):
            raise WebhookError(f"webhook url targets a loopback host ({host})")
        address = _non_global_ip(host)
        if address is not None:
            kind = "loopback" if address.is_loopback else "private or reserved"
            raise WebhookError(f"webhook url targets a {kind} address ({address})")
    return url


#: Resolves ``(host, port)`` to the IP addresses (text) a connection may use.
Resolver = Callable[[str, int], Sequence[str]]
#: At most this many resolved addresses are tried per attempt.
MAX_ADDRESSES = 4


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the operating system's resolver gives for ``host`` (TCP), in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refused_address(text: str) -> str | None:
    """Why a delivery must not connect to the address ``text``, or None for a global one."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return f"{text!r} is not an IP address"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, hit in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                      ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                      ("private", address.is_private), ("reserved", address.is_reserved)):
        if hit:
            return f"{kind} address {address}"
    if not address.is_global:
        return f"non-global address {address}"
    return None


@dataclass(frozen=True)
class Target:
    """Where one attempt connects: the URL with the checked IP in place of the name, and the
    ``Host`` header and TLS server name of the original URL."""

    url: str
    host_header: str
    server_name: str | None


def resolve_target(url: str, *, allow_private: bool,
                   resolve: Resolver = system_resolver) -> list[Target]:
    """The checked addresses of ``url``'s host, as connection targets (at most
    :data:`MAX_ADDRESSES`, in the resolver's order).

    Raises :class:`WebhookError` when the URL is malformed, the name does not resolve, or
    (unless ``allow_private``) **any** resolved address is not a public one: a name that
    resolves to one public and one loopback address is refused as a whole.
    """
    validate_url(url, allow_loopback=True)
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    literal = _literal_ip(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = [str(a) for a in resolve(host, port)]
        except (OSError, UnicodeError, ValueError) as exc:
            raise WebhookError(f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise WebhookError(f"{host} resolves to no address")
    if not allow_private:
        for address in addresses:
            reason = refused_address(address)
            if reason is not None:
                raise WebhookError(f"{host} resolves to a {reason}")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    targets = []
    for address in addresses[:MAX_ADDRESSES]:
        bare = address.split("%", 1)[0]
        shown = f"[{bare}]" if ":" in bare else bare
        netloc = f"{shown}:{parts.port}" if parts.port is not None else shown
        targets.append(Target(
            url=urlunsplit((scheme, netloc, parts.path or "/", parts.query, "")),
            host_header=host_header,
            server_name=host if scheme == "https" and literal is None else None))
    return targets


def _literal_ip(host: str) -> str | None:
    """``host`` as a canonical IP address if it is one (legacy IPv4 spellings included)."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    try:
        return str(ipaddress.IPv4Address(socket.inet_aton(host)))
    except (OSError, ValueError):
        return None


def _validate_events(events: Iterable[str]) -> list[str]:
    if isinstance(events, str):
        raise WebhookError("webhook events must be a list of event names, not a string")
    chosen = list(events)
    if not chosen:
        raise WebhookError(f"webhook events must not be empty (choose from {sorted(EVENTS)})")
    unknown = sorted({str(e) for e in chosen if not isinstance(e, str) or e not in EVENTS})
    if unknown:
        raise WebhookError(f"unknown webhook events {unknown} (choose from {sorted(EVENTS)})")
    return sorted(set(chosen))


def register_endpoint(
    session: Session,
    network_id: str,
    url: str,
    events: Iterable[str],
    *,
    allow_loopback: bool = False,
    now: datetime | None = None,
) -> tuple[WebhookEndpoint, str]:
    """Register where ``network_id`` wants ``events`` delivered; return the row and its secret.

    The secret (used to sign every delivery) is generated here and returned so that the API can
    show it exactly once. The row is added and flushed in the caller's transaction; the caller
    commits. ``allow_loopback`` admits loopback and private targets (tests, local development).
    """
    checked_url = validate_url(url, allow_loopback=allow_loopback)
    chosen = _validate_events(events)
    if session.get(Network, network_id) is None:
        raise WebhookError(f"network {network_id!r} does not exist")
    secret = "whsec_" + secrets.token_urlsafe(32)
    endpoint = WebhookEndpoint(
        id=f"whe_{secrets.token_hex(12)}",
        network_id=network_id,
        url=checked_url,
        secret=secret,
        events=chosen,
        created_at=utc(now) if now is not None else datetime.now(UTC),
    )
    session.add(endpoint)
    session.flush()
    return endpoint, secret


# --- payloads and signatures -----------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 (hex) of ``f"{timestamp}."`` followed by ``body``, keyed by ``secret``."""
    message = f"{int(timestamp)}.".encode() + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def delivery_headers(secret: str, event: str, event_id: str, timestamp: int,
                     body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt (content type and the signed ``X-Refute-*`` set)."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        HEADER_EVENT: event,
        HEADER_DELIVERY: event_id,
        HEADER_TIMESTAMP: str(int(timestamp)),
        HEADER_SIGNATURE: f"{SIGNATURE_VERSION}={sign(secret, timestamp, body)}",
    }


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes, now: datetime,
                     tolerance_s: int = 300) -> bool:
    """Whether a received request was signed with ``secret`` within ``tolerance_s`` of ``now``.

    For receivers. Header names are matched case-insensitively; the signature header may carry
    several comma-separated ``v1=`` values (any one matching suffices). The comparison is
    constant-time, and timestamps further than ``tolerance_s`` from ``now`` in either direction
    are refused (replays of old requests).
    """
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    stamp = lowered.get(HEADER_TIMESTAMP.lower(), "").strip()
    given = lowered.get(HEADER_SIGNATURE.lower(), "")
    if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 12:
        return False
    timestamp = int(stamp)
    if abs(_unix(now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    ok = False
    for part in given.split(","):
        version, _, value = part.strip().partition("=")
        if version == SIGNATURE_VERSION:
            # Compare every candidate (no early exit) so timing reveals nothing useful.
            ok |= hmac.compare_digest(value.strip().encode(), expected.encode())
    return ok


# --- the outbox ------------------------------------------------------------------------------


def backoff(attempts: int, delivery_id: int) -> timedelta:
    """Delay before the next attempt after ``attempts`` failed ones.

    ``2**attempts`` seconds capped at one hour, plus a jitter of up to 25 % of that, derived
    deterministically from the delivery id and the attempt number (so retries of many deliveries
    that failed together spread out, and a test can predict them).
    """
    base = min(2 ** max(attempts, 0), BACKOFF_CAP_S)
    digest = hashlib.sha256(f"{delivery_id}:{attempts}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return timedelta(seconds=base + base * JITTER_FRACTION * fraction)


@dataclass(frozen=True)
class _Job:
    """What one attempt needs, copied out of the session."""

    id: int
    attempts: int
    event: str
    event_id: str
    payload: dict[str, object]
    url: str
    secret: str


def _claim(session: Session, now: datetime, *, lock: bool) -> _Job | None:
    """The next due delivery (locked with SKIP LOCKED when ``lock``), or None."""
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(1)
    )
    if lock:
        query = query.with_for_update(skip_locked=True)
    delivery = session.scalars(query).first()
    if delivery is None:
        return None
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    if endpoint is None:  # pragma: no cover - the foreign key forbids it
        raise WebhookError(f"delivery {delivery.id} has no endpoint")
    return _Job(id=delivery.id, attempts=delivery.attempts, event=delivery.event,
                event_id=delivery.event_id, payload=dict(delivery.payload), url=endpoint.url,
                secret=endpoint.secret)


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_ERROR_LENGTH else flat[: MAX_ERROR_LENGTH - 1] + "…"


def _attempt(client: httpx.Client, job: _Job, now: datetime, timeout_s: float, *,
             allow_private: bool, resolve: Resolver) -> str | None:
    """POST one delivery to its checked, pinned address; None on a 2xx answer, else a one-line
    error (``refused target: …`` when the target's addresses are refused)."""
    try:
        targets = resolve_target(job.url, allow_private=allow_private, resolve=resolve)
    except WebhookError as exc:
        return _one_line(f"refused target: {exc.reason}")
    body = canonical_json(job.payload)
    headers = delivery_headers(job.secret, job.event, job.event_id, _unix(now), body)
    error = "no address"
    for target in targets:
        extensions = {"sni_hostname": target.server_name} if target.server_name else {}
        # A pooled TLS connection is keyed by the IP, not the name it was verified for: close
        # it after the answer, so another endpoint on the same IP never rides on it.
        pinned = {**headers, "Host": target.host_header}
        if target.server_name:
            pinned["Connection"] = "close"
        try:
            # Streamed so that the answer's body is never read (a receiver cannot make us
            # buffer it).
            with client.stream("POST", target.url, content=body,
                               headers=pinned,
                               timeout=timeout_s, follow_redirects=False,
                               extensions=extensions) as response:
                status = response.status_code
        except httpx.ConnectError as exc:
            error = _one_line(f"{type(exc).__name__}: {exc}")
            continue  # the next address of the name, if any
        except Exception as exc:  # any failure of one endpoint must not stop the others
            return _one_line(f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"
    return error


def _record(session: Session, job: _Job, error: str | None, now: datetime,
            max_attempts: int) -> bool:
    """Write the outcome of one attempt; False if another worker recorded it first."""
    attempts = job.attempts + 1
    values: dict[str, Any]
    if error is None:
        values = {"status": DELIVERED, "attempts": attempts, "delivered_at": now}
    elif attempts >= max_attempts:
        values = {"status": FAILED, "attempts": attempts, "last_error": error}
    else:
        values = {"attempts": attempts, "last_error": error,
                  "next_attempt_at": now + backoff(attempts, job.id)}
    done = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == job.id, WebhookDelivery.status == PENDING,
               WebhookDelivery.attempts == job.attempts)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(cast("CursorResult[Any]", done).rowcount)


def deliver_due(sessions: sessionmaker[Session], now: datetime, *, client: httpx.Client,
                batch: int = 50, max_attempts: int = 8, timeout_s: float = 10.0,
                allow_private: bool | None = None, resolve: Resolver = system_resolver) -> int:
    """Attempt up to ``batch`` due PENDING deliveries; return how many were attempted.

    Each target is resolved with ``resolve`` at the attempt and every address is checked
    (:func:`resolve_target`); ``allow_private`` admits loopback and private addresses (None:
    the ``webhooks_allow_private`` setting). A refused target is a failed attempt whose
    ``last_error`` says why; nothing is sent to it.

    Each delivery is claimed, POSTed and its outcome committed in its own transaction, so a
    crash never loses a DELIVERED mark or counts an attempt twice (it may re-send: at least
    once). A 2xx answer marks it DELIVERED; otherwise ``attempts`` grows, ``last_error`` says
    why in one line and the next attempt waits :func:`backoff`; after ``max_attempts`` attempts
    it is FAILED. On PostgreSQL rows are claimed with ``FOR UPDATE SKIP LOCKED`` and the lock is
    held over the POST, so concurrent workers never attempt the same delivery in one round.
    """
    if batch < 1 or max_attempts < 1:
        raise WebhookError("batch and max_attempts must be at least 1")
    if allow_private is None:
        from refute.settings import get_settings

        allow_private = get_settings().webhooks_allow_private
    moment = utc(now)
    attempted = 0
    while attempted < batch:
        with sessions() as session:
            lock = session.get_bind().dialect.name == "postgresql"
            job = _claim(session, moment, lock=lock)
            if job is None:
                session.rollback()
                break
            if not lock:
                # SQLite: end the read transaction, so no snapshot (or lock) is held during the
                # POST and the outcome update cannot fail on a stale snapshot.
                session.rollback()
            error = _attempt(client, job, moment, timeout_s, allow_private=allow_private,
                             resolve=resolve)
            attempted += 1
            _record(session, job, error, moment, max_attempts)
            session.commit()
    return attempted


def list_deliveries(session: Session, network_id: str, *, status: str | None = None,
                    limit: int = 100) -> list[WebhookDelivery]:
    """The deliveries of ``network_id``'s endpoints, newest first (optionally of one status)."""
    if status is not None and status not in STATUSES:
        raise WebhookError(f"unknown delivery status {status!r} (choose from {sorted(STATUSES)})")
    if not 1 <= limit <= 1000:
        raise WebhookError("limit must be between 1 and 1000")
    query = (
        select(WebhookDelivery)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookEndpoint.network_id == network_id)
    )
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    query = query.order_by(WebhookDelivery.id.desc()).limit(limit)
    return list(session.scalars(query).all())
