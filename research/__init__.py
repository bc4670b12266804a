"""Research apart from the product: memory probes, recipe searches and their corpora (issue 13, numbers in
demo_assets/MANIFEST.md). Run from the repo root, e.g. `python -m research.probe_memory --work W`. They may use the
library and the demo build (`scripts/`); nothing in `moshi_ttt/`, `app.py` or `scripts/` imports them.

moshi reads NO_TORCH_COMPILE when it is imported: it defaults to 1 here, before any research module imports moshi.
"""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")
