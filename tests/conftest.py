"""Shared fixtures for the edgelab tests.

Everything here is small on purpose: the tests run on a 2-core CPU, so models are the `tiny`
architecture with random weights, images are a few dozen pixels, and scenes are few.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from edgelab import models  # noqa: E402


def run_cli(*args: str) -> tuple[int, str, str]:
    """`python -m edgelab.cli ARGS` in a fresh process: (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "edgelab.cli", *args], capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="session")
def tiny_random() -> torch.nn.Module:
    """The tiny SAM with (seeded) random weights; shared, so tests must not modify it."""
    torch.manual_seed(0)
    return models.load_sam("tiny", weights="random")


@pytest.fixture(scope="session")
def tiny_state(tiny_random) -> dict[str, torch.Tensor]:
    """A cloned state dict of `tiny_random` (safe to mutate per test after a dict() copy)."""
    return {k: v.detach().clone() for k, v in tiny_random.state_dict().items()}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_state) -> Path:
    """A valid tiny checkpoint file: torch.save of a plain state dict."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_random.pt"
    torch.save(tiny_state, path)
    return path


def _save_image(path: Path, spec) -> None:
    """Write one file described by `spec`: a PIL image, an array, raw bytes or text."""
    if isinstance(spec, Image.Image):
        spec.save(path)
    elif isinstance(spec, np.ndarray):
        Image.fromarray(spec).save(path)
    elif isinstance(spec, bytes):
        path.write_bytes(spec)
    elif isinstance(spec, str):
        path.write_text(spec)
    else:
        raise TypeError(f"cannot write {type(spec).__name__} to {path}")


@pytest.fixture
def make_image_folder(tmp_path) -> Callable[..., Path]:
    """Factory: make_image_folder({"a.png": array_or_PIL_or_bytes_or_text, ...}) -> a new folder.

    Each call makes a fresh sub-folder of the test's tmp_path; `name=` picks its name.
    """
    counter = iter(range(1_000_000))

    def make(files: dict[str, object], name: str | None = None) -> Path:
        folder = tmp_path / (name or f"images{next(counter)}")
        folder.mkdir(parents=True)
        for fname, spec in files.items():
            _save_image(folder / fname, spec)
        return folder

    return make


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


NBVAL_OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(session, config, items):
    """The browser and Binder checks run last, so that their installs, which bootstrap.py started
    in the background (tests/prepare.py), overlap the other tests.

    nbval's notebook cells also get 60 s, not nbval's fixed 5 s, for each output after a cell's
    reply: on a busy 2-core machine a finished training cell of notebook 04 once went over it.
    """
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = max(item.output_timeout, NBVAL_OUTPUT_TIMEOUT_S)
    import prepare  # tests/ is on sys.path (pytest puts a conftest folder there)
    slow = [i for i in items if getattr(i, "module", None) and i.module.__name__.split(".")[-1] in prepare.SLOW]
    items[:] = [i for i in items if i not in slow] + slow

