"""Text generation from an acttail-export output folder, with the KV cache, streaming the text as it comes.

:func:`generate` encodes the prompt with the folder's tokenizer, runs the prompt once (prefill), then one
token per step with the KV cache until EOS or ``max_new_tokens``. Two backends:

* ``onnxruntime_genai.Model`` when the folder has ``genai_config.json`` (``--base genai`` exports) and
  ``onnxruntime_genai`` imports;
* otherwise a plain ONNX Runtime session from :func:`acttail_export.runtime.create_session` (the op library
  registered), fed by :class:`OrtDecoder`.

Text is detokenized incrementally (:class:`TextStream`), so a word split over several tokens, or a UTF-8
character split over byte tokens, is printed whole.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ActTailError

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
GENAI_CONFIG = "genai_config.json"
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class GenerationResult:
    """Generated text and ids, and how long it took (prefill = the prompt pass that yields the first token)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    steps: int  # tokens computed: the generated ones plus a final EOS
    seconds: float
    prefill_seconds: float
    backend: str
    stopped_at_eos: bool = False

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the one-token steps after the prefill (nan when there were none)."""
        steps, seconds = self.steps - 1, self.seconds - self.prefill_seconds
        return steps / seconds if steps > 0 and seconds > 0 else math.nan

    def stats_line(self) -> str:
        return (f"{len(self.token_ids)} tokens in {self.seconds:.2f} s, {self.decode_tokens_per_s:.1f} tokens/s (decode), "
                f"prompt {self.prompt_tokens} tokens")


class TextStream:
    """Incremental detokenizer: :meth:`push` a token id, get the text it completes (possibly empty)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""  # an incomplete UTF-8 sequence, or a merge that rewrites the tail: wait for more tokens
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:
        """Whatever is still held back (the full decode minus what was returned)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return new


def check_request(prompt: str, max_new_tokens: int, device: str, temperature: float) -> None:
    """One-line :class:`ActTailError` for arguments that can never work (before anything is loaded)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ActTailError("--prompt is empty: pass the text to continue, e.g. --prompt 'The capital of France is'")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ActTailError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if device not in DEVICES:
        raise ActTailError(f"--device must be cpu or cuda, got {device!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ActTailError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")


def check_folder(export_dir: str | Path) -> Path:
    """The export folder, or a one-line error when it is missing or not an acttail-export output folder."""
    from .config import CONFIG_NAME
    from .onnx_export import ONNX_NAME

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ActTailError(f"export folder {export_dir} does not exist: run `acttail-export export --model MODEL {export_dir}` first")
    if not (export_dir / CONFIG_NAME).is_file() or not ((export_dir / ONNX_NAME).is_file() or (export_dir / GENAI_CONFIG).is_file()):
        missing = CONFIG_NAME if not (export_dir / CONFIG_NAME).is_file() else f"{ONNX_NAME} or {GENAI_CONFIG}"
        raise ActTailError(f"{export_dir} is not an acttail-export output folder (no {missing}): "
                           "pass the folder written by `acttail-export export`")
    return export_dir


def load_tokenizer(export_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(export_dir))
    except (OSError, ValueError) as exc:
        raise ActTailError(f"{export_dir} has no usable tokenizer ({str(exc).splitlines()[0]}): re-run the export") from None


def eos_ids(export_dir: Path, tokenizer) -> set[int]:
    """EOS ids from ``generation_config.json`` / ``config.json`` (an int or a list), and the tokenizer's."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((export_dir / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def choose(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Greedy (temperature 0) or a sample from softmax(logits / temperature)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


class OrtDecoder:
    """Prefill + one-token KV-cached steps on a plain ONNX Runtime session of an export (batch 1)."""

    def __init__(self, export_dir: str | Path, device: str = "cpu", session: ort.InferenceSession | None = None) -> None:
        from .runtime import create_session

        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        self.session = session if session is not None else create_session(export_dir, provider)
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.feeds: dict[str, np.ndarray] = {}
        self.length = 0

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits of every position of ``input_ids`` (1-D) with an empty cache; the cache then holds them."""
        from .runtime import decoder_feeds

        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        self.length = 0
        return self._run(decoder_feeds(self.session, ids), ids.shape[1])[0]

    def step(self, token: int) -> np.ndarray:
        """Logits (vocab,) of one new token, attending to the cache."""
        total = self.length + 1
        feeds = {"input_ids": np.array([[token]], dtype=np.int64), "attention_mask": np.ones((1, total), dtype=np.int64),
                 "position_ids": np.array([[total - 1]], dtype=np.int64), **self.feeds}
        return self._run({k: v for k, v in feeds.items() if k in self.inputs}, 1)[0, -1]

    def _run(self, feeds: dict[str, np.ndarray], new: int) -> np.ndarray:
        values = dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        self.feeds = {name.replace("present", "past_key_values", 1): v for name, v in values.items() if name.startswith("present")}
        self.length += new
        return values["logits"]


def _ort_tokens(decoder: OrtDecoder, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                rng: np.random.Generator) -> Iterator[int]:
    token = choose(decoder.forward(np.array(prompt_ids))[-1], temperature, rng)
    yield token
    for _ in range(max_new_tokens - 1):
        token = choose(decoder.step(token), temperature, rng)
        yield token


def _genai_generator(export_dir: Path, prompt_ids: list[int], max_new_tokens: int, device: str, temperature: float,
                     seed: int | None):
    """An ``og.Generator`` ready for the prompt (loaded here, so that loading is not timed as prefill)."""
    import onnxruntime_genai as og

    from .genai_base import genai_config
    from .runtime import check_export_dir

    check_export_dir(export_dir)  # a truncated graph or missing weights: the export's own one-line errors
    filename = json.loads((export_dir / GENAI_CONFIG).read_text())["model"]["decoder"]["filename"]
    try:
        model = og.Model(genai_config(export_dir, filename, device))
    except Exception as exc:  # noqa: BLE001 - og raises plain RuntimeError for a missing provider or a bad folder
        fix = (": install onnxruntime-genai-cuda on a machine with a CUDA GPU, or use --device cpu" if device == "cuda"
               else "")
        raise ActTailError(f"onnxruntime_genai cannot load {export_dir} on {device} ({str(exc).splitlines()[0]}){fix}") from None
    params = og.GeneratorParams(model)
    options = {"max_length": len(prompt_ids) + max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        options.update(temperature=float(temperature), top_k=0, **({} if seed is None else {"random_seed": int(seed)}))
    params.set_search_options(**options)
    gen = og.Generator(model, params)
    return gen


def _genai_tokens(gen, prompt_ids: list[int]) -> Iterator[int]:
    gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32).reshape(1, -1))  # the prefill: timed
    while not gen.is_done():
        gen.generate_next_token()
        yield int(gen.get_next_tokens()[0])


def _use_genai(export_dir: Path) -> bool:
    if not (export_dir / GENAI_CONFIG).is_file():
        return False
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        logger.info("%s has %s but onnxruntime_genai does not import: running it with onnxruntime", export_dir, GENAI_CONFIG)
        return False
    return True


def _prompt_ids(tokenizer, prompt: str, export_dir: Path, max_new_tokens: int, chat: bool) -> tuple[list[int], int]:
    """Prompt token ids (the chat template applied when ``chat``) and ``max_new_tokens`` cut to the context."""
    from .runtime import max_positions

    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ActTailError(f"--chat: the tokenizer in {export_dir} has no chat template; drop --chat")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = [int(i) for i in tokenizer(prompt, add_special_tokens=not chat)["input_ids"]]  # a template writes its own BOS
    if not ids:
        raise ActTailError("--prompt encodes to no tokens: pass some text")
    limit = max_positions(export_dir)
    if limit is not None:
        if len(ids) >= limit:
            raise ActTailError(f"--prompt is {len(ids)} tokens, the model's context is {limit}: shorten the prompt")
        if len(ids) + max_new_tokens > limit:
            logger.warning("stopping after %d new tokens: the context is %d", limit - len(ids), limit)
            max_new_tokens = limit - len(ids)
    return ids, max_new_tokens


def generate(export_dir: str | Path, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, device: str = "cpu",
             temperature: float = 0.0, seed: int | None = None, stream: Callable[[str], None] | None = None,
             stop_at_eos: bool = True, chat: bool = False) -> GenerationResult:
    """Continue ``prompt`` with an export; ``stream(text)`` is called with each completed piece of text.

    ``chat=True`` sends ``prompt`` as one user message through the tokenizer's chat template (instruct models).
    ``stop_at_eos=False`` generates exactly ``max_new_tokens`` tokens (within the context), EOS included.
    """
    check_request(prompt, max_new_tokens, device, temperature)
    export_dir = check_folder(export_dir)
    tokenizer = load_tokenizer(export_dir)
    prompt_ids, max_new_tokens = _prompt_ids(tokenizer, prompt, export_dir, max_new_tokens, chat)
    stop = eos_ids(export_dir, tokenizer) if stop_at_eos else set()
    if _use_genai(export_dir):
        backend = f"onnxruntime-genai/{device}"
        tokens = _genai_tokens(_genai_generator(export_dir, prompt_ids, max_new_tokens, device, temperature, seed), prompt_ids)
    else:
        decoder = OrtDecoder(export_dir, device)  # loads (and checks) before the clock starts
        backend = f"onnxruntime/{decoder.session.get_providers()[0]}"
        tokens = _ort_tokens(decoder, prompt_ids, max_new_tokens, temperature, np.random.default_rng(seed))
    text_stream, out, eos, steps = TextStream(tokenizer), [], False, 0
    start = time.perf_counter()
    prefill = None
    for token in tokens:
        steps += 1
        prefill = time.perf_counter() - start if prefill is None else prefill
        if token in stop:
            eos = True
            break
        out.append(token)
        piece = text_stream.push(token)
        if piece and stream is not None:
            stream(piece)
        if len(out) >= max_new_tokens:
            break
    seconds = time.perf_counter() - start
    rest = text_stream.flush()
    if rest and stream is not None:
        stream(rest)
    return GenerationResult(text_stream.text, out, len(prompt_ids), steps, seconds, prefill or 0.0, backend, eos)
