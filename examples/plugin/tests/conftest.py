import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

PLUGIN_ROOT = Path(__file__).resolve().parents[1]        # examples/plugin: the package's root
if str(PLUGIN_ROOT) not in sys.path:
    sys.path.insert(0, str(PLUGIN_ROOT))


import pytest  # noqa: E402


@pytest.fixture
def plugin():
    """The plugin imported (its parts registered) for one test, then its parts removed again:
    these tests share a process with the suite's contract tests over every registered part,
    which must see the built-in parts only."""
    from gossamer.aggregators import AGGREGATORS
    from gossamer.models import MODELS

    name = "gossamer_example_plugin"
    module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    try:
        yield module
    finally:
        AGGREGATORS._items.pop("example_clipped_mean", None)
        MODELS._items.pop("example_mlp", None)
