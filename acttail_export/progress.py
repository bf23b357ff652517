"""Progress bars and warnings of the libraries the pipeline calls (transformers, huggingface_hub).

transformers 5 draws "Loading weights" / "Writing model shards" bars on stderr even when stderr is a file or a pipe,
which would bury the one-line errors of the command line. :func:`library_progress` turns them off for a block
when nobody watches a terminal, and puts them back afterwards. :func:`library_warnings` keeps transformers' own
warnings (tokenizer-class notices and the like) out of a command's output unless ``-v``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def library_progress(enabled: bool) -> Iterator[None]:
    """Inside the block, the progress bars of transformers and huggingface_hub are on when ``enabled``, else off."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as tf_logging

    restore = []
    if tf_logging.is_progress_bar_enabled():
        tf_logging.disable_progress_bar()
        restore.append(tf_logging.enable_progress_bar)
    if not are_progress_bars_disabled():
        disable_progress_bars()
        restore.append(enable_progress_bars)
    try:
        yield
    finally:
        for undo in restore:
            undo()


@contextlib.contextmanager
def library_warnings(enabled: bool) -> Iterator[None]:
    """Inside the block, transformers logs its warnings when ``enabled``, else only its errors."""
    if enabled:
        yield
        return
    from transformers.utils import logging as tf_logging

    before = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(before)
