"""refute.poseidon: the native, python and ezkl backends agree bit for bit (EZKL is the oracle)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refute import poseidon
from refute.errors import CommitmentError
from refute.poseidon import FIELD_MODULUS, poseidon_hash, poseidon_hash_many

I64_MIN = int(np.iinfo(np.int64).min)
I64_MAX = int(np.iinfo(np.int64).max)
P = FIELD_MODULUS


@pytest.fixture(scope="module")
def ezkl() -> ModuleType:
    module: ModuleType = pytest.importorskip("ezkl")
    return module


def oracle(ezkl: ModuleType, values: npt.NDArray[Any]) -> int:
    """ezkl.poseidon_hash, called directly (independently of the "ezkl" backend)."""
    felts = [(int(v) % P).to_bytes(32, "little").hex() for v in np.ravel(values)]
    (out,) = ezkl.poseidon_hash(felts)
    return int.from_bytes(bytes.fromhex(out), "little")


def signed_values(n: int, seed: int) -> npt.NDArray[np.int64]:
    """Random int64 over the whole range, mixed with small values and the special cases."""
    rng = np.random.default_rng(seed)
    x = rng.integers(I64_MIN, I64_MAX, size=n, dtype=np.int64, endpoint=True)
    small = rng.integers(-300, 300, size=n, dtype=np.int64)
    x = np.where(rng.random(n) < 0.5, small, x)
    specials = np.array([0, -1, 1, 2**62, -(2**62), I64_MIN, I64_MAX], dtype=np.int64)
    positions = rng.permutation(n)[: min(n, len(specials))]
    x[positions] = specials[: len(positions)]
    return x


# --- constants and the shape of the hash ----------------------------------------------------


def test_field_modulus_is_bn254_scalar_field() -> None:
    assert int("30644e72e131a029b85045b68181585d2833e84879b9709143e1f593f0000001", 16) == P


def test_derived_constants_equal_ezkl_table() -> None:
    """Grain-LFSR derivation == src/circuit/modules/poseidon/poseidon_params.rs in EZKL."""
    rc = poseidon.round_constants()
    assert len(rc) == 64
    assert rc[0] == (
        0x09C46E9EC68E9BD4FE1FAABA294CBA38A71AA177534CDD1B6C7DC0DBD0ABD7A7,
        0x0C0356530896EEC42A97ED937F3135CFC5142B3AE405B8343C1D83FFA604CB81,
    )
    assert rc[63] == (
        0x1574C7EF0C43545F36A8CA08BDBDD8B075D2959E2F322B731675DE3E1982B4D0,
        0x269E4B5B7A2EB21AFD567970A717CEEC5BD4184571C254FDC06E03A7FF8378F0,
    )
    assert poseidon.mds_matrix() == (
        (
            0x066F6F85D6F68A85EC10345351A23A3AAF07F38AF8C952A7BCECA70BD2AF7AD5,
            0x2B9D4B4110C9AE997782E1509B1D0FDB20A7C02BBD8BEA7305462B9F8125B1E8,
        ),
        (
            0x0CC57CDBB08507D62BF67A4493CC262FB6C09D557013FFF1F573F431221F8FF9,
            0x1274E649A32ED355A31A6ED69724E1ADADE857E86EB5C3A121BCD147943203C8,
        ),
    )


def test_hash_is_the_length_independent_sponge(ezkl: ModuleType) -> None:
    """EZKL's hash: state [0, 2^64], absorb by adding into cell 0, permute, output cell 0."""
    xs = [5, -7, 123456789, 0]
    s0, s1 = 0, 1 << 64
    for x in xs:
        s0, s1 = poseidon._permute((s0 + x) % P, s1)
    assert s0 == oracle(ezkl, np.array(xs, dtype=np.int64))


def test_known_answer(ezkl: ModuleType) -> None:
    one = np.array([1], dtype=np.int64)
    expected = int.from_bytes(
        bytes.fromhex("90bbb9c2adeaf0b1cc6c34ed80f11266193aef9e5cfd18a6a1ca283261695608"), "little"
    )
    assert oracle(ezkl, one) == expected
    for backend in poseidon.BACKENDS:
        assert poseidon_hash(one, backend=backend) == expected


# --- equality of the three backends ---------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 1000, 20000])
def test_backends_agree(ezkl: ModuleType, n: int) -> None:
    x = signed_values(n, seed=n)
    native = poseidon_hash(x)
    assert 0 <= native < P
    assert native == poseidon_hash(x, backend="python")
    assert native == poseidon_hash(x, backend="ezkl")
    assert native == oracle(ezkl, x)


def test_felt_encoding_matches_float_to_felt(ezkl: ModuleType) -> None:
    """The obvious EZKL path (float -> float_to_felt -> poseidon_hash) gives the same hash."""
    q = np.array([0, 1, -1, 64, -64, 127, -128, 1000, -32768, 2**40, -(2**40)], dtype=np.int64)
    for v in q:
        assert ezkl.float_to_felt(float(v), 0) == (int(v) % P).to_bytes(32, "little").hex()
    felts = [ezkl.float_to_felt(float(v) / 128, 7) for v in q]
    (out,) = ezkl.poseidon_hash(felts)
    assert poseidon_hash(q) == int.from_bytes(bytes.fromhex(out), "little")


def test_appending_zero_changes_the_hash() -> None:
    x = np.array([3, 4], dtype=np.int64)
    assert poseidon_hash(x) != poseidon_hash(np.append(x, 0))
    assert poseidon_hash(x[:1]) != 3


def test_native_kernels_and_round_forms_agree() -> None:
    """The fastest kernel, the portable C kernel and the textbook rounds give the same bytes."""
    native = importlib.import_module("refute._poseidon")
    assert native.KERNEL in ("x86-64 mulx/adx", "portable C")
    x = signed_values(500, seed=7)
    assert native.hash(x) == native.hash_portable(x) == native.hash_plain(x)


# --- shapes, layouts and dtypes -------------------------------------------------------------


def test_multidimensional_is_flattened_in_c_order(ezkl: ModuleType) -> None:
    x = signed_values(60, seed=3).reshape(3, 4, 5)
    expected = oracle(ezkl, x.ravel(order="C"))
    assert poseidon_hash(x) == expected
    assert poseidon_hash(x, backend="python") == expected
    assert poseidon_hash(x, backend="ezkl") == expected
    assert poseidon_hash(np.asfortranarray(x)) == expected  # layout does not matter, order does
    assert poseidon_hash(x.transpose(2, 0, 1)) != expected
    assert poseidon_hash(np.array(7, dtype=np.int64)) == poseidon_hash(np.array([7]))  # 0-d


def test_non_contiguous_views() -> None:
    base = signed_values(400, seed=11).reshape(20, 20)
    for view in (base[::3, 1::2], base[:, 5], base[::-1], base.T, base[2:9, 3:4]):
        assert not view.flags.c_contiguous or view is base
        copy = np.ascontiguousarray(view)
        assert poseidon_hash(view) == poseidon_hash(copy) == poseidon_hash(view, backend="python")


def test_small_integer_dtypes_are_widened() -> None:
    x = np.array([-128, -1, 0, 1, 127], dtype=np.int64)
    expected = poseidon_hash(x)
    for dtype in (np.int8, np.int16, np.int32, ">i8"):
        assert poseidon_hash(x.astype(dtype)) == expected
    u = np.array([0, 1, 255], dtype=np.uint8)
    assert poseidon_hash(u) == poseidon_hash(u.astype(np.int64))
    assert poseidon_hash(u.astype(np.uint32)) == poseidon_hash(u.astype(np.int64))


@pytest.mark.parametrize(
    "bad",
    [
        np.array([0.5, 1.0]),
        np.array([1.0], dtype=np.float32),
        np.array([True, False]),
        np.array([2**63], dtype=np.uint64),
        np.array([1, 2], dtype=object),
        np.array(["1"]),
        [1, 2, 3],
    ],
    ids=["float64", "float32", "bool", "uint64", "object", "str", "list"],
)
@pytest.mark.parametrize("backend", ["native", "python", "ezkl"])
def test_wrong_types_are_refused(bad: Any, backend: str) -> None:
    with pytest.raises(CommitmentError):
        poseidon_hash(bad, backend=backend)


# --- empty tensors, backends, errors --------------------------------------------------------


def test_ezkl_gives_no_hash_for_zero_elements(ezkl: ModuleType) -> None:
    assert ezkl.poseidon_hash([]) == []


@pytest.mark.parametrize("backend", ["native", "python", "ezkl"])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 0, 2)])
def test_empty_is_refused(backend: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(CommitmentError, match="empty"):
        poseidon_hash(np.zeros(shape, dtype=np.int64), backend=backend)
    with pytest.raises(CommitmentError, match="empty"):
        poseidon_hash_many([np.ones(3, dtype=np.int64), np.zeros(shape, dtype=np.int64)])


def test_unknown_backend() -> None:
    x = np.ones(2, dtype=np.int64)
    with pytest.raises(CommitmentError, match="unknown Poseidon backend"):
        poseidon_hash(x, backend="gpu")
    with pytest.raises(CommitmentError, match="unknown Poseidon backend"):
        poseidon_hash_many([x], backend="")


def test_missing_native_extension_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def fake_import(name: str, package: str | None = None) -> ModuleType:
        if name == "refute._poseidon":
            raise ImportError("No module named 'refute._poseidon'")
        return real_import(name, package)

    poseidon._native.cache_clear()
    monkeypatch.setattr(importlib, "import_module", fake_import)
    try:
        with pytest.raises(CommitmentError, match="pip install"):
            poseidon_hash(np.ones(2, dtype=np.int64))
        with pytest.raises(CommitmentError, match="pip install"):
            poseidon_hash_many([np.ones(2, dtype=np.int64)], workers=1)
        # the other backends do not need it
        assert poseidon_hash(np.ones(2, dtype=np.int64), backend="python") > 0
    finally:
        monkeypatch.undo()
        poseidon._native.cache_clear()
    assert poseidon_hash(np.ones(2, dtype=np.int64)) > 0


# --- many tensors ---------------------------------------------------------------------------


def test_hash_many_order_and_equality() -> None:
    rng = np.random.default_rng(5)
    arrays = [
        rng.integers(-1000, 1000, size=int(n), dtype=np.int64)
        for n in rng.integers(1, 3000, size=9)
    ]
    arrays.append(signed_values(8, seed=1).reshape(2, 4)[:, ::2])  # non-contiguous
    singles = [poseidon_hash(a) for a in arrays]
    assert len(set(singles)) == len(singles)
    for workers in (None, 1, 2, 8):
        assert poseidon_hash_many(arrays, workers=workers) == singles
    assert poseidon_hash_many(arrays[:3], backend="python", workers=1) == singles[:3]
    assert poseidon_hash_many([]) == []


def test_hash_many_in_worker_processes(ezkl: ModuleType) -> None:
    arrays = [signed_values(n, seed=n) for n in (40, 3, 17)]
    expected = [oracle(ezkl, a) for a in arrays]
    assert poseidon_hash_many(arrays, workers=2, backend="python") == expected
    assert poseidon_hash_many(arrays, workers=2, backend="ezkl") == expected


def test_hash_many_validates_everything_first() -> None:
    good = np.ones(5, dtype=np.int64)
    with pytest.raises(CommitmentError, match="integer tensors"):
        poseidon_hash_many([good, good, np.ones(5)], workers=2)
    with pytest.raises(CommitmentError, match="workers"):
        poseidon_hash_many([good], workers=0)


# --- properties -----------------------------------------------------------------------------

int64s = st.integers(min_value=I64_MIN, max_value=I64_MAX)


@settings(max_examples=150, deadline=None)
@given(st.lists(int64s, min_size=1, max_size=40))
def test_native_equals_python(values: list[int]) -> None:
    x = np.array(values, dtype=np.int64)
    assert poseidon_hash(x) == poseidon_hash(x, backend="python")


@settings(max_examples=15, deadline=None)
@given(st.lists(int64s, min_size=1, max_size=12))
def test_native_equals_ezkl(ezkl: ModuleType, values: list[int]) -> None:
    x = np.array(values, dtype=np.int64)
    assert poseidon_hash(x) == oracle(ezkl, x)
