"""Suite-wide settings: hypothesis profiles and the repository root.

Hypothesis deadlines are off by default: under `pytest -n auto` on a 2-core CI box, scheduling
noise makes per-example timing meaningless (performance is measured in `benches/`, never here).
Select another profile with HYPOTHESIS_PROFILE=thorough.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
