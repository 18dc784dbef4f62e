"""The SDK's bookkeeping: seq gaps, epochs, offsets, typed messages and errors,
backoff; then reconnect and durable resume against a scripted WebSocket server
(the real gateway's durable channels are tested in tests/integration)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web

from redis_ws_client.client import (
    BadChannelError,
    ConnectionClosed,
    ForbiddenError,
    Gap,
    Message,
    NotSubscribedError,
    ServerError,
    TooManyChannelsError,
    UnauthorizedError,
    UpstreamUnavailableError,
)
from redis_ws_client.sdk import (
    ResilientClient,
    Subscription,
    SubscriptionDropped,
    backoff_delay,
    is_pattern,
    offset_key,
)
from tests.support.wait import eventually

# --- pure helpers -------------------------------------------------------------------


def test_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    assert backoff_delay(0, 0.25, 10.0, rand=lambda: 0.0) == 0.0
    assert backoff_delay(0, 0.25, 10.0, rand=lambda: 0.5) == pytest.approx(0.125)
    assert backoff_delay(3, 0.25, 10.0, rand=lambda: 0.5) == pytest.approx(1.0)
    assert backoff_delay(10, 0.25, 10.0, rand=lambda: 0.999) == pytest.approx(9.99)
    # A huge attempt count must neither overflow nor exceed the cap.
    assert backoff_delay(10_000, 0.25, 10.0, rand=lambda: 0.999) < 10.0


def test_offsets_compare_as_stream_ids_not_strings() -> None:
    assert offset_key("1732610000000-5") == (1732610000000, 5)
    assert offset_key("0") == (0, 0)
    assert offset_key("999-10") > offset_key("999-9")  # type: ignore[operator]
    assert offset_key("1000-0") > offset_key("999-99")  # type: ignore[operator]
    assert offset_key("not-an-id") is None


def test_is_pattern_matches_the_gateways_rule() -> None:
    assert is_pattern("market:*") and is_pattern("a?b") and is_pattern("md:[ab]")
    assert not is_pattern("market:tick:NIFTY")


def test_message_from_frame_decodes_base64_payloads_to_bytes() -> None:
    raw = b"\xff\x00binary"
    msg = Message.from_frame(
        {
            "type": "data",
            "channel": "c",
            "seq": 3,
            "encoding": "base64",
            "data": base64.b64encode(raw).decode(),
        }
    )
    assert msg.data == raw and msg.seq == 3 and msg.offset is None and not msg.replay
    replayed = Message.from_frame(
        {"type": "data", "channel": "d", "replay": True, "offset": "5-0", "data": {"a": 1}}
    )
    assert replayed.seq is None and replayed.replay and replayed.offset == "5-0"
    assert replayed.key == "d" and replayed.data == {"a": 1}


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("bad_channel", BadChannelError),
        ("forbidden", ForbiddenError),
        ("too_many_channels", TooManyChannelsError),
        ("not_subscribed", NotSubscribedError),
        ("unauthorized", UnauthorizedError),
        ("upstream_unavailable", UpstreamUnavailableError),
    ],
)
def test_server_errors_get_the_subclass_of_their_code(code: str, kind: type[ServerError]) -> None:
    frame = {"type": "error", "code": code, "message": "m", "channel": "x", "requestId": "r1"}
    exc = ServerError.from_frame(frame)
    assert type(exc) is kind
    assert (exc.code, exc.message, exc.channel, exc.request_id) == (code, "m", "x", "r1")


def test_unknown_error_codes_stay_plain_server_errors() -> None:
    exc = ServerError.from_frame({"type": "error", "code": "brand_new", "message": "?"})
    assert type(exc) is ServerError and exc.code == "brand_new"


def test_since_and_snapshot_are_checked() -> None:
    client = ResilientClient("ws://127.0.0.1:9/ws")
    with pytest.raises(ValueError):
        client.subscribe_iter("a", since="1-0", snapshot=3)
    with pytest.raises(ValueError):
        client.subscribe_iter("a", since={"b": "1-0"})
    with pytest.raises(ValueError):
        client.subscribe_iter("a:*", since={"a:*": "1-0"})
    with pytest.raises(ValueError):
        client.subscribe_iter()


# --- frame bookkeeping, frame by frame -----------------------------------------------


class Harness:
    """A client connected to a server whose every frame the test writes by
    hand. Subscribe requests wait for the test's ``reply``; pings and
    unsubscribes are answered at once. ``feed`` returns once the client has
    handled the frame: a ping sent after it has been answered."""

    def __init__(self) -> None:
        self.gaps: list[Gap] = []
        self.client = ResilientClient(
            "ws://127.0.0.1:9/ws", on_gap=self.gaps.append, backoff_base=0.01, backoff_max=0.05
        )
        self.subscribes: list[dict[str, Any]] = []
        self._ws: web.WebSocketResponse | None = None
        self._starts: list[asyncio.Task[Subscription]] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> Harness:
        app = web.Application()
        app.router.add_get("/ws", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.client.url = f"ws://127.0.0.1:{self._runner.addresses[0][1]}/ws"
        await self.client.connect()
        return self

    async def stop(self) -> None:
        await self.client.close()
        await asyncio.gather(*self._starts, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        async for msg in ws:
            req = orjson.loads(msg.data)
            rid = req.get("requestId")
            if req["action"] == "ping":
                await ws.send_str(orjson.dumps({"type": "pong", "requestId": rid}).decode())
            elif req["action"] == "unsubscribe":
                reply = {"type": "unsubscribed", "requestId": rid, "channels": req["channels"]}
                await ws.send_str(orjson.dumps(reply).decode())
            else:
                self.subscribes.append(req)
        return ws

    async def _next_subscribe(self, sent: int, what: str) -> None:
        await eventually(lambda: len(self.subscribes) > sent, timeout=5, what=what)

    async def subscribe(self, *names: str, **kwargs: Any) -> Subscription:
        """The subscription once its request has reached the server."""
        sub = self.client.subscribe_iter(*names, **kwargs)
        sent = len(self.subscribes)
        self._starts.append(asyncio.create_task(sub.start()))
        await self._next_subscribe(sent, f"the subscribe request for {names}")
        return sub

    async def feed(self, **frame: Any) -> None:
        assert self._ws is not None
        await self._ws.send_str(orjson.dumps(frame).decode())
        await self.client.ping()

    async def reply(self, *states: dict[str, Any], request_id: str | None = None) -> None:
        """The ``subscribed`` reply to the latest subscribe request (or to
        ``request_id``)."""
        rid = request_id or self.subscribes[-1]["requestId"]
        await self.feed(type="subscribed", requestId=rid, subscriptions=list(states))

    async def data(self, channel: str, seq: int | None, **extra: Any) -> None:
        frame: dict[str, Any] = {"type": "data", "channel": channel, "data": {"seq": seq}}
        if seq is not None:
            frame["seq"] = seq
        await self.feed(**frame, **extra)

    async def reconnect(self) -> list[Any]:
        """The server closes the connection (1012); the client comes back and
        subscribes again. Returns what that request asked for."""
        assert self._ws is not None
        sent = len(self.subscribes)
        await self._ws.close(code=1012)
        await self._next_subscribe(sent, "the subscribe request after reconnecting")
        return list(self.subscribes[-1]["channels"])


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = await Harness().start()
    yield harness
    await harness.stop()


async def _drain(sub: Subscription, n: int) -> list[Message]:
    return [await sub.get(timeout=1) for _ in range(n)]


async def test_seq_jump_within_an_epoch_is_a_gap_with_the_exact_count(h: Harness) -> None:
    sub = await h.subscribe("market:tick:X")
    await h.reply({"channel": "market:tick:X", "epoch": "e1", "seq": 41, "live": True})
    for seq in (42, 43, 47, 48):
        await h.data("market:tick:X", seq)
    msgs = await _drain(sub, 4)
    assert [m.seq for m in msgs] == [42, 43, 47, 48]
    assert [m.gap for m in msgs[:2]] == [None, None] and msgs[3].gap is None
    gap = msgs[2].gap
    assert gap is not None and h.gaps == [gap]
    assert (gap.reason, gap.expected, gap.got, gap.missed, gap.epoch) == ("seq", 44, 47, 3, "e1")
    assert h.client.stats.gaps == 1 and h.client.stats.missed == 3
    assert all(m.epoch == "e1" for m in msgs)


async def test_first_frame_after_the_reply_continues_its_seq(h: Harness) -> None:
    sub = await h.subscribe("a")
    await h.reply({"channel": "a", "epoch": "e1", "seq": 0, "live": True})
    await h.data("a", 2)
    msg = await sub.get(timeout=1)
    assert msg.gap is not None and msg.gap.missed == 1


async def test_upstream_loss_is_one_gap_and_new_epoch_frames_before_the_notice_count(
    h: Harness,
) -> None:
    sub = await h.subscribe("a")
    await h.reply({"channel": "a", "epoch": "e1", "seq": 5, "live": True})
    await h.feed(type="upstream_lost", subscriptions=[{"channel": "a"}])
    # The new epoch's first messages can arrive before the notice naming it.
    await h.data("a", 1)
    await h.data("a", 2)
    await h.feed(
        type="resubscribed",
        subscriptions=[{"channel": "a", "epoch": "e2", "seq": 1, "live": True}],
    )
    await h.data("a", 3)
    msgs = await _drain(sub, 3)
    assert [g.reason for g in h.gaps] == ["upstream"]
    assert msgs[2].gap is not None and msgs[2].gap.reason == "upstream"
    assert msgs[2].epoch == "e2"


async def test_pattern_and_exact_subscriptions_count_seq_separately(h: Harness) -> None:
    sub = await h.subscribe("s:N", "s:*")
    await h.reply(
        {"channel": "s:N", "epoch": "e1", "seq": 0, "live": True},
        {"pattern": "s:*", "epoch": "e2", "seq": 10, "live": True},
    )
    await h.data("s:N", 1)
    await h.data("s:N", 11, pattern="s:*")
    await h.data("s:N", 2)
    msgs = await _drain(sub, 3)
    assert [m.key for m in msgs] == ["s:N", "s:*", "s:N"]
    assert h.gaps == []


async def test_replay_frames_carry_offsets_and_leave_seq_alone(h: Harness) -> None:
    sub = await h.subscribe("d:1", since="100-0")
    await h.data("d:1", None, replay=True, offset="100-1")
    await h.data("d:1", None, replay=True, offset="101-0")
    await h.reply(
        {
            "channel": "d:1",
            "epoch": "e1",
            "seq": 7,
            "live": True,
            "durable": True,
            "offset": "101-0",
            "replayed": 2,
            "complete": True,
        }
    )
    await h.data("d:1", 8, offset="102-0")
    msgs = await _drain(sub, 3)
    assert [(m.replay, m.seq, m.offset) for m in msgs] == [
        (True, None, "100-1"),
        (True, None, "101-0"),
        (False, 8, "102-0"),
    ]
    assert h.gaps == [] and h.client.stats.replayed == 2
    (state,) = h.client.subscriptions()
    assert state.durable and state.offset == "102-0"


async def test_an_entry_at_or_before_the_last_offset_is_a_duplicate(h: Harness) -> None:
    sub = await h.subscribe("d:1", since="5-0")
    await h.data("d:1", None, replay=True, offset="5-0")
    await h.data("d:1", None, replay=True, offset="6-0")
    await h.data("d:1", None, replay=True, offset="6-0")
    await h.data("d:1", None, replay=True, offset="10-0")
    msgs = await _drain(sub, 2)
    assert [m.offset for m in msgs] == ["6-0", "10-0"]
    assert h.client.stats.duplicates == 2


async def test_reconnect_resumes_durable_channels_and_reports_plain_ones(h: Harness) -> None:
    sub = await h.subscribe("plain", "d:1", "d:empty")
    await h.reply(
        {"channel": "plain", "epoch": "e1", "seq": 0, "live": True},
        {"channel": "d:1", "epoch": "e2", "seq": 0, "live": True, "durable": True,
         "offset": "50-0", "replayed": 0, "complete": True},
        {"channel": "d:empty", "epoch": "e3", "seq": 0, "live": True, "durable": True,
         "offset": "0-0", "replayed": 0, "complete": True},
    )  # fmt: skip
    await h.data("d:1", 1, offset="51-0")
    await _drain(sub, 1)
    assert await h.reconnect() == [
        "plain",
        {"channel": "d:1", "since": "51-0"},
        {"channel": "d:empty", "since": "0-0"},
    ]
    await h.reply(
        {"channel": "plain", "epoch": "e4", "seq": 0, "live": True},
        {"channel": "d:1", "epoch": "e5", "seq": 0, "live": True, "durable": True,
         "offset": "51-0", "replayed": 0, "complete": True},
        {"channel": "d:empty", "epoch": "e6", "seq": 0, "live": True, "durable": True,
         "offset": "0-0", "replayed": 0, "complete": False},
    )  # fmt: skip
    assert sorted((g.key, g.reason) for g in h.gaps) == [
        ("d:empty", "trimmed"),
        ("plain", "reconnect"),
    ]


async def test_snapshot_of_a_durable_channel_gives_way_to_resume(h: Harness) -> None:
    await h.subscribe("d:1", snapshot=5)
    assert h.subscribes[-1]["channels"] == [{"channel": "d:1", "snapshot": 5}]
    await h.reply(
        {"channel": "d:1", "epoch": "e1", "seq": 0, "live": True, "durable": True,
         "offset": "9-0", "replayed": 5, "complete": True},
    )  # fmt: skip
    assert await h.reconnect() == [{"channel": "d:1", "since": "9-0"}]


async def test_state_snapshot_of_a_plain_channel_is_asked_again_after_reconnect(h: Harness) -> None:
    sub = await h.subscribe("positions:alice", snapshot=1)
    await h.feed(type="snapshot", channel="positions:alice", data={"qty": 50})
    await h.reply(
        {"channel": "positions:alice", "epoch": "e1", "seq": 0, "live": True, "snapshot": True}
    )
    msg = await sub.get(timeout=1)
    assert msg.kind == "snapshot" and msg.data == {"qty": 50} and msg.seq is None
    assert await h.reconnect() == [{"channel": "positions:alice", "snapshot": 1}]


async def test_a_stale_reply_does_not_overwrite_the_latest_request(h: Harness) -> None:
    await h.subscribe("a")
    first = h.subscribes[-1]["requestId"]
    # Unanswered when the connection drops: sent again as a new request.
    await h.reconnect()
    assert h.subscribes[-1]["requestId"] != first
    await h.reply({"channel": "a", "epoch": "old", "seq": 99, "live": True}, request_id=first)
    (state,) = h.client.subscriptions()
    assert state.epoch is None
    await h.reply({"channel": "a", "epoch": "new", "seq": 0, "live": True})
    (state,) = h.client.subscriptions()
    assert state.epoch == "new" and state.last_seq == 0


async def test_forbidden_after_refresh_ends_the_subscription_with_a_typed_error(h: Harness) -> None:
    errors: list[BaseException] = []
    h.client.on_error = errors.append
    sub = await h.subscribe("engine:decision:X")
    await h.reply({"channel": "engine:decision:X", "epoch": "e1", "seq": 0, "live": True})
    await h.data("engine:decision:X", 1)
    await h.feed(type="unsubscribed", channels=["engine:decision:X"], reason="forbidden")
    assert (await sub.get(timeout=1)).seq == 1
    with pytest.raises(SubscriptionDropped) as err:
        await sub.get(timeout=1)
    assert err.value.reason == "forbidden" and err.value.key == "engine:decision:X"
    assert errors == [err.value]


async def test_a_throwing_gap_callback_does_not_stop_delivery(h: Harness) -> None:

    def explode(_: Gap) -> None:
        raise RuntimeError("boom")

    h.client.on_gap = explode
    sub = await h.subscribe("a")
    await h.reply({"channel": "a", "epoch": "e1", "seq": 0, "live": True})
    await h.data("a", 5)
    assert (await sub.get(timeout=1)).seq == 5


async def test_a_full_queue_holds_the_reader_until_the_consumer_reads(h: Harness) -> None:
    sub = await h.subscribe("a", queue_size=2)
    await h.reply({"channel": "a", "epoch": "e1", "seq": 0, "live": True})
    await h.data("a", 1)
    await h.data("a", 2)
    third = asyncio.create_task(h.data("a", 3))
    await eventually(lambda: h.client.backpressured, timeout=5, what="the reader to be held")
    assert not third.done() and h.client.backpressured
    assert (await sub.get(timeout=1)).seq == 1
    await asyncio.wait_for(third, 1)
    assert not h.client.backpressured
    assert [m.seq for m in await _drain(sub, 2)] == [2, 3]


async def test_closing_a_subscription_releases_a_blocked_reader(h: Harness) -> None:
    sub = await h.subscribe("a", queue_size=1)
    await h.data("a", 1)
    blocked = asyncio.create_task(h.data("a", 2))
    await eventually(lambda: h.client.backpressured, timeout=5, what="the reader to be held")
    assert not blocked.done()
    await sub.close()
    await asyncio.wait_for(blocked, 1)


# --- against a scripted server ------------------------------------------------------------


class ScriptedGateway:
    """Just enough of the protocol, durable channels included, to see what the
    client sends and to cut connections at will. ``durable`` names the
    channels backed by a (fake) stream; ``objects=False`` answers channel
    objects with bad_request, like a gateway without durable channels."""

    def __init__(self, durable: set[str], objects: bool = True) -> None:
        self.durable = durable
        self.objects = objects
        self.refuse: dict[str, str] = {}
        self.requests: list[dict[str, Any]] = []
        self.stream: dict[str, list[tuple[str, Any]]] = {c: [] for c in durable}
        self.seq: dict[str, int] = {}
        self.sockets: dict[web.WebSocketResponse, set[str]] = {}
        self.connections = 0
        self.accepting = True
        self.subscribed = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> ScriptedGateway:
        app = web.Application()
        app.router.add_get("/ws", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{port}/ws"
        return self

    async def stop(self) -> None:
        await self.kill()
        if self._runner is not None:
            await self._runner.cleanup()

    async def kill(self, code: int = 1012) -> None:
        for ws in list(self.sockets):
            await ws.close(code=code)

    async def append(self, channel: str, data: Any) -> str:
        entries = self.stream[channel]
        offset = f"{1000 + len(entries)}-0"
        entries.append((offset, data))
        for ws, subs in list(self.sockets.items()):
            if channel in subs and not ws.closed:
                self.seq[channel] = self.seq.get(channel, 0) + 1
                frame = {"type": "data", "channel": channel, "seq": self.seq[channel]}
                await self._send(ws, {**frame, "offset": offset, "data": data})
        return offset

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not self.accepting:
            return web.Response(status=503, text="draining\n")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        self.sockets[ws] = set()
        self.seq.clear()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                req = orjson.loads(msg.data)
                self.requests.append(req)
                await self._answer(ws, req)
        del self.sockets[ws]
        return ws

    async def _send(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        await ws.send_str(orjson.dumps(frame).decode())

    async def _answer(self, ws: web.WebSocketResponse, req: dict[str, Any]) -> None:
        rid = req.get("requestId")
        if req["action"] == "ping":
            await self._send(ws, {"type": "pong", "requestId": rid, "time": 0})
            return
        if req["action"] == "unsubscribe":
            self.sockets[ws] -= set(req.get("channels") or self.sockets[ws])
            await self._send(ws, {"type": "unsubscribed", "requestId": rid, "channels": []})
            return
        names = [c["channel"] if isinstance(c, dict) else c for c in req["channels"]]
        for item, name in zip(req["channels"], names, strict=True):
            if isinstance(item, dict) and not self.objects:
                msg = "channels must be a non-empty list of strings"
                await self._send(
                    ws, {"type": "error", "requestId": rid, "code": "bad_request", "message": msg}
                )
                return
            if name in self.refuse:
                await self._send(
                    ws,
                    {"type": "error", "requestId": rid, "code": self.refuse[name],
                     "message": "no", "channel": name},
                )  # fmt: skip
                return
        states = []
        for item, name in zip(req["channels"], names, strict=True):
            state: dict[str, Any] = {"channel": name, "epoch": f"ep{self.connections}", "seq": 0}
            state["live"] = True
            if name in self.durable:
                entries = self.stream[name]
                since = item.get("since") if isinstance(item, dict) else None
                replayed = 0
                if since is not None:
                    after = offset_key(since)
                    for offset, data in entries:
                        if after is None or offset_key(offset) > after:  # type: ignore[operator]
                            frame = {"type": "data", "channel": name, "replay": True}
                            await self._send(ws, {**frame, "offset": offset, "data": data})
                            replayed += 1
                last = entries[-1][0] if entries else "0-0"
                state.update(durable=True, offset=last, replayed=replayed, complete=True)
            states.append(state)
            self.sockets[ws].add(name)
        await self._send(
            ws, {"type": "subscribed", "requestId": rid, "channels": names, "subscriptions": states}
        )
        self.subscribed.set()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedGateway]:
    gw = await ScriptedGateway({"d:1"}).start()
    yield gw
    await gw.stop()


def _fast(url: str, **kwargs: Any) -> ResilientClient:
    return ResilientClient(url, backoff_base=0.02, backoff_max=0.1, **kwargs)


async def test_durable_channel_resumes_after_the_last_offset_without_loss_or_repeat(
    scripted: ScriptedGateway,
) -> None:
    gaps: list[Gap] = []
    async with _fast(scripted.url, on_gap=gaps.append) as client:
        async with client.subscribe_iter("d:1", "plain") as sub:
            for i in range(3):
                await scripted.append("d:1", {"n": i})
            got = [await sub.get(timeout=2) for _ in range(3)]
            scripted.subscribed.clear()
            scripted.accepting = False
            await scripted.kill()
            # Published while the client is away: must come back as replay.
            await scripted.append("d:1", {"n": 3})
            await scripted.append("d:1", {"n": 4})
            scripted.accepting = True
            await asyncio.wait_for(scripted.subscribed.wait(), 5)
            await scripted.append("d:1", {"n": 5})
            got += [await sub.get(timeout=2) for _ in range(3)]
    subscribes = [r["channels"] for r in scripted.requests if r["action"] == "subscribe"]
    assert subscribes == [["d:1", "plain"], [{"channel": "d:1", "since": "1002-0"}, "plain"]]
    assert [m.data["n"] for m in got] == [0, 1, 2, 3, 4, 5]
    assert [m.replay for m in got] == [False, False, False, True, True, False]
    assert [g.key for g in gaps] == ["plain"] and gaps[0].reason == "reconnect"
    assert client.stats.reconnects == 1


async def test_durable_channel_seen_empty_resumes_from_the_start(
    scripted: ScriptedGateway,
) -> None:
    async with _fast(scripted.url) as client:
        async with client.subscribe_iter("d:1") as sub:
            scripted.subscribed.clear()
            scripted.accepting = False
            await scripted.kill()
            await scripted.append("d:1", {"n": 0})
            scripted.accepting = True
            await asyncio.wait_for(scripted.subscribed.wait(), 5)
            msg = await sub.get(timeout=2)
    assert msg.replay and msg.data == {"n": 0}
    subscribes = [r["channels"] for r in scripted.requests if r["action"] == "subscribe"]
    assert subscribes == [["d:1"], [{"channel": "d:1", "since": "0-0"}]]


async def test_a_gateway_without_channel_objects_gets_plain_names_after_reconnect() -> None:
    # "x" is backed by a stream, so its frames carry offsets.
    gw = await ScriptedGateway({"x"}, objects=False).start()
    try:
        async with _fast(gw.url) as client:
            async with client.subscribe_iter("x") as sub:
                offset = await gw.append("x", {"n": 0})
                assert (await sub.get(timeout=2)).offset == offset == "1000-0"
                gw.subscribed.clear()
                await gw.kill()
                await asyncio.wait_for(gw.subscribed.wait(), 5)
                assert not sub.closed
        subscribes = [r["channels"] for r in gw.requests if r["action"] == "subscribe"]
        assert subscribes == [["x"], [{"channel": "x", "since": "1000-0"}], ["x"]]
    finally:
        await gw.stop()


async def test_a_name_refused_after_reconnect_is_dropped_and_the_rest_kept(
    scripted: ScriptedGateway,
) -> None:
    errors: list[BaseException] = []
    async with _fast(scripted.url, on_error=errors.append) as client:
        keep = await client.subscribe_iter("keep").start()
        lost = await client.subscribe_iter("lost").start()
        scripted.refuse["lost"] = "forbidden"
        scripted.subscribed.clear()
        await scripted.kill()
        await asyncio.wait_for(scripted.subscribed.wait(), 5)
        with pytest.raises(SubscriptionDropped) as err:
            await lost.get(timeout=2)
        assert isinstance(err.value.cause, ForbiddenError)
        assert [s.key for s in client.subscriptions()] == ["keep"]
        assert not keep.closed
    subscribes = [r["channels"] for r in scripted.requests if r["action"] == "subscribe"]
    assert subscribes[-2:] == [["keep", "lost"], ["keep"]]
    assert err.value in errors


async def test_initial_refusal_raises_the_typed_error_and_registers_nothing(
    scripted: ScriptedGateway,
) -> None:
    scripted.refuse["nope"] = "forbidden"
    async with _fast(scripted.url) as client:
        with pytest.raises(ForbiddenError):
            await client.subscribe_iter("nope").start()
        assert client.subscriptions() == []


async def test_close_1008_is_final_and_ends_subscriptions_with_the_code(
    scripted: ScriptedGateway,
) -> None:
    async with _fast(scripted.url) as client:
        sub = await client.subscribe_iter("a").start()
        await scripted.kill(code=1008)
        with pytest.raises(ConnectionClosed) as err:
            await sub.get(timeout=5)
        assert err.value.code == 1008 and client.error is err.value
        assert client.state == "closed"
    assert scripted.connections == 1
