"""The browser client (service/static/eddy.js) and the dashboard, in headless Chromium driven by Selenium.

A real ``eddy serve`` subprocess serves the page and the socket. The dashboard test kills the server
(SIGKILL), restarts it on the same port and file, and checks that the page reconnects by itself and
shows every event exactly once. The client tests import eddy.js in the page and drive it with a fake
WebSocket class to check the backoff schedule, the offline queue bound, the close-code policy and resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"browser tests need {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.processes import free_port  # noqa: E402
from tests.support import SECRET, make_token  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
WAIT = 20.0


class Server:
    """``python -m service serve`` on a fixed port and SQLite file, so it can be killed and started again."""

    def __init__(self, directory: Path, secret: str | None = SECRET, args: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.secret = secret  # None: the development secret, as under `make serve`
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.storage = f"sqlite:///{directory}/eddy.db"
        self.process: subprocess.Popen | None = None
        self.runs = 0

    def start(self, timeout: float = 15.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")}
        env.update(PYTHONPATH=str(ROOT), EDDY_LOG_FORMAT="text")
        if self.secret:
            env["EDDY_JWT_SECRET"] = self.secret
        self.runs += 1
        self.log = open(self.directory / f"eddy-{self.runs}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--address", "127.0.0.1",
             "--storage", self.storage, *self.args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.directory,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"eddy exited with {self.process.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=0.5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"eddy did not answer /healthz: {self.output()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        if self.process is not None:
            self.log.close()

    def output(self) -> str:
        self.log.flush()
        return (self.directory / f"eddy-{self.runs}.log").read_text(errors="replace")

    def publish(self, token: str, channel: str, event: str, data) -> dict:
        request = urllib.request.Request(
            f"{self.url}/api/events", method="POST",
            data=json.dumps({"channel": channel, "event": event, "data": data}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 201
            return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    eddy = Server(tmp_path_factory.mktemp("browser"))
    eddy.start()
    yield eddy
    eddy.kill()


@pytest.fixture(scope="module")
def driver():
    os.environ["SE_AVOID_STATS"] = "true"  # Selenium must not try the network
    profile = tempfile.mkdtemp(prefix="eddy-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, Selenium Manager is never run
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", f"--user-data-dir={profile}", "--window-size=1600,1300"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(WAIT)
    browser.set_script_timeout(WAIT)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition, message: str, timeout: float = WAIT):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(), message)


# --------------------------------------------------------------------------------------------
# The dashboard against a real server that is killed and restarted
# --------------------------------------------------------------------------------------------


def test_dashboard_shows_every_event_once_across_a_server_restart(server, driver):
    token = make_token("alice", tenant="acme")
    driver.get(server.url + "/")
    state = lambda: driver.find_element(By.ID, "state").get_attribute("data-state")  # noqa: E731
    # Record every frame the page sends, to see what it asks the server on reconnect.
    driver.execute_script("""
      window.sentFrames = [];
      const send = WebSocket.prototype.send;
      WebSocket.prototype.send = function (data) {
        window.sentFrames.push(JSON.parse(data));
        return send.call(this, data);
      };
    """)

    # The server has EDDY_JWT_SECRET set: no development token, and the page says why.
    driver.find_element(By.CSS_SELECTOR, "[data-testid=dev-token-button]").click()
    message = driver.find_element(By.CSS_SELECTOR, "[data-testid=signin-message]")
    wait_for(driver, lambda: "development secret" in message.text, "no message for the dev-token 404")

    # A token the server refuses: the page stops at once (no retries) and asks for another one.
    driver.find_element(By.CSS_SELECTOR, "[data-testid=token-input]").send_keys(make_token("alice", secret="x" * 40))
    driver.find_element(By.CSS_SELECTOR, "[data-testid=signin-button]").click()
    wait_for(driver, lambda: state() == "error", "a refused token did not end in state error")
    wait_for(driver, lambda: "TOKEN_INVALID" in message.text, f"no message for the refused token: {message.text!r}")

    driver.find_element(By.CSS_SELECTOR, "[data-testid=token-input]").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "[data-testid=signin-button]").click()
    wait_for(driver, lambda: state() == "connected", "never connected")
    assert driver.execute_script("return sessionStorage.getItem('eddy.dashboard.token')") == token
    assert token not in driver.current_url
    assert driver.find_element(By.ID, "identity").text == "alice @ acme"

    driver.find_element(By.CSS_SELECTOR, "[data-testid=join-input]").send_keys("tickets")
    driver.find_element(By.CSS_SELECTOR, "[data-testid=join-button]").click()
    row = '[data-testid=channel-list] li[data-channel="tickets"]'
    wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, f'{row}[data-joined="true"]'), "join not acked")

    def feed_ids() -> list[str]:
        return [li.get_attribute("data-id") for li in driver.find_elements(By.CSS_SELECTOR, "#feed > li")]

    first = server.publish(token, "tickets", "ticket.created", {"plate": "ABC1D23", "n": 1})["id"]
    wait_for(driver, lambda: feed_ids() == [first], "first event not in the feed")
    log_before = len(driver.find_elements(By.CSS_SELECTOR, "#state-log > li"))

    server.kill()
    wait_for(driver, lambda: state() == "reconnecting", "the page did not notice the server died")
    server.start()
    # Published before the page is back (it is waiting out its backoff): it must come through the resume.
    second = server.publish(token, "tickets", "ticket.updated", {"plate": "ABC1D23", "n": 2})["id"]
    wait_for(driver, lambda: state() == "connected", "the page did not reconnect by itself", timeout=40)
    wait_for(driver, lambda: feed_ids()[:1] == [second], "the event published around the restart never arrived")
    joins = [f for f in driver.execute_script("return window.sentFrames") if f["type"] == "join"]
    assert [(f["channel"], f.get("since")) for f in joins] == [("tickets", None), ("tickets", first)]  # resumed

    # A third event, through the dashboard's own publish form (POST /api/events), arrives live.
    channel_field = driver.find_element(By.CSS_SELECTOR, "[data-testid=publish-channel]")
    channel_field.clear()
    channel_field.send_keys("tickets")
    data_field = driver.find_element(By.CSS_SELECTOR, "[data-testid=publish-data]")
    data_field.clear()
    data_field.send_keys('{"plate": "ABC1D23", "n": 3}')
    driver.find_element(By.CSS_SELECTOR, "[data-testid=publish-button]").click()
    result = driver.find_element(By.CSS_SELECTOR, "[data-testid=publish-result]")
    wait_for(driver, lambda: result.text.startswith("Stored as #"), f"publish form failed: {result.text}")
    third = result.text.removeprefix("Stored as #").split(" ")[0]
    wait_for(driver, lambda: len(feed_ids()) == 3, "the published event never reached the feed")

    time.sleep(0.3)  # a late duplicate would show up by now
    assert feed_ids() == [third, second, first]  # newest first, each exactly once
    assert sorted(map(int, (first, second, third))) == [int(first), int(second), int(third)]
    assert driver.find_element(By.CSS_SELECTOR, f"{row} [data-testid=channel-count]").text == "3"
    assert [li.get_attribute("data-event") for li in driver.find_elements(By.CSS_SELECTOR, "#feed > li")] == [
        "message", "ticket.updated", "ticket.created"]

    entries = driver.find_elements(By.CSS_SELECTOR, "#state-log > li")
    since_kill = [li.get_attribute("data-state") for li in entries[: len(entries) - log_before]][::-1]
    assert since_kill[0] == "reconnecting" and since_kill[-1] == "connected", since_kill
    assert "connected" not in since_kill[:-1], since_kill  # no flapping: it came back once

    # Automatic rooms were caught up with `sync` after the restart, and the server took every frame.
    sent = driver.execute_script("return window.sentFrames")
    syncs = {(f["channel"], f["last_id"]) for f in sent if f["type"] == "sync"}
    assert syncs == {("tenant", first), ("user:alice", first)}
    assert [li.text for li in driver.find_elements(By.CSS_SELECTOR, '#errors li[data-kind="error"]')] == []

    # A second user, in the same page through eddy.js: presence and typing reach the dashboard.
    answer = driver.execute_async_script("""
      const [token, done] = arguments;
      import('/static/eddy.js').then(async ({ Eddy }) => {
        const bob = new Eddy({ url: '/ws', token });
        await bob.connect();
        await bob.join('tickets');
        await bob.presence('away');
        bob.typing('tickets', true);
        try { await bob.publish('tickets', 'x', {}); return 'published'; } catch (e) { return e.code; }
      }).then(done, (e) => done(String(e)));
    """, make_token("bob", tenant="acme"))
    assert answer == "FORBIDDEN"  # socket publishing needs a channel rule; the dashboard publishes over REST
    bob_away = '#presence-list li[data-user="bob"][data-status="away"]'
    wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, bob_away), "bob's presence never showed")
    assert driver.find_elements(By.CSS_SELECTOR, '#presence-list li[data-user="alice"][data-status="online"]')
    wait_for(driver, lambda: driver.find_element(By.ID, "typing").text == "bob is typing…", "no typing indicator")

    # The admin view: /api/stats for this tenant, on the page.
    driver.execute_script("window.dispatchEvent(new Event('eddy-stats-refresh'))")
    def stats_row() -> list[str]:  # read in one go: the panel re-renders every few seconds
        return driver.execute_script("""return Array.from(document.querySelectorAll(
            '#stats-channels tr[data-channel="tickets"] td'), (td) => td.textContent)""")
    # Alice and bob subscribe; this process (restarted) fanned out two of the events, and bob's typing and
    # presence are not counted. Waited for, as an answer asked before bob joined may still be on show.
    wait_for(driver, lambda: stats_row()[:3] == ["tickets", "2", "2"], "the stats panel never showed tickets: 2, 2")
    assert "connections" in driver.find_element(By.CSS_SELECTOR, "[data-testid=stats-process]").text
    check_live_charts(driver, server, token)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("EDDY_UPDATE_SCREENSHOT"):  # refresh the README's copy on purpose, not on every run
        shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")


def test_development_token_defaults_to_the_readmes_tenant(tmp_path, driver):
    """Under `make serve` (development secret), the page's one-click token sees what the README publishes."""
    eddy = Server(tmp_path, secret=None)
    eddy.start()
    try:
        driver.get(eddy.url + "/")
        driver.execute_script("sessionStorage.clear()")
        driver.get(eddy.url + "/")
        driver.find_element(By.CSS_SELECTOR, "[data-testid=dev-token-button]").click()
        wait_for(driver, lambda: driver.find_element(By.ID, "state").get_attribute("data-state") == "connected",
                 "the development token did not connect")
        assert driver.find_element(By.ID, "identity").text == "dashboard @ parking"
        driver.find_element(By.CSS_SELECTOR, "[data-testid=join-input]").send_keys("tickets")
        driver.find_element(By.CSS_SELECTOR, "[data-testid=join-button]").click()
        wait_for(driver, lambda: driver.find_elements(
            By.CSS_SELECTOR, '[data-testid=channel-list] li[data-channel="tickets"][data-joined="true"]'), "no join")
        # The README's token, minted the README's way, beside the server's database.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")} | {"PYTHONPATH": str(ROOT)}
        readme_token = subprocess.run(
            [sys.executable, "-m", "service", "token", "--sub", "kiosk-1", "--tenant", "parking", "--role", "agent",
             "--storage", eddy.storage], capture_output=True, text=True, env=env, check=True).stdout.strip()
        published = eddy.publish(readme_token, "tickets", "ticket.created", {"plate": "ABC1D23"})["id"]
        wait_for(driver, lambda: [li.get_attribute("data-id") for li in driver.find_elements(
            By.CSS_SELECTOR, "#feed > li")] == [published], "the README's publish never reached the dashboard")
    finally:
        driver.execute_script("sessionStorage.clear()")
        eddy.kill()


def test_the_readmes_eddy_js_snippet_publishes_under_its_rules_file(tmp_path, driver):
    """The README's eddy.js snippet, run as written in the page, against a server with the README's eddy.toml."""
    from tests.test_readme import blocks

    [(rules, _)] = blocks("toml")
    [snippet] = [body for body, _ in blocks("javascript") if "eddy.publish(" in body]
    (tmp_path / "eddy.toml").write_text(rules)
    eddy = Server(tmp_path, args=("--config", "eddy.toml"))
    eddy.start()
    try:
        host = eddy.url.removeprefix("http://")
        token = make_token("kiosk-1", tenant="parking", roles=["agent"])
        code = snippet.replace("localhost:8888", host).replace("fetchMyToken()", json.dumps(token))
        # A static import cannot run inside a script; the same import, awaited.
        code = re.sub(r'^import \{ Eddy \} from ("[^"]+");', r"const { Eddy } = await import(\1);", code, flags=re.M)
        assert "await import(" in code
        driver.get(eddy.url + "/healthz")
        result = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];\n(async () => {\n" + code +
            "\neddy.close(); return 'published'; })().then(done, (e) => done(`${e.code || ''} ${e.message || e}`));")
        assert result == "published", result
        request = urllib.request.Request(f"{eddy.url}/api/channels/conversation:42/events?after=0",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            stored = json.loads(response.read())["events"]
        assert [(e["event"], e["data"]) for e in stored] == [("message", {"text": "oi"})]
    finally:
        eddy.kill()


def check_live_charts(driver, server, token: str) -> None:
    """The live charts exist, move in place with the server's figures, and the layout shows everything."""
    def live() -> dict:
        return driver.execute_script("""
          const root = document.getElementById('live');
          const plots = [...root.querySelectorAll('.plot')];
          return {
            updates: Number(root.dataset.updates || 0),
            charts: plots.map((p) => p.querySelectorAll('.uplot canvas').length),
            marked: plots.map((p) => Boolean(p.querySelector('.uplot') && p.querySelector('.uplot').eddyMark)),
            latencyCount: Number(document.getElementById('chart-latency').dataset.count || -1),
            latencyRecent: Number(document.getElementById('chart-latency').dataset.recent || -1),
            latencySummary: document.getElementById('latency-summary').textContent,
            deliveries: document.getElementById('now-deliveries').textContent,
            connections: document.getElementById('now-connections').textContent,
            watcher: document.getElementById('watcher').textContent,
          };""")

    wait_for(driver, lambda: live()["updates"] >= 2, "the live charts were never updated")
    assert live()["charts"] == [1, 1, 1, 1]  # deliveries/s, connections, events/s per channel, latency
    # Mark the chart elements, publish a burst, and see the same elements show the new figures.
    driver.execute_script("for (const u of document.querySelectorAll('#live .uplot')) u.eddyMark = true;")
    before = live()
    for n in range(20):
        server.publish(token, "tickets", "ticket.burst", {"n": n})
    wait_for(driver, lambda: live()["latencyCount"] >= before["latencyCount"] + 20,
             f"the latency histogram did not count the burst: {live()}")
    after = live()
    assert after["latencyRecent"] >= 20 and "last minute" in after["latencySummary"], after  # the burst is recent
    assert after["marked"] == [True, True, True, True], "a chart was rebuilt instead of updated in place"
    assert after["connections"] == "2"  # alice's dashboard and bob's client
    assert "lag" in after["watcher"] and "following" in after["watcher"]
    wait_for(driver, lambda: float(live()["deliveries"] or 0) > 0, "deliveries/s never moved")

    # Full width, and no column header cut off.
    width = driver.execute_script("return [document.getElementById('app').getBoundingClientRect().width, "
                                  "document.documentElement.clientWidth]")
    assert width[0] > 0.95 * width[1] - 40, width
    cut = driver.execute_script("""return [...document.querySelectorAll('#app th')]
        .filter((th) => th.scrollWidth > th.clientWidth + 1).map((th) => th.textContent)""")
    assert cut == []


# --------------------------------------------------------------------------------------------
# The client's logic, in the browser, with a fake WebSocket
# --------------------------------------------------------------------------------------------

PRELUDE = r"""
const done = arguments[arguments.length - 1];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const until = async (condition, what, ms = 5000) => {
  const start = performance.now();
  while (!condition()) {
    if (performance.now() - start > ms) throw new Error("timed out waiting for " + what);
    await sleep(2);
  }
};
class FakeSocket {
  constructor(url) {
    this.url = url; this.sent = []; this.readyState = 0; this.createdAt = performance.now();
    FakeSocket.all.push(this);
    if (FakeSocket.script) setTimeout(() => FakeSocket.script(this), 0);
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code = 1000, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose && this.onclose({ code, reason }), 0);
  }
  serverSends(frame) { this.onmessage && this.onmessage({ data: JSON.stringify(frame) }); }
  serverCloses(code = 1006) { this.readyState = 3; this.onclose && this.onclose({ code, reason: "" }); }
  accept(user = "alice") {
    this.readyState = 1;
    this.onopen && this.onopen({});
    this.serverSends({ type: "connected", connection_id: "c" + FakeSocket.all.length, user_id: user, tenant: "acme",
                       channels: ["tenant", "user:" + user], timestamp: new Date().toISOString() });
  }
  frames(type) { return this.sent.filter((f) => f.type === type); }
}
FakeSocket.all = [];
FakeSocket.script = null;
"""


def run_js(driver, server, body: str):
    """Run ``body`` (an async function body with ``m`` = the eddy.js module) in a page of the server."""
    driver.get(server.url + "/healthz")  # a fresh page: nothing left over from another test
    script = PRELUDE + "(async () => { const m = await import('/static/eddy.js');\n" + body + "\n})()" \
        ".then(done, (e) => done({ failed: String(e && e.stack || e) }));"
    result = driver.execute_async_script(script)
    assert not (isinstance(result, dict) and "failed" in result), result.get("failed")
    return result


def test_backoff_schedule_doubles_from_one_second_to_a_32_second_cap_with_jitter_in_bounds(server, driver):
    result = run_js(driver, server, r"""
      const attempts = [...Array(12).keys()].map((i) => i + 1);
      const out = {
        ceilings: attempts.map((a) => m.backoffCeiling(a)),
        equalLow: attempts.map((a) => m.backoffDelay(a, { random: () => 0 })),
        equalHigh: attempts.map((a) => m.backoffDelay(a, { random: () => 0.9999999 })),
        fullLow: attempts.map((a) => m.backoffDelay(a, { jitter: "full", random: () => 0 })),
        fullHigh: attempts.map((a) => m.backoffDelay(a, { jitter: "full", random: () => 0.9999999 })),
        none: attempts.map((a) => m.backoffDelay(a, { jitter: "none" })),
        schedule: m.backoffSchedule(),
        defaults: m.DEFAULTS,
        outOfBounds: 0, spread: {},
      };
      for (const jitter of ["equal", "full"]) {
        const seen = [];
        for (let i = 0; i < 2000; i++) {
          const attempt = 1 + (i % 10);
          const delay = m.backoffDelay(attempt, { jitter });
          const [low, high] = m.backoffBounds(attempt, { jitter });
          if (delay < low || delay > high) out.outOfBounds += 1;
          if (attempt === 6) seen.push(delay);
        }
        out.spread[jitter] = [Math.min(...seen), Math.max(...seen)];
      }
      out.scheduleInBounds = out.schedule.every((d, i) => {
        const [low, high] = m.backoffBounds(i + 1);
        return d >= low && d <= high;
      });
      return out;
    """)
    ceilings = [1000, 2000, 4000, 8000, 16000, 32000, 32000, 32000, 32000, 32000, 32000, 32000]
    assert result["ceilings"] == ceilings
    assert result["none"] == ceilings
    assert result["equalLow"] == [c // 2 for c in ceilings]  # equal jitter: never below half the ceiling
    assert result["equalHigh"] == ceilings
    assert result["fullLow"] == [0] * 12 and result["fullHigh"] == ceilings
    assert result["outOfBounds"] == 0
    low, high = result["spread"]["equal"]  # 2000 draws actually vary over [16 s, 32 s]
    assert 16000 <= low < 19000 and 29000 < high <= 32000
    low, high = result["spread"]["full"]
    assert 0 <= low < 3000 and 29000 < high <= 32000
    assert len(result["schedule"]) == 10 and result["scheduleInBounds"]
    assert result["defaults"]["maxAttempts"] == 10 and result["defaults"]["queueLimit"] == 100


def test_client_retries_with_backoff_then_gives_up_after_max_attempts(server, driver):
    result = run_js(driver, server, r"""
      FakeSocket.script = (s) => s.serverCloses(1006);  // the server is down: every handshake fails
      let provided = 0;
      const probes = [];
      const client = new m.Eddy({
        url: "ws://eddy.invalid/ws", tokenProvider: () => "tok-" + (++provided), WebSocket: FakeSocket,
        baseDelay: 20, maxDelay: 80, maxAttempts: 4,
        fetch: async (url, init) => { probes.push([url, init.headers.Authorization]); throw new TypeError("offline"); },
      });
      const states = [];
      client.on("state", (s) => states.push({ state: s.state, delay: s.delay, attempt: s.attempt }));
      let outcome = null;
      client.connect().then(() => { outcome = "connected"; }, (e) => { outcome = e.code; });
      await until(() => client.state === "error", "state error");
      const sockets = FakeSocket.all.length;
      await sleep(300);  // nothing more after giving up
      return {
        states, outcome, provided, probes: probes.length, firstProbe: probes[0],
        sockets, socketsLater: FakeSocket.all.length,
        created: FakeSocket.all.map((s) => s.createdAt), urls: FakeSocket.all.map((s) => s.url),
      };
    """)
    assert result["sockets"] == 5 == result["socketsLater"]  # the first try and 4 retries, then nothing
    assert result["provided"] == 5  # the token provider is asked on every connect
    assert result["urls"][0] == "ws://eddy.invalid/ws?access_token=tok-1"
    assert result["urls"][4] == "ws://eddy.invalid/ws?access_token=tok-5"
    assert result["probes"] == 5 and result["firstProbe"] == ["http://eddy.invalid/api/stats", "Bearer tok-1"]
    assert result["outcome"] == "MAX_ATTEMPTS"
    states = result["states"]
    assert states[0]["state"] == "connecting" and states[-1]["state"] == "error"
    assert {s["state"] for s in states[1:-1]} == {"reconnecting"}
    waits = [s for s in states if s["delay"] is not None]
    assert [s["attempt"] for s in waits] == [1, 2, 3, 4]
    for wait, ceiling in zip(waits, [20, 40, 80, 80], strict=True):
        assert ceiling / 2 <= wait["delay"] <= ceiling, waits
    created = result["created"]
    for n, wait in enumerate(waits):  # each retry really waited its delay
        assert created[n + 1] - created[n] >= wait["delay"] - 2, (created, waits)


def test_client_follows_the_close_codes_and_reconnect_frame(server, driver):
    result = run_js(driver, server, r"""
      const out = {};
      // 1. A token the server refuses (the browser only sees a failed handshake; the HTTP probe says 401).
      FakeSocket.script = (s) => s.serverCloses(1006);
      let probes = 0;
      const refused = new m.Eddy({
        url: "ws://eddy.invalid/ws", token: "expired", WebSocket: FakeSocket, baseDelay: 10,
        fetch: async () => {
          probes += 1;
          return { status: 401, json: async () => ({ code: "TOKEN_EXPIRED", detail: "the token has expired" }) };
        },
      });
      const codes = [];
      refused.on("error", (e) => codes.push(e.code));
      refused.connect();
      await until(() => refused.state === "error", "auth failure to stop the client");
      await sleep(100);
      out.auth = { sockets: FakeSocket.all.length, probes, codes };

      // 2. 4029 (too many connections): no automatic reconnect.
      FakeSocket.all = [];
      FakeSocket.script = (s) => s.accept();
      const evicted = new m.Eddy({ url: "ws://eddy.invalid/ws", token: "t", WebSocket: FakeSocket, baseDelay: 10 });
      await evicted.connect();
      FakeSocket.all[0].serverCloses(4029);
      await sleep(100);
      out.evicted = { state: evicted.state, sockets: FakeSocket.all.length };

      // 3. 4003 (token expired): the provider is asked again and the client reconnects with the new token.
      FakeSocket.all = [];
      let n = 0;
      const refreshing = new m.Eddy({ url: "ws://eddy.invalid/ws", tokenProvider: async () => "fresh-" + (++n),
                                      WebSocket: FakeSocket, baseDelay: 10 });
      await refreshing.connect();
      FakeSocket.all[0].serverSends({ type: "error", ref: null, code: "TOKEN_EXPIRED", error: "expired" });
      await until(() => FakeSocket.all[0].frames("authenticate").length === 1, "authenticate frame");
      out.refreshFrame = FakeSocket.all[0].frames("authenticate")[0].token;
      FakeSocket.all[0].serverCloses(4003);
      await until(() => FakeSocket.all.length === 2 && refreshing.state === "connected", "reconnect after 4003");
      out.refresh = FakeSocket.all.map((s) => s.url);
      refreshing.close();

      // 4. {"type":"reconnect"}: leave at once (within one base delay) and come back.
      FakeSocket.all = [];
      const moving = new m.Eddy({ url: "ws://eddy.invalid/ws", token: "t", WebSocket: FakeSocket, baseDelay: 50,
                                  maxDelay: 10000 });
      let told = 0;
      moving.on("reconnect", () => { told += 1; });
      await moving.connect();
      const before = performance.now();
      FakeSocket.all[0].serverSends({ type: "reconnect", reason: "server shutting down" });
      await until(() => FakeSocket.all.length === 2 && moving.state === "connected", "reconnect frame");
      out.moved = { told, ms: performance.now() - before, closed: FakeSocket.all[0].readyState };
      moving.close();
      out.closedState = moving.state;

      // 5. A silent link (no keepalive, no answer to the client's ping) is dropped and replaced.
      FakeSocket.all = [];
      const silent = new m.Eddy({ url: "ws://eddy.invalid/ws", token: "t", WebSocket: FakeSocket, baseDelay: 10,
                                  idleTimeout: 200 });
      await silent.connect();
      await until(() => FakeSocket.all.length === 2 && silent.state === "connected", "silent link replaced");
      out.silent = { pings: FakeSocket.all[0].frames("ping").length, closed: FakeSocket.all[0].readyState };
      silent.close();
      return out;
    """)
    assert result["auth"] == {"sockets": 1, "probes": 1, "codes": ["TOKEN_EXPIRED"]}
    assert result["evicted"] == {"state": "error", "sockets": 1}
    assert result["refreshFrame"] == "fresh-2"  # TOKEN_EXPIRED frame: authenticate with a fresh token
    assert result["refresh"] == ["ws://eddy.invalid/ws?access_token=fresh-1",
                                 "ws://eddy.invalid/ws?access_token=fresh-3"]
    assert result["moved"]["told"] == 1 and result["moved"]["closed"] == 3
    assert result["moved"]["ms"] < 1000  # not the 1 s+ backoff of a lost connection
    assert result["closedState"] == "disconnected"
    assert result["silent"] == {"pings": 1, "closed": 3}


def test_offline_queue_keeps_the_newest_100_frames_and_flushes_them_in_order(server, driver):
    result = run_js(driver, server, r"""
      const client = new m.Eddy({ url: "ws://eddy.invalid/ws", token: "t", WebSocket: FakeSocket });
      const dropped = [];
      client.on("dropped", (d) => dropped.push(d.frame));
      const outcomes = [];
      const promises = [];
      for (let n = 0; n < 101; n++) {
        promises.push(client.publish("orders", "order.created", { n }, { idempotencyKey: "k-" + n })
          .then((ack) => outcomes[n] = ack.id, (e) => outcomes[n] = e.code));
      }
      const queuedOffline = client.queued;
      await sleep(20);
      const droppedBeforeConnect = outcomes[0];
      FakeSocket.script = (s) => s.accept();
      await client.connect();
      const socket = FakeSocket.all[0];
      const firstBurst = socket.frames("publish").length;   // sent at once, under the server's burst
      await until(() => socket.frames("publish").length === 100, "the whole queue to be flushed");
      for (const f of socket.frames("publish")) {
        socket.serverSends({ type: "ack", ref: f.ref, channel: "orders", id: String(1000 + f.data.n), timestamp: "t" });
      }
      await Promise.all(promises);
      return {
        queuedOffline, dropped, droppedBeforeConnect, firstBurst, queuedAfter: client.queued,
        sent: socket.frames("publish").map((f) => [f.data.n, f.idempotency_key, f.channel, f.event]),
        refs: new Set(socket.frames("publish").map((f) => f.ref)).size, outcomes,
      };
    """)
    assert result["queuedOffline"] == 100
    assert [frame["data"]["n"] for frame in result["dropped"]] == [0]  # the oldest went
    assert result["droppedBeforeConnect"] == "DROPPED"
    assert [s[0] for s in result["sent"]] == list(range(1, 101))  # in order, nothing lost or repeated
    assert all(s[1] == f"k-{s[0]}" and s[2:] == ["orders", "order.created"] for s in result["sent"])
    assert result["refs"] == 100
    assert result["firstBurst"] <= 80  # paced below the server's burst of 100 frames
    assert result["outcomes"] == ["DROPPED"] + [str(1000 + n) for n in range(1, 101)]
    assert result["queuedAfter"] == 0


def test_reconnect_rejoins_every_room_from_its_last_event_and_drops_the_overlap(server, driver):
    result = run_js(driver, server, r"""
      FakeSocket.script = (s) => s.accept();
      let provided = 0;
      const client = new m.Eddy({ url: "ws://eddy.invalid/ws", tokenProvider: async () => "tok-" + (++provided),
                                  WebSocket: FakeSocket, baseDelay: 40, maxDelay: 40 });
      const events = [], named = [], duplicates = [];
      client.on("event", (f) => events.push(f.channel + ":" + f.id));
      client.on("event:order.created", (f) => named.push(f.id));
      client.on("duplicate", (f) => duplicates.push(f.channel + ":" + f.id));
      await client.connect();
      const first = FakeSocket.all[0];
      const ack = (socket, channel) => {
        for (const f of socket.frames("join").filter((j) => j.channel === channel)) {
          socket.serverSends({ type: "ack", ref: f.ref, channel });
        }
      };
      const ev = (socket, channel, id, event = "order.created", timestamp = new Date().toISOString()) =>
        socket.serverSends({ type: "event", id, channel, event, timestamp, data: { id } });

      const joined = Promise.all([client.join("orders"), client.join("news"), client.join("empty")]);
      ack(first, "orders"); ack(first, "news"); ack(first, "empty");
      const acks = await joined;
      ev(first, "user:alice", "4", "notice"); ev(first, "orders", "5"); ev(first, "news", "6", "news.posted");
      ev(first, "orders", "7");
      const quiet = client.join("quiet");   // joined after id 7 was seen, nothing on it yet
      ack(first, "quiet");
      await quiet;
      const firstJoins = first.frames("join");

      first.serverCloses(1006);                          // connection lost
      const stateAfterLoss = client.state;
      const queued = client.publish("orders", "order.created", { offline: true }, { idempotencyKey: "p-1" });
      await until(() => FakeSocket.all.length === 2 && client.state === "connected", "reconnected");
      const second = FakeSocket.all[1];
      await until(() => second.frames("publish").length === 1, "queued publish flushed");
      const order = second.sent.map((f) => f.type + ":" + (f.channel || "") + ":" + (f.since ?? f.last_id ?? "-"));
      ack(second, "orders"); ack(second, "news"); ack(second, "empty"); ack(second, "quiet");
      // The server replays after `since`; an overlap (7, 6) must not reach the application twice.
      ev(second, "orders", "7"); ev(second, "orders", "8"); ev(second, "news", "6", "news.posted");
      ev(second, "news", "9", "news.posted"); ev(second, "quiet", "10", "quiet.thing");
      // `empty` had no position at all: its whole history is replayed, and what predates the join is skipped.
      ev(second, "empty", "1", "old.thing", "2001-01-01T00:00:00.000Z"); ev(second, "empty", "12", "new.thing");
      // Automatic rooms cannot be re-joined with `since`: the client syncs them, holding live events meanwhile.
      ev(second, "user:alice", "14", "notice");          // live, before the answer to the sync
      const syncs = second.frames("sync");
      const answer = (f, events) => second.serverSends({ type: "sync_data", ref: f.ref, channel: f.channel,
        events: events.map((id) => ({ type: "event", id, channel: f.channel, event: "notice", timestamp: "t",
                                      data: {} })),
        count: events.length, has_more: false });
      answer(syncs.find((f) => f.channel === "tenant"), []);
      answer(syncs.find((f) => f.channel === "user:alice"), ["13", "14"]);
      const publishFrame = second.frames("publish")[0];
      second.serverSends({ type: "ack", ref: publishFrame.ref, channel: "orders", id: "11", timestamp: "t" });
      const published = await queued;
      ev(second, "orders", "11");
      await sleep(20);
      return {
        acks: acks.map((a) => a.channel), firstJoins, stateAfterLoss, order, events, named, duplicates,
        published: published.id, urls: FakeSocket.all.map((s) => s.url), provided,
        last: ["orders", "news", "quiet", "empty"].map((c) => client.lastEventId(c)),
      };
    """)
    assert result["acks"] == ["orders", "news", "empty"]
    assert all("since" not in frame for frame in result["firstJoins"])  # fresh joins: live only
    assert result["stateAfterLoss"] == "reconnecting"
    # Rooms first (each from the last id seen on it; `quiet` from what had been seen when it was joined),
    # then the frame queued while offline.
    # Automatic rooms (connected.channels) are caught up with `sync` from the last id seen on them (or anywhere).
    assert result["order"] == ["join:orders:7", "join:news:6", "join:empty:0", "join:quiet:7", "sync:tenant:7",
                               "sync:user:alice:4", "publish:orders:-"]
    assert result["events"] == ["user:alice:4", "orders:5", "news:6", "orders:7", "orders:8", "news:9", "quiet:10",
                                "empty:12", "user:alice:13", "user:alice:14", "orders:11"]
    assert result["named"] == ["5", "7", "8", "11"]
    assert result["duplicates"] == ["orders:7", "news:6", "user:alice:14"]
    assert result["published"] == "11"
    assert result["urls"] == ["ws://eddy.invalid/ws?access_token=tok-1", "ws://eddy.invalid/ws?access_token=tok-2"]
    assert result["last"] == ["11", "9", "10", "12"]
