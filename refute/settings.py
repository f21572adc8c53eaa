"""Configuration: one pydantic-settings class read from ``REFUTE_*`` variables.

Every variable the service, the workers and the prover read is a field of :class:`Settings`
(``REFUTE_`` + the field name in capitals); README.md "Configuration" lists them all and
``tests/test_settings.py`` keeps the two in step. Nothing else reads the environment.

The process-wide instance comes from a cached factory (:func:`get_settings`); tests build their
own ``Settings(...)``. Nothing here connects to a database, a broker or a chain.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from refute.errors import Misconfigured, RefuteError

_HOME = Path.home() / ".cache" / "refute"


class Settings(BaseSettings):
    """Everything the API, the workers and the prover need to find their stores and policies."""

    model_config = SettingsConfigDict(env_prefix="REFUTE_")

    # --- stores ---------------------------------------------------------------------------------
    database_url: str = f"sqlite:///{_HOME / 'refute.db'}"
    redis_url: str = "redis://127.0.0.1:6379/0"
    blob_dir: Path = _HOME / "blobs"

    # --- prover ---------------------------------------------------------------------------------
    #: Where circuits and the development SRS are cached.
    home: Path = _HOME
    #: A KZG SRS file from a real ceremony, for production. When unset, an **unsafe** development
    #: SRS is generated per logrows under ``home/srs`` and every artifact built with it says so.
    srs_path: Path | None = None
    #: The node executable that runs the pinned solc (unset: the ``node`` on PATH).
    node: Path | None = None
    #: The anvil executable of the local chain (unset: the pinned one in ``node_modules``).
    anvil: Path | None = None
    #: Calibration of one segment's circuit (EZKL, in a child process) is stopped after this
    #: long and the segment reported unprovable with the reason.
    calibration_segment_timeout_s: float = Field(default=180.0, gt=0)
    #: How many calibration children run at once (the tile shapes of a tiled segment are
    #: calibrated in parallel); each has its own memory, so this multiplies the peak.
    calibration_workers: int = Field(default=2, ge=1, le=64)
    #: The largest circuit (log2 of its rows) calibration may choose; a segment that needs more
    #: is reported unprovable. 20 is the largest development SRS refute generates.
    proving_max_logrows: int = Field(default=20, ge=1, le=26)
    #: Limits on a model at load (:class:`refute.loading.LoadLimits`): its file, its weights
    #: (initializers and constants) and the work of one run (multiply-accumulates). A
    #: GPT-2-small-shaped model needs about 340 MB, 340 MB and 2^34; MobileNet v1 fits the
    #: defaults. Every process that loads models (API, workers, CLI) must use the same values.
    max_model_bytes: int = Field(default=64 * 2**20, gt=0)
    max_initializer_bytes: int = Field(default=256 * 2**20, gt=0)
    max_model_work: int = Field(default=2**32, gt=0)
    #: Largest trace bundle or state disclosure the API takes in one upload.
    max_upload_bytes: int = Field(default=64 * 2**20, gt=0)
    #: Memory a proof may use on the prover's machine; each segment's estimated peak
    #: (:mod:`prover.budget`) is compared with it.
    proving_budget_bytes: int = Field(default=8 * 2**30, gt=0)

    # --- chain ----------------------------------------------------------------------------------
    #: An EVM JSON-RPC endpoint on which settled proofs are re-verified; empty means no chain.
    #: It often embeds an API key: keep it with the secrets.
    chain_rpc_url: str = Field(default="", repr=False)
    #: Private key (hex) that sends the verification transactions on that chain; may be empty
    #: only for a chain on a loopback address (anvil's development key is used there).
    chain_key: str = Field(default="", repr=False)
    #: The EIP-712 domain's ``chainId`` that every signed message must carry.
    chain_id: int = 31337

    # --- spot-checks ----------------------------------------------------------------------------
    #: Secret key (hex) of the spot-check sampling hash: providers must not know it.
    spot_key: str = Field(default="", repr=False)
    #: Fault injection for tests and drills: sleep this long inside each spot-check.
    spotcheck_delay_s: float = 0.0
    #: An owed spot-check whose states are held but which is still unrecorded this long after
    #: it was queued is queued again by the timers (a task lost with Redis, or never queued).
    spotcheck_requeue_after_s: float = Field(default=300.0, gt=0)

    # --- Celery ---------------------------------------------------------------------------------
    #: A task is redelivered when its worker dies; past this many deliveries it is recorded as a
    #: dead letter instead of being run again.
    max_deliveries: int = 5
    #: Hard time limit of a task; must stay below the broker's visibility timeout.
    task_time_limit_s: int = 600
    visibility_timeout_s: int = 3600
    #: How often the scheduler finalizes results and delivers due webhooks.
    finalize_every_s: float = 10.0

    # --- disputes -------------------------------------------------------------------------------
    #: Seed (hex, ≥ 32 bytes) of the service's BLS key that signs transcript heads; empty means
    #: a development seed generated beside the blob store.
    bls_seed: str = Field(default="", repr=False)
    #: The bond the service's watcher posts when it challenges a result itself.
    watcher_bond: int = 1
    #: Dispute clocks (seconds) fixed when a dispute opens: each party's total thinking time,
    #: and how long the service has for each proof before the dispute is aborted.
    dispute_provider_clock_s: float = Field(default=3600.0, gt=0)
    dispute_challenger_clock_s: float = Field(default=3600.0, gt=0)
    dispute_proof_timeout_s: float = Field(default=3600.0, gt=0)
    #: Crash recovery: a step the service owes (a reveal from the uploaded trace, the watcher's
    #: answer, a disclosure already uploaded) that is still undone this long after its turn
    #: began is carried out again by the timers; a proof is queued again after the broker's
    #: visibility timeout plus the task time limit (a lost task would have come back and run by
    #: then: this covers a proof that was never queued).
    dispute_resume_after_s: float = Field(default=5.0, gt=0)

    # --- API ------------------------------------------------------------------------------------
    #: Accept webhook endpoints on loopback/private addresses (development and tests only).
    webhooks_allow_private: bool = False
    #: Model registration runs in its own child process per request, bounded in wall-clock time
    #: and address space (RLIMIT_AS, the whole child's); past either it is stopped and refused.
    registration_timeout_s: float = Field(default=600.0, gt=0)
    registration_memory_mb: int = Field(default=4096, ge=256)
    #: How many registrations run at once, how many of them one network may run, and how many
    #: more may wait for a slot; beyond that a registration is refused (503, Retry-After).
    registrations_concurrent: int = Field(default=2, ge=1)
    registrations_per_network: int = Field(default=1, ge=1)
    registrations_queued: int = Field(default=8, ge=0)

    # --- logging --------------------------------------------------------------------------------
    #: ``text`` (one human-readable line per record) or ``json`` (one JSON object per line).
    log_format: Literal["text", "json"] = "text"
    #: The root log level (a :mod:`logging` level name).
    log_level: str = "INFO"

    @field_validator("srs_path", "node", "anvil", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``REFUTE_SRS_PATH=""`` (or ``NODE``, ``ANVIL``) means unset, not the current
        directory."""
        return None if value == "" else value

    @field_validator("log_level", mode="after")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ValueError(f"unknown log level {value!r}")
        return level

    def spot_key_bytes(self) -> bytes:
        """The sampling key; refuses to run with none configured."""
        if not self.spot_key:
            raise Misconfigured("REFUTE_SPOT_KEY is not set: spot-check sampling needs a secret "
                                "(`openssl rand -hex 32`)")
        try:
            return bytes.fromhex(self.spot_key)
        except ValueError as exc:
            raise Misconfigured("REFUTE_SPOT_KEY must be hex") from exc


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings (read once; ``get_settings.cache_clear()`` re-reads them).

    A malformed variable is refused as a :class:`RefuteError` naming it."""
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "REFUTE_" + str(first["loc"][0]).upper() if first["loc"] else "REFUTE_*"
        raise RefuteError(f"{name}: {first['msg']}") from exc
    if settings.task_time_limit_s >= settings.visibility_timeout_s:
        raise RefuteError("task time limit must be below the broker visibility timeout")
    return settings
