"""The Space in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright; Playwright never
downloads a browser here): load the page, type a prompt, click Generate, wait for the gallery, check the images.

Also a script for the README screenshot (run by hand, with the trained model):
    .venv/bin/python tests/test_space_browser.py --screenshot docs/images/space_screenshot.png
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SPACE_DIR = ROOT / "space"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGE_TIMEOUT_MS = 300_000  # generous: the machine may be shared with training runs

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str):
    """Build the app exactly as space/app.py does and serve it on 127.0.0.1 from a thread; returns (ui, url)."""
    sys.path.insert(0, str(SPACE_DIR))
    import app
    import demo

    space = demo.DalleSpace(demo.load_pipeline(model), demo.display_name(model))
    ui = app.build_demo(space)
    kwargs = {**app.launch_kwargs(free_port()), "server_name": "127.0.0.1"}
    ui.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    return ui, f"http://127.0.0.1:{kwargs['server_port']}"


def open_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def generate_in_page(page, url: str, prompt: str, screenshot: Path) -> dict:
    """Drive the page like a user. Returns what it saw: the notice, the result PNGs (bytes), requests blocked."""
    blocked: list[str] = []

    def only_local(route):  # the page must work with no network but the app's own server
        if route.request.url.startswith((url, "data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(url, wait_until="domcontentloaded")
    box = page.locator("#prompt textarea")
    box.wait_for(timeout=PAGE_TIMEOUT_MS)
    box.fill(prompt)
    page.locator("#generate").click()
    # the gallery fills with the default 4 images once decoding is done; they load lazily, so bring each into view
    page.wait_for_function("document.querySelectorAll('#results img').length >= 4", timeout=PAGE_TIMEOUT_MS)
    for img in page.locator("#results img").all():
        img.scroll_into_view_if_needed()
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].every(img => img.complete && img.naturalWidth > 0)",
        timeout=PAGE_TIMEOUT_MS,
    )
    page.evaluate("window.scrollTo(0, 0); document.querySelectorAll('#results *').forEach(e => { e.scrollTop = 0; })")
    notice = page.locator("#notice").inner_text()
    preview_shown = page.locator("#preview img").count() > 0
    pngs = [page.request.get(img.get_attribute("src")).body() for img in page.locator("#results img").all()]
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    return {"notice": notice, "pngs": pngs, "preview_shown": preview_shown, "blocked": blocked}


# ---------------------------------------------------------------------------------------------------------------
# pytest
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium_path():
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must run the browser test")
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="module")
def served(chromium_path, tmp_path_factory):
    from dalle_hf.testing import save_tiny_pipeline

    model = save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipe"))
    ui, url = serve(model)
    yield url
    ui.close()


def test_generate_in_a_real_browser(served, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = open_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            seen = generate_in_page(page, served, "two blue squares and a star", tmp_path / "space.png")
        finally:
            browser.close()

    assert seen["blocked"] == [], "the page tried to reach beyond the app's own server"
    assert "The model has never seen: 'star'" in seen["notice"]
    assert seen["preview_shown"]
    assert len(seen["pngs"]) == 4
    for png in seen["pngs"]:
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG"
            assert im.text["prompt"] == "two blue squares and a star"  # downloads carry their settings
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert pixels.std() > 1.0, "blank image"
    assert (tmp_path / "space.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------------------
# README screenshot, by hand
# ---------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot the Space in headless Chromium for the README.")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "images" / "space_screenshot.png")
    parser.add_argument("--model", default=None, help="folder or Hub id (default: DALLE_HF_MODEL or the embedded model)")
    parser.add_argument("--prompt", default="a green triangle to the left of a yellow square")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(SPACE_DIR))
    import demo

    model = args.model or demo.model_name_or_path()
    ui, url = serve(model)
    try:
        with sync_playwright() as p:
            browser = open_browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 960})
            seen = generate_in_page(page, url, args.prompt, args.screenshot)
            browser.close()
    finally:
        ui.close()
    print(f"{args.screenshot}: {len(seen['pngs'])} images, model {model}")


if __name__ == "__main__":
    main()
