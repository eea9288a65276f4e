"""dalle-hf Space: the page layout and its wiring. Model loading, checks and generation live in demo.py.

Run locally:  python space/app.py   (http://127.0.0.1:7860; DALLE_HF_MODEL=<folder or Hub id> to pick a model)
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home

import gradio as gr  # noqa: E402

from demo import (  # noqa: E402
    EXAMPLES,
    GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    NUM_CANDIDATES,
    NUM_IMAGES,
    TEMPERATURE,
    TOP_P,
    DalleSpace,
)

QUEUE_MAX_SIZE = 16
CSS = """
#preview img, #results img { image-rendering: pixelated; }
"""
# System fonts only: the page makes no requests to font CDNs.
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_demo(space: DalleSpace) -> gr.Blocks:
    d = space.defaults
    with gr.Blocks(title="dalle-hf", delete_cache=(1800, 3600)) as ui:
        gr.Markdown(
            "# dalle-hf\nA small DALL-E-style text-to-image model: it draws coloured shapes where you ask for them. "
            f"Model: `{space.model_name}`."
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder=EXAMPLES[0],
                    max_lines=2,
                    max_length=MAX_PROMPT_CHARS,
                    elem_id="prompt",
                )
                notice = gr.Markdown(elem_id="notice")
                with gr.Row():
                    num_images = gr.Slider(*NUM_IMAGES, value=4, step=1, label="Images")
                    seed = gr.Number(value=0, precision=0, label=f"Seed (0 to {MAX_SEED})", elem_id="seed")
                    randomize = gr.Checkbox(value=True, label="Randomize seed")
                with gr.Accordion("Advanced", open=False):
                    guidance = gr.Slider(*GUIDANCE, value=d["guidance_scale"], step=0.1, label="Guidance scale")
                    temperature = gr.Slider(*TEMPERATURE, value=d["temperature"], step=0.05, label="Temperature")
                    top_k = gr.Slider(0, space.codebook_size, value=d["top_k"], step=1, label="Top-k (0 = off)")
                    top_p = gr.Slider(*TOP_P, value=d["top_p"], step=0.01, label="Top-p")
                    candidates = gr.Slider(
                        *NUM_CANDIDATES,
                        value=d["num_candidates"],
                        step=1,
                        label="Rerank candidates",
                        info="Draw this many per image and keep the one the alignment model scores highest.",
                    )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples(EXAMPLES, inputs=[prompt], label="Try")
            with gr.Column(scale=1):
                preview = gr.Image(
                    label="Live preview", type="pil", interactive=False, height=200, elem_id="preview",
                    buttons=[],
                )
                gallery = gr.Gallery(
                    label="Results (caption: alignment score)",
                    columns=2,
                    height=620,
                    object_fit="contain",
                    buttons=["download", "fullscreen"],
                    elem_id="results",
                )

        # API-only inputs and outputs: no bounds on the inputs, so a bad value gets demo.py's own message.
        with gr.Group(visible=False):
            api_inputs = [
                gr.Textbox(label="prompt"),
                gr.Number(value=1, label="num_images"),
                gr.Number(value=0, label="seed"),
                gr.Checkbox(value=False, label="randomize_seed"),
                gr.Number(value=d["guidance_scale"], label="guidance_scale"),
                gr.Number(value=d["temperature"], label="temperature"),
                gr.Number(value=d["top_k"], label="top_k"),
                gr.Number(value=d["top_p"], label="top_p"),
                gr.Number(value=d["num_candidates"], label="num_candidates"),
            ]
            api_outputs = [gr.Gallery(label="images"), gr.JSON(label="info")]
            api_button = gr.Button()

        inputs = [prompt, num_images, seed, randomize, guidance, temperature, top_k, top_p, candidates]
        gr.on(
            [run.click, prompt.submit],
            space.generate_stream,
            inputs,
            [preview, gallery, seed, notice],
            api_visibility="private",
            concurrency_id="generate",
            show_progress_on=[gallery],
        )
        prompt.change(
            space.notice, prompt, notice, queue=False, show_progress="hidden", api_visibility="private"
        )
        api_button.click(
            space.generate_api, api_inputs, api_outputs, api_name="generate", concurrency_id="generate"
        )
    # One generation at a time (UI and API share the "generate" slot); a crowd beyond the queue's size gets
    # Gradio's clean "queue is full" refusal instead of piling up.
    ui.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return ui


def launch_kwargs(port: int | None = None) -> dict:
    """Where and how to serve: 127.0.0.1 locally, 0.0.0.0 only inside a Hugging Face Space (which sets SPACE_ID);
    never a public share link; no files served but the app's own outputs (no allowed_paths)."""
    return dict(
        server_name="0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1",
        server_port=port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
        share=False,
        ssr_mode=False,
        theme=THEME,
        css=CSS,
        footer_links=["api"],
        run_history=False,
    )


def main() -> None:
    # SIGTERM (a container stop, `kill`) exits like Ctrl-C, so the app's output folder is removed at exit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    space = DalleSpace.from_env()
    ui = build_demo(space)
    kwargs = launch_kwargs()
    ui.launch(prevent_thread_lock=True, **kwargs)
    print(f"dalle-hf Space ready at http://{kwargs['server_name']}:{kwargs['server_port']}", flush=True)
    ui.block_thread()


if __name__ == "__main__":
    main()
