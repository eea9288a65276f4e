"""Fine-tuning: LoRA adapters (save / load / merge equal the in-memory adapter), new words as new tokens, the
`dalle-hf finetune` command on a tiny imagefolder, and the heart extension of ShapesWorld used by the demo."""

import json

import numpy as np
import pytest
import torch

from dalle_hf import DallePipeline
from dalle_hf.cli import main as cli
from dalle_hf.data import export_imagefolder
from dalle_hf.data.extension import (
    NEW_SHAPE,
    ExtensionWorld,
    caption_for_extended,
    detect_extended,
    draw_new_spec,
    export_extension_imagefolder,
    new_shape_prompts,
    realise_extended,
    render_extended,
)
from dalle_hf.evaluation import detect
from dalle_hf.evaluation.benchmark import matches
from dalle_hf.lora import (
    LORA_TARGET_MODULES,
    active_adapters,
    add_lora,
    add_new_words,
    load_lora,
    merge_lora,
    save_lora,
    unload_lora,
)
from dalle_hf.testing import get_tiny_pipeline

PROMPTS = ["two red hearts", "a blue square", "a small green heart in the center"]


def gens():
    return [torch.Generator().manual_seed(s) for s in (7, 8, 9)]


def codes(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, generator=gens(), output_type="codes").images


@torch.no_grad()
def logits(pipe):
    ids = pipe.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    states = pipe.text_encoder(ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    grid = torch.arange(pipe.num_codes)[None].expand(len(PROMPTS), -1) % pipe.image_decoder.config.vocab_size
    return pipe.image_decoder(grid, states, ids["attention_mask"]).logits


def randomise_trainable_tokens(peft_model):
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))


# ---- new words ------------------------------------------------------------------------------------------------------


def test_new_words_are_whole_word_tokens_and_leave_old_prompts_alone():
    pipe = get_tiny_pipeline()
    old = ["a small red circle in the top left", "two large blue squares", "heartless hearth"]
    before = [pipe.tokenizer(p)["input_ids"] for p in old]
    assert pipe.unknown_words("a red heart") == ["heart"]
    emb_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = add_new_words(pipe, ["heart", "hearts", "circle"])  # "circle" is known: not added
    assert len(ids) == 2 and ids == [len(pipe.tokenizer) - 2, len(pipe.tokenizer) - 1]
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert [pipe.tokenizer(p)["input_ids"] for p in old] == before  # "heartless", "hearth" still fall apart
    assert pipe.unknown_words("two red hearts and a heart") == []
    assert pipe.tokenizer.tokenize("two red hearts") == ["two", "red", "hearts"]
    emb = pipe.text_encoder.get_input_embeddings().weight.detach()
    torch.testing.assert_close(emb[: emb_before.shape[0]], emb_before)  # old rows untouched
    pieces = pipe.tokenizer("heart", add_special_tokens=False)["input_ids"]
    assert pieces == [ids[0]]


# ---- LoRA: save, load, merge ------------------------------------------------------------------------------------------


def test_lora_save_load_merge_reproduce_the_in_memory_adapter(tmp_path):
    get_tiny_pipeline().save_pretrained(tmp_path / "base")
    pipe = DallePipeline.from_pretrained(tmp_path / "base")
    base_codes = codes(pipe)
    ids = add_new_words(pipe, ["heart", "hearts"])
    add_lora(pipe, "image_decoder", rank=4, init_lora_weights=False)  # random, non-zero LoRA
    text = add_lora(pipe, "text_encoder", rank=2, new_token_ids=ids, init_lora_weights=False)
    randomise_trainable_tokens(text)
    targeted = {n.split(".")[-1] for n, m in pipe.image_decoder.named_modules() if hasattr(m, "lora_A")}
    assert targeted == set(LORA_TARGET_MODULES)
    assert not any("pooler" in n for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A"))
    assert type(pipe.image_decoder).__name__ == "DalleImageDecoder"  # the pipeline keeps its own module
    expected_codes, expected_logits = codes(pipe), logits(pipe)
    assert not torch.equal(expected_codes, base_codes)
    with pytest.raises(ValueError, match="unmerged adapters"):
        pipe.save_pretrained(tmp_path / "not-merged")

    save_lora(pipe, tmp_path / "adapter", base_model="tiny")
    info = json.loads((tmp_path / "adapter" / "dalle_hf_adapter.json").read_text())
    assert info["added_tokens"] == ["heart", "hearts"] and info["components"] == ["image_decoder", "text_encoder"]
    size = sum(p.stat().st_size for p in (tmp_path / "adapter").rglob("*.safetensors"))
    assert size < sum(p.numel() * 4 for p in pipe.image_decoder.parameters()) / 2  # the adapter alone is small
    unload_lora(pipe)
    assert not active_adapters(pipe) and not any(hasattr(m, "lora_A") for m in pipe.image_decoder.modules())

    plain = DallePipeline.from_pretrained(tmp_path / "base")  # a user's copy of the base model
    assert plain.unknown_words("two red hearts") == ["hearts"]
    load_lora(plain, tmp_path / "adapter")
    assert set(active_adapters(plain)) == {"image_decoder", "text_encoder"}
    assert plain.unknown_words("two red hearts") == []
    assert torch.equal(codes(plain), expected_codes)
    torch.testing.assert_close(logits(plain), expected_logits)

    merge_lora(plain)
    assert not active_adapters(plain)
    assert not any(hasattr(m, "lora_A") for m in plain.image_decoder.modules())
    assert type(plain.text_encoder.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(codes(plain), expected_codes)
    torch.testing.assert_close(logits(plain), expected_logits, rtol=1e-5, atol=1e-5)

    plain.save_pretrained(tmp_path / "merged")
    reloaded = DallePipeline.from_pretrained(tmp_path / "merged")
    assert reloaded.unknown_words("two red hearts") == []
    assert torch.equal(codes(reloaded), expected_codes)


# ---- the command ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    base = get_tiny_pipeline()
    base.save_pretrained(root / "base")
    data = export_imagefolder(root / "data", 12)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for row in rows[:4]:
        row["text"] = "a red heart"
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_finetune_lora_writes_a_loadable_pipeline_and_an_adapter(tiny_setup):
    root, out = tiny_setup, tiny_setup / "out-lora"
    assert cli(["finetune", "--pretrained", str(root / "base"), "--train-data-dir", str(root / "data"),
                "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4", "--lora-rank", "4",
                "--learning-rate", "1e-2", "--save-every", "2", "--log-every", "1", "--no-tracking",
                "--mixed-precision", "no"]) == 0
    assert not (out / "checkpoints").exists() and not (out / "codes").exists()
    tuned = DallePipeline.from_pretrained(out)
    assert tuned.unknown_words("a red heart") == []
    info = json.loads((out / "adapter" / "dalle_hf_adapter.json").read_text())
    assert info["added_tokens"] == ["heart"] and info["base_model"] == str(root / "base")
    assert (out / "adapter" / "image_decoder" / "adapter_model.safetensors").is_file()

    base = DallePipeline.from_pretrained(root / "base")
    assert not torch.equal(base.image_decoder.lm_head.weight, tuned.image_decoder.lm_head.weight) or not all(
        torch.equal(a, b) for a, b in zip(base.image_decoder.parameters(), tuned.image_decoder.parameters()))
    load_lora(base, out / "adapter")
    torch.testing.assert_close(logits(base), logits(tuned), rtol=1e-4, atol=1e-5)
    merge_lora(base)
    assert torch.equal(codes(base), codes(tuned))

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "dalle-hf" and "lora" in card.data.tags and "new words: heart" in card.text


def test_full_finetune_trains_only_new_rows_of_the_text_encoder(tiny_setup):
    root, out = tiny_setup, tiny_setup / "out-full"
    assert cli(["finetune", "--pretrained", str(root / "base"), "--train-data-dir", str(root / "data"),
                "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--lora-rank", "0",
                "--learning-rate", "1e-2", "--no-tracking", "--mixed-precision", "no"]) == 0
    assert not (out / "adapter").exists()
    base, tuned = DallePipeline.from_pretrained(root / "base"), DallePipeline.from_pretrained(out)
    old = base.text_encoder.get_input_embeddings().weight
    new = tuned.text_encoder.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 1
    torch.testing.assert_close(new[: old.shape[0]], old, rtol=0, atol=0)  # old words untouched
    for (name, a), b in zip(base.text_encoder.named_parameters(), tuned.text_encoder.parameters()):
        if "token_embedding" not in name:
            assert torch.equal(a, b), name
    assert not torch.equal(base.image_decoder.lm_head.weight, tuned.image_decoder.lm_head.weight)


def test_finetune_rejects_bad_arguments(tiny_setup):
    with pytest.raises(SystemExit):
        cli(["finetune", "--pretrained", "x", "--output-dir", "y"])  # no data
    with pytest.raises(SystemExit):
        cli(["finetune", "--pretrained", "x", "--train-data-dir", "d", "--dataset-name", "n", "--output-dir", "y"])
    with pytest.raises(SystemExit, match="lora-rank"):
        cli(["finetune", "--pretrained", "x", "--train-data-dir", "d", "--output-dir", "y", "--lora-rank", "-1"])


# ---- distillation against the base model (--distill-weight) ------------------------------------------------------


def distill_stage(root, out, rank=4, weight=0.5, data=None, **kwargs):
    """A set-up FinetuneStage on the tiny imagefolder (whole data set in one batch, no caption dropout)."""
    from dalle_hf.training import DataArguments, TrainingArguments, make_accelerator
    from dalle_hf.training.finetune import FinetuneArguments, FinetuneStage

    stage = FinetuneStage(FinetuneArguments(str(root / "base"), lora_rank=rank, distill_weight=weight,
                                            caption_dropout=0.0, **kwargs),
                          DataArguments(train_data_dir=str(data or root / "data")))
    stage.setup(make_accelerator("no", log_with=None),
                TrainingArguments(output_dir=str(out), max_steps=2, batch_size=12, learning_rate=1e-2, warmup_steps=0))
    return stage


@pytest.mark.parametrize("rank", [4, 0], ids=["lora", "full"])
def test_distillation_is_zero_for_the_base_itself_and_grows_as_the_model_moves(tiny_setup, tmp_path, rank):
    import torch.nn.functional as F

    stage = distill_stage(tiny_setup, tmp_path, rank=rank, weight=0.5)
    assert (stage.base is None) == (rank > 0)  # LoRA: the base is the model with its adapters off
    batch = stage.next_batch()
    replay = batch["replay"]
    assert replay.tolist() == ["heart" not in stage.pipe.tokenizer.decode(ids) for ids in batch["input_ids"]]
    assert replay.sum() == 8  # 4 of the 12 captions are "a red heart"
    with torch.no_grad():
        ce = F.cross_entropy(stage.model(batch["input_ids"], batch["attention_mask"], batch["codes"]).transpose(1, 2),
                             batch["codes"], reduction="none")
    first = stage.training_step(batch, 0)  # fresh LoRA (B = 0) or untouched weights: student == base
    assert first["distill_kl"] == pytest.approx(0.0, abs=1e-6)
    # new-concept samples: ground truth only; replay samples: half ground truth, half the (zero) KL
    expected = (ce[~replay].sum() + 0.5 * ce[replay].sum()) / ce.numel()
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-5)
    second = stage.training_step(batch, 1)
    assert second["distill_kl"] > 1e-4  # the model moved away from the base
    ids, mask, codes = batch["input_ids"][replay], batch["attention_mask"][replay], batch["codes"][replay]
    with torch.no_grad():  # and the base itself did not move
        base = DallePipeline.from_pretrained(tiny_setup / "base")
        states = base.text_encoder(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(stage.base_logits(ids, mask, codes), base.image_decoder(codes, states, mask).logits,
                                   rtol=1e-4, atol=1e-5)
    assert stage.model.training


def test_finetune_with_distillation_writes_a_loadable_pipeline(tiny_setup):
    root, out = tiny_setup, tiny_setup / "out-distill"
    assert cli(["finetune", "--pretrained", str(root / "base"), "--train-data-dir", str(root / "data"),
                "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--lora-rank", "4",
                "--learning-rate", "1e-2", "--distill-weight", "0.5", "--no-tracking", "--mixed-precision", "no"]) == 0
    tuned = DallePipeline.from_pretrained(out)
    assert tuned.unknown_words("a red heart") == []
    base = load_lora(DallePipeline.from_pretrained(root / "base"), out / "adapter")
    torch.testing.assert_close(logits(base), logits(tuned), rtol=1e-4, atol=1e-5)
    assert "weight 0.5 on the replay samples" in (out / "README.md").read_text()


def test_distillation_rejects_bad_values(tiny_setup, tmp_path):
    from dalle_hf.training.finetune import FinetuneArguments

    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"`distill_weight` must be a number in \[0, 1\].*got"):
            FinetuneArguments("x", distill_weight=bad)
    with pytest.raises(SystemExit, match="distill-weight must be in"):
        cli(["finetune", "--pretrained", "x", "--train-data-dir", "d", "--output-dir", "y", "--distill-weight", "2"])
    with pytest.raises(ValueError, match="needs new words"):  # nothing tells new-concept from replay captions
        distill_stage(tiny_setup, tmp_path / "a", add_new_words=False)
    with pytest.raises(ValueError, match="no training caption has the new words"):
        distill_stage(tiny_setup, tmp_path / "b", add_new_words=False, new_words=["star"])
    hearts = export_imagefolder(tmp_path / "hearts", 2)
    (hearts / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": json.loads(line)["file_name"], "text": "a red heart"}) + "\n"
        for line in (hearts / "metadata.jsonl").read_text().splitlines()))
    with pytest.raises(ValueError, match="needs replay samples"):  # only new-concept captions
        distill_stage(tiny_setup, tmp_path / "c", data=hearts)


# ---- the heart extension --------------------------------------------------------------------------------------------


def test_heart_scenes_captions_and_detector(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(40):
        spec = draw_new_spec(rng)
        caption = caption_for_extended(spec)
        assert NEW_SHAPE in caption
        image = render_extended(realise_extended(spec, rng))
        assert matches(spec, detect_extended(image)), caption
    world = ExtensionWorld(seed=1, new_fraction=0.5)
    scenes = [world.scene(i) for i in range(40)]
    assert 5 < sum(NEW_SHAPE in c for _, c in scenes) < 35
    image, caption = world.scene(3)
    assert np.array_equal(image, ExtensionWorld(seed=1).scene(3)[0])
    for image, caption in scenes:  # on ordinary scenes the extended detector agrees with the original one
        if NEW_SHAPE not in caption:
            assert detect_extended(image) == detect(image)
    folder = export_extension_imagefolder(tmp_path / "hearts", 6, seed=2)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all((folder / r["file_name"]).is_file() for r in rows)


def test_new_shape_prompts():
    prompts = new_shape_prompts()
    assert len(prompts) == 32 and len({p["prompt"] for p in prompts}) == 32
    assert [p["id"] for p in prompts] == list(range(32))
    assert {p["category"] for p in prompts} == {"new_single_object", "new_color_shape_size", "new_counting"}
    assert all("heart" in p["prompt"] for p in prompts)
