import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

PLUGIN_ROOT = Path(__file__).resolve().parents[1]        # examples/plugin: the package's root
if str(PLUGIN_ROOT) not in sys.path:
    sys.path.insert(0, str(PLUGIN_ROOT))
