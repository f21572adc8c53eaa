"""Build the native extensions (EZKL's Poseidon; chunked SHA-256 on OpenSSL's libcrypto); all
other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("refute._poseidon", ["refute/_poseidon.c"], extra_compile_args=["-O3"]),
        Extension("refute._sha256chunks", ["refute/_sha256chunks.c"],
                  extra_compile_args=["-O3"], libraries=["crypto"]),
    ],
)
