"""Binder: binder/requirements.txt installs into a clean virtual environment, binder/postBuild runs
there and binder/start launches a command with the workbook importable (binder/check.py, which
`bootstrap.py test` starts in the background: tests/prepare.py; about 2.5 minutes and 5 GB of
disk while it runs)."""
import re
from pathlib import Path

import prepare

BINDER = Path(__file__).resolve().parent.parent / "binder"


def test_binder_files_ask_for_cpu_torch_and_open_the_notebooks():
    req = (BINDER / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in req
    assert {"torch", "torchvision"} <= {line.strip() for line in req.splitlines()}
    for script in ("postBuild", "start"):
        text = (BINDER / script).read_text()
        assert text.startswith("#!/usr/bin/env bash") and (BINDER / script).stat().st_mode & 0o111
    assert 'exec "$@"' in (BINDER / "start").read_text()


def test_requirements_install_and_post_build_runs_in_a_clean_environment():
    rc, log, seconds = prepare.result("binder", prepare.binder_command())
    assert rc == 0, f"binder/check.py failed after {seconds:.0f} s:\n{log[-3000:]}"
    for step in ("pip install -r binder/requirements.txt", "binder/postBuild", "binder/start"):
        assert re.search(rf"^ok\s+{re.escape(step)}", log, re.M), log
    assert "start ok, MPLBACKEND = module://matplotlib_inline.backend_inline" in log
    print(log)
