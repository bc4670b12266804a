"""Hub references offline and at revisions, and load once: a TTT checkpoint and its base share the base's tensors.

Repos are written in kyutai's Hub layout into an offline local Hugging Face cache (`offline_hub_cache`), so the real
huggingface_hub and moshi CheckpointInfo code runs, with no network.
"""

import gc
import re
import weakref

import pytest
import torch
from tiny_models import random_audio_codes, tiny_lm_config

from bench.hub_cache import write_moshi_repo, write_ttt_checkpoint
from moshi_ttt import load
from moshi_ttt.compat.sequence import model_codes
from moshi_ttt.data.checkpoints.shared import move_together, weight_bytes
from moshi_ttt.ttt.apply import ttt_blocks

REPO = "kyutai/tiny-moshi"
BASE = f"hf://{REPO}"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def logits(model) -> torch.Tensor:
    codes = model_codes(model, random_audio_codes(1, 10, seed=2))
    with torch.no_grad():
        return model(codes).logits


@pytest.fixture
def hub_repo(offline_hub_cache):
    """A tiny moshi repo in the offline cache: main -> commit A (seed 0), tag v2 -> commit B (seed 1)."""
    write_moshi_repo(offline_hub_cache, tiny_lm_config(), dtype=torch.float32, repo=REPO, commit=COMMIT_A, mimi=False)
    write_moshi_repo(
        offline_hub_cache, tiny_lm_config(), dtype=torch.float32, repo=REPO, commit=COMMIT_B, refs=("v2",), seed=1,
        mimi=False,
    )  # fmt: skip
    return offline_hub_cache


def snapshot(cache, commit: str):
    return cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit


def test_hub_references_load_offline_and_at_their_revision(hub_repo):
    """No training_config.json, no network: the optional probes say "absent", the repo loads from the cache."""
    main = load(BASE, share=False)
    assert main.kind == "moshi" and main.lm_config == tiny_lm_config()
    expected_a = logits(load(str(snapshot(hub_repo, COMMIT_A)), share=False).model)
    expected_b = logits(load(str(snapshot(hub_repo, COMMIT_B)), share=False).model)
    assert not torch.allclose(expected_a.nan_to_num(), expected_b.nan_to_num())
    torch.testing.assert_close(logits(main.model), expected_a, rtol=0, atol=0, equal_nan=True)
    for ref in (f"{BASE}@v2", f"{BASE}@{COMMIT_B}"):
        torch.testing.assert_close(logits(load(ref, share=False).model), expected_b, rtol=0, atol=0, equal_nan=True)


def test_a_revision_missing_from_the_offline_cache_names_the_hub_cli(hub_repo):
    with pytest.raises(FileNotFoundError, match=f"`hf download {REPO} --revision v3`"):
        load(f"{BASE}@v3")
    with pytest.raises(FileNotFoundError, match="`hf download kyutai/other`"):
        load("hf://kyutai/other")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (f"{BASE}/nowhere", f"Hub repo {REPO} has no folder 'nowhere' in the local Hugging Face cache: check the path"),
        (f"{BASE}@v2/nowhere", f"Hub repo {REPO} at revision v2 has no folder 'nowhere'"),
        (f"{BASE}@", "has nothing after '@': name a branch, tag or commit"),
        ("hf://kyutai", "'hf://kyutai' is not a Hub reference: write hf://owner/repo"),
        ("hf://kyutai/../x", "does not name a Hub repo"),
        ("hf:/kyutai/tiny-moshi", "'hf:/kyutai/tiny-moshi' is neither a local path nor a Hub reference"),
        ("https://huggingface.co/kyutai/x", "'https://huggingface.co/kyutai/x' is neither a local path nor a Hub"),
    ],
    ids=["missing_folder", "missing_folder_at_revision", "empty_revision", "no_repo", "dots", "one_slash", "url"],
)
def test_a_bad_reference_is_one_sentence_naming_it(hub_repo, ref, message):
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(message)) as error:
        load(ref)
    assert "\n" not in str(error.value) and "Errno" not in str(error.value)


def test_a_repo_without_config_json_is_taken_as_moshi_7b_offline_too(offline_hub_cache):
    """moshi assumes Moshi 7B without config.json; offline, the missing file must not stop the load first."""
    write_moshi_repo(offline_hub_cache, tiny_lm_config(), dtype=torch.float32, repo=REPO, with_config=False, mimi=False)
    with pytest.raises(ValueError, match="does not match the model: missing keys"):
        load(BASE)  # the tiny weights are not 7B-shaped: the key check speaks, not the Hub


@pytest.mark.parametrize("order", ["baseline_first", "ttt_first"])
def test_a_ttt_checkpoint_and_its_base_hold_one_copy_of_the_base(hub_repo, tmp_path, order):
    ttt_dir = write_ttt_checkpoint(tmp_path / "ttt", BASE, tiny_lm_config(), layers="1,2", dtype=torch.float32)
    refs = [BASE, str(ttt_dir)] if order == "baseline_first" else [str(ttt_dir), BASE]
    loaded = {ref: load(ref).model for ref in refs}
    baseline, ttt = loaded[BASE], loaded[str(ttt_dir)]
    assert not ttt_blocks(baseline) and sorted(ttt_blocks(ttt)) == [1, 2]
    # The baseline adds no byte to the TTT model: every base tensor is the same memory.
    assert weight_bytes(baseline, ttt) == weight_bytes(ttt) > weight_bytes(baseline)
    base_weight = "transformer.layers.1.self_attn.in_projs.0.weight"
    assert baseline.state_dict()[base_weight].data_ptr() == ttt.state_dict()[base_weight].data_ptr()
    # ...and both compute what models that share nothing compute.
    alone = {ref: load(ref, share=False).model for ref in refs}
    assert weight_bytes(*alone.values()) > weight_bytes(baseline, ttt)
    for ref in refs:
        torch.testing.assert_close(logits(loaded[ref]), logits(alone[ref]), rtol=0, atol=0, equal_nan=True)


def test_revisions_and_dtypes_are_different_bases(hub_repo):
    main, v2 = load(BASE).model, load(f"{BASE}@v2").model
    bf16 = load(BASE, dtype=torch.bfloat16).model
    assert weight_bytes(main, v2) == weight_bytes(main) + weight_bytes(v2)
    assert weight_bytes(main, bf16) == weight_bytes(main) + weight_bytes(bf16)
    assert weight_bytes(main, load(f"{BASE}@main").model) == weight_bytes(main)  # one revision, two spellings
    # Offline the cache says which commit a branch or tag is: a tag and its hash are one base, as main and its hash.
    assert weight_bytes(v2, load(f"{BASE}@{COMMIT_B}").model) == weight_bytes(v2)
    assert weight_bytes(main, load(f"{BASE}@{COMMIT_A}").model) == weight_bytes(main)


def test_online_a_branch_and_a_hash_stay_apart(hub_repo, monkeypatch):
    """Online the branch may have moved since the cache was filled: its name is the key, not the cached hash."""
    from huggingface_hub import constants

    from moshi_ttt.data.checkpoints.shared import canonical_ref

    assert canonical_ref(BASE) == canonical_ref(f"{BASE}@{COMMIT_A}") == f"{BASE}@{COMMIT_A}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert canonical_ref(BASE) == f"{BASE}@main" and canonical_ref(f"{BASE}@{COMMIT_A}") == f"{BASE}@{COMMIT_A}"


def test_the_pool_keeps_nothing_alive_and_never_shares_changed_weights(hub_repo, tmp_path):
    ttt_dir = write_ttt_checkpoint(tmp_path / "ttt", BASE, tiny_lm_config(), layers="1", dtype=torch.float32)
    expected = logits(load(str(ttt_dir), share=False).model)
    baseline = load(BASE).model
    gone = weakref.ref(baseline)
    del baseline
    gc.collect()
    assert gone() is None  # the pool holds weak references only
    baseline = load(BASE).model
    with torch.no_grad():  # trained in place after loading: its weights are no longer the file's
        baseline.transformer.layers[0].self_attn.out_projs[0].weight.add_(1.0)
    ttt = load(str(ttt_dir)).model
    assert weight_bytes(baseline, ttt) == weight_bytes(baseline) + weight_bytes(ttt)
    torch.testing.assert_close(logits(ttt), expected, rtol=0, atol=0, equal_nan=True)


def test_dtype_auto_shares_with_the_dtype_it_stands_for(hub_repo, tmp_path):
    """dtype=None: float32 for a small model on the CPU, so it shares with an explicit float32 load."""
    ttt_dir = write_ttt_checkpoint(tmp_path / "ttt", BASE, tiny_lm_config(), layers="1", dtype=torch.float32)
    baseline = load(BASE, dtype=torch.float32).model
    ttt = load(str(ttt_dir), dtype=None).model
    assert ttt_blocks(ttt)[1].wq.weight.dtype == torch.float32
    assert weight_bytes(baseline, ttt) == weight_bytes(ttt)


def test_a_ttt_checkpoint_on_the_hub_over_a_hub_base_loads_offline(hub_repo, tmp_path):
    """Our format in a Hub repo (snapshot_download of its folder), its base another Hub repo: both from the cache."""
    from bench.hub_cache import snapshot_dir

    local = write_ttt_checkpoint(tmp_path / "ttt", f"{BASE}@v2", tiny_lm_config(), layers="1", dtype=torch.float32)
    remote = snapshot_dir(hub_repo, "me/ttt-run", commit="c" * 40) / "run1"
    remote.mkdir()
    for file in local.iterdir():
        (remote / file.name).write_bytes(file.read_bytes())
    ckpt = load("hf://me/ttt-run/run1")
    assert ckpt.kind == "ours" and list(ttt_blocks(ckpt.model)) == [1]
    torch.testing.assert_close(
        logits(ckpt.model), logits(load(str(local), share=False).model), rtol=0, atol=0, equal_nan=True
    )
    assert weight_bytes(ckpt.model, load(f"{BASE}@v2").model) == weight_bytes(ckpt.model)


def test_models_that_share_a_base_move_together_keeping_one_copy(hub_repo, tmp_path):
    """A cast to bfloat16 stands in for a move to the GPU (the same `_apply` path): the baseline and the TTT model
    still hold one copy of the base, the fast weights stay float32, and the values are those of `.to()` alone."""
    ttt_dir = write_ttt_checkpoint(tmp_path / "ttt", BASE, tiny_lm_config(), layers="1,2", dtype=torch.float32)
    baseline_ckpt, ttt_ckpt = load(BASE, load_mimi=False), load(str(ttt_dir))
    baseline, ttt = baseline_ckpt.model, ttt_ckpt.model
    expected = {name: load(ref, share=False).model.to(torch.bfloat16) for name, ref in (("b", BASE), ("t", ttt_dir))}
    one_base = weight_bytes(baseline)
    move_together([baseline, ttt, ttt, None], dtype=torch.bfloat16)  # a module twice, a missing codec: skipped
    assert weight_bytes(baseline) * 2 == one_base  # converted, not copied beside the float32 originals
    assert weight_bytes(baseline, ttt) == weight_bytes(ttt)  # the baseline adds no byte: one base
    base_weight = "transformer.layers.1.self_attn.in_projs.0.weight"
    assert baseline.state_dict()[base_weight].data_ptr() == ttt.state_dict()[base_weight].data_ptr()
    assert baseline.state_dict()[base_weight].dtype == torch.bfloat16
    assert ttt_blocks(ttt)[1].W1.dtype == torch.float32  # fast weights: float32 under any cast
    for model, alone in ((baseline, expected["b"]), (ttt, expected["t"])):
        torch.testing.assert_close(logits(model), logits(alone), rtol=0, atol=0, equal_nan=True)
    # Moved one by one, two models over one base hold two copies of it: what move_together avoids.
    shared = [load(BASE).model, load(str(ttt_dir)).model]
    assert weight_bytes(*shared) == weight_bytes(shared[1])
    for model in shared:
        model.to(torch.bfloat16)
    assert weight_bytes(*shared) == weight_bytes(shared[0]) + weight_bytes(shared[1])


def test_move_together_moves_devices_and_keeps_the_fast_weights_float32(hub_repo, tmp_path):
    """A real device move on a CPU-only machine: to the meta device (what `to("cuda")` does, minus the values)."""
    ttt_dir = write_ttt_checkpoint(tmp_path / "ttt", BASE, tiny_lm_config(), layers="1", dtype=torch.float32)
    baseline, ttt = load(BASE, dtype=torch.bfloat16).model, load(str(ttt_dir), dtype=torch.bfloat16).model
    move_together([baseline, ttt], device="meta")
    tensors = [*baseline.parameters(), *baseline.buffers(), *ttt.parameters(), *ttt.buffers()]
    assert all(t.is_meta for t in tensors)
    assert ttt_blocks(ttt)[1].W1.dtype == torch.float32 and baseline.text_emb.weight.dtype == torch.bfloat16
