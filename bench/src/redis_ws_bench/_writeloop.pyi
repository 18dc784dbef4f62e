from typing import Any

def write_each(
    frame: bytes, fds: list[int], transports: list[Any] | None = None, /
) -> list[tuple[int, int]] | None: ...
