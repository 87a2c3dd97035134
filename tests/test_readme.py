"""The README, followed as a newcomer would: its commands run against a real server and do what it says they do.

Every fenced ``bash`` block of README.md runs, in order, in one bash session (``set -euo pipefail``), in a fresh folder
where ``.venv/bin/eddy`` is this checkout's ``eddy``, against ``eddy serve`` started there the way ``make serve``
starts it (no ``EDDY_JWT_SECRET``: the development secret; ``./eddy.db``). A block that cannot run here is preceded by
``<!-- readme-test: skip (why, and what covers it instead) -->``. The one change to the text is the port: 8888
becomes a free port (also exported as ``EDDY_PORT``, which ``eddy tail`` and ``eddy publish`` default to), so that
parallel runs cannot collide.

Beyond exit statuses, the test checks what the README promises: the status codes its comments show (``HTTP 201`` …)
are the ones printed, in order, and the ``connected`` frames it shows have the fields and rooms the server sends.
The rules file it shows really lets a socket publish to ``conversation:42`` with the README's token.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from service.client import EddyClient
from tests.processes import EddyProcess, free_port
from tests.support import Client

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

SKIP = re.compile(r"<!-- readme-test: skip \((?P<reason>.+)\) -->")


def blocks(language: str) -> list[tuple[str, str | None]]:
    """``(body, skip reason or None)`` of every fenced block in ``language``, in order.

    A block is skipped when the last non-blank line before its opening fence is the skip comment.
    """
    found = []
    lines = README.splitlines()
    n = 0
    while n < len(lines):
        if not lines[n].startswith("```") or lines[n] == "```":
            n += 1
            continue
        tag = lines[n][3:].strip()
        end = lines.index("```", n + 1)
        previous = next((line for line in reversed(lines[:n]) if line.strip()), "")
        skip = SKIP.fullmatch(previous.strip())
        if tag == language:
            found.append(("\n".join(lines[n + 1:end]) + "\n", skip["reason"] if skip else None))
        n = end + 1
    return found


def found(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text)
    assert match is not None, f"the README no longer has {pattern!r}"
    return match


def runnable_script() -> str:
    return "\n".join(body for body, skip in blocks("bash") if skip is None)


def shown_frames(text: str, frame_type: str) -> list[dict]:
    """The frames of ``frame_type`` the README shows in comments (``# {…}`` or ``# < {…}``)."""
    shown = []
    for line in text.splitlines():
        payload = re.sub(r"^\s*#\s*(<\s*)?", "", line)
        if line.lstrip().startswith("#") and payload.startswith(f'{{"type":"{frame_type}"'):
            shown.append(json.loads(payload))
    return shown


def test_every_block_runs_or_says_why_not():
    bash = blocks("bash")
    assert len(bash) >= 8
    for body, reason in bash:
        assert reason is None or len(reason) > 20, f"a skipped block needs its reason: {body[:80]}"
    script = runnable_script()
    # What the issue names must run: the quick start, the clients, polling, and the recipe.
    for needed in ("eddy token", "eddy tail tickets", "eddy publish", "/sse?", "/api/channels/tickets/events",
                   "ticket.expiringSoon", "/api/scheduled/"):
        assert needed in script, f"{needed!r} is in no runnable block"
    assert "wscat" not in script and "docker" not in script and "make serve" not in script


def install_eddy(folder: Path) -> None:
    """``.venv/bin/eddy`` in ``folder``: this checkout's ``eddy``, as `make serve` installs it."""
    bin_dir = folder / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "eddy"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m service "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def newcomer(tmp_path):
    """A folder as `make serve` leaves it, with the server running on a free port."""
    port = free_port()
    install_eddy(tmp_path)
    server = EddyProcess(tmp_path, "sqlite:///eddy.db", secret=None, port=port, args=[])
    server.wait_ready()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")}
    env.update(PYTHONPATH=str(ROOT), EDDY_PORT=str(port))
    yield tmp_path, port, env, server
    server.stop()


def readme_token(folder: Path, env: dict[str, str]) -> str:
    """The token of the quick start, minted by the command the README gives."""
    command = found(r"EDDY_TOKEN=\$\((?P<command>[^)]*)\)", runnable_script())["command"]
    return subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_readme_commands_run_and_answer_as_documented(newcomer):
    folder, port, env, server = newcomer
    script = runnable_script().replace("8888", str(port))
    session = ("set -euo pipefail\n"
               "trap 'sleep 1; kill $(jobs -p) 2>/dev/null || true; wait' EXIT\n"  # let background clients print
               + script)
    result = subprocess.run(["bash", "-c", session], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=90, check=False)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nserver:\n{server.output()}"
    assert "Traceback" not in result.stderr, result.stderr

    # Every status code a comment promises is printed, in order.
    promised = [code for line in script.splitlines() if line.lstrip().startswith("#")
                for code in re.findall(r"HTTP (\d{3})", line)]
    assert promised == ["201", "200", "201", "202", "201", "204"]
    assert re.findall(r"HTTP (\d{3})", result.stdout) == promised, result.stdout

    # `eddy tail` printed a connected frame like the README's, and the event (live or replayed).
    decoder = json.JSONDecoder()
    lines = [decoder.raw_decode(line)[0] for line in result.stdout.splitlines() if line.startswith('{"type":')]
    connected = [frame for frame in lines if frame["type"] == "connected"]
    [shown] = shown_frames(blocks("bash")[1][0], "connected")
    assert connected and all(frame.keys() == shown.keys() for frame in connected)
    assert {(f["user_id"], f["tenant"], tuple(f["channels"])) for f in connected} == {
        (shown["user_id"], shown["tenant"], tuple(shown["channels"]))}
    events = [frame for frame in lines if frame["type"] == "event" and frame["event"] == "ticket.created"]
    assert events and events[0]["data"] == {"plate": "ABC1D23", "status": "Active"}
    # The warning was cancelled: nothing is left scheduled.
    log = server.output()
    assert f"sqlite file {folder.resolve() / 'eddy.db'}" in log
    token = readme_token(folder, env)
    listing = subprocess.run(["curl", "-sS", f"localhost:{port}/api/scheduled", "-H", f"Authorization: Bearer {token}"],
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(listing)["scheduled"] == []


@pytest.mark.gen_test(timeout=60)
async def test_the_seed_url_sends_the_connected_frame_the_readme_shows(newcomer):
    folder, port, env, _ = newcomer
    [(wscat, reason)] = [(body, skip) for body, skip in blocks("bash") if "wscat" in body]
    assert reason is not None
    [shown] = shown_frames(wscat, "connected")
    path = found(r"ws://localhost:8888(?P<path>/\S+?)\"", wscat)["path"]
    client = await Client.connect(port, path, readme_token(folder, env))
    connected = await client.recv()
    client.close()
    assert connected.keys() == shown.keys()
    assert {k: connected[k] for k in ("type", "user_id", "tenant", "channels")} == {
        k: shown[k] for k in ("type", "user_id", "tenant", "channels")}


@pytest.mark.gen_test(timeout=60)
async def test_the_readme_rules_file_lets_the_eddy_js_snippet_publish(tmp_path):
    [(rules, _)] = blocks("toml")
    [snippet] = [body for body, _ in blocks("javascript") if "eddy.publish(" in body]
    channel, event = found(r'eddy\.publish\("([^"]+)", "([^"]+)"', snippet).groups()
    (tmp_path / "eddy.toml").write_text(rules)
    install_eddy(tmp_path)
    server = EddyProcess(tmp_path, "sqlite:///eddy.db", secret=None, args=["--config", "eddy.toml"])
    try:
        await asyncio.get_running_loop().run_in_executor(None, server.wait_ready)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")} | {"PYTHONPATH": str(ROOT)}
        token = await asyncio.get_running_loop().run_in_executor(None, readme_token, tmp_path, env)
        client = EddyClient(f"ws://127.0.0.1:{server.port}/ws", token=token)
        await client.connect()
        await client.join("tickets")  # the rule that keeps the quick start working with a rules file
        ack = await client.publish(channel, event, {"text": "oi"})
        assert ack["channel"] == channel and int(ack["id"]) > 0
        client.close()
    finally:
        server.stop()
