"""The Hub: self-contained export (loads without dalle_hf), loading by repo id from an offline cache, one-commit pushes
with a model card, float32 loading of bf16 checkpoints. No network: uploads are captured by patching HfApi."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from dalle_hf import DallePipeline
from dalle_hf import hub
from dalle_hf.testing import get_tiny_pipeline

PROMPTS = ["a red circle", "two blue squares", "a small green triangle at the top"]
SEEDS = (3, 4, 5)


def gens():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def images(pipe, output_type="np"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, generator=gens(), output_type=output_type).images


@pytest.fixture(scope="module")
def pipe():
    return get_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def reference(pipe):
    return images(pipe)


@pytest.fixture(scope="module")
def folders(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    pipe.save_pretrained(root / "package")
    pipe.save_pretrained(root / "standalone", self_contained=True, model_card={"repo_id": "me/tiny"})
    return root


def files_of(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


# ---- exported code -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", sorted(hub.EXPORTED_COMPONENTS))
def test_component_source_is_one_standalone_file(component):
    name, source = hub.component_source(component)
    assert name == f"modeling_dalle_{component}"
    assert not re.search(r"^\s*(from|import)\s+(\.|dalle_hf)", source, flags=re.MULTILINE)
    assert source.index("from __future__ import annotations") < source.index("class ")
    assert "class SelfAttention" in source or "class EncoderBlock" in source  # layers.py inlined
    namespace = {}
    exec(compile(source, name, "exec"), namespace)  # defines the config and model classes without dalle_hf
    _, _, class_name, config_name = hub.EXPORTED_COMPONENTS[component]
    assert namespace[class_name].config_class is namespace[config_name]


def test_pipeline_source_is_standalone():
    source = hub.pipeline_source()
    assert not re.search(r"^\s*(from|import)\s+(\.|dalle_hf)", source, flags=re.MULTILINE)
    assert "resolve_pretrained" not in source and "def unknown_words" in source
    assert "def from_pretrained" not in source and "def push_to_hub" not in source  # package-only methods left out
    namespace = {}
    exec(compile(source, "pipeline.py", "exec"), namespace)
    assert namespace["DallePipeline"].__call__.__doc__


# ---- the two folder formats ------------------------------------------------------------------------------------------


def test_default_save_is_package_format_and_self_contained_is_opt_in(folders):
    index = json.loads((folders / "package" / "model_index.json").read_text())
    assert index["_class_name"] == "DallePipeline"
    assert index["text_encoder"] == ["dalle_hf.models.text_encoder", "DalleTextEncoder"]
    assert not [f for f in files_of(folders / "package") if f.endswith(".py")]
    assert not hub.is_self_contained(folders / "package")

    index = json.loads((folders / "standalone" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "DallePipeline"]
    assert hub.is_self_contained(folders / "standalone")
    for component, (_, module, class_name, config_name) in hub.EXPORTED_COMPONENTS.items():
        assert index[component] == [module, class_name]
        assert (folders / "standalone" / component / f"{module}.py").is_file()
        config = json.loads((folders / "standalone" / component / "config.json").read_text())
        assert config["auto_map"] == {"AutoConfig": f"{module}.{config_name}", "AutoModel": f"{module}.{class_name}"}
    assert ModelCard.load(folders / "standalone" / "README.md").data.library_name == "dalle-hf"


@pytest.mark.parametrize("fmt", ["package", "standalone"])
def test_both_formats_load_with_dalle_pipeline(folders, reference, fmt):
    loaded = DallePipeline.from_pretrained(folders / fmt)
    assert type(loaded.text_encoder).__module__ == "dalle_hf.models.text_encoder"  # the package's classes
    np.testing.assert_array_equal(images(loaded), reference)


def test_bf16_checkpoint_loads_as_float32_unless_asked(tmp_path):
    pipe = get_tiny_pipeline(seed=2)
    pipe.to(dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "bf16")
    loaded = DallePipeline.from_pretrained(tmp_path / "bf16")
    assert {m.dtype for m in (loaded.text_encoder, loaded.image_decoder, loaded.alignment)} == {torch.float32}
    kept = DallePipeline.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert kept.image_decoder.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.image_decoder.lm_head.weight, kept.image_decoder.lm_head.weight.float())


# ---- without dalle_hf ------------------------------------------------------------------------------------------------

FRESH_PROCESS = r"""
import sys

class HideDalleHf:  # the editable install puts dalle_hf on the path even with -I: refuse it explicitly
    def find_spec(self, name, path=None, target=None):
        if name == "dalle_hf" or name.startswith("dalle_hf."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, HideDalleHf())
try:
    import dalle_hf  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("dalle_hf is importable")

import numpy as np
import torch
from diffusers import DiffusionPipeline
from transformers import AutoModel

folder, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
prompts, seeds = PROMPTS, SEEDS
images = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
text_encoder = AutoModel.from_pretrained(folder + "/text_encoder", trust_remote_code=True)
ids = torch.tensor([[1, 5, 6, 7, 2]])
states = text_encoder(ids, attention_mask=torch.ones_like(ids)).last_hidden_state.detach().numpy()
decoder = AutoModel.from_pretrained(folder + "/image_decoder", trust_remote_code=True)
np.savez(out, images=images, states=states, pipeline=type(pipe).__module__, encoder=type(text_encoder).__module__,
         decoder=type(decoder).__name__, loaded=[m for m in sys.modules if m.startswith("dalle_hf")])
"""


def test_self_contained_folder_loads_in_a_fresh_process_without_dalle_hf(folders, reference, pipe, tmp_path):
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS.replace("PROMPTS, SEEDS", f"{PROMPTS!r}, {SEEDS!r}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", str(script), str(folders / "standalone"), str(tmp_path / "out.npz")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    assert not out["loaded"].size, f"dalle_hf modules were imported: {out['loaded']}"
    assert "dalle_hf" not in str(out["pipeline"]) and "dalle_hf" not in str(out["encoder"])
    assert str(out["decoder"]) == "DalleImageDecoder"
    np.testing.assert_array_equal(out["images"], reference)  # the same images as dalle_hf draws
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    with torch.no_grad():
        states = pipe.text_encoder(ids, attention_mask=torch.ones_like(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(out["states"], states, rtol=0, atol=1e-6)


# ---- loading by repo id ----------------------------------------------------------------------------------------------


def test_repo_id_loads_from_an_offline_hf_cache_honouring_revision(folders, reference, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    hub.populate_hf_cache(cache, "org/tiny", folders / "standalone")
    other, other_pipe = tmp_path / "other", get_tiny_pipeline(seed=1)
    other_pipe.save_pretrained(other)
    hub.populate_hf_cache(cache, "org/tiny", other, revision="v1")
    repo = cache / "models--org--tiny"
    assert (repo / "refs" / "main").is_file() and (repo / "blobs").is_dir()
    assert all(p.is_symlink() for p in (repo / "snapshots").rglob("*.safetensors"))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = DallePipeline.from_pretrained("org/tiny", cache_dir=str(cache))
    np.testing.assert_array_equal(images(loaded), reference)
    assert loaded.name_or_path == "org/tiny"
    v1 = DallePipeline.from_pretrained("org/tiny", cache_dir=str(cache), revision="v1")
    np.testing.assert_array_equal(images(v1), images(other_pipe))
    commit = (repo / "refs" / "v1").read_text()
    by_commit = DallePipeline.from_pretrained("org/tiny", cache_dir=str(cache), revision=commit)
    torch.testing.assert_close(by_commit.image_decoder.lm_head.weight, v1.image_decoder.lm_head.weight)
    with pytest.raises(Exception, match="(?i)offline|cache|not found|local"):
        DallePipeline.from_pretrained("org/missing", cache_dir=str(cache))


def test_local_files_only_without_the_env_variable(folders, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "cache"
    hub.populate_hf_cache(cache, "org/tiny", folders / "package")
    loaded = DallePipeline.from_pretrained("org/tiny", cache_dir=str(cache), local_files_only=True)
    assert loaded.tokenizer is not None
    with pytest.raises(ValueError, match="neither a local folder nor a Hub repo id"):
        DallePipeline.from_pretrained("./no/such/folder/here")


# ---- pushing: one commit ---------------------------------------------------------------------------------------------


class FakeHub:
    """Records create_repo / create_commit calls; keeps each commit's files (the push's temp folder is deleted)."""

    def __init__(self, monkeypatch):
        self.repos, self.commits = [], []
        hub_self = self

        def create_repo(api, repo_id, **kwargs):
            hub_self.repos.append((repo_id, kwargs))

            class Url(str):
                pass

            url = Url(f"https://huggingface.co/{repo_id}")
            url.repo_id = repo_id
            return url

        def create_commit(api, repo_id, operations, commit_message=None, **kwargs):
            files = {}
            for op in operations:
                src = op.path_or_fileobj
                files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, (str, Path)) else src
            hub_self.commits.append({"repo_id": repo_id, "files": files, "message": commit_message, **kwargs})
            return {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"}

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "create_branch", lambda api, *a, **k: None)

    def checkout(self, commit, folder):
        for path, data in commit["files"].items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        return folder


def test_push_to_hub_sends_one_commit_with_a_complete_repo(pipe, reference, tmp_path, monkeypatch):
    fake = FakeHub(monkeypatch)
    pipe.push_to_hub("me/tiny-shapes", private=True, model_card={
        "base_model": "dalle-hf/shapes", "datasets": ["me/my-shapes"], "tags": ["lora"], "license": "mit",
        "eval_table": "| category | accuracy |\n| --- | ---: |\n| overall | 12.5% |"})
    assert [r[0] for r in fake.repos] == ["me/tiny-shapes"] and fake.repos[0][1]["private"] is True
    assert len(fake.commits) == 1
    files = set(fake.commits[0]["files"])
    expected = {"model_index.json", "pipeline.py", "README.md", "tokenizer/tokenizer.json",
                "tokenizer/tokenizer_config.json"}
    for component, (_, module, _, _) in hub.EXPORTED_COMPONENTS.items():
        expected |= {f"{component}/config.json", f"{component}/model.safetensors", f"{component}/{module}.py"}
    assert files == expected

    card = ModelCard(fake.commits[0]["files"]["README.md"].decode())
    assert card.data.library_name == "dalle-hf" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == "dalle-hf/shapes" and card.data.datasets == ["me/my-shapes"]
    assert card.data.license == "mit" and {"dalle-hf", "text-to-image", "lora", "fine-tuned"} <= set(card.data.tags)
    assert "12.5%" in card.text and 'DallePipeline.from_pretrained("me/tiny-shapes")' in card.text

    # What was pushed is a correct repo: served back from a cache it loads by repo id and draws the same images.
    repo = fake.checkout(fake.commits[0], tmp_path / "repo")
    cache = tmp_path / "cache"
    hub.populate_hf_cache(cache, "me/tiny-shapes", repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    np.testing.assert_array_equal(images(DallePipeline.from_pretrained("me/tiny-shapes", cache_dir=str(cache))),
                                  reference)


def test_push_component_and_extra_folders(pipe, tmp_path, monkeypatch):
    fake = FakeHub(monkeypatch)
    hub.push_component_to_hub(pipe.text_encoder, "me/tiny-text-encoder", tokenizer=pipe.tokenizer)
    files = fake.commits[0]["files"]
    assert set(files) == {"config.json", "model.safetensors", "modeling_dalle_text_encoder.py", "README.md",
                          "tokenizer.json", "tokenizer_config.json"}
    assert json.loads(files["config.json"])["auto_map"]["AutoModel"] == "modeling_dalle_text_encoder.DalleTextEncoder"
    assert "text_encoder" in ModelCard(files["README.md"].decode()).data.tags

    adapter = tmp_path / "adapter"
    (adapter / "image_decoder").mkdir(parents=True)
    (adapter / "image_decoder" / "adapter_config.json").write_text("{}")
    pipe.push_to_hub("me/tiny-ft", extra_folders={"adapter": str(adapter)})
    assert "adapter/image_decoder/adapter_config.json" in fake.commits[1]["files"]
    assert 'subfolder="adapter"' in fake.commits[1]["files"]["README.md"].decode()


def test_save_pretrained_push_to_hub_flag_pushes_self_contained(pipe, tmp_path, monkeypatch):
    fake = FakeHub(monkeypatch)
    pipe.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/flag")
    assert not hub.is_self_contained(tmp_path / "local")  # the local copy stays in the package format
    assert fake.commits[0]["repo_id"] == "me/flag" and "pipeline.py" in fake.commits[0]["files"]


def test_model_card_template(tmp_path):
    report = {"overall": 0.5, "num_prompts": 4, "categories": {
        "single_object": {"passed": 2, "total": 2, "accuracy": 1.0},
        "relation": {"passed": 0, "total": 2, "accuracy": 0.0}}}
    path = hub.write_model_card(tmp_path, repo_id="org/model", eval_report=report,
                                training={"recipe": "shapes", "hardware": "2 CPU cores"})
    card = ModelCard.load(path)
    assert path.name == "README.md"
    assert card.data.library_name == "dalle-hf" and card.data.pipeline_tag == "text-to-image"
    assert card.data.license == "apache-2.0" and getattr(card.data, "base_model", None) is None
    for text in ("| single_object | 2 | 100.0% |", "**50.0%**", "recipe: shapes", "## Limitations",
                 "trust_remote_code=True", "ShapesWorld"):
        assert text in card.text
    assert "_Not measured yet._" in hub.render_model_card()


# ---- a real Hub-protocol server: olah serving a local git repo (optional: needs .venv-olah) ---------------------------

OLAH = Path(__file__).resolve().parents[1] / ".venv-olah" / "bin" / "olah-cli"

BY_REPO_ID = r"""
import sys
import numpy as np
import torch
from dalle_hf import DallePipeline

repo_id, sha, cache, out = sys.argv[1:5]
pipe = DallePipeline.from_pretrained(repo_id, revision=sha, cache_dir=cache)
pipe.set_progress_bar_config(disable=True)
prompts, seeds = PROMPTS, SEEDS
images = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
np.save(out, images)
"""


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `make test` installs it; only a bare `pytest` outside CI may skip (under CI=true a missing olah fails the test).
@pytest.mark.skipif(not OLAH.exists() and not os.environ.get("CI"),
                    reason="olah is not installed in .venv-olah (`make venv-olah`, see docs/hub.md)")
def test_repo_id_through_an_olah_hub_server(folders, reference, tmp_path):
    """`DallePipeline.from_pretrained(repo_id)` and plain diffusers + trust_remote_code (no dalle_hf) download the
    self-contained repo over the Hub's HTTP protocol from a local server, and draw the same images."""
    import shutil
    import time
    import urllib.request

    repo = tmp_path / "mirrors" / "models" / "org" / "tiny"
    shutil.copytree(folders / "standalone", repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "upload"]):
        subprocess.run(git + cmd, cwd=repo, check=True, capture_output=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                         text=True).stdout.strip()
    port = _free_port()
    (tmp_path / "olah.toml").write_text(textwrap.dedent(f"""
        [basic]
        host = "127.0.0.1"
        port = {port}
        mirrors-path = ["{tmp_path / 'mirrors'}"]
        repos-path = "{tmp_path / 'olah-repos'}"
        [accessibility]
        offline = true
        """))
    server = subprocess.Popen([str(OLAH), "-c", str(tmp_path / "olah.toml")], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/api/models/org/tiny/revision/{sha}", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
        env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
        script = tmp_path / "by_repo_id.py"
        script.write_text(BY_REPO_ID.replace("PROMPTS, SEEDS", f"{PROMPTS!r}, {SEEDS!r}"))
        result = subprocess.run([sys.executable, str(script), "org/tiny", sha, str(tmp_path / "c1"),
                                 str(tmp_path / "a.npy")], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), reference)

        fresh = FRESH_PROCESS.replace("PROMPTS, SEEDS", f"{PROMPTS!r}, {SEEDS!r}").replace(
            "folder, out = sys.argv[1], sys.argv[2]",
            "from huggingface_hub import snapshot_download\n"
            "repo_id, sha, cache, out = sys.argv[1:5]\n"
            "pipe = DiffusionPipeline.from_pretrained(repo_id, revision=sha, cache_dir=cache, trust_remote_code=True)\n"
            "folder = snapshot_download(repo_id, revision=sha, cache_dir=cache)")
        script = tmp_path / "plain_diffusers.py"
        script.write_text(fresh.replace("pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)\n", ""))
        result = subprocess.run([sys.executable, "-I", str(script), "org/tiny", sha, str(tmp_path / "c2"),
                                 str(tmp_path / "b.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        out = np.load(tmp_path / "b.npz")
        assert not out["loaded"].size and "dalle_hf" not in str(out["pipeline"])
        np.testing.assert_array_equal(out["images"], reference)
    finally:
        server.terminate()
        server.wait(timeout=30)
