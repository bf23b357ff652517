"""Upload an export folder to the Hugging Face Hub (``create_repo`` + ``upload_folder``).

The token comes from the argument, ``HF_TOKEN`` or the stored login; it is never printed, logged or
written. A failed push keeps the local export and the error says how to retry.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ActTailError

logger = logging.getLogger(__name__)


def resolve_token(token: str | None) -> str:
    """The token to use (ActTailError naming the fix when there is none)."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise ActTailError("pushing to the Hub needs a token: pass --token, set HF_TOKEN or run `huggingface-cli login`")
    return found


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub accepts it (``huggingface_hub``'s own rules), else a one-line ActTailError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ActTailError(f"invalid Hub repo id {repo_id!r}: use NAME or ORG/NAME (letters, digits, '-', '_', '.'; "
                           f"no '--' or '..'; at most 96 characters), e.g. --push-to-hub me/my-model-acttail") from None
    return repo_id


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload ActTail ONNX export") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (subfolders kept); returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise ActTailError(f"{folder} is not a folder: push an existing export folder")
    check_repo_id(repo_id)
    token = resolve_token(token)
    retry = f"the export is kept in {folder}; retry with `huggingface-cli upload {repo_id} {folder} .`"
    api = HfApi(token=token)
    logger.info("pushing %s to %s/%s", folder, api.endpoint, repo_id)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    except Exception as exc:  # HTTP errors, connection errors, bad responses: all mean "push failed"
        reason = _scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, token)
        raise ActTailError(f"push to {repo_id} failed ({reason}); {retry}") from None
    logger.info("pushed to %s", info.commit_url)
    return str(info.commit_url)
