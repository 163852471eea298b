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


@pytest.fixture(autouse=True)
def fresh_hint_tiers():
    """Each test starts with no failed exercise checks, so hint tiers do not depend on test order."""
    from edgelab import checks
    checks.reset_hints()
    yield


@pytest.fixture(scope="session")
def tiny_random() -> torch.nn.Module:
    """The tiny SAM with (seeded) random weights; shared, so tests must not modify it."""
    torch.manual_seed(0)
    return models.load_sam("tiny", weights="random")


@pytest.fixture(scope="session")
def tiny_trained() -> torch.nn.Module:
    """The shipped tiny SAM (trained weights); shared, so tests must not modify it."""
    return models.load_sam("tiny")


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

# Lighter settings for the notebooks' heaviest cells under nbval: fewer fine-tuning steps and
# repeats, smaller random-weight vit_b inputs. Nothing here feeds a `# NBVAL_CHECK_OUTPUT` cell or an
# exercise check (tests/test_notebook_params.py checks the names); on a 2-core AMD EPYC Zen 3 these
# cells took 36 of the 38 minutes of `bootstrap.py test` on a fresh clone.
UNDER_TEST: dict[str, dict[str, object]] = {
    "01_attention_profiling.ipynb": {"image_size": 512, "bf16_size": 256, "scaling_grids": [16, 32]},
    "02_channel_pruning.ipynb": {"finetune_steps": 30, "bench_repeats": 10, "n_sens": 3},
    "03_linear_quantization.ipynb": {"bench_repeats": 3, "finetune_steps": 15, "big_image_size": 256,
                                     "kernel_tokens": 512},
    "04_distillation.ipynb": {"steps": 150, "compare_steps": 50, "pool_scenes": 256, "bench_repeats": 10},
    "05_edge_deployment.ipynb": {"finetune_steps": 15, "bench_repeats": 6, "big_image_size": 256,
                                 "everything_scenes": 2},
}


def under_test_source(source: str, overrides: dict[str, object]) -> str:
    """A parameters cell's source with `overrides` assigned after it, as papermill injects them."""
    lines = [f"{name} = {value!r}" for name, value in overrides.items()]
    return source + "\n# under test (tests/conftest.py UNDER_TEST): lighter settings\n" + "\n".join(lines) + "\n"


def _lighten(item) -> None:
    cell = getattr(item, "cell", None)
    if cell is None or "parameters" not in cell.get("metadata", {}).get("tags", []):
        return
    overrides = UNDER_TEST.get(Path(str(item.fspath)).name)
    if overrides:
        cell.source = under_test_source(cell.source, overrides)


def pytest_collection_modifyitems(session, config, items):
    """The browser and Binder checks run last, so that their installs, which bootstrap.py started
    in the background (tests/prepare.py), overlap the other tests.

    Each notebook's parameters cell gets its UNDER_TEST settings appended.
    nbval's notebook cells also get 60 s, not nbval's fixed 5 s, for each output after a cell's
    reply: on a busy 2-core machine a finished training cell of notebook 04 once went over it.
    """
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = max(item.output_timeout, NBVAL_OUTPUT_TIMEOUT_S)
        _lighten(item)
    import prepare  # tests/ is on sys.path (pytest puts a conftest folder there)
    slow = [i for i in items if getattr(i, "module", None) and i.module.__name__.split(".")[-1] in prepare.SLOW]
    items[:] = [i for i in items if i not in slow] + slow

