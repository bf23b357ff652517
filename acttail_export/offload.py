"""Models sharded or offloaded by accelerate (``device_map``, ``max_memory``, CPU / disk offload).

Spectral analysis and calibration must never need the whole model on one device. Two helpers make
the pipeline steps work on such models:

* :func:`projection_weight` yields one projection's weight on its execution device, loading it from
  the CPU / disk offload for the duration of the ``with`` block only (one matrix at a time);
* :func:`input_device` is where token ids go in (the execution device of the embedding).

:func:`load_model_sharded` loads a checkpoint with a device map; :class:`PeakMemory` records peak
host RSS and per-GPU peak memory of a step.
"""

from __future__ import annotations

import contextlib
import logging
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .errors import ActTailError

logger = logging.getLogger(__name__)


def _hook_device(module: torch.nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device if not isinstance(device, int) else f"cuda:{device}") if device is not None else None


def input_device(model: torch.nn.Module) -> torch.device:
    """Device that input ids should be on: the embedding's execution device (CPU when offloaded)."""
    embedding = model.get_input_embeddings()
    device = _hook_device(embedding) or _hook_device(model)
    if device is not None:
        return device
    weight = embedding.weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


@contextlib.contextmanager
def projection_weight(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The module's weight, materialized on its execution device while the block runs.

    Plain modules yield ``module.weight``; modules offloaded by accelerate (weights on ``meta``)
    are loaded by their hook and released again afterwards.
    """
    from accelerate.utils import align_module_device, has_offloaded_params

    if module.weight.device.type == "meta" and not has_offloaded_params(module):
        raise ActTailError(f"weight of {type(module).__name__} is on the meta device without an offload hook: load the model with its weights")
    with align_module_device(module):
        yield module.weight


def load_model_sharded(
    model_ref: str,
    device_map: str | dict = "auto",
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    dtype: str = "fp32",
):
    """(model, tokenizer) dispatched by accelerate; ``max_memory`` like ``{0: "20GiB", "cpu": "60GiB"}``.

    Modules that do not fit go to the CPU, then to ``offload_folder`` on disk.
    """
    from transformers import AutoModelForCausalLM

    from .modeling import _torch_dtype, load_tokenizer, resolve_model_ref

    folder = resolve_model_ref(str(model_ref))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=_torch_dtype(dtype), device_map=device_map, max_memory=max_memory,
            offload_folder=str(offload_folder) if offload_folder is not None else None,
        )
    except ValueError as exc:
        raise ActTailError(f"cannot shard {model_ref} with device_map={device_map!r}: {str(exc).splitlines()[0]}") from None
    model.eval()
    logger.info("device map: %s", getattr(model, "hf_device_map", None))
    return model, load_tokenizer(model_ref)


@dataclass
class PeakMemory:
    """Peak host RSS (whole process, since start) and per-GPU peak allocated memory of a block."""

    host_rss_mib: float = 0.0
    gpu_peak_mib: dict[str, float] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def measure(cls) -> Iterator["PeakMemory"]:
        result = cls()
        gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else range(0)
        # PyTorch's allocator statistics exist only once CUDA is initialized (before that, resetting them raises
        # "Invalid device argument"); a block that initializes CUDA itself starts from zero anyway
        if torch.cuda.is_initialized():
            for i in gpus:
                torch.cuda.reset_peak_memory_stats(i)
        yield result
        result.host_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_initialized():
            result.gpu_peak_mib = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) / 2**20 for i in gpus}

    @classmethod
    @contextlib.contextmanager
    def sampled(cls, interval: float = 0.02) -> Iterator["PeakMemory"]:
        """Like :meth:`measure`, but the host figure is the peak RSS *during* the block (sampled
        every ``interval`` seconds by a thread), so consecutive steps of one process each get their own."""
        import threading

        import psutil

        process, stop = psutil.Process(), threading.Event()
        peak = [process.memory_info().rss]

        def sample() -> None:
            while not stop.wait(interval):
                peak[0] = max(peak[0], process.memory_info().rss)

        thread = threading.Thread(target=sample, name="acttail-rss", daemon=True)
        thread.start()
        try:
            with cls.measure() as result:
                yield result
        finally:
            stop.set()
            thread.join()
        result.host_rss_mib = max(peak[0], process.memory_info().rss) / 2**20
