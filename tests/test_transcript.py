"""The hash-chained transcript, its BLS-signed head, export/import and the replay report.

BLS pairings in py-ecc take about 0.3 s each, so the BLS tests share one set of keys and
signatures (module fixtures) and the property tests never touch BLS.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from challenge.transcript import (
    FORMAT,
    ZERO_HASH,
    Event,
    Report,
    SigningKey,
    Transcript,
    TranscriptError,
    aggregate,
    check_bundle,
    event_hash,
    head_message,
    pop_prove,
    pop_verify,
    sign_head,
    verify_head,
)
from refute.errors import RefuteError
from refute.manifest import canonical_json
from refute.merkle import keccak256

T0 = 1_700_000_000.0
KINDS = ["submission", "spot_check", "challenge", "reveal", "answer", "proof", "verdict"]


def make_transcript(n: int = 6) -> Transcript:
    """A transcript of ``n`` events with varied kinds, times and bodies."""
    t = Transcript()
    for i in range(n):
        t.append(
            KINDS[i % len(KINDS)],
            T0 + i * 1.5,
            {"i": i, "note": f"step {i} ✓", "x": [i, 0.25, None, True], "m": {"k": -i}},
        )
    return t


def rehash_from(doc: dict[str, Any], start: int) -> None:
    """What a forger does: recompute hashes and links from ``start`` on, and the head/length."""
    events = doc["events"]
    for i in range(start, len(events)):
        ev = events[i]
        if i > 0:
            ev["prev"] = events[i - 1]["hash"]
        ev["hash"] = event_hash(ev["seq"], ev["kind"], ev["at"], ev["body"], ev["prev"])
    doc["head"] = events[-1]["hash"] if events else ZERO_HASH
    doc["length"] = len(events)


def load_error(doc: Any) -> TranscriptError:
    with pytest.raises(TranscriptError) as info:
        Transcript.from_json(doc)
    return info.value


# --- hashing and appending ---------------------------------------------------------------------


def test_keccak_is_ethereum_keccak_not_sha3() -> None:
    assert keccak256(b"").hex() == (
        "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    )


def test_event_hash_preimage_is_pinned() -> None:
    t = Transcript()
    ev = t.append("submission", 1_700_000_000.5, {"b": "é", "a": 1})
    expected = (
        b"refute.transcript/1\x00"
        + b'{"at":1700000000.5,"body":{"a":1,"b":"\xc3\xa9"},"kind":"submission",'
        + b'"prev":"0x'
        + b"0" * 64
        + b'","seq":0}'
    )
    assert ev.preimage() == expected
    assert ev.hash == "0x" + keccak256(expected).hex()
    assert t.head == ev.hash
    # an integer time is hashed as the float it stands for
    assert event_hash(0, "submission", 5, {}, ZERO_HASH) == event_hash(
        0, "submission", 5.0, {}, ZERO_HASH
    )


def test_append_links_events_and_verifies() -> None:
    t = Transcript()
    assert t.head == ZERO_HASH and len(t) == 0
    t.verify_chain()
    evs = [t.append(k, T0 + i, {"i": i}) for i, k in enumerate(["submission", "bond", "bond"])]
    assert [e.seq for e in t.events] == [0, 1, 2]
    assert evs[0].prev == ZERO_HASH
    assert evs[1].prev == evs[0].hash and evs[2].prev == evs[1].hash
    assert t.head == evs[2].hash
    assert all(e.hash == e.compute_hash() for e in t.events)
    assert len({e.hash for e in t.events}) == 3
    t.verify_chain()
    # equal times are allowed (non-decreasing)
    t.append("timeout", T0 + 2, {})
    t.verify_chain()


def test_error_is_a_refute_error() -> None:
    with pytest.raises(RefuteError) as info:
        Transcript().append("BAD", T0, {})
    assert info.value.code == "transcript_error"
    assert isinstance(info.value, TranscriptError) and info.value.check == "kind"


@pytest.mark.parametrize("kind", ["", "Submission", "a" * 33, "spot-check", "x1", "verdict\n"])
def test_append_refuses_bad_kind(kind: str) -> None:
    with pytest.raises(TranscriptError, match="kind"):
        Transcript().append(kind, T0, {})
    Transcript().append("a" * 32, T0, {})


@pytest.mark.parametrize("at", [math.nan, math.inf, -1.0, True, "1700000000", None, 10**400])
def test_append_refuses_bad_time(at: Any) -> None:
    with pytest.raises(TranscriptError) as info:
        Transcript().append("submission", at, {})
    assert info.value.check == "at" and info.value.seq == 0


def test_append_refuses_time_going_backwards() -> None:
    t = make_transcript(2)
    with pytest.raises(TranscriptError) as info:
        t.append("verdict", T0, {})
    assert info.value.check == "time" and info.value.seq == 2
    assert len(t) == 2


@pytest.mark.parametrize(
    "body",
    [
        [],
        "text",
        None,
        {"x": math.nan},
        {"x": [1, -math.inf]},
        {"x": {"y": math.inf}},
        {1: "non-string key"},
        {"x": b"bytes"},
        {"x": (1, 2)},
        {"x": {1, 2}},
        {"x": "\ud800"},
        {"x": 2**256},
        {"x": object()},
    ],
)
def test_append_refuses_non_json_body(body: Any) -> None:
    with pytest.raises(TranscriptError) as info:
        Transcript().append("submission", T0, body)
    assert info.value.check == "body" and info.value.seq == 0


def test_append_refuses_deep_or_huge_body() -> None:
    deep: Any = 0
    for _ in range(100):
        deep = [deep]
    with pytest.raises(TranscriptError, match="deeper"):
        Transcript().append("submission", T0, {"d": deep})
    with pytest.raises(TranscriptError, match="bytes"):
        Transcript().append("submission", T0, {"d": "x" * (1 << 20)})


def test_body_is_copied_and_in_place_edits_are_caught() -> None:
    body: dict[str, Any] = {"list": [1, 2]}
    t = Transcript()
    t.append("submission", T0, body)
    t.append("challenge", T0 + 1, {"n": 1})
    body["list"].append(3)
    t.verify_chain()
    assert t.events[0].body == {"list": [1, 2]}
    # the dataclass is frozen but its body dict is not: an in-place edit breaks the hash
    t.events[0].body["list"] = [9]
    with pytest.raises(TranscriptError) as info:
        t.verify_chain()
    assert info.value.seq == 0 and info.value.check == "hash"


# --- tampering, pinpointed -----------------------------------------------------------------------


def test_untampered_bundle_loads() -> None:
    t = make_transcript()
    loaded = Transcript.from_json(t.to_json())
    assert loaded.events == t.events and loaded.head == t.head


def _edit_body(d: dict[str, Any]) -> None:
    d["events"][2]["body"]["i"] = 99


def _edit_body_rehash_one(d: dict[str, Any]) -> None:
    _edit_body(d)
    ev = d["events"][2]
    ev["hash"] = event_hash(ev["seq"], ev["kind"], ev["at"], ev["body"], ev["prev"])


def _reorder(d: dict[str, Any]) -> None:
    ev = d["events"]
    ev[2], ev[3] = ev[3], ev[2]


def _reorder_renumbered(d: dict[str, Any]) -> None:
    _reorder(d)
    d["events"][2]["seq"], d["events"][3]["seq"] = 2, 3


def _delete(d: dict[str, Any]) -> None:
    del d["events"][2]


def _delete_renumbered_rehashed(d: dict[str, Any]) -> None:
    del d["events"][2]
    for i, ev in enumerate(d["events"]):
        ev["seq"] = i
    # a careful forger re-links event 2 (formerly 3) but cannot fix what it links to
    ev = d["events"][2]
    ev["hash"] = event_hash(ev["seq"], ev["kind"], ev["at"], ev["body"], ev["prev"])


def _insert_linked(d: dict[str, Any]) -> None:
    events = d["events"]
    prev = events[1]["hash"]
    forged = {"seq": 2, "kind": "answer", "at": events[1]["at"], "body": {}, "prev": prev}
    forged["hash"] = event_hash(2, "answer", forged["at"], {}, prev)
    events.insert(2, forged)


def _insert_unlinked(d: dict[str, Any]) -> None:
    forged = copy.deepcopy(d["events"][2])
    forged["body"] = {"forged": True}
    forged["prev"] = "0x" + "11" * 32
    d["events"].insert(2, forged)


def _time_backwards(d: dict[str, Any]) -> None:
    d["events"][3]["at"] = T0 - 10


def _time_backwards_rehashed(d: dict[str, Any]) -> None:
    _time_backwards(d)
    rehash_from(d, 3)


def _change_prev(d: dict[str, Any]) -> None:
    d["events"][2]["prev"] = d["events"][0]["hash"]


def _change_first_prev(d: dict[str, Any]) -> None:
    d["events"][0]["prev"] = "0x" + "00" * 31 + "01"


def _change_hash(d: dict[str, Any]) -> None:
    d["events"][2]["hash"] = "0x" + "ab" * 32


def _change_seq(d: dict[str, Any]) -> None:
    d["events"][4]["seq"] = 7


def _truncate(d: dict[str, Any]) -> None:
    del d["events"][3:]


def _truncate_fix_length(d: dict[str, Any]) -> None:
    del d["events"][3:]
    d["length"] = 3


def _change_kind(d: dict[str, Any]) -> None:
    d["events"][1]["kind"] = "verdict"


def _bad_kind(d: dict[str, Any]) -> None:
    d["events"][1]["kind"] = "VERDICT"


def _nan_in_body(d: dict[str, Any]) -> None:
    d["events"][2]["body"]["x"] = math.nan


def _extra_field(d: dict[str, Any]) -> None:
    d["events"][2]["extra"] = 1


def _missing_field(d: dict[str, Any]) -> None:
    del d["events"][2]["at"]


def _not_an_object(d: dict[str, Any]) -> None:
    d["events"][2] = ["seq", 2]


def _uppercase_hex(d: dict[str, Any]) -> None:
    d["events"][2]["prev"] = d["events"][2]["prev"].upper().replace("0X", "0x")


TAMPERINGS: list[tuple[Callable[[dict[str, Any]], None], int | None, str]] = [
    (_edit_body, 2, "hash"),
    (_edit_body_rehash_one, 3, "prev"),
    (_reorder, 2, "seq"),
    (_reorder_renumbered, 2, "prev"),
    (_delete, 2, "seq"),
    (_delete_renumbered_rehashed, 2, "prev"),
    (_insert_linked, 3, "seq"),
    (_insert_unlinked, 2, "prev"),
    (_time_backwards, 3, "time"),
    (_time_backwards_rehashed, 3, "time"),
    (_change_prev, 2, "prev"),
    (_change_first_prev, 0, "prev"),
    (_change_hash, 2, "hash"),
    (_change_seq, 4, "seq"),
    (_truncate, 3, "length"),
    (_truncate_fix_length, 2, "head"),
    (_change_kind, 1, "hash"),
    (_bad_kind, 1, "kind"),
    (_nan_in_body, 2, "body"),
    (_extra_field, 2, "event"),
    (_missing_field, 2, "event"),
    (_not_an_object, 2, "event"),
    (_uppercase_hex, 2, "prev"),
]


@pytest.mark.parametrize(
    ("tamper", "seq", "check"), TAMPERINGS, ids=[f.__name__.strip("_") for f, _, _ in TAMPERINGS]
)
def test_tampering_is_pinpointed(
    tamper: Callable[[dict[str, Any]], None], seq: int | None, check: str
) -> None:
    doc = make_transcript(6).to_json()
    tamper(doc)
    err = load_error(doc)
    assert (err.seq, err.check) == (seq, check), err.reason
    assert f"event {seq}" in err.reason or err.check in ("length", "head")


def test_truncate_with_forged_head_and_length_loads_but_is_shorter() -> None:
    """A truncated prefix is itself a valid chain: only the signed head/length catch it."""
    t = make_transcript(6)
    doc = t.to_json()
    del doc["events"][3:]
    rehash_from(doc, 3)
    loaded = Transcript.from_json(doc)
    assert len(loaded) == 3 and loaded.head != t.head


def test_in_memory_verify_chain_names_first_broken_seq() -> None:
    t = make_transcript(5)
    t.events[3].body["i"] = -1
    t.events[1].body["i"] = -1
    with pytest.raises(TranscriptError) as info:
        t.verify_chain()
    assert info.value.seq == 1 and info.value.check == "hash"


@pytest.mark.parametrize(
    "doc",
    [
        {"events": [], "head": ZERO_HASH, "length": 0},
        {"format": "refute.transcript/2", "events": [], "head": ZERO_HASH, "length": 0},
    ],
)
def test_from_json_refuses_wrong_format(doc: dict[str, Any]) -> None:
    assert load_error(doc).check == "format"


def test_from_json_refuses_non_objects() -> None:
    bad: Any
    for bad in ([1, 2], "not json", b"[]", 5):
        with pytest.raises(TranscriptError):
            Transcript.from_json(bad)


# --- JSON round trip -----------------------------------------------------------------------------


def test_json_round_trip_through_text() -> None:
    t = make_transcript(7)
    t.append("verdict", T0 + 100.125, {"f": 0.1, "neg": -0.0, "big": 2**200, "u": "日本"})
    text = json.dumps(t.to_json())
    loaded = Transcript.from_json(text)
    assert loaded.events == t.events
    assert loaded.head == t.head and len(loaded) == len(t)
    assert loaded.to_json() == t.to_json()
    assert canonical_json(loaded.to_json()) == canonical_json(t.to_json())
    # bytes input works too, and the loaded transcript keeps growing on the same chain
    again = Transcript.from_json(text.encode())
    again.append("bond", T0 + 200, {})
    again.verify_chain()
    assert again.events[-1].prev == t.head


def test_empty_round_trip() -> None:
    doc = Transcript().to_json()
    assert doc == {
        "format": FORMAT,
        "events": [],
        "head": ZERO_HASH,
        "length": 0,
        "signatures": [],
        "aggregate_signature": None,
    }
    assert len(Transcript.from_json(doc)) == 0


def test_from_json_does_not_alias_input() -> None:
    doc = make_transcript(3).to_json()
    loaded = Transcript.from_json(doc)
    doc["events"][0]["body"]["i"] = 42
    loaded.verify_chain()


# --- BLS keys, signatures, aggregation ----------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> list[SigningKey]:
    return [SigningKey.generate(bytes([i + 1]) * 32) for i in range(4)]


@pytest.fixture(scope="module")
def signed() -> tuple[Transcript, list[bytes]]:
    """A transcript and the signatures of the first three keys over its head."""
    t = make_transcript(5)
    ks = [SigningKey.generate(bytes([i + 1]) * 32) for i in range(3)]
    return t, [sign_head(t, k) for k in ks]


def test_signing_key_generation(keys: list[SigningKey]) -> None:
    assert all(len(k.public_key) == 48 for k in keys)
    assert len({k.public_key for k in keys}) == 4
    assert SigningKey.generate(bytes([1]) * 32).public_key == keys[0].public_key
    assert "public_key=0x" in repr(keys[0])
    with pytest.raises(TranscriptError, match="32 bytes"):
        SigningKey.generate(b"short seed")
    with pytest.raises(TranscriptError):
        SigningKey(0)


def test_head_message_is_pinned() -> None:
    head = "0x" + "ab" * 32
    assert head_message(head, 3) == b"refute.head/1" + b"\xab" * 32 + b"\x00" * 7 + b"\x03"
    assert head_message(bytes.fromhex("ab" * 32), 3) == head_message(head, 3)
    with pytest.raises(TranscriptError):
        head_message(head, -1)
    with pytest.raises(TranscriptError):
        head_message("0x1234", 1)


def test_three_signers_aggregate_verifies(
    keys: list[SigningKey], signed: tuple[Transcript, list[bytes]]
) -> None:
    t, sigs = signed
    assert all(len(s) == 96 for s in sigs)
    agg = aggregate(sigs)
    assert len(agg) == 96 and agg == aggregate(list(reversed(sigs)))
    pks = [k.public_key for k in keys[:3]]
    assert verify_head(t.head, len(t), pks, agg)


def test_wrong_key_set_fails(
    keys: list[SigningKey], signed: tuple[Transcript, list[bytes]]
) -> None:
    t, sigs = signed
    agg = aggregate(sigs)
    assert not verify_head(t.head, len(t), [k.public_key for k in keys[1:4]], agg)


def test_wrong_length_fails(keys: list[SigningKey], signed: tuple[Transcript, list[bytes]]) -> None:
    t, sigs = signed
    assert not verify_head(t.head, len(t) - 1, [k.public_key for k in keys[:3]], aggregate(sigs))


def test_tampered_head_fails(
    keys: list[SigningKey], signed: tuple[Transcript, list[bytes]]
) -> None:
    t, sigs = signed
    head = bytearray.fromhex(t.head[2:])
    head[0] ^= 1
    assert not verify_head(bytes(head), len(t), [k.public_key for k in keys[:3]], aggregate(sigs))


def test_verify_head_malformed_inputs_are_false_without_pairing(
    keys: list[SigningKey], signed: tuple[Transcript, list[bytes]]
) -> None:
    t, sigs = signed
    pks = [k.public_key for k in keys[:3]]
    agg = aggregate(sigs)
    assert not verify_head(t.head, len(t), [], agg)
    assert not verify_head(t.head, len(t), [pks[0], pks[0], pks[1]], agg)  # duplicate key
    assert not verify_head(t.head, len(t), pks, agg[:95])
    assert not verify_head(t.head, len(t), [b"\x00" * 48, *pks[1:]], agg)
    assert not verify_head("nothex", len(t), pks, agg)
    assert not verify_head(t.head, -1, pks, agg)
    with pytest.raises(TranscriptError):
        aggregate([])
    with pytest.raises(TranscriptError):
        aggregate([b"\x01" * 96])


def test_proof_of_possession(keys: list[SigningKey]) -> None:
    proof = pop_prove(keys[0])
    assert len(proof) == 96
    assert pop_verify(keys[0].public_key, proof)
    assert not pop_verify(keys[1].public_key, proof)
    assert not pop_verify(keys[0].public_key, b"\x00" * 96)


def test_rogue_key_attack_is_stopped_by_proof_of_possession(keys: list[SigningKey]) -> None:
    """Why PoP matters: without it, one party can forge an 'aggregate' naming an honest key."""
    from eth_typing import BLSPubkey
    from py_ecc.bls.ciphersuites import G2ProofOfPossession
    from py_ecc.bls.g2_primitives import G1_to_pubkey, G2_to_signature, pubkey_to_G1
    from py_ecc.bls.hash_to_curve import hash_to_G2
    from py_ecc.optimized_bls12_381.optimized_curve import G1, add, multiply, neg

    bls = G2ProofOfPossession
    honest = keys[0].public_key
    x = 123456789  # the attacker's secret
    # the rogue key is x*G1 - honest: the attacker knows no secret key for it
    rogue = bytes(G1_to_pubkey(add(multiply(G1, x), neg(pubkey_to_G1(BLSPubkey(honest))))))
    t = make_transcript(2)
    sha = bls.xmd_hash_function  # py-ecc annotates it as a hash object, it is the constructor
    point = hash_to_G2(head_message(t.head, len(t)), bls.DST, sha)  # type: ignore[arg-type]
    forged = bytes(G2_to_signature(multiply(point, x)))
    # the honest node never signed, yet "honest + rogue" verifies: the keys sum to x*G1
    assert verify_head(t.head, len(t), [honest, rogue], forged)
    # but the attacker cannot prove possession of the rogue key: its best try, signing the key
    # with x under the PoP tag, fails because x is not the rogue key's secret
    pop_point = hash_to_G2(rogue, bls.POP_TAG, sha)  # type: ignore[arg-type]
    attempt = G2_to_signature(multiply(pop_point, x))
    assert not pop_verify(rogue, bytes(attempt))


def test_signatures_attach_export_and_clear_on_append(
    keys: list[SigningKey], signed: tuple[Transcript, list[bytes]]
) -> None:
    base, sigs = signed
    t = Transcript.from_json(base.to_json())
    for k, s in zip(keys[:3], sigs, strict=True):
        t.attach_signature(k.public_key, s)
    with pytest.raises(TranscriptError, match="already signed"):
        t.attach_signature(keys[0].public_key, sigs[0])
    with pytest.raises(TranscriptError):
        t.attach_signature(b"\x00" * 48, sigs[0])
    with pytest.raises(TranscriptError):
        t.attach_signature(keys[3].public_key, b"\x00" * 96)
    doc = t.to_json()
    assert doc["aggregate_signature"] == "0x" + aggregate(sigs).hex()
    assert [s["public_key"] for s in doc["signatures"]] == [
        "0x" + k.public_key.hex() for k in keys[:3]
    ]
    loaded = Transcript.from_json(json.dumps(doc))
    assert loaded.signatures == t.signatures
    bad = copy.deepcopy(doc)
    bad["aggregate_signature"] = doc["signatures"][0]["signature"]
    assert load_error(bad).check == "signature"
    t.append("verdict", T0 + 100, {"ok": True})
    assert t.signatures == () and t.to_json()["aggregate_signature"] is None


# --- check_bundle ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(keys: list[SigningKey], signed: tuple[Transcript, list[bytes]]) -> dict[str, Any]:
    base, sigs = signed
    t = Transcript.from_json(base.to_json())
    for k, s in zip(keys[:3], sigs, strict=True):
        t.attach_signature(k.public_key, s)
    return t.to_json()


def _trusted(keys: list[SigningKey]) -> list[bytes]:
    return [k.public_key for k in keys[:3]]


def test_check_bundle_good(keys: list[SigningKey], bundle: dict[str, Any]) -> None:
    report = check_bundle(bundle, _trusted(keys))
    assert isinstance(report, Report)
    assert report.ok, report.lines()
    assert [c.name for c in report.checks] == [
        "format",
        "chain",
        "length",
        "head",
        "signers",
        "signature",
    ]
    assert all(line.startswith("PASS") for line in report.lines())
    assert report.to_json()["ok"] is True
    assert report.check("chain").detail == "5 events linked"


def test_check_bundle_edited_body(keys: list[SigningKey], bundle: dict[str, Any]) -> None:
    doc = copy.deepcopy(bundle)
    doc["events"][2]["body"]["i"] = 1000
    report = check_bundle(json.dumps(doc), _trusted(keys))
    assert not report.ok
    assert [(c.name, c.seq) for c in report.failures] == [("chain", 2)]
    assert "hash" in report.check("chain").detail
    assert any(line.startswith("FAIL chain") and "seq 2:" in line for line in report.lines())


def test_check_bundle_consistent_forgery_fails_on_signature(
    keys: list[SigningKey], bundle: dict[str, Any]
) -> None:
    """Edit event 1 and recompute every hash and the head: only the signatures catch it."""
    doc = copy.deepcopy(bundle)
    doc["events"][1]["body"]["i"] = 1000
    rehash_from(doc, 1)
    report = check_bundle(doc, _trusted(keys))
    failed = [c.name for c in report.failures]
    assert failed[0] == "signature"
    assert len(failed) == 4 and all(n.startswith("signer 0x") for n in failed[1:])
    assert report.check("chain").ok and report.check("head").ok


def test_check_bundle_truncated(keys: list[SigningKey], bundle: dict[str, Any]) -> None:
    doc = copy.deepcopy(bundle)
    del doc["events"][3:]
    report = check_bundle(doc, _trusted(keys))
    assert report.check("chain").ok
    assert (report.check("length").ok, report.check("length").seq) == (False, 3)
    assert (report.check("head").ok, report.check("head").seq) == (False, 2)


def test_check_bundle_untrusted_or_missing_signer(
    keys: list[SigningKey], bundle: dict[str, Any]
) -> None:
    report = check_bundle(bundle, [k.public_key for k in keys[1:4]])
    assert [c.name for c in report.failures] == ["signers", "signature"]
    assert "not a trusted key" in report.check("signers").detail
    doc = copy.deepcopy(bundle)
    doc["signatures"] = []
    doc["aggregate_signature"] = None
    assert [c.name for c in check_bundle(doc, _trusted(keys)).failures] == [
        "signers",
        "signature",
    ]


def test_check_bundle_quorum(
    keys: list[SigningKey], signed: tuple[Transcript, list[bytes]]
) -> None:
    base, sigs = signed
    t = Transcript.from_json(base.to_json())
    t.attach_signature(keys[0].public_key, sigs[0])
    t.attach_signature(keys[2].public_key, sigs[2])
    doc = t.to_json()
    two_of_three = check_bundle(doc, _trusted(keys), quorum=2)
    assert two_of_three.ok, two_of_three.lines()
    strict = check_bundle(doc, _trusted(keys))
    assert [c.name for c in strict.failures] == ["signers"]
    assert "2 of 3" in strict.check("signers").detail
    with pytest.raises(TranscriptError):
        check_bundle(doc, _trusted(keys), quorum=4)


def test_check_bundle_never_raises_on_garbage(keys: list[SigningKey]) -> None:
    garbage: list[dict[str, Any]] = [
        {},
        {"events": 5, "length": "x", "head": 3, "signatures": {"a": 1}},
        {"format": FORMAT, "events": [1, None, {"seq": "x"}], "length": 3, "head": ZERO_HASH},
        {"format": FORMAT, "events": [], "length": 0, "head": ZERO_HASH, "signatures": [5]},
        {
            "format": FORMAT,
            "events": [],
            "length": -2,
            "head": ZERO_HASH,
            "signatures": [{"public_key": "0x" + keys[0].public_key.hex(), "signature": "0x"}],
            "aggregate_signature": 7,
        },
    ]
    for doc in garbage:
        report = check_bundle(doc, _trusted(keys))
        assert not report.ok and report.failures
    with pytest.raises(TranscriptError):
        check_bundle([1], _trusted(keys))  # type: ignore[arg-type]
    with pytest.raises(TranscriptError):
        check_bundle("{not json", _trusted(keys))
    with pytest.raises(TranscriptError):
        check_bundle({}, [])


# --- properties (no BLS inside) -------------------------------------------------------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
_json = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_bodies = st.dictionaries(st.text(max_size=5), _json, max_size=4)
_kinds = st.from_regex(r"[a-z_]{1,32}", fullmatch=True)
_steps = st.lists(
    st.tuples(_kinds, st.floats(min_value=0, max_value=1e4, allow_nan=False), _bodies),
    min_size=1,
    max_size=6,
)
_hashes = st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())
_FIELDS = ["seq", "kind", "at", "body", "prev", "hash"]
#: Which checks may fire when a field is replaced (same-type or wrong-type values).
_ALLOWED = {
    "seq": {"seq", "event"},
    "kind": {"kind", "hash"},
    "at": {"at", "time", "hash"},
    "body": {"body", "hash"},
    "prev": {"prev"},
    "hash": {"hash"},
}


def _build(steps: list[tuple[str, float, dict[str, Any]]]) -> Transcript:
    t = Transcript()
    at = T0
    for kind, delta, body in steps:
        at += delta
        t.append(kind, at, body)
    return t


def _same_value(field: str, old: Any, new: Any) -> bool:
    """Whether ``new`` means the same as ``old`` (so replacing it is no mutation)."""
    if field == "at":
        return type(new) in (int, float) and float(new) == old
    if type(old) is not type(new):
        return False
    try:
        return canonical_json(old) == canonical_json(new)
    except (TypeError, ValueError):
        return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_steps, data=st.data())
def test_any_single_field_mutation_is_detected_at_its_seq(
    steps: list[tuple[str, float, dict[str, Any]]], data: st.DataObject
) -> None:
    t = _build(steps)
    doc = t.to_json()
    Transcript.from_json(doc)  # the untouched bundle loads
    index = data.draw(st.integers(0, len(steps) - 1), label="index")
    field = data.draw(st.sampled_from(_FIELDS), label="field")
    same_type = {
        "seq": st.integers(-3, 50),
        "kind": _kinds | st.text(max_size=40),
        "at": st.floats(min_value=0, max_value=2 * T0) | st.integers(0, 2 * int(T0)),
        "body": _bodies,
        "prev": _hashes,
        "hash": _hashes,
    }[field]
    old = doc["events"][index][field]
    new = data.draw(
        (same_type | _json).filter(lambda v: not _same_value(field, old, v)), label="new"
    )
    doc["events"][index][field] = new
    with pytest.raises(TranscriptError) as info:
        Transcript.from_json(doc)
    assert info.value.seq == index, info.value.reason
    assert info.value.check in _ALLOWED[field], info.value.reason


# A fixed valid G1 public key (the generator), so the property needs no key generation.
_PK_HEX = (
    "97f1d3a73197d7942695638c4fa9ac0fc3688c4f9774b905a14e3a3f171bac586c55e83ff97a1aeffb3af00adb22c6bb"
)


@settings(max_examples=60, deadline=None)
@given(steps=_steps, key=st.sampled_from(["format", "events", "length", "head", "signatures",
                                           "aggregate_signature"]), value=_json)
def test_check_bundle_reports_instead_of_raising(
    steps: list[tuple[str, float, dict[str, Any]]], key: str, value: Any
) -> None:
    doc = _build(steps).to_json()
    doc[key] = value
    trusted = [bytes.fromhex(_PK_HEX)]
    report = check_bundle(doc, trusted)
    assert not report.ok  # no signatures, at least
    assert report.failures and len(report.lines()) == len(report.checks)


def test_event_dataclass_is_frozen() -> None:
    ev = make_transcript(1).events[0]
    assert isinstance(ev, Event)
    with pytest.raises(AttributeError):
        ev.seq = 5  # type: ignore[misc]
