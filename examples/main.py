"""The main job: fxfuse on real data, end to end.

Run it with ``bash tools/run.sh main`` (which sets everything up first).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.multifashion.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
