"""EZKL's Poseidon hash of integer tensors, bit for bit, fast.

What EZKL 23.0.5 computes
-------------------------
``ezkl.poseidon_hash(felts)`` for ``n >= 1`` field elements ``x_1 … x_n`` of the BN254 scalar
field (``FIELD_MODULUS``) is one sponge over a width-2 state, rate 1::

    state = [0, 2**64]                 # capacity tag of halo2_gadgets ConstantLength<1>,
    for x in x_1 … x_n:                # used for every length n (not n * 2**64)
        state[0] = state[0] + x        # absorb
        state = permute(state)
    hash = state[0]                    # squeeze

``permute`` is EZKL's ``PoseidonSpec`` (halo2 style): 4 full rounds, 56 partial rounds, 4 full
rounds; each round adds its two round constants, applies x**5 (to both cells in a full round,
to cell 0 in a partial round) and multiplies by the 2x2 MDS matrix. The round constants and the
MDS matrix are those of the Poseidon reference Grain-LFSR generation (``field=1, sbox=0, n=254,
t=2, R_F=8, R_P=56``; constants by rejection sampling, MDS the Cauchy matrix ``1/(x_i + y_j)``);
they are derived here (:func:`round_constants`, :func:`mds_matrix`) and equal the table in EZKL's
``poseidon_params.rs``. For zero elements EZKL returns no hash at all (an empty list), so an
empty tensor is refused with :class:`~refute.errors.CommitmentError`.

Tensors are flattened in C order and each int64 ``v`` is taken as the field element
``v mod p`` (so ``-1`` is ``p - 1``, exactly as ``ezkl.float_to_felt`` encodes it).

Backends
--------
``"native"``
    The C extension :mod:`refute._poseidon` (Montgomery arithmetic on 4 x 64-bit limbs, an
    x86-64 MULX/ADX kernel when the CPU has it, a scaled form of the rounds, GIL released):
    about 4 µs per element on one core here, 20-25x faster than EZKL's binding.
``"python"``
    A deliberately plain pure-Python reference (:func:`_hash_python`): about 125 µs per
    element, a little slower than EZKL.
``"ezkl"``
    ``ezkl.poseidon_hash`` itself, the oracle: about 90 µs per element (it holds the GIL).
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Final, Protocol, cast

import numpy as np
import numpy.typing as npt

from refute.errors import CommitmentError

__all__ = [
    "BACKENDS",
    "FIELD_MODULUS",
    "mds_matrix",
    "poseidon_hash",
    "poseidon_hash_many",
    "round_constants",
]

#: The BN254 (alt_bn128) scalar field prime, the field EZKL's circuits work in.
FIELD_MODULUS: Final[int] = (
    21888242871839275222246405745257275088548364400416034343698204186575808495617
)

#: The accepted values of ``backend``.
BACKENDS: Final[tuple[str, ...]] = ("native", "python", "ezkl")

WIDTH: Final[int] = 2
FULL_ROUNDS: Final[int] = 8
PARTIAL_ROUNDS: Final[int] = 56
#: Initial capacity cell: halo2_gadgets' ConstantLength<1> domain tag, 1 << 64.
CAPACITY_TAG: Final[int] = 1 << 64

# Below this many elements in total, poseidon_hash_many stays in-process: starting threads (native)
# or worker processes (python, ezkl) would cost more than it saves.
# (Spawning two worker processes costs about 0.3 s.)
_MIN_PARALLEL_ELEMENTS: Final[dict[str, int]] = {"native": 2_000, "python": 8_000, "ezkl": 16_000}

_REBUILD_HINT: Final[str] = (
    "reinstall refute to compile it (`pip install -e . --no-build-isolation`, needs a C compiler)"
)


class _NativeModule(Protocol):
    """The interface of the compiled :mod:`refute._poseidon`."""

    def hash(self, values: npt.NDArray[np.int64], /) -> bytes:
        """32-byte little-endian hash of a non-empty C-contiguous int64 buffer."""
        ...

    def hash_portable(self, values: npt.NDArray[np.int64], /) -> bytes:
        """Same as ``hash`` with the portable C kernel forced."""
        ...

    def hash_plain(self, values: npt.NDArray[np.int64], /) -> bytes:
        """Same as ``hash`` with textbook rounds and the portable C kernel."""
        ...


# --- constants (Poseidon reference Grain LFSR) ----------------------------------------------


def _grain_bits(*, field: int, sbox: int, n: int, t: int, r_f: int, r_p: int) -> Iterator[int]:
    """The bit stream of the Poseidon reference Grain LFSR (generate_parameters_grain.sage)."""
    state: list[int] = []
    for value, width in ((field, 2), (sbox, 4), (n, 12), (t, 12), (r_f, 10), (r_p, 10)):
        state += [int(c) for c in format(value, f"0{width}b")]
    state += [1] * 30

    def step() -> int:
        bit = state[62] ^ state[51] ^ state[38] ^ state[23] ^ state[13] ^ state[0]
        state.pop(0)
        state.append(bit)
        return bit

    for _ in range(160):
        step()
    while True:
        # Self-shrinking: from each pair of bits, output the second when the first is 1.
        if step():
            yield step()
        else:
            step()


@functools.cache
def _constants() -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], tuple[int, int]]]:
    p = FIELD_MODULUS
    n_bits = p.bit_length()  # 254
    bits = _grain_bits(field=1, sbox=0, n=n_bits, t=WIDTH, r_f=FULL_ROUNDS, r_p=PARTIAL_ROUNDS)

    def draw() -> int:
        value = 0
        for _ in range(n_bits):
            value = (value << 1) | next(bits)
        return value

    flat: list[int] = []
    while len(flat) < (FULL_ROUNDS + PARTIAL_ROUNDS) * WIDTH:
        value = draw()
        if value < p:  # rejection sampling
            flat.append(value)
    rc = tuple((flat[2 * r], flat[2 * r + 1]) for r in range(FULL_ROUNDS + PARTIAL_ROUNDS))

    while True:  # Cauchy MDS from 2t distinct values reduced mod p
        values = [draw() % p for _ in range(2 * WIDTH)]
        if len(set(values)) == len(values):
            break
    xs, ys = values[:WIDTH], values[WIDTH:]
    m00, m01, m10, m11 = (pow(xs[i] + ys[j], -1, p) for i in range(2) for j in range(2))
    return rc, ((m00, m01), (m10, m11))


def round_constants() -> tuple[tuple[int, int], ...]:
    """The 64 pairs of round constants, in round order (as EZKL's ``ROUND_CONSTANTS``)."""
    return _constants()[0]


def mds_matrix() -> tuple[tuple[int, int], tuple[int, int]]:
    """The 2x2 MDS matrix (as EZKL's ``MDS``); a round computes ``state = MDS @ state``."""
    return _constants()[1]


# --- backends -------------------------------------------------------------------------------


def _permute(s0: int, s1: int) -> tuple[int, int]:
    """The Poseidon permutation, written plainly."""
    p = FIELD_MODULUS
    rc, ((m00, m01), (m10, m11)) = _constants()
    half = FULL_ROUNDS // 2
    for r, (c0, c1) in enumerate(rc):
        s0 = (s0 + c0) % p
        s1 = (s1 + c1) % p
        s0 = pow(s0, 5, p)
        if r < half or r >= half + PARTIAL_ROUNDS:  # full round: S-box on every cell
            s1 = pow(s1, 5, p)
        s0, s1 = (m00 * s0 + m01 * s1) % p, (m10 * s0 + m11 * s1) % p
    return s0, s1


def _hash_python(values: npt.NDArray[np.int64]) -> int:
    """Pure-Python reference: the sponge of the module docstring."""
    s0, s1 = 0, CAPACITY_TAG
    for v in values.tolist():
        s0, s1 = _permute((s0 + v) % FIELD_MODULUS, s1)
    return s0


def _hash_ezkl(values: npt.NDArray[np.int64]) -> int:
    """The oracle: ``ezkl.poseidon_hash`` on 32-byte little-endian hex felts."""
    try:
        import ezkl  # heavy: imported only for this backend
    except ImportError as exc:
        raise CommitmentError("the ezkl backend needs the ezkl package (pip install ezkl)") from exc
    p = FIELD_MODULUS
    felts = [(v % p).to_bytes(32, "little").hex() for v in values.tolist()]
    try:
        out = ezkl.poseidon_hash(felts)
    except Exception as exc:
        raise CommitmentError(f"ezkl.poseidon_hash failed: {exc}") from exc
    if not isinstance(out, list) or len(out) != 1:
        raise CommitmentError(f"ezkl.poseidon_hash returned {out!r}, expected one hash")
    return int.from_bytes(bytes.fromhex(out[0]), "little")


@functools.cache
def _native() -> _NativeModule:
    try:
        module = importlib.import_module("refute._poseidon")
    except ImportError as exc:
        raise CommitmentError(
            f"the native Poseidon extension refute._poseidon is not available ({exc}); "
            + _REBUILD_HINT
        ) from exc
    return cast(_NativeModule, module)


def _hash_native(values: npt.NDArray[np.int64]) -> int:
    try:
        digest = _native().hash(values)
    except (TypeError, ValueError) as exc:  # unreachable after _prepare; kept as a guard
        raise CommitmentError(f"native Poseidon refused the tensor: {exc}") from exc
    return int.from_bytes(digest, "little")


def _prepare(values: Any) -> npt.NDArray[np.int64]:
    """Validate one tensor and return it flattened, C-contiguous, native-endian int64."""
    if not isinstance(values, np.ndarray):
        raise CommitmentError(f"expected a numpy integer array, got {type(values).__name__}")
    dtype = values.dtype
    if dtype.kind not in "iu" or not np.can_cast(dtype, np.int64, casting="safe"):
        raise CommitmentError(
            f"Poseidon hashes integer tensors that fit int64 (quantize first), got {dtype}"
        )
    if values.size == 0:
        raise CommitmentError(
            "cannot hash an empty tensor: EZKL's poseidon_hash returns no hash for zero elements"
        )
    return np.ascontiguousarray(values, dtype=np.int64).reshape(-1)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise CommitmentError(
            f"unknown Poseidon backend {backend!r}; expected one of {', '.join(BACKENDS)}"
        )
    if backend == "native":
        _native()  # fail early and clearly if the extension is missing


def _run(backend: str, flat: npt.NDArray[np.int64]) -> int:
    if backend == "native":
        return _hash_native(flat)
    if backend == "python":
        return _hash_python(flat)
    return _hash_ezkl(flat)


def _run_task(task: tuple[str, npt.NDArray[np.int64]]) -> int:
    """Worker-process entry point (module level so that it pickles)."""
    return _run(*task)


# --- public API -----------------------------------------------------------------------------


def poseidon_hash(values: npt.NDArray[Any], *, backend: str = "native") -> int:
    """EZKL's Poseidon hash of an integer tensor, as an int in ``[0, FIELD_MODULUS)``.

    ``values`` is flattened in C order and each entry ``v`` is hashed as the field element
    ``v mod p``; the result equals ``int.from_bytes(bytes.fromhex(ezkl.poseidon_hash(felts)[0]),
    "little")`` with ``felts`` the 32-byte little-endian hex encodings of those elements.

    Any integer dtype that fits int64 is accepted (the values are widened, not reinterpreted).

    Raises:
        CommitmentError: not a numpy integer array (floats must be quantized first; bool and
            uint64 are refused), an empty tensor (EZKL gives no hash for it), an unknown
            ``backend``, or the native extension is not built.
    """
    _check_backend(backend)
    return _run(backend, _prepare(values))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def poseidon_hash_many(
    arrays: Sequence[npt.NDArray[Any]], *, workers: int | None = None, backend: str = "native"
) -> list[int]:
    """:func:`poseidon_hash` of each tensor, in order, spread over ``workers`` when it pays.

    ``workers=None`` uses every usable CPU once the batch is large enough; ``workers=1`` hashes
    in-process. The native backend runs in threads (the extension releases the GIL, so threads
    scale like processes without pickling the tensors); the python and ezkl backends, which hold
    the GIL, run in spawned worker processes.

    Raises:
        CommitmentError: as :func:`poseidon_hash` (every tensor is validated before any hashing
            starts), or ``workers`` below 1.
    """
    _check_backend(backend)
    if workers is not None and workers < 1:
        raise CommitmentError(f"workers must be at least 1, got {workers}")
    flats = [_prepare(a) for a in arrays]
    if workers is None:
        total = sum(f.size for f in flats)
        workers = _usable_cpus() if total >= _MIN_PARALLEL_ELEMENTS[backend] else 1
    workers = min(workers, len(flats))
    if workers <= 1:
        return [_run(backend, f) for f in flats]

    # Largest tensors first so that the last one to start is a small one; results re-ordered.
    order = sorted(range(len(flats)), key=lambda i: -flats[i].size)
    executor: Executor
    if backend == "native":
        executor = ThreadPoolExecutor(max_workers=workers)
    else:
        # spawn, not fork: forking a process that has started EZKL's (rayon) threads can hang.
        context = multiprocessing.get_context("spawn")
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        with executor:
            if backend == "native":
                results = list(executor.map(_hash_native, [flats[i] for i in order]))
            else:
                results = list(executor.map(_run_task, [(backend, flats[i]) for i in order]))
    except BrokenProcessPool as exc:
        raise CommitmentError(
            "a Poseidon worker process died (a script that starts worker processes must call "
            "them under `if __name__ == '__main__':`); retry with workers=1"
        ) from exc
    out = [0] * len(flats)
    for i, h in zip(order, results, strict=True):
        out[i] = h
    return out
