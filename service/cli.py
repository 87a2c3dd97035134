"""The ``eddy`` command: ``eddy serve``, ``eddy token``, and the clients ``eddy publish`` and ``eddy tail``."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tornado.httpserver
import tornado.netutil
import tornado.process

from .auth import SYMMETRIC, TokenVerifier, resolve_secret
from .config import Settings, add_setting_flags
from .logs import configure_logging, redacted_url
from .routing import ProcessRoute

log = logging.getLogger("eddy")

PR_SET_PDEATHSIG = 1

def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (some machines default to 1024 sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def usable_cpu_count() -> int:
    """The CPUs this process may run on (``--processes 0``: one worker each).

    Not the machine's count (``tornado.process.cpu_count``): under ``taskset -c 0`` or a
    container's cpuset, one worker per machine core would crowd the allowed ones.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return tornado.process.cpu_count()


def exit_with_parent(parent: int) -> None:
    """In a worker: get SIGTERM (and so shut down cleanly) when the parent process dies.

    Without it, stopping or killing the parent of ``--processes N`` would leave
    its workers serving on. Linux only; elsewhere the workers must be stopped
    with the parent's process group.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


#: The metrics directory ``serve --processes N`` makes when ``PROMETHEUS_MULTIPROC_DIR`` is unset:
#: ``<tmp>/eddy-metrics-<parent pid>-<random>``, removed when the parent exits after its workers.
METRICS_DIR_PREFIX = "eddy-metrics-"


def remove_stale_metrics_dirs() -> None:
    """Remove the metrics directories of ``serve --processes N`` parents that are gone (killed, so they could not
    remove their own): their files would otherwise stay in the temporary directory for good."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*"):
        owner = path.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        if owner.isdigit() and path.is_dir() and not _alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (ProcessLookupError, OverflowError):  # gone; or a number no process can have
        return False
    return True


def serve(settings: Settings) -> None:
    """Bind, optionally fork, and run until SIGTERM or SIGINT."""
    configure_logging(settings.log_level, settings.log_format)
    limit = raise_open_file_limit()
    if settings.processes != 1 and settings.storage.startswith("memory:"):
        sys.exit("eddy: memory:// storage cannot be shared by several processes; use sqlite:// or mongodb://")
    # Create the development secret before forking so every process agrees on it.
    resolve_secret(settings.jwt_secret, settings.secret_file, settings.storage, create=True)
    sockets = tornado.netutil.bind_sockets(settings.port, settings.address, reuse_port=False)
    route = None
    if settings.processes != 1:
        # Metrics of all processes are summed through files in one directory;
        # it must be set before prometheus_client is first imported.
        metrics_dir = None
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            remove_stale_metrics_dirs()
            metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
                prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
        # One private loopback port per worker, so a worker can pass a Socket.IO polling request on to the
        # worker holding its session (handlers/engineio.py, ProcessRoute).
        count = settings.processes or usable_cpu_count()
        private = [tornado.netutil.bind_sockets(0, "127.0.0.1")[0] for _ in range(count)]
        ports = tuple(sock.getsockname()[1] for sock in private)
        parent = os.getpid()
        try:
            index = tornado.process.fork_processes(count)
        except SystemExit:  # the parent, once every worker has exited
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
            raise
        exit_with_parent(parent)
        sockets.append(private[index])
        for other, sock in enumerate(private):
            if other != index:
                sock.close()
        route = ProcessRoute(index, ports)
    log.info(
        "eddy listening on %s:%d (storage %s, open-file limit %d)",
        settings.address, settings.port, redacted_url(settings.storage), limit,
    )
    asyncio.run(_run(settings, sockets, route))


async def _run(settings: Settings, sockets, route: ProcessRoute | None = None) -> None:
    from .app import Eddy

    eddy = Eddy(settings)
    eddy.process_route = route
    await eddy.start()
    server = tornado.httpserver.HTTPServer(
        eddy.make_app(),
        xheaders=settings.trust_proxy_headers,  # else anyone could spoof the address per-IP limits count
        idle_connection_timeout=settings.handshake_timeout,
    )
    server.add_sockets(sockets)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await shutdown(eddy, server, settings.shutdown_timeout)


async def shutdown(eddy, server: tornado.httpserver.HTTPServer, timeout: float) -> None:
    """Stop accepting, tell clients to reconnect elsewhere, drain writes, close storage: all within ``timeout``.

    Half the time goes to letting clients leave on their own after the
    ``reconnect`` frame; the rest to closing what is left and the storage.
    Past the deadline the process exits anyway (logged), so an orchestrator's
    kill never has to come.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    log.info("shutting down: closing %d connections (deadline %.1fs)", eddy.hub.connection_count, timeout)
    server.stop()
    eddy.hub.close_all(1001, "server shutting down")
    polite = loop.time() + timeout / 2
    while eddy.hub.connection_count and loop.time() < polite:
        await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(server.close_all_connections(), max(0.1, deadline - loop.time()))
        await asyncio.wait_for(eddy.stop(), max(0.1, deadline - loop.time()))
    except TimeoutError:
        log.error("shutdown deadline of %.1fs passed; exiting with work unfinished", timeout)


def token(args: argparse.Namespace) -> None:
    """``eddy token``: a token the server configured by the same settings (file, environment) accepts.

    The signer is the server's own verifier (:meth:`TokenVerifier.from_settings`), so the issuer, audience,
    claim names and algorithm are the configured ones.
    """
    try:
        settings = Settings.from_env(storage=args.storage, config=args.config)
    except ValueError as exc:
        sys.exit(f"eddy token: {exc}")
    if not any(a.strip().upper() in SYMMETRIC for a in settings.jwt_algorithms.split(",")):
        sys.exit("eddy token: the server accepts only RS*/ES*/PS* tokens (EDDY_JWT_ALGORITHMS); "
                 "your identity provider signs those")
    secret, _ = resolve_secret(settings.jwt_secret, settings.secret_file, settings.storage, create=True)
    verifier = TokenVerifier.from_settings(settings, secret)
    print(verifier.mint(args.sub, tenant=args.tenant, roles=args.role, ttl=args.ttl or None))


def client_token(args: argparse.Namespace, command: str) -> str:
    """``--token``, else ``EDDY_TOKEN``; exits with a clear message (status 2) when there is neither."""
    value = args.token or os.environ.get("EDDY_TOKEN")
    if not value:
        print(f"eddy {command}: no token: pass --token or set EDDY_TOKEN "
              "(eddy token --sub USER mints one)", file=sys.stderr)
        sys.exit(2)
    return value


def publish(args: argparse.Namespace) -> None:
    """``eddy publish``: POST /api/events, print the stored event as one JSON line; exit 1 on a refusal."""
    import orjson

    from .client import EddyError, publish_http

    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        print(f"eddy publish: JSON is not valid JSON ({exc})", file=sys.stderr)
        sys.exit(2)
    secret = client_token(args, "publish")
    try:
        stored = asyncio.run(publish_http(args.url, secret, args.channel, args.event, data,
                                          idempotency_key=args.idempotency_key))
    except EddyError as exc:
        # The problem body as the server sent it, so scripts can read its code.
        print(orjson.dumps(exc.frame).decode() if exc.frame else f"eddy publish: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.stdout.buffer.write(orjson.dumps(stored) + b"\n")
    sys.stdout.flush()


def tail(args: argparse.Namespace) -> None:
    """``eddy tail``: every frame of the channels as one JSON line each, across reconnects, until Ctrl-C."""
    secret = client_token(args, "tail")
    try:
        status = asyncio.run(_tail(args, secret))
    except KeyboardInterrupt:
        status = 0
    except BrokenPipeError:  # `eddy tail … | head`
        status = 0
    sys.exit(status)


async def _tail(args: argparse.Namespace, secret: str) -> int:
    import orjson

    from .client import EddyClient, EddyError

    client = EddyClient(args.url, token=secret)
    gave_up: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def write(frame: dict) -> None:
        sys.stdout.buffer.write(orjson.dumps(frame) + b"\n")
        sys.stdout.flush()

    def on_frame(frame: dict) -> None:
        # Events are printed by on("event"): once each, resumes de-duplicated; the client's own
        # catch-up answers (sync_data) are printed as the events they carry.
        if frame.get("type") not in ("event", "sync_data"):
            write(frame)

    def on_state(change: dict) -> None:
        if change["state"] == "reconnecting":
            print(f"eddy tail: reconnecting in {change['delay']:.1f}s ({change['reason']})", file=sys.stderr)
        elif change["state"] == "error" and not gave_up.done():
            gave_up.set_result(change["reason"] or "gave up")

    client.on("frame", on_frame)
    client.on("event", write)
    client.on("state", on_state)
    joins = [client.join(channel, since=args.since) for channel in args.channels]
    try:
        await client.connect()
        for channel, joining in zip(args.channels, joins, strict=True):
            try:
                await joining
            except EddyError as exc:
                print(f"eddy tail: cannot join {channel}: {exc}", file=sys.stderr)
                return 1
        reason = await gave_up
    except EddyError as exc:
        print(f"eddy tail: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"eddy tail: {reason}", file=sys.stderr)
    return 1


def local_port() -> str:
    """The port ``eddy serve`` uses in this environment (``EDDY_PORT``, else 8888): the clients' default."""
    return os.environ.get("EDDY_PORT") or "8888"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eddy", description="Eddy real-time event service")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the server")
    add_setting_flags(serve_parser)

    token_parser = commands.add_parser("token", help="print a signed client token (JWT)")
    token_parser.add_argument("--sub", required=True, help="user id")
    token_parser.add_argument("--tenant", default=None, help="tenant (default: the default tenant)")
    token_parser.add_argument("--role", action="append", default=[], help="a role; repeat for several")
    token_parser.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (0 = never)")
    token_parser.add_argument("--storage", default=None, help="storage URL, to find the development secret")
    token_parser.add_argument("--config", default=None, help="the server's TOML file (issuer, audience, claim names)")

    publish_parser = commands.add_parser("publish", help="publish an event over HTTP and print it as stored")
    publish_parser.add_argument("channel", help="channel name")
    publish_parser.add_argument("event", help="event name")
    publish_parser.add_argument("data", metavar="JSON", help="the event's data, as JSON ('{\"n\":1}', 'null' …)")
    publish_parser.add_argument("--url", default=f"http://127.0.0.1:{local_port()}",
                                help="the server's base URL (default: this machine, port $EDDY_PORT or 8888)")
    publish_parser.add_argument("--token", default=None, help="client token (default: $EDDY_TOKEN)")
    publish_parser.add_argument("--idempotency-key", default=None, help="store it once however often it is retried")

    tail_parser = commands.add_parser("tail", help="print every frame of channels as JSON lines (reconnects)")
    tail_parser.add_argument("channels", nargs="+", metavar="CHANNEL", help="channels to join")
    tail_parser.add_argument("--since", default=None, help="first replay the stored events after this id")
    tail_parser.add_argument("--url", default=f"ws://127.0.0.1:{local_port()}/ws",
                             help="the server's WebSocket URL (default: this machine, port $EDDY_PORT or 8888)")
    tail_parser.add_argument("--token", default=None, help="client token (default: $EDDY_TOKEN)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        overrides = {name: value for name, value in vars(args).items() if name != "command"}
        try:
            settings = Settings.from_env(**overrides)
        except ValueError as exc:
            sys.exit(f"eddy: {exc}")
        serve(settings)
    elif args.command == "token":
        token(args)
    elif args.command == "publish":
        publish(args)
    elif args.command == "tail":
        tail(args)
