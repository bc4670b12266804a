"""moshi-ttt app: upload audio, watch per-token loss and TTT fast-weight drift of two models grow side by side.

Run: moshi-ttt-app (or python app.py) [--host 127.0.0.1] [--port 7860] [--share] [--checkpoint-dir DIR]...
     [--checkpoint hf://...]... [--allow-hub]   (adds a field where users may add hf:// checkpoints; off by default)
     [--preload]   (loads every checkpoint before serving; always on ZeroGPU)
Hub checkpoints may also be named by MOSHI_TTT_HUB_CHECKPOINTS (commas or whitespace between them), directories
by MOSHI_TTT_CHECKPOINTS.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import warnings
from collections.abc import Iterator, Mapping

import torch
from moshi.utils.compile import no_compile

from moshi_ttt.app.demo_assets import demo_assets_dir, example_clips
from moshi_ttt.app.engine import threads_per_run
from moshi_ttt.app.handlers import MAX_SECONDS
from moshi_ttt.app.layout import build_demo
from moshi_ttt.app.models import ModelCache, build_allow_list
from moshi_ttt.app.startup import check_cached, check_device, hub_checkpoints, on_zerogpu, preload

logger = logging.getLogger("moshi_ttt.app")

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}  # --dtype (auto: resolve_dtype)
QUEUE_SIZE = 16  # runs waiting at most (--queue-size); the next user is told the queue is full
MAX_FILE_SIZE = "200mb"  # largest upload (10 min of 48 kHz stereo 16-bit WAV is 115 MB)


def compile_disabled(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the app runs moshi without its lazy torch.compile: unless MOSHI_TTT_DEVICE asks for cuda (compiling
    costs ~40 s per process on CPU).

    app.py sets NO_TORCH_COMPILE by this rule before moshi is imported (moshi reads it when its modules load); the
    console script cannot (moshi_ttt imports moshi before this module), so `main` serves inside moshi's
    `no_compile()`, which moshi's compiled functions check at each call.
    """
    return "cuda" not in env.get("MOSHI_TTT_DEVICE", "")


def server_address(host: str | None, port: int | None, env: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """--host/--port when given, else GRADIO_SERVER_NAME/GRADIO_SERVER_PORT (Spaces, Docker), else 127.0.0.1:7860.

    Raises:
        ValueError: GRADIO_SERVER_PORT is not a port number.
    """
    host = host or env.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    if port is None:
        text = env.get("GRADIO_SERVER_PORT") or "7860"
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ValueError(f"GRADIO_SERVER_PORT must be a port number, got {text!r}")
        port = int(text)
    return host, port


def parser() -> argparse.ArgumentParser:
    """The command line of `moshi-ttt-app` and `python app.py`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: $GRADIO_SERVER_PORT or 7860")
    p.add_argument("--share", action="store_true")
    p.add_argument("--checkpoint-dir", action="append", default=[], help="directory of checkpoints (repeatable; "
                   "default: the demo assets, $MOSHI_TTT_DEMO_ASSETS or the checkout's demo_assets/)")  # fmt: skip
    p.add_argument("--checkpoint", action="append", default=[], help="hf://owner/repo[@revision][/path] checkpoint "
                   "(repeatable; also $MOSHI_TTT_HUB_CHECKPOINTS)")  # fmt: skip
    p.add_argument(
        "--device",
        default=os.environ.get("MOSHI_TTT_DEVICE"),
        help="cpu or cuda (default: $MOSHI_TTT_DEVICE, else cuda when there is a GPU)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="model weights (auto: float32 below 4e9 "
                   "parameters, as the demo models are stored, bfloat16 from there, as Moshi 7B is); TTT fast weights "
                   "stay float32")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=2, help="runs at once per process")
    p.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="runs waiting at most")
    p.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="longest duration scored (s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the cores shared by the runs)")
    p.add_argument("--allow-hub", action="store_true", help="let users add hf:// checkpoints (downloads them)")
    p.add_argument("--preload", action="store_true", help="load every checkpoint before serving (always on ZeroGPU, "
                   "where models must load at start-up)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, builds the UI and serves it. Models load on first use, or before serving with
    --preload and on ZeroGPU (on the CPU, then moved to the GPU together: moshi_ttt/app/startup.py).

    Args:
        argv: the arguments (default: sys.argv[1:]).
    """
    cli = parser()
    args = cli.parse_args(argv)
    if not 5 <= args.max_seconds <= MAX_SECONDS:
        cli.error(f"--max-seconds must be between 5 and {MAX_SECONDS:g}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests, one line each
    zerogpu = on_zerogpu()
    device = args.device or ("cuda" if torch.cuda.is_available() or zerogpu else "cpu")
    try:
        check_device(device, zerogpu)
    except ValueError as e:
        cli.error(str(e))
    dtype = DTYPES[args.dtype]
    if device == "cpu":
        torch.set_num_threads(args.threads or threads_per_run(args.concurrency))
    try:
        demo_dir = demo_assets_dir()
    except FileNotFoundError as e:
        cli.error(str(e))
    dirs = args.checkpoint_dir or ([demo_dir] if demo_dir.is_dir() else [])
    try:
        hub_refs = hub_checkpoints(args.checkpoint)
        check_cached(hub_refs)
    except (ValueError, FileNotFoundError) as e:
        cli.error(str(e))
    # On ZeroGPU the models load on the CPU and move to the (emulated) GPU at start-up, before launch packs them.
    cache = ModelCache(build_allow_list(dirs, hub_refs), device="cpu" if zerogpu else device, dtype=dtype)
    if not cache.names():
        cli.error("no checkpoint to serve: build demo_assets/ or pass --checkpoint-dir / --checkpoint")
    if args.preload or zerogpu:
        try:
            preload(cache, device=device)
        except (ValueError, FileNotFoundError) as e:  # a checkpoint that cannot load: the server cannot serve it
            cli.error(str(e))
    host, port = server_address(args.host, args.port)
    demo = build_demo(cache, example_clips(demo_dir), max_seconds=args.max_seconds, allow_hub=args.allow_hub)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    quiet_known_warnings()
    with no_compile() if compile_disabled() else contextlib.nullcontext():  # for as long as the server runs
        # quiet: Gradio's own lines would say `share=True` where this command line says --share; `startup_line` says
        # what they said, and more.
        _, local_url, share_url = demo.launch(server_name=host, server_port=port, share=args.share, quiet=True,
                                              max_file_size=MAX_FILE_SIZE, prevent_thread_lock=True)  # fmt: skip
        logger.info(startup_line(cache, device, dtype, local_url, share_url, args.share))
        with sigterm_as_ctrl_c():
            demo.block_thread()  # returns on Ctrl-C or SIGTERM, having closed the server


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Inside, SIGTERM (`docker stop`, a Space restarting, `timeout`) ends the server as Ctrl-C does.

    Why: Python's default SIGTERM kills the process without running its exit handlers, which would leave the
    server's temporary folders behind (the Stop flags' folder, `resources.StopRequests`, is removed at exit). Gradio's
    `block_thread` closes the server on KeyboardInterrupt and returns; the interpreter then exits normally.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def startup_line(cache: ModelCache, device: str, dtype, local_url: str, share_url: str | None, share: bool) -> str:
    """The one line the server logs once it listens: the checkpoints, device and dtype, and where to open it.

    Args:
        cache: the models served (their allow-list).
        device, dtype: where and how they run (dtype None: auto).
        local_url: Gradio's local address; share_url: its public link (None without --share).
        share: whether --share was given.
    """
    checkpoints = ", ".join(f"{name} ({entry.ref})" for name, entry in cache.allow_list.items())
    where = f"open {local_url}" + (f" or {share_url}" if share_url else "")
    if not share:
        where += " (add --share for a public link)"
    threads = f", {torch.get_num_threads()} CPU thread(s) per run" if device == "cpu" else ""
    dtype_name = "dtype auto" if dtype is None else str(dtype).removeprefix("torch.")
    return f"moshi-ttt app: serving {checkpoints} on {device} ({dtype_name}{threads}); {where}"


def quiet_known_warnings() -> None:
    """Silences the one warning the server would otherwise print at every run: Gradio 6.17's queue uses Starlette's
    deprecated HTTP_422_UNPROCESSABLE_ENTITY (gradio/routes.py), nothing the app or its user can change."""
    warnings.filterwarnings("ignore", message=".*HTTP_422_UNPROCESSABLE_ENTITY.*")
