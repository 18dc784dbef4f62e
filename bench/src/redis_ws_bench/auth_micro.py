"""What authenticating one connection's JWT costs the gateway, without
sockets: ``Authenticator.authenticate`` over N distinct tokens, as W7's
clients carry them (HS256 and RS256), with the token cache off, on and cold
(every token new: a miss and an insert) and on and warm (every token seen:
what a reconnect storm pays). Rounds alternate, so a neighbour's burst lands
on every variant alike; each cell is the median of the rounds, in CPU
microseconds per token (process time).

    .venv/bin/python -m redis_ws_bench.auth_micro [--tokens 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from redis_ws_gateway.config import load_settings
from redis_ws_gateway.security.auth import Authenticator, build_acl


def _credentials(alg: str, n: int, workdir: Path) -> tuple[list[str], dict[str, str]]:
    now = int(time.time())
    claims = [{"sub": f"user-{i}", "exp": now + 3600, "iat": now} for i in range(n)]
    if alg == "HS256":
        secret = base64.b64encode(os.urandom(32)).decode()
        env = {"JWT_SECRET": secret, "JWT_ALGORITHMS": "HS256"}
        return [jwt.encode(c, secret, algorithm="HS256") for c in claims], env
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = workdir / "public.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    env = {"JWT_PUBLIC_KEY_FILE": str(pem), "JWT_ALGORITHMS": "RS256"}
    return [jwt.encode(c, key, algorithm="RS256") for c in claims], env


async def _per_token(auth: Authenticator, tokens: list[str]) -> float:
    t0 = time.process_time()
    for token in tokens:
        await auth.authenticate(token)
    return (time.process_time() - t0) / len(tokens) * 1e6


async def main(n: int, rounds: int) -> None:
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        creds = {alg: _credentials(alg, n, Path(tmp)) for alg in ("HS256", "RS256")}
        for _ in range(rounds):
            for alg, (tokens, env) in creds.items():
                off = load_settings({**env, "JWT_CACHE_SIZE": "0"})
                on = load_settings({**env, "JWT_CACHE_SIZE": str(max(n, 1))})
                a_off = Authenticator(off, build_acl(off.roles))
                a_on = Authenticator(on, build_acl(on.roles))
                results.setdefault((alg, "off"), []).append(await _per_token(a_off, tokens))
                results.setdefault((alg, "cold"), []).append(await _per_token(a_on, tokens))
                results.setdefault((alg, "warm"), []).append(await _per_token(a_on, tokens))
    print(f"{n} tokens, {rounds} alternating rounds; CPU us per token, median (range)")
    print("| alg | cache off | cache on, cold (miss + insert) | cache on, warm (hit) |")
    print("|---|---:|---:|---:|")
    for alg in ("HS256", "RS256"):
        cells = []
        for variant in ("off", "cold", "warm"):
            v = results[(alg, variant)]
            cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})")
        print(f"| {alg} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    asyncio.run(main(max(1, args.tokens), max(1, args.rounds)))
    sys.exit(0)
