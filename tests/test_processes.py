"""Real `eddy serve` processes: two sharing one SQLite file, the development secret, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.processes import ROOT, free_port
from tests.support import SECRET, Client, http, json_of, make_token, publish


@pytest.mark.gen_test(timeout=60)
async def test_eddy_token_signs_what_the_configured_server_accepts(processes, tmp_path):
    """Issue 15 (Low): `eddy token` ignored the configured issuer, audience, claim names (and algorithm)."""
    config = tmp_path / "eddy.toml"
    config.write_text('jwt_issuer = "https://id.example"\njwt_audience = "eddy"\njwt_algorithms = "HS512"\n'
                      'user_claim = "uid"\ntenant_claim = "empresaId"\nroles_claim = "perfis"\n')
    server = processes(f"sqlite:///{tmp_path}/eddy.db", args=["--config", str(config)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")} | {"PYTHONPATH": str(ROOT),
                                                                               "EDDY_JWT_SECRET": SECRET}
    minted = subprocess.run(
        [sys.executable, "-m", "service", "token", "--sub", "ana", "--tenant", "loja-7", "--role", "agent",
         "--config", str(config)],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    ).stdout.strip()
    client = await Client.connect(server.port, "/ws", minted)
    connected = await client.recv()
    assert (connected["user_id"], connected["tenant"]) == ("ana", "loja-7") and "role:agent" in connected["channels"]
    client.close()


@pytest.mark.gen_test(timeout=60)
async def test_two_processes_share_one_sqlite_file(processes, tmp_path):
    storage = f"sqlite:///{tmp_path}/shared.db"
    a, b = processes(storage), processes(storage)
    token = make_token("kiosk", tenant="parking")
    on_a = await Client.connect(a.port, "/ws/tickets/stream", token)
    on_b = await Client.connect(b.port, "/ws/tickets/stream", token)
    await on_a.recv()
    await on_b.recv()

    sent = []
    for n in range(20):
        target = b if n % 2 else a
        sent.append((await publish(target.port, "tickets", "ticket.created", {"n": n}, token))["id"])
    for client in (on_a, on_b):
        received = [(await client.recv_type("event"))["id"] for _ in range(20)]
        assert received == sorted(sent, key=int)
    on_a.close()
    on_b.close()


@pytest.mark.gen_test(timeout=60)
async def test_development_secret_is_shared_by_serve_and_token(processes, tmp_path):
    storage = "sqlite:///data/eddy.db"
    server = processes(storage, secret=None)
    secret_file = tmp_path / "data" / "eddy.secret"
    assert secret_file.exists()
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")} | {"PYTHONPATH": str(ROOT)}
    minted = subprocess.run(
        [sys.executable, "-m", "service", "token", "--sub", "alice", "--tenant", "acme", "--role", "agent",
         "--storage", storage],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    ).stdout.strip()
    client = await Client.connect(server.port, "/ws/tickets/stream", minted)
    connected = await client.recv()
    assert connected["user_id"] == "alice" and connected["tenant"] == "acme"
    client.close()
    # Browsers send the token in the query string: it must not reach the access log either.
    for name in ("access_token", "token"):
        client = await Client.connect(server.port, "/ws", minted, header=False, query=f"?{name}={minted}")
        await client.recv()
        client.close()
    await http(server.port, "GET", f"/api/channels/tickets/events?access_token={minted}")
    await asyncio.sleep(0.2)
    log = server.output()
    assert "access_token=***" in log
    assert "DEVELOPMENT SECRET IN USE" in log
    # Three slashes make a relative path: the log names the file it really is.
    assert f"(storage sqlite file {tmp_path.resolve() / 'data' / 'eddy.db'}," in log
    assert secret not in log and minted not in log


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_tells_clients_to_go_and_exits(processes, tmp_path):
    server = processes(f"sqlite:///{tmp_path}/eddy.db")
    client = await Client.connect(server.port, "/ws/tickets/stream", make_token())
    await client.recv()
    server.process.send_signal(signal.SIGTERM)
    assert await client.recv_type("reconnect") == {"type": "reconnect", "reason": "server shutting down"}
    assert await asyncio.wait_for(client.connection.read_message(), 10) is None
    assert client.connection.close_code == 1001
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, server.process.wait, 10) == 0


@pytest.mark.gen_test(timeout=60)
async def test_shutdown_keeps_its_deadline_with_a_client_that_never_answers(processes, tmp_path):
    server = processes(f"sqlite:///{tmp_path}/eddy.db", env={"EDDY_SHUTDOWN_TIMEOUT": "1.5"})
    # A client that completes the upgrade, then never reads or answers the close handshake again.
    stuck = socket.create_connection(("127.0.0.1", server.port))
    stuck.sendall(
        b"GET /ws/tickets/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Authorization: Bearer " + make_token().encode() + b"\r\n\r\n")
    assert b" 101 " in stuck.recv(1000)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, server.process.wait, 20) == 0
    took = time.monotonic() - started
    stuck.close()
    print(f"shutdown with a stuck client took {took:.2f}s (deadline 1.5s)")
    assert took < 1.5 + 1.0


@pytest.mark.gen_test(timeout=30)
async def test_storage_url_errors_are_clear(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")} | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--processes", "2", "--storage", "memory://"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=20,
    )
    assert result.returncode != 0 and "memory://" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "notaport"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=20,
    )
    assert result.returncode == 2 and "--port" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", str(free_port())],
        capture_output=True, text=True, env=env | {"EDDY_HISTORY_SIZE": "lots"}, cwd=tmp_path, timeout=20,
    )
    assert result.returncode != 0 and "EDDY_HISTORY_SIZE" in result.stderr


@pytest.mark.gen_test(timeout=60)
async def test_processes_flag_serves_on_every_worker_and_shares_events(processes, tmp_path):
    server = processes(f"sqlite:///{tmp_path}/eddy.db", args=["--processes", "2"])
    token = make_token("dash")
    clients: list[Client] = []
    workers: dict[int, int] = {}
    # The kernel hands each connection to whichever worker accepts first; under load one worker
    # may win a whole batch, so open batches until both workers hold some (or give up after 8).
    for _ in range(8):
        for n in range(len(clients), len(clients) + 24):
            client = await Client.connect(server.port, "/ws/tickets/stream", make_token(f"dash-{n}"))
            await client.recv()
            clients.append(client)
        workers = {}
        for _ in range(60):
            stats = json_of(await http(server.port, "GET", "/api/stats", token=token))["process"]
            workers[stats["pid"]] = stats["connections"]
            if len(workers) == 2:
                break
        if len(workers) == 2 and all(count > 0 for count in workers.values()):
            break
    assert len(workers) == 2, "requests never reached a second worker"
    assert sum(workers.values()) == len(clients) and all(count > 0 for count in workers.values())
    # Each event is POSTed to whichever worker accepts it, and reaches sockets on both.
    ids = [(await publish(server.port, "tickets", "ticket.created", {"n": n}, token))["id"] for n in range(5)]
    for client in clients:
        assert [(await client.recv_type("event"))["id"] for _ in ids] == ids
        client.close()
    metrics_text = (await http(server.port, "GET", "/metrics")).body.decode()
    assert "eddy_connections" in metrics_text  # summed over both workers (multiprocess mode)
    # Killing the parent takes the workers down too (they would otherwise serve on, orphaned).
    workers = server.workers()
    assert len(workers) == 2
    server.process.kill()
    for _ in range(100):
        if not any(os.path.exists(f"/proc/{pid}") for pid in workers):
            break
        await asyncio.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read()
                   for pid in workers)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs, to allow the server only one")
def test_processes_0_forks_one_worker_per_cpu_the_server_may_use(processes, tmp_path):
    cpu = min(os.sched_getaffinity(0))
    server = processes(f"sqlite:///{tmp_path}/eddy.db", args=["--processes", "0"], cpus={cpu})
    workers = server.workers()
    assert len(workers) == 1, f"{len(workers)} workers forked for one allowed CPU"
    assert os.sched_getaffinity(workers[0]) == {cpu}  # forked after the pinning, so it inherits it


def test_processes_flag_removes_the_metrics_directories_it_leaves(processes, tmp_path):
    """A parent that exits after its workers removes its metrics directory; one that was killed leaves it, and the
    next `serve --processes N` on the machine removes it (its owner is gone)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    stale = temp / "eddy-metrics-999999999-abc"  # a parent that no longer runs
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"x")
    other = temp / "eddy-metrics-notapid"  # not one of ours
    other.mkdir()
    first = processes(f"sqlite:///{tmp_path}/eddy.db", args=["--processes", "2"], env={"TMPDIR": str(temp)})
    mine = [p.name for p in temp.iterdir() if p.name.startswith(f"eddy-metrics-{first.process.pid}-")]
    assert len(mine) == 1 and not stale.exists() and other.exists()
    first.process.kill()  # no chance to clean up
    first.process.wait(10)
    assert (temp / mine[0]).exists()
    second = processes(f"sqlite:///{tmp_path}/eddy.db", args=["--processes", "2"], env={"TMPDIR": str(temp)},
                       port=free_port())
    assert not (temp / mine[0]).exists()
    # Workers that exit cleanly (each told to stop) let the parent exit, and it removes its own directory.
    (own,) = [p for p in temp.iterdir() if p.name.startswith(f"eddy-metrics-{second.process.pid}-")]
    deadline = time.monotonic() + 20
    while second.process.poll() is None and time.monotonic() < deadline:
        for worker in second.workers():  # again for a worker restarted because it was still starting up
            os.kill(worker, signal.SIGTERM)
        time.sleep(0.5)
    assert second.process.poll() == 0
    assert not own.exists()
