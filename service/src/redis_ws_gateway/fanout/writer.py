"""One frame to many sockets: the hub's direct writes.

``write_each`` is the C loop of ``_fanout`` when the package was built with
it, else ``write_each_py``, the same loop in Python with the same results.
Both write the whole frame to each descriptor with one ``write`` and report
the descriptors that did not take it whole, so the hub can hand the rest to
that session's transport (``Session.direct_failed``). Given the sessions'
transports too, they skip (and report) each one that is closing: its
descriptor may already be closed and its number reused (session.py).
"""

from __future__ import annotations

import os
from typing import Any, Final, Protocol


class WriteEach(Protocol):
    def __call__(
        self, frame: bytes, fds: list[int], transports: list[Any] | None = None, /
    ) -> list[tuple[int, int]] | None: ...


def write_each_py(
    frame: bytes, fds: list[int], transports: list[Any] | None = None
) -> list[tuple[int, int]] | None:
    """``_fanout.write_each`` in Python: None when every write took the whole
    frame, else (index, written) per other descriptor, with 0 for a full
    socket and -1 for an error or (given ``transports``, one per descriptor)
    a transport that is closing, whose descriptor is not written."""
    if transports is not None and len(transports) != len(fds):
        raise TypeError("as many transports as fds")
    failed: list[tuple[int, int]] | None = None
    size = len(frame)
    write = os.write
    for i, fd in enumerate(fds):
        if transports is not None and transports[i].is_closing():
            done = -1
        else:
            try:
                done = write(fd, frame)
            except (BlockingIOError, InterruptedError):
                done = 0
            except OSError:
                done = -1
        if done != size:
            if failed is None:
                failed = []
            failed.append((i, done))
    return failed


write_each_c: WriteEach | None
try:
    from redis_ws_gateway.fanout._fanout import write_each as write_each_c
except ImportError:  # built without a C compiler
    write_each_c = None

NATIVE: Final = write_each_c is not None
write_each: WriteEach = write_each_py if write_each_c is None else write_each_c


def select(native: bool) -> WriteEach:
    """The loop the hub uses: C when built and wanted (setting NATIVE_WRITES)."""
    return write_each if native else write_each_py
