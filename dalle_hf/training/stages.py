"""The three training stages, each plugged into the shared loop (`loop.run_stage`).

1. `AutoencoderStage`: the alignment model's VQ autoencoder; L1 + L2 reconstruction, the quantisation loss and, after a
   warm-up, a hinge adversarial loss from a patch discriminator whose weight is balanced against the reconstruction
   loss (the ratio of their gradient norms at the decoder's last layer).
2. `DecoderStage`: the text encoder and the image decoder together, next-code cross-entropy on codes computed once by
   the frozen autoencoder, with caption dropout (an empty caption) so the same model serves classifier-free guidance.
3. `ContrastiveStage`: the alignment model's contrastive head and the text encoder's pooler/projection (the rest is
   frozen, so the decoder's view of the text is unchanged), symmetric InfoNCE plus hard negative captions.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from ..models import (
    DalleAlignmentConfig,
    DalleAlignmentModel,
    DalleImageDecoder,
    DalleImageDecoderConfig,
    DalleTextEncoder,
    DalleTextEncoderConfig,
)
from .discriminator import PatchDiscriminator, hinge_d_loss
from .loop import Stage, TrainingArguments

logger = logging.getLogger(__name__)


# ---- data ------------------------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Where images and captions come from: the built-in ShapesWorld stream (default), a folder, or a dataset."""

    train_data_dir: str | None = None
    dataset_name: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 64
    shapes_weights: dict | None = None

    @property
    def builtin(self) -> bool:
        return self.train_data_dir is None and self.dataset_name is None


def build_image_stream(data: DataArguments, seed: int, rank: int, world_size: int, skip: int = 0):
    """An infinite IterableDataset of {"pixel_values", "text"}, sharded by rank (each rank sees different samples).

    `skip`: samples all ranks together consumed before a resume; the ShapesWorld stream continues right after them,
    a folder or dataset starts at its next unseen epoch (so a resumed run does not replay the data it began with).
    """
    if data.builtin:
        from ..data import ShapesWorldDataset

        return ShapesWorldDataset(seed=seed, weights=data.shapes_weights, rank=rank, world_size=world_size,
                                  start_index=skip)
    from ..data.folder import build_train_dataset

    stream = build_train_dataset(train_data_dir=data.train_data_dir, dataset_name=data.dataset_name,
                                 image_column=data.image_column, caption_column=data.caption_column,
                                 resolution=data.resolution, seed=seed, rank=rank, world_size=world_size, infinite=True)
    if skip:
        stream.set_epoch(-(-skip // stream.num_rows))
    return stream


def collate_images(batch):
    return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]), "text": [b["text"] for b in batch]}


def infinite(loader):
    while True:
        yield from loader


def save_pretrained_atomic(model, path: str, dtype: torch.dtype | None = None) -> None:
    """`save_pretrained` into a temporary sibling folder, then rename: no half-written model folder."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def tokenize(tokenizer, captions: list[str], max_length: int):
    enc = tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ---- 1. autoencoder ----------------------------------------------------------------------------------------------


class AutoencoderStage(Stage):
    name = "autoencoder"

    def __init__(self, config: DalleAlignmentConfig | None, data: DataArguments, pretrained: str | None = None,
                 disc_start: int = 1000, disc_weight: float = 0.1, revive_every: int = 100, revive_until: float = 0.75):
        self.config, self.data, self.pretrained = config, data, pretrained
        self.disc_start, self.disc_weight = disc_start, disc_weight
        self.revive_every, self.revive_until = revive_every, revive_until

    def setup(self, accelerator, args: TrainingArguments):
        self.accelerator, self.args = accelerator, args
        model = (DalleAlignmentModel.from_pretrained(self.pretrained, dtype=torch.float32) if self.pretrained
                 else DalleAlignmentModel(self.config))
        for name, p in model.named_parameters():  # only the autoencoder trains here
            p.requires_grad_(name.split(".")[0] in ("encoder", "quantizer", "decoder"))
        disc = PatchDiscriminator(model.config.num_channels, width=32)
        params = [p for p in model.parameters() if p.requires_grad]
        opt_ae = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.5, 0.9), weight_decay=0.0)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=args.learning_rate, betas=(0.5, 0.9), weight_decay=0.0)
        self.model, self.disc, opt_ae, opt_d = accelerator.prepare(model, disc, opt_ae, opt_d)
        self.optimizers = [opt_ae, opt_d]
        consumed = self.resume_step * args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        stream = build_image_stream(self.data, args.seed, accelerator.process_index, accelerator.num_processes,
                                    skip=consumed)
        self.batches = infinite(DataLoader(stream, batch_size=args.batch_size, collate_fn=collate_images))
        self.usage = torch.zeros(model.config.codebook_size, device=accelerator.device)

    def models(self):
        return [self.model, self.disc]

    def next_batch(self):
        return next(self.batches)

    def _adaptive_weight(self, rec_loss, g_loss):
        last = self.accelerator.unwrap_model(self.model).decoder.last_layer.weight
        g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach() * self.disc_weight

    def training_step(self, batch, step):
        acc, args = self.accelerator, self.args
        opt_ae, opt_d = self.optimizers
        x = batch["pixel_values"].to(acc.device)
        with acc.autocast():
            out = self.model(x)
        rec = out.reconstruction.float()
        rec_loss = (rec - x).abs().mean() + F.mse_loss(rec, x)
        loss = rec_loss + out.quantization_loss
        logs = {"rec_loss": rec_loss.item(), "quant_loss": out.quantization_loss.item()}
        adversarial = step >= self.disc_start
        if adversarial:
            # The generator's term goes through the unwrapped discriminator with its weights frozen: no gradient
            # lands on the discriminator (its own update below sees only the hinge loss) and DDP is not involved.
            disc = acc.unwrap_model(self.disc).requires_grad_(False)
            with acc.autocast():
                g_loss = -disc(rec).float().mean()
            disc.requires_grad_(True)
            weight = self._adaptive_weight(rec_loss, g_loss)
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss.item(), adv_weight=weight.item())
        acc.backward(loss)
        if acc.sync_gradients:
            acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], args.max_grad_norm)
        opt_ae.step()
        opt_ae.zero_grad(set_to_none=True)
        if adversarial:
            with acc.autocast():
                d_loss = hinge_d_loss(self.disc(x).float(), self.disc(rec.detach()).float())
            acc.backward(d_loss)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            logs["d_loss"] = d_loss.item()
        self.usage += torch.bincount(out.codes.reshape(-1), minlength=self.usage.numel()).float()
        if (step + 1) % self.revive_every == 0:
            logs["codebook_usage"] = self._revive_dead_codes(x, step)
        logs["psnr"] = (10 * torch.log10(4.0 / F.mse_loss(rec.clamp(-1, 1), x).clamp_min(1e-10))).item()
        return logs

    @torch.no_grad()
    def _revive_dead_codes(self, x, step) -> float:
        """Codes unused since the last check are moved onto random encoder outputs (same choice on every rank)."""
        acc = self.accelerator
        usage = acc.reduce(self.usage, reduction="sum")
        used = (usage > 0).float().mean().item()
        self.usage.zero_()
        if step + 1 > self.revive_until * self.args.max_steps:
            return used
        model = acc.unwrap_model(self.model)
        with acc.autocast():
            z = model.encoder(x).float()
        z = acc.gather(F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, z.shape[1]))  # (B*h*w, d), all ranks
        dead = (usage == 0).nonzero().flatten()
        if len(dead):
            g = torch.Generator().manual_seed(self.args.seed * 7919 + step)
            pick = torch.randint(0, z.shape[0], (len(dead),), generator=g).to(z.device)
            model.quantizer.embedding.weight[dead] = z[pick].to(model.quantizer.embedding.weight.dtype)
        return used

    def save(self, output_dir):
        if self.accelerator.is_main_process:
            save_pretrained_atomic(self.accelerator.unwrap_model(self.model), os.path.join(output_dir, "alignment"))


# ---- codes, computed once --------------------------------------------------------------------------------------


@torch.no_grad()
def precompute_codes(accelerator, alignment_path: str, data: DataArguments, num_images: int, cache_dir: str,
                     seed: int, batch_size: int = 256):
    """Encode `num_images` images with the frozen autoencoder, once; every rank encodes its share, all get all.

    The result is cached in `cache_dir` (codes.safetensors + captions.json, written atomically) and reused.
    """
    codes_file, captions_file = os.path.join(cache_dir, "codes.safetensors"), os.path.join(cache_dir, "captions.json")
    if os.path.exists(codes_file) and os.path.exists(captions_file):
        with open(captions_file) as f:
            return load_file(codes_file)["codes"].long(), json.load(f)
    from accelerate.utils import gather_object

    alignment = DalleAlignmentModel.from_pretrained(alignment_path, dtype=torch.float32).to(accelerator.device).eval()
    per_rank = -(-num_images // accelerator.num_processes)
    stream = build_image_stream(data, seed + 1, accelerator.process_index, accelerator.num_processes)
    codes, captions = [], []
    for batch in DataLoader(stream, batch_size=batch_size, collate_fn=collate_images):
        take = min(batch_size, per_rank - sum(len(c) for c in codes))
        with accelerator.autocast():
            codes.append(alignment.encode(batch["pixel_values"][:take].to(accelerator.device)).cpu())
        captions += batch["text"][:take]
        if sum(len(c) for c in codes) >= per_rank:
            break
    codes = accelerator.gather(torch.cat(codes).to(accelerator.device)).cpu()
    captions = gather_object(captions)
    if accelerator.is_main_process:
        os.makedirs(cache_dir, exist_ok=True)
        save_file({"codes": codes.to(torch.int16 if alignment.config.codebook_size < 2**15 else torch.int32)},
                  codes_file + ".tmp")
        with open(captions_file + ".tmp", "w") as f:
            json.dump(captions, f)
        os.replace(codes_file + ".tmp", codes_file)
        os.replace(captions_file + ".tmp", captions_file)
    accelerator.wait_for_everyone()
    return codes.long(), captions


class CodesDataset(torch.utils.data.Dataset):
    def __init__(self, codes: torch.LongTensor, captions: list[str]):
        self.codes, self.captions = codes, captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.codes[i], self.captions[i]


class CaptionCollator:
    """Tokenizes a batch of (codes, caption); with probability `dropout` a caption becomes "" (for guidance)."""

    def __init__(self, tokenizer, max_length: int, dropout: float = 0.0, negatives=None, seed: int = 0):
        self.tokenizer, self.max_length, self.dropout, self.negatives = tokenizer, max_length, dropout, negatives
        self.rng = random.Random(seed)

    def __call__(self, batch):
        codes = torch.stack([b[0] for b in batch])
        captions = ["" if self.rng.random() < self.dropout else b[1] for b in batch]
        ids, mask = tokenize(self.tokenizer, captions, self.max_length)
        out = {"codes": codes, "input_ids": ids, "attention_mask": mask}
        if self.negatives is not None:
            out["neg_input_ids"], out["neg_attention_mask"] = tokenize(
                self.tokenizer, [self.negatives(b[1], self.rng) for b in batch], self.max_length)
        return out


# ---- 2. decoder -----------------------------------------------------------------------------------------------------


class TextToCodes(nn.Module):
    """Text encoder + image decoder as one module, so DDP/FSDP wrap and sync them together."""

    def __init__(self, text_encoder: DalleTextEncoder, image_decoder: DalleImageDecoder):
        super().__init__()
        self.text_encoder, self.image_decoder = text_encoder, image_decoder

    def forward(self, input_ids, attention_mask, codes):
        states = self.text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state
        return self.image_decoder(codes, states, attention_mask, labels=codes).loss


def decay_groups(module: nn.Module, weight_decay: float):
    """Weight decay on matrices only (not on norms, biases and embeddings' position tables)."""
    decay = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in module.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "embedding" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def backward_and_step(accelerator, loss, optimizer, params, max_grad_norm: float) -> None:
    """The end of every training step: backward, clip `params`' gradients when they sync, step, zero the gradients."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class DecoderStage(Stage):
    name = "decoder"

    def __init__(self, tokenizer, alignment_path: str, data: DataArguments, num_images: int,
                 text_config: DalleTextEncoderConfig | None = None, decoder_config: DalleImageDecoderConfig | None = None,
                 pretrained: str | None = None, caption_dropout: float = 0.1, cache_dir: str | None = None):
        self.tokenizer, self.alignment_path, self.data, self.num_images = tokenizer, alignment_path, data, num_images
        self.text_config, self.decoder_config, self.pretrained = text_config, decoder_config, pretrained
        self.caption_dropout, self.cache_dir = caption_dropout, cache_dir

    def setup(self, accelerator, args):
        self.accelerator, self.args = accelerator, args
        codes, captions = precompute_codes(accelerator, self.alignment_path, self.data, self.num_images,
                                           self.cache_dir or os.path.join(args.output_dir, "codes"), args.seed)
        self.val_codes, self.val_captions = codes[-256:], captions[-256:]  # held back for the binding probe
        codes, captions = codes[:-256], captions[:-256]
        if self.pretrained:
            # float32 master weights even when the pipeline was shipped in bf16
            text_encoder = DalleTextEncoder.from_pretrained(os.path.join(self.pretrained, "text_encoder"),
                                                            dtype=torch.float32)
            decoder = DalleImageDecoder.from_pretrained(os.path.join(self.pretrained, "image_decoder"),
                                                        dtype=torch.float32)
        else:
            text_encoder, decoder = DalleTextEncoder(self.text_config), DalleImageDecoder(self.decoder_config)
        model = TextToCodes(text_encoder, decoder)
        opt = torch.optim.AdamW(decay_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.95))
        # The pooled branch gets no gradient from the next-code loss (the contrastive stage trains it): frozen, so that
        # DDP does not wait for gradients that never come. Frozen after the optimizer is built, whose groups (and so
        # its checkpoints) stay as they were; AdamW skips parameters without a gradient.
        for name, p in text_encoder.named_parameters():
            if name.split(".")[0] in ("pooler", "text_projection"):
                p.requires_grad_(False)
        collate = CaptionCollator(self.tokenizer, text_encoder.config.max_position_embeddings, self.caption_dropout,
                                  seed=args.seed + accelerator.process_index)
        loader = DataLoader(CodesDataset(codes, captions), batch_size=args.batch_size, shuffle=True, drop_last=True,
                            collate_fn=collate)
        self.model, opt, loader = accelerator.prepare(model, opt, loader)
        self.optimizers = [opt]
        self.batches = infinite(loader)

    def models(self):
        return [self.model]

    def next_batch(self):
        return next(self.batches)

    def training_step(self, batch, step):
        acc = self.accelerator
        with acc.autocast():
            loss = self.model(batch["input_ids"], batch["attention_mask"], batch["codes"])
        backward_and_step(acc, loss, self.optimizers[0], self.model.parameters(), self.args.max_grad_norm)
        return {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self, step):
        """Binding probe: does the model prefer each held-back image's true caption to a caption with swapped words?"""
        model = self.accelerator.unwrap_model(self.model).eval()
        swapped = [swap_attributes(t, random.Random(i)) for i, t in enumerate(self.val_captions)]
        keep = [i for i, (t, s) in enumerate(zip(self.val_captions, swapped)) if s != t]
        if not keep:
            model.train()
            return {}
        codes = self.val_codes[keep].to(self.accelerator.device)
        nll = []
        for texts in ([self.val_captions[i] for i in keep], [swapped[i] for i in keep]):
            ids, mask = tokenize(self.tokenizer, texts, model.text_encoder.config.max_position_embeddings)
            ids, mask = ids.to(codes.device), mask.to(codes.device)
            with self.accelerator.autocast():
                states = model.text_encoder(ids, attention_mask=mask).last_hidden_state
                logits = model.image_decoder(codes, states, mask).logits.float()
            nll.append(F.cross_entropy(logits.transpose(1, 2), codes, reduction="none").sum(1))
        model.train()
        gap = nll[1] - nll[0]
        return {"binding_gap_nats": gap.mean().item(), "binding_accuracy": (gap > 0).float().mean().item()}

    def save(self, output_dir):
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            save_pretrained_atomic(model.text_encoder, os.path.join(output_dir, "text_encoder"))
            save_pretrained_atomic(model.image_decoder, os.path.join(output_dir, "image_decoder"))


# ---- 3. contrastive -----------------------------------------------------------------------------------------------


_SWAP_GROUPS = [
    ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"],
    ["circle", "square", "triangle", "diamond"],
    ["circles", "squares", "triangles", "diamonds"],
    ["small", "large"],
    ["two", "three"],
    ["left", "right"],
    ["top", "bottom"],
    ["above", "below"],
]


def swap_attributes(caption: str, rng: random.Random) -> str:
    """A hard negative: swap two different attribute words of one kind (binding), or else change one of them."""
    words = caption.split()
    kinds = [g for g in _SWAP_GROUPS if any(w in g for w in words)]
    rng.shuffle(kinds)
    for group in kinds:  # a swap of any kind first: same words, other binding
        idx = [i for i, w in enumerate(words) if w in group]
        if len({words[i] for i in idx}) >= 2:
            i, j = rng.sample(idx, 2)
            while words[i] == words[j]:
                i, j = rng.sample(idx, 2)
            words[i], words[j] = words[j], words[i]
            return " ".join(words)
    for group in kinds[:1]:  # no kind has two different words: change one word
        i = rng.choice([i for i, w in enumerate(words) if w in group])
        words[i] = rng.choice([w for w in group if w != words[i]])
        return " ".join(words)
    return caption


class ContrastiveModel(nn.Module):
    def __init__(self, text_encoder: DalleTextEncoder, alignment: DalleAlignmentModel):
        super().__init__()
        self.text_encoder, self.alignment = text_encoder, alignment

    def forward(self, input_ids, attention_mask, codes, neg_input_ids=None, neg_attention_mask=None):
        text = self.text_encoder(input_ids, attention_mask=attention_mask).text_embeds
        negative = None
        if neg_input_ids is not None:
            negative = self.text_encoder(neg_input_ids, attention_mask=neg_attention_mask).text_embeds
        return self.alignment.contrastive_loss(text, codes, negative_text_embeds=negative)


class ContrastiveStage(Stage):
    name = "contrastive"

    def __init__(self, tokenizer, alignment_path: str, text_encoder_path: str, data: DataArguments, num_images: int,
                 cache_dir: str, hard_negatives: bool = True):
        self.tokenizer, self.alignment_path, self.text_encoder_path = tokenizer, alignment_path, text_encoder_path
        self.data, self.num_images, self.cache_dir, self.hard_negatives = data, num_images, cache_dir, hard_negatives

    def setup(self, accelerator, args):
        self.accelerator, self.args = accelerator, args
        codes, captions = precompute_codes(accelerator, self.alignment_path, self.data, self.num_images,
                                           self.cache_dir, args.seed)
        alignment = DalleAlignmentModel.from_pretrained(self.alignment_path, dtype=torch.float32)
        text_encoder = DalleTextEncoder.from_pretrained(self.text_encoder_path, dtype=torch.float32)
        for name, p in alignment.named_parameters():  # the autoencoder is frozen: the latent space stays put
            p.requires_grad_(name.split(".")[0] not in ("encoder", "quantizer", "decoder"))
        for name, p in text_encoder.named_parameters():  # only the pooled branch: the decoder's text view stays put
            p.requires_grad_(name.split(".")[0] in ("pooler", "text_projection"))
        model = ContrastiveModel(text_encoder, alignment)
        opt = torch.optim.AdamW(decay_groups(model, args.weight_decay), lr=args.learning_rate)
        negatives = swap_attributes if self.hard_negatives else None
        collate = CaptionCollator(self.tokenizer, text_encoder.config.max_position_embeddings, 0.0, negatives,
                                  seed=args.seed + accelerator.process_index)
        loader = DataLoader(CodesDataset(codes, captions), batch_size=args.batch_size, shuffle=True, drop_last=True,
                            collate_fn=collate)
        self.model, opt, loader = accelerator.prepare(model, opt, loader)
        self.optimizers = [opt]
        self.batches = infinite(loader)

    def models(self):
        return [self.model]

    def next_batch(self):
        return next(self.batches)

    def training_step(self, batch, step):
        acc = self.accelerator
        with acc.autocast():
            loss = self.model(batch["input_ids"], batch["attention_mask"], batch["codes"],
                              batch.get("neg_input_ids"), batch.get("neg_attention_mask"))
        backward_and_step(acc, loss, self.optimizers[0], [p for p in self.model.parameters() if p.requires_grad],
                          self.args.max_grad_norm)
        return {"loss": loss.item()}

    def save(self, output_dir):
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            save_pretrained_atomic(model.alignment, os.path.join(output_dir, "alignment"))
            save_pretrained_atomic(model.text_encoder, os.path.join(output_dir, "text_encoder"))

