"""The web console in a real browser: Playwright drives Debian's chromium (``/usr/bin/chromium``, installed by
``.ci/run`` with apt; Playwright's own browser download needs the internet) against the console of a
``--client`` node in a mesh of three serving nodes.

What a user notices: the page lists the four nodes (three with memory bars, one client) and both
models; a chat through the page streams the same greedy answer as the OpenAI API; a killed node leaves
the page within 10 s; an applied manifest's model shows up Loading, then Ready, without a reload.
Screenshots (desktop and narrow) are saved in the test's folder and copied to ``bench/results/``.
``meshllm`` with no arguments serves the page read-only, listing the meshes a real relay holds; a node
with several GPUs gets one bar per GPU. With the admin token the page shows the blackboard's feed, newest
first, as text, and follows new posts.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import openai
import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from meshllm.discovery import nostr
from meshllm.discovery.listing import ListingContent, make_event
from meshllm.store.mesh import InviteToken, MeshCredentials
from tests.conftest import free_port
from tests.integration.nodes import Mesh, NodeProcess, listed, wait_for

pytestmark = pytest.mark.engine

CHROMIUM = Path("/usr/bin/chromium")
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
PROMPT = "Tell me a story"


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def third_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meshllm.engine.tinygguf import write_dense

    return write_dense(tmp_path_factory.mktemp("models") / "third-dense.gguf", n_layer=3, seed=11)


def api_answer(node: NodeProcess, model: str) -> str:
    with openai.OpenAI(base_url=f"{node.api}/v1", api_key="unused", max_retries=0) as client:
        chunks = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=24, temperature=0, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_the_console_shows_the_mesh_chats_and_follows_changes(mesh: Mesh, browser: Browser, tiny_dense: Path,
                                                                tiny_moe: Path, third_dense: Path,
                                                                tmp_path: Path) -> None:
    a = mesh.start("a", "127.0.0.2", "--name", "node-a", models=(str(tiny_dense),))
    a.wait_ready("tiny-dense")
    token = a.token()
    b = mesh.start("b", "127.0.0.3", "--name", "node-b", "--join", token, models=(str(tiny_moe),))
    d = mesh.start("d", "127.0.0.5", "--name", "node-d", "--join", token)
    c = mesh.start("c", "127.0.0.4", "--name", "node-c", "--client", "--join", token)
    b.wait_ready("tiny-moe")
    wait_for(lambda: listed(c) == {"tiny-dense", "tiny-moe"}, timeout=60, what="the client to see both models")
    admin = (c.state_dir / "admin.token").read_text().strip()
    ids = {name: n.status()["node"]["id"] for name, n in (("a", a), ("b", b), ("c", c), ("d", d))}

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"http://127.0.0.1:{c.console}/#token={admin}")
    expect(page.locator("#link")).to_have_text("live", timeout=15_000)
    for name in ("a", "b", "d"):
        card = page.locator(f'[data-node="{ids[name]}"]')
        expect(card).to_be_visible(timeout=15_000)
        expect(card.locator('[role="meter"]')).to_have_count(1)  # its memory bar
    expect(page.locator(f'[data-node="{ids["c"]}"][data-role="client"]')).to_be_visible()
    expect(page.locator(f'[data-node="{ids["a"]}"][data-role="serving"]')).to_be_visible()
    for model in ("tiny-dense", "tiny-moe"):
        expect(page.locator(f'tr[data-model="{model}"][data-condition="Ready"]')).to_be_visible(timeout=15_000)
    assert "#token" not in page.url  # the fragment moved to sessionStorage

    # a chat through the page streams the API's greedy answer
    expected = api_answer(c, "tiny-moe")
    assert expected
    # by label and role, as a screen reader user finds them
    page.get_by_label("Model", exact=True).select_option("tiny-moe")
    page.get_by_label("Message").fill(PROMPT)
    page.get_by_text("Options").click()
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Temperature").fill("0")
    page.get_by_role("button", name="Send").click()
    expect(page.locator('#chat-output[data-done="1"]')).to_be_attached(timeout=60_000)
    assert page.locator("#chat-output").text_content() == expected
    expect(page.locator("#chat-stats")).to_contain_text("tok/s")
    # the API's request and the page's, 24 tokens each: the figures of /metrics' counters
    expect(page.locator('tr[data-model="tiny-moe"]')).to_contain_text("2 req, 48 tok out", timeout=10_000)

    shots = [tmp_path / "console-desktop.png", tmp_path / "console-narrow.png"]
    page.screenshot(path=str(shots[0]), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(shots[1]), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})
    RESULTS.mkdir(parents=True, exist_ok=True)
    for shot in shots:
        shutil.copy(shot, RESULTS / shot.name)

    # a killed node leaves the page within 10 s
    assert b.proc is not None
    b.proc.kill()
    expect(page.locator(f'[data-node="{ids["b"]}"]')).to_have_count(0, timeout=10_000)

    # an applied manifest's model shows up, then is Ready, without a reload (a tiny model may load
    # between two refreshes of the feed: then it is added Ready straight away)
    manifest = tmp_path / "third.yaml"
    manifest.write_text(f"apiVersion: meshllm/v1\nkind: Model\nmetadata:\n  name: third\nspec:\n"
                        f"  source: {third_dense}\n")
    done = c.cli("apply", "-f", str(manifest))
    assert done.returncode == 0, done.stderr
    events = page.locator("#events")
    expect(events).to_contain_text("model third added: ", timeout=60_000)
    expect(page.locator('tr[data-model="third"][data-condition="Ready"]')).to_be_visible(timeout=120_000)
    expect(events).to_contain_text(re.compile(r"model third(:| added:) Ready"))
    page.screenshot(path=str(tmp_path / "console-after.png"), full_page=True)
    shutil.copy(tmp_path / "console-after.png", RESULTS / "console-after.png")


def test_no_arguments_serve_a_read_only_console_listing_published_meshes(relay: str, browser: Browser) -> None:
    creds = MeshCredentials.create()
    token = InviteToken(creds, ("127.0.0.1:9",)).encode()
    listing = ListingContent(mesh=creds.mesh_id, name="poker-night", served=["Qwen3-8B-Q4_K_M"], nodes=3,
                             clients=1, region="EU-West", token=token)
    event = make_event(creds, listing, now=time.time(), ttl=60)
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's event loop
        pool.submit(anyio.run, nostr.publish, relay, event).result()

    port = free_port()
    lobby = subprocess.Popen([sys.executable, "-m", "meshllm", "--console", str(port), "--relay", relay,
                              "--no-mdns"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert lobby.stdout is not None
        lines = []
        for line in lobby.stdout:  # the instructions, then where the console is
            lines.append(line)
            if "Read-only console" in line:
                break
        assert any("meshllm --model gemma-3-270m" in line for line in lines), lines
        assert f"http://127.0.0.1:{port}/" in lines[-1]

        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        expect(page.get_by_role("heading", name="No node runs here yet")).to_be_visible(timeout=15_000)
        expect(page.locator("#lobby-hint")).to_contain_text("meshllm --model gemma-3-270m")
        row = page.locator(f'tr[data-mesh="{creds.mesh_id}"]')
        expect(row).to_contain_text("poker-night", timeout=30_000)
        expect(row).to_contain_text("Qwen3-8B-Q4_K_M")
        expect(row).to_contain_text("meshllm --standby --mesh-name poker-night")
        assert token not in page.content()  # the page shows how to join, never the secret itself
        expect(page.get_by_role("heading", name="Chat")).to_be_hidden()
        expect(page.locator('[data-node="this-machine"]')).to_contain_text("no node")
        RESULTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(RESULTS / "console-readonly.png"), full_page=True)

        # read-only: a change is refused with what to run instead, and the console keeps serving
        refused = httpx.post(f"http://127.0.0.1:{port}/api/apply", content=b"kind: Mesh\n")
        assert refused.status_code == 405
        assert "meshllm --model" in refused.json()["error"]["message"]
        assert httpx.get(f"http://127.0.0.1:{port}/api/status").json()["readonly"] is True
    finally:
        lobby.send_signal(signal.SIGINT)
        assert lobby.wait(timeout=15) == 0
        lobby.stdout.close()  # type: ignore[union-attr]


def test_the_console_shows_the_blackboard_feed(mesh: Mesh, browser: Browser) -> None:
    node = mesh.start("a", "127.0.0.2", "--client", "--blackboard", "--name", "alice")
    node.token()
    for text in ("STATUS: refactoring billing", "FINDING: <b>not bold</b> stays text"):
        assert node.cli("blackboard", text).returncode == 0
    admin = (node.state_dir / "admin.token").read_text().strip()
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{node.console}/")
    page.locator("#token-button").click()  # the feed needs the admin token: given in the page's form
    page.locator("#token-input").fill(admin)
    page.locator("#token-input").press("Enter")
    feed = page.locator("#board li")
    expect(feed).to_have_count(2, timeout=15_000)
    expect(feed.first).to_contain_text("alice @ ")
    expect(feed.first).to_contain_text("FINDING: <b>not bold</b> stays text")  # shown as text, not markup
    expect(page.locator("#board b")).to_have_count(0)
    expect(feed.nth(1)).to_contain_text("STATUS: refactoring billing")
    assert node.cli("blackboard", "QUESTION: who owns invoices?").returncode == 0
    expect(feed.first).to_contain_text("QUESTION: who owns invoices?", timeout=20_000)  # without a reload


def test_a_node_with_several_gpus_gets_a_bar_per_gpu(browser: Browser) -> None:
    """The status as a node with two GPUs reports it (the page is the console's, the feed a recorded one:
    this machine has no GPU)."""
    gib = 1 << 30
    node = {"id": "n-gpu", "name": "gpu-box", "role": "server", "capacity_bytes": 72 * gib, "state": "alive",
            "gpus": [{"name": "NVIDIA RTX 4090", "bytes": 24 * gib}, {"name": "NVIDIA A6000", "bytes": 48 * gib}],
            "rtt_ms": {}}
    model = {"name": "big", "size_bytes": 36 * gib, "phase": "ready", "condition": None, "demand": None,
             "servers": [{"node": "n-gpu", "model": "big", "phase": "ready"}], "workers": []}
    status = {"mesh_id": "m1", "node": node, "nodes": [node], "models": [model]}
    feed = f"id: e-1\nevent: snapshot\ndata: {json.dumps(status)}\n\n"
    port = free_port()
    with subprocess.Popen([sys.executable, "-m", "meshllm", "--console", str(port), "--relay", "none", "--no-mdns"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as lobby:
        try:
            assert lobby.stdout is not None
            for line in lobby.stdout:
                if "Read-only console" in line:
                    break
            page = browser.new_page()
            page.route("**/api/events", lambda route: route.fulfill(
                status=200, headers={"content-type": "text/event-stream"}, body=feed))
            page.goto(f"http://127.0.0.1:{port}/")
            card = page.locator('[data-node="n-gpu"]')
            bars = card.locator('[role="meter"]')
            expect(bars).to_have_count(2, timeout=15_000)
            # 36 GiB held, spread 1:2 as the GPUs' memory: 12 GiB on the 24 GiB card, 24 on the 48 GiB one
            expect(bars.nth(0)).to_have_attribute("aria-valuenow", str(12 * gib))
            expect(bars.nth(1)).to_have_attribute("aria-valuenow", str(24 * gib))
            expect(card).to_contain_text("GPU 1 NVIDIA A6000: ≈ 24 GiB of 48 GiB used")
        finally:
            lobby.send_signal(signal.SIGINT)
            lobby.wait(timeout=15)
