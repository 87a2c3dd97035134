"""Locust users for Eddy: WebSocket subscribers and an HTTP publisher.

Web UI::

    EDDY_JWT_SECRET=... locust -f loadtests/locustfile.py --host http://127.0.0.1:8888

Headless (what ``python -m loadtests.loadtest`` runs, with the server it starts)::

    EDDY_JWT_SECRET=... locust -f loadtests/locustfile.py --headless -u 5001 -r 250 \\
        --host http://127.0.0.1:8888 --eddy-publish-rate 1 --eddy-publish-seconds 60 --eddy-autostop

Users
-----
``SubscriberUser``
    One WebSocket (``websocket-client`` on gevent) per user, token minted with ``EDDY_JWT_SECRET``
    (HS256, ``sub`` unique per user, tenant ``--eddy-tenant``). It joins its channels and keeps the
    socket open; a receive greenlet reports every ``event`` frame to Locust as request type ``WS``,
    name = the event name, response time = arrival − the event's ``timestamp`` (the store's time).
    Handshake times are reported as ``WSCONN connect``; refused/failed connections, ``error`` frames
    and sockets closed by the server are failures. ``--eddy-sample K`` reports 1 in K frames (all are
    counted) for very large socket counts. After the joins, frames are split from large socket reads
    (``--eddy-reader fast``, one recv() per wake-up); ``--eddy-reader client`` uses websocket-client's reader.
    Against your own server, give large channels a rule with ``presence = false`` (as ``loadtest.py`` does),
    or every join is announced to every member.
``PublisherUser``
    ``POST /api/events`` with a server credential (a token with the ``publisher`` role, as a backend
    holds) at ``--eddy-publish-rate`` events/s (0: one per think time) round-robin over the channels;
    ``data`` carries the publisher id, a sequence number, the send time and padding up to
    ``--eddy-event-size`` bytes. ``fixed_count`` is 1 (``EDDY_LT_PUBLISHERS``), so ``-u N+1`` is N
    subscribers and one publisher.

The floor (``--eddy-target floor``)
    The same users against ``loadtests/peers/floor.py`` (one bare ``os.write()`` per socket per event, nothing
    else): subscribers connect to ``/`` and join nothing (the floor has one broadcast), the publisher sends
    ``{"event", "data"}`` on a publisher socket (``/publish``) instead of POSTing. ``loadtest.py`` runs every
    profile against the floor too and reports Eddy ÷ floor, so what the load generator costs shows in both.

Fan-out shapes (``--eddy-shape``, ``--eddy-channels N``)
    ``one``: every subscriber joins the same N channels (N=1: one broadcast channel).
    ``spread``: subscriber k joins channel ``k mod N`` only; each event reaches about 1/N of them.

Loss accounting
    The publisher waits until every subscriber of the test has joined (all nodes, see the ``eddy_ready`` /
    ``eddy_go`` messages) before its first event, so each subscriber must receive every event published to
    its channels. Each subscriber counts received events per (publisher, sequence): unique, duplicates,
    out of order. With ``--eddy-publish-seconds S`` the publisher stops after S s, waits ``--eddy-drain``
    seconds, and with ``--eddy-autostop`` ends the test. At test stop every Locust process that runs users
    (the local runner, or each worker) writes ``<--eddy-summary>.<node>.json``; the checker
    (``loadtests/loadtest.py``) sums them: expected deliveries = Σ events published to a channel × its
    subscribers, lost = expected − unique received.

Every option is also an environment variable (``EDDY_LT_*``, listed by ``locust --help``).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import jwt
import orjson
import websocket  # websocket-client; locust has already monkey-patched the socket module
from locust import FastHttpUser, User, events, task
from locust.runners import MasterRunner, WorkerRunner

DEFAULTS: dict[str, Any] = {
    "eddy_channels": 1,
    "eddy_shape": "one",
    "eddy_event_size": 256,
    "eddy_publish_rate": 1.0,
    "eddy_think_time": 1.0,
    "eddy_sample": 1,
    "eddy_tenant": "loadtest",
    "eddy_channel_prefix": "lt",
    "eddy_event_name": "loadtest.tick",
    "eddy_publish_seconds": 0.0,
    "eddy_publish_delay": 0.0,
    "eddy_drain": 5.0,
    "eddy_autostop": False,
    "eddy_gate_timeout": 300.0,
    "eddy_connect_timeout": 20.0,
    "eddy_reader": "fast",
    "eddy_summary": "",
    "eddy_target": "eddy",
}
ENV_NAMES = {name: "EDDY_LT_" + name[len("eddy_"):].upper() for name in DEFAULTS}


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    def add(name: str, help: str, **kwargs: Any) -> None:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, env_var=ENV_NAMES[name], default=DEFAULTS[name], help=help, **kwargs)

    add("eddy_channels", "number of channels", type=int)
    add("eddy_shape", "fan-out shape: one (every subscriber joins all channels) or spread (one channel each)",
        choices=["one", "spread"])
    add("eddy_event_size", "bytes of the event's data (padded)", type=int)
    add("eddy_publish_rate", "events per second per publisher (0: one per think time)", type=float)
    add("eddy_think_time", "seconds between a subscriber's liveness checks; publisher wait when the rate is 0",
        type=float)
    add("eddy_sample", "report 1 in K received frames to Locust's statistics (all are counted)", type=int)
    add("eddy_tenant", "tenant claim of the tokens")
    add("eddy_channel_prefix", "channels are <prefix>-0 … <prefix>-(N-1)")
    add("eddy_event_name", "event name of the published events")
    add("eddy_publish_seconds", "stop publishing after this many seconds (0: until the test stops)", type=float)
    add("eddy_publish_delay", "seconds to wait after every subscriber joined before the first event", type=float)
    add("eddy_drain", "seconds after the last event before --eddy-autostop ends the test", type=float)
    add("eddy_autostop", "end the test after --eddy-publish-seconds and --eddy-drain",
        action="store_true", include_in_web_ui=False)
    add("eddy_gate_timeout", "longest wait for all subscribers to join before publishing anyway", type=float)
    add("eddy_connect_timeout", "seconds for a socket's handshake and joins", type=float)
    add("eddy_reader", "fast: split frames from large socket reads; client: websocket-client's recv_data()",
        choices=["fast", "client"])
    add("eddy_summary", "path prefix of the per-process JSON summaries (empty: none)", include_in_web_ui=False)
    add("eddy_target", "eddy, or floor: loadtests/peers/floor.py (one channel, a publisher socket)",
        choices=["eddy", "floor"])


def option(environment, name: str) -> Any:
    """A tunable: the Locust option when parsed, else the environment variable, else the default."""
    parsed = getattr(environment, "parsed_options", None)
    value = getattr(parsed, name, None) if parsed is not None else None
    if value is None:
        value = os.environ.get(ENV_NAMES[name], DEFAULTS[name])
    default = DEFAULTS[name]
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    return type(default)(value)


def channel_names(environment) -> list[str]:
    prefix = option(environment, "eddy_channel_prefix")
    return [f"{prefix}-{n}" for n in range(max(1, option(environment, "eddy_channels")))]


def mint_token(environment, sub: str, roles: tuple[str, ...] = ()) -> str:
    secret = os.environ.get("EDDY_JWT_SECRET")
    if not secret:
        raise RuntimeError("EDDY_JWT_SECRET is not set: the users mint their tokens with the server's secret")
    now = int(time.time())
    claims = {"sub": sub, "tenant": option(environment, "eddy_tenant"), "iat": now, "exp": now + 24 * 3600}
    if roles:
        claims["roles"] = list(roles)
    return jwt.encode(claims, secret, algorithm="HS256")


# Per-process bookkeeping ------------------------------------------------------------------------------------

NODE = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Registry:
    """Everything this Locust process counted, kept after its users stop."""

    def __init__(self) -> None:
        self.subscribers: list[SubscriberState] = []
        self.publishers: list[PublisherState] = []
        self.settled = 0  # subscribers that joined or failed
        self.go = gevent.event.Event()  # every subscriber of the test has joined: publish
        self.gate_opened_at: float | None = None
        self.numbers = itertools.count()
        self.summary_written = False
        #: (publisher, seq) -> [frames, sum of latencies ms, max latency ms] over this process's subscribers
        self.per_event: dict[tuple[str, int], list[float]] = {}

    def open_gate(self, why: str) -> None:
        if not self.go.is_set():
            self.gate_opened_at = time.time()
            self.go.set()


REGISTRY = Registry()


class SubscriberState:
    __slots__ = ("id", "channels", "connect_started", "joined_at", "failed", "closed_early", "close_reason",
                 "received", "duplicates", "out_of_order", "errors", "reported", "seen", "last_seq")

    def __init__(self, sub: str, channels: list[str]) -> None:
        self.id = sub
        self.channels = channels
        self.connect_started = time.time()
        self.joined_at: float | None = None
        self.failed: str | None = None
        self.closed_early = False
        self.close_reason: str | None = None
        self.received = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.errors = 0
        self.reported = 0
        self.seen: dict[str, bytearray] = {}  # publisher id -> one byte per sequence number (1 = received)
        self.last_seq: dict[tuple[str, str], int] = {}

    def count(self, publisher: str, seq: int, channel: str) -> None:
        self.received += 1
        seen = self.seen.get(publisher)
        if seen is None:
            seen = self.seen[publisher] = bytearray()
        if seq >= len(seen):
            seen.extend(bytes(seq + 1 - len(seen) + 256))
        if seen[seq]:
            self.duplicates += 1
        else:
            seen[seq] = 1
        key = (publisher, channel)
        if seq < self.last_seq.get(key, -1):
            self.out_of_order += 1
        self.last_seq[key] = seq

    def summary(self) -> dict[str, Any]:
        unique = {publisher: sum(seen) for publisher, seen in self.seen.items()}
        return {"id": self.id, "channels": self.channels, "joined_at": self.joined_at, "failed": self.failed,
                "closed_early": self.closed_early, "close_reason": self.close_reason, "received": self.received,
                "unique": sum(unique.values()), "unique_per_publisher": unique, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "errors": self.errors, "reported": self.reported}


class PublisherState:
    def __init__(self, publisher: str) -> None:
        self.id = publisher
        self.published = 0
        self.failed = 0
        self.per_channel: dict[str, int] = {}
        self.first_sent: float | None = None
        self.last_sent: float | None = None
        self.gate_waited: float | None = None
        self.gate_timed_out = False
        self.behind = 0  # ticks skipped because a request took longer than the period

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "published": self.published, "failed": self.failed, "per_channel": self.per_channel,
                "first_sent": self.first_sent, "last_sent": self.last_sent, "gate_waited_s": self.gate_waited,
                "gate_timed_out": self.gate_timed_out, "ticks_skipped": self.behind}


def stable_error(exc: Exception) -> Exception:
    """A refused handshake without its Date header, so Locust groups identical failures into one row."""
    status = getattr(exc, "status_code", None)
    if status is None:
        return exc
    code = None
    try:
        code = orjson.loads(getattr(exc, "resp_body", b"") or b"{}").get("code")
    except Exception:
        pass
    return ConnectionError(f"handshake refused: HTTP {status} {code or ''}".strip())


def close_text(data: bytes) -> str:
    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
    return f"{code} {data[2:].decode(errors='replace')}".strip()


# Timestamps: many sockets receive the same event, so parse each timestamp string once.
_timestamps: dict[str, float] = {}


def epoch_ms(stamp: str) -> float:
    value = _timestamps.get(stamp)
    if value is None:
        if len(_timestamps) > 4096:
            _timestamps.clear()
        value = _timestamps[stamp] = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000
    return value


def socket_url(user: User, path: str) -> str:
    """``ws://host:port<path>`` for the user's ``--host`` (``wss://`` for https)."""
    host = (user.host or user.environment.host or "http://127.0.0.1:8888").rstrip("/")
    return host.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + path


# Users -----------------------------------------------------------------------------------------------------------


class SubscriberUser(User):
    """A WebSocket that joins its channels and reports every event frame it receives."""

    weight = 1

    def wait_time(self) -> float:
        return option(self.environment, "eddy_think_time")

    def on_start(self) -> None:
        env = self.environment
        self.number = next(REGISTRY.numbers)
        names = channel_names(env)
        if option(env, "eddy_shape") == "spread":
            names = [names[self.number % len(names)]]
        self.sub = f"lt-{NODE}-{self.number}"
        self.state = SubscriberState(self.sub, names)
        REGISTRY.subscribers.append(self.state)
        self.sample = max(1, option(env, "eddy_sample"))
        self.sample_offset = random.randrange(self.sample)
        self.event_name = option(env, "eddy_event_name")
        self.ws: websocket.WebSocket | None = None
        self.receiver: gevent.Greenlet | None = None
        self.stopping = False
        self.phase = "connect"
        try:
            self._connect_and_join(names)
        except Exception as exc:  # refused, timed out, error frame on join…
            exc = stable_error(exc)
            self.state.failed = f"{self.phase}: {type(exc).__name__}: {exc}"[:300]
            self._fire("WSCONN", self.phase, (time.time() - self.state.connect_started) * 1000, 0, exc)
            self._close()
        finally:
            REGISTRY.settled += 1
        if self.ws is not None:
            self.receiver = gevent.spawn(self._receive)

    def _connect_and_join(self, names: list[str]) -> None:
        env = self.environment
        floor = option(env, "eddy_target") == "floor"
        timeout = option(env, "eddy_connect_timeout")
        started = time.time()
        self.ws = websocket.create_connection(
            socket_url(self, "/" if floor else "/ws"), header=[f"Authorization: Bearer {mint_token(env, self.sub)}"],
            timeout=timeout, skip_utf8_validation=True,
        )
        connected = self._read_frame()
        if connected.get("type") != "connected":
            raise ConnectionError(f"first frame was {connected.get('type')!r}, not connected")
        self._fire("WSCONN", "connect", (time.time() - started) * 1000, 0, None)
        if floor:
            names = []  # the floor broadcasts every event to every socket: nothing to join
        self.phase = "join"
        pending = set()
        for ref, name in enumerate(names, 1):
            self.ws.send(orjson.dumps({"type": "join", "channel": name, "ref": ref}).decode())
            pending.add(ref)
        while pending:
            frame = self._read_frame()
            kind = frame.get("type")
            if kind == "ack" and frame.get("ref") in pending:
                pending.discard(frame["ref"])
            elif kind == "error":
                raise ConnectionError(f"join refused: {frame.get('code')} {frame.get('error')}")
            else:
                self._handle(frame, b"")
        self.state.joined_at = time.time()
        self._fire("WSCONN", "join", (self.state.joined_at - started) * 1000, 0, None)
        self.ws.settimeout(None)

    def _read_frame(self) -> dict[str, Any]:
        assert self.ws is not None
        opcode, data = self.ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise ConnectionError(f"closed by the server ({close_text(data)})")
        return orjson.loads(data)

    def _receive(self) -> None:
        if option(self.environment, "eddy_reader") == "client":
            self._receive_with_client()
        else:
            self._receive_fast()

    def _receive_with_client(self) -> None:
        """websocket-client's reader: simple, but several recv() calls per frame."""
        ws = self.ws
        assert ws is not None
        while True:
            try:
                opcode, data = ws.recv_data()
            except Exception as exc:
                if not self.stopping:
                    self._closed_early(f"{type(exc).__name__}: {exc}")
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                if not self.stopping:
                    self._closed_early(f"closed by the server ({close_text(data)})")
                return
            self._text(data)

    def _receive_fast(self) -> None:
        """Read the socket in large chunks and split the server's (unmasked) frames here.

        A burst of events to thousands of sockets is drained one socket at a time by this process,
        so the cost per frame is the load generator's latency floor: one recv() per wake-up instead
        of websocket-client's three or more per frame. The handshake, the joins, pongs and the close
        still go through websocket-client, which never reads past the frame it was asked for.
        """
        ws = self.ws
        assert ws is not None
        sock = ws.sock
        buffer = b""
        fragments: list[bytes] = []
        while True:
            try:
                chunk = sock.recv(262144)
            except Exception as exc:
                if not self.stopping:
                    self._closed_early(f"{type(exc).__name__}: {exc}")
                return
            if not chunk:
                if not self.stopping:
                    self._closed_early("connection closed without a close frame")
                return
            buffer = buffer + chunk if buffer else chunk
            size = len(buffer)
            position = 0
            while size - position >= 2:
                first, second = buffer[position], buffer[position + 1]
                length = second & 0x7F
                head = 2
                if length == 126:
                    if size - position < 4:
                        break
                    length = int.from_bytes(buffer[position + 2:position + 4], "big")
                    head = 4
                elif length == 127:
                    if size - position < 10:
                        break
                    length = int.from_bytes(buffer[position + 2:position + 10], "big")
                    head = 10
                if second & 0x80:
                    self._closed_early("protocol error: a masked frame from the server")
                    return
                end = position + head + length
                if end > size:
                    break
                payload = buffer[position + head:end]
                position = end
                opcode = first & 0x0F
                if opcode in (1, 2, 0):  # text, binary, continuation
                    if not first & 0x80:  # not the final fragment
                        fragments.append(payload)
                        continue
                    if fragments:
                        fragments.append(payload)
                        payload = b"".join(fragments)
                        fragments = []
                    self._text(payload)
                elif opcode == 9:  # ping
                    try:
                        ws.pong(payload)
                    except Exception:
                        pass
                elif opcode == 8:  # close
                    if not self.stopping:
                        self._closed_early(f"closed by the server ({close_text(payload)})")
                    return
            buffer = buffer[position:] if position < size else b""

    def _text(self, data: bytes) -> None:
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self._fire("WS", "invalid frame", 0, len(data), exc)
            return
        self._handle(frame, data)

    def _handle(self, frame: dict[str, Any], raw: bytes) -> None:
        kind = frame.get("type", "event")  # the floor's events carry no type
        if kind == "event":
            state = self.state
            latency = max(0.0, time.time() * 1000 - epoch_ms(frame["timestamp"]))
            payload = frame.get("data")
            if isinstance(payload, dict) and "seq" in payload:
                key = (str(payload.get("pub")), int(payload["seq"]))
                state.count(key[0], key[1], frame.get("channel", state.channels[0]))
                per_event = REGISTRY.per_event.get(key)
                if per_event is None:
                    REGISTRY.per_event[key] = [1, latency, latency]
                else:
                    per_event[0] += 1
                    per_event[1] += latency
                    if latency > per_event[2]:
                        per_event[2] = latency
            else:
                state.received += 1
            if (state.received + self.sample_offset) % self.sample == 0:
                state.reported += 1
                self._fire("WS", frame.get("event", self.event_name), latency, len(raw), None)
        elif kind == "error":
            self.state.errors += 1
            self._fire("WS", f"error {frame.get('code')}", 0, len(raw),
                       RuntimeError(f"{frame.get('code')}: {frame.get('error')}"))
        elif kind == "reconnect":
            self._fire("WS", "reconnect", 0, len(raw), RuntimeError(f"server asked to reconnect: {frame}"))
        # connected, ack, keepalive, presence, pong: nothing to report

    def _closed_early(self, reason: str) -> None:
        self.state.closed_early = True
        self.state.close_reason = reason[:300]
        self._fire("WS", "closed", 0, 0, ConnectionError(reason))

    def _fire(self, kind: str, name: str, response_time: float, length: int, exception: Exception | None) -> None:
        self.environment.events.request.fire(request_type=kind, name=name, response_time=response_time,
                                             response_length=length, exception=exception, context={})

    @task
    def hold(self) -> None:
        """Keep the socket open: the receive greenlet does the work; this wakes only when it ends."""
        if self.receiver is not None and not self.receiver.dead:
            self.receiver.join()

    def _close(self) -> None:
        self.stopping = True
        if self.ws is not None:
            try:
                self.ws.close(timeout=1)
            except Exception:
                pass
            self.ws = None

    def on_stop(self) -> None:
        self._close()
        if self.receiver is not None:
            self.receiver.kill(block=False)


class PublisherUser(FastHttpUser):
    """POSTs numbered events to the channels at a constant rate, once every subscriber has joined."""

    #: Publishers (EDDY_LT_PUBLISHERS, default 1); 0 runs subscribers only (publish from elsewhere).
    fixed_count = int(os.environ.get("EDDY_LT_PUBLISHERS", "1"))
    weight = 1 if fixed_count > 0 else 0

    def wait_time(self) -> float:
        rate = option(self.environment, "eddy_publish_rate")
        if rate <= 0:
            return option(self.environment, "eddy_think_time")
        self.next_at += 1 / rate
        delay = self.next_at - time.monotonic()
        if delay < -1:  # more than a second behind: do not burst to catch up
            self.state.behind += int(-delay * rate)
            self.next_at = time.monotonic()
            delay = 0
        return max(0.0, delay)

    def on_start(self) -> None:
        env = self.environment
        self.state = PublisherState(f"pub-{NODE}-{next(REGISTRY.numbers)}")
        REGISTRY.publishers.append(self.state)
        self.channels = channel_names(env)
        self.token = mint_token(env, self.state.id, ("publisher",))  # a backend's credential (EDDY_PUBLISHER_ROLE)
        self.event_name = option(env, "eddy_event_name")
        self.size = option(env, "eddy_event_size")
        self.socket: websocket.WebSocket | None = None
        if option(env, "eddy_target") == "floor":  # the floor takes events on a publisher socket, not by POST
            self.socket = websocket.create_connection(socket_url(self, "/publish"),
                                                      timeout=option(env, "eddy_connect_timeout"))
        started = time.monotonic()
        gate_timeout = option(env, "eddy_gate_timeout")
        if gate_timeout > 0 and not REGISTRY.go.wait(gate_timeout):
            self.state.gate_timed_out = True
        self.state.gate_waited = round(time.monotonic() - started, 3)
        gevent.sleep(option(env, "eddy_publish_delay"))
        self.seq = 0
        self.done = False
        self.publish_started = time.monotonic()
        self.next_at = self.publish_started

    def body(self, channel: str) -> bytes:
        data = {"pub": self.state.id, "seq": self.seq, "sent": time.time(), "pad": ""}
        pad = self.size - len(orjson.dumps(data))
        data["pad"] = "x" * max(0, pad)
        return orjson.dumps({"channel": channel, "event": self.event_name, "data": data})

    @task
    def publish(self) -> None:
        if self.done:
            return
        env = self.environment
        seconds = option(env, "eddy_publish_seconds")
        if seconds > 0 and time.monotonic() - self.publish_started >= seconds:
            self.done = True
            gevent.spawn(self._finish, option(env, "eddy_drain"))
            return
        self.seq += 1
        channel = self.channels[self.seq % len(self.channels)]
        sent = time.time()
        if self.socket is not None:
            started = time.perf_counter()
            self.socket.send(self.body(channel))
            self._sent(channel, sent)
            self.environment.events.request.fire(request_type="WSPUB", name="/publish", response_length=0,
                                                 response_time=(time.perf_counter() - started) * 1000,
                                                 exception=None, context={})
            return
        with self.client.post("/api/events", data=self.body(channel), name="/api/events", catch_response=True,
                              headers={"Authorization": f"Bearer {self.token}",
                                       "Content-Type": "application/json"}) as response:
            if response.status_code == 201:
                self._sent(channel, sent)
            else:
                self.state.failed += 1
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")

    def _sent(self, channel: str, sent: float) -> None:
        self.state.published += 1
        self.state.per_channel[channel] = self.state.per_channel.get(channel, 0) + 1
        self.state.first_sent = self.state.first_sent or sent
        self.state.last_sent = sent

    def on_stop(self) -> None:
        if self.socket is not None:
            self.socket.close()

    def _finish(self, drain: float) -> None:
        """Publishing is over: let the last events arrive, then end the test when asked to."""
        gevent.sleep(drain)
        if option(self.environment, "eddy_autostop"):
            runner = self.environment.runner
            if isinstance(runner, WorkerRunner):
                runner.send_message("eddy_done", {"node": NODE})
            else:
                _stop_test(self.environment)


# Coordination ------------------------------------------------------------------------------------------------


def _stop_test(environment) -> None:
    parsed = environment.parsed_options
    if parsed is not None and getattr(parsed, "headless", False):
        environment.runner.quit()
    else:
        environment.runner.stop()


def _wait_for_subscribers_then(environment, then) -> None:
    """After a ramp: wait until every subscriber this process started has joined or failed."""
    runner = environment.runner
    deadline = time.monotonic() + option(environment, "eddy_gate_timeout")
    while time.monotonic() < deadline:
        target = runner.user_classes_count.get("SubscriberUser", 0)
        if REGISTRY.settled >= target:
            break
        gevent.sleep(0.1)
    then()


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        ready: dict[str, dict] = {}

        def on_ready(environment, msg, **_kw) -> None:
            ready[msg.data["node"]] = msg.data
            if len(ready) >= max(1, runner.worker_count):
                runner.send_message("eddy_go", {"nodes": len(ready)})

        def on_done(environment, msg, **_kw) -> None:
            gevent.spawn(_stop_test, environment)

        runner.register_message("eddy_ready", on_ready)
        runner.register_message("eddy_done", on_done)
        environment.events.test_start.add_listener(lambda **_kw: ready.clear())
    elif isinstance(runner, WorkerRunner):
        runner.register_message("eddy_go", lambda environment, msg, **_kw: REGISTRY.open_gate("master"))
    # Worker: report readiness to the master. Local: open the gate directly.

    @environment.events.spawning_complete.add_listener
    def _on_spawned(user_count: int, **_kw) -> None:
        if isinstance(runner, MasterRunner):
            return
        if isinstance(runner, WorkerRunner):
            def report() -> None:
                runner.send_message("eddy_ready", {"node": NODE, "joined": REGISTRY.settled})
            gevent.spawn(_wait_for_subscribers_then, environment, report)
        else:
            gevent.spawn(_wait_for_subscribers_then, environment, lambda: REGISTRY.open_gate("local"))


def write_summary(environment) -> Path | None:
    prefix = option(environment, "eddy_summary")
    if not prefix or isinstance(environment.runner, MasterRunner) or REGISTRY.summary_written:
        return None
    if not REGISTRY.subscribers and not REGISTRY.publishers:
        return None
    REGISTRY.summary_written = True
    path = Path(f"{prefix}.{NODE}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "node": NODE,
        "written_at": time.time(),
        "gate_opened_at": REGISTRY.gate_opened_at,
        "options": {name: option(environment, name) for name in DEFAULTS},
        "publishers": [p.summary() for p in REGISTRY.publishers],
        "subscribers": [s.summary() for s in REGISTRY.subscribers],
        "per_event": [[pub, seq, n, round(total, 3), round(worst, 3)]
                      for (pub, seq), (n, total, worst) in sorted(REGISTRY.per_event.items())],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary))
    tmp.replace(path)
    return path


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    if not isinstance(environment.runner, MasterRunner):
        REGISTRY.__init__()  # a new test in the same process (web UI): count from zero


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw) -> None:
    write_summary(environment)


@events.quitting.add_listener
def _on_quitting(environment, **_kw) -> None:
    write_summary(environment)
