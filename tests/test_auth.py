"""verifier.auth: API keys and EIP-712 signing/verification (DESIGN.md "Who may do what")."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import pytest
from eth_abi.abi import encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from challenge.messages import (
    MAX_DEADLINE_AHEAD,
    SECP256K1_N,
    ZERO_ADDRESS,
    AuthError,
    Challenge,
    Domain,
    Move,
    Result,
    SignedObject,
    network_word,
    recover_signer,
    sign_typed,
    typed_data,
    typed_data_hash,
    verify_signed,
)
from refute.errors import RefuteError
from verifier.auth import api_key_matches, hash_api_key, is_api_key, new_api_key

NOW = 1_760_000_000
CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
DOMAIN = Domain(chain_id=31337, verifying_contract=CONTRACT)
PROVIDER: LocalAccount = Account.from_key(bytes([0x11]) * 32)
CHALLENGER: LocalAccount = Account.from_key(bytes([0x22]) * 32)


def word(tag: str) -> bytes:
    """A deterministic 32-byte value."""
    return hashlib.sha256(tag.encode()).digest()


def a_result(**changes: Any) -> Result:
    """A valid Result, with optional field overrides."""
    base = Result(
        network=network_word("net-a"),
        model=word("model"),
        input=word("input"),
        output=word("output"),
        trace_root=word("trace"),
        stake=10**18,
        nonce=7,
        deadline=NOW + 3600,
    )
    return dataclasses.replace(base, **changes)


def a_challenge(**changes: Any) -> Challenge:
    """A valid Challenge, with optional field overrides."""
    base = Challenge(
        network=network_word("net-a"),
        result=word("result"),
        lo=0,
        hi=12,
        bond=5 * 10**17,
        nonce=1,
        deadline=NOW + 600,
    )
    return dataclasses.replace(base, **changes)


def a_move(**changes: Any) -> Move:
    """A valid Move, with optional field overrides."""
    base = Move(
        network=network_word("net-a"),
        dispute=word("dispute"),
        round=3,
        kind=2,
        payload=word("payload"),
        nonce=4,
        deadline=NOW + 600,
    )
    return dataclasses.replace(base, **changes)


FACTORIES: list[Callable[..., SignedObject]] = [a_result, a_challenge, a_move]


def verify(
    obj: SignedObject,
    signature: bytes | str,
    *,
    domain: Domain = DOMAIN,
    expected_signer: str | None = PROVIDER.address,
    now: int = NOW,
    expected_domain: Domain = DOMAIN,
) -> str:
    """verify_signed's signer, with the test defaults."""
    signer, _digest = verify_signed(
        obj,
        domain,
        signature,
        expected_signer=expected_signer,
        now=now,
        expected_domain=expected_domain,
    )
    return signer


def tampered(value: object) -> object:
    """A different in-range value of the same type (one bit flipped, or +1 / -1)."""
    if isinstance(value, bytes):
        return bytes([value[0] ^ 0x01]) + value[1:]
    assert isinstance(value, int)
    return value - 1 if value > 0 else value + 1


# --- the standard encoding, computed by hand ------------------------------------------------

HAND_TYPES: dict[str, tuple[str, list[str], list[str]]] = {
    # primary type -> (encodeType string, member names, member types), written out literally.
    "Result": (
        "Result(bytes32 network,bytes32 model,bytes32 input,bytes32 output,bytes32 traceRoot,"
        "uint256 stake,uint256 nonce,uint256 deadline)",
        ["network", "model", "input", "output", "trace_root", "stake", "nonce", "deadline"],
        ["bytes32"] * 5 + ["uint256"] * 3,
    ),
    "Challenge": (
        "Challenge(bytes32 network,bytes32 result,uint256 lo,uint256 hi,uint256 bond,"
        "uint256 nonce,uint256 deadline)",
        ["network", "result", "lo", "hi", "bond", "nonce", "deadline"],
        ["bytes32", "bytes32"] + ["uint256"] * 5,
    ),
    "Move": (
        "Move(bytes32 network,bytes32 dispute,uint256 round,uint8 kind,bytes32 payload,"
        "uint256 nonce,uint256 deadline)",
        ["network", "dispute", "round", "kind", "payload", "nonce", "deadline"],
        ["bytes32", "bytes32", "uint256", "uint8", "bytes32", "uint256", "uint256"],
    ),
}


def hand_domain_separator(domain: Domain) -> bytes:
    """hashStruct(EIP712Domain) per EIP-712, as Solidity would compute it."""
    type_hash = keccak(
        text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    )
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                type_hash,
                keccak(text=domain.name),
                keccak(text=domain.version),
                domain.chain_id,
                domain.verifying_contract,
            ],
        )
    )


def hand_digest(obj: SignedObject, domain: Domain) -> bytes:
    """keccak256("\\x19\\x01" ‖ domainSeparator ‖ hashStruct(obj)), from the EIP-712 spec."""
    type_string, attrs, types = HAND_TYPES[type(obj).__name__]
    values = [getattr(obj, attr) for attr in attrs]
    struct_hash = keccak(encode(["bytes32", *types], [keccak(text=type_string), *values]))
    return keccak(b"\x19\x01" + hand_domain_separator(domain) + struct_hash)


@pytest.mark.parametrize("factory", FACTORIES)
def test_digest_is_standard_eip712(factory: Callable[..., SignedObject]) -> None:
    obj = factory()
    digest = hand_digest(obj, DOMAIN)
    assert typed_data_hash(obj, DOMAIN) == digest
    assert obj.type_string() == HAND_TYPES[type(obj).__name__][0]
    # Signing the hand-made digest directly gives the very same (deterministic) signature.
    by_hand = Account.unsafe_sign_hash(digest, PROVIDER.key)
    assert sign_typed(obj, DOMAIN, PROVIDER.key) == bytes(by_hand.signature)


_WORDS = st.binary(min_size=32, max_size=32)
_UINTS = st.integers(min_value=0, max_value=2**256 - 1)


@st.composite
def _messages(draw: st.DrawFn) -> tuple[SignedObject, Domain]:
    kinds: list[type[SignedObject]] = [Result, Challenge, Move]
    kind = draw(st.sampled_from(kinds))
    values: dict[str, Any] = {attr: draw(_WORDS) if solidity == "bytes32" else
              draw(st.integers(0, 255) if solidity == "uint8" else _UINTS)
              for _, attr, solidity in kind.FIELDS}
    contract = "0x" + draw(st.binary(min_size=20, max_size=20)).hex()
    domain = Domain(chain_id=draw(st.integers(1, 2**256 - 1)), verifying_contract=contract,
                    name=draw(st.text(max_size=12)), version=draw(st.text(max_size=4)))
    return kind(**values), domain


@given(_messages())
@settings(max_examples=200, deadline=None)
def test_fast_digest_equals_eth_account_encoding(message: tuple[SignedObject, Domain]) -> None:
    """The service's own EIP-712 digest (static words, cached domain separator) is eth-account's
    ``encode_typed_data`` digest, the one ``sign_typed`` signs, on any message and domain."""
    obj, domain = message
    signable = encode_typed_data(full_message=typed_data(obj, domain))
    assert typed_data_hash(obj, domain) == keccak(
        b"\x19" + signable.version + signable.header + signable.body)


def test_default_domain_is_refute_v1_zero_contract() -> None:
    domain = Domain(chain_id=1)
    assert (domain.name, domain.version, domain.verifying_contract) == ("refute", "1", ZERO_ADDRESS)
    assert typed_data_hash(a_result(), domain) == hand_digest(a_result(), domain)


def test_network_word_is_keccak_of_id() -> None:
    assert network_word("net-a") == keccak(b"net-a")
    assert len(network_word("net-a")) == 32
    with pytest.raises(ValueError):
        network_word("")


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES)
def test_sign_recover_round_trip(factory: Callable[..., SignedObject]) -> None:
    obj = factory()
    signature = sign_typed(obj, DOMAIN, PROVIDER.key)
    assert len(signature) == 65
    assert signature[64] in (27, 28)
    assert recover_signer(obj, DOMAIN, signature) == PROVIDER.address
    assert verify(obj, signature) == PROVIDER.address
    assert verify(obj, "0x" + signature.hex()) == PROVIDER.address
    assert verify(obj, signature, expected_signer=None) == PROVIDER.address
    # Addresses compare case-insensitively.
    assert verify(obj, signature, expected_signer=PROVIDER.address.lower()) == PROVIDER.address


def test_other_signer_is_refused() -> None:
    obj = a_result()
    signature = sign_typed(obj, DOMAIN, CHALLENGER.key)
    assert recover_signer(obj, DOMAIN, signature) == CHALLENGER.address
    with pytest.raises(AuthError, match="expected"):
        verify(obj, signature)


def test_v_zero_one_is_normalized() -> None:
    obj = a_move()
    signature = sign_typed(obj, DOMAIN, PROVIDER.key)
    raw_v = signature[:64] + bytes([signature[64] - 27])
    assert verify(obj, raw_v) == PROVIDER.address


def test_digest_distinguishes_types_and_domains() -> None:
    digests = {
        typed_data_hash(a_result(), DOMAIN),
        typed_data_hash(a_result(), Domain(chain_id=1, verifying_contract=CONTRACT)),
        typed_data_hash(a_result(nonce=8), DOMAIN),
        typed_data_hash(a_challenge(), DOMAIN),
        typed_data_hash(a_move(), DOMAIN),
    }
    assert len(digests) == 5


# --- domain -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "claimed",
    [
        Domain(chain_id=1, verifying_contract=CONTRACT),
        Domain(chain_id=31337, verifying_contract=CONTRACT, name="other"),
        Domain(chain_id=31337, verifying_contract=CONTRACT, version="2"),
        Domain(chain_id=31337, verifying_contract=ZERO_ADDRESS),
    ],
    ids=["chain-id", "name", "version", "contract"],
)
def test_domain_mismatch_is_refused(claimed: Domain) -> None:
    obj = a_result()
    signature = sign_typed(obj, claimed, PROVIDER.key)  # signed for the claimed domain
    with pytest.raises(AuthError, match="domain mismatch"):
        verify(obj, signature, domain=claimed)


def test_signed_for_other_chain_but_claiming_ours_recovers_someone_else() -> None:
    obj = a_result()
    signature = sign_typed(obj, Domain(chain_id=1, verifying_contract=CONTRACT), PROVIDER.key)
    assert recover_signer(obj, DOMAIN, signature) != PROVIDER.address
    with pytest.raises(AuthError, match="expected"):
        verify(obj, signature)


def test_domain_contract_case_is_normalized() -> None:
    lower = Domain(chain_id=31337, verifying_contract=CONTRACT.lower())
    assert lower == DOMAIN
    signature = sign_typed(a_result(), lower, PROVIDER.key)
    assert verify(a_result(), signature, domain=lower) == PROVIDER.address


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chain_id": 0},
        {"chain_id": -1},
        {"chain_id": 2**256},
        {"chain_id": True},
        {"chain_id": 1, "verifying_contract": "0x1234"},
        {"chain_id": 1, "verifying_contract": CONTRACT.replace("F", "f", 1)},  # bad checksum
    ],
)
def test_bad_domain_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(AuthError):
        Domain(**kwargs)


# --- deadlines --------------------------------------------------------------------------------


def test_deadline_bounds() -> None:
    for deadline in (NOW, NOW + MAX_DEADLINE_AHEAD):
        obj = a_result(deadline=deadline)
        assert verify(obj, sign_typed(obj, DOMAIN, PROVIDER.key)) == PROVIDER.address
    expired = a_result(deadline=NOW - 1)
    with pytest.raises(AuthError, match="expired"):
        verify(expired, sign_typed(expired, DOMAIN, PROVIDER.key))
    far = a_result(deadline=NOW + MAX_DEADLINE_AHEAD + 1)
    with pytest.raises(AuthError, match="days ahead"):
        verify(far, sign_typed(far, DOMAIN, PROVIDER.key))


# --- tampering --------------------------------------------------------------------------------


def _all_fields() -> list[tuple[Callable[..., SignedObject], str]]:
    return [
        (factory, field.name) for factory in FACTORIES for field in dataclasses.fields(factory())
    ]


@pytest.mark.parametrize(
    ("factory", "field"), _all_fields(), ids=lambda x: x if isinstance(x, str) else x.__name__
)
def test_any_tampered_field_is_refused(factory: Callable[..., SignedObject], field: str) -> None:
    obj = factory()
    signature = sign_typed(obj, DOMAIN, PROVIDER.key)
    change: dict[str, Any] = {field: tampered(getattr(obj, field))}
    changed = dataclasses.replace(obj, **change)
    assert recover_signer(changed, DOMAIN, signature) != PROVIDER.address
    with pytest.raises(AuthError):
        verify(changed, signature)


def test_signature_bit_flips_are_refused() -> None:
    obj = a_result()
    signature = sign_typed(obj, DOMAIN, PROVIDER.key)
    # Every bit of v, and one bit in each byte of r and s (rotating through bit positions).
    positions = [64 * 8 + bit for bit in range(8)] + [i * 8 + i % 8 for i in range(64)]
    for position in positions:
        flipped = bytearray(signature)
        flipped[position // 8] ^= 1 << (position % 8)
        with pytest.raises(AuthError):
            verify(obj, bytes(flipped))


def test_high_s_twin_is_refused() -> None:
    obj = a_challenge()
    signature = sign_typed(obj, DOMAIN, CHALLENGER.key)
    s = int.from_bytes(signature[32:64], "big")
    assert s <= SECP256K1_N // 2
    twin = signature[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - signature[64]])
    # The twin is a mathematically valid signature by the same key...
    digest = typed_data_hash(obj, DOMAIN)
    assert Account._recover_hash(digest, signature=twin) == CHALLENGER.address
    # ...which we refuse, so that each message has exactly one valid signature.
    with pytest.raises(AuthError, match="low-s"):
        recover_signer(obj, DOMAIN, twin)
    with pytest.raises(AuthError, match="low-s"):
        verify(obj, twin, expected_signer=CHALLENGER.address)


def _unrecoverable_r() -> int:
    """An r that is not the x coordinate of any secp256k1 point (x³ + 7 is a non-residue)."""
    p = 2**256 - 2**32 - 977
    x = 1
    while pow(x**3 + 7, (p - 1) // 2, p) != p - 1:
        x += 1
    return x


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda sig: sig[:64], "65 bytes"),
        (lambda sig: sig + b"\x00", "65 bytes"),
        (lambda sig: b"", "65 bytes"),
        (lambda sig: "0x" + "zz" * 65, "not hex"),
        (lambda sig: "0x" + sig.hex()[:-1], "not hex"),
        (lambda sig: " " + sig.hex(), "not hex"),
        (lambda sig: int.from_bytes(sig, "big"), "bytes or a hex string"),
        (lambda sig: None, "bytes or a hex string"),
        (lambda sig: sig[:64] + b"\x1d", "v must be"),
        (lambda sig: sig[:64] + b"\x02", "v must be"),
        (lambda sig: bytes(32) + sig[32:], "r out of range"),
        (lambda sig: SECP256K1_N.to_bytes(32, "big") + sig[32:], "r out of range"),
        (lambda sig: sig[:32] + bytes(32) + sig[64:], "s out of range"),
        (lambda sig: _unrecoverable_r().to_bytes(32, "big") + sig[32:], "unrecoverable"),
    ],
)
def test_malformed_signatures_are_refused(make: Callable[[bytes], Any], reason: str) -> None:
    obj = a_result()
    signature = sign_typed(obj, DOMAIN, PROVIDER.key)
    with pytest.raises(AuthError, match=reason):
        verify(obj, make(signature))
    with pytest.raises(AuthError, match=reason):
        recover_signer(obj, DOMAIN, make(signature))


@pytest.mark.parametrize(
    "obj",
    [
        a_result(stake=-1),
        a_result(nonce=2**256),
        a_result(deadline=True),
        a_result(stake=1.0),
        a_result(model=word("m")[:31]),
        a_result(model=word("m") + b"\x00"),
        a_result(input=word("i").hex()),
        a_challenge(lo=-5),
        a_challenge(result=b""),
        a_move(kind=256),
        a_move(kind=-1),
        a_move(round=2**256),
        a_move(payload=bytearray(32)),
    ],
)
def test_out_of_range_fields_are_refused(obj: SignedObject) -> None:
    good = sign_typed(a_result(), DOMAIN, PROVIDER.key)
    with pytest.raises(AuthError, match=r"must be|out of range"):
        verify(obj, good)
    with pytest.raises(AuthError):
        typed_data_hash(obj, DOMAIN)
    with pytest.raises(AuthError):
        sign_typed(obj, DOMAIN, PROVIDER.key)


def test_edge_values_are_accepted() -> None:
    obj = a_move(kind=255, round=2**256 - 1, nonce=0, payload=b"\xff" * 32)
    assert verify(obj, sign_typed(obj, DOMAIN, PROVIDER.key)) == PROVIDER.address


def test_bad_expected_signer_is_a_caller_bug() -> None:
    obj = a_result()
    signature = sign_typed(obj, DOMAIN, PROVIDER.key)
    mistyped = PROVIDER.address[:2] + PROVIDER.address[2:].swapcase()
    for bad in ("0x1234", PROVIDER.address[2:], mistyped):
        with pytest.raises(ValueError, match="not an address"):
            verify(obj, signature, expected_signer=bad)


def test_auth_error_is_a_refute_error() -> None:
    assert issubclass(AuthError, RefuteError)
    assert AuthError.code == "auth_error"
    assert str(AuthError("nope")) == "nope"


# --- hypothesis: sign then verify, and any single change breaks it ---------------------------

WORDS = st.binary(min_size=32, max_size=32)
UINTS = st.integers(min_value=0, max_value=2**256 - 1)
DEADLINES = st.integers(min_value=NOW, max_value=NOW + MAX_DEADLINE_AHEAD)

OBJECTS: st.SearchStrategy[SignedObject] = st.one_of(
    st.builds(
        Result,
        network=WORDS,
        model=WORDS,
        input=WORDS,
        output=WORDS,
        trace_root=WORDS,
        stake=UINTS,
        nonce=UINTS,
        deadline=DEADLINES,
    ),
    st.builds(
        Challenge,
        network=WORDS,
        result=WORDS,
        lo=UINTS,
        hi=UINTS,
        bond=UINTS,
        nonce=UINTS,
        deadline=DEADLINES,
    ),
    st.builds(
        Move,
        network=WORDS,
        dispute=WORDS,
        round=UINTS,
        kind=st.integers(min_value=0, max_value=255),
        payload=WORDS,
        nonce=UINTS,
        deadline=DEADLINES,
    ),
)


def _replacement(obj: SignedObject, field: str) -> st.SearchStrategy[object]:
    """Another valid value for ``field`` of ``obj``, different from the current one."""
    current = getattr(obj, field)
    if isinstance(current, bytes):
        strategy: st.SearchStrategy[object] = WORDS
    elif field == "deadline":
        strategy = DEADLINES
    elif field == "kind":
        strategy = st.integers(min_value=0, max_value=255)
    else:
        strategy = UINTS
    return strategy.filter(lambda value: value != current)


@settings(max_examples=40, deadline=None)
@given(obj=OBJECTS, chain_id=st.integers(min_value=1, max_value=2**64), data=st.data())
def test_property_sign_verify_and_single_change(
    obj: SignedObject, chain_id: int, data: st.DataObject
) -> None:
    domain = Domain(chain_id=chain_id, verifying_contract=CONTRACT)
    signature = sign_typed(obj, domain, PROVIDER.key)
    assert verify(obj, signature, domain=domain, expected_domain=domain) == PROVIDER.address
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(obj)]))
    change: dict[str, Any] = {field: data.draw(_replacement(obj, field))}
    changed = dataclasses.replace(obj, **change)
    assert recover_signer(changed, domain, signature) != PROVIDER.address
    with pytest.raises(AuthError, match="expected"):
        verify(changed, signature, domain=domain, expected_domain=domain)


# --- API keys -------------------------------------------------------------------------------


def test_api_key_round_trip() -> None:
    token, stored = new_api_key()
    assert token.startswith("rk_") and len(token) == 46
    assert is_api_key(token)
    assert stored == hash_api_key(token) == hashlib.sha256(token.encode()).hexdigest()
    assert api_key_matches(token, stored)
    other, other_stored = new_api_key()
    assert other != token and other_stored != stored
    assert not api_key_matches(other, stored)
    assert not api_key_matches(token, other_stored)


def test_api_key_uses_constant_time_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("verifier.auth.hmac.compare_digest", spy)
    token, stored = new_api_key()
    assert api_key_matches(token, stored)
    assert not api_key_matches(new_api_key()[0], stored)
    assert len(calls) == 2
    assert all(b == stored.encode() for _, b in calls)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "rx_" + t[3:],
        lambda t: t[3:],
        lambda t: t[:-1],
        lambda t: t + "A",
        lambda t: t[:-1] + "é",
        lambda t: t[:-1] + "=",
        lambda t: t[:-1] + " ",
        lambda t: t.encode(),
        lambda t: None,
        lambda t: "",
    ],
)
def test_malformed_api_keys_do_not_match(mangle: Callable[[str], Any]) -> None:
    token, stored = new_api_key()
    bad = mangle(token)
    assert not is_api_key(bad)
    assert api_key_matches(bad, stored) is False
    with pytest.raises(AuthError):
        hash_api_key(bad)


@pytest.mark.parametrize("stored", ["", "ab", "é" * 64, None, b"0" * 64, "G" * 64], ids=repr)
def test_malformed_stored_hash_does_not_match(stored: object) -> None:
    token, real = new_api_key()
    assert api_key_matches(token, stored) is False
    assert api_key_matches(token, real.upper()) is False


def test_signatures_are_recovered_by_libsecp256k1() -> None:
    """eth-keys falls back to pure Python (5 ms a recovery, 44 ms under load) without
    coincurve; the service's throughput depends on it being there."""
    from eth_keys.backends import get_backend
    from eth_keys.backends.coincurve import CoinCurveECCBackend

    assert isinstance(get_backend(), CoinCurveECCBackend)
