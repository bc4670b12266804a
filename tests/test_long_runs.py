"""Long runs of the evaluate CLI: rank -> device, resume after a kill between files and inside one, a refusal of
other settings, damaged files counted while the others go on, the streamed codes as the reference, the aggregate."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from test_evaluate import fake_load
from tiny_mimi import tiny_mimi

from moshi_ttt import evaluate, score
from moshi_ttt.data.audio import check_audio, encode, load_audio
from moshi_ttt.data.stream import encode_file
from moshi_ttt.distributed import Ranks, rank_device
from moshi_ttt.reports import aggregate


@pytest.mark.parametrize(
    "device,local_rank,local_world,gpus,expected",
    [
        ("cpu", 1, 2, 0, "cpu"),
        ("cuda", 0, 1, 1, "cuda"),
        ("cuda", 0, 2, 2, "cuda:0"),
        ("cuda", 1, 2, 2, "cuda:1"),
        ("cuda", 3, 4, 8, "cuda:3"),
        ("cuda:1", 0, 1, 2, "cuda:1"),
    ],
    ids=["cpu_any_rank", "one_process", "rank0_of_2", "rank1_of_2", "rank3_of_4_on_8", "explicit_single"],
)
def test_each_rank_takes_its_own_gpu(device, local_rank, local_world, gpus, expected):
    assert rank_device(device, local_rank, local_world, gpus) == expected


@pytest.mark.parametrize(
    "device,local_rank,local_world,gpus,message",
    [
        ("cuda", 2, 3, 2, "LOCAL_RANK 2 has no GPU of its own: torch sees 2"),
        ("cuda:0", 1, 2, 2, "puts all 2 processes of this machine on one GPU"),
        ("cuda", 0, 1, 0, "torch sees none"),
        ("cuda:3", 0, 1, 2, "torch sees 2 GPU"),
    ],
    ids=["more_ranks_than_gpus", "one_gpu_for_all", "no_gpu", "missing_index"],
)
def test_impossible_devices_are_one_sentence(device, local_rank, local_world, gpus, message):
    with pytest.raises(ValueError, match=message):
        rank_device(device, local_rank, local_world, gpus)


def test_ranks_come_from_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert Ranks.from_env(env) == Ranks(3, 4, 1, 2) and Ranks.from_env({}) == Ranks()
    with pytest.raises(ValueError, match="inconsistent"):
        Ranks.from_env({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.fixture()
def clips(tmp_path, monkeypatch):
    """Three speech-like clips of different lengths (one past the codec's 10 s window) and a loader of tiny models."""
    monkeypatch.setattr(evaluate, "_load_checkpoint", fake_load)
    rng = np.random.default_rng(0)
    files = []
    for i, seconds in enumerate((2.5, 11.0, 4.2)):
        t = np.arange(int(seconds * 16000)) / 16000
        pitch = 150 + 50 * np.sin(2 * np.pi * 0.5 * t)
        wave = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.05 * rng.standard_normal(t.size)
        files.append(tmp_path / f"clip{i}.flac")
        sf.write(files[-1], wave.astype(np.float32), 16000)
    return files


def argv(files, out, *extra):
    return ["--audio", *map(str, files), "--baseline", "base", "--ttt", "ttt", "--bin-size", "20", "--out", str(out),
            *extra]  # fmt: skip


def stamps(out) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/results.json")}


def test_the_scores_are_those_of_the_streamed_codes(clips, tmp_path, capsys):
    out = tmp_path / "out"
    assert evaluate.main(argv(clips[1:2], out, "--mode", "stream")) == 0
    assert "token" in capsys.readouterr().err  # progress counted in tokens
    doc = json.loads((out / "0000_clip1" / "results.json").read_text())
    codes = encode_file(tiny_mimi(), check_audio(clips[1]))  # [1, 8, T], the reference encoding
    assert doc["audio"]["tokens"] == codes.shape[-1] == 138
    got = torch.tensor([[np.nan if v is None else v for v in cb] for cb in doc["runs"]["ttt"]["loss_per_codebook"]])
    model = fake_load("ttt", "cpu", torch.float32).model
    for mode in ("full", "chunked", "stream"):  # the streamed codes score alike in every mode
        torch.testing.assert_close(got, score(model, codes, mode).loss[0], rtol=0, atol=1e-4, equal_nan=True)
    whole = encode(tiny_mimi(), load_audio(clips[1]))  # the whole-clip codes may differ a little past 10 s
    assert (whole == codes).float().mean() > 0.9


def test_a_kill_between_two_files_resumes_with_the_second(clips, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = evaluate.score_file

    def killed_at_the_second(file, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        return real(file, index, *args)

    monkeypatch.setattr(evaluate, "score_file", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(argv(clips, out))
    assert sorted(stamps(out)) == ["0000_clip0"]
    before = stamps(out)
    monkeypatch.setattr(evaluate, "score_file", real)
    assert evaluate.main(argv(clips, out)) == 0
    assert stamps(out)["0000_clip0"] == before["0000_clip0"]  # done: not scored again
    printed = capsys.readouterr().out
    assert "clip0.flac: baseline" in printed and printed.count("(already scored)") == 1
    assert json.loads((out / "aggregate.json").read_text())["files"]["scored"] == 3


def test_a_kill_inside_a_file_scores_it_again(clips, tmp_path, monkeypatch):
    """Killed after its results.json was written but before its done marker: the file is not taken as done."""
    out = tmp_path / "out"
    real = aggregate.file_bins

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(aggregate, "file_bins", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(argv(clips[:2], out))
    first = stamps(out)
    assert list(first) == ["0000_clip0"] and not (out / "0000_clip0" / "summary.json").exists()
    monkeypatch.setattr(aggregate, "file_bins", real)
    assert evaluate.main(argv(clips[:2], out)) == 0
    assert stamps(out)["0000_clip0"] != first["0000_clip0"]  # scored again
    index = json.loads((out / "index.json").read_text())
    assert [f.get("skipped", False) for f in index["files"]] == [False, False]
    assert not list(out.rglob(".*.tmp"))  # no temporary file left behind


def test_other_settings_or_checkpoints_are_refused_in_one_line(clips, tmp_path, capsys):
    out = tmp_path / "out"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(bytes(100))
    files = ["--audio", str(clips[0]), "--bin-size", "20", "--out", str(out)]
    assert evaluate.main([*files, "--ttt", str(ckpt)]) == 0
    capsys.readouterr()
    cases = [
        (["--ttt", str(ckpt), "--mode", "stream"], 'settings.options.mode "chunked" -> "stream"'),
        (["--ttt", "ttt"], "checkpoints.ttt.ref"),
        (["--baseline", "base", "--ttt", str(ckpt)], "checkpoints.baseline null"),
    ]
    for extra, message in cases:
        assert evaluate.main([*files, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "holds results of other settings" in err and message in err and len(err.splitlines()) == 1
    (ckpt / "model.safetensors").write_bytes(bytes(99) + b"\1")  # retrained in place: same ref, other content
    assert evaluate.main([*files, "--ttt", str(ckpt)]) == 2
    assert "checkpoints.ttt.files.model.safetensors.sha256" in capsys.readouterr().err
    (ckpt / "model.safetensors").write_bytes(bytes(100))
    assert evaluate.main([*files, "--ttt", str(ckpt)]) == 0  # the same again: resumes


def test_damaged_files_are_counted_and_the_others_go_on(clips, tmp_path, capsys):
    cut = tmp_path / "cut.flac"
    cut.write_bytes(clips[1].read_bytes()[: clips[1].stat().st_size // 2])
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio" * 50)
    manifest = tmp_path / "files.jsonl"
    paths = [clips[0], cut, garbage, clips[2]]
    manifest.write_text("".join(json.dumps({"path": str(p)}) + "\n" for p in paths))
    out = tmp_path / "out"
    common = ["--ttt", "ttt", "--baseline", "base", "--bin-size", "20", "--out", str(out)]
    assert evaluate.main(["--manifest", str(manifest), *common]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "cut.flac" in errors[0] and "garbage.wav" in errors[1]
    assert "Traceback" not in captured.err
    assert "2 file(s) scored" in captured.out and "2 failed" in captured.out
    index = json.loads((out / "index.json").read_text())
    assert [f["index"] for f in index["files"]] == [0, 3] and [f["index"] for f in index["failures"]] == [1, 2]
    doc = json.loads((out / "aggregate.json").read_text())
    assert doc["files"]["scored"] == 2 and doc["files"]["failed"] == 2
    assert doc["loss"]["ttt"]["files"] == [2, 2, 1]  # 32 and 53 tokens in bins of 20
    assert (out / "report.html").stat().st_size > 0 and (out / "aggregate.csv").exists()


def test_the_cli_takes_files_of_any_length_unless_capped():
    parser = evaluate.build_parser()
    assert parser.parse_args(["--audio", "x.wav", "--out", "o"]).max_seconds is None
    assert "memory grows with the file" in parser.format_help().replace("\n", " ").replace("  ", " ")
