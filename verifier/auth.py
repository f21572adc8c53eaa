"""API keys (DESIGN.md "Who may do what"): how a network authenticates to the service.

Pure functions: no database, no web framework. A network authenticates with an API key: ``rk_``
followed by 32 random bytes in url-safe base64 (43 characters, no padding). The token is shown
once; only its sha256 hex digest is stored. :func:`api_key_matches` compares in constant time and
never raises. Signed messages (results, challenges, moves) are in :mod:`challenge.messages`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import TypeGuard

from challenge.messages import AuthError

__all__ = ["API_KEY_PREFIX", "api_key_matches", "hash_api_key", "is_api_key", "new_api_key"]


# --- API keys ------------------------------------------------------------------------------

#: Every API key starts with this prefix (it makes leaked keys easy to spot by scanners).
API_KEY_PREFIX = "rk_"
_API_KEY_RANDOM_BYTES = 32
# 32 bytes in url-safe base64 without padding: ceil(32 * 4 / 3) = 43 characters.
_API_KEY_RE = re.compile(r"rk_[A-Za-z0-9_-]{43}")
_SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")


def is_api_key(token: object) -> TypeGuard[str]:
    """Whether ``token`` has the shape of an API key (``rk_`` + 43 url-safe base64 characters).

    Never raises: anything that is not such a string (wrong prefix or length, non-ASCII,
    not a ``str`` at all) gives ``False``.
    """
    return isinstance(token, str) and token.isascii() and _API_KEY_RE.fullmatch(token) is not None


def new_api_key() -> tuple[str, str]:
    """A fresh API key: ``(token, stored_hash)``.

    ``token`` is shown once to the network and never stored; ``stored_hash`` (sha256 hex, see
    :func:`hash_api_key`) is what the database keeps.
    """
    token = API_KEY_PREFIX + secrets.token_urlsafe(_API_KEY_RANDOM_BYTES)
    return token, hash_api_key(token)


def hash_api_key(token: str) -> str:
    """The storage hash of an API key: sha256 of its ASCII bytes, lowercase hex.

    Raises :class:`AuthError` if ``token`` is not a well-formed key (see :func:`is_api_key`),
    so a malformed token is never looked up.
    """
    if not is_api_key(token):
        raise AuthError("malformed API key")
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def api_key_matches(token: object, stored_hash: object) -> bool:
    """Whether ``token`` is the key whose storage hash is ``stored_hash``.

    The hashes are compared with :func:`hmac.compare_digest` (constant time). Never raises:
    a malformed token or stored hash gives ``False``.
    """
    if not is_api_key(token):
        return False
    if not isinstance(stored_hash, str) or _SHA256_HEX_RE.fullmatch(stored_hash) is None:
        return False
    candidate = hashlib.sha256(token.encode("ascii")).hexdigest()
    return hmac.compare_digest(candidate.encode("ascii"), stored_hash.encode("ascii"))
