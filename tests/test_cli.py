"""`dalle-hf generate`: PNG files carrying what reproduces them, and clear errors."""

import json

import pytest
from PIL import Image

from dalle_hf.cli import main
from dalle_hf.testing import save_tiny_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny")))


def test_generate_writes_pngs_with_metadata(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "-n", "2", "-o", str(out), "--model", model_dir, "--seed", "5",
                 "--guidance-scale", "2.0"]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["a-red-circle_seed5.png", "a-red-circle_seed6.png"]
    meta = Image.open(files[1]).text
    assert meta["prompt"] == "a red circle" and meta["seed"] == "6" and meta["model"]
    assert json.loads(meta["settings"])["guidance_scale"] == 2.0
    assert not list(out.glob("*.tmp"))
    # the same seed and settings reproduce the image
    again = tmp_path / "again"
    main(["generate", "a red circle", "-n", "1", "-o", str(again), "--model", model_dir, "--seed", "6",
          "--guidance-scale", "2.0"])
    assert Image.open(again / "a-red-circle_seed6.png").tobytes() == Image.open(files[1]).tobytes()


def test_generate_points_out_unknown_words(model_dir, tmp_path, capsys):
    main(["generate", "a red zebra", "-n", "1", "-o", str(tmp_path), "--model", model_dir])
    assert "'zebra'" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [(["-n", "0"], "num-images"), (["--top-p", "2"], "top_p"),
                                        (["--guidance-scale", "-1"], "guidance_scale")])
def test_generate_bad_arguments(model_dir, tmp_path, args, match):
    with pytest.raises(SystemExit, match=match):
        main(["generate", "a red circle", "-o", str(tmp_path), "--model", model_dir, *args])
