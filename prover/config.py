"""Prover configuration from the environment (one pydantic-settings class, cached factory).

* ``REFUTE_HOME`` — where circuits and the development SRS are cached (default
  ``~/.cache/refute``).
* ``REFUTE_SRS_PATH`` — a KZG SRS file from a real ceremony, for production. When unset, an
  **unsafe** development SRS is generated per logrows under ``$REFUTE_HOME/srs`` and every
  artifact built with it says so.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prover.circuit import CircuitCache
from prover.prover import Prover
from prover.srs import SrsStore


class ProverSettings(BaseSettings):
    """Where the prover keeps its artifacts and finds its SRS."""

    model_config = SettingsConfigDict(env_prefix="REFUTE_")

    home: Path = Path.home() / ".cache" / "refute"
    srs_path: Path | None = None

    @field_validator("srs_path", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``REFUTE_SRS_PATH=""`` means no SRS file, not the current directory."""
        return None if value == "" else value

    def srs_store(self) -> SrsStore:
        """The configured SRS file, or the development cache."""
        if self.srs_path is not None:
            return SrsStore(srs_path=self.srs_path)
        return SrsStore(dev_cache=self.home / "srs")

    def prover(self) -> Prover:
        """A prover over the circuit cache in ``home``."""
        return Prover(CircuitCache(self.home / "circuits", self.srs_store()))


@functools.cache
def get_settings() -> ProverSettings:
    """The process-wide settings (tests build their own ``ProverSettings`` instead)."""
    return ProverSettings()
