"""The bonds ledger: operations, refusals, verdict amounts, invariants, replay, state machine."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from challenge.ledger import (
    BPS_DENOMINATOR,
    LEDGER_FORMAT,
    MAX_AMOUNT,
    AccountType,
    DisputeStatus,
    DisputeVerdict,
    EntryKind,
    JournalEntry,
    Ledger,
    LedgerError,
    Posting,
    StakeStatus,
    available_account,
    bond_account,
    external_account,
    parse_account,
    stake_account,
    treasury_account,
)
from refute.errors import RefuteError

NET = "net1"
TREASURY = treasury_account(NET)

PROVIDER_VERDICTS = [DisputeVerdict.PROVIDER_FAULT, DisputeVerdict.PROVIDER_TIMEOUT]
CHALLENGER_VERDICTS = [DisputeVerdict.CHALLENGER_FAULT, DisputeVerdict.CHALLENGER_TIMEOUT]


def _state(ledger: Ledger) -> tuple[object, ...]:
    """Everything observable about a ledger, to show a refusal changed nothing."""
    return (
        ledger.entries(),
        ledger.balances(),
        json.dumps(ledger.to_json(), sort_keys=True),
        dict(ledger._stakes),
        dict(ledger._disputes),
        {k: list(v) for k, v in ledger._disputes_by_result.items()},
    )


@contextmanager
def refused(ledger: Ledger, match: str) -> Iterator[None]:
    """Expect a LedgerError matching ``match`` and no change at all to ``ledger``."""
    before = _state(ledger)
    with pytest.raises(LedgerError, match=match) as info:
        yield
    assert info.value.code == "ledger_error"
    assert _state(ledger) == before
    ledger.check()


def _avail(ledger: Ledger, party: str) -> int:
    return ledger.balance(available_account(party))


def _staked(
    stake: int = 1000, bond: int = 100, *, p_funds: int = 5000, c_funds: int = 500
) -> Ledger:
    """Provider p staked ``stake`` on r1 (of ``p_funds``); challenger c bonded ``bond``."""
    ledger = Ledger()
    ledger.deposit("p", p_funds)
    ledger.deposit("c", c_funds)
    ledger.lock_stake("r1", "p", stake)
    ledger.post_bond("d1", "c", bond, result_id="r1")
    return ledger


def _settle(
    ledger: Ledger, dispute: str, verdict: DisputeVerdict | str, c_bps: int = 0, p_bps: int = 0
) -> JournalEntry:
    return ledger.settle(
        dispute, verdict, network_id=NET, challenger_share_bps=c_bps, provider_share_bps=p_bps
    )


# --- errors and account names ------------------------------------------------------------


def test_ledger_error_is_a_refute_error() -> None:
    err = LedgerError("nope")
    assert isinstance(err, RefuteError)
    assert err.code == "ledger_error"
    assert err.reason == str(err) == "nope"


def test_account_names_round_trip() -> None:
    assert external_account("alice") == "external:alice"
    assert available_account("alice") == "available:alice"
    assert stake_account("r-1", "0xAb") == "stake:r-1:0xAb"
    assert bond_account("d.1", "bob") == "bond:d.1:bob"
    assert treasury_account("net_1") == "treasury:net_1"
    assert parse_account("stake:r-1:0xAb") == (AccountType.STAKE, ("r-1", "0xAb"))
    assert parse_account("treasury:n") == (AccountType.TREASURY, ("n",))


@pytest.mark.parametrize(
    "name",
    ["", "alice", "cash:alice", "available:", "available:a:b", "stake:r1", "stake:r1:p:x",
     "available:a b", "treasury:" + "x" * 129, "bond:d1:"],
)  # fmt: skip
def test_malformed_account_names_are_refused(name: str) -> None:
    with pytest.raises(LedgerError, match=r"invalid"):
        parse_account(name)
    with pytest.raises(LedgerError):
        Ledger().balance(name)


@pytest.mark.parametrize("party", ["", "a:b", "a b", "é", "x" * 129, "a\n"])
def test_bad_identifiers_are_refused(party: str) -> None:
    ledger = Ledger()
    ledger.deposit("ok", 10)
    with refused(ledger, "invalid party"):
        ledger.deposit(party, 10)


# --- deposits and withdrawals ---------------------------------------------------------------


def test_deposit_and_withdraw() -> None:
    ledger = Ledger()
    entry = ledger.deposit("alice", 250)
    assert entry == JournalEntry(
        seq=0,
        kind=EntryKind.DEPOSIT,
        reference="alice",
        postings=(Posting("external:alice", -250), Posting("available:alice", 250)),
        memo="deposit of 250 by alice",
        params=(("amount", 250), ("party", "alice")),
    )
    out = ledger.withdraw("alice", 200)
    assert out.kind is EntryKind.WITHDRAWAL
    assert out.postings == (Posting("available:alice", -200), Posting("external:alice", 200))
    assert ledger.balances() == {"available:alice": 50, "external:alice": -50}
    assert ledger.balance("available:nobody") == 0
    assert [e.seq for e in ledger.entries()] == [0, 1]
    ledger.withdraw("alice", 50)
    assert ledger.balances() == {"available:alice": 0, "external:alice": 0}
    ledger.check()


@pytest.mark.parametrize("amount", [0, -1, 1.0, 10.5, True, "10", None, MAX_AMOUNT + 1])
def test_bad_amounts_are_refused(amount: Any) -> None:
    ledger = Ledger()
    ledger.deposit("alice", 100)
    with refused(ledger, "amount"):
        ledger.deposit("alice", amount)
    with refused(ledger, "amount"):
        ledger.withdraw("alice", amount)


def test_withdraw_cannot_exceed_available() -> None:
    ledger = Ledger()
    ledger.deposit("alice", 100)
    with refused(ledger, "only 100 available"):
        ledger.withdraw("alice", 101)
    with refused(ledger, "only 0 available"):
        ledger.withdraw("bob", 1)
    ledger.lock_stake("r1", "alice", 60)
    with refused(ledger, "only 40 available"):
        ledger.withdraw("alice", 41)


def test_max_amount_is_accepted() -> None:
    ledger = Ledger()
    ledger.deposit("whale", MAX_AMOUNT)
    ledger.lock_stake("r1", "whale", MAX_AMOUNT)
    assert ledger.balance(stake_account("r1", "whale")) == MAX_AMOUNT
    ledger.check()


# --- stakes -------------------------------------------------------------------------------


def test_lock_stake_moves_available_to_stake() -> None:
    ledger = Ledger()
    ledger.deposit("p", 1000)
    entry = ledger.lock_stake("r1", "p", 700)
    assert entry.kind is EntryKind.STAKE_LOCKED
    assert entry.reference == "r1"
    assert entry.postings == (Posting("available:p", -700), Posting("stake:r1:p", 700))
    assert _avail(ledger, "p") == 300
    record = ledger.stake("r1")
    assert record is not None
    assert (record.provider, record.amount, record.status) == ("p", 700, StakeStatus.LOCKED)
    ledger.check()


def test_lock_stake_refusals() -> None:
    ledger = Ledger()
    ledger.deposit("p", 1000)
    with refused(ledger, "only 1000 available"):
        ledger.lock_stake("r1", "p", 1001)
    with refused(ledger, "stake must be positive"):
        ledger.lock_stake("r1", "p", 0)
    with refused(ledger, "invalid result id"):
        ledger.lock_stake("r:1", "p", 10)
    with refused(ledger, "invalid provider"):
        ledger.lock_stake("r1", "", 10)


def test_lock_stake_is_idempotent_per_result() -> None:
    ledger = Ledger()
    ledger.deposit("p", 1000)
    ledger.deposit("q", 1000)
    first = ledger.lock_stake("r1", "p", 400)
    before = _state(ledger)
    assert ledger.lock_stake("r1", "p", 400) is first
    assert _state(ledger) == before
    with refused(ledger, "already staked"):
        ledger.lock_stake("r1", "p", 401)
    with refused(ledger, "already staked"):
        ledger.lock_stake("r1", "q", 400)
    # Still a no-op once the stake is released: a result is staked once, ever.
    ledger.release_stake("r1")
    before = _state(ledger)
    assert ledger.lock_stake("r1", "p", 400) is first
    assert _state(ledger) == before


# --- bonds --------------------------------------------------------------------------------


def test_post_bond_moves_available_to_bond() -> None:
    ledger = _staked(bond=120)
    (entry,) = [e for e in ledger.entries() if e.kind is EntryKind.BOND_POSTED]
    assert entry.reference == "d1"
    assert entry.postings == (Posting("available:c", -120), Posting("bond:d1:c", 120))
    assert dict(entry.params) == {
        "dispute_id": "d1",
        "challenger": "c",
        "amount": 120,
        "result_id": "r1",
    }
    assert _avail(ledger, "c") == 380
    record = ledger.dispute("d1")
    assert record is not None
    assert (record.result_id, record.status, record.verdict) == ("r1", DisputeStatus.OPEN, None)
    assert ledger.open_disputes("r1") == ("d1",)
    ledger.check()


def test_post_bond_refusals() -> None:
    ledger = _staked()
    with refused(ledger, "only 400 available"):
        ledger.post_bond("d2", "c", 401, result_id="r1")
    with refused(ledger, "has no stake"):
        ledger.post_bond("d2", "c", 10, result_id="r9")
    with refused(ledger, "cannot challenge"):
        ledger.post_bond("d2", "p", 10, result_id="r1")
    with refused(ledger, "bond must be positive"):
        ledger.post_bond("d2", "c", -5, result_id="r1")
    with refused(ledger, "invalid result id"):
        ledger.post_bond("d2", "c", 5, result_id="")


def test_post_bond_is_idempotent_per_dispute() -> None:
    ledger = _staked()
    ledger.deposit("e", 100)
    ledger.deposit("p", 100)
    ledger.lock_stake("r2", "p", 100)
    first = ledger.entries()[3]
    before = _state(ledger)
    assert ledger.post_bond("d1", "c", 100, result_id="r1") is first
    assert _state(ledger) == before
    for args in [("c", 99, "r1"), ("e", 100, "r1"), ("c", 100, "r2")]:
        with refused(ledger, "already exists"):
            ledger.post_bond("d1", args[0], args[1], result_id=args[2])
    # Idempotent even once settled.
    _settle(ledger, "d1", DisputeVerdict.ABORTED)
    before = _state(ledger)
    assert ledger.post_bond("d1", "c", 100, result_id="r1") is first
    assert _state(ledger) == before


def test_post_bond_refused_on_released_result() -> None:
    ledger = Ledger()
    ledger.deposit("p", 100)
    ledger.deposit("c", 100)
    ledger.lock_stake("r1", "p", 100)
    ledger.release_stake("r1")
    with refused(ledger, "is final"):
        ledger.post_bond("d1", "c", 10, result_id="r1")


# --- settlement: provider at fault -----------------------------------------------------------


@pytest.mark.parametrize("verdict", PROVIDER_VERDICTS)
def test_provider_at_fault_slashes_the_stake_with_floor(verdict: DisputeVerdict) -> None:
    ledger = _staked(stake=1001, bond=100)
    # 1001 * 3333 / 10000 = 333.63...: the challenger gets 333, the dust goes to the treasury.
    entry = _settle(ledger, "d1", verdict, c_bps=3333, p_bps=9999)
    assert entry.kind is EntryKind.SETTLEMENT
    assert entry.reference == "d1"
    assert entry.postings == (
        Posting("stake:r1:p", -1001),
        Posting("bond:d1:c", -100),
        Posting("available:c", 100 + 333),
        Posting(TREASURY, 668),
    )
    assert dict(entry.params) == {
        "dispute_id": "d1",
        "verdict": verdict.value,
        "network_id": NET,
        "challenger_share_bps": 3333,
        "provider_share_bps": 9999,
    }
    assert verdict.value in entry.memo
    assert _avail(ledger, "c") == 500 + 333
    assert _avail(ledger, "p") == 5000 - 1001
    assert ledger.balance(TREASURY) == 668
    assert ledger.balance(stake_account("r1", "p")) == 0
    assert ledger.balance(bond_account("d1", "c")) == 0
    stake = ledger.stake("r1")
    dispute = ledger.dispute("d1")
    assert stake is not None and stake.status is StakeStatus.SLASHED
    assert dispute is not None and dispute.status is DisputeStatus.SETTLED
    assert dispute.verdict is verdict
    ledger.check()


@pytest.mark.parametrize(
    ("stake", "bps", "share"),
    [(1, 9999, 0), (9999, 1, 0), (10000, 1, 1), (7, 5000, 3), (123457, 2500, 30864)],
)
def test_provider_share_rounds_down(stake: int, bps: int, share: int) -> None:
    ledger = _staked(stake=stake, bond=10, p_funds=stake)
    _settle(ledger, "d1", DisputeVerdict.PROVIDER_FAULT, c_bps=bps)
    assert _avail(ledger, "c") == 500 + share
    assert ledger.balance(TREASURY) == stake - share
    assert share == stake * bps // BPS_DENOMINATOR


def test_provider_at_fault_extreme_shares_omit_zero_postings() -> None:
    everything = _staked(stake=1000, bond=100)
    entry = _settle(everything, "d1", "PROVIDER_FAULT", c_bps=10000)
    assert entry.postings == (
        Posting("stake:r1:p", -1000),
        Posting("bond:d1:c", -100),
        Posting("available:c", 1100),
    )
    nothing = _staked(stake=1000, bond=100)
    entry = _settle(nothing, "d1", "PROVIDER_FAULT", c_bps=0)
    assert Posting("available:c", 100) in entry.postings
    assert Posting(TREASURY, 1000) in entry.postings
    assert all(p.amount != 0 for p in entry.postings)


# --- settlement: challenger at fault ---------------------------------------------------------


@pytest.mark.parametrize("verdict", CHALLENGER_VERDICTS)
def test_challenger_at_fault_slashes_the_bond_with_floor(verdict: DisputeVerdict) -> None:
    ledger = _staked(stake=1000, bond=999, c_funds=1500)
    # 999 * 5000 / 10000 = 499.5: the provider gets 499, the treasury 500.
    entry = _settle(ledger, "d1", verdict, c_bps=10000, p_bps=5000)
    assert entry.postings == (
        Posting("bond:d1:c", -999),
        Posting("available:p", 499),
        Posting(TREASURY, 500),
    )
    assert _avail(ledger, "p") == 4000 + 499
    assert ledger.balance(TREASURY) == 500
    # The stake stays locked: the result may still be challenged by others.
    assert ledger.balance(stake_account("r1", "p")) == 1000
    stake = ledger.stake("r1")
    assert stake is not None and stake.status is StakeStatus.LOCKED
    ledger.post_bond("d2", "c", 50, result_id="r1")
    ledger.check()


def test_challenger_at_fault_full_share_to_provider() -> None:
    ledger = _staked(stake=1000, bond=100)
    entry = _settle(ledger, "d1", "CHALLENGER_TIMEOUT", p_bps=10000)
    assert entry.postings == (Posting("bond:d1:c", -100), Posting("available:p", 100))
    assert ledger.balance(TREASURY) == 0


# --- settlement: aborted, refusals -----------------------------------------------------------


def test_aborted_returns_the_bond_and_keeps_the_stake() -> None:
    ledger = _staked(stake=1000, bond=100)
    entry = _settle(ledger, "d1", DisputeVerdict.ABORTED, c_bps=5000, p_bps=5000)
    assert entry.postings == (Posting("bond:d1:c", -100), Posting("available:c", 100))
    assert _avail(ledger, "c") == 500
    assert ledger.balance(stake_account("r1", "p")) == 1000
    assert ledger.balance(TREASURY) == 0
    dispute = ledger.dispute("d1")
    assert dispute is not None and dispute.verdict is DisputeVerdict.ABORTED
    ledger.release_stake("r1")
    assert _avail(ledger, "p") == 5000
    ledger.check()


def test_settle_refusals() -> None:
    ledger = _staked()
    with refused(ledger, "unknown verdict"):
        _settle(ledger, "d1", "GUILTY")
    with refused(ledger, "unknown verdict"):
        _settle(ledger, "d1", 1)  # type: ignore[arg-type]
    with refused(ledger, "unknown dispute"):
        _settle(ledger, "d9", "ABORTED")
    with refused(ledger, "invalid dispute id"):
        _settle(ledger, "d 1", "ABORTED")
    with refused(ledger, "invalid network id"):
        ledger.settle("d1", "ABORTED", network_id="", challenger_share_bps=0, provider_share_bps=0)
    for bps in [-1, 10001, True, 1.5]:
        with refused(ledger, "challenger_share_bps"):
            _settle(ledger, "d1", "PROVIDER_FAULT", c_bps=bps)  # type: ignore[arg-type]
        with refused(ledger, "provider_share_bps"):
            _settle(ledger, "d1", "CHALLENGER_FAULT", p_bps=bps)  # type: ignore[arg-type]


@pytest.mark.parametrize("first", list(DisputeVerdict))
def test_settling_twice_is_refused(first: DisputeVerdict) -> None:
    ledger = _staked()
    _settle(ledger, "d1", first, 1000, 1000)
    for again in DisputeVerdict:
        with refused(ledger, "already settled"):
            _settle(ledger, "d1", again, 1000, 1000)


# --- several disputes on one result ----------------------------------------------------------


def _three_disputes() -> Ledger:
    ledger = Ledger()
    ledger.deposit("p", 1000)
    for c in ("a", "b", "c"):
        ledger.deposit(c, 100)
    ledger.lock_stake("r1", "p", 1000)
    ledger.post_bond("d-a", "a", 10, result_id="r1")
    ledger.post_bond("d-b", "b", 20, result_id="r1")
    ledger.post_bond("d-c", "c", 30, result_id="r1")
    return ledger


def test_conviction_closes_the_other_disputes() -> None:
    ledger = _three_disputes()
    with refused(ledger, "not convicted"):
        ledger.close_others("r1")
    _settle(ledger, "d-b", DisputeVerdict.PROVIDER_TIMEOUT, c_bps=2000)
    assert _avail(ledger, "b") == 100 + 200
    assert ledger.balance(TREASURY) == 800
    # The other disputes can no longer be settled, only closed.
    for verdict in DisputeVerdict:
        with refused(ledger, "already convicted"):
            _settle(ledger, "d-a", verdict)
    with refused(ledger, "already convicted"):
        ledger.post_bond("d-d", "a", 5, result_id="r1")
    with refused(ledger, "open dispute|convicted"):
        ledger.release_stake("r1")
    closed = ledger.close_others("r1")
    assert [e.kind for e in closed] == [EntryKind.BOND_RETURNED] * 2
    assert [e.reference for e in closed] == ["d-a", "d-c"]
    assert closed[0].postings == (Posting("bond:d-a:a", -10), Posting("available:a", 10))
    assert closed[1].postings == (Posting("bond:d-c:c", -30), Posting("available:c", 30))
    assert _avail(ledger, "a") == 100
    assert _avail(ledger, "c") == 100
    record = ledger.dispute("d-a")
    assert record is not None and record.status is DisputeStatus.CLOSED
    assert ledger.open_disputes("r1") == ()
    # Nothing left to close: a no-op; settling a closed dispute is refused.
    before = _state(ledger)
    assert ledger.close_others("r1") == ()
    assert _state(ledger) == before
    with refused(ledger, "already closed"):
        _settle(ledger, "d-a", DisputeVerdict.ABORTED)
    with refused(ledger, "slashed"):
        ledger.release_stake("r1")
    ledger.check()


def test_lost_challenges_do_not_stop_a_later_conviction() -> None:
    ledger = _three_disputes()
    _settle(ledger, "d-a", DisputeVerdict.CHALLENGER_FAULT, p_bps=5000)
    _settle(ledger, "d-b", DisputeVerdict.ABORTED)
    _settle(ledger, "d-c", DisputeVerdict.PROVIDER_FAULT, c_bps=1000)
    assert _avail(ledger, "a") == 90
    assert _avail(ledger, "b") == 100
    assert _avail(ledger, "c") == 100 + 100
    assert _avail(ledger, "p") == 5  # half of a's bond
    assert ledger.balance(TREASURY) == 5 + 900
    assert ledger.close_others("r1") == ()
    ledger.check()


def test_close_others_refusals() -> None:
    ledger = _three_disputes()
    with refused(ledger, "unknown result"):
        ledger.close_others("r9")
    with refused(ledger, "invalid result id"):
        ledger.close_others("r:1")
    with refused(ledger, "not convicted"):
        ledger._close_one("d-a")


# --- release ------------------------------------------------------------------------------


def test_release_stake() -> None:
    ledger = _staked(stake=1000, bond=100)
    with refused(ledger, "open dispute"):
        ledger.release_stake("r1")
    _settle(ledger, "d1", DisputeVerdict.CHALLENGER_FAULT, p_bps=1000)
    entry = ledger.release_stake("r1")
    assert entry.kind is EntryKind.STAKE_RELEASED
    assert entry.postings == (Posting("stake:r1:p", -1000), Posting("available:p", 1000))
    assert _avail(ledger, "p") == 5000 + 10
    stake = ledger.stake("r1")
    assert stake is not None and stake.status is StakeStatus.RELEASED
    with refused(ledger, "already released"):
        ledger.release_stake("r1")
    with refused(ledger, "unknown result"):
        ledger.release_stake("r2")
    ledger.check()


# --- check() --------------------------------------------------------------------------------


def _busy() -> Ledger:
    ledger = _three_disputes()
    _settle(ledger, "d-a", DisputeVerdict.CHALLENGER_FAULT, p_bps=3000)
    _settle(ledger, "d-b", DisputeVerdict.PROVIDER_FAULT, c_bps=1234)
    ledger.close_others("r1")
    ledger.deposit("p", 77)
    ledger.lock_stake("r2", "p", 50)
    ledger.withdraw("b", 30)
    return ledger


def _tamper_entry(ledger: Ledger, index: int, **changes: Any) -> None:
    ledger._entries[index] = replace(ledger._entries[index], **changes)


def test_check_passes_on_a_busy_ledger() -> None:
    _busy().check()


def test_check_names_each_broken_invariant() -> None:
    ledger = _busy()
    _tamper_entry(ledger, 0, postings=(Posting("external:p", -1000), Posting("available:p", 999)))
    with pytest.raises(LedgerError, match=r"'entry balances'.*entry 0 sums to -1"):
        ledger.check()

    ledger = _busy()
    _tamper_entry(ledger, 2, seq=7)
    with pytest.raises(LedgerError, match=r"'entry shape'"):
        ledger.check()

    ledger = _busy()
    _tamper_entry(ledger, 0, postings=())
    with pytest.raises(LedgerError, match=r"'entry shape'.*no postings"):
        ledger.check()

    ledger = _busy()
    _tamper_entry(ledger, 0, postings=(Posting("cash:p", -1000), Posting("available:p", 1000)))
    with pytest.raises(LedgerError, match=r"'entry shape'.*unknown type"):
        ledger.check()

    ledger = _busy()
    _tamper_entry(ledger, 0, postings=(*ledger.entries()[0].postings, Posting("x:y", 0)))
    with pytest.raises(LedgerError, match=r"'entry shape'"):
        ledger.check()

    ledger = _busy()
    ledger._balances["available:p"] += 1
    with pytest.raises(LedgerError, match=r"'derived balances'.*available:p"):
        ledger.check()

    ledger = _busy()
    ledger._balances["available:ghost"] = 0
    with pytest.raises(LedgerError, match=r"'derived balances'.*available:ghost"):
        ledger.check()

    ledger = _busy()
    # A payment out of someone's available balance with nothing there.
    ledger._append(
        EntryKind.WITHDRAWAL,
        "zed",
        (Posting("available:zed", -5), Posting("external:zed", 5)),
        "forged",
        {},
    )
    with pytest.raises(LedgerError, match=r"'no negative balance'.*available:zed"):
        ledger.check()

    ledger = _busy()
    # Half the locked stake leaks out of its stake account.
    ledger._append(
        EntryKind.WITHDRAWAL,
        "p",
        (Posting("stake:r2:p", -25), Posting("external:p", 25)),
        "forged",
        {},
    )
    with pytest.raises(LedgerError, match=r"'locked or zero'.*stake:r2:p holds 25, expected 50"):
        ledger.check()

    ledger = _busy()
    # Money parked in a stake account that no stake record knows about.
    ledger._append(
        EntryKind.STAKE_LOCKED,
        "r9",
        (Posting("available:p", -5), Posting("stake:r9:p", 5)),
        "forged",
        {},
    )
    with pytest.raises(LedgerError, match=r"'locked or zero'.*stake:r9:p"):
        ledger.check()


def test_append_refuses_an_unbalanced_entry() -> None:
    ledger = Ledger()
    with refused(ledger, "internal error: unbalanced"):
        ledger._append(EntryKind.DEPOSIT, "x", (Posting("available:x", 1),), "m", {})


# --- JSON snapshot and replay ----------------------------------------------------------------


def test_json_round_trip() -> None:
    ledger = _busy()
    doc = ledger.to_json()
    assert doc["format"] == LEDGER_FORMAT
    text = json.dumps(doc)
    parsed = json.loads(text)
    assert all(
        type(p["amount"]) is int for e in parsed["entries"] for p in e["postings"]
    )  # integers only, never floats
    restored = Ledger.from_json(parsed)
    assert restored.entries() == ledger.entries()
    assert restored.balances() == ledger.balances()
    assert restored.to_json() == doc
    assert restored.stake("r1") == ledger.stake("r1")
    assert restored.dispute("d-c") == ledger.dispute("d-c")
    # The restored ledger behaves the same: idempotency and refusals survive the round trip.
    assert restored.lock_stake("r2", "p", 50) == ledger.entries()[-2]
    with refused(restored, "already convicted"):
        restored.post_bond("d-z", "a", 1, result_id="r1")
    # Key order in the document does not matter.
    shuffled = json.loads(json.dumps(doc, sort_keys=True))
    assert Ledger.from_json(shuffled).entries() == ledger.entries()
    assert Ledger.from_json(Ledger().to_json()).entries() == ()


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(_busy().to_json()))
    return doc


def _renumber(doc: dict[str, Any]) -> dict[str, Any]:
    for i, entry in enumerate(doc["entries"]):
        entry["seq"] = i
    return doc


def _remove_deposit(doc: dict[str, Any]) -> None:
    """Drop challenger a's deposit (entry 1): its bond can no longer be paid."""
    assert doc["entries"].pop(1)["params"] == {"party": "a", "amount": 100}
    _renumber(doc)


def _duplicate_stake(doc: dict[str, Any]) -> None:
    """Append a copy of the first STAKE_LOCKED entry (replayed, it is an idempotent no-op)."""
    stake = next(e for e in doc["entries"] if e["kind"] == "STAKE_LOCKED")
    doc["entries"].append(dict(stake))
    _renumber(doc)


def _mutations() -> list[tuple[str, Callable[[dict[str, Any]], object], str]]:
    def set_(path: list[Any], value: object) -> Callable[[dict[str, Any]], object]:
        def apply(doc: dict[str, Any]) -> object:
            target: Any = doc
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            return None

        return apply

    return [
        ("format", set_(["format"], "refute-ledger/2"), "unsupported ledger format"),
        ("extra key", set_(["extra"], 1), "exactly the keys"),
        ("entries not a list", set_(["entries"], {}), "must be a list"),
        ("amount changed", set_(["entries", 0, "postings", 0, "amount"], -999), "differs"),
        ("both legs changed", lambda d: [
            set_(["entries", 0, "postings", 0, "amount"], -2000)(d),
            set_(["entries", 0, "postings", 1, "amount"], 2000)(d),
        ], "differs"),
        ("float amount", set_(["entries", 0, "postings", 0, "amount"], -1000.0), "integer"),
        ("bool amount", set_(["entries", 0, "params", "amount"], True), "integer"),
        ("float param", set_(["entries", 0, "params", "amount"], 1000.0), "integer"),
        ("memo", set_(["entries", 0, "memo"], "gift"), "differs"),
        ("reference", set_(["entries", 0, "reference"], "q"), "differs"),
        ("seq", set_(["entries", 1, "seq"], 5), "differs"),
        ("kind", set_(["entries", 0, "kind"], "MINT"), "unknown kind"),
        ("missing param", lambda d: d["entries"][0]["params"].pop("party"), "no parameter"),
        ("extra param", set_(["entries", 0, "params", "note"], "x"), "differs"),
        ("param type", set_(["entries", 0, "params", "party"], 5), "must be a string"),
        ("posting key", set_(["entries", 0, "postings", 0, "acct"], "x"), "exactly the keys"),
        ("entry not object", set_(["entries", 0], [1]), "JSON object"),
        ("params not object", set_(["entries", 0, "params"], []), "params must be an object"),
        ("postings not list", set_(["entries", 0, "postings"], {}), "postings must be a list"),
        ("verdict flipped", lambda d: [
            e["params"].__setitem__("verdict", "CHALLENGER_FAULT")
            for e in d["entries"] if e["kind"] == "SETTLEMENT"
        ], "differs"),
        ("bps changed", lambda d: [
            e["params"].__setitem__("challenger_share_bps", 9999)
            for e in d["entries"] if e["params"].get("verdict") == "PROVIDER_FAULT"
        ], "differs"),
        ("deposit removed", _remove_deposit, "only 0 available"),
        ("duplicate stake", _duplicate_stake, "duplicate"),
        ("overdraft", lambda d: d["entries"].append({
            "seq": len(d["entries"]), "kind": "WITHDRAWAL", "reference": "p", "memo": "", "params":
            {"party": "p", "amount": 10**6}, "postings": []}), "only .* available"),
        ("bond returned twice", lambda d: d["entries"].append({
            "seq": len(d["entries"]), "kind": "BOND_RETURNED", "reference": "d-a", "memo": "",
            "params": {"dispute_id": "d-a"}, "postings": []}), "already settled"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "match"), [pytest.param(m, r, id=name) for name, m, r in _mutations()]
)
def test_tampered_journals_are_refused(
    mutate: Callable[[dict[str, Any]], object], match: str
) -> None:
    doc = _doc()
    mutate(doc)
    with pytest.raises(LedgerError, match=match):
        Ledger.from_json(doc)


@pytest.mark.parametrize("data", [None, [], "text", {"format": LEDGER_FORMAT}])
def test_malformed_documents_are_refused(data: object) -> None:
    with pytest.raises(LedgerError):
        Ledger.from_json(data)


def test_replay_reports_the_failing_entry() -> None:
    doc = _doc()
    doc["entries"][3]["memo"] = "tampered"
    with pytest.raises(LedgerError, match="journal entry 3 does not replay"):
        Ledger.from_json(doc)


# --- the books of one result ---------------------------------------------------------------


def test_the_books_of_one_result_refuse_other_results() -> None:
    ledger = Ledger("r1")
    assert ledger.result_id == "r1" and Ledger().result_id is None
    ledger.deposit("p", 100)
    ledger.lock_stake("r1", "p", 60)
    ledger.deposit("c", 10)
    with refused(ledger, "the books of result r1: result r2 keeps its own"):
        ledger.lock_stake("r2", "p", 40)
    with refused(ledger, "the books of result r1: result r2 keeps its own"):
        ledger.post_bond("d1", "c", 10, result_id="r2")
    with refused(ledger, "unknown dispute d9"):
        _settle(ledger, "d9", DisputeVerdict.ABORTED)
    with pytest.raises(LedgerError, match="invalid result id"):
        Ledger("r:1")


def test_a_journal_of_two_results_is_not_the_books_of_one() -> None:
    ledger = Ledger()
    ledger.deposit("p", 100)
    ledger.lock_stake("r1", "p", 60)
    ledger.lock_stake("r2", "p", 40)
    doc = ledger.to_json()
    assert Ledger.from_json(doc).balances() == ledger.balances()
    with pytest.raises(LedgerError, match=r"journal entry 2 does not replay: .*result r2 keeps"):
        Ledger.from_json(doc, result_id="r1")
    books = Ledger.from_json({"format": LEDGER_FORMAT, "entries": doc["entries"][:2]},  # type: ignore[index]
                             result_id="r1")
    assert books.result_id == "r1" and books.stake("r1") is not None


def test_check_names_the_one_result_invariant() -> None:
    ledger = Ledger("r1")
    ledger.deposit("p", 100)
    ledger.lock_stake("r1", "p", 60)
    ledger._result_id = "r2"  # the books relabelled as another result's
    with pytest.raises(LedgerError, match=r"'one result'.*books of result r2 hold .*\['r1'\]"):
        ledger.check()


_book_ops = st.lists(
    st.tuples(
        st.sampled_from(["open", "settle"]),
        st.sampled_from(["r1", "r2", "r3"]),
        st.sampled_from(["c1", "c2", "p1"]),
        st.integers(min_value=1, max_value=500),
        st.sampled_from(list(DisputeVerdict)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(_book_ops)
def test_books_per_result_add_up_to_one_global_journal(
    ops: list[tuple[str, str, str, int, DisputeVerdict]],
) -> None:
    """What the service writes (a deposit right before the stake or bond it pays for; a
    settlement, and the other bonds returned after a conviction), kept in one global journal
    and in one journal per result: each result's books pass every check on their own, and
    their balances add up to the global journal's, account by account."""
    whole = Ledger()
    books: dict[str, Ledger] = {}
    providers = {"r1": "p1", "r2": "p2", "r3": "p3"}
    for n, (op, result, challenger, amount, verdict) in enumerate(ops):
        if challenger == providers[result]:  # a provider may challenge others' results only
            continue
        book = books.setdefault(result, Ledger(result))
        for ledger in (whole, book):
            if op == "open":
                if ledger.stake(result) is None:
                    ledger.deposit(providers[result], 1000)
                    ledger.lock_stake(result, providers[result], 1000)
                stake = ledger.stake(result)
                if stake is None or stake.status is not StakeStatus.LOCKED:
                    continue
                ledger.deposit(challenger, amount)
                ledger.post_bond(f"d{n}", challenger, amount, result_id=result)
            elif ledger.open_disputes(result):
                stake = ledger.stake(result)
                if stake is None or stake.status is not StakeStatus.LOCKED:
                    continue
                _settle(ledger, ledger.open_disputes(result)[0], verdict, 5000, 3000)
                if verdict.provider_at_fault:
                    ledger.close_others(result)
    total: dict[str, int] = {}
    for result, book in books.items():
        book.check()
        assert sum(book.balances().values()) == 0
        assert all(e.seq == i for i, e in enumerate(book.entries()))
        assert Ledger.from_json(book.to_json(), result_id=result).balances() == book.balances()
        for account, value in book.balances().items():
            total[account] = total.get(account, 0) + value
    whole.check()
    assert total == whole.balances()
    assert len(whole.entries()) == sum(len(b.entries()) for b in books.values())


# --- the state machine --------------------------------------------------------------------

PARTIES = ["p1", "p2", "c1", "c2"]
RESULTS = ["r1", "r2", "r3", "r4"]
DISPUTES = [f"d{i}" for i in range(1, 9)]
NETWORKS = ["n1", "n2"]
amounts = st.integers(min_value=-2, max_value=2000)
locks = st.one_of(st.integers(min_value=-2, max_value=150), amounts)
bps = st.integers(min_value=0, max_value=BPS_DENOMINATOR)


class LedgerMachine(RuleBasedStateMachine):
    """Random operations, valid and invalid, against an independent model of the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.deposited = 0
        self.withdrawn = 0
        self.available: dict[str, int] = dict.fromkeys(PARTIES, 0)
        self.treasury: dict[str, int] = dict.fromkeys(NETWORKS, 0)
        # result -> [provider, amount, status]; dispute -> [challenger, amount, result, status]
        self.stakes: dict[str, list[Any]] = {}
        self.disputes: dict[str, list[Any]] = {}

    def _attempt(self, valid: bool, op: Callable[[], object]) -> object:
        before = _state(self.ledger)
        try:
            out = op()
        except LedgerError:
            assert not valid, "a valid operation was refused"
            assert _state(self.ledger) == before, "a refusal changed the ledger"
            return None
        assert valid, "an invalid operation was accepted"
        return out

    def _open_on(self, result: str) -> list[str]:
        return [d for d, v in self.disputes.items() if v[2] == result and v[3] == "OPEN"]

    @rule(party=st.sampled_from(PARTIES), amount=amounts)
    def deposit(self, party: str, amount: int) -> None:
        if self._attempt(amount > 0, lambda: self.ledger.deposit(party, amount)) is not None:
            self.deposited += amount
            self.available[party] += amount

    @rule(party=st.sampled_from(PARTIES), amount=amounts)
    def withdraw(self, party: str, amount: int) -> None:
        valid = 0 < amount <= self.available[party]
        if self._attempt(valid, lambda: self.ledger.withdraw(party, amount)) is not None:
            self.withdrawn += amount
            self.available[party] -= amount

    @rule(result=st.sampled_from(RESULTS), provider=st.sampled_from(PARTIES), amount=locks)
    def lock_stake(self, result: str, provider: str, amount: int) -> None:
        known = self.stakes.get(result)
        if known is not None:
            same = known[:2] == [provider, amount]
            n = len(self.ledger.entries())
            self._attempt(same, lambda: self.ledger.lock_stake(result, provider, amount))
            assert len(self.ledger.entries()) == n
            return
        valid = 0 < amount <= self.available[provider]
        if self._attempt(valid, lambda: self.ledger.lock_stake(result, provider, amount)):
            self.available[provider] -= amount
            self.stakes[result] = [provider, amount, "LOCKED"]

    @rule(
        dispute=st.sampled_from(DISPUTES),
        challenger=st.sampled_from(PARTIES),
        amount=locks,
        result=st.sampled_from(RESULTS),
    )
    def post_bond(self, dispute: str, challenger: str, amount: int, result: str) -> None:
        def op() -> object:
            return self.ledger.post_bond(dispute, challenger, amount, result_id=result)

        known = self.disputes.get(dispute)
        if known is not None:
            n = len(self.ledger.entries())
            self._attempt(known[:3] == [challenger, amount, result], op)
            assert len(self.ledger.entries()) == n
            return
        stake = self.stakes.get(result)
        valid = (
            stake is not None
            and stake[2] == "LOCKED"
            and stake[0] != challenger
            and 0 < amount <= self.available[challenger]
        )
        if self._attempt(valid, op):
            self.available[challenger] -= amount
            self.disputes[dispute] = [challenger, amount, result, "OPEN"]

    @rule(
        dispute=st.sampled_from(DISPUTES),
        verdict=st.sampled_from(list(DisputeVerdict)),
        network=st.sampled_from(NETWORKS),
        c_bps=bps,
        p_bps=bps,
    )
    def settle(
        self, dispute: str, verdict: DisputeVerdict, network: str, c_bps: int, p_bps: int
    ) -> None:
        known = self.disputes.get(dispute)
        valid = known is not None and known[3] == "OPEN" and self.stakes[known[2]][2] == "LOCKED"
        done = self._attempt(
            valid,
            lambda: self.ledger.settle(
                dispute,
                verdict,
                network_id=network,
                challenger_share_bps=c_bps,
                provider_share_bps=p_bps,
            ),
        )
        if done is None or known is None:
            return
        challenger, bond, result, _ = known
        stake = self.stakes[result]
        known[3] = "SETTLED"
        if verdict.provider_at_fault:
            share = stake[1] * c_bps // BPS_DENOMINATOR
            self.available[challenger] += bond + share
            self.treasury[network] += stake[1] - share
            stake[2] = "SLASHED"
        elif verdict.challenger_at_fault:
            share = bond * p_bps // BPS_DENOMINATOR
            self.available[stake[0]] += share
            self.treasury[network] += bond - share
        else:
            self.available[challenger] += bond

    @rule(result=st.sampled_from(RESULTS))
    def close_others(self, result: str) -> None:
        stake = self.stakes.get(result)
        valid = stake is not None and stake[2] == "SLASHED"
        opened = self._open_on(result)
        closed = self._attempt(valid, lambda: self.ledger.close_others(result))
        if closed is None:
            return
        assert isinstance(closed, tuple)
        assert [e.reference for e in closed] == opened
        for d in opened:
            self.disputes[d][3] = "CLOSED"
            self.available[self.disputes[d][0]] += self.disputes[d][1]

    @rule(result=st.sampled_from(RESULTS))
    def release_stake(self, result: str) -> None:
        stake = self.stakes.get(result)
        valid = stake is not None and stake[2] == "LOCKED" and not self._open_on(result)
        if self._attempt(valid, lambda: self.ledger.release_stake(result)) and stake:
            stake[2] = "RELEASED"
            self.available[stake[0]] += stake[1]

    # Valid-biased rules: draw from the current state so that disputes get opened and settled.

    def _locked(self) -> list[str]:
        return [r for r, v in self.stakes.items() if v[2] == "LOCKED"]

    @precondition(lambda self: self._locked() and len(self.disputes) < len(DISPUTES))
    @rule(data=st.data())
    def challenge_a_staked_result(self, data: st.DataObject) -> None:
        result = data.draw(st.sampled_from(self._locked()))
        provider = self.stakes[result][0]
        challenger = data.draw(st.sampled_from([p for p in PARTIES if p != provider]))
        if self.available[challenger] == 0:
            self.deposit(challenger, 100)
        amount = data.draw(st.integers(1, self.available[challenger]))
        dispute = data.draw(st.sampled_from([d for d in DISPUTES if d not in self.disputes]))
        self.post_bond(dispute, challenger, amount, result)

    @precondition(lambda self: any(v[3] == "OPEN" for v in self.disputes.values()))
    @rule(
        data=st.data(),
        verdict=st.sampled_from(list(DisputeVerdict)),
        network=st.sampled_from(NETWORKS),
        c_bps=bps,
        p_bps=bps,
    )
    def settle_an_open_dispute(
        self,
        data: st.DataObject,
        verdict: DisputeVerdict,
        network: str,
        c_bps: int,
        p_bps: int,
    ) -> None:
        dispute = data.draw(st.sampled_from(sorted(self._open_on_any())))
        self.settle(dispute, verdict, network, c_bps, p_bps)

    @precondition(lambda self: any(v[2] == "SLASHED" for v in self.stakes.values()))
    @rule(data=st.data())
    def close_after_a_conviction(self, data: st.DataObject) -> None:
        slashed = sorted(r for r, v in self.stakes.items() if v[2] == "SLASHED")
        self.close_others(data.draw(st.sampled_from(slashed)))

    def _open_on_any(self) -> list[str]:
        return [d for d, v in self.disputes.items() if v[3] == "OPEN"]

    @precondition(lambda self: len(self.ledger.entries()) % 7 == 3)
    @rule()
    def round_trip(self) -> None:
        restored = Ledger.from_json(json.loads(json.dumps(self.ledger.to_json())))
        assert restored.entries() == self.ledger.entries()
        assert restored.balances() == self.ledger.balances()
        self.ledger = restored

    @invariant()
    def invariants_hold(self) -> None:
        self.ledger.check()

    @invariant()
    def money_is_never_created_or_lost(self) -> None:
        balances = self.ledger.balances()
        external = sum(v for a, v in balances.items() if a.startswith("external:"))
        internal = sum(v for a, v in balances.items() if not a.startswith("external:"))
        assert external == -internal
        assert self.deposited - self.withdrawn == internal
        assert all(v >= 0 for a, v in balances.items() if not a.startswith("external:"))

    @invariant()
    def balances_match_the_model(self) -> None:
        ledger = self.ledger
        for party, value in self.available.items():
            assert ledger.balance(available_account(party)) == value
        for network, value in self.treasury.items():
            assert ledger.balance(treasury_account(network)) == value
        for result, (provider, amount, status) in self.stakes.items():
            held = ledger.balance(stake_account(result, provider))
            assert held == (amount if status == "LOCKED" else 0)
        for dispute, (challenger, amount, _, status) in self.disputes.items():
            held = ledger.balance(bond_account(dispute, challenger))
            assert held == (amount if status == "OPEN" else 0)


LedgerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_ledger_state_machine = LedgerMachine.TestCase
