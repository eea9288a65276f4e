"""LoRA adapters (through `peft`) on a DallePipeline's image decoder and text encoder, and new words.

An adapter folder (what `dalle-hf finetune` writes to OUTPUT_DIR/adapter, and pushes) is small and self-describing:

    adapter/
      dalle_hf_adapter.json        base model, components, words added to the vocabulary
      image_decoder/               peft `save_pretrained` of the decoder's LoRA (adapter_config.json + safetensors)
      text_encoder/                the text encoder's LoRA and/or the trained rows of new tokens (optional)
      tokenizer/                   the tokenizer with the new words (only when words were added)

New words are new tokens: `tokenizer.add_tokens` (whole words only) and new rows of the text encoder's token
embedding (`resize_token_embeddings`), trained as peft "trainable tokens" (only those rows are stored in the
adapter). Old prompts tokenize exactly as before and read the same, untouched rows.

    from dalle_hf.lora import load_lora, merge_lora
    load_lora(pipe, "runs-ft/my-finetune/adapter")     # or a repo id, with subfolder="adapter"
    merge_lora(pipe)                                     # fold the adapter into the weights (plain modules again)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

#: The attention and MLP Linear layers of both Transformers (see models/layers.py): self-attention `qkv`/`proj`,
#: cross-attention `q`/`kv`/`proj`, MLP `fc1`/`fc2`.
LORA_TARGET_MODULES: tuple[str, ...] = ("qkv", "proj", "q", "kv", "fc1", "fc2")
#: Text encoder modules LoRA leaves alone: the pooler only feeds the alignment score, never the decoder.
TEXT_ENCODER_EXCLUDE = r".*pooler.*"
ADAPTER_COMPONENTS: tuple[str, ...] = ("text_encoder", "image_decoder")
ADAPTER_INFO = "dalle_hf_adapter.json"
_ATTR = "_dalle_hf_lora"  # pipeline attribute: {component: PeftModel}


def _peft_models(pipe) -> dict:
    models = pipe.__dict__.get(_ATTR)
    if models is None:
        models = {}
        object.__setattr__(pipe, _ATTR, models)
    return models


def active_adapters(pipe) -> dict:
    """{component: PeftModel} of the adapters currently on `pipe` (not merged)."""
    return dict(_peft_models(pipe))


def lora_config(rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                target_modules: Sequence[str] = LORA_TARGET_MODULES, exclude_modules: str | None = None,
                trainable_token_indices: Mapping[str, Sequence[int]] | None = None, init_lora_weights=True):
    """A peft `LoraConfig` for dalle-hf Transformers (alpha defaults to the rank: scale 1)."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer, got {rank!r}.")
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                      target_modules=list(target_modules), exclude_modules=exclude_modules, bias="none",
                      trainable_token_indices=dict(trainable_token_indices) if trainable_token_indices else None,
                      init_lora_weights=init_lora_weights)


def add_lora(pipe, component: str = "image_decoder", rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
             target_modules: Sequence[str] = LORA_TARGET_MODULES, new_token_ids: Sequence[int] | None = None,
             init_lora_weights=True):
    """Wrap `pipe.<component>` with a fresh adapter (in place: the pipeline keeps its module, now with LoRA layers).

    `rank=0` adds no LoRA; with `new_token_ids` (text encoder) the rows of those tokens become trainable (peft
    trainable tokens) and are stored in the adapter. Returns the `PeftModel`.
    """
    from peft import TrainableTokensConfig, get_peft_model

    if component not in ADAPTER_COMPONENTS:
        raise ValueError(f"`component` must be one of {ADAPTER_COMPONENTS}, got {component!r}.")
    if component in _peft_models(pipe):
        raise ValueError(f"pipe.{component} already has an adapter; merge_lora or unload_lora first.")
    model = getattr(pipe, component)
    tokens = {"token_embedding": list(new_token_ids)} if new_token_ids else None
    if tokens and component != "text_encoder":
        raise ValueError("`new_token_ids` apply to the text encoder only.")
    if rank:
        config = lora_config(rank, alpha, dropout, target_modules,
                             TEXT_ENCODER_EXCLUDE if component == "text_encoder" else None, tokens, init_lora_weights)
    elif tokens:
        config = TrainableTokensConfig(target_modules=["token_embedding"], token_indices=tokens["token_embedding"])
    else:
        raise ValueError("nothing to train: give a LoRA `rank` > 0 or `new_token_ids`.")
    peft_model = get_peft_model(model, config)
    _peft_models(pipe)[component] = peft_model
    return peft_model


# ---- new words ------------------------------------------------------------------------------------------------------


def add_new_words(pipe, words: Sequence[str], init_from: str | None = None) -> list[int]:
    """Add whole-word tokens for `words` (those not already whole tokens) and new embedding rows for them.

    Each new row starts as the mean embedding of the word's old BPE pieces (what the model read for it before), or,
    with `init_from`, of that word (its plural for a plural new word, when the vocabulary has it). Returns the ids of
    the added tokens (in the order of `words`).
    """
    from tokenizers import AddedToken

    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    words = [w for w in dict.fromkeys(w.strip().lower() for w in words) if w]
    new = [w for w in words if pipe.unknown_words(w)]
    if not new:
        return []
    emb = encoder.get_input_embeddings().weight.detach()

    def source_ids(word: str) -> list[int]:
        if init_from:
            src = init_from
            if word.endswith("s") and not init_from.endswith("s") and not pipe.unknown_words(init_from + "s"):
                src = init_from + "s"
            word = src
        return tokenizer(word, add_special_tokens=False)["input_ids"]

    init_rows = [emb[source_ids(w)].float().mean(0) for w in new]
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in new])
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are set just below
    ids = [tokenizer.convert_tokens_to_ids(w) for w in new]
    with torch.no_grad():
        weight = encoder.get_input_embeddings().weight
        for i, row in zip(ids, init_rows):
            weight[i] = row.to(weight.dtype)
    return ids


def added_words(tokenizer) -> list[str]:
    """Words added to the tokenizer after training (non-special added tokens)."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if not t.special]


# ---- save / load / merge ----------------------------------------------------------------------------------------------


def save_lora(pipe, path: str | os.PathLike, base_model: str | None = None) -> Path:
    """Save the adapters on `pipe` (and the tokenizer, when words were added) into `path`."""
    path = Path(path)
    models = _peft_models(pipe)
    if not models:
        raise ValueError("`pipe` has no adapter to save (add_lora or load_lora first).")
    path.mkdir(parents=True, exist_ok=True)
    for component, peft_model in models.items():
        # save_embedding_layers=False: new words are stored as trainable-token rows, not as the whole table
        peft_model.save_pretrained(path / component, save_embedding_layers=False)
    words = added_words(pipe.tokenizer)
    if words:
        pipe.tokenizer.save_pretrained(path / "tokenizer")
    info = {"base_model": base_model, "components": sorted(models), "added_tokens": words,
            "vocab_size": len(pipe.tokenizer), "format": 1}
    (path / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path


def _resolve_adapter(path, subfolder, revision, cache_dir, token, local_files_only) -> Path:
    local = Path(path) / subfolder if subfolder else Path(path)
    if Path(path).is_dir():
        return local
    from huggingface_hub import snapshot_download

    from .hub import _env_offline, looks_like_repo_id

    if not looks_like_repo_id(str(path)):
        raise ValueError(f"{path!r} is neither a local adapter folder nor a Hub repo id.")
    root = snapshot_download(str(path), allow_patterns=[f"{subfolder}/*" if subfolder else "*"], revision=revision,
                             cache_dir=cache_dir, token=token, local_files_only=bool(local_files_only) or _env_offline())
    return Path(root) / subfolder if subfolder else Path(root)


def load_lora(pipe, path: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
              cache_dir: str | None = None, token: str | None = None, local_files_only: bool | None = None,
              is_trainable: bool = False):
    """Put a saved adapter (a folder, or a repo id with `subfolder`) onto `pipe`, in place; returns `pipe`.

    Words the adapter added come with it: the pipeline's tokenizer is replaced by the adapter's and the text
    encoder's embedding grows to match before the adapter's rows are loaded.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    folder = _resolve_adapter(path, subfolder, revision, cache_dir, token, local_files_only)
    info_file = folder / ADAPTER_INFO
    if not info_file.is_file():
        raise ValueError(f"{folder} is not a dalle-hf adapter folder (no {ADAPTER_INFO}).")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if info.get("added_tokens"):
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        missing = [w for w in info["added_tokens"] if w not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"{folder}/tokenizer lacks the adapter's words {missing}.")
        pipe.tokenizer = tokenizer
        pipe.text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for component in info["components"]:
        if component in _peft_models(pipe):
            raise ValueError(f"pipe.{component} already has an adapter; merge_lora or unload_lora first.")
        model = getattr(pipe, component)
        peft_model = PeftModel.from_pretrained(model, folder / component, is_trainable=is_trainable)
        if not is_trainable:
            peft_model.eval()
        _peft_models(pipe)[component] = peft_model
    return pipe


def merge_lora(pipe):
    """Fold every adapter on `pipe` into the weights (`merge_and_unload`): plain modules again; returns `pipe`."""
    models = _peft_models(pipe)
    for component in list(models):
        merged = models.pop(component).merge_and_unload()
        setattr(pipe, component, merged)
    return pipe


def unload_lora(pipe):
    """Remove every adapter from `pipe` without merging (the base weights again; added words stay); returns `pipe`."""
    models = _peft_models(pipe)
    for component in list(models):
        setattr(pipe, component, models.pop(component).unload())
    return pipe
