"""Moshi 7B at full size from an offline Hugging Face cache: load once, score with the CLI and the app's path.

Writes 7B-shaped random weights in kyutai's Hub layout (bench/hub_cache.py) into ROOT/hf_home/hub and a TTT
checkpoint of ours on layers 29,30,31 whose config.json names hf://kyutai/moshiko-pytorch-bf16 as its base, then,
each step in a fresh process with HF_HOME=ROOT/hf_home and HF_HUB_OFFLINE=1:

- cli-both: `python -m moshi_ttt.evaluate --baseline hf://kyutai/moshiko-pytorch-bf16 --ttt ROOT/ttt` on 8 s of
  speech (the CLI loads the baseline first: the bytes held after that load are the baseline's alone);
- app: moshi_ttt.app.models.ModelCache + moshi_ttt.app.engine.compare_file, the TTT checkpoint loaded first;
- handler: the app as a Space serves it: the baseline named by MOSHI_TTT_HUB_CHECKPOINTS, every model loaded at
  start-up (moshi_ttt.app.startup.preload, ZeroGPU's path, here on the CPU), then the Run button's handler
  (moshi_ttt.app.handlers.run_handler) driven to its last output with the raw values the page sends;
- cli-baseline (not run by default): the CLI with the baseline alone.

Each step reports each load's time and the unique bytes of weights held after it (distinct storages,
`moshi_ttt.data.checkpoints.weight_bytes`), tokens/s of each run, the bytes of all models against one model's, and
the process's peak resident memory, into ROOT/report_<step>.json; `all` prints them together.

Usage (about 15 GB of disk and 18 GB of free memory at full size):
    NO_TORCH_COMPILE=1 python -m bench.hub_7b all --root /tmp/hub7b
    NO_TORCH_COMPILE=1 python -m bench.hub_7b all --root /tmp/hub7b_small --num-layers 2 --ttt-layers 1   # small
    NO_TORCH_COMPILE=1 python -m bench.hub_7b all --root /tmp/hub7b --steps handler   # the Run handler alone
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BASE = "hf://kyutai/moshiko-pytorch-bf16"
SPEECH = Path(__file__).resolve().parent.parent / "demo_assets" / "demo_plain.wav"  # espeak-ng speech, 43.7 s
STEPS = ("cli-baseline", "cli-both", "app", "handler")
DEFAULT_STEPS = "cli-both,app,handler"  # cli-both loads the baseline alone first: its load time and bytes are reported


def paths(root: Path) -> dict[str, Path]:
    return {
        "hf_home": root / "hf_home",
        "cache": root / "hf_home" / "hub",
        "ttt": root / "ttt",
        "audio": root / "speech_8s.wav",
        "done": root / "written.json",
    }


def write(args) -> None:
    """The Hub cache, the TTT checkpoint and the speech clip (skipped when ROOT/written.json says they are there)."""
    import soundfile as sf
    import torch

    from bench.hub_cache import write_moshi_repo, write_ttt_checkpoint
    from moshi_ttt.compat.moshi import default_lm_kwargs

    p = paths(args.root)
    lm_config = default_lm_kwargs()
    if args.num_layers is not None:
        lm_config["num_layers"] = args.num_layers
    settings = {"lm_config": lm_config, "ttt_layers": args.ttt_layers, "seconds": args.seconds}
    if p["done"].is_file() and json.loads(p["done"].read_text()) == settings:
        print(f"{args.root}: already written")
        return
    start = time.perf_counter()
    write_moshi_repo(p["cache"], lm_config, dtype=torch.bfloat16)
    written_s = time.perf_counter() - start
    write_ttt_checkpoint(p["ttt"], BASE, lm_config, layers=args.ttt_layers, dtype=torch.bfloat16)
    samples, rate = sf.read(SPEECH, dtype="float32", frames=int(args.seconds * sf.info(SPEECH).samplerate))
    sf.write(p["audio"], samples, rate)
    p["done"].write_text(json.dumps(settings))
    print(f"wrote {p['cache']} in {written_s:.0f} s, {p['ttt']} and {p['audio']}")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kB


def _sizes(models: dict) -> dict:
    from moshi_ttt.data.checkpoints import weight_bytes

    one = weight_bytes(models.get("baseline") or next(iter(models.values())))
    both = weight_bytes(*models.values())
    return {"weight_bytes_all_models": both, "weight_bytes_one_model": one, "ratio_to_one_model": both / one}


def run_cli(args, with_ttt: bool) -> dict:
    """The CLI in this process (its loading call timed and its models kept for counting bytes)."""
    from moshi_ttt import evaluate
    from moshi_ttt.data.checkpoints import weight_bytes

    p = paths(args.root)
    out = args.root / ("out_cli_both" if with_ttt else "out_cli_baseline")
    argv = ["--audio", str(p["audio"]), "--baseline", BASE, "--dtype", args.dtype, "--device", "cpu", "--out", str(out)]
    argv += ["--ttt", str(p["ttt"])] if with_ttt else []
    loads, models = [], {}
    load_checkpoint = evaluate._load_checkpoint

    def timed_load(ref, device, dtype):
        start = time.perf_counter()
        ckpt = load_checkpoint(ref, device, dtype)
        loads.append({"ref": ref, "load_s": time.perf_counter() - start})
        models["baseline" if ref == BASE else "ttt"] = ckpt.model
        loads[-1]["weight_bytes_held"] = weight_bytes(*models.values())  # the baseline alone, then both
        return ckpt

    evaluate._load_checkpoint = timed_load
    start = time.perf_counter()
    status = evaluate.main(argv)
    wall_s = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"the CLI ended with status {status}")
    results = json.loads(next(out.glob("*/results.json")).read_text())
    runs = {name: {"tokens": r["tokens"], "tokens_per_s": r["tokens_per_s"]} for name, r in results["runs"].items()}
    return {"command": "python -m moshi_ttt.evaluate " + " ".join(argv), "loads": loads, "runs": runs,
            "wall_s": wall_s, **_sizes(models), "peak_rss_gb": _peak_rss_gb()}  # fmt: skip


def run_app(args) -> dict:
    """The app's scoring path: ModelCache (TTT checkpoint first), then compare_file to the last update."""
    import torch

    from moshi_ttt.app.engine import compare_file, live_options
    from moshi_ttt.app.models import ModelCache, build_allow_list
    from moshi_ttt.data.checkpoints import weight_bytes

    p = paths(args.root)
    allow = build_allow_list([p["ttt"]], [BASE], use_env=False)
    names = {"ttt": "ttt", "baseline": BASE.removeprefix("hf://")}
    cache = ModelCache(allow, device="cpu", dtype=getattr(torch, args.dtype))
    loads = []
    for role in ("ttt", "baseline"):  # the TTT checkpoint first: it loads the base, the baseline takes its tensors
        start = time.perf_counter()
        cache.get(names[role])
        loads.append({"ref": allow[names[role]].ref, "load_s": time.perf_counter() - start})
        held = [cache.get(names[r]).model for r in ("ttt", "baseline")[: len(loads)]]
        loads[-1]["weight_bytes_held"] = weight_bytes(*held)
    start = time.perf_counter()
    updates = compare_file(cache, str(p["audio"]), names["baseline"], names["ttt"], live_options("chunked"), 60.0)
    document = None
    for update in updates:
        document = update.document  # set on the last update
    wall_s = time.perf_counter() - start
    runs = {name: {"tokens": r["tokens"], "tokens_per_s": r["tokens_per_s"]} for name, r in document["runs"].items()}
    models = {role: cache.get(name).model for role, name in names.items()}
    return {"path": "ModelCache + compare_file (live_options('chunked'))", "loads": loads, "runs": runs,
            "wall_s": wall_s, **_sizes(models), "peak_rss_gb": _peak_rss_gb()}  # fmt: skip


def drive_run_handler(ttt_dir: Path, audio: Path, runs_dir: Path, dtype) -> dict:
    """The app's Run handler at the server's start-up state, offline: allow-list from `ttt_dir` and
    $MOSHI_TTT_HUB_CHECKPOINTS (the baseline), every model loaded by `startup.preload`, then the handler's generator
    called as Gradio calls it (request None: an API call) with the page's default controls and `audio`.

    Returns:
        The report: each load's seconds, tokens and tokens/s of each run (from the results.json the handler
        wrote), the handler's wall time, the outputs it yielded, and the unique weight bytes of both models against
        the baseline's.
    """
    from moshi_ttt.app.handlers import run_handler, run_specs
    from moshi_ttt.app.models import ModelCache, build_allow_list
    from moshi_ttt.app.outputs import OUTPUT_NAMES
    from moshi_ttt.app.resources import RunFolders
    from moshi_ttt.app.startup import hub_checkpoints, preload

    hub = hub_checkpoints()
    cache = ModelCache(build_allow_list([ttt_dir], hub, use_env=False), device="cpu", dtype=dtype)
    loads = [{"ref": cache.allow_list[n].ref, "load_s": s} for n, s in preload(cache).items()]
    baseline = next(name for name, entry in cache.allow_list.items() if entry.ref == hub[0])
    ttt = next(name for name in cache.names() if name != baseline)
    specs = run_specs(cache.names(), [str(audio.parent)], [])
    given = {"audio": {"path": str(audio)}, "baseline": baseline, "ttt": ttt}
    values = [given.get(name, getattr(spec, "default", None)) for name, spec in specs.items()]
    handler = run_handler(cache, specs, RunFolders(runs_dir))
    start = time.perf_counter()
    outputs = list(handler(None, *values))
    wall_s = time.perf_counter() - start
    downloads = outputs[-1][OUTPUT_NAMES.index("downloads")]
    results = json.loads(Path(next(d for d in downloads if d.endswith("results.json"))).read_text())
    runs = {name: {"tokens": r["tokens"], "tokens_per_s": r["tokens_per_s"]} for name, r in results["runs"].items()}
    models = {"baseline": cache.get(baseline).model, "ttt": cache.get(ttt).model}
    return {"path": "startup.preload + handlers.run_handler (the page's defaults: chunked)", "loads": loads,
            "runs": runs, "wall_s": wall_s, "outputs_yielded": len(outputs), **_sizes(models),
            "peak_rss_gb": _peak_rss_gb()}  # fmt: skip


def run_handler_step(args) -> dict:
    import torch

    p = paths(args.root)
    os.environ["MOSHI_TTT_HUB_CHECKPOINTS"] = BASE
    return drive_run_handler(p["ttt"], p["audio"], args.root / "handler_runs", getattr(torch, args.dtype))


def step(args) -> None:
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        raise SystemExit("run the steps through `all`, or with HF_HOME=ROOT/hf_home HF_HUB_OFFLINE=1")
    import torch

    torch.set_num_threads(args.threads)
    if args.command == "handler":
        report = run_handler_step(args)
    elif args.command == "app":
        report = run_app(args)
    else:
        report = run_cli(args, with_ttt=args.command == "cli-both")
    report.update(step=args.command, threads=args.threads, dtype=args.dtype)
    (args.root / f"report_{args.command}.json").write_text(json.dumps(report, indent=2))


def run_all(args) -> None:
    write(args)
    env = {**os.environ, "HF_HOME": str(paths(args.root)["hf_home"]), "HF_HUB_OFFLINE": "1", "NO_TORCH_COMPILE": "1"}
    env.pop("HF_HUB_CACHE", None)
    for name in args.steps.split(","):
        command = [sys.executable, "-m", "bench.hub_7b", name, "--root", str(args.root), "--dtype", args.dtype,
                   "--threads", str(args.threads)]  # fmt: skip
        print("+ HF_HOME=... HF_HUB_OFFLINE=1 " + " ".join(command[1:]), flush=True)
        subprocess.run(command, env=env, check=True)
        report = json.loads((args.root / f"report_{name}.json").read_text())
        held = {x["ref"]: f" (then {x['weight_bytes_held'] / 2**30:.2f} GiB held)" for x in report["loads"]
                if "weight_bytes_held" in x}  # fmt: skip
        loads = ", ".join(f"{x['ref']} {x['load_s']:.1f} s{held.get(x['ref'], '')}" for x in report["loads"])
        runs = report["runs"].items()
        speed = ", ".join(f"{n} {r['tokens_per_s']:.3f} tok/s ({r['tokens']} tokens)" for n, r in runs)
        print(f"{name}: load {loads}; {speed}; weights {report['weight_bytes_all_models'] / 2**30:.2f} GiB = "
              f"{report['ratio_to_one_model']:.3f}x one model; peak RSS {report['peak_rss_gb']:.1f} GiB; "
              f"wall {report['wall_s']:.0f} s", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("all", "write", *STEPS))
    p.add_argument("--root", type=Path, required=True, help="where the cache, checkpoint, clip and reports go")
    p.add_argument("--num-layers", type=int, default=None, help="temporal layers (default: Moshi 7B's 32)")
    p.add_argument("--ttt-layers", default="29,30,31")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of speech scored")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", default=DEFAULT_STEPS, help=f"for `all`: which of {', '.join(STEPS)}, in order")
    args = p.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    if args.command == "all":
        run_all(args)
    elif args.command == "write":
        write(args)
    else:
        step(args)


if __name__ == "__main__":
    main()
