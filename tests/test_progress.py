"""acttail_export.progress: the libraries' bars and warnings off inside the block when nobody watches, as before after."""

from __future__ import annotations

import pytest
from huggingface_hub.utils import are_progress_bars_disabled
from transformers.utils import logging as tf_logging

from acttail_export.progress import library_progress, library_warnings


def test_library_progress_turns_the_bars_off_and_back_on():
    assert tf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with library_progress(False):
        assert not tf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    assert tf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with library_progress(True):
        assert tf_logging.is_progress_bar_enabled()


def test_library_progress_restores_after_an_error():
    with pytest.raises(RuntimeError), library_progress(False):
        raise RuntimeError("export failed")
    assert tf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()


def test_library_warnings_keeps_only_errors_then_restores():
    before = tf_logging.get_verbosity()
    with library_warnings(False):
        assert tf_logging.get_verbosity() == tf_logging.ERROR
    assert tf_logging.get_verbosity() == before
    with library_warnings(True):
        assert tf_logging.get_verbosity() == before
