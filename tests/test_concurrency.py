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
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from challenge.books import all_books, combined_balances, load_ledger
from challenge.codec import state_from_json
from challenge.game import Actor, Answer, Choice, Phase
from challenge.ledger import DisputeVerdict, EntryKind, StakeStatus
from challenge.orchestrator import (
    CHALLENGER_SHARE_BPS,
    PROVIDER_SHARE_BPS,
    SERVICE,
    drive,
    load_transcript,
    move,
    open_dispute,
    prove_pending,
)
from challenge.records import Dispute, Result, ResultStatus
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
        world.prepared, zoo.mlp().sample_input(p.seed)).commitment.leaves] for p in plans}
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
