"""A checkpoint read from the Hub names only what lies in its repo (or other hf:// references): its config.json can
never send the loader to the server's own files, whatever it names. Local checkpoints are the user's own."""

import json

import pytest
from tiny_models import tiny_lm, tiny_lm_config

from bench.hub_cache import snapshot_dir
from moshi_ttt import TTTConfig, apply_ttt, load
from moshi_ttt.data.checkpoints.hub import HubRef, cached_snapshot, confined_ref
from moshi_ttt.data.checkpoints.ours import save


@pytest.fixture
def private(tmp_path):
    """A plain checkpoint on the server, outside any allow-list and outside the Hugging Face cache."""
    return save(tmp_path / "private" / "base", tiny_lm(0), lm_config=tiny_lm_config())


def hub_ttt_checkpoint(cache, **changes):
    """Our TTT checkpoint over a base, as a Hub repo's snapshot, its config.json changed as a hostile author would."""
    snapshot = snapshot_dir(cache, repo="evil/repo")
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4))
    save(snapshot, model, base="hf://kyutai/moshiko-pytorch-bf16")  # only the TTT tensors
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, **changes}))
    return snapshot


@pytest.mark.parametrize("field", ["base", "mimi"])
def test_a_hub_config_naming_a_server_path_is_refused_without_reading_it(offline_hub_cache, private, field):
    hub_ttt_checkpoint(offline_hub_cache, **{field: str(private)})
    with pytest.raises(ValueError, match=f"names {field} .*only hf:// references or files inside its repo"):
        load("hf://evil/repo")


@pytest.mark.parametrize("ref", ["/etc/passwd", "../../models--other--repo/snapshots/x", "a/../../..", "http://x/y", 3])
def test_confined_ref_refuses_what_leads_out_of_a_hub_repo(offline_hub_cache, ref):
    snapshot = snapshot_dir(offline_hub_cache)
    with pytest.raises(ValueError, match="only hf:// references or files inside its repo"):
        confined_ref(ref, snapshot, "mimi_name")


def test_confined_ref_takes_files_inside_the_repo_and_anything_local(offline_hub_cache, tmp_path):
    snapshot = snapshot_dir(offline_hub_cache)
    for ref in ("tokenizer.model", "sub/../codec.safetensors", "hf://kyutai/moshiko-pytorch-bf16", None):
        assert confined_ref(ref, snapshot / "folder", "mimi_name") == ref
    assert confined_ref("/anywhere/base", tmp_path / "local_checkpoint", "base") == "/anywhere/base"


@pytest.mark.parametrize("ref", ["hf://a/b@..%2F..%2Fx", "hf://a/b@v1%2F..%2Fx", "hf://a/b@.", "hf://a/b@x%2F%2Fy"])
def test_a_revision_cannot_lead_out_of_the_cache(ref):
    with pytest.raises(ValueError, match="revision"):
        HubRef.parse(ref)


def test_a_pointer_file_that_leads_away_finds_no_snapshot(offline_hub_cache):
    snapshot_dir(offline_hub_cache, repo="a/b")
    (offline_hub_cache / "models--a--b" / "refs" / "main").write_text("../../../elsewhere")
    assert cached_snapshot(HubRef.parse("hf://a/b")) is None
