"""The dalle-hf Space, minus its layout: model loading, input checks, the pipeline call, PNG output.

`app.py` builds the page and wires it to the functions here; everything that can go wrong lives in this file,
so it can be tested without a browser.
"""

from __future__ import annotations

# On a ZeroGPU Space, `spaces` has to be imported before torch initialises CUDA. Elsewhere it is optional and
# `gpu` below falls back to a no-op decorator.
try:
    import spaces  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    spaces = None

import atexit
import html
import inspect
import json
import math
import os
import queue
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

try:
    import dalle_hf
except ImportError:  # pragma: no cover - a source checkout run without `pip install -e .`
    _ROOT = Path(__file__).resolve().parent.parent
    if not (_ROOT / "dalle_hf" / "__init__.py").is_file():
        raise
    sys.path.insert(0, str(_ROOT))
    import dalle_hf

# ----------------------------------------------------------------------------------------------------------
# Limits. The UI's sliders use the same numbers; every entry point re-checks them (the API can send anything).
# ----------------------------------------------------------------------------------------------------------
MAX_PROMPT_CHARS = 200
MAX_SEED = 2**31 - 1
NUM_IMAGES = (1, 8)
NUM_CANDIDATES = (1, 16)
GUIDANCE = (1.0, 10.0)
TEMPERATURE = (0.1, 2.0)
TOP_P = (0.1, 1.0)
GPU_DURATION = 60  # seconds a ZeroGPU slot is requested for one generation
PREVIEW_EVERY = 0.25  # seconds between live previews
KEEP_OUTPUTS_SECONDS = 15 * 60  # our PNGs are copied into Gradio's cache when returned; ours are pruned after this

EXAMPLES = [
    "a red circle in the top left",
    "two blue squares",
    "a green triangle to the left of a yellow square",
    # compositions held out of training
    "a purple triangle",
    "a yellow circle at the bottom",
]

# Used only where the pipeline's signature gives no default (or None) for a setting.
_FALLBACK_DEFAULTS = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_candidates": 1}


def gpu(fn):
    """`spaces.GPU` on a ZeroGPU Space (no-op elsewhere, as is this decorator when `spaces` is missing)."""
    if spaces is None:
        return fn
    return spaces.GPU(duration=GPU_DURATION)(fn)


# ----------------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------------
def model_name_or_path() -> str:
    """`DALLE_HF_MODEL` (a local folder or a Hub repo id) if set, else the model embedded in the package."""
    return os.environ.get("DALLE_HF_MODEL", "").strip() or str(dalle_hf.DEFAULT_MODEL)


def display_name(name_or_path: str) -> str:
    """What the page and the PNG metadata call the model: a Hub id as is, a local folder by its name only
    (the server's directory layout is nobody's business)."""
    path = Path(name_or_path)
    if path.exists():
        if str(name_or_path) == str(dalle_hf.DEFAULT_MODEL):
            return f"dalle-hf/{path.name} (embedded default)"
        return path.name
    return name_or_path


def load_pipeline(name_or_path: str):
    """Load the pipeline once: bf16 on a GPU, fp32 on CPU, device chosen by accelerate."""
    from accelerate import PartialState

    device = PartialState().device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = dalle_hf.DallePipeline.from_pretrained(name_or_path, dtype=dtype)
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_defaults(pipe) -> dict[str, float | int]:
    """The UI's defaults, read from the pipeline's `__call__` signature so the two cannot drift apart."""
    params = inspect.signature(type(pipe).__call__).parameters
    out = {}
    for name, fallback in _FALLBACK_DEFAULTS.items():
        value = params[name].default if name in params else inspect.Parameter.empty
        if value is inspect.Parameter.empty or value is None:
            value = fallback
        out[name] = value
    out["top_k"] = int(out["top_k"])
    out["num_candidates"] = int(out["num_candidates"])
    out["guidance_scale"] = float(out["guidance_scale"])
    out["temperature"] = float(out["temperature"])
    out["top_p"] = float(out["top_p"])
    return out


def codebook_size(pipe) -> int:
    """Upper bound for top-k: the number of image codes."""
    for owner, key in (("image_decoder", "vocab_size"), ("alignment", "codebook_size")):
        config = getattr(getattr(pipe, owner, None), "config", None)
        if config is not None:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ValueError("cannot find the codebook size in the pipeline's configs")


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    prompt: str
    num_images: int
    seed: int
    guidance_scale: float
    temperature: float
    top_k: int
    top_p: float
    num_candidates: int


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_number(label: str, value: Any, low: float, high: float, *, integer: bool = False) -> int | float:
    """`value` as a number within [low, high], or a gr.Error naming the setting and its allowed range."""
    kind = "a whole number" if integer else "a number"
    expected = f"{label} must be {kind} from {_fmt(low)} to {_fmt(high)}"
    if isinstance(value, bool) or value is None:
        raise gr.Error(f"{expected} (got {value!r}).")
    try:
        x = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise gr.Error(f"{expected} (got {str(value)[:40]!r}, which is not a number).") from None
    if not math.isfinite(x):
        raise gr.Error(f"{expected} (got {value!r}).")
    if integer and x != math.floor(x):
        raise gr.Error(f"{expected} (got {_fmt(x)}).")
    if not low <= x <= high:
        raise gr.Error(f"{expected} (got {_fmt(x)}).")
    return int(x) if integer else x


def check_prompt(prompt: Any) -> str:
    if prompt is not None and not isinstance(prompt, str):
        raise gr.Error("The prompt must be text.")
    prompt = " ".join((prompt or "").split())  # newlines, tabs and runs of spaces become one space
    if not prompt:
        raise gr.Error(f"Please enter a prompt, e.g. '{EXAMPLES[0]}'.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(
            f"The prompt is too long: {len(prompt)} characters (the limit is {MAX_PROMPT_CHARS}). "
            "The model was trained on short captions."
        )
    return prompt


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", html.escape(text, quote=False))


def unknown_words_notice(words: list[str], *, markdown: bool) -> str:
    if not words:
        return ""
    esc = _md_escape if markdown else html.escape
    listed = ", ".join(f"'{esc(w)}'" for w in words)
    pronoun = "it" if len(words) == 1 else "them"
    return f"The model has never seen: {listed} — it will ignore {pronoun}."


# ----------------------------------------------------------------------------------------------------------
# Generation. `_stream` is the only code that touches the model; on ZeroGPU it runs in the GPU worker, so its
# arguments are plain data and the pipeline is found through `_SPACES`.
# ----------------------------------------------------------------------------------------------------------
_SPACES: dict[str, "DalleSpace"] = {}


class _Cancelled(Exception):
    """Raised from the step callback when the request has gone away, to stop the pipeline early."""


def _mosaic(images: list[Image.Image], cell: int = 128, columns: int = 4) -> Image.Image:
    """Up to 8 (partial) images side by side, scaled up with nearest-neighbour so pixels stay sharp."""
    images = images[:8]
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * cell + (cols - 1) * 4, rows * cell + (rows - 1) * 4), (190, 190, 190))
    for i, img in enumerate(images):
        tile = img.convert("RGB").resize((cell, cell), Image.NEAREST)
        sheet.paste(tile, ((i % cols) * (cell + 4), (i // cols) * (cell + 4)))
    return sheet


@gpu
def _stream(space_key: str, settings: dict, preview: bool = True) -> Iterator[tuple]:
    """Run one generation. Yields ("step", step, preview_images or None) while decoding, then
    ("done", images, scores). The pipeline runs in a worker thread; its step callback feeds a queue."""
    space = _SPACES[space_key]
    pipe = space.pipe
    s = Settings(**settings)
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    last_preview = [time.monotonic()]

    def on_step(pipeline, step, codes_so_far):
        if stop.is_set():
            raise _Cancelled()
        images = None
        now = time.monotonic()
        if preview and now - last_preview[0] >= PREVIEW_EVERY:
            last_preview[0] = now
            # rows are image-major (num_images * candidates): show the first candidate of each image
            images = pipeline.preview(codes_so_far[:: s.num_candidates][: s.num_images])
        events.put(("step", int(step), images))

    def work():
        try:
            with torch.inference_mode():
                out = pipe(**space.call_kwargs(s), callback_on_step_end=on_step)
            events.put(("done", list(out.images), [float(x) for x in out.scores]))
        except _Cancelled:
            events.put(("cancelled",))
        except BaseException as exc:  # noqa: BLE001 - handed to the request thread, which re-raises it
            events.put(("error", exc))

    worker = threading.Thread(target=work, name="dalle-hf-generate", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            if event[0] == "step":
                yield event
            elif event[0] == "done":
                yield event
                return
            elif event[0] == "error":
                raise event[1]
            else:
                return
    finally:
        stop.set()  # the request may have gone away mid-way: stop the pipeline at its next step
        worker.join(timeout=60)


class DalleSpace:
    """One loaded pipeline and everything the page does with it."""

    def __init__(self, pipe, model_name: str | None = None, out_dir: str | os.PathLike | None = None):
        self.pipe = pipe
        self.model_name = model_name or display_name(str(getattr(pipe, "name_or_path", "dalle-hf")))
        self.defaults = pipeline_defaults(pipe)
        self.codebook_size = codebook_size(pipe)
        self.total_steps = _total_steps(pipe)
        if out_dir is None:
            out_dir = tempfile.mkdtemp(prefix="dalle-hf-space-")
            atexit.register(shutil.rmtree, out_dir, True)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.key = uuid.uuid4().hex
        _SPACES[self.key] = self

    @classmethod
    def from_env(cls) -> "DalleSpace":
        name = model_name_or_path()
        return cls(load_pipeline(name), display_name(name))

    # --- checks -------------------------------------------------------------------------------------------
    def check_inputs(
        self, prompt, num_images, seed, randomize_seed, guidance_scale, temperature, top_k, top_p, num_candidates
    ) -> Settings:
        """All inputs checked, with a clear gr.Error for the first bad one; the seed resolved."""
        prompt = check_prompt(prompt)
        num_images = check_number("Number of images", num_images, *NUM_IMAGES, integer=True)
        if randomize_seed:
            seed = random.randint(0, MAX_SEED)
        seed = check_number("Seed", seed, 0, MAX_SEED, integer=True)
        return Settings(
            prompt=prompt,
            num_images=num_images,
            seed=seed,
            guidance_scale=check_number("Guidance scale", guidance_scale, *GUIDANCE),
            temperature=check_number("Temperature", temperature, *TEMPERATURE),
            top_k=check_number("Top-k (0 = off)", top_k, 0, self.codebook_size, integer=True),
            top_p=check_number("Top-p", top_p, *TOP_P),
            num_candidates=check_number("Rerank candidates", num_candidates, *NUM_CANDIDATES, integer=True),
        )

    def unknown_words(self, prompt: str) -> list[str]:
        return list(self.pipe.unknown_words(prompt))

    def notice(self, prompt: Any) -> str:
        """Markdown pointing out the prompt's words the model has never seen ("" when there are none)."""
        if not isinstance(prompt, str) or not prompt.strip():
            return ""
        return unknown_words_notice(self.unknown_words(" ".join(prompt.split())[:MAX_PROMPT_CHARS]), markdown=True)

    # --- the call ----------------------------------------------------------------------------------------
    def seeds(self, s: Settings) -> list[int]:
        """Image i uses seed + i, so any single image can be remade alone with its own seed."""
        return [s.seed + i for i in range(s.num_images)]

    def call_kwargs(self, s: Settings) -> dict:
        # CPU generators: the pipeline draws its uniforms on the generator's device, so a seed gives the same
        # random numbers on any hardware.
        return dict(
            prompt=s.prompt,
            num_images_per_prompt=s.num_images,
            num_candidates=s.num_candidates,
            guidance_scale=s.guidance_scale,
            temperature=s.temperature,
            top_k=s.top_k,  # 0 = off
            top_p=s.top_p,
            generator=[torch.Generator().manual_seed(x) for x in self.seeds(s)],
            output_type="pil",
        )

    def settings_record(self, s: Settings) -> dict:
        record = asdict(s)
        record["model"] = self.model_name
        record["software"] = f"dalle-hf {getattr(dalle_hf, '__version__', '')}".strip()
        return record

    def save_images(self, s: Settings, images: list[Image.Image], scores: list[float]) -> list[tuple[str, str]]:
        """Write each result as a PNG whose text chunks record prompt, seed, settings and model; returns
        (path, caption) pairs for the gallery."""
        self._prune_outputs()
        folder = self.out_dir / uuid.uuid4().hex[:12]
        folder.mkdir()
        slug = re.sub(r"[^a-z0-9]+", "-", s.prompt.lower()).strip("-")[:40] or "image"
        record = self.settings_record(s)
        results = []
        for i, (image, score, seed) in enumerate(zip(images, scores, self.seeds(s))):
            info = PngInfo()
            info.add_text("prompt", s.prompt)
            info.add_text("seed", str(seed))
            info.add_text("model", self.model_name)
            info.add_text("score", f"{score:.4f}")
            info.add_text("settings", json.dumps({**record, "seed": seed, "index": i, "batch_seed": s.seed}))
            info.add_text("Software", record["software"])
            path = folder / f"dalle-hf_{slug}_seed{seed}.png"
            image.save(path, format="PNG", pnginfo=info)
            results.append((str(path), f"score {score:.2f}"))
        return results

    def _prune_outputs(self) -> None:
        cutoff = time.time() - KEEP_OUTPUTS_SECONDS
        for folder in self.out_dir.iterdir():
            try:
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                pass

    # --- entry points (wired by app.py) --------------------------------------------------------------------
    def generate_stream(
        self,
        prompt,
        num_images,
        seed,
        randomize_seed,
        guidance_scale,
        temperature,
        top_k,
        top_p,
        num_candidates,
        progress=gr.Progress(),
    ):
        """The page's generate button: yields (preview, gallery, seed used, notice) as decoding goes."""
        s = self.check_inputs(
            prompt, num_images, seed, randomize_seed, guidance_scale, temperature, top_k, top_p, num_candidates
        )
        unknown = self.unknown_words(s.prompt)
        notice = unknown_words_notice(unknown, markdown=True)
        if unknown:
            gr.Warning(unknown_words_notice(unknown, markdown=False))
        progress(0, desc="Starting")
        yield None, [], s.seed, notice
        total = self.total_steps
        for event in _stream(self.key, asdict(s)):
            if event[0] == "step":
                _, step, images = event
                done = step + 1
                progress((done, total), desc="Decoding", unit="codes")
                if images:
                    yield _mosaic(images), gr.skip(), gr.skip(), gr.skip()
            else:
                _, images, scores = event
                gallery = self.save_images(s, images, scores)
                yield _mosaic(images), gallery, s.seed, notice

    def generate_api(
        self,
        prompt,
        num_images=1,
        seed=0,
        randomize_seed=False,
        guidance_scale=None,
        temperature=None,
        top_k=None,
        top_p=None,
        num_candidates=None,
    ):
        """The `/generate` API endpoint: (gallery of (PNG, caption)), info with scores, seeds and settings)."""
        d = self.defaults
        s = self.check_inputs(
            prompt,
            num_images,
            seed,
            randomize_seed,
            d["guidance_scale"] if guidance_scale is None else guidance_scale,
            d["temperature"] if temperature is None else temperature,
            d["top_k"] if top_k is None else top_k,
            d["top_p"] if top_p is None else top_p,
            d["num_candidates"] if num_candidates is None else num_candidates,
        )
        unknown = self.unknown_words(s.prompt)
        if unknown:
            gr.Warning(unknown_words_notice(unknown, markdown=False))
        images, scores = [], []
        for event in _stream(self.key, asdict(s), preview=False):
            if event[0] == "done":
                _, images, scores = event
        gallery = self.save_images(s, images, scores)
        info = {
            "scores": scores,
            "seeds": self.seeds(s),
            "unknown_words": unknown,
            "settings": self.settings_record(s),
        }
        return gallery, info


def _total_steps(pipe) -> int | None:
    """Codes per image, i.e. decoding steps (None if the pipeline does not say)."""
    value = getattr(pipe, "num_codes", None)
    return value if isinstance(value, int) and value > 0 else None
