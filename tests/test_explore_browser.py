"""The latent explorer in a real browser: `vaelab explore` serving, headless Chromium driving.

Needs the ``playwright`` package (the [test] extra) and Debian's Chromium at /usr/bin/chromium
(no browser is ever downloaded): without Chromium it skips, except under CI=true, where it
fails. The page's own Content-Security-Policy stays on, so a script
or style the page needs from elsewhere would show up as a console error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import playwright.sync_api as sync_api  # the [test] extra: a missing one fails, never skips
import pytest
import starlette  # noqa: F401
import uvicorn  # noqa: F401

from synthetic import ring_blobs, write_synthetic  # noqa: E402
from vaelab.config import resolve_config  # noqa: E402
from vaelab.training import train  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

# Debian's Chromium is a system package: a developer without it skips, CI (which installs it
# in .ci/run) fails instead
if not CHROMIUM.exists() and os.environ.get("CI") == "true":
    raise RuntimeError(f"CI=true but there is no browser at {CHROMIUM}: .ci/run installs it")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser at {CHROMIUM}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vaelab explore VAE CVAE --port 0` in a subprocess; yields the address it prints."""
    root = tmp_path_factory.mktemp("explore-browser")
    data = write_synthetic(root / "data", ring_blobs, 512, 200, seed=0)
    runs = []
    for name, model, latent, epochs in (("vae", "vae", 2, 3), ("cvae", "cvae", 2, 3),
                                        ("vae3", "vae", 3, 1)):
        # a few quick epochs at a brisk learning rate: enough for z and the class to matter
        cfg = resolve_config("smoke", model=model, dataset=f"idx:{data}", val_size=32,
                             latent_dim=latent, epochs=epochs, batch_size=32, lr=3e-3)
        train(cfg, root / name, progress=False)
        runs.append(str(root / name))
    proc = subprocess.Popen([sys.executable, "-m", "vaelab", "explore", *runs, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        if url is None:
            proc.kill()
            pytest.fail("the explorer did not start:\n" + "".join(lines) + proc.stderr.read())
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def page(server: str):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1360, "height": 900})
            pg.problems = []
            pg.on("console", lambda m: pg.problems.append(m.text) if m.type == "error" else None)
            pg.on("pageerror", lambda e: pg.problems.append(str(e)))
            pg.goto(server)
            yield pg
        finally:
            browser.close()


# Predicates are functions, not expressions: the page's CSP forbids eval.
def wait(pg, js: str, arg: object = None) -> None:
    pg.wait_for_function(f"(a) => {js}", arg=arg, timeout=15_000)


def digit_pixels(pg) -> bytes:
    values = pg.evaluate(
        "() => Array.from(document.getElementById('digit').getContext('2d')"
        ".getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 === 0))")
    assert len(values) == 28 * 28
    return bytes(values)


def seq(pg) -> int:
    return int(pg.evaluate("() => Number(document.getElementById('digit').dataset.seq || 0)"))


def hover(pg, fx: float, fy: float) -> bytes:
    """Move over the plane at fractions (fx, fy) of its box; the decoded image once it settles."""
    box = pg.locator("#plane").bounding_box()
    wait(pg, "document.body.dataset.busy !== '1'")  # nothing in flight: seq is settled
    before = seq(pg)
    pg.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"], steps=3)
    wait(pg, "Number(document.getElementById('digit').dataset.seq) > a"
             " && document.body.dataset.busy === '0'", before)
    return digit_pixels(pg)


def test_explorer_in_a_browser(page) -> None:
    pg = page
    wait(pg, "document.getElementById('plane').dataset.run === '0'"
             " && document.getElementById('digit').dataset.run === '0'")
    assert pg.locator("#run option").count() == 3
    assert pg.locator("#dims").is_hidden()
    assert pg.locator("#classes").is_hidden()

    # moving across the plane decodes each z live
    seen = [hover(pg, fx, fy) for fx, fy in ((0.1, 0.1), (0.5, 0.5), (0.9, 0.9), (0.1, 0.9))]
    assert len(set(seen)) >= 3, "the decoded image did not follow the pointer"
    assert any(max(s) > 60 for s in seen), "nothing was drawn"

    # the round trip of one decode, measured in the page
    ms = pg.evaluate("""async () => {
        const t = performance.now();
        for (let k = 0; k < 20; k++) {
            await fetch('/api/runs/0/decode', {method: 'POST',
                headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({z: [k / 10, -k / 10]})}).then(r => r.json());
        }
        return (performance.now() - t) / 20;
    }""")
    assert ms < 250, f"a decode took {ms:.0f} ms"  # ~5-15 ms unloaded; slack for shared CPUs

    # two pins: the interpolation strip, from one batched decode
    box = pg.locator("#plane").bounding_box()
    for fx, fy in ((0.25, 0.3), (0.75, 0.7)):
        pg.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
    wait(pg, "document.querySelectorAll('#interp-strip canvas').length === 10")
    assert pg.locator("#interp").is_visible()

    # a test image: encoded, its reconstruction drawn, its mean and sigma shown
    pg.fill("#test-index", "3")
    pg.click("#load-test")
    wait(pg, "document.getElementById('encoded-readout').textContent.includes('sigma')")
    assert "label 3" in pg.text_content("#encoded-readout")

    # its true posterior: a heat map on the plane, with log p(x), the ELBO and their gap KL(q‖p)
    assert pg.locator("#posterior").is_visible()
    pg.click("#posterior")
    wait(pg, "document.getElementById('posterior-readout').textContent.includes('nats')")
    text = pg.text_content("#posterior-readout")
    number = r"-?\d+\.\d\d"
    assert re.search(rf"log p\(x\) = {number}, ELBO = {number}, KL\(q‖p\) = {number} nats",
                     text), text
    assert pg.get_attribute("#plane", "data-posterior") == "1"

    # draw a stroke: it is encoded too
    d = pg.locator("#draw").bounding_box()
    pg.mouse.move(d["x"] + 0.3 * d["width"], d["y"] + 0.3 * d["height"])
    pg.mouse.down()
    pg.mouse.move(d["x"] + 0.7 * d["width"], d["y"] + 0.6 * d["height"], steps=6)
    pg.mouse.up()
    wait(pg, "document.getElementById('encoded-readout').textContent.startsWith('drawing')")
    # a new encoding forgets the old one's posterior
    assert pg.text_content("#posterior-readout") == ""
    assert pg.get_attribute("#plane", "data-posterior") == "0"

    # the CVAE: a class selector, and the same z under every class
    pg.select_option("#run", "1")
    wait(pg, "document.getElementById('plane').dataset.run === '1'"
             " && document.getElementById('digit').dataset.run === '1'")
    assert pg.locator("#classes").is_visible()
    assert pg.locator("#interp").is_hidden()  # pins belong to a run
    base = hover(pg, 0.45, 0.55)
    wait(pg, "document.querySelectorAll('#class-row canvas').length === 10")
    before = seq(pg)
    pg.click("#class-buttons [data-class='7']")
    wait(pg, "Number(document.getElementById('digit').dataset.seq) > a"
             " && document.getElementById('digit').dataset.cls === '7'", before)
    seven = digit_pixels(pg)
    assert seven != base, "changing the class did not change the image"
    pg.keyboard.press("2")  # keys choose the class too
    wait(pg, "document.getElementById('digit').dataset.cls === '2'")
    assert digit_pixels(pg) not in (seven, base)

    # latent 3: choose the dimensions shown; the third is held at 0 or at a pin's mean
    pg.select_option("#run", "2")
    wait(pg, "document.getElementById('plane').dataset.run === '2'"
             " && document.getElementById('digit').dataset.run === '2'")
    assert pg.locator("#dims").is_visible() and pg.locator("#classes").is_hidden()
    assert pg.locator("#posterior").is_hidden()  # no encoding yet, and p(z|x) needs 2-D
    box = pg.locator("#plane").bounding_box()
    pg.mouse.click(box["x"] + 0.15 * box["width"], box["y"] + 0.15 * box["height"])
    pin = json.loads(pg.get_attribute("#plane", "data-pins"))[0]
    assert pin[0] < -0.5 and pin[1] > 0.5, pin  # pin A, at negative z0 and positive z1
    # dimensions are named as in the figures, from 1: z₁, z₂, z₃
    assert pg.locator("#dim-x option").all_text_contents() == ["z₁", "z₂", "z₃"]
    pg.select_option("#dim-x", "2")  # the plane now shows (z₃, z₂): 0-based dims 2 and 1
    hover(pg, 0.9, 0.5)
    z = json.loads(pg.get_attribute("#digit", "data-z"))
    assert len(z) == 3 and z[0] == 0 and z[2] > 1 and abs(z[1]) < 0.5, z
    pg.select_option("#others", "pin0")  # z0 now comes from pin A
    hover(pg, 0.6, 0.6)
    z = json.loads(pg.get_attribute("#digit", "data-z"))
    assert z[0] == pin[0] and z[2] > 0 and z[1] < 0, (z, pin)

    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "explorer-browser.png"), full_page=True)
    assert pg.problems == [], pg.problems
