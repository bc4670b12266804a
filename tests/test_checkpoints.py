"""Checkpoints: our format round trip, moshi's (full and LoRA) through CheckpointInfo, clear errors, offline Hub."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from moshi.models import loaders
from moshi.models.lm import LMModel
from safetensors.torch import load_file, save_file
from tiny_models import random_audio_codes, tiny_lm, tiny_lm_config

from moshi_ttt import LegacyConfig, TTTConfig, apply_ttt, load, save
from moshi_ttt.compat.sequence import model_codes
from moshi_ttt.data.checkpoints import common, hub


def outputs(model: LMModel, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    codes = model_codes(model, random_audio_codes(2, 14, seed=seed))
    with torch.no_grad():
        out = model(codes)
    return out.logits, out.text_logits


def randomise_ttt(model: LMModel, seed: int = 1) -> None:
    """Trained-looking TTT parameters (not their initial values), so a round trip that dropped them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ttt." in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))


def assert_same_state(a: LMModel, b: LMModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_ttt", [False, True, "share_qk"], ids=["baseline", "ttt", "ttt_share_qk"])
def test_round_trip_gives_identical_outputs(tmp_path, with_ttt, dtype):
    model = tiny_lm(0, dtype=dtype)
    cfg = None
    if with_ttt:
        cfg = TTTConfig(layers="1,2", mini_batch_size=4, gating_alpha_init=0.5, share_qk=with_ttt == "share_qk")
        apply_ttt(model, cfg)
        randomise_ttt(model)
    save(
        tmp_path / "ckpt", model, lm_config=tiny_lm_config(), ttt_config=cfg, mimi_ref="hf://kyutai/x/mimi.safetensors"
    )
    loaded = load(tmp_path / "ckpt", dtype=dtype)
    assert loaded.kind == "ours" and loaded.ttt_config == cfg and not loaded.model.training
    assert loaded.mimi is None and loaded.mimi_ref == "hf://kyutai/x/mimi.safetensors"
    assert_same_state(model, loaded.model)
    if with_ttt:
        assert loaded.model.transformer.layers[1].ttt.W1.dtype == torch.float32
    for a, b in zip(outputs(model), outputs(loaded.model), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["format"] == "moshi-ttt" and config["version"] == 1 and config["lm_config"] == tiny_lm_config()


def test_bfloat16_on_disk_keeps_fast_weights_float32(tmp_path):
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4))
    randomise_ttt(model)
    save(tmp_path / "c", model, lm_config=tiny_lm_config(), dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert stored["transformer.layers.1.ttt.W1"].dtype == torch.float32
    assert stored["transformer.layers.1.ttt.wq.weight"].dtype == torch.bfloat16
    assert stored["emb.0.weight"].dtype == torch.bfloat16
    loaded = load(tmp_path / "c").model  # float32 model
    torch.testing.assert_close(loaded.transformer.layers[1].ttt.W1, model.transformer.layers[1].ttt.W1, rtol=0, atol=0)
    assert loaded.emb[0].weight.dtype == torch.float32


def test_checkpoint_on_a_base_holds_only_ttt_tensors(tmp_path):
    base = tiny_lm(0)
    save(tmp_path / "base", base, lm_config=tiny_lm_config())
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="0,2", mini_batch_size=4, gating_alpha_init=0.5))
    randomise_ttt(model)
    save(tmp_path / "ttt", model, base=str(tmp_path / "base"))
    assert all(".ttt." in k for k in load_file(str(tmp_path / "ttt" / "model.safetensors")))
    for kwargs in ({}, {"base": str(tmp_path / "base")}):
        loaded = load(tmp_path / "ttt", **kwargs)
        assert loaded.lm_config == tiny_lm_config() and loaded.ttt_config.layers == "0,2"
        for a, b in zip(outputs(model), outputs(loaded.model), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


def _rewrite(path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("transformer.layers.1.ttt.W2"), r"missing keys: transformer\.layers\.1\.ttt\.W2"),
        (lambda t: t.update({"transformer.layers.1.ttt.extra": torch.zeros(2)}), r"unknown keys: .*ttt\.extra"),
        (lambda t: t.update({"emb.0.weight": torch.zeros(3, 32)}), r"wrong shapes: emb\.0\.weight \(expected"),
    ],
    ids=["missing", "extra", "shape"],
)
def test_bad_keys_are_named(tmp_path, edit, message):
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4))
    save(tmp_path / "c", model, lm_config=tiny_lm_config())
    _rewrite(tmp_path / "c" / "model.safetensors", edit)
    with pytest.raises(ValueError, match=message):
        load(tmp_path / "c")


def test_pickle_files_are_refused(tmp_path):
    model = tiny_lm(0)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="only safetensors"):
        load(tmp_path / "model.pt")
    # A pickle renamed to .safetensors inside a checkpoint directory is refused too.
    save(tmp_path / "c", model, lm_config=tiny_lm_config())
    torch.save(model.state_dict(), tmp_path / "c" / "model.safetensors")
    with pytest.raises(ValueError, match="only safetensors"):
        load(tmp_path / "c")
    # A moshi-style directory with only a pickle.
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(tiny_lm_config()))
    torch.save(model.state_dict(), tmp_path / "m" / "consolidated.pt")
    with pytest.raises(ValueError, match="only safetensors"):
        load(tmp_path / "m")


@pytest.fixture
def checkpoint_info_calls(monkeypatch):
    """Records CheckpointInfo.get_moshi calls, to show that moshi's own loader did the loading."""
    calls = []
    original = loaders.CheckpointInfo.get_moshi

    def spy(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(loaders.CheckpointInfo, "get_moshi", spy)
    return calls


def test_moshi_full_checkpoint_loads_through_checkpoint_info(tmp_path, checkpoint_info_calls):
    model = tiny_lm(0)
    (tmp_path / "consolidated").mkdir()
    save_file(model.state_dict(), str(tmp_path / "consolidated" / "consolidated.safetensors"))
    (tmp_path / "consolidated" / "config.json").write_text(json.dumps({**tiny_lm_config(), "lora": False}))
    loaded = load(tmp_path / "consolidated")
    assert loaded.kind == "moshi" and loaded.ttt_config is None and len(checkpoint_info_calls) == 1
    assert loaded.lm_config == tiny_lm_config()
    assert loaded.mimi_ref == f"hf://{loaders.DEFAULT_REPO}/{loaders.MIMI_NAME}"
    for a, b in zip(outputs(model), outputs(loaded.model), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
    # A single weights file with its config.json beside it.
    assert load(tmp_path / "consolidated" / "consolidated.safetensors").kind == "moshi"


def _lora_dir(tmp_path, rank: int = 2, scaling: float = 2.0):
    """A moshi-finetune LoRA output and the model it stands for (base weights + scaling * B @ A merged by hand)."""
    base = tiny_lm(0)
    (tmp_path / "base").mkdir()
    save_file(base.state_dict(), str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps(tiny_lm_config()))
    expected = tiny_lm(0)
    g = torch.Generator().manual_seed(5)
    lora = {}
    with torch.no_grad():
        for name, module in expected.named_modules():
            if isinstance(module, torch.nn.Linear):
                a = torch.randn(rank, module.in_features, generator=g) * 0.1
                b = torch.randn(module.out_features, rank, generator=g) * 0.1
                lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"] = a, b
                module.weight += scaling * (b @ a)
    out = tmp_path / "run" / "checkpoints" / "checkpoint_000100" / "consolidated"
    out.mkdir(parents=True)
    save_file(lora, str(out / "lora.safetensors"))
    config = {**tiny_lm_config(), "lora": True, "lora_rank": rank, "lora_scaling": scaling}
    (out / "config.json").write_text(json.dumps(config))
    return out, expected


def test_moshi_finetune_lora_checkpoint_matches_merged_weights(tmp_path, checkpoint_info_calls):
    out, expected = _lora_dir(tmp_path)
    loaded = load(out, base=str(tmp_path / "base"))
    assert loaded.kind == "moshi" and len(checkpoint_info_calls) == 1 and "LoRA" in loaded.notes[0]
    assert checkpoint_info_calls[0].lora_weights == out / "lora.safetensors"
    assert loaded.lm_config == tiny_lm_config()
    for a, b in zip(outputs(expected), outputs(loaded.model), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, equal_nan=True)  # W + s·BA vs Wx + s·B(Ax): round-off


def test_moshi_lora_with_a_missing_adapter_is_named(tmp_path):
    out, _ = _lora_dir(tmp_path)
    _rewrite(out / "lora.safetensors", lambda t: t.pop("linears.0.lora_B.weight"))
    with pytest.raises(ValueError, match=r"missing keys: linears\.0\.lora_B\.weight"):
        load(out, base=str(tmp_path / "base"))


@pytest.mark.parametrize(
    "ref", ["hf://kyutai/moshiko-pytorch-bf16", "hf://kyutai/moshiko-pytorch-bf16/model.safetensors"]
)
def test_offline_hub_reference_says_how_to_predownload(offline_hub_cache, ref):
    with pytest.raises(FileNotFoundError, match="hf download kyutai/moshiko-pytorch-bf16") as info:
        load(ref)
    assert "local" in str(info.value)
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_lora_without_base_goes_to_the_hub_and_explains_offline(offline_hub_cache, tmp_path):
    out, _ = _lora_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"hf download {loaders.DEFAULT_REPO}"):
        load(out)


def test_mimi_is_only_built_when_asked_and_only_from_safetensors(tmp_path):
    model = tiny_lm(0)
    torch.save({"model": {}}, tmp_path / "mimi.pt")
    save(tmp_path / "c", model, lm_config=tiny_lm_config(), mimi_ref="mimi.pt")
    torch.save({"model": {}}, tmp_path / "c" / "mimi.pt")
    loaded = load(tmp_path / "c")
    assert loaded.mimi is None and loaded.mimi_ref == str(tmp_path / "c" / "mimi.pt")  # relative to the checkpoint
    with pytest.raises(ValueError, match="only safetensors"):
        load(tmp_path / "c", load_mimi=True)


def test_a_relative_codec_is_looked_for_beside_the_checkpoint_only(tmp_path, monkeypatch):
    """A checkpoint naming "../codec" whose codec is not beside it fails there, even when the working directory
    happens to hold a "../codec" (no silent fallback to another codec)."""
    save(tmp_path / "run" / "ttt", tiny_lm(0), lm_config=tiny_lm_config(), mimi_ref="../codec")
    work = tmp_path / "elsewhere" / "cwd"
    work.mkdir(parents=True)
    (tmp_path / "elsewhere" / "codec").mkdir()  # what "../codec" means from the working directory
    monkeypatch.chdir(work)
    loaded = load(tmp_path / "run" / "ttt")
    assert loaded.mimi_ref == str((tmp_path / "run" / "codec").resolve())
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "run" / "codec")):
        load(tmp_path / "run" / "ttt", load_mimi=True)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A Hub served from local folders (tmp_path/hub/owner/repo): the real hf:// code paths, no network."""
    from huggingface_hub.errors import EntryNotFoundError

    root = tmp_path / "hub"

    def download(repo_id, filename, revision=None, **kwargs):
        path = root / repo_id / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    def snapshot(repo_id, allow_patterns=None, **kwargs):
        return str(root / repo_id)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    monkeypatch.setattr(hub, "snapshot_download", snapshot)
    monkeypatch.setattr(loaders, "hf_hub_download", download)
    return root


def test_hub_references_use_the_same_loaders(fake_hub, checkpoint_info_calls):
    base = tiny_lm(0)
    repo = fake_hub / "kyutai" / "tiny-moshi"
    repo.mkdir(parents=True)
    save_file(base.state_dict(), str(repo / loaders.MOSHI_NAME))
    (repo / "config.json").write_text(json.dumps(tiny_lm_config()))
    (repo / loaders.MIMI_NAME).write_bytes(b"")  # from_hf_repo fetches these two; loading never reads them
    (repo / loaders.TEXT_TOKENIZER_NAME).write_bytes(b"")
    moshi = load("hf://kyutai/tiny-moshi")
    assert moshi.kind == "moshi" and len(checkpoint_info_calls) == 1
    assert moshi.mimi_ref == str(repo / loaders.MIMI_NAME)
    for a, b in zip(outputs(base), outputs(moshi.model), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)

    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4, gating_alpha_init=0.5))
    randomise_ttt(model)
    save(fake_hub / "me" / "ttt" / "run1", model, base="hf://kyutai/tiny-moshi")
    ours = load("hf://me/ttt/run1")
    assert ours.kind == "ours" and ours.mimi_ref == str(repo / loaders.MIMI_NAME)
    for a, b in zip(outputs(model), outputs(ours.model), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


def test_small_cpu_models_are_built_on_the_cpu_and_large_ones_on_meta():
    """Building on meta runs torch's Python reference kernels (the first call imports torch._dynamo, ~1 s): the
    demo models are built on the CPU directly; a large model or another device still goes through meta."""
    build_lm = common.build_lm
    rng = torch.random.get_rng_state()
    small = build_lm(tiny_lm_config(), "cpu", torch.float32)
    assert all(p.device.type == "cpu" for p in small.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)  # loading leaves the caller's seed alone, as meta did
    large_config = {**tiny_lm_config(), "dim": 2048, "num_heads": 16}
    assert all(p.is_meta for p in build_lm(large_config, "cpu", torch.float32).parameters())
    assert all(p.is_meta for p in build_lm(tiny_lm_config(), "cuda", torch.float32).parameters())


def test_ttt_config_json_round_trip_nests_the_legacy_options():
    legacy = LegacyConfig(causal=False, mlp_layers=3, mlp_hidden_dims=(8, 12), use_rope=True, rope_theta=500.0)
    cfg = TTTConfig(layers="1,2", target="legacy", legacy=dataclasses.replace(legacy, ttt_layer_context=6))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["legacy"]["mlp_hidden_dims"] == [8, 12] and data["legacy"]["ttt_layer_context"] == 6
    assert not {"causal", "mlp_layers", "use_rope"} & set(data)  # only under "legacy"
    assert TTTConfig.from_dict(data) == cfg and hash(TTTConfig.from_dict(data)) == hash(cfg)
    plain = json.loads(json.dumps(TTTConfig(inner="linear").to_dict()))
    assert plain["legacy"] is None and TTTConfig.from_dict(plain) == TTTConfig(inner="linear")


def test_old_flat_ttt_config_layout_still_loads():
    """Configs saved before LegacyConfig had the legacy options at the top level (as the first demo_assets/ttt did:
    its TTT section is tests/data/flat_ttt_config_v1.json)."""
    old_defaults = {"causal": True, "mlp_layers": 2, "mlp_hidden_dims": None, "use_rope": False}
    old_defaults.update(rope_theta=10000.0, ttt_layer_context=None, non_ttt_layer_context=None)
    flat = {"layers": "1,2", "mini_batch_size": 4, "target": "legacy", "legacy": True, **old_defaults}
    flat.update(causal=False, mlp_layers=3, mlp_hidden_dims=[8, 12], use_rope=True, non_ttt_layer_context=9)
    expected = LegacyConfig(causal=False, mlp_layers=3, mlp_hidden_dims=(8, 12), use_rope=True, non_ttt_layer_context=9)
    assert TTTConfig.from_dict(flat) == TTTConfig(layers="1,2", mini_batch_size=4, target="legacy", legacy=expected)
    assert TTTConfig.from_dict({"legacy": True}).legacy == LegacyConfig()  # old flat defaults: causal=True
    ours = {"layers": "1", "legacy": False, "share_qk": True, **old_defaults}
    assert TTTConfig.from_dict(ours) == TTTConfig(layers="1", share_qk=True)
    demo = json.loads((Path(__file__).parent / "data" / "flat_ttt_config_v1.json").read_text())
    assert demo["legacy"] is False and "causal" in demo
    assert TTTConfig.from_dict(demo) == TTTConfig(layers="1,2,3", mini_batch_size=16, base_lr=4.0, share_qk=True)
    with pytest.raises(ValueError, match=r"\['mlp_layers', 'use_rope'\] exist only for legacy checkpoints"):
        TTTConfig.from_dict({**ours, "mlp_layers": 3, "use_rope": True})
    with pytest.raises(ValueError, match=r"unknown TTTConfig fields: \['bogus', 'causal'\]"):
        TTTConfig.from_dict({"legacy": {"causal": False}, "causal": False, "bogus": 1})  # nested + stray flat keys
    with pytest.raises(ValueError, match=r"unknown TTTConfig fields: \['bogus'\]"):
        TTTConfig.from_dict({**flat, "bogus": 1})
    with pytest.raises(ValueError, match=r"unknown LegacyConfig fields: \['ttt_mlp_layers'\]"):
        TTTConfig.from_dict({"legacy": {"ttt_mlp_layers": 3}})
    with pytest.raises(ValueError, match="legacy must be an object, null or"):
        TTTConfig.from_dict({"legacy": "yes"})
    with pytest.raises(ValueError, match="read from a JSON object, got list"):
        TTTConfig.from_dict([1, 2])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mlp_layers": 11}, r"mlp_layers must be an integer in \[2, 10\], got 11"),
        ({"mlp_layers": 2.5}, "mlp_layers must be an integer"),
        ({"mlp_layers": True}, "mlp_layers must be an integer"),
        ({"mlp_layers": 3, "mlp_hidden_dims": [8]}, "needs mlp_layers - 1 = 2 widths"),
        ({"mlp_hidden_dims": [0]}, "mlp_hidden_dims widths must be an integer >= 1, got 0"),
        ({"mlp_hidden_dims": "8"}, "mlp_hidden_dims must be a list of widths or None"),
        ({"rope_theta": float("nan")}, "rope_theta must be a finite number > 0"),
        ({"rope_theta": "1e4"}, "rope_theta must be a finite number > 0"),
        ({"causal": "no"}, "causal must be true or false"),
        ({"use_rope": 1}, "use_rope must be true or false"),
        ({"ttt_layer_context": 0}, "ttt_layer_context must be an integer >= 1, got 0"),
        ({"non_ttt_layer_context": 2.5}, "non_ttt_layer_context must be an integer"),
    ],
)
def test_bad_legacy_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        TTTConfig.from_dict({"legacy": options})
    with pytest.raises(ValueError, match=message):
        TTTConfig.from_dict({"legacy": True, **options})  # old flat layout


def test_legacy_config_is_required_for_legacy_mode():
    with pytest.raises(ValueError, match="legacy must be a LegacyConfig or None, got True"):
        TTTConfig(legacy=True)
    assert LegacyConfig(rope_theta=500).rope_theta == 500.0 and LegacyConfig(mlp_hidden_dims=[8]).mlp_hidden_dims == (
        8,
    )


def test_meta_models_are_built_without_their_random_initialisation():
    """common.meta_lm skips the initialisation of meta tensors (13 s -> 0.2 s for Moshi 7B on 2 cores), builds every
    module on meta (moshi makes text_linear without its device argument) and leaves real tensors alone."""
    config = {**tiny_lm_config(), "dim": 64, "num_heads": 4}
    fast = common.meta_lm(config, torch.bfloat16)
    slow = LMModel(device="meta", dtype=torch.bfloat16, **config)
    shapes = {k: (v.shape, v.dtype, v.device) for k, v in slow.state_dict().items()}
    assert {k: (v.shape, v.dtype, v.device) for k, v in fast.state_dict().items()} == shapes
    with common.SkipInitOnMeta():
        real = torch.nn.init.kaiming_uniform_(torch.zeros(4, 4))
        meta = torch.nn.init.kaiming_uniform_(torch.zeros(4, 4, device="meta"))
    assert real.abs().sum() > 0 and meta.is_meta
