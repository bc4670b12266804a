#!/usr/bin/env bash
# The project installs as a package: `pip install --no-deps .` of a clean clone into a fresh venv that reuses the
# heavy packages already installed (--system-site-packages: no torch download), then every console script of
# pyproject.toml's [project.scripts] answers --help from the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_TORCH_COMPILE=1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git clone --quiet . "$tmp/src"  # what is committed, without build/ or *.egg-info of earlier builds
python -m venv --system-site-packages "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --no-deps "$tmp/src"
cd "$tmp"  # not the repo: moshi_ttt must come from the venv
scripts="$("$tmp/venv/bin/python" - <<'EOF'
import sys
from importlib.metadata import distribution

import moshi_ttt

dist = distribution("moshi-ttt")
assert moshi_ttt.__file__.startswith(sys.prefix), f"moshi_ttt imported from {moshi_ttt.__file__}, not the venv"
assert dist.version == moshi_ttt.__version__, f"installed {dist.version}, package says {moshi_ttt.__version__}"
top = {f.parts[0] for f in dist.files if f.parts[0] != ".." and not f.parts[0].endswith(".dist-info")}
assert top == {"moshi_ttt"}, f"installed top-level names {sorted(top)}, expected moshi_ttt only"
names = [e.name for e in dist.entry_points if e.group == "console_scripts"]
assert names, "no console scripts installed"
print(" ".join(names))
EOF
)"
for name in $scripts; do
  "$tmp/venv/bin/$name" --help >/dev/null
  echo "installed: $name --help ok"
done
