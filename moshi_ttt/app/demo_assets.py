"""Where the app finds its demo assets (checkpoints, codec, clips), also when moshi_ttt is installed.

`scripts/build_demo_assets.py` writes them to `demo_assets/` at the root of a checkout. The app looks, in order:
the `MOSHI_TTT_DEMO_ASSETS` directory; the checkout's `demo_assets/` next to the package (a source checkout or an
editable install); `./demo_assets` (an installed package run from a checkout). Gradio-free.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_DEMO_ASSETS = "MOSHI_TTT_DEMO_ASSETS"
CHECKOUT = Path(__file__).resolve().parents[2]  # moshi_ttt/app/demo_assets.py -> the folder holding moshi_ttt/
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


def demo_assets_dir(env: Mapping[str, str] = os.environ, checkout: Path = CHECKOUT, cwd: Path | None = None) -> Path:
    """The demo-assets directory: $MOSHI_TTT_DEMO_ASSETS, else `checkout`/demo_assets, else `cwd`/demo_assets.

    Args:
        env: the environment to read MOSHI_TTT_DEMO_ASSETS from.
        checkout: the folder that holds the package (a checkout's root, or site-packages when installed).
        cwd: the working directory (default: the process's).
    Returns:
        The first candidate that is a directory; `cwd`/demo_assets when none is (callers check `is_dir()`: an app
        without demo assets serves the checkpoints given on its command line).
    Raises:
        FileNotFoundError: MOSHI_TTT_DEMO_ASSETS is set but names no directory (a typo should not fall through).
    """
    if env.get(ENV_DEMO_ASSETS):
        chosen = Path(env[ENV_DEMO_ASSETS]).expanduser()
        if not chosen.is_dir():
            raise FileNotFoundError(f"{ENV_DEMO_ASSETS}={env[ENV_DEMO_ASSETS]} is not a directory")
        return chosen.resolve()
    in_checkout = checkout / "demo_assets"
    if in_checkout.is_dir():
        return in_checkout
    return (cwd if cwd is not None else Path.cwd()).resolve() / "demo_assets"


def example_clips(directory: Path) -> list[str]:
    """The audio files offered as demo clips: those in `directory`/clips, else in `directory` itself.

    Args:
        directory: a demo-assets directory (see `demo_assets_dir`).
    Returns:
        Their paths, sorted by name; [] when the directory does not exist.
    """
    clips = directory / "clips"
    folder = clips if clips.is_dir() else directory
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES]
