"""The folder / `datasets` training-data path (dalle_hf/data/folder.py). Tiny images, all made in tmp_path."""

import io
import itertools
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_hf.data.folder import ImageTextDataset, build_train_dataset, collate

R = 8


def write_folder(root, images, captions=None, column="text"):
    """images: {file_name: PIL image | bytes | None (not written)}; captions default to 'Caption  <i>'."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (name, image) in enumerate(images.items()):
            if isinstance(image, Image.Image):
                image.save(root / name)
            elif isinstance(image, bytes):
                (root / name).write_bytes(image)
            caption = captions[i] if captions is not None else f"Caption  {i}"
            f.write(json.dumps({"file_name": name, column: caption}) + "\n")
    return root


def solid(i, size=(12, 10)):
    return Image.new("RGB", size, (20 * i % 256, 100, 200))


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def texts(ds, n=None):
    return [ex["text"] for ex in (ds if n is None else itertools.islice(ds, n))]


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "imgs", {f"{i}.png": solid(i) for i in range(10)})


def test_folder_yields_normalized_examples(folder):
    ds = build_train_dataset(train_data_dir=folder, resolution=R, infinite=False)
    examples = list(ds)
    assert len(examples) == 10 and ds.num_rows == 10 and ds.num_skipped == 0
    for ex in examples:
        assert ex["pixel_values"].shape == (3, R, R) and ex["pixel_values"].dtype == torch.float32
        assert ex["pixel_values"].min() >= -1 and ex["pixel_values"].max() <= 1
    assert sorted(texts(examples)) == sorted(f"caption {i}" for i in range(10))  # lower-cased, one space
    # colour survives: (20*i, 100, 200) -> [-1, 1]
    ex = next(e for e in examples if e["text"] == "caption 3")
    expected = torch.tensor([60, 100, 200]) / 127.5 - 1
    assert torch.allclose(ex["pixel_values"].mean(dim=(1, 2)), expected, atol=1e-3)

    batch = collate(examples[:4])
    assert batch["pixel_values"].shape == (4, 3, R, R) and batch["text"] == texts(examples[:4])

    raw = ImageTextDataset(folder, resolution=R, infinite=False, normalize_captions=False)
    assert sorted(texts(raw)) == sorted(f"Caption  {i}" for i in range(10))


@pytest.mark.parametrize("size", [(60, 20), (20, 60)])
def test_resize_short_side_and_centre_crop(tmp_path, size):
    # thirds along the long side: red | green | blue; the centre crop must be the green third only
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    third = max(w, h) // 3
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        if w > h:
            arr[:, k * third:(k + 1) * third] = colour
        else:
            arr[k * third:(k + 1) * third, :] = colour
    root = write_folder(tmp_path / "d", {"wide.png": Image.fromarray(arr)})
    (ex,) = list(ImageTextDataset(root, resolution=R, infinite=False))
    px = ex["pixel_values"]
    assert px.shape == (3, R, R)
    if h > w:
        px = px.transpose(1, 2)  # long axis last
    green = torch.tensor([-1.0, 1, -1])[:, None, None]
    assert torch.allclose(px[:, :, 1:-1], green.expand(3, R, R - 2), atol=0.02)  # the middle third only
    assert torch.allclose(px, green.expand(3, R, R), atol=0.3)  # a little filter bleed in the border pixels
    # and the crop is centred: the bleed of red on one side equals that of blue on the other
    assert torch.allclose(px[0, :, 0], px[2, :, -1], atol=1e-3)


def test_downscale_is_antialiased(tmp_path):
    # a 1-pixel checkerboard must average to grey, not alias to black or white
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    root = write_folder(tmp_path / "d", {"c.png": Image.fromarray(checker, mode="L")})
    (ex,) = list(ImageTextDataset(root, resolution=R, infinite=False))
    assert ex["pixel_values"].abs().max() < 0.1


def test_rgba_and_palette_transparency_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, 8:] = (255, 0, 0, 255)  # right half opaque red, left half fully transparent black
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (8, 0, 16, 16))
    palette.info["transparency"] = 0  # index 0 (left half) transparent
    root = write_folder(
        tmp_path / "d",
        {"a.png": Image.fromarray(rgba, mode="RGBA"), "p.png": palette, "la.png": Image.new("LA", (16, 16), (0, 0))},
        captions=["rgba", "palette", "la"],
    )
    out = {ex["text"]: ex["pixel_values"] for ex in ImageTextDataset(root, resolution=16, infinite=False)}
    white = torch.ones(3, 16, 6)
    assert torch.allclose(out["rgba"][:, :, :6], white, atol=1e-3)
    assert torch.allclose(out["rgba"][:, :, 10:], torch.tensor([1.0, -1, -1])[:, None, None].expand(3, 16, 6), atol=1e-3)
    assert torch.allclose(out["palette"][:, :, :6], white, atol=1e-3)
    assert torch.allclose(out["palette"][:, :, 10:], torch.tensor([-1.0, -1, 1])[:, None, None].expand(3, 16, 6), atol=1e-3)
    assert torch.allclose(out["la"], torch.ones(3, 16, 16), atol=1e-3)


def test_bad_images_and_captions_are_skipped_with_counted_warnings(tmp_path, caplog):
    good = png_bytes(solid(1))
    images = {
        "good0.png": solid(0),
        "truncated.png": good[: len(good) // 2],
        "missing.png": None,
        "notes.png": b"this is not an image\n",
        "good1.png": solid(1),
        "nocaption.png": solid(2),
        "blank.png": solid(3),
    }
    root = write_folder(tmp_path / "d", images, captions=["a", "b", "c", "d", "e", None, "  \t "])
    ds = ImageTextDataset(root, resolution=R, seed=1)
    with caplog.at_level(logging.WARNING, logger="dalle_hf.data.folder"):
        got = texts(ds, 6)  # three epochs of the two good images: infinite mode keeps going past the bad ones
    assert sorted(got) == ["a", "a", "a", "e", "e", "e"]
    assert ds.num_skipped == 5
    assert set(ds.skipped) == {1, 2, 3, 5, 6}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5  # each bad row is reported once, not again every epoch
    for name in ["truncated.png", "missing.png", "notes.png", "nocaption.png", "blank.png"]:
        assert any(name in m for m in warnings), name
    assert sorted(int(m.split("(")[-1].split()[0]) for m in warnings) == [1, 2, 3, 4, 5]  # the running count


def test_datasets_source_with_pil_images_and_custom_columns(tmp_path):
    import datasets

    n = 6
    d = datasets.Dataset.from_dict({"picture": [solid(i, (10, 14)) for i in range(n)],
                                    "caption": [f"A  Shape {i}" for i in range(n)], "extra": list(range(n))})
    ds = build_train_dataset(dataset=d, image_column="picture", caption_column="caption", resolution=R,
                             infinite=False)
    examples = list(ds)
    assert sorted(texts(examples)) == sorted(f"a shape {i}" for i in range(n))
    assert all(ex["pixel_values"].shape == (3, R, R) for ex in examples)

    # paths, bytes dicts and raw bytes; a corrupt entry is skipped, not raised (the Image feature is read undecoded)
    solid(0).save(tmp_path / "p.png")
    mixed = datasets.Dataset.from_dict({"img": [str(tmp_path / "p.png"), "nope.png"], "txt": ["path", "gone"]})
    raw = datasets.Dataset.from_dict({"img": [png_bytes(solid(1)), b"garbage"], "txt": ["bytes", "bad"]})
    typed = datasets.Dataset.from_dict({"img": [{"bytes": png_bytes(solid(2)), "path": None},
                                                {"bytes": b"garbage", "path": "x.png"}], "txt": ["dict", "bad"]})
    typed = typed.cast_column("img", datasets.Image())
    for source, want in [(mixed, "path"), (raw, "bytes"), (typed, "dict")]:
        ds = ImageTextDataset(dataset=source, image_column="img", caption_column="txt", resolution=R, infinite=False)
        assert texts(ds) == [want] and ds.num_skipped == 1

    # a list of captions: one is picked per row and epoch
    multi = datasets.Dataset.from_dict({"image": [solid(0)], "text": [["One", "Two"]]})
    assert texts(ImageTextDataset(dataset=multi, resolution=R, infinite=False))[0] in {"one", "two"}


def test_dataset_name_goes_through_load_dataset(folder, tmp_path):
    ds = build_train_dataset(dataset_name=str(folder), resolution=R, infinite=False,
                             load_dataset_kwargs={"cache_dir": str(tmp_path / "cache")})
    assert sorted(texts(ds)) == sorted(f"caption {i}" for i in range(10))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover(folder, world_size):
    for epoch in (0, 1):
        shards = []
        for rank in range(world_size):
            ds = build_train_dataset(train_data_dir=folder, resolution=R, rank=rank, world_size=world_size,
                                     infinite=False, seed=5)
            ds.set_epoch(epoch)
            shards.append(texts(ds))
        seen = [t for shard in shards for t in shard]
        assert len(seen) == len(set(seen)) == 10  # disjoint and covering
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_dataloader_workers_and_ranks_shard(folder):
    seen = []
    for rank in range(2):
        ds = build_train_dataset(train_data_dir=folder, resolution=R, rank=rank, world_size=2, infinite=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate,
                                             multiprocessing_context="fork")
        for batch in loader:
            assert batch["pixel_values"].shape[1:] == (3, R, R)
            seen += batch["text"]
    assert sorted(seen) == sorted(f"caption {i}" for i in range(10))


def test_shuffle_is_seeded_and_changes_per_epoch(folder):
    def order(seed, epoch=0, **kw):
        ds = ImageTextDataset(folder, resolution=R, seed=seed, infinite=False, **kw)
        ds.set_epoch(epoch)
        return texts(ds)

    assert order(3) == order(3)
    assert order(3, epoch=1) == order(3, epoch=1)
    assert order(3) != order(3, epoch=1)
    assert order(3) != order(4)
    assert order(3, shuffle=False) == [f"caption {i}" for i in range(10)]
    # infinite mode cycles epochs 0, 1, 2, ... with the same per-epoch orders
    stream = texts(ImageTextDataset(folder, resolution=R, seed=3), 30)
    assert stream == order(3) + order(3, epoch=1) + order(3, epoch=2)


def test_bad_arguments(tmp_path, folder):
    import datasets

    with pytest.raises(ValueError, match="does not exist"):
        build_train_dataset(train_data_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="metadata.jsonl"):
        build_train_dataset(train_data_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match=r"'caption'.*available columns: \['text'\]"):
        build_train_dataset(train_data_dir=folder, caption_column="caption")
    d = datasets.Dataset.from_dict({"image": [solid(0)], "text": ["x"]})
    with pytest.raises(ValueError, match=r"'img'.*available columns: \['image', 'text'\]"):
        build_train_dataset(dataset=d, image_column="img")
    with pytest.raises(ValueError, match=r"'prompt'.*available columns"):
        build_train_dataset(dataset=d, caption_column="prompt")
    for resolution in (0, -8):
        with pytest.raises(ValueError, match="resolution"):
            build_train_dataset(train_data_dir=folder, resolution=resolution)
    with pytest.raises(ValueError, match="exactly one"):
        build_train_dataset()
    with pytest.raises(ValueError, match="exactly one"):
        build_train_dataset(train_data_dir=folder, dataset=d)
    with pytest.raises(ValueError, match="rank"):
        build_train_dataset(train_data_dir=folder, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split"):
        ImageTextDataset(dataset=datasets.DatasetDict({"validation": d}))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="metadata.jsonl:2"):
        build_train_dataset(train_data_dir=tmp_path / "badjson")


def test_infinite_mode_fails_loudly_instead_of_hanging(tmp_path):
    root = write_folder(tmp_path / "d", {"x.png": b"not an image"})
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(ImageTextDataset(root, resolution=R)))
    root = write_folder(tmp_path / "one", {"x.png": solid(0)})
    with pytest.raises(RuntimeError, match="empty"):
        next(iter(ImageTextDataset(root, resolution=R, rank=1, world_size=2)))
