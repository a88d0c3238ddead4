"""Shared fixtures: the real tiny model and WikiText-2 from ../shared, loaded once per session, and the native
kernels built against SIMDe (their AVX-512 path on any x86-64 CPU)."""

from __future__ import annotations

import copy
import importlib.util
import platform
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
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


@pytest.fixture
def one_thread():
    """stories260k's ops are tiny: on a shared 2-core machine one thread runs them many times faster than two
    (vqmobile/threads.py); the results do not depend on the thread count."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def simde_build(tmp_path_factory) -> Path:
    """`make simde`'s test-only build (native/Makefile) in a temporary folder: libvqmobile.so and vqm_test whose
    AVX-512 path runs through SIMDe, so its bit-exactness tests run on CPUs without AVX-512 too."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the AVX-512 path exists on x86-64 only")
    if not Path("/usr/include/simde/x86/avx512.h").is_file():
        pytest.fail("SIMDe headers are missing: install Debian's libsimde-dev (.ci/setup does)")
    build = tmp_path_factory.mktemp("simde")
    subprocess.run(["make", "-s", "-j2", "-C", str(ROOT / "native"), f"SIMDE_BUILD={build}", "simde"], check=True,
                   capture_output=True, text=True, timeout=900)
    return build


@pytest.fixture(scope="session")
def simde_library(simde_build):
    """(ffi, lib) of the SIMDe build, with the same declarations as vqmobile._native (derived from vqmobile.h)."""
    from cffi import FFI

    spec = importlib.util.spec_from_file_location("vqm_ffibuild", ROOT / "native" / "ffibuild.py")
    ffibuild = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ffibuild)
    ffi = FFI()
    ffi.cdef(ffibuild.CDEF)
    return ffi, ffi.dlopen(str(simde_build / "libvqmobile.so"))
