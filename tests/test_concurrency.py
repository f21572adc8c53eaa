"""Issue 10, "What it must show": disputes played concurrently on PostgreSQL.

Twenty results (ten lying at one step, ten honest) are accepted on a real PostgreSQL, each
with its provider's stake locked. Then twenty threads, one per result, each open a dispute
(the service's whole-trace watcher, a challenger's whole-trace bisection, a challenger's single
step; honest and dishonest challengers, several of them on more than one result), play it to
its verdict (answers through :func:`~challenge.orchestrator.move` then
:func:`~challenge.orchestrator.drive`, the watcher playing itself, proofs made by
:func:`~challenge.orchestrator.prove_pending` in the thread that queued them), and close the
honest results' windows with :func:`~verifier.service.finalize_due` — all at the same time.

Nothing may fail in any thread (no :class:`~refute.errors.Conflict`, no IntegrityError, no
deadlock), nothing may be swallowed into the log, every dispute ends with the verdict its
result implies, every result's journal replays and balances, the totals over all journals are
exactly what the verdicts imply, and every stake is locked once and then released or slashed
exactly once.

Then many disputes on ONE result, played at once (three rounds, each on a fresh result): six
challengers bisecting a lying result's whole trace (one convicts it on the one shared step
proof, which closes the five others), and six mixed disputes of an honest result (each loses on
its step's one proof, then the result finalizes once). Besides the checks above: the result's
one transcript keeps its hash chain and its times never go back, and each step is proven once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from challenge.books import all_books, combined_balances, load_ledger
from challenge.codec import state_from_json
from challenge.context import ProofKind
from challenge.fakes import FakeProver
from challenge.game import Actor, Answer, Choice, DisputeState, IllegalMove, Phase
from challenge.ledger import DisputeVerdict, EntryKind, StakeStatus
from challenge.orchestrator import (
    CHALLENGER_SHARE_BPS,
    PROVIDER_SHARE_BPS,
    SERVICE,
    DisputeError,
    drive,
    load_transcript,
    move,
    open_dispute,
    prove_pending,
)
from challenge.records import Dispute, Result, ResultStatus, SharedProof
from refute import zoo
from refute.provider import run_trace
from tests.dispute_world import World, add_result, make_world
from tests.servers import postgres_server
from verifier.service import finalize_due

NETWORK = "net_c"
STAKE = 1000  # what add_result stakes
PROVIDER = "0x" + "aa" * 20  # add_result's provider
#: Four challengers, each disputing several results (their balances add up across journals).
CHALLENGERS = tuple("0x" + f"{n:02x}" * 20 for n in (0xc1, 0xc2, 0xc3, 0xc4))
THREADS = 20  # one per result: every dispute opens, plays and settles at the same time


@dataclasses.dataclass(frozen=True)
class Plan:
    """One result and the dispute a thread plays on it."""

    seed: int
    lie_at: int | None
    """The step whose state the provider moved (None: an honest result)."""
    challenger: str
    whole: bool
    """A whole-trace bisection (0, n), else a single step."""
    honest_challenger: bool = True
    """Answers by its own execution; a dishonest one disagrees with every state."""

    @property
    def span(self) -> tuple[int, int]:
        """The disputed states (lo, hi]."""
        if self.whole:
            return 0, 3
        step = self.lie_at if self.lie_at is not None else 2
        return step - 1, step

    def bond(self, watcher_bond: int) -> int:
        """Odd bonds too, so that the provider's share rounds."""
        return watcher_bond if self.challenger == SERVICE else 10 + self.seed


def _plans() -> list[Plan]:
    liars = (
        [Plan(seed=s, lie_at=1 + s % 3, challenger=SERVICE, whole=True) for s in range(4)]
        + [Plan(seed=s, lie_at=1 + s % 3, challenger=CHALLENGERS[s % 4], whole=True)
           for s in range(4, 7)]
        + [Plan(seed=s, lie_at=1 + s % 3, challenger=CHALLENGERS[s % 4], whole=False)
           for s in range(7, 10)])
    honest = (
        [Plan(seed=s, lie_at=None, challenger=CHALLENGERS[s % 4], whole=False)
         for s in range(10, 14)]
        + [Plan(seed=s, lie_at=None, challenger=CHALLENGERS[s % 4], whole=True,
                honest_challenger=False) for s in range(14, 18)]
        + [Plan(seed=s, lie_at=None, challenger=SERVICE, whole=True) for s in range(18, 20)])
    return liars + honest


@pytest.fixture(scope="module")
def pg_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The fake-prover world on a throwaway PostgreSQL (migrated by make_world)."""
    with postgres_server() as url:
        world = make_world(tmp_path_factory.mktemp("concurrency"), network_id=NETWORK,
                           model_id="mdl_c", ezkl=False, database_url=url)
        try:
            yield world
        finally:
            world.ctx.engine.dispose()


class _Player:
    """Plays one dispute from its own thread; the proofs it queues wait in a list only this
    thread reads (FakeTasks hands them to the runner of the thread that scheduled them)."""

    queued = threading.local()

    def __init__(self, world: World, rid: str, plan: Plan, *, honest_leaves: list[str],
                 opened: threading.Barrier, window_closed: datetime) -> None:
        self.world, self.rid, self.plan = world, rid, plan
        self.honest_leaves = honest_leaves
        self.opened, self.window_closed = opened, window_closed

    def __call__(self) -> tuple[str, int]:
        """Open, play and settle the dispute; its id and how many results this thread's
        finalize_due finalized."""
        ctx = self.world.disputes
        _Player.queued.proofs = []
        lo, hi = self.plan.span
        dispute_id = open_dispute(ctx, self.rid, challenger=self.plan.challenger, lo=lo, hi=hi,
                                  bond=self.plan.bond(ctx.config.watcher_bond),
                                  now=datetime.now(UTC))
        # Every result is disputed before any thread closes a window: finalize_due must then
        # finalize exactly the honest results whose disputes are settled.
        self.opened.wait(timeout=60)
        for _ in range(20):  # a 3-step bisection needs at most 2 answers and 1 proof
            with ctx.sessions() as s:
                row = s.get(Dispute, dispute_id)
                assert row is not None
                status, state = row.status, state_from_json(row.state)
            if status == "RESOLVED":
                break
            if state.phase is Phase.ANSWER and self.plan.challenger != SERVICE:
                assert state.pending is not None
                now = datetime.now(UTC)
                _, effects = move(ctx, dispute_id, Answer(
                    actor=Actor.CHALLENGER, at=now.timestamp(), state=state.pending,
                    choice=self._answer(state.pending)), now)
                drive(ctx, dispute_id, effects, now)
            elif _Player.queued.proofs:
                prove_pending(ctx, _Player.queued.proofs.pop(0), datetime.now(UTC))
            else:
                raise AssertionError(f"dispute {dispute_id} is stuck in {state.phase}")
        else:
            raise AssertionError(f"dispute {dispute_id} never resolved")
        assert _Player.queued.proofs == []  # each proof queued once, and made
        return dispute_id, finalize_due(self.world.ctx, self.window_closed)

    def _answer(self, k: int) -> Choice:
        if not self.plan.honest_challenger:
            return Choice.DISAGREE
        with self.world.disputes.sessions() as s:
            result = s.get(Result, self.rid)
            assert result is not None
            committed = result.leaves[k]
        return Choice.AGREE if committed == self.honest_leaves[k] else Choice.DISAGREE


def _queue_in_calling_thread(dispute_id: str) -> None:
    _Player.queued.proofs.append(dispute_id)


def test_twenty_disputes_played_concurrently_settle_once_and_balance(
        pg_world: World, caplog: pytest.LogCaptureFixture) -> None:
    world = pg_world
    plans = _plans()
    assert len(plans) == THREADS
    rids = [add_result(world, seed=p.seed, lie_at=p.lie_at) for p in plans]
    # What an honest challenger's own execution commits to, state by state.
    leaves_of = {p.seed: ["0x" + leaf.hex() for leaf in run_trace(
        world.prepared, zoo.mlp().sample_input(p.seed), deterministic=True).commitment.leaves]
        for p in plans}
    with world.ctx.sessions() as s:
        deadline = max(s.get_one(Result, rid).challenge_deadline for rid in rids)
    window_closed = (deadline if deadline.tzinfo else deadline.replace(tzinfo=UTC)
                     ) + timedelta(seconds=1)

    world.tasks.clear()
    world.tasks.inline["proofs"] = _queue_in_calling_thread
    opened = threading.Barrier(THREADS)
    players = [_Player(world, rid, plan, honest_leaves=leaves_of[plan.seed], opened=opened,
                       window_closed=window_closed)
               for rid, plan in zip(rids, plans, strict=True)]
    caplog.set_level(logging.WARNING)
    failures: list[str] = []
    outcomes: dict[str, tuple[str, int]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures = {pool.submit(player): player.rid for player in players}
        for future in concurrent.futures.as_completed(futures, timeout=120):
            exc = future.exception()
            if exc is not None:
                failures.append(f"{futures[future]}: " + "".join(
                    traceback.format_exception(exc)))
                opened.abort()  # let the others fail fast instead of waiting at the barrier
            else:
                outcomes[futures[future]] = future.result()
    world.tasks.clear()
    assert failures == [], "\n".join(failures)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []

    liars = [rid for rid, p in zip(rids, plans, strict=True) if p.lie_at is not None]
    honest = [rid for rid in rids if rid not in liars]
    # Every honest result finalized exactly once, by whichever thread's finalize_due got it.
    assert sum(finalized for _, finalized in outcomes.values()) == len(honest)

    expected = Counter[str]()
    with world.ctx.sessions() as s:
        for rid, plan in zip(rids, plans, strict=True):
            dispute_id = outcomes[rid][0]
            dispute = s.get_one(Dispute, dispute_id)
            result = s.get_one(Result, rid)
            bond = int(dispute.bond)
            if plan.lie_at is not None:
                assert (dispute.status, dispute.verdict) == ("RESOLVED", "PROVIDER_FAULT"), rid
                assert state_from_json(dispute.state).hi == plan.lie_at  # found the lie
                assert result.status is ResultStatus.PROVIDER_FAULT
                share = STAKE * CHALLENGER_SHARE_BPS // 10_000
                expected[f"available:{plan.challenger}"] += bond + share
                expected[f"treasury:{NETWORK}"] += STAKE - share
                stake_end = StakeStatus.SLASHED
            else:
                assert (dispute.status, dispute.verdict) == ("RESOLVED", "CHALLENGER_FAULT"), rid
                assert result.status is ResultStatus.FINALIZED
                share = bond * PROVIDER_SHARE_BPS // 10_000
                expected[f"available:{PROVIDER}"] += STAKE + share
                expected[f"treasury:{NETWORK}"] += bond - share
                stake_end = StakeStatus.RELEASED
            expected[f"external:{plan.challenger}"] -= bond
            expected[f"external:{PROVIDER}"] -= STAKE
            expected[f"stake:{rid}:{PROVIDER}"] += 0
            expected[f"bond:{dispute_id}:{plan.challenger}"] += 0
            assert s.scalars(select(Dispute.id).where(Dispute.result_id == rid)).all() == [
                dispute_id]

            ledger = load_ledger(s, rid)
            ledger.check()
            stake = ledger.stake(rid)
            assert stake is not None and stake.status is stake_end and stake.amount == STAKE
            kinds = Counter(e.kind for e in ledger.entries())
            slashes = [e for e in ledger.entries() if e.kind is EntryKind.SETTLEMENT
                       and DisputeVerdict(str(e.param("verdict"))).provider_at_fault]
            assert kinds[EntryKind.STAKE_LOCKED] == 1, rid
            assert kinds[EntryKind.STAKE_RELEASED] + len(slashes) == 1, rid
            assert kinds[EntryKind.STAKE_RELEASED] == (plan.lie_at is None), rid
            assert kinds[EntryKind.SETTLEMENT] == 1 and kinds[EntryKind.BOND_POSTED] == 1, rid

            transcript = load_transcript(s, rid)
            transcript.verify_chain()
            verdicts = [e for e in transcript.events if e.kind == "verdict"]
            assert [e.body["verdict"] for e in verdicts] == [dispute.verdict], rid

        books = all_books(s)
        assert set(books) == set(rids)
        for ledger in books.values():
            ledger.check()
        totals = combined_balances(books.values())
    assert sum(totals.values()) == 0
    assert totals == dict(sorted(expected.items()))


# --- many disputes on one result --------------------------------------------------------------
#
# Several challengers dispute the SAME result at once (the PostgreSQL probe of commit a042e42):
# their moves append to one transcript and one journal, their proofs are one shared proof, and
# a conviction closes every other dispute while those are still being played. Before that
# commit this deadlocked (move() locked the dispute's row, then the result's; a conviction holds
# the result's and locks the others'), answered 409 to a transcript append or a proof claim that
# lost a race, and stamped transcript events before earlier ones.

ROUNDS = 3  # each on a fresh result
SEATS = 6  # disputes per result, all opened and played at the same time
SAME_RESULT_TIMEOUT_S = 60.0  # a round that takes longer hangs (a deadlock): it fails


@dataclasses.dataclass(frozen=True)
class Seat:
    """One of the disputes played at once on the same result."""

    challenger: str
    lo: int
    hi: int
    bond: int
    honest: bool = True
    """Answers by its own execution; a dishonest challenger disagrees with every state."""


def _challenger(n: int) -> str:
    return "0x" + f"{0xd0 + n:02x}" * 20


class _SeatPlayer:
    """Opens and plays one dispute of a result that others dispute at the same time.

    Unlike :class:`_Player`, it may find its dispute waiting for a step proof that another
    thread is making (one proof per step and result, applied to every dispute waiting for it),
    and may see its answer refused because another dispute convicted the provider meanwhile
    (the conviction closed this one): both are the protocol, not failures."""

    def __init__(self, world: World, rid: str, seat: Seat, *, honest_leaves: list[str],
                 start: threading.Barrier, opened: threading.Barrier,
                 window_closed: datetime | None) -> None:
        self.world, self.rid, self.seat = world, rid, seat
        self.honest_leaves = honest_leaves
        self.start, self.opened, self.window_closed = start, opened, window_closed
        self.dispute_id: str | None = None
        self.finalized = 0

    def __call__(self) -> None:
        ctx = self.world.disputes
        _Player.queued.proofs = []
        watcher_bond = ctx.config.watcher_bond
        self.start.wait(timeout=SAME_RESULT_TIMEOUT_S)
        self.dispute_id = dispute_id = open_dispute(
            ctx, self.rid, challenger=self.seat.challenger, lo=self.seat.lo, hi=self.seat.hi,
            bond=watcher_bond if self.seat.challenger == SERVICE else self.seat.bond,
            now=datetime.now(UTC))
        # Every dispute is open before any is played: a conviction then closes all the others
        # (a challenge opened after it would be refused, the result being PROVIDER_FAULT).
        self.opened.wait(timeout=SAME_RESULT_TIMEOUT_S)
        give_up = time.monotonic() + SAME_RESULT_TIMEOUT_S
        while time.monotonic() < give_up:
            status, state = self._read()
            if status == "RESOLVED":
                break
            if state.phase is Phase.ANSWER and self.seat.challenger != SERVICE:
                assert state.pending is not None
                now = datetime.now(UTC)
                try:
                    _, effects = move(ctx, dispute_id, Answer(
                        actor=Actor.CHALLENGER, at=now.timestamp(), state=state.pending,
                        choice=self._answer(state.pending)), now)
                    drive(ctx, dispute_id, effects, now)
                except (IllegalMove, DisputeError):
                    if not self._closed():
                        raise
            elif _Player.queued.proofs:
                prove_pending(ctx, _Player.queued.proofs.pop(0), datetime.now(UTC))
            elif state.phase is Phase.STEP_PROOF:
                time.sleep(0.01)  # claimed by another thread, which applies it here too
            else:
                raise AssertionError(f"dispute {dispute_id} is stuck in {state.phase}")
        else:
            raise AssertionError(f"dispute {dispute_id} never resolved")
        if self.window_closed is not None:
            self.finalized = finalize_due(self.world.ctx, self.window_closed)

    def _read(self) -> tuple[str, DisputeState]:
        with self.world.disputes.sessions() as s:
            row = s.get_one(Dispute, self.dispute_id)
            return row.status, state_from_json(row.state)

    def _closed(self) -> bool:
        """Whether another dispute's conviction closed this one."""
        with self.world.disputes.sessions() as s:
            row = s.get_one(Dispute, self.dispute_id)
            return (row.status, row.verdict) == ("RESOLVED", "CLOSED")

    def _answer(self, k: int) -> Choice:
        if not self.seat.honest:
            return Choice.DISAGREE
        with self.world.disputes.sessions() as s:
            committed = s.get_one(Result, self.rid).leaves[k]
        return Choice.AGREE if committed == self.honest_leaves[k] else Choice.DISAGREE


@dataclasses.dataclass
class _Round:
    rid: str
    players: list[_SeatPlayer]
    proofs: list[tuple[ProofKind, int]]
    """The proofs the fake prover made during the round."""


def _play_same_result(world: World, rid: str, seats: list[Seat], seed: int, *,
                      finalize: bool, caplog: pytest.LogCaptureFixture) -> _Round:
    """Open and play every seat's dispute on ``rid`` at once, each from its own thread;
    fails on any exception, on a thread still running after the timeout, on a logged
    warning."""
    prover = world.disputes.prover
    assert isinstance(prover, FakeProver)
    honest_leaves = ["0x" + leaf.hex() for leaf in run_trace(
        world.prepared, zoo.mlp().sample_input(seed), deterministic=True).commitment.leaves]
    with world.ctx.sessions() as s:
        deadline = _as_utc(s.get_one(Result, rid).challenge_deadline)
    start, opened = threading.Barrier(len(seats)), threading.Barrier(len(seats))
    players = [_SeatPlayer(world, rid, seat, honest_leaves=honest_leaves, start=start,
                           opened=opened,
                           window_closed=deadline + timedelta(seconds=1) if finalize else None)
               for seat in seats]
    failures: list[str] = []

    def run(player: _SeatPlayer) -> None:
        try:
            player()
        except BaseException as exc:
            failures.append(f"{player.seat}: " + "".join(traceback.format_exception(exc)))
            start.abort()  # the others fail fast instead of waiting at a barrier
            opened.abort()

    made_before = len(prover.made)
    caplog.clear()
    threads = [threading.Thread(target=run, args=(p,), daemon=True) for p in players]
    for thread in threads:
        thread.start()
    give_up = time.monotonic() + SAME_RESULT_TIMEOUT_S + 10
    for thread in threads:
        thread.join(timeout=max(0.0, give_up - time.monotonic()))
    hung = sum(thread.is_alive() for thread in threads)
    assert hung == 0, f"{hung} thread(s) still running (a deadlock?)\n" + "\n".join(failures)
    assert failures == [], "\n".join(failures)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    return _Round(rid, players, prover.made[made_before:])


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _check_transcript(s: Session, rid: str, disputes: list[Dispute]) -> None:
    """The result's one transcript: its hash chain verifies, its events' times never go back,
    and it holds one verdict per dispute, the dispute's own."""
    transcript = load_transcript(s, rid)
    transcript.verify_chain()
    times = [e.at for e in transcript.events]
    assert times == sorted(times), f"{rid}: transcript times go back: {times}"
    verdicts = {str(e.body["dispute_id"]): e.body["verdict"] for e in transcript.events
                if e.kind == "verdict"}
    assert len(verdicts) == len([e for e in transcript.events if e.kind == "verdict"])
    assert verdicts == {d.id: d.verdict for d in disputes}, rid


def test_challengers_on_one_lying_result_convict_it_once(
        pg_world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Six honest challengers dispute the whole trace of one lying result at once: one of them
    convicts it on the one step proof, the conviction closes the five others (their bonds
    returned), the stake is slashed once; nothing fails, nothing is proven twice."""
    world = pg_world
    caplog.set_level(logging.WARNING)
    world.tasks.clear()
    world.tasks.inline["proofs"] = _queue_in_calling_thread
    seats = [Seat(_challenger(i), 0, 3, bond=11 + 2 * i) for i in range(SEATS)]
    bond_of = {seat.challenger: seat.bond for seat in seats}
    expected = Counter[str]()
    rids = []
    try:
        for r in range(ROUNDS):
            lie_at = 1 + r % 3
            seed = 40 + r
            rid = add_result(world, seed=seed, lie_at=lie_at)
            rids.append(rid)
            played = _play_same_result(world, rid, seats, seed, finalize=False, caplog=caplog)
            assert played.proofs == [(ProofKind.STEP, lie_at)], rid  # proven once, shared
            with world.ctx.sessions() as s:
                disputes = list(s.scalars(select(Dispute).where(Dispute.result_id == rid)))
                assert sorted(d.id for d in disputes) == sorted(
                    p.dispute_id for p in played.players if p.dispute_id), rid
                verdicts = Counter((d.status, d.verdict) for d in disputes)
                assert verdicts == {("RESOLVED", "PROVIDER_FAULT"): 1,
                                    ("RESOLVED", "CLOSED"): SEATS - 1}, rid
                [winner] = [d for d in disputes if d.verdict == "PROVIDER_FAULT"]
                assert state_from_json(winner.state).hi == lie_at  # found the lie
                assert s.get_one(Result, rid).status is ResultStatus.PROVIDER_FAULT
                shared = s.scalars(select(SharedProof).where(SharedProof.result_id == rid)).all()
                assert [(p.kind, p.index, p.outcome is not None) for p in shared] == [
                    (ProofKind.STEP, lie_at, True)], rid

                ledger = load_ledger(s, rid)
                ledger.check()
                stake = ledger.stake(rid)
                assert stake is not None and stake.status is StakeStatus.SLASHED, rid
                kinds = Counter(e.kind for e in ledger.entries())
                assert kinds == {EntryKind.DEPOSIT: 1 + SEATS, EntryKind.STAKE_LOCKED: 1,
                                 EntryKind.BOND_POSTED: SEATS, EntryKind.SETTLEMENT: 1,
                                 EntryKind.BOND_RETURNED: SEATS - 1}, rid
                _check_transcript(s, rid, disputes)

            share = STAKE * CHALLENGER_SHARE_BPS // 10_000
            expected[f"available:{winner.challenger}"] += share
            expected[f"treasury:{NETWORK}"] += STAKE - share
            expected[f"external:{PROVIDER}"] -= STAKE
            expected[f"available:{PROVIDER}"] += 0
            expected[f"stake:{rid}:{PROVIDER}"] += 0
            for d in disputes:  # every bond back: the winner's with its share, the others'
                expected[f"external:{d.challenger}"] -= bond_of[d.challenger]
                expected[f"available:{d.challenger}"] += bond_of[d.challenger]
                expected[f"bond:{d.id}:{d.challenger}"] += 0
    finally:
        world.tasks.clear()
    with world.ctx.sessions() as s:
        totals = combined_balances(load_ledger(s, rid) for rid in rids)
    assert sum(totals.values()) == 0
    assert totals == dict(sorted(expected.items()))


def test_mixed_disputes_on_one_honest_result_all_lose_and_it_finalizes_once(
        pg_world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Six disputes of an honest result at once — the watcher's and an honest challenger's
    whole-trace bisections (they end on the last step), two dishonest challengers' (the first
    step), single steps 2 and 3 — each lose on the one proof of its step; each thread then runs
    finalize_due, which finalizes the result (its stake released) exactly once."""
    world = pg_world
    caplog.set_level(logging.WARNING)
    world.tasks.clear()
    world.tasks.inline["proofs"] = _queue_in_calling_thread
    seats = [Seat(SERVICE, 0, 3, bond=0),
             Seat(_challenger(10), 0, 3, bond=21),
             Seat(_challenger(11), 0, 3, bond=23, honest=False),
             Seat(_challenger(12), 0, 3, bond=25, honest=False),
             Seat(_challenger(13), 1, 2, bond=27),
             Seat(_challenger(14), 2, 3, bond=29)]
    lost_at = {SERVICE: 3, _challenger(10): 3, _challenger(11): 1, _challenger(12): 1,
               _challenger(13): 2, _challenger(14): 3}
    expected = Counter[str]()
    rids = []
    try:
        for r in range(ROUNDS):
            seed = 50 + r
            rid = add_result(world, seed=seed)
            rids.append(rid)
            played = _play_same_result(world, rid, seats, seed, finalize=True, caplog=caplog)
            assert sorted(played.proofs) == [(ProofKind.STEP, k) for k in (1, 2, 3)], rid
            assert sum(p.finalized for p in played.players) == 1, rid
            with world.ctx.sessions() as s:
                disputes = list(s.scalars(select(Dispute).where(Dispute.result_id == rid)))
                assert len(disputes) == SEATS, rid
                for d in disputes:
                    assert (d.status, d.verdict) == ("RESOLVED", "CHALLENGER_FAULT"), d.id
                    assert state_from_json(d.state).hi == lost_at[d.challenger], d.id
                assert s.get_one(Result, rid).status is ResultStatus.FINALIZED

                ledger = load_ledger(s, rid)
                ledger.check()
                stake = ledger.stake(rid)
                assert stake is not None and stake.status is StakeStatus.RELEASED, rid
                kinds = Counter(e.kind for e in ledger.entries())
                assert kinds == {EntryKind.DEPOSIT: 1 + SEATS, EntryKind.STAKE_LOCKED: 1,
                                 EntryKind.BOND_POSTED: SEATS, EntryKind.SETTLEMENT: SEATS,
                                 EntryKind.STAKE_RELEASED: 1}, rid
                _check_transcript(s, rid, disputes)

            expected[f"external:{PROVIDER}"] -= STAKE
            expected[f"available:{PROVIDER}"] += STAKE
            expected[f"stake:{rid}:{PROVIDER}"] += 0
            for d in disputes:
                bond = int(d.bond)
                share = bond * PROVIDER_SHARE_BPS // 10_000
                expected[f"external:{d.challenger}"] -= bond
                expected[f"available:{d.challenger}"] += 0  # deposited, then posted
                expected[f"available:{PROVIDER}"] += share
                expected[f"treasury:{NETWORK}"] += bond - share
                expected[f"bond:{d.id}:{d.challenger}"] += 0
    finally:
        world.tasks.clear()
    with world.ctx.sessions() as s:
        totals = combined_balances(load_ledger(s, rid) for rid in rids)
    assert sum(totals.values()) == 0
    assert totals == dict(sorted(expected.items()))
