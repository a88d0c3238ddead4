"""Shared fixtures: the real tiny model and WikiText-2 from ../shared, loaded once per session."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260k"
WIKITEXT = SHARED / "data" / "wikitext2"


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) of stories260k in fp32; tests that modify the model take a deepcopy via fresh_stories."""
    from vqmobile.model import load_model

    loaded = load_model(str(STORIES))
    return loaded


@pytest.fixture
def fresh_stories(stories):
    return copy.deepcopy(stories.model)


@pytest.fixture(scope="session")
def stories_calib(stories):
    from vqmobile.data import calibration_data

    return calibration_data(stories.tokenizer, WIKITEXT / "wiki.valid.tokens", nsamples=16, seqlen=256, seed=0)


@pytest.fixture(scope="session")
def stories_test_ids(stories):
    from vqmobile.data import wikitext_test_ids

    return wikitext_test_ids(stories.tokenizer, WIKITEXT / "wiki.test.raw")
