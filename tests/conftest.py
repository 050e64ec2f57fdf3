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
