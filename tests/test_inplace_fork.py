"""Checkpoints of the In-Place TTT fork, written by its own code, load with its forward: our logits against the
fork's (tests/data/inplace_fork/README.md says how they were made), both layouts, with and without YaRN."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_lm_config

from moshi_ttt import exact_streaming, load, score
from moshi_ttt.data.checkpoints.inplace_format import InPlaceOptions, is_inplace, load_inplace
from moshi_ttt.ttt.inplace import inplace_blocks, inplace_states

FORK_DATA = Path(__file__).parent / "data" / "inplace_fork"
CARD = 16  # the fixtures' tiny_lm_config(card=16)
CASES = ["ttt_only_lora", "full_yarn", "lora_ttt_yarn", "full_default_clip", "unfrozen_default_clip"]
LORA_LAYOUT = {"ttt_only_lora", "lora_ttt_yarn", "unfrozen_default_clip"}
WORKING_CLIP = {"ttt_only_lora", "full_yarn", "lora_ttt_yarn"}  # clip 4, none, 4: updates big enough to see
# float32 round-off of two implementations of the same math (measured: 0 for every case but the LoRA + TTT one,
# whose adapters the fork runs unmerged, 1.7e-6)
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def fork_base(tmp_path_factory) -> Path:
    """The base model of every case, as a moshi-format directory: the plain tensors of a full fork checkpoint."""
    tensors = load_file(str(FORK_DATA / "full_yarn" / "consolidated.safetensors"))
    base = {k: v for k, v in tensors.items() if ".gating.w_down" not in k and ".target_generator." not in k}
    directory = tmp_path_factory.mktemp("inplace_fork_base")
    save_file(base, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(tiny_lm_config(card=CARD)))
    return directory


def load_case(name: str, base: Path, options: InPlaceOptions | None = None):
    return load_inplace(
        FORK_DATA / name, ref=name, base=str(base), device="cpu", dtype=torch.float32, load_fn=load, options=options
    )


def presets(name: str) -> list[tuple[str, InPlaceOptions]]:
    """The fork's inference (float32 YaRN frequencies, context x scale) and, with YaRN, its training runs' settings."""
    found = [("", InPlaceOptions())]
    if "yarn" in name:
        found.append(("training_", InPlaceOptions(yarn_frequencies="bfloat16", yarn_extend_context=False)))
    return found


@pytest.mark.parametrize("name", CASES)
def test_fork_checkpoints_give_the_fork_logits(name, fork_base):
    """T = 22 tokens, not a multiple of the chunk (8): the logits of the fork's own forward (its training path, which
    reads each chunk's update from the next chunk on) within 1e-5, for each preset."""
    outputs = load_file(str(FORK_DATA / name / "fork_outputs.safetensors"))
    for prefix, options in presets(name):
        model = load_case(name, fork_base, options).model
        with torch.no_grad():
            out = model(outputs["codes"])
        mask = outputs[f"{prefix}mask"]
        assert torch.equal(out.mask, mask)
        torch.testing.assert_close(out.logits[mask], outputs[f"{prefix}logits"][mask], **TOLERANCE)


@pytest.mark.parametrize("name", sorted(WORKING_CLIP))
def test_the_fork_logits_need_the_update_the_gate_and_yarn(tmp_path, name, fork_base):
    """The comparison above can fail: without the update (learning_rate 0), with moshi's SiLU gate, or with the
    other YaRN settings the logits move by far more than the tolerance."""
    outputs = load_file(str(FORK_DATA / name / "fork_outputs.safetensors"))
    mask = outputs["mask"]

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(outputs["codes"]).logits[mask]

    reference = outputs["logits"][mask]
    frozen = copy_case(name, tmp_path)
    config = json.loads((frozen / "config.json").read_text())
    config["ttt_config"]["learning_rate"] = 0.0
    (frozen / "config.json").write_text(json.dumps(config))
    no_update = load_inplace(frozen, ref=name, base=str(fork_base), device="cpu", dtype=torch.float32, load_fn=load)
    assert (logits(no_update.model) - reference).abs().max() > 1e-2
    silu = load_case(name, fork_base, InPlaceOptions(activation="silu")).model
    assert (logits(silu) - reference).abs().max() > 1e-2
    if "yarn" in name:
        assert (outputs["training_logits"][mask] - reference).abs().max() > 1e-3


def test_the_fork_eval_path_differs_from_its_training_path_after_the_first_ttt_layer(fork_base):
    """The fork's eval forward over one call of 22 tokens outputs Z W0^T for every token, then writes W0 + lr (clipped
    dW of chunks 0 and 1) into w_down. Its first TTT layer (1) reads nothing that an update changed, so our state after
    the same tokens holds the same fast weight; layer 2 reads layer 1's outputs, which the training path (ours)
    computes with layer 1's updated weights and the one-call eval path with W0: its update differs."""
    outputs = load_file(str(FORK_DATA / "ttt_only_lora" / "fork_outputs.safetensors"))
    model = load_case("ttt_only_lora", fork_base).model
    codes = outputs["codes"]
    with torch.no_grad(), exact_streaming(model.transformer, 1, codes.shape[-1]):  # 22 tokens > the context, 16
        model(codes)
        states = inplace_states(model)
    for layer, state in states.items():
        expected = outputs[f"eval_w_down_after.{layer}"]
        assert not torch.equal(expected, inplace_blocks(model)[layer].w_down)  # the update moved it
        assert int(state.position[0]) == 22 % 8
    torch.testing.assert_close(states[1].w[0], outputs["eval_w_down_after.1"], rtol=1e-6, atol=1e-6)
    assert (states[2].w[0] - outputs["eval_w_down_after.2"]).abs().max() > 1e-4
    # the logits of step t read the transformer at t and, for the delayed codebooks, t + 1: steps < 7 read no update
    torch.testing.assert_close(outputs["eval_logits"][:, :, :7], outputs["logits"][:, :, :7])
    mask = outputs["mask"]
    assert (outputs["eval_logits"][mask] - outputs["logits"][mask]).abs().max() > 1e-2  # after: the eval call read none


@pytest.mark.parametrize("name", ["ttt_only_lora", "full_yarn"])
def test_three_modes_give_the_same_numbers_on_fork_checkpoints(name, fork_base):
    """Past several chunks and (YaRN case) past the attention context: full, chunked (odd chunk) and stream agree."""
    model = load_case(name, fork_base).model
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, CARD, (2, 8, 70), generator=g)
    full = score(model, codes, mode="full")
    for mode, chunk in (("chunked", 7), ("chunked", None), ("stream", None)):
        other = score(model, codes, mode=mode, chunk_size=chunk)
        torch.testing.assert_close(other.loss, full.loss, rtol=1e-4, atol=1e-4, equal_nan=True)
        for layer, tel in full.telemetry.inplace.items():
            mine = other.telemetry.inplace[layer]
            assert torch.equal(mine.update_step, tel.update_step)
            torch.testing.assert_close(mine.drift, tel.drift, rtol=1e-4, atol=1e-6)


def test_detected_by_load_as_a_directory_or_a_weights_file(fork_base):
    ckpt = load(FORK_DATA / "full_default_clip")
    assert ckpt.kind == "inplace_ttt" and ckpt.ttt_config is None and sorted(inplace_blocks(ckpt.model)) == [0, 1, 2]
    assert any("never to change" in note for note in ckpt.notes)  # the default clip 1e-5, predicted at load
    by_file = load(FORK_DATA / "ttt_only_lora" / "lora.safetensors", base=str(fork_base))
    assert by_file.kind == "inplace_ttt" and sorted(inplace_blocks(by_file.model)) == [1, 2]
    assert any("does not hold it" in note for note in by_file.notes)  # w_down from the base, as the fork
    assert is_inplace(FORK_DATA / "lora_ttt_yarn") and not is_inplace(fork_base)


def test_config_values_reach_the_layers(fork_base):
    cfg = next(iter(inplace_blocks(load_case("full_yarn", fork_base).model).values())).cfg
    assert (cfg.layers, cfg.chunk_size, cfg.lr, cfg.clip, cfg.activation) == ((0, 2), 8, 0.02, None, "gelu")
    cfg = next(iter(inplace_blocks(load_case("unfrozen_default_clip", fork_base).model).values())).cfg
    assert (cfg.layers, cfg.clip, cfg.conv_kernel_size) == ((1,), 1e-5, 2)
    model = load_case("lora_ttt_yarn", fork_base).model
    assert model.context == 64 and model.transformer.layers[0].self_attn.context == 64  # 16 x scale 4
    model = load_case("lora_ttt_yarn", fork_base, InPlaceOptions(yarn_extend_context=False)).model
    assert model.context == 16


def copy_case(name: str, tmp_path: Path) -> Path:
    directory = tmp_path / name
    shutil.copytree(FORK_DATA / name, directory)
    return directory


def edit_weights(directory: Path, edit) -> None:
    path = next(directory.glob("*.safetensors"))
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "name, edit, message",
    [
        pytest.param(
            "ttt_only_lora",
            lambda t: t.update({"transformer.layers.1.gating.surprise": torch.zeros(2)}),
            r"unknown keys: \['transformer.layers.1.gating.surprise'\]",
            id="unknown-key",
        ),
        pytest.param(
            "ttt_only_lora",
            lambda t: t.pop("transformer.layers.2.gating.target_generator.conv1d.conv.weight"),
            r"missing keys: \['transformer.layers.2.gating.target_generator.conv1d.conv.weight'\]",
            id="missing-conv",
        ),
        pytest.param(
            "lora_ttt_yarn",
            lambda t: t.pop("depformer_in.3.lora_B.weight"),
            r"missing keys: \['depformer_in.3.lora_B.weight'\]",
            id="missing-lora",
        ),
        pytest.param(
            "full_default_clip",
            lambda t: t.pop("transformer.layers.0.gating.target_generator.W_target.weight"),
            r"missing keys: transformer.layers.0.gating.target_generator.W_target.weight",
            id="full-missing",
        ),
        pytest.param(
            "full_default_clip",
            lambda t: t.update({"transformer.layers.1.gating.w_down": torch.zeros(3, 3)}),
            r"wrong shapes: transformer.layers.1.gating.w_down \(expected \[32, 42\], found \[3, 3\]\)",
            id="full-shape",
        ),
    ],
)
def test_bad_weights_are_named(tmp_path, fork_base, name, edit, message):
    directory = copy_case(name, tmp_path)
    edit_weights(directory, edit)
    with pytest.raises(ValueError, match=message):
        load(directory, base=str(fork_base))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ttt_config": {"enabled": True, "layer_frequency": 1, "warmup": 3}}, r"unknown ttt_config fields .+warmup"),
        ({"ttt_config": {"enabled": False, "layer_frequency": 1}}, "enabled is false"),
        ({"ttt_config": {"enabled": True, "layer_frequency": 1, "start_layer": 5}}, "names none of the 3 layers"),
        ({"yarn_config": {"enabled": True, "scale": 2.0, "ramp": 1}}, r"unknown yarn_config fields \['ramp'\]"),
        ({"context": 12}, "disagree on context: 12 vs 16"),
        ({"depformer_weights_per_step": False}, "depth transformer without weights per step"),
    ],
)
def test_bad_configs_are_named(tmp_path, fork_base, change, message):
    directory = copy_case("ttt_only_lora", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load(directory, base=str(fork_base))


def test_the_fork_files_are_what_its_trainer_writes():
    """The key sets of the stored files are the issue's: target generator only for TTT-only runs, LoRA pairs and
    frozen_W for LoRA + TTT, whole layers with w_down for unfrozen layers, everything for consolidated."""

    def keys(name: str) -> set[str]:
        return set(load_file(str(next((FORK_DATA / name).glob("[cl]*.safetensors")))))

    layer = re.compile(r"^transformer\.layers\.1\.gating\.(.+)$")
    only = {m[1] for k in keys("ttt_only_lora") if (m := layer.match(k))}
    assert only == {"target_generator.conv1d.conv.weight", "target_generator.W_target.weight"}
    lora = {m[1] for k in keys("lora_ttt_yarn") if (m := layer.match(k))}
    assert "target_generator.W_target.frozen_W.weight" in lora and "linear_in.lora_A.weight" in lora
    assert {"w_down", "w_down_pretrained", "linear_out.weight"} <= {m[1] for k in keys("unfrozen_default_clip")
                                                                    if (m := layer.match(k))}  # fmt: skip
    assert "transformer.layers.0.gating.w_down" in keys("full_default_clip")


def test_lora_layout_without_base_names_the_forks_hub_base(offline_hub_cache):
    with pytest.raises(FileNotFoundError, match="hf download kyutai/moshiko-pytorch-bf16"):
        load(FORK_DATA / "ttt_only_lora")
