"""Make the flat top-level modules importable when pytest is run from anywhere."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A session-shared OPID_CACHE with tiny generated splits (6 train, 6 eval games)."""
    folder = tmp_path_factory.getbasetemp() / "opid_alfworld_small"
    saved = os.environ.get("OPID_CACHE")
    os.environ["OPID_CACHE"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("OPID_CACHE", None)
    else:
        os.environ["OPID_CACHE"] = saved
