"""The demo build (`python -m scripts.build_demo_assets` from the repo root): corpus, codec, the demo models' recipe
and evaluation. Not part of the library; the v3 build runs research/'s pipeline with its arguments pinned.

moshi reads NO_TORCH_COMPILE when it is imported: it defaults to 1 here, before any script imports moshi.
"""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")
