"""The prover's artifacts and SRS, as configured (:class:`refute.settings.Settings`).

* ``REFUTE_HOME`` — where circuits and the development SRS are cached (default
  ``~/.cache/refute``).
* ``REFUTE_SRS_PATH`` — a KZG SRS file from a real ceremony, for production. When unset, an
  **unsafe** development SRS is generated per logrows under ``$REFUTE_HOME/srs`` and every
  artifact built with it says so.
"""

from __future__ import annotations

from prover.circuit import CircuitCache
from prover.prover import Prover
from prover.srs import SrsStore
from refute.settings import Settings, get_settings


def srs_store(settings: Settings) -> SrsStore:
    """The configured SRS file, or the development cache."""
    if settings.srs_path is not None:
        return SrsStore(srs_path=settings.srs_path)
    return SrsStore(dev_cache=settings.home / "srs")


def make_prover(settings: Settings) -> Prover:
    """A prover over the circuit cache in ``settings.home``."""
    return Prover(CircuitCache(settings.home / "circuits", srs_store(settings)))


def get_prover() -> Prover:
    """A prover configured by the process-wide settings (:func:`refute.settings.get_settings`)."""
    return make_prover(get_settings())
