"""The bonds ledger: double-entry bookkeeping of deposits, stakes, bonds, slashes and treasuries.

Money is an integer number of the network's smallest unit; there are no floats anywhere. Every
account is a named string with a type (its first ``:``-separated field):

``external:<party>``
    money outside refute. Deposits come from here and withdrawals go there; these are the only
    accounts allowed to go negative (minus what the party has brought in, net).
``available:<party>``
    a party's free balance.
``stake:<result_id>:<provider>``
    a provider's stake locked for one result.
``bond:<dispute_id>:<challenger>``
    a challenger's bond locked in one dispute.
``treasury:<network_id>``
    a network's treasury (it receives what slashes do not pay out).

A :class:`JournalEntry` is a tuple of :class:`Posting` ``(account, amount)`` summing to zero,
with a kind, a reference (the party, result or dispute it is about), a memo for people, and the
operation's parameters (so that a journal can be replayed through the same validation by
:meth:`Ledger.from_json`). The journal is append-only; balances are derived from postings.

Every operation of :class:`Ledger` validates everything first, then appends exactly one balanced
entry (``close_others`` appends one per dispute it closes), or refuses with :class:`LedgerError`
and changes nothing. Verdict rules (DESIGN.md, "Bonds"):

* provider at fault (``PROVIDER_FAULT``, ``PROVIDER_TIMEOUT``): the result's stake is slashed;
  the challenger gets its bond back plus ``floor(stake * challenger_share_bps / 10000)``; the rest
  of the stake (including the rounding dust) goes to ``treasury:<network_id>``;
* challenger at fault (``CHALLENGER_FAULT``, ``CHALLENGER_TIMEOUT``): the bond is slashed; the
  provider gets ``floor(bond * provider_share_bps / 10000)``, the rest goes to the treasury; the
  stake stays locked (others may still challenge the result until it finalizes);
* ``ABORTED``: nobody is at fault; the bond is returned, the stake stays locked.

The ledger is pure (no I/O, no clock) and not thread-safe: the service serializes calls and
persists :meth:`Ledger.to_json` (or the entries one by one).

Books per result. Every stake, bond and settlement belongs to exactly one result, so the service
keeps one ledger per result (``Ledger(result_id=...)``, stored by :mod:`challenge.books`): its
journal is numbered from 0, and it refuses stakes and bonds on any other result. A deposit names
no result; it goes into the books of the result whose stake or bond it pays for, in the same
transaction. Every invariant of :meth:`Ledger.check` holds per result (each entry balances, so
each result's books sum to zero; the ``external:`` accounts, the only ones allowed to go
negative, carry the deposits). A party's balance across results is the sum of its balances in
each result's books (:func:`challenge.books.combined_balances`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from refute.errors import RefuteError

#: Shares are expressed in basis points of this denominator.
BPS_DENOMINATOR = 10_000
#: The largest amount a single operation accepts (an EVM ``uint256``).
MAX_AMOUNT = 2**256 - 1
#: The ``format`` field of :meth:`Ledger.to_json`.
LEDGER_FORMAT = "refute-ledger/1"

# Parties, result ids, dispute ids and network ids: no ':' (the account separator), no spaces.
_IDENT = re.compile(r"[A-Za-z0-9_.\-]{1,128}")

ParamValue = str | int


class LedgerError(RefuteError):
    """A ledger operation was refused, a journal does not replay, or an invariant is broken."""

    code = "ledger_error"
    #: The service's books are wrong or were misused by the service itself: a server fault.
    http_status = 500


class AccountType(enum.StrEnum):
    """The type of an account: the first field of its name."""

    EXTERNAL = "external"
    AVAILABLE = "available"
    STAKE = "stake"
    BOND = "bond"
    TREASURY = "treasury"


class EntryKind(enum.StrEnum):
    """What a journal entry records."""

    DEPOSIT = "DEPOSIT"
    WITHDRAWAL = "WITHDRAWAL"
    STAKE_LOCKED = "STAKE_LOCKED"
    BOND_POSTED = "BOND_POSTED"
    #: ``settle``: a verdict (or an abort) applied to one dispute.
    SETTLEMENT = "SETTLEMENT"
    #: ``close_others``: a bond returned because the provider was convicted in another dispute.
    BOND_RETURNED = "BOND_RETURNED"
    STAKE_RELEASED = "STAKE_RELEASED"


class DisputeVerdict(enum.StrEnum):
    """How a dispute ended, as far as money is concerned."""

    PROVIDER_FAULT = "PROVIDER_FAULT"
    PROVIDER_TIMEOUT = "PROVIDER_TIMEOUT"
    CHALLENGER_FAULT = "CHALLENGER_FAULT"
    CHALLENGER_TIMEOUT = "CHALLENGER_TIMEOUT"
    ABORTED = "ABORTED"

    @property
    def provider_at_fault(self) -> bool:
        """The provider lost: its stake is slashed."""
        return self in (DisputeVerdict.PROVIDER_FAULT, DisputeVerdict.PROVIDER_TIMEOUT)

    @property
    def challenger_at_fault(self) -> bool:
        """The challenger lost: its bond is slashed."""
        return self in (DisputeVerdict.CHALLENGER_FAULT, DisputeVerdict.CHALLENGER_TIMEOUT)


class StakeStatus(enum.StrEnum):
    """Lifecycle of a result's stake."""

    LOCKED = "LOCKED"
    SLASHED = "SLASHED"
    RELEASED = "RELEASED"


class DisputeStatus(enum.StrEnum):
    """Lifecycle of a dispute's bond."""

    OPEN = "OPEN"
    #: ``settle`` was applied (see :attr:`DisputeRecord.verdict`).
    SETTLED = "SETTLED"
    #: Closed by ``close_others`` after the provider was convicted in another dispute.
    CLOSED = "CLOSED"


# --- account names ------------------------------------------------------------------------


def _ident(value: object, what: str) -> str:
    if not isinstance(value, str) or _IDENT.fullmatch(value) is None:
        raise LedgerError(
            f"invalid {what} {value!r}: expected 1 to 128 characters among A-Z a-z 0-9 _ . -"
        )
    return value


def external_account(party: str) -> str:
    """``external:<party>``."""
    return f"{AccountType.EXTERNAL}:{_ident(party, 'party')}"


def available_account(party: str) -> str:
    """``available:<party>``."""
    return f"{AccountType.AVAILABLE}:{_ident(party, 'party')}"


def stake_account(result_id: str, provider: str) -> str:
    """``stake:<result_id>:<provider>``."""
    return f"{AccountType.STAKE}:{_ident(result_id, 'result id')}:{_ident(provider, 'provider')}"


def bond_account(dispute_id: str, challenger: str) -> str:
    """``bond:<dispute_id>:<challenger>``."""
    dispute = _ident(dispute_id, "dispute id")
    return f"{AccountType.BOND}:{dispute}:{_ident(challenger, 'challenger')}"


def treasury_account(network_id: str) -> str:
    """``treasury:<network_id>``."""
    return f"{AccountType.TREASURY}:{_ident(network_id, 'network id')}"


_ACCOUNT_FIELDS = {
    AccountType.EXTERNAL: ("party",),
    AccountType.AVAILABLE: ("party",),
    AccountType.STAKE: ("result id", "provider"),
    AccountType.BOND: ("dispute id", "challenger"),
    AccountType.TREASURY: ("network id",),
}


def parse_account(name: object) -> tuple[AccountType, tuple[str, ...]]:
    """Split an account name into its type and fields; raises LedgerError if malformed."""
    if not isinstance(name, str):
        raise LedgerError(f"invalid account name {name!r}: not a string")
    head, *fields = name.split(":")
    try:
        kind = AccountType(head)
    except ValueError:
        raise LedgerError(f"invalid account name {name!r}: unknown type {head!r}") from None
    labels = _ACCOUNT_FIELDS[kind]
    if len(fields) != len(labels):
        raise LedgerError(f"invalid account name {name!r}: {kind} takes {len(labels)} field(s)")
    return kind, tuple(_ident(f, label) for f, label in zip(fields, labels, strict=True))


# --- values -------------------------------------------------------------------------------


def _amount(value: object, what: str = "amount") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerError(f"{what} must be an integer number of the smallest unit, not {value!r}")
    if not 0 < value <= MAX_AMOUNT:
        raise LedgerError(f"{what} must be positive and at most 2**256-1, not {value}")
    return value


def _bps(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerError(f"{what} must be an integer number of basis points, not {value!r}")
    if not 0 <= value <= BPS_DENOMINATOR:
        raise LedgerError(f"{what} must be between 0 and {BPS_DENOMINATOR}, not {value}")
    return value


def _verdict(value: object) -> DisputeVerdict:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return DisputeVerdict(value)
    except ValueError:
        allowed = ", ".join(v.value for v in DisputeVerdict)
        raise LedgerError(f"unknown verdict {value!r} (one of {allowed})") from None


def _share(amount: int, bps: int) -> int:
    """``floor(amount * bps / 10000)`` in exact integer arithmetic."""
    return amount * bps // BPS_DENOMINATOR


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Posting:
    """One leg of an entry: ``amount`` (non-zero, signed) added to ``account``."""

    account: str
    amount: int

    def to_json(self) -> dict[str, object]:
        """``{"account": ..., "amount": ...}`` (the amount as a JSON integer)."""
        return {"account": self.account, "amount": self.amount}


@dataclass(frozen=True)
class JournalEntry:
    """One balanced entry of the journal.

    ``seq`` is its position in the journal; ``reference`` the party (deposits and withdrawals),
    result id (stakes) or dispute id (bonds, settlements) it is about; ``params`` the arguments
    of the operation that made it, sorted by name, so that it can be replayed.
    """

    seq: int
    kind: EntryKind
    reference: str
    postings: tuple[Posting, ...]
    memo: str
    params: tuple[tuple[str, ParamValue], ...]

    def param(self, name: str) -> ParamValue:
        """The operation parameter ``name``; raises LedgerError if absent."""
        for key, value in self.params:
            if key == name:
                return value
        raise LedgerError(f"entry {self.seq} ({self.kind}) has no parameter {name!r}")

    def to_json(self) -> dict[str, object]:
        """JSON form: plain strings and integers only."""
        return {
            "seq": self.seq,
            "kind": self.kind.value,
            "reference": self.reference,
            "memo": self.memo,
            "params": dict(self.params),
            "postings": [p.to_json() for p in self.postings],
        }

    @classmethod
    def from_json(cls, data: object) -> JournalEntry:
        """Parse the JSON form strictly (exact keys, integers not floats or booleans).

        This checks the shape only; :meth:`Ledger.from_json` checks the meaning by replaying.
        """
        obj = _object(data, "entry", {"seq", "kind", "reference", "memo", "params", "postings"})
        seq = _json_int(obj["seq"], "entry seq")
        where = f"entry {seq}"
        try:
            kind = EntryKind(_json_str(obj["kind"], f"{where} kind"))
        except ValueError:
            raise LedgerError(f"{where}: unknown kind {obj['kind']!r}") from None
        raw_params = obj["params"]
        if not isinstance(raw_params, dict):
            raise LedgerError(f"{where}: params must be an object")
        params: list[tuple[str, ParamValue]] = []
        for key, value in raw_params.items():
            if isinstance(value, str):
                params.append((_json_str(key, f"{where} parameter name"), value))
            else:
                params.append((_json_str(key, f"{where} parameter name"), _json_int(value, key)))
        raw_postings = obj["postings"]
        if not isinstance(raw_postings, list):
            raise LedgerError(f"{where}: postings must be a list")
        postings = []
        for raw in raw_postings:
            posting = _object(raw, f"{where} posting", {"account", "amount"})
            account = _json_str(posting["account"], f"{where} posting account")
            postings.append(Posting(account, _json_int(posting["amount"], f"{where} amount")))
        return cls(
            seq=seq,
            kind=kind,
            reference=_json_str(obj["reference"], f"{where} reference"),
            postings=tuple(postings),
            memo=_json_str(obj["memo"], f"{where} memo"),
            params=tuple(sorted(params)),
        )


def _object(data: object, what: str, keys: set[str]) -> dict[str, object]:
    if not isinstance(data, dict):
        raise LedgerError(f"{what} must be a JSON object")
    if set(data) != keys:
        raise LedgerError(f"{what} must have exactly the keys {sorted(keys)}, not {sorted(data)}")
    return data


def _json_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerError(f"{what} must be a JSON integer, not {value!r}")
    return value


def _json_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise LedgerError(f"{what} must be a string, not {value!r}")
    return value


@dataclass(frozen=True)
class StakeRecord:
    """A result's stake: who locked how much, and what became of it."""

    result_id: str
    provider: str
    amount: int
    status: StakeStatus

    @property
    def account(self) -> str:
        """The stake's account name."""
        return stake_account(self.result_id, self.provider)


@dataclass(frozen=True)
class DisputeRecord:
    """A dispute's bond: who posted how much against which result, and how it ended."""

    dispute_id: str
    result_id: str
    challenger: str
    amount: int
    status: DisputeStatus
    verdict: DisputeVerdict | None = None

    @property
    def account(self) -> str:
        """The bond's account name."""
        return bond_account(self.dispute_id, self.challenger)


def _merge(*legs: tuple[str, int]) -> tuple[Posting, ...]:
    """One posting per account (first-appearance order), zero legs dropped."""
    totals: dict[str, int] = {}
    for account, amount in legs:
        totals[account] = totals.get(account, 0) + amount
    return tuple(Posting(a, v) for a, v in totals.items() if v != 0)


# --- the ledger ---------------------------------------------------------------------------


class Ledger:
    """An append-only double-entry journal of stakes and bonds, with derived balances."""

    def __init__(self, result_id: str | None = None) -> None:
        """An empty ledger; with ``result_id``, the books of that one result only."""
        self._result_id = None if result_id is None else _ident(result_id, "result id")
        self._entries: list[JournalEntry] = []
        self._balances: dict[str, int] = {}
        self._stakes: dict[str, StakeRecord] = {}
        self._stake_entries: dict[str, JournalEntry] = {}
        self._disputes: dict[str, DisputeRecord] = {}
        self._bond_entries: dict[str, JournalEntry] = {}
        self._disputes_by_result: dict[str, list[str]] = {}

    @property
    def result_id(self) -> str | None:
        """The result whose books these are, or None for books of any number of results."""
        return self._result_id

    def _own(self, result_id: str) -> None:
        """Refuse a stake or bond on a result these books do not keep."""
        if self._result_id is not None and result_id != self._result_id:
            raise LedgerError(
                f"these are the books of result {self._result_id}: result {result_id} keeps "
                "its own"
            )

    # -- appending ---------------------------------------------------------------------

    def _append(
        self,
        kind: EntryKind,
        reference: str,
        postings: tuple[Posting, ...],
        memo: str,
        params: Mapping[str, ParamValue],
    ) -> JournalEntry:
        """Append one entry (already validated by the caller) and update the balances."""
        if not postings or sum(p.amount for p in postings) != 0:
            raise LedgerError(f"internal error: unbalanced {kind} entry {postings!r}")
        entry = JournalEntry(
            seq=len(self._entries),
            kind=kind,
            reference=reference,
            postings=postings,
            memo=memo,
            params=tuple(sorted(params.items())),
        )
        self._entries.append(entry)
        for p in postings:
            self._balances[p.account] = self._balances.get(p.account, 0) + p.amount
        return entry

    # -- deposits and withdrawals ------------------------------------------------------

    def deposit(self, party: str, amount: int) -> JournalEntry:
        """Credit ``amount`` from ``external:<party>`` to ``available:<party>``."""
        amount = _amount(amount)
        external, available = external_account(party), available_account(party)
        return self._append(
            EntryKind.DEPOSIT,
            party,
            _merge((external, -amount), (available, amount)),
            f"deposit of {amount} by {party}",
            {"party": party, "amount": amount},
        )

    def withdraw(self, party: str, amount: int) -> JournalEntry:
        """Pay ``amount`` out of ``available:<party>``; refused beyond the available balance."""
        amount = _amount(amount)
        external, available = external_account(party), available_account(party)
        have = self.balance(available)
        if amount > have:
            raise LedgerError(f"{party} cannot withdraw {amount}: only {have} available")
        return self._append(
            EntryKind.WITHDRAWAL,
            party,
            _merge((available, -amount), (external, amount)),
            f"withdrawal of {amount} by {party}",
            {"party": party, "amount": amount},
        )

    # -- stakes and bonds --------------------------------------------------------------

    def lock_stake(self, result_id: str, provider: str, amount: int) -> JournalEntry:
        """Lock ``amount`` of ``provider``'s available balance as the stake of ``result_id``.

        Idempotent per result: the same call again returns the existing entry and changes
        nothing; a different call for a result already staked is refused.
        """
        account = stake_account(result_id, provider)
        self._own(result_id)
        amount = _amount(amount, "stake")
        existing = self._stakes.get(result_id)
        if existing is not None:
            if (existing.provider, existing.amount) == (provider, amount):
                return self._stake_entries[result_id]
            raise LedgerError(
                f"result {result_id} is already staked ({existing.amount} by {existing.provider})"
            )
        available = available_account(provider)
        have = self.balance(available)
        if amount > have:
            raise LedgerError(f"{provider} cannot stake {amount}: only {have} available")
        entry = self._append(
            EntryKind.STAKE_LOCKED,
            result_id,
            _merge((available, -amount), (account, amount)),
            f"stake of {amount} by {provider} on result {result_id}",
            {"result_id": result_id, "provider": provider, "amount": amount},
        )
        self._stakes[result_id] = StakeRecord(result_id, provider, amount, StakeStatus.LOCKED)
        self._stake_entries[result_id] = entry
        return entry

    def post_bond(
        self, dispute_id: str, challenger: str, amount: int, *, result_id: str
    ) -> JournalEntry:
        """Lock ``amount`` of ``challenger``'s available balance as the bond of a dispute.

        The dispute is against ``result_id``, whose stake must be locked (not slashed, not
        released). Idempotent per dispute like :meth:`lock_stake`. The provider of the result
        cannot challenge it.
        """
        account = bond_account(dispute_id, challenger)
        _ident(result_id, "result id")
        self._own(result_id)
        amount = _amount(amount, "bond")
        existing = self._disputes.get(dispute_id)
        if existing is not None:
            if (existing.challenger, existing.amount, existing.result_id) == (
                challenger,
                amount,
                result_id,
            ):
                return self._bond_entries[dispute_id]
            raise LedgerError(
                f"dispute {dispute_id} already exists ({existing.amount} by "
                f"{existing.challenger} against result {existing.result_id})"
            )
        stake = self._stakes.get(result_id)
        if stake is None:
            raise LedgerError(f"result {result_id} has no stake: it cannot be disputed")
        if stake.status is StakeStatus.SLASHED:
            raise LedgerError(f"result {result_id} is already convicted: no further disputes")
        if stake.status is StakeStatus.RELEASED:
            raise LedgerError(
                f"result {result_id} is final (stake released): it cannot be disputed"
            )
        if challenger == stake.provider:
            raise LedgerError(f"{challenger} provided result {result_id}: it cannot challenge it")
        available = available_account(challenger)
        have = self.balance(available)
        if amount > have:
            raise LedgerError(f"{challenger} cannot bond {amount}: only {have} available")
        entry = self._append(
            EntryKind.BOND_POSTED,
            dispute_id,
            _merge((available, -amount), (account, amount)),
            f"bond of {amount} by {challenger} in dispute {dispute_id} on result {result_id}",
            {
                "dispute_id": dispute_id,
                "challenger": challenger,
                "amount": amount,
                "result_id": result_id,
            },
        )
        self._disputes[dispute_id] = DisputeRecord(
            dispute_id, result_id, challenger, amount, DisputeStatus.OPEN
        )
        self._bond_entries[dispute_id] = entry
        self._disputes_by_result.setdefault(result_id, []).append(dispute_id)
        return entry

    # -- settlement --------------------------------------------------------------------

    def _open_dispute(self, dispute_id: str) -> tuple[DisputeRecord, StakeRecord]:
        _ident(dispute_id, "dispute id")
        dispute = self._disputes.get(dispute_id)
        if dispute is None:
            raise LedgerError(f"unknown dispute {dispute_id}")
        if dispute.status is not DisputeStatus.OPEN:
            raise LedgerError(f"dispute {dispute_id} is already {dispute.status.lower()}")
        return dispute, self._stakes[dispute.result_id]

    def settle(
        self,
        dispute_id: str,
        verdict: DisputeVerdict | str,
        *,
        network_id: str,
        challenger_share_bps: int,
        provider_share_bps: int,
    ) -> JournalEntry:
        """Apply ``verdict`` to an open dispute (see the module docstring for the amounts).

        Refused if the dispute is unknown or already settled or closed, or if its result's
        provider was already convicted in another dispute (use :meth:`close_others`).
        """
        v = _verdict(verdict)
        treasury = treasury_account(network_id)
        c_bps = _bps(challenger_share_bps, "challenger_share_bps")
        p_bps = _bps(provider_share_bps, "provider_share_bps")
        dispute, stake = self._open_dispute(dispute_id)
        if stake.status is not StakeStatus.LOCKED:
            raise LedgerError(
                f"result {stake.result_id} was already convicted: dispute {dispute_id} can only "
                "be closed (close_others)"
            )
        bond_acc = dispute.account
        challenger_av = available_account(dispute.challenger)
        bond = dispute.amount
        if v.provider_at_fault:
            share = _share(stake.amount, c_bps)
            postings = _merge(
                (stake.account, -stake.amount),
                (bond_acc, -bond),
                (challenger_av, bond + share),
                (treasury, stake.amount - share),
            )
            memo = (
                f"{v}: stake {stake.amount} of {stake.provider} on result {stake.result_id} "
                f"slashed; {dispute.challenger} gets bond {bond} + share {share}; "
                f"treasury {network_id} gets {stake.amount - share}"
            )
        elif v.challenger_at_fault:
            share = _share(bond, p_bps)
            postings = _merge(
                (bond_acc, -bond),
                (available_account(stake.provider), share),
                (treasury, bond - share),
            )
            memo = (
                f"{v}: bond {bond} of {dispute.challenger} slashed; {stake.provider} gets "
                f"{share}; treasury {network_id} gets {bond - share}; "
                f"stake on result {stake.result_id} stays locked"
            )
        else:
            postings = _merge((bond_acc, -bond), (challenger_av, bond))
            memo = (
                f"{v}: bond {bond} returned to {dispute.challenger}; "
                f"stake on result {stake.result_id} stays locked"
            )
        entry = self._append(
            EntryKind.SETTLEMENT,
            dispute_id,
            postings,
            memo,
            {
                "dispute_id": dispute_id,
                "verdict": v.value,
                "network_id": network_id,
                "challenger_share_bps": c_bps,
                "provider_share_bps": p_bps,
            },
        )
        self._disputes[dispute_id] = replace(dispute, status=DisputeStatus.SETTLED, verdict=v)
        if v.provider_at_fault:
            self._stakes[stake.result_id] = replace(stake, status=StakeStatus.SLASHED)
        return entry

    def _close_one(self, dispute_id: str) -> JournalEntry:
        """Return one open dispute's bond because its result's provider was convicted."""
        dispute, stake = self._open_dispute(dispute_id)
        if stake.status is not StakeStatus.SLASHED:
            raise LedgerError(
                f"result {stake.result_id} is not convicted: dispute {dispute_id} must be settled"
            )
        entry = self._append(
            EntryKind.BOND_RETURNED,
            dispute_id,
            _merge(
                (dispute.account, -dispute.amount),
                (available_account(dispute.challenger), dispute.amount),
            ),
            f"bond {dispute.amount} returned to {dispute.challenger}: provider of result "
            f"{stake.result_id} convicted in another dispute",
            {"dispute_id": dispute_id},
        )
        self._disputes[dispute_id] = replace(dispute, status=DisputeStatus.CLOSED)
        return entry

    def close_others(self, result_id: str) -> tuple[JournalEntry, ...]:
        """After a conviction on ``result_id``, return every other open dispute's bond.

        Appends one ``BOND_RETURNED`` entry per open dispute (none if there are none); refused
        if the result's provider was not convicted.
        """
        _ident(result_id, "result id")
        stake = self._stakes.get(result_id)
        if stake is None:
            raise LedgerError(f"unknown result {result_id}")
        if stake.status is not StakeStatus.SLASHED:
            raise LedgerError(f"result {result_id} is not convicted: nothing to close")
        open_ids = self.open_disputes(result_id)
        return tuple(self._close_one(d) for d in open_ids)

    def release_stake(self, result_id: str) -> JournalEntry:
        """Return a finalized result's stake to its provider's available balance.

        Refused while a dispute on the result is open, after a slash, or if already released.
        """
        _ident(result_id, "result id")
        stake = self._stakes.get(result_id)
        if stake is None:
            raise LedgerError(f"unknown result {result_id}")
        if stake.status is StakeStatus.SLASHED:
            raise LedgerError(f"result {result_id} was convicted: its stake was slashed")
        if stake.status is StakeStatus.RELEASED:
            raise LedgerError(f"the stake of result {result_id} was already released")
        open_ids = self.open_disputes(result_id)
        if open_ids:
            raise LedgerError(
                f"result {result_id} has open dispute(s) {', '.join(open_ids)}: stake stays locked"
            )
        entry = self._append(
            EntryKind.STAKE_RELEASED,
            result_id,
            _merge(
                (stake.account, -stake.amount), (available_account(stake.provider), stake.amount)
            ),
            f"stake {stake.amount} on result {result_id} released to {stake.provider}",
            {"result_id": result_id},
        )
        self._stakes[result_id] = replace(stake, status=StakeStatus.RELEASED)
        return entry

    # -- queries -----------------------------------------------------------------------

    def balance(self, account: str) -> int:
        """The balance of ``account`` (0 if it never moved); raises on a malformed name."""
        parse_account(account)
        return self._balances.get(account, 0)

    def balances(self) -> dict[str, int]:
        """Every account that ever moved, with its balance (possibly 0), sorted by name."""
        return dict(sorted(self._balances.items()))

    def entries(self) -> tuple[JournalEntry, ...]:
        """The journal, oldest first."""
        return tuple(self._entries)

    def stake(self, result_id: str) -> StakeRecord | None:
        """The stake of ``result_id``, if any."""
        return self._stakes.get(result_id)

    def dispute(self, dispute_id: str) -> DisputeRecord | None:
        """The dispute ``dispute_id``, if any."""
        return self._disputes.get(dispute_id)

    def open_disputes(self, result_id: str) -> tuple[str, ...]:
        """Ids of the open disputes on ``result_id``, in the order they were opened."""
        return tuple(
            d
            for d in self._disputes_by_result.get(result_id, [])
            if self._disputes[d].status is DisputeStatus.OPEN
        )

    def check(self) -> None:
        """Verify every invariant; raises LedgerError naming the first one broken.

        ``entry shape`` (sequence numbers, non-empty, well-formed accounts, non-zero integer
        amounts, one posting per account), ``entry balances`` (each entry sums to zero),
        ``derived balances`` (the cached balances equal the sums of the postings),
        ``total is zero`` (over all accounts), ``no negative balance`` (outside ``external:``),
        ``locked or zero`` (a stake or bond account holds its full amount while locked or
        open, and zero once released, slashed, settled or closed; no other such account moves),
        ``one result`` (the books of one result hold no stake or bond of another).
        """
        derived: dict[str, int] = {}
        for i, entry in enumerate(self._entries):
            if entry.seq != i:
                raise LedgerError(f"invariant 'entry shape' broken: entry {i} has seq {entry.seq}")
            if not entry.postings:
                raise LedgerError(f"invariant 'entry shape' broken: entry {i} has no postings")
            accounts = [p.account for p in entry.postings]
            if len(set(accounts)) != len(accounts):
                raise LedgerError(f"invariant 'entry shape' broken: entry {i} repeats an account")
            for p in entry.postings:
                try:
                    parse_account(p.account)
                except LedgerError as exc:
                    raise LedgerError(
                        f"invariant 'entry shape' broken: entry {i}: {exc.reason}"
                    ) from exc
                if isinstance(p.amount, bool) or not isinstance(p.amount, int) or p.amount == 0:
                    raise LedgerError(
                        f"invariant 'entry shape' broken: entry {i} posts {p.amount!r} to "
                        f"{p.account}"
                    )
                derived[p.account] = derived.get(p.account, 0) + p.amount
            total = sum(p.amount for p in entry.postings)
            if total != 0:
                raise LedgerError(f"invariant 'entry balances' broken: entry {i} sums to {total}")
        if derived != self._balances:
            diff = sorted(
                a
                for a in derived.keys() | self._balances.keys()
                if derived.get(a) != self._balances.get(a)
            )
            raise LedgerError(
                f"invariant 'derived balances' broken: cached balances differ on {diff}"
            )
        total = sum(derived.values())
        if total != 0:
            raise LedgerError(f"invariant 'total is zero' broken: accounts sum to {total}")
        for account, value in sorted(derived.items()):
            if value < 0 and parse_account(account)[0] is not AccountType.EXTERNAL:
                raise LedgerError(
                    f"invariant 'no negative balance' broken: {account} holds {value}"
                )
        expected: dict[str, int] = {}
        for s in self._stakes.values():
            expected[s.account] = s.amount if s.status is StakeStatus.LOCKED else 0
        for d in self._disputes.values():
            expected[d.account] = d.amount if d.status is DisputeStatus.OPEN else 0
        locked_types = (AccountType.STAKE, AccountType.BOND)
        moved = {a for a in derived if parse_account(a)[0] in locked_types}
        for account in sorted(moved | expected.keys()):
            have, want = derived.get(account, 0), expected.get(account, 0)
            if have != want:
                raise LedgerError(
                    f"invariant 'locked or zero' broken: {account} holds {have}, expected {want}"
                )
        if self._result_id is not None:
            # 'locked or zero' above: no stake or bond account moves without its record.
            held = {s.result_id for s in self._stakes.values()}
            held |= {d.result_id for d in self._disputes.values()}
            others = sorted(held - {self._result_id})
            if others:
                raise LedgerError(
                    f"invariant 'one result' broken: the books of result {self._result_id} "
                    f"hold stakes or bonds of {others}"
                )

    # -- snapshot and restore ----------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        """The journal as a JSON-compatible object (balances are derived, not stored)."""
        return {"format": LEDGER_FORMAT, "entries": [e.to_json() for e in self._entries]}

    @classmethod
    def from_json(cls, data: object, *, result_id: str | None = None) -> Ledger:
        """Rebuild a ledger by replaying a journal through the same validation.

        Every entry must be exactly what its operation produces when replayed in order (same
        seq, postings, memo and parameters); the rebuilt ledger is then :meth:`check`-ed.
        With ``result_id``, the journal is that result's books (see the module docstring).
        Raises LedgerError naming the first entry that does not replay.
        """
        obj = _object(data, "ledger", {"format", "entries"})
        if obj["format"] != LEDGER_FORMAT:
            raise LedgerError(f"unsupported ledger format {obj['format']!r}")
        raw_entries = obj["entries"]
        if not isinstance(raw_entries, list):
            raise LedgerError("ledger entries must be a list")
        ledger = cls(result_id)
        for i, raw in enumerate(raw_entries):
            try:
                entry = JournalEntry.from_json(raw)
                ledger._replay(entry)
            except LedgerError as exc:
                raise LedgerError(f"journal entry {i} does not replay: {exc.reason}") from exc
        ledger.check()
        return ledger

    def _replay(self, entry: JournalEntry) -> None:
        def text(name: str) -> str:
            return _json_str(entry.param(name), f"parameter {name}")

        def number(name: str) -> int:
            return _json_int(entry.param(name), f"parameter {name}")

        replays: dict[EntryKind, Callable[[], object]] = {
            EntryKind.DEPOSIT: lambda: self.deposit(text("party"), number("amount")),
            EntryKind.WITHDRAWAL: lambda: self.withdraw(text("party"), number("amount")),
            EntryKind.STAKE_LOCKED: lambda: self.lock_stake(
                text("result_id"), text("provider"), number("amount")
            ),
            EntryKind.BOND_POSTED: lambda: self.post_bond(
                text("dispute_id"),
                text("challenger"),
                number("amount"),
                result_id=text("result_id"),
            ),
            EntryKind.SETTLEMENT: lambda: self.settle(
                text("dispute_id"),
                text("verdict"),
                network_id=text("network_id"),
                challenger_share_bps=number("challenger_share_bps"),
                provider_share_bps=number("provider_share_bps"),
            ),
            EntryKind.BOND_RETURNED: lambda: self._close_one(text("dispute_id")),
            EntryKind.STAKE_RELEASED: lambda: self.release_stake(text("result_id")),
        }
        before = len(self._entries)
        replays[entry.kind]()
        if len(self._entries) != before + 1:
            raise LedgerError(f"{entry.kind} entry is a duplicate (its operation is a no-op)")
        produced = self._entries[-1]
        if produced != entry:
            raise LedgerError(
                f"{entry.kind} entry differs from what its operation produces: {produced!r}"
            )
