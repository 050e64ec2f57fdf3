import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
FIXTURE = Path(os.environ.get("REPNOISE_FIXTURES", Path.home() / ".cache" / "repnoise-fixtures")) / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_path():
    if not (FIXTURE / "model.safetensors").exists():
        pytest.skip(f"real SmolLM2 fixture not built at {FIXTURE} (python ../shared/fixtures/build_smollm2.py)")
    return FIXTURE


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the full CPU demo (minutes); deselect with -m 'not slow'")


def interrupt_at_call(monkeypatch, module, name, n):
    """Make module.name raise KeyboardInterrupt on its n-th call (a crash in the middle of a run). Returns the
    real function, to put back before resuming."""
    real, calls = getattr(module, name), {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(module, name, dying)
    return real
