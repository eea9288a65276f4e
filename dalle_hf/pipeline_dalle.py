"""DallePipeline: prompt -> text states -> image codes (autoregressive, guided) -> pixels, with reranking.

The decoding loop is the hot path. It owns a small sampler instead of `GenerationMixin.generate`:
- self-attention keys/values live in preallocated buffers written one step at a time;
- the text's cross-attention keys/values are computed once per call;
- classifier-free guidance runs conditional and unconditional rows in one batched forward pass;
- all random numbers are drawn before the loop, one uniform per code, from each image's own generator, so image i
  depends only on its prompt, its generator and the settings, never on the batch it was drawn in.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging

from .models import DalleAlignmentModel, DalleImageDecoder, DalleTextEncoder
from .tokenization import unknown_words

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "codes")
MAX_IMAGES_PER_PROMPT = 256
MAX_CANDIDATES = 64


@dataclass
class DallePipelineOutput(BaseOutput):
    """
    Args:
        images: list of PIL images, a float array `(B, H, W, 3)` in [0, 1] (`"np"`), a float tensor `(B, 3, H, W)` in
            [0, 1] (`"pt"`), or a LongTensor of codes `(B, N)` (`"codes"`).
        scores: alignment score of each returned image with its prompt (a numpy array for "pil"/"np", a tensor for
            "pt"/"codes"); with `num_candidates`, the score of the candidate that was kept.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    scores: np.ndarray | torch.Tensor


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class DallePipeline(DiffusionPipeline):
    r"""
    Text-to-image generation in the manner of DALL-E.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerFast`]): BPE tokenizer of the prompts.
        text_encoder ([`DalleTextEncoder`]): prompt tokens -> per-token states and a pooled text vector.
        image_decoder ([`DalleImageDecoder`]): autoregressive Transformer over image codes, cross-attending to the text.
        alignment ([`DalleAlignmentModel`]): VQ autoencoder (codes <-> pixels) and contrastive scoring head.
    """

    model_cpu_offload_seq = "text_encoder->image_decoder->alignment"

    def __init__(self, tokenizer, text_encoder: DalleTextEncoder, image_decoder: DalleImageDecoder,
                 alignment: DalleAlignmentModel):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, image_decoder=image_decoder,
                              alignment=alignment)

    # ---- helpers -----------------------------------------------------------------------------------------------------

    @property
    def num_codes(self) -> int:
        return self.image_decoder.config.num_image_tokens

    @property
    def grid_size(self) -> int:
        return self.image_decoder.config.image_grid_size

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` that the model never learned as words (it will mostly ignore them)."""
        if not isinstance(prompt, str):
            raise TypeError(f"`prompt` must be a string, got {type(prompt).__name__}.")
        return unknown_words(self.tokenizer, prompt)

    def _tokenize(self, prompts: list[str]):
        """Tokenize with `<s> ... </s>`; a prompt longer than the encoder allows is truncated with a warning."""
        max_len = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        for i, seq in enumerate(ids):
            if len(seq) > max_len:
                logger.warning(
                    f"Prompt {i} is {len(seq)} tokens long; the text encoder reads at most {max_len}, so the last "
                    f"{len(seq) - max_len} tokens were dropped: {prompts[i][:80]!r}..."
                )
                ids[i] = seq[: max_len - 1] + [seq[-1]]  # keep the end-of-text token
        length = max(len(seq) for seq in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([seq + [pad] * (length - len(seq)) for seq in ids], dtype=torch.long)
        mask = torch.tensor([[1] * len(seq) + [0] * (length - len(seq)) for seq in ids], dtype=torch.long)
        return input_ids, mask

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]):
        """Returns text states (P, L, D), attention mask (P, L) and pooled text embeddings (P, E)."""
        input_ids, mask = self._tokenize(prompts)
        device = self._execution_device
        out = self.text_encoder(input_ids.to(device), attention_mask=mask.to(device))
        return out.last_hidden_state, mask.to(device), out.text_embeds

    def check_inputs(self, prompt, num_images_per_prompt, num_candidates, guidance_scale, temperature, top_k, top_p,
                     generator, image, num_keep_rows, output_type, return_dict, callback_on_step_end):
        """Raise a `ValueError`/`TypeError` naming the argument, the value received and what is allowed."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif isinstance(prompt, (list, tuple)) and len(prompt) == 0:
            raise ValueError("`prompt` must be a string or a non-empty list of strings, got an empty list.")
        else:
            raise TypeError(f"`prompt` must be a string or a list of strings, got {prompt!r:.100}.")
        self._check_int("num_images_per_prompt", num_images_per_prompt, 1, MAX_IMAGES_PER_PROMPT)
        if num_candidates is not None:
            self._check_int("num_candidates", num_candidates, 1, MAX_CANDIDATES)
        self._check_real("guidance_scale", guidance_scale, 0.0, 50.0)
        self._check_real("temperature", temperature, 1e-3, 10.0, low_open=False)
        self._check_int("top_k", top_k, 0, self.image_decoder.config.vocab_size)
        self._check_real("top_p", top_p, 0.0, 1.0, low_open=True)
        num_images = len(prompts) * num_images_per_prompt
        if isinstance(generator, list):
            if len(generator) != num_images or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(
                    f"`generator` must hold one torch.Generator per image (len(prompt) * num_images_per_prompt = "
                    f"{num_images}), got a list of {len(generator)} items."
                )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be None, a torch.Generator or a list of them, got {generator!r:.100}.")
        if image is not None:
            self._check_int("num_keep_rows", self.grid_size // 2 if num_keep_rows is None else num_keep_rows,
                            0, self.grid_size - 1)
        elif num_keep_rows is not None:
            raise ValueError(f"`num_keep_rows` only applies with `image` (an image to complete), got {num_keep_rows!r} "
                             "and no image.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not isinstance(return_dict, bool):
            raise TypeError(f"`return_dict` must be a bool, got {return_dict!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {callback_on_step_end!r:.100}.")
        return prompts

    @staticmethod
    def _check_int(name, value, low, high):
        if not _is_int(value):
            raise TypeError(f"`{name}` must be an integer in [{low}, {high}], got {value!r:.100}.")
        if not low <= value <= high:
            raise ValueError(f"`{name}` must be an integer in [{low}, {high}], got {value}.")

    @staticmethod
    def _check_real(name, value, low, high, low_open=False):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"`{name}` must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r:.100}.")
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise ValueError(f"`{name}` must be a number in {'(' if low_open else '['}{low}, {high}], got {value}.")

    def _draw_uniforms(self, generator, num_images: int, num_candidates: int) -> torch.Tensor:
        """One uniform per code to sample, (num_images * num_candidates, N), drawn image by image."""
        shape = (num_candidates, self.num_codes)
        if isinstance(generator, list):
            u = torch.stack([torch.rand(shape, generator=g, device=g.device).cpu() for g in generator])
        elif generator is not None:
            u = torch.rand((num_images, *shape), generator=generator, device=generator.device).cpu()
        else:
            u = torch.rand((num_images, *shape))
        return u.reshape(num_images * num_candidates, self.num_codes)  # (B, C, N) -> (B*C, N)

    def _prepare_image_prefix(self, image, num_images: int, num_keep_rows: int) -> torch.LongTensor:
        """Encode the partial image(s) and keep the first `num_keep_rows` rows of codes: (num_images, rows * grid)."""
        size = self.alignment.config.image_size
        images = image if isinstance(image, list) else [image]
        pixels = []
        for im in images:
            if isinstance(im, PIL.Image.Image):
                arr = np.asarray(im.convert("RGB").resize((size, size), PIL.Image.BICUBIC), dtype=np.float32) / 255.0
                pixels.append(torch.from_numpy(arr).permute(2, 0, 1))
            elif isinstance(im, np.ndarray) and im.ndim == 3 and im.shape[-1] == 3:
                arr = im.astype(np.float32) / (255.0 if im.dtype == np.uint8 else 1.0)
                pixels.append(torch.from_numpy(arr).permute(2, 0, 1))
            elif isinstance(im, torch.Tensor) and im.ndim in (3, 4) and im.shape[-3] == 3:
                pixels.extend(im.float().cpu().reshape(-1, *im.shape[-3:]))
            else:
                raise ValueError(
                    "`image` must be a PIL image, an (H, W, 3) array, a (3, H, W) or (B, 3, H, W) tensor in [0, 1], "
                    f"or a list of those; got {type(im).__name__}."
                )
        x = torch.stack([p if p.shape[-1] == size else F.interpolate(p[None], size=(size, size), mode="bilinear",
                                                                     align_corners=False)[0] for p in pixels])
        if x.shape[0] not in (1, num_images):
            raise ValueError(f"`image` must hold 1 image or one per generated image ({num_images}), got {x.shape[0]}.")
        codes = self.alignment.encode(x.to(self._execution_device, self.alignment.dtype) * 2 - 1)
        return codes[:, : num_keep_rows * self.grid_size].expand(num_images, -1)

    @staticmethod
    def _sample(logits, u, temperature: float, top_k: int, top_p: float) -> torch.LongTensor:
        """Inverse-CDF sampling of one code per row from filtered logits (R, V) with pre-drawn uniforms u (R,)."""
        logits = logits.float() / temperature
        if top_k > 0:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
        cdf = logits.softmax(-1).cumsum(-1)
        idx = torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).contiguous())
        return idx[:, 0].clamp_(max=logits.shape[-1] - 1)

    def _codes_to_images(self, codes: torch.LongTensor) -> torch.Tensor:
        """(B, N) codes -> (B, 3, H, W) float in [0, 1].

        One image at a time: batched convolutions round differently for different batch sizes (by ~1e-6, enough to
        flip a uint8 pixel now and then), and an image must depend only on its seed, not on its batch-mates. Measured
        on the embedded model: 16 images take 0.07 s this way against 0.04 s batched, small next to sampling.
        """
        return (torch.cat([self.alignment.decode(codes[i : i + 1]) for i in range(codes.shape[0])]).float() + 1) / 2

    @torch.no_grad()
    def preview(self, codes_so_far: torch.LongTensor) -> list[PIL.Image.Image]:
        """Render partially decoded codes (B, t): cells not drawn yet are left white."""
        B, t = codes_so_far.shape
        fill = codes_so_far[:, -1:].expand(B, self.num_codes - t) if t else codes_so_far.new_zeros(B, self.num_codes)
        images = self._codes_to_images(torch.cat([codes_so_far, fill], dim=1).to(self._execution_device))
        f = self.alignment.config.downsample_factor
        drawn = (torch.arange(self.num_codes) < t).float().view(1, 1, self.grid_size, self.grid_size)
        drawn = drawn.repeat_interleave(f, 2).repeat_interleave(f, 3).to(images.device)  # cells -> pixels
        return self.numpy_to_pil((images * drawn + (1 - drawn)).permute(0, 2, 3, 1).cpu().numpy())

    # ---- generation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        num_candidates: int | None = None,
        guidance_scale: float = 1.5,
        temperature: float = 0.6,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        image=None,
        num_keep_rows: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
    ) -> DallePipelineOutput | tuple:
        r"""
        Generate images from text.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); `""` is the unconditional prompt.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            num_candidates (`int`, *optional*): sample this many candidates per image and keep the one the alignment
                model scores best (DALL-E's reranking). `None` keeps the single sample.
            guidance_scale (`float`, defaults to 1.5): classifier-free guidance; 1 turns it off (one pass per step).
            temperature (`float`, defaults to 0.6): softmax temperature of the code distribution.
                (The defaults were chosen on validation captions, not on the benchmark: see README.)
            top_k (`int`, defaults to 0): keep only the k most likely codes at each step (0 = no limit).
            top_p (`float`, defaults to 1.0): nucleus sampling: keep the smallest set of codes whose mass reaches top_p.
            generator (`torch.Generator` or a list of them, *optional*): one per image makes each image reproducible
                by its own seed, whatever the batch; a single generator draws the images in order.
            image (PIL image, array or tensor, or a list, *optional*): a partial image to complete: its top
                `num_keep_rows` rows of codes are kept and decoding continues from there.
            num_keep_rows (`int`, *optional*): rows of codes kept from `image` (defaults to half the grid).
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "codes".
            return_dict (`bool`, defaults to True): return a [`DallePipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): called as `callback_on_step_end(pipe, step, codes_so_far)`
                after each code is sampled; `codes_so_far` is (num_images * candidates, step + 1), image-major.

        Returns:
            [`DallePipelineOutput`] or `(images, scores)`.
        """
        # 1. Check inputs
        prompts = self.check_inputs(prompt, num_images_per_prompt, num_candidates, guidance_scale, temperature, top_k,
                                    top_p, generator, image, num_keep_rows, output_type, return_dict,
                                    callback_on_step_end)
        device = self._execution_device
        B, C, N = len(prompts) * num_images_per_prompt, num_candidates or 1, self.num_codes
        R = B * C  # rows sampled: every candidate of every image
        guided = guidance_scale != 1.0

        # 2. Encode the prompts (and the unconditional prompt) once; expand to rows
        states, mask, text_embeds = self.encode_prompt(prompts + [""] if guided else prompts)
        row_prompt = torch.arange(len(prompts), device=device).repeat_interleave(num_images_per_prompt * C)
        rows = torch.cat([row_prompt, torch.full_like(row_prompt, len(prompts))]) if guided else row_prompt

        # 3. Random numbers for every code of every row, drawn per image before the loop
        u = self._draw_uniforms(generator, B, C).to(device)

        # 4. Prefix codes for image completion
        start = 0
        codes = torch.zeros(R, N, dtype=torch.long, device=device)
        prefix = None
        if image is not None:
            keep = self.grid_size // 2 if num_keep_rows is None else num_keep_rows
            prefix = self._prepare_image_prefix(image, B, keep).repeat_interleave(C, dim=0)
            start = prefix.shape[1]
            codes[:, :start] = prefix

        # 5. Autoregressive decoding with the cache
        decoder = self.image_decoder
        cache = decoder.init_cache(states[rows], mask[rows])
        if prefix is not None and guided:
            prefix = torch.cat([prefix, prefix])
        logits = decoder.prefill(prefix, cache)
        with self.progress_bar(total=N - start) as progress_bar:
            for t in range(start, N):
                if guided:
                    cond, uncond = logits.float().chunk(2)
                    logits = uncond + guidance_scale * (cond - uncond)
                code = self._sample(logits, u[:, t], temperature, top_k, top_p)
                codes[:, t] = code
                if callback_on_step_end is not None:
                    callback_on_step_end(self, t, codes[:, : t + 1])
                if t < N - 1:
                    logits = decoder.step(torch.cat([code, code]) if guided else code, cache)
                progress_bar.update()

        # 6. Score every candidate against its prompt; keep the best of each image
        scores = self.alignment.score(text_embeds[row_prompt], codes=codes).float()
        if C > 1:
            best = scores.view(B, C).argmax(dim=1)
            pick = torch.arange(B, device=device) * C + best
            codes, scores = codes[pick], scores[pick]

        # 7. Codes to pixels, in the requested output type
        self.maybe_free_model_hooks()
        if output_type == "codes":
            images = codes
        else:
            pixels = self._codes_to_images(codes)
            if output_type == "pt":
                images = pixels
            else:
                images = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, 3, H, W) -> (B, H, W, 3)
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        if output_type in ("np", "pil"):
            scores = scores.cpu().numpy()
        if not return_dict:
            return images, scores
        return DallePipelineOutput(images=images, scores=scores)

    # ---- the Hub: loading by repo id, self-contained saving, one-commit pushes (dalle_hf/hub.py) --------------------
    # These methods import dalle_hf.hub, so the exported standalone `pipeline.py` leaves them out.

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "DallePipeline":
        r"""
        Load a pipeline from a folder or a Hub repo id (`"org/name"`).

        A repo id is fetched with `huggingface_hub.snapshot_download` (honouring `revision`, `cache_dir`, `token`,
        `local_files_only`, `force_download` and `HF_HUB_OFFLINE`), then loaded from the local snapshot. Both the
        package format (what `save_pretrained` writes) and the self-contained format (what `push_to_hub` uploads)
        load, always with dalle_hf's own classes, so no `trust_remote_code` is needed. Weights are loaded as float32
        unless `dtype` (or `torch_dtype`) is given: a checkpoint saved in bfloat16 samples in float32 on CPU.
        """
        from .hub import is_self_contained, load_self_contained, resolve_pretrained

        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only",
                                                 "force_download") if k in kwargs}
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        dtype = dtype if dtype is not None else (torch_dtype if torch_dtype is not None else torch.float32)
        kwargs.pop("trust_remote_code", None)  # the package's classes are used, never the folder's code
        folder = resolve_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        if is_self_contained(folder):
            pipe = load_self_contained(cls, folder, dtype=dtype, **kwargs)
        else:
            pipe = super().from_pretrained(folder, dtype=dtype, **kwargs)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size=None, push_to_hub: bool = False, self_contained: bool = False,
                        model_card=None, **kwargs):
        r"""
        Save the pipeline. By default in the package format (components named by their dalle_hf modules; loads with
        `DallePipeline.from_pretrained`). `self_contained=True` also writes each component's single-file code and
        `pipeline.py`, so that `diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads
        it without dalle_hf. `model_card`: a dict of `dalle_hf.hub.render_model_card` arguments, or the text, written
        as README.md. `push_to_hub=True` then pushes (self-contained, one commit) to `repo_id`.
        """
        from .hub import MODEL_CARD_NAME, check_no_adapters, make_self_contained, render_model_card

        check_no_adapters(self)
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "token", "create_pr")
                      if k in kwargs}
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                max_shard_size=max_shard_size, push_to_hub=False, **kwargs)
        if self_contained:
            make_self_contained(save_directory)
        if model_card is not None:
            text = model_card if isinstance(model_card, str) else render_model_card(**model_card)
            with open(f"{save_directory}/{MODEL_CARD_NAME}", "w", encoding="utf-8") as f:
                f.write(text)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", str(save_directory).rstrip("/").split("/")[-1])
            self.push_to_hub(repo_id, model_card=model_card, safe_serialization=safe_serialization, variant=variant,
                             **hub_kwargs)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, revision: str | None = None, model_card=None, extra_folders=None):
        r"""
        Push the pipeline to the Hub as ONE commit (`HfApi.create_commit`): the self-contained folder (weights,
        configs with `auto_map`, single-file code per component, `pipeline.py`, tokenizer) and a model card
        (`model_card`: a dict of `dalle_hf.hub.render_model_card` arguments, or the text). `extra_folders`
        ({path_in_repo: local folder}) go into the same commit, e.g. a LoRA adapter. Returns the `CommitInfo`.
        """
        from .hub import push_pipeline_to_hub

        return push_pipeline_to_hub(self, repo_id, commit_message=commit_message, private=private, token=token,
                                    create_pr=create_pr, revision=revision, model_card=model_card,
                                    extra_folders=extra_folders, safe_serialization=safe_serialization,
                                    variant=variant)
