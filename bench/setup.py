"""The load generator's receive loop and the floor's write loop in C
(docs/BENCHMARKS.md, "Method"). ``optional``: without a C compiler the
bench reads with asyncio Protocols and the floor writes with the gateway's
Python loop, and the report says so."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "redis_ws_bench._writeloop",
            sources=["src/redis_ws_bench/_writeloop.c"],
            optional=True,
        ),
        Extension(
            "redis_ws_bench._recvloop",
            sources=["src/redis_ws_bench/_recvloop.c"],
            # Compressed frames (--deflate) are inflated far enough to time them.
            libraries=["z"],
            optional=True,
        ),
    ]
)
