"""The two C extensions: the gateway's fan-out write loop and the load
generator's receive loop. Everything else about the package is in
pyproject.toml. ``optional``: where no C compiler is found the package
installs without them and runs the same loops in Python
(redis_ws_gateway/fanout.py, bench.Receiver), which `/metrics`, the startup
log and the bench report show."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "redis_ws_gateway._fanout",
            sources=["src/redis_ws_gateway/_fanout.c"],
            optional=True,
        ),
        Extension(
            "redis_ws_gateway._recvloop",
            sources=["src/redis_ws_gateway/_recvloop.c"],
            optional=True,
        ),
    ]
)
