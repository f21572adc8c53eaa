"""Build the native Poseidon extension; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[Extension("refute._poseidon", ["refute/_poseidon.c"], extra_compile_args=["-O3"])],
)
