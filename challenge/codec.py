"""JSON form of a dispute's game state (what the database row and the transcript store)."""

from __future__ import annotations

from typing import Any

from challenge.game import DisputeState, Phase, TimeControl, Verdict


def state_to_json(state: DisputeState) -> dict[str, Any]:
    """A JSON object holding every field of ``state``."""
    return {
        "n": state.n, "lo": state.lo, "hi": state.hi, "phase": state.phase.value,
        "pending": state.pending,
        "clocks": {"provider": state.clocks.provider, "challenger": state.clocks.challenger,
                   "proof_timeout": state.clocks.proof_timeout},
        "provider_clock": state.provider_clock, "challenger_clock": state.challenger_clock,
        "turn_started": state.turn_started, "rounds": state.rounds, "moves": state.moves,
        "verdict": state.verdict.value if state.verdict is not None else None,
        "reason": state.reason, "tiles": list(state.tiles), "tile": state.tile,
    }


def state_from_json(data: dict[str, Any]) -> DisputeState:
    """Rebuild a state (the game engine re-checks its consistency)."""
    clocks = data["clocks"]
    return DisputeState(
        n=int(data["n"]), lo=int(data["lo"]), hi=int(data["hi"]), phase=Phase(data["phase"]),
        pending=None if data["pending"] is None else int(data["pending"]),
        clocks=TimeControl(provider=float(clocks["provider"]),
                           challenger=float(clocks["challenger"]),
                           proof_timeout=float(clocks["proof_timeout"])),
        provider_clock=float(data["provider_clock"]),
        challenger_clock=float(data["challenger_clock"]),
        turn_started=float(data["turn_started"]), rounds=int(data["rounds"]),
        moves=int(data["moves"]),
        verdict=None if data["verdict"] is None else Verdict(data["verdict"]),
        reason=data["reason"],
        # States stored before tiles existed have neither: no segment tiled, no tile named.
        tiles=tuple(int(k) for k in data.get("tiles", ())),
        tile=None if data.get("tile") is None else int(data["tile"]),
    )
