"""The server's start-up: Hub checkpoints named by the environment (a Space's settings), and ZeroGPU's start-up
loading, simulated (the `spaces` package is not installed in the tests: SPACES_ZERO_GPU is what it reads)."""

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import SR, raw_values, speechlike
from tiny_models import tiny_lm_config

from bench.hub_cache import write_moshi_repo
from moshi_ttt import load
from moshi_ttt.app import models, server, startup
from moshi_ttt.app.handlers import run_handler, run_specs
from moshi_ttt.app.models import ModelCache, build_allow_list
from moshi_ttt.app.outputs import OUTPUT_NAMES
from moshi_ttt.app.resources import RunFolders, StopRequests
from moshi_ttt.app.startup import ENV_HUB_CHECKPOINTS, hub_checkpoints, on_zerogpu, preload
from moshi_ttt.data.checkpoints import weight_bytes


def test_hub_checkpoints_come_from_flags_and_the_environment_each_checked():
    env = {ENV_HUB_CHECKPOINTS: " hf://kyutai/moshiko-pytorch-bf16,hf://me/ttt@v2\n hf://me/other/sub ,"}
    refs = hub_checkpoints(["hf://me/flag"], env)
    assert refs == ["hf://me/flag", "hf://kyutai/moshiko-pytorch-bf16", "hf://me/ttt@v2", "hf://me/other/sub"]
    assert hub_checkpoints([], {}) == [] and hub_checkpoints([], {ENV_HUB_CHECKPOINTS: " , "}) == []
    with pytest.raises(ValueError, match=f"{ENV_HUB_CHECKPOINTS}: 'kyutai/moshiko' is not a Hub reference"):
        hub_checkpoints([], {ENV_HUB_CHECKPOINTS: "hf://me/ok kyutai/moshiko"})
    with pytest.raises(ValueError, match="--checkpoint: 'hf://me@v1' is not a Hub reference"):
        hub_checkpoints(["hf://me@v1"], {})


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("True", True), ("1", True), ("false", False),
                                                 ("", False), (None, False)])  # fmt: skip
def test_zerogpu_is_detected_as_the_spaces_package_detects_it(value, expected):
    assert on_zerogpu({} if value is None else {"SPACES_ZERO_GPU": value}) is expected


def test_a_space_serves_hub_checkpoints_named_by_its_environment_offline(assets, offline_hub_cache, monkeypatch):
    write_moshi_repo(offline_hub_cache, tiny_lm_config(), dtype=torch.float32, repo="kyutai/tiny-moshi", mimi=False)
    seen = {}
    monkeypatch.setattr(server, "build_demo", lambda cache, *args, **kwargs: seen.update(cache=cache) or pytest.fail())
    monkeypatch.setenv(ENV_HUB_CHECKPOINTS, "hf://kyutai/tiny-moshi")
    with pytest.raises(pytest.fail.Exception):
        server.main(["--device", "cpu", "--threads", "1", "--checkpoint-dir", str(assets / "checkpoints")])
    cache = seen["cache"]
    assert cache.names() == ["baseline", "ttt", "kyutai/tiny-moshi"]
    assert load(cache.allow_list["kyutai/tiny-moshi"].ref).kind == "moshi"  # from the offline cache
    monkeypatch.setenv(ENV_HUB_CHECKPOINTS, "hf://kyutai/tiny-moshi, kyutai/typo")
    with pytest.raises(SystemExit):
        server.main(["--device", "cpu", "--threads", "1"])


def test_on_zerogpu_every_model_loads_at_start_up_then_moves_to_the_gpu_together(assets, monkeypatch):
    """What ZeroGPU needs: every model loaded before `launch` (spaces packs the cuda tensors then), on the CPU, then
    moved to "cuda" in one call that keeps shared tensors shared; runs then score on the cache's new device."""
    seen, moved = {}, []

    def build_demo(cache, *args, **kwargs):
        seen.update(cache=cache, loaded={name: cache.loaded(name) is not None for name in cache.names()})
        pytest.fail("stop before serving")

    monkeypatch.setattr(server, "build_demo", build_demo)
    monkeypatch.setattr(startup, "move_together", lambda modules, device: moved.append((list(modules), device)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # spaces would say True; the env var suffices
    monkeypatch.setattr(startup.zerogpu_module, "HAS_SPACES", True)  # as on a Space (not installed in the tests)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    with pytest.raises(pytest.fail.Exception):
        server.main(["--checkpoint-dir", str(assets / "checkpoints"), "--threads", "1"])
    cache = seen["cache"]
    assert seen["loaded"] == {"baseline": True, "ttt": True}  # loaded before the UI is even built
    assert cache.device == "cuda" and len(moved) == 1
    modules, device = moved[0]
    assert device == "cuda"
    expected = [m for name in ("baseline", "ttt") for m in (cache.get(name).model, cache.get(name).mimi)]
    assert [id(m) for m in modules] == [id(m) for m in expected]  # models and codecs, all in one move


def test_preload_moves_models_that_share_a_base_keeping_one_copy(assets):
    """The real move on a CPU-only machine: to the meta device stands in for "cuda"."""
    cache = ModelCache(build_allow_list([assets / "checkpoints"], use_env=False), dtype=torch.bfloat16)
    seconds = preload(cache)
    assert set(seconds) == {"baseline", "ttt"} and cache.device == "cpu"
    baseline, ttt = cache.get("baseline").model, cache.get("ttt").model
    before = weight_bytes(baseline, ttt)
    preload(cache, device="meta")  # loaded already: nothing loads again, everything moves
    assert cache.device == "meta" and all(p.is_meta for p in (*baseline.parameters(), *ttt.parameters()))
    assert before > 0 and weight_bytes(baseline, ttt) == 0  # nothing left behind on the CPU


def test_preload_leaves_in_place_lora_checkpoints_to_their_first_run(assets, tmp_path):
    """An In-Place checkpoint in the fork's lora.safetensors layout loads over the baseline each run chooses: the
    start-up cannot know it, so it loads everything else and leaves that one (instead of failing to start)."""
    lora = tmp_path / "fork" / "ttt_only_lora"
    shutil.copytree(Path(__file__).parent / "data" / "inplace_fork" / "ttt_only_lora", lora,
                    ignore=shutil.ignore_patterns("fork_outputs*"))  # fmt: skip
    cache = ModelCache(build_allow_list([assets / "checkpoints", lora.parent], use_env=False))
    assert set(preload(cache)) == {"baseline", "ttt"}
    assert cache.loaded("ttt_only_lora") is None and cache.loaded("baseline") is not None


def test_preload_loads_before_serving_and_the_first_run_loads_nothing(assets, tmp_path, monkeypatch):
    """`--preload` off ZeroGPU: every checkpoint loads before the UI is built; the first Run then scores the models
    loaded at start-up (the same objects) and never calls the loader."""
    seen = {}

    def build_demo(cache, *args, **kwargs):
        seen.update(cache=cache, loaded={name: cache.loaded(name) is not None for name in cache.names()})
        pytest.fail("stop before serving")

    monkeypatch.setattr(server, "build_demo", build_demo)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    with pytest.raises(pytest.fail.Exception):
        server.main(["--checkpoint-dir", str(assets / "checkpoints"), "--device", "cpu", "--threads", "1", "--preload"])
    cache = seen["cache"]
    assert seen["loaded"] == {"baseline": True, "ttt": True} and cache.device == "cpu"
    before = {name: cache.get(name).model for name in cache.names()}
    loads = []
    monkeypatch.setattr(models, "load", lambda *args, **kwargs: loads.append(args) or pytest.fail("loaded again"))
    clip = tmp_path / "clip.wav"
    sf.write(clip, speechlike(2.0, 1), SR)
    specs = run_specs(cache.names(), [str(tmp_path)], [])
    handler = run_handler(cache, specs, RunFolders(tmp_path / "runs"), stops=StopRequests(tmp_path / "stops"))
    last = list(handler(None, *raw_values(specs, audio={"path": str(clip)}, max_seconds=5)))[-1]
    downloads = last[OUTPUT_NAMES.index("downloads")]
    assert any(str(d).endswith("results.json") for d in downloads)  # the run scored
    assert loads == [] and all(cache.get(name).model is model for name, model in before.items())


def test_a_bad_hub_checkpoint_stops_the_server_with_one_sentence(assets, offline_hub_cache, monkeypatch, capsys):
    """Each failure names the entry and what to do, and the server stops before serving (no traceback)."""
    monkeypatch.setattr(server, "build_demo", lambda *args, **kwargs: pytest.fail("served"))
    cases = {
        "hf://a": "'hf://a' is not a Hub reference: write hf://owner/repo",
        "hf://a/b@": "'hf://a/b@' has nothing after '@': name a branch, tag or commit",
        "hf://./..": "'hf://./..' does not name a Hub repo",
        "/data/ckpts": "serve a local directory of checkpoints with --checkpoint-dir or MOSHI_TTT_CHECKPOINTS",
        "http://x/y": r"'http://x/y' is not a Hub reference: only hf://owner/repo\[@revision\]\[/path\] is read",
        "hf://kyutai/not-cached": "is not in the local Hugging Face cache .* run `hf download kyutai/not-cached` ",
        "hf://kyutai/tiny-moshi@v9": "run `hf download kyutai/tiny-moshi --revision v9`",
        "hf://kyutai/tiny-moshi/sub": "hf://kyutai/tiny-moshi/sub is not in the local Hugging Face cache",
    }
    write_moshi_repo(offline_hub_cache, tiny_lm_config(), dtype=torch.float32, repo="kyutai/tiny-moshi", mimi=False)
    for value, message in cases.items():
        monkeypatch.setenv(ENV_HUB_CHECKPOINTS, f"hf://kyutai/tiny-moshi, {value}")
        with pytest.raises(SystemExit) as exited:
            server.main(["--checkpoint-dir", str(assets / "checkpoints"), "--device", "cpu", "--threads", "1"])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exited.value.code == 2 and re.search(message, error), (value, error)
        assert "Traceback" not in error and "huggingface-cli" not in error


def test_sigterm_ends_the_server_as_ctrl_c_does():
    """SIGTERM (docker stop, a Space restarting) raises KeyboardInterrupt in the main thread: Gradio's block_thread
    closes the server and returns, and the exit handlers (the Stop flags' folder) run."""
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), server.sigterm_as_ctrl_c():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs between bytecodes of this thread
    assert signal.getsignal(signal.SIGTERM) is previous  # the process's own handler is back afterwards


def test_a_cuda_device_without_a_gpu_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(startup.zerogpu_module, "HAS_SPACES", False)
    with pytest.raises(ValueError, match=r"^--device cuda, but torch sees no CUDA GPU here: use --device cpu$"):
        startup.check_device("cuda", zerogpu=False)
    with pytest.raises(ValueError, match="SPACES_ZERO_GPU is set but this machine has no GPU and no `spaces` package"):
        startup.check_device("cuda", zerogpu=True)
    startup.check_device("cpu", zerogpu=True)  # --device cpu on ZeroGPU: nothing to refuse
    monkeypatch.setattr(startup.zerogpu_module, "HAS_SPACES", True)
    startup.check_device("cuda", zerogpu=True)  # spaces emulates CUDA at start-up
