#!/usr/bin/env python3
"""Where an idle subscribed connection's memory goes (docs/BENCHMARKS.md, W3).

An in-process gateway (tests/support) on uvloop with tracemalloc; N raw-socket
clients in a child process upgrade and subscribe. Prints the heap growth per
connection and the biggest allocation sites.

    .venv/bin/python scripts/w3_tracemalloc.py            # N=2000, by traceback
    N=2000 KEY=lineno DEPTH=1 SHOW=1 .venv/bin/python scripts/w3_tracemalloc.py
"""
import sys

if len(sys.argv) > 1 and sys.argv[1] == "--clients":
    sys.argv = sys.argv[1:]
    import asyncio, sys, resource
    import uvloop
    port=int(sys.argv[1]); n=int(sys.argv[2])
    req=(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    body=b'{"action":"subscribe","channels":["bench:w3:0"]}'
    key=b"\x01\x02\x03\x04"
    frame=bytes([0x81,0x80|len(body)])+key+bytes(b^key[i%4] for i,b in enumerate(body))
    class C(asyncio.Protocol):
        def __init__(s, done): s.done=done; s.buf=b""; s.state=0
        def connection_made(s, t): s.t=t; t.write(req)
        def data_received(s, d):
            s.buf+=d
            if s.state==0 and b"\r\n\r\n" in s.buf:
                s.state=1; s.t.write(frame)
            if s.state==1 and b"subscribed" in s.buf:
                s.state=2; s.buf=b""
                if not s.done.done(): s.done.set_result(None)
    async def main():
        loop=asyncio.get_running_loop(); ts=[]
        async def one():
            done=loop.create_future()
            t,_=await loop.create_connection(lambda: C(done),"127.0.0.1",port)
            await asyncio.wait_for(done,20); ts.append(t)
        for i in range(0,n,100):
            await asyncio.gather(*(one() for _ in range(min(100,n-i))))
        print("ready",len(ts),flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    uvloop.run(main())
    sys.exit(0)

import asyncio, gc, os, sys, tracemalloc
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import uvloop
from tests.support.redis_server import RedisServer
from tests.support.gateway import RunningGateway, gateway_settings

N = int(os.environ.get("N", "2000"))
async def clients(port, n):
    p = await asyncio.create_subprocess_exec(sys.executable, os.path.abspath(__file__), "--clients", str(port), str(n),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    line = await p.stdout.readline(); assert line.startswith(b"ready"), line
    return p
async def main():
    rs = RedisServer(); rs.start()
    gw = await RunningGateway(gateway_settings(rs.url, log_level="warning")).start()
    warm = await clients(gw.settings.port, 1)
    await asyncio.sleep(0.5); gc.collect()
    tracemalloc.start(int(os.environ.get("DEPTH", "12")))
    s0 = tracemalloc.take_snapshot()
    p = await clients(gw.settings.port, N)
    await asyncio.sleep(1.5); gc.collect()
    s1 = tracemalloc.take_snapshot()
    filt=[tracemalloc.Filter(False, tracemalloc.__file__)]
    key = os.environ.get("KEY", "traceback")
    stats = s1.filter_traces(filt).compare_to(s0.filter_traces(filt), key)
    total = sum(st.size_diff for st in stats)
    print("sessions", len(gw.gateway.sessions), "heap growth per conn:", round(total/N,1))
    rows = sorted(stats, key=lambda st: -st.size_diff)
    for st in rows[:int(os.environ.get("TOP","20"))]:
        if st.size_diff <= 0: break
        tb = "\n".join(f"    {f.filename.split('site-packages/')[-1].split('/src/')[-1]}:{f.lineno}" for f in list(st.traceback)[-int(os.environ.get("SHOW","6")):])
        print(f"{st.size_diff/N:8.1f} B/conn {st.count_diff/N:6.2f} obj/conn\n{tb}")
    tracemalloc.stop()
    for q in (p, warm): q.stdin.write(b"\n"); await q.stdin.drain(); await q.wait()
    await gw.stop(); rs.stop()
uvloop.run(main())
