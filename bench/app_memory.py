"""The app server's memory over many runs: starts `python app.py` on a free port, drives its public API with
gradio_client (the demo clip, as a browser would send it), and reads the server's resident memory (Linux VmRSS)
after each run. A server that keeps something per run grows without end; one that does not levels off after the
first runs (models loaded, caches warm).

A benchmark, not a test: it takes a few minutes on CPU.

Usage: NO_TORCH_COMPILE=1 python -m bench.app_memory [--runs 30] [--mode mix] [--clip demo_assets/demo_repeat.wav]
           [--sessions one|each] [--out out/app_memory]
Writes OUT/rss.json (MB after each run) and OUT/rss.html (the curve); prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("chunked", "live token by token", "whole sequence")


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, log: Path) -> subprocess.Popen:
    """`python app.py` on `port`, its output in `log`; returns once it answers."""
    import httpx

    env = {**os.environ, "NO_TORCH_COMPILE": "1"}
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"the server did not answer within 180 s: see {log}")


def figure_html(rss: list[float], title: str) -> str:
    """The RSS curve as a page (plotly.js inlined: it opens offline)."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=list(range(len(rss))), y=rss, mode="lines+markers", name="server RSS"))
    fig.update_layout(title=title, xaxis_title="runs completed (0: after start-up)", yaxis_title="RSS (MB)",
                      yaxis={"rangemode": "tozero"}, width=900, height=450)  # fmt: skip
    return fig.to_html(include_plotlyjs=True, full_html=True)


def main(argv: list[str] | None = None) -> None:
    from gradio_client import Client, handle_file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--mode", default="mix", choices=["mix", *MODES], help="mix: the three modes in turn")
    p.add_argument("--clip", type=Path, default=ROOT / "demo_assets" / "demo_repeat.wav")
    p.add_argument(
        "--sessions",
        choices=["one", "each"],
        default="each",
        help="one gradio_client session for all runs, or a new one per run (as new visitors)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "out" / "app_memory")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(port, args.out / "server.log")
    url = f"http://127.0.0.1:{port}/"
    try:
        rss, seconds = [rss_mb(server.pid)], []
        print(f"start-up: {rss[0]:.0f} MB")
        client = Client(url, verbose=False, download_files=False)
        for run in range(1, args.runs + 1):
            if args.sessions == "each":
                client = Client(url, verbose=False, download_files=False)
            start = time.perf_counter()
            mode = MODES[(run - 1) % len(MODES)] if args.mode == "mix" else args.mode
            client.predict(handle_file(str(args.clip)), "fair_baseline", "ttt", 16, True, mode, 120, False, "",
                           api_name="/run")  # fmt: skip
            seconds.append(time.perf_counter() - start)
            time.sleep(0.5)  # the server's last writes of the run
            rss.append(rss_mb(server.pid))
            print(f"run {run:2d}: {rss[-1]:6.0f} MB ({seconds[-1]:.1f} s, {mode})")
    finally:
        server.terminate()
        server.wait(timeout=30)
    modes = "chunked, live and whole-sequence" if args.mode == "mix" else args.mode
    title = f"app server RSS over {args.runs} {modes} runs of {args.clip.name} ({args.sessions} session(s))"
    (args.out / "rss.json").write_text(json.dumps({"title": title, "rss_mb": rss, "run_s": seconds}, indent=1))
    (args.out / "rss.html").write_text(figure_html(rss, title))
    tail = rss[len(rss) // 2 :]
    print(f"{title}: {rss[0]:.0f} MB at start-up, {rss[1]:.0f} MB after run 1, {rss[-1]:.0f} MB after run "
          f"{args.runs}; second half spread {max(tail) - min(tail):.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
