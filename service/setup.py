"""The gateway's C extension: the fan-out write loop. Everything else about
the package is in pyproject.toml. ``optional``: where no C compiler is found
the package installs without it and runs the same loop in Python
(redis_ws_gateway/fanout/writer.py), which `/metrics` and the startup log
show."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "redis_ws_gateway.fanout._fanout",
            sources=["src/redis_ws_gateway/fanout/_fanout.c"],
            optional=True,
        ),
    ]
)
