"""Networks and their API keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from challenge.messages import AuthError
from challenge.records import ApiKey, Network, new_id
from verifier.auth import api_key_matches, hash_api_key, is_api_key, new_api_key


def create_network(
    session: Session,
    *,
    name: str,
    spot_probability: float,
    spot_count: int,
    challenge_window_s: int,
    now: datetime,
    min_bond: int = 1,
    disclosure_window_s: int = 600,
) -> tuple[Network, str]:
    """Create a network with its first API key; returns (network, key shown once)."""
    network = Network(id=new_id("net"), name=name, spot_probability=spot_probability,
                      spot_count=spot_count, challenge_window_s=challenge_window_s,
                      min_bond=str(min_bond), disclosure_window_s=disclosure_window_s,
                      created_at=now)
    token, digest = new_api_key()
    session.add(network)
    session.flush()
    session.add(ApiKey(network_id=network.id, key_hash=digest, created_at=now))
    return network, token


def add_api_key(session: Session, network_id: str, now: datetime) -> str:
    """Another API key for a network; returns the key (shown once)."""
    token, digest = new_api_key()
    session.add(ApiKey(network_id=network_id, key_hash=digest, created_at=now))
    return token


def authenticate(session: Session, token: str | None) -> Network:
    """The network owning ``token``; AuthError if missing, malformed, unknown or revoked."""
    if token is None or not is_api_key(token):
        raise AuthError("missing or malformed API key")
    digest = hash_api_key(token)
    found = session.execute(
        select(Network, ApiKey.key_hash).join(ApiKey, ApiKey.network_id == Network.id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))).first()
    if found is None or not api_key_matches(token, found.key_hash):
        raise AuthError("unknown or revoked API key")
    network: Network = found.Network
    return network
