"""moshi-ttt app: upload audio, watch per-token loss and TTT fast-weight drift of two models grow side by side.

Run: python app.py [--host 127.0.0.1] [--port 7860] [--share] [--checkpoint-dir DIR]... [--checkpoint hf://...]...
     [--allow-hub]   (adds a field where users may add hf:// checkpoints; off by default)

The app lives in moshi_ttt/app/ (layout.py builds the UI, handlers.py runs its events, server.py is this command
line, also installed as the console script `moshi-ttt-app`); this file is the entry point Spaces runs.
"""

import os

if "cuda" not in os.environ.get("MOSHI_TTT_DEVICE", ""):  # the rule of moshi_ttt.app.server.compile_disabled
    os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported: it reads the variable then

from moshi_ttt.app.layout import build_demo  # noqa: E402
from moshi_ttt.app.server import main  # noqa: E402

__all__ = ["build_demo", "main"]

if __name__ == "__main__":
    main()
