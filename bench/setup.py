"""The load generator's receive loop in C (docs/BENCHMARKS.md, "Method").
``optional``: without a C compiler the bench reads with asyncio Protocols
and its report says so."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "redis_ws_bench._recvloop",
            sources=["src/redis_ws_bench/_recvloop.c"],
            # Compressed frames (--deflate) are inflated far enough to time them.
            libraries=["z"],
            optional=True,
        ),
    ]
)
