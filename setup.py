"""The block decoder in C (fanoutd/decode.py is the reference, and the fallback when it
cannot be built): see docs/performance.md. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "fanoutd._fastpath", sources=["fanoutd/_fastpath.c"], optional=True,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"])])
