"""The Gradio Space (space/): its functions called directly, then the real `python space/app.py` served on
127.0.0.1 and called through gradio_client. A tiny random-weight pipeline stands in for the trained model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SPACE_DIR = ROOT / "space"
sys.path.insert(0, str(SPACE_DIR))

gr = pytest.importorskip("gradio")
demo = pytest.importorskip("demo")  # space/demo.py

GOOD = dict(
    prompt="a red circle in the top left",
    num_images=2,
    seed=7,
    randomize_seed=False,
    guidance_scale=3.0,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    num_candidates=1,
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from dalle_hf.testing import save_tiny_pipeline

    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipe"))


@pytest.fixture(scope="module")
def space(tiny_model, tmp_path_factory):
    return demo.DalleSpace(demo.load_pipeline(tiny_model), out_dir=tmp_path_factory.mktemp("out"))


# ---------------------------------------------------------------------------------------------------------------
# Direct calls
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt=""), "Please enter a prompt"),
        (dict(prompt="   \n "), "Please enter a prompt"),
        (dict(prompt=None), "Please enter a prompt"),
        (dict(prompt=123), "The prompt must be text"),
        (dict(prompt="a red circle " * 20), "The prompt is too long: 259 characters (the limit is 200)"),
        (dict(num_images=0), "Number of images must be a whole number from 1 to 8 (got 0)"),
        (dict(num_images=9), "Number of images must be a whole number from 1 to 8 (got 9)"),
        (dict(num_images=2.5), "Number of images must be a whole number from 1 to 8 (got 2.5)"),
        (dict(num_images="many"), "Number of images must be a whole number from 1 to 8 (got 'many', which is not"),
        (dict(num_images=None), "Number of images must be a whole number from 1 to 8 (got None)"),
        (dict(num_images=True), "Number of images must be a whole number"),
        (dict(seed=-1), "Seed must be a whole number from 0 to 2147483647 (got -1)"),
        (dict(seed=2**31), "Seed must be a whole number from 0 to 2147483647 (got 2147483648)"),
        (dict(guidance_scale=0.5), "Guidance scale must be a number from 1 to 10 (got 0.5)"),
        (dict(guidance_scale=11), "Guidance scale must be a number from 1 to 10 (got 11)"),
        (dict(guidance_scale=float("nan")), "Guidance scale must be a number from 1 to 10"),
        (dict(guidance_scale="abc"), "Guidance scale must be a number from 1 to 10 (got 'abc', which is not"),
        (dict(temperature=0.05), "Temperature must be a number from 0.1 to 2 (got 0.05)"),
        (dict(temperature=2.5), "Temperature must be a number from 0.1 to 2 (got 2.5)"),
        (dict(top_k=-1), "Top-k (0 = off) must be a whole number from 0 to 64 (got -1)"),
        (dict(top_k=65), "Top-k (0 = off) must be a whole number from 0 to 64 (got 65)"),
        (dict(top_p=0.05), "Top-p must be a number from 0.1 to 1 (got 0.05)"),
        (dict(top_p=1.5), "Top-p must be a number from 0.1 to 1 (got 1.5)"),
        (dict(num_candidates=0), "Rerank candidates must be a whole number from 1 to 16 (got 0)"),
        (dict(num_candidates=17), "Rerank candidates must be a whole number from 1 to 16 (got 17)"),
    ],
)
def test_bad_inputs_give_clear_errors(space, change, message):
    args = {**GOOD, **change}
    with pytest.raises(gr.Error) as err:
        next(space.generate_stream(**args))
    assert message in err.value.message
    with pytest.raises(gr.Error) as err:
        space.generate_api(**args)
    assert message in err.value.message


def test_good_inputs_are_normalised(space):
    s = space.check_inputs(**{**GOOD, "prompt": "  a red\n circle  ", "num_images": "3", "seed": 5.0})
    assert (s.prompt, s.num_images, s.seed) == ("a red circle", 3, 5)
    s = space.check_inputs(**{**GOOD, "seed": -5, "randomize_seed": True})  # the seed box is ignored
    assert 0 <= s.seed <= demo.MAX_SEED


def test_unknown_word_notice(space):
    assert space.notice("a red circle in the top left") == ""
    assert space.notice("") == ""
    assert space.notice("a red star") == "The model has never seen: 'star' — it will ignore it."
    two = space.notice("a red star and a blue moon")
    assert "'star'" in two and "'moon'" in two and "ignore them" in two
    # the generate function shows the same notice (Markdown output, last of each yield) and a toast
    with pytest.warns(UserWarning, match="never seen: 'star'"):  # gr.Warning outside a request
        first = next(space.generate_stream(**{**GOOD, "prompt": "a red star"}))
    assert "never seen: 'star'" in first[-1]
    with pytest.warns(UserWarning, match="never seen: 'star'"):
        _, info = space.generate_api(**{**GOOD, "prompt": "a red star", "num_images": 1})
    assert info["unknown_words"] == ["star"]


def test_notice_escapes_markup():
    text = demo.unknown_words_notice(["<img src=x onerror=alert(1)>"], markdown=True)
    assert "<img" not in text
    assert "<" not in demo.unknown_words_notice(["<b>"], markdown=False)


def test_defaults_follow_the_pipeline_signature(space):
    import inspect

    params = inspect.signature(type(space.pipe).__call__).parameters
    assert space.defaults["guidance_scale"] == params["guidance_scale"].default
    assert space.defaults["temperature"] == params["temperature"].default
    assert space.defaults["top_k"] == params["top_k"].default
    assert space.defaults["top_p"] == params["top_p"].default
    assert space.codebook_size == space.pipe.image_decoder.config.vocab_size


def test_stream_previews_then_pngs_with_metadata(space, monkeypatch):
    monkeypatch.setattr(demo, "PREVIEW_EVERY", 0.0)  # a preview at every step
    outputs = list(space.generate_stream(**{**GOOD, "num_images": 3, "num_candidates": 2}))
    first, previews, final = outputs[0], outputs[1:-1], outputs[-1]
    assert first[0] is None and first[1] == [] and first[2] == 7  # clears the gallery, shows the seed used
    assert len(previews) >= 2
    assert all(isinstance(p[0], Image.Image) for p in previews)
    preview, gallery, seed, notice = final
    assert seed == 7 and notice == ""
    assert len(gallery) == 3
    for i, (path, caption) in enumerate(gallery):
        assert Path(path).is_relative_to(space.out_dir)
        assert caption.startswith("score ")
        with Image.open(path) as im:
            assert im.format == "PNG"
            text = dict(im.text)
        assert text["prompt"] == GOOD["prompt"]
        assert text["seed"] == str(7 + i)
        assert text["model"] == space.model_name
        settings = json.loads(text["settings"])
        assert settings["num_candidates"] == 2 and settings["guidance_scale"] == 3.0
        assert float(text["score"]) == pytest.approx(float(caption.split()[1]), abs=0.01)


def test_same_seed_same_images_and_image_i_uses_seed_plus_i(space):
    def codes(seed, n):
        kwargs = space.call_kwargs(space.check_inputs(**{**GOOD, "seed": seed, "num_images": n}))
        return space.pipe(**{**kwargs, "output_type": "codes"}).images

    a, b = codes(11, 3), codes(11, 3)
    assert (a == b).all()
    assert (codes(12, 1)[0] == a[1]).all()
    assert not (codes(99, 3) == a).all()


def test_closing_the_stream_stops_the_worker(space, monkeypatch):
    monkeypatch.setattr(demo, "PREVIEW_EVERY", 0.0)
    stream = space.generate_stream(**{**GOOD, "num_images": 8, "num_candidates": 4})
    next(stream)
    next(stream)  # a preview: the pipeline is mid-way
    stream.close()  # what Gradio does when the browser goes away
    assert not any(t.name == "dalle-hf-generate" and t.is_alive() for t in threading.enumerate())


def test_binds_all_interfaces_only_inside_a_space(monkeypatch):
    import app

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    local = app.launch_kwargs()
    assert (local["server_name"], local["server_port"], local["share"]) == ("127.0.0.1", 7860, False)
    assert "allowed_paths" not in local
    monkeypatch.setenv("SPACE_ID", "someone/dalle-hf")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    space = app.launch_kwargs()
    assert (space["server_name"], space["server_port"], space["share"]) == ("0.0.0.0", 7999, False)


def test_space_card_front_matter():
    text = (SPACE_DIR / "README.md").read_text()
    assert text.startswith("---\n")
    card = dict(line.split(": ", 1) for line in text.split("---\n")[1].strip().splitlines())
    assert card["sdk"] == "gradio" and card["app_file"] == "app.py"
    assert card["sdk_version"] == gr.__version__
    assert {"title", "emoji", "colorFrom", "colorTo", "license", "short_description"} <= set(card)
    assert len(card["short_description"]) <= 60


def test_outputs_are_pruned(space, monkeypatch):
    old = space.out_dir / "old"
    old.mkdir()
    os.utime(old, (0, 0))
    space.generate_api(**{**GOOD, "num_images": 1})
    assert not old.exists()


# ---------------------------------------------------------------------------------------------------------------
# The real app, served on 127.0.0.1 and called through gradio_client
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, log_path: Path, timeout: float = 180.0):
    """`python space/app.py` on a free port; returns (process, url) once it prints that it is ready."""
    port = free_port()
    env = {**os.environ, "DALLE_HF_MODEL": model, "GRADIO_SERVER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    env.pop("SPACE_ID", None)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=SPACE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if "dalle-hf Space ready at" in text:
            return proc, f"http://127.0.0.1:{port}", text
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the app did not start:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    proc, url, log = start_app(tiny_model, tmp_path_factory.mktemp("server") / "app.log")
    yield url, log
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def test_app_binds_localhost_and_prints_its_url(server):
    url, log = server
    assert url.startswith("http://127.0.0.1:")
    assert f"dalle-hf Space ready at {url}" in log
    assert "gradio.live" not in log


def test_api_generate_returns_images_and_scores(client):
    gallery, info = client.predict(prompt="two blue squares", num_images=2, seed=3, api_name="/generate")
    assert len(gallery) == 2 and len(info["scores"]) == 2 and info["seeds"] == [3, 4]
    for item, score in zip(gallery, info["scores"]):
        assert item["caption"] == f"score {score:.2f}"
        with Image.open(item["image"]) as im:  # downloaded PNG, metadata intact
            assert im.text["prompt"] == "two blue squares"
            assert np.asarray(im).std() > 0


def test_api_same_seed_same_images(client):
    def pixels(seed):
        gallery, _ = client.predict(prompt="a purple triangle", num_images=2, seed=seed, api_name="/generate")
        return [np.asarray(Image.open(item["image"])) for item in gallery]

    a, b, c = pixels(42), pixels(42), pixels(43)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_api_bad_input_gives_the_clear_error(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"Number of images must be a whole number from 1 to 8 \(got 12\)"):
        client.predict(prompt="two blue squares", num_images=12, api_name="/generate")
    with pytest.raises(AppError, match="Temperature must be a number from 0.1 to 2"):
        client.predict(prompt="two blue squares", temperature="hot", api_name="/generate")
    with pytest.raises(AppError, match="Please enter a prompt"):
        client.predict(prompt="", api_name="/generate")


def test_api_exposes_only_generate(client):
    info = client.view_api(print_info=False, return_format="dict")
    assert list(info["named_endpoints"]) == ["/generate"]
    assert info["unnamed_endpoints"] == {}


def test_a_crowd_gets_images_or_a_clean_queue_full(tiny_model, tmp_path):
    """20 clients at once: 1 runs, 16 wait, 3 are refused with "queue is full"; all 17 others get images.
    The pipeline is held at a gate until the crowd has arrived, so the outcome does not depend on speed."""
    import app
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    space = demo.DalleSpace(demo.load_pipeline(tiny_model), out_dir=tmp_path / "out")
    gate = threading.Event()

    class GatedPipe:
        def __init__(self, pipe):
            self.pipe = pipe

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def __call__(self, **kwargs):
            gate.wait(timeout=120)
            return self.pipe(**kwargs)

    ui = app.build_demo(space)
    space.pipe = GatedPipe(space.pipe)
    kwargs = {**app.launch_kwargs(free_port()), "server_name": "127.0.0.1"}
    ui.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    try:
        url = f"http://127.0.0.1:{kwargs['server_port']}"
        client = Client(url, verbose=False, download_files=str(tmp_path), httpx_kwargs={"timeout": 120})
        jobs = [client.submit(prompt="two blue squares", num_images=1, api_name="/generate") for _ in range(20)]
        deadline = time.monotonic() + 60
        while sum(j.done() for j in jobs) < 3 and time.monotonic() < deadline:  # the refusals come back first
            time.sleep(0.1)
        gate.set()
        results = []
        for job in jobs:
            try:
                gallery, _ = job.result(timeout=300)
                results.append("ok" if len(gallery) == 1 else "bad")
            except (QueueError, AppError) as exc:
                results.append("refused" if "queue is full" in str(exc).lower() else f"{type(exc).__name__}: {exc}")
    finally:
        gate.set()
        ui.close()
    assert sorted(results) == ["ok"] * 17 + ["refused"] * 3, results


def test_serves_no_other_files(server):
    url, _ = server
    for path in ["/etc/passwd", str(SPACE_DIR / "app.py"), "app.py", str(ROOT / "pyproject.toml")]:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/gradio_api/file={path}", timeout=10)
        assert err.value.code in (403, 404)
