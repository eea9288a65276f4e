"""Recipes: every stage in order, ending in one pipeline folder that `DallePipeline.from_pretrained` loads.

`dalle-hf train --recipe shapes --output-dir runs/shapes` trains the embedded default model on ShapesWorld. A stage
whose output folder is complete is skipped, and an interrupted stage resumes from its newest checkpoint, so the same
command continues a run that was killed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from ..models import DalleAlignmentConfig, DalleImageDecoderConfig, DalleTextEncoderConfig
from .loop import TrainingArguments, run_stage
from .stages import AutoencoderStage, ContrastiveStage, DataArguments, DecoderStage

STAGES = ("tokenizer", "autoencoder", "decoder", "contrastive", "pipeline")


@dataclass
class Recipe:
    """Everything that defines a trained model: sizes, data and the loop settings of each stage."""

    tokenizer_vocab_size: int
    tokenizer_captions: int
    text: dict
    decoder: dict
    alignment: dict
    autoencoder_args: dict
    decoder_args: dict
    contrastive_args: dict
    num_code_images: int
    disc_start: int
    data: DataArguments = field(default_factory=DataArguments)
    # A continuation recipe trains on from a finished pipeline (`--init-from`) instead of from scratch: the
    # tokenizer and the autoencoder are taken as they are, the decoder and the contrastive head train on.
    continuation: bool = False


RECIPES = {
    # The embedded default model (see README for the command and the measured times).
    "shapes": Recipe(
        tokenizer_vocab_size=256,
        tokenizer_captions=20000,
        text=dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, intermediate_size=1024,
                  max_position_embeddings=32, projection_dim=256),
        decoder=dict(image_grid_size=8, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                     intermediate_size=1024),
        alignment=dict(image_size=64, patch_size=4, block_out_channels=[64, 192], layers_per_block=1, codebook_size=512,
                       codebook_dim=32, projection_dim=128, contrastive_width=128, contrastive_layers=2,
                       contrastive_heads=4),
        autoencoder_args=dict(max_steps=5000, batch_size=32, learning_rate=5e-4, warmup_steps=100, save_every=250),
        decoder_args=dict(max_steps=2000, batch_size=64, learning_rate=8e-4, warmup_steps=150, save_every=250,
                          weight_decay=0.05, eval_every=500),
        contrastive_args=dict(max_steps=600, batch_size=128, learning_rate=5e-4, warmup_steps=50, save_every=200),
        num_code_images=100000,
        disc_start=2000,
    ),
    # More decoder training for a finished `shapes` pipeline, on fresh scenes (run it with `--seed 1`): a warm restart
    # of the decoder's schedule at a lower peak rate, then a longer contrastive stage (its text projection must follow
    # the text encoder, which moved).
    "shapes-continue": Recipe(
        tokenizer_vocab_size=0,  # the sizes are those of `--init-from`; only the image size is needed (data)
        tokenizer_captions=0,
        text={},
        decoder={},
        alignment=dict(image_size=64),
        autoencoder_args={},
        decoder_args=dict(max_steps=3000, batch_size=64, learning_rate=5e-4, warmup_steps=100, save_every=250,
                          weight_decay=0.05, eval_every=500),
        contrastive_args=dict(max_steps=1500, batch_size=128, learning_rate=3e-4, warmup_steps=50, save_every=250),
        num_code_images=200000,
        disc_start=0,
        continuation=True,
    ),
    # A few-second version for tests and smoke runs.
    "tiny": Recipe(
        tokenizer_vocab_size=128,
        tokenizer_captions=2000,
        text=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=32, projection_dim=32),
        decoder=dict(image_grid_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64),
        alignment=dict(image_size=64, patch_size=4, block_out_channels=[8, 16], layers_per_block=1, codebook_size=32,
                       codebook_dim=8, projection_dim=16, contrastive_width=16, contrastive_layers=1,
                       contrastive_heads=2),
        autoencoder_args=dict(max_steps=6, batch_size=4, learning_rate=1e-3, warmup_steps=2, save_every=3,
                              log_every=2),
        decoder_args=dict(max_steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=2, save_every=3, log_every=2,
                          eval_every=6),
        contrastive_args=dict(max_steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=1, save_every=2,
                              log_every=2),
        num_code_images=512,
        disc_start=3,
    ),
}


RECIPES["tiny-continue"] = dataclasses.replace(copy.deepcopy(RECIPES["tiny"]), continuation=True)  # for tests


def get_recipe(name: str, data: DataArguments | None = None, max_steps: int | None = None) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"`recipe` must be one of {sorted(RECIPES)}, got {name!r}.")
    recipe = copy.deepcopy(RECIPES[name])
    if data is not None:
        recipe.data = data
    if max_steps is not None:
        for key in ("autoencoder_args", "decoder_args", "contrastive_args"):
            getattr(recipe, key)["max_steps"] = max_steps
    return recipe


def check_init_from(name: str, recipe: Recipe, init_from: str | None) -> None:
    """A continuation recipe needs `init_from` (a pipeline folder); a recipe from scratch does not take one."""
    if recipe.continuation and init_from is None:
        raise ValueError(f"recipe {name!r} continues a trained pipeline: it needs --init-from (`init_from`), a "
                         "pipeline folder")
    if not recipe.continuation and init_from is not None:
        raise ValueError(f"recipe {name!r} trains from scratch and does not take --init-from (`init_from`="
                         f"{init_from!r}); use a continuation recipe such as 'shapes-continue'")
    if init_from is not None and not os.path.isfile(os.path.join(init_from, "model_index.json")):
        raise ValueError(f"`init_from`={init_from!r} is not a pipeline folder (no model_index.json)")


def _done(path: str) -> bool:
    return os.path.exists(os.path.join(path, "training_args.json"))


def train_tokenizer_stage(recipe: Recipe, output_dir: str, accelerator, init_from: str | None = None):
    """Train the BPE on the training captions (once, on the main process) and load it everywhere.

    With `init_from` (a pipeline folder) its tokenizer is copied instead: a continued model keeps its vocabulary.
    """
    from transformers import AutoTokenizer

    from ..tokenization import train_tokenizer

    path = os.path.join(output_dir, "tokenizer")
    if accelerator.is_main_process and not os.path.exists(os.path.join(path, "tokenizer.json")):
        if init_from is not None:
            tokenizer = AutoTokenizer.from_pretrained(os.path.join(init_from, "tokenizer"))
        else:
            captions = _training_captions(recipe)
            tokenizer = train_tokenizer(captions, vocab_size=recipe.tokenizer_vocab_size,
                                        max_length=recipe.text["max_position_embeddings"])
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=output_dir)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(path)


def _training_captions(recipe: Recipe) -> list[str]:
    data = recipe.data
    if data.builtin:
        from ..data import sample_captions

        return sample_captions(recipe.tokenizer_captions, seed=0, held_out="include", weights=data.shapes_weights)
    from ..data.folder import build_train_dataset

    stream = build_train_dataset(train_data_dir=data.train_data_dir, dataset_name=data.dataset_name,
                                 image_column=data.image_column, caption_column=data.caption_column,
                                 resolution=data.resolution, infinite=False)
    return [item["text"] for item in stream][: recipe.tokenizer_captions]


def _args(output_dir: str, seed: int, resume: bool, settings: dict) -> TrainingArguments:
    return TrainingArguments(output_dir=output_dir, seed=seed, resume=resume, **settings)


def run_recipe(name: str, output_dir: str, accelerator, seed: int = 0, resume: bool = True,
               data: DataArguments | None = None, max_steps: int | None = None, stages=STAGES,
               save_dtype: torch.dtype | None = None, init_from: str | None = None) -> str:
    """Run the recipe's stages in order; returns the pipeline folder (`output_dir/pipeline`).

    `init_from`: a pipeline folder to continue from (required by, and only allowed with, a continuation recipe).
    """
    recipe = get_recipe(name, data, max_steps)
    check_init_from(name, recipe, init_from)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer = train_tokenizer_stage(recipe, output_dir, accelerator, init_from)
    ae_dir, dec_dir, con_dir = (os.path.join(output_dir, s) for s in ("autoencoder", "decoder", "contrastive"))
    codes_dir = os.path.join(output_dir, "codes")
    if init_from is not None:
        ae_dir = init_from  # the trained alignment model is `init_from/alignment`; no autoencoder stage
    elif "autoencoder" in stages and not _done(ae_dir):
        config = DalleAlignmentConfig(text_embed_dim=recipe.text["projection_dim"], **recipe.alignment)
        stage = AutoencoderStage(config, recipe.data, disc_start=recipe.disc_start)
        run_stage(stage, accelerator, _args(ae_dir, seed, resume, recipe.autoencoder_args))
    alignment_path = os.path.join(ae_dir, "alignment")
    if "decoder" in stages and not _done(dec_dir):
        text_config = decoder_config = None  # a continuation keeps the sizes of `init_from`
        if init_from is None:
            special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
            text_config = DalleTextEncoderConfig(vocab_size=len(tokenizer), **recipe.text, **special)
            decoder_config = DalleImageDecoderConfig(vocab_size=recipe.alignment["codebook_size"],
                                                     cross_attention_dim=recipe.text["hidden_size"], **recipe.decoder)
        stage = DecoderStage(tokenizer, alignment_path, recipe.data, recipe.num_code_images, text_config,
                             decoder_config, pretrained=init_from, cache_dir=codes_dir)
        run_stage(stage, accelerator, _args(dec_dir, seed, resume, recipe.decoder_args))
    if "contrastive" in stages and not _done(con_dir):
        stage = ContrastiveStage(tokenizer, alignment_path, os.path.join(dec_dir, "text_encoder"), recipe.data,
                                 recipe.num_code_images, codes_dir)
        run_stage(stage, accelerator, _args(con_dir, seed, resume, recipe.contrastive_args))
    pipeline_dir = os.path.join(output_dir, "pipeline")
    if "pipeline" in stages and accelerator.is_main_process:
        assemble_pipeline(tokenizer, os.path.join(con_dir, "text_encoder"), os.path.join(dec_dir, "image_decoder"),
                          os.path.join(con_dir, "alignment"), pipeline_dir, save_dtype)
    accelerator.wait_for_everyone()
    return pipeline_dir


def assemble_pipeline(tokenizer, text_encoder_path: str, image_decoder_path: str, alignment_path: str,
                      pipeline_dir: str, dtype: torch.dtype | None = None) -> str:
    """Put the trained components into one `DallePipeline` folder (written to a temp name, then renamed)."""
    from ..models import DalleAlignmentModel, DalleImageDecoder, DalleTextEncoder
    from ..pipeline_dalle import DallePipeline

    pipe = DallePipeline(
        tokenizer=tokenizer,
        text_encoder=DalleTextEncoder.from_pretrained(text_encoder_path),
        image_decoder=DalleImageDecoder.from_pretrained(image_decoder_path),
        alignment=DalleAlignmentModel.from_pretrained(alignment_path),
    )
    if dtype is not None:
        pipe.to(dtype=dtype)
    parent = os.path.dirname(os.path.abspath(pipeline_dir))
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    pipe.save_pretrained(tmp)
    shutil.rmtree(pipeline_dir, ignore_errors=True)
    os.replace(tmp, pipeline_dir)
    return pipeline_dir


