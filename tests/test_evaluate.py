"""The evaluate CLI end to end with tiny models (the checkpoint loader is replaced): outputs, resume, errors."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_mimi import tiny_mimi
from tiny_models import tiny_lm

from moshi_ttt import TTTConfig, apply_ttt, evaluate, score
from moshi_ttt.data.audio import load_audio
from moshi_ttt.data.stream import encode_streaming


def fake_load(ref, device, dtype):
    """Stands in for moshi_ttt.data.checkpoints.load: "base" and "ttt" refs give tiny models, anything else fails."""
    if ref == "missing":
        raise FileNotFoundError("checkpoint missing does not exist")
    model = tiny_lm(0) if ref == "base" else apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4))
    return types.SimpleNamespace(model=model, mimi=tiny_mimi())


@pytest.fixture()
def audio_files(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "_load_checkpoint", fake_load)
    rng = np.random.default_rng(0)
    files = []
    for i, seconds in enumerate((2.0, 3.1)):
        path = tmp_path / f"clip {i}.wav"
        sf.write(path, (0.2 * rng.standard_normal(int(seconds * 24000))).astype(np.float32), 24000)
        files.append(path)
    return files


def test_two_files_two_checkpoints_give_reports_and_the_library_numbers(tmp_path, audio_files, capsys):
    out = tmp_path / "out"
    argv = ["--audio", *map(str, audio_files), "--baseline", "base", "--ttt", "ttt", "--out", str(out)]
    assert evaluate.main([*argv, "--chunk-size", "8", "--sweep"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [f["dir"] for f in index["files"]] == ["0000_clip_0", "0001_clip_1"] and index["failures"] == []
    doc = json.loads((out / "0001_clip_1" / "results.json").read_text())
    assert set(doc["runs"]) == {"baseline", "ttt"} and doc["audio"]["tokens"] == 39
    assert doc["config"]["chunk_size"] == 8 and doc["config"]["mode"] == "chunked"
    for name in ("results.csv", "report.html"):
        assert (out / "0001_clip_1" / name).stat().st_size > 0
    assert [r["mini_batch_size"] for r in doc["tables"]["ttt: inner mini-batch size"]] == [1, 4, 8, 16, 32]
    assert "baseline: loss by context length" in doc["tables"] and "baseline: persistent states" not in doc["tables"]
    assert "ttt: persistent states" in (out / "0001_clip_1" / "report.html").read_text()
    # The file's TTT losses are what the library gives for that file alone.
    model = fake_load("ttt", "cpu", torch.float32).model
    expected = score(model, encode_streaming(tiny_mimi(), load_audio(audio_files[1])), "stream").loss[0]
    got = torch.tensor([[np.nan if v is None else v for v in cb] for cb in doc["runs"]["ttt"]["loss_per_codebook"]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, equal_nan=True)
    assert "2 file(s) scored" in capsys.readouterr().out


def test_manifest_runs_resume_and_bad_files_fail_with_one_line(tmp_path, audio_files, capsys):
    manifest = tmp_path / "files.jsonl"
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    lines = [{"path": audio_files[0].name, "duration": 2.0}, {"path": str(bad), "duration": 1.0}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    argv = ["--manifest", str(manifest), "--ttt", "ttt", "--mode", "stream", "--out", str(out)]
    assert evaluate.main(argv) == 1  # one file failed
    err = capsys.readouterr().err
    assert "error: bad.wav could not be read as audio" in err and "Traceback" not in err
    first = out / "0000_clip_0" / "results.json"
    stamp = first.stat().st_mtime_ns
    manifest.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"path": audio_files[1].name}) + "\n")
    assert evaluate.main(argv) == 0
    assert first.stat().st_mtime_ns == stamp  # already scored: skipped
    assert "(already scored)" in capsys.readouterr().out
    assert (out / "0001_clip_1" / "results.json").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--manifest", "nowhere.jsonl", "--ttt", "ttt"], "manifest nowhere.jsonl does not exist"),
        (["--audio", "x.wav", "--ttt", "missing"], "checkpoint missing does not exist"),
        (["--audio", "x.wav", "--ttt", "ttt", "--chunk-size", "99"], "exceeds the model's attention context"),
        (["--audio", "x.wav", "--ttt", "ttt", "--mini-batch-size", "0"], "mini_batch_size must be >= 1"),
    ],
    ids=["no_manifest", "bad_checkpoint", "chunk_too_big", "bad_mini_batch"],
)
def test_bad_input_exits_non_zero_with_one_line(tmp_path, audio_files, capsys, argv, message):
    argv = [str(audio_files[0]) if a == "x.wav" else a for a in argv]
    status = evaluate.main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert status != 0 and message in err and "Traceback" not in err
    if "--chunk-size" not in argv:
        assert len(err.splitlines()) == 1


LAUNCHER = """
import sys
sys.path.insert(0, {tests!r})
import test_evaluate
from moshi_ttt import evaluate
evaluate._load_checkpoint = test_evaluate.fake_load
sys.exit(evaluate.main(sys.argv[1:]))
"""


def test_torchrun_with_two_ranks_shards_the_manifest_and_rank_0_merges(tmp_path, audio_files):
    root = Path(__file__).resolve().parents[1]
    third = tmp_path / "clip 2.wav"
    sf.write(third, (0.2 * np.random.default_rng(1).standard_normal(30000)).astype(np.float32), 24000)
    files = [*audio_files, third]
    manifest = tmp_path / "files.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(f)}) + "\n" for f in files))
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(root / "tests")))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           "--manifest", str(manifest), "--ttt", "ttt", "--mode", "chunked", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((out / "index.json").read_text())
    assert [f["index"] for f in index["files"]] == [0, 1, 2]
    # Rank 0 scored file 0 and then file 2: file 2 still gets exactly its solo losses.
    doc = json.loads((out / "0002_clip_2" / "results.json").read_text())
    model = fake_load("ttt", "cpu", torch.float32).model
    solo = score(model, encode_streaming(tiny_mimi(), load_audio(third)), "chunked").loss[0]
    got = torch.tensor([[np.nan if v is None else v for v in cb] for cb in doc["runs"]["ttt"]["loss_per_codebook"]])
    torch.testing.assert_close(got, solo, rtol=0, atol=1e-4, equal_nan=True)  # float32 round-off; a leak is > 1e-2


def test_summary_has_the_headline_and_the_readings_a_transcript_names(tmp_path, audio_files, capsys):
    """A clip whose .txt names its readings gets them in results.json (version 2) and in the printed summary."""
    text = "[reading 1: 0.0-1.0 s] a b\n[filler] c\n[reading 2: 2.0-3.0 s] a b\n"
    audio_files[1].with_suffix(".txt").write_text(text)
    out = tmp_path / "out"
    argv = ["--audio", *map(str, audio_files), "--baseline", "base", "--ttt", "ttt", "--out", str(out)]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "0001_clip_1" / "results.json").read_text())
    run = doc["runs"]["ttt"]
    assert doc["version"] == 2 and run["context_tokens"] == fake_load("ttt", "cpu", None).model.context
    assert [(r["start_s"], r["end_s"]) for r in run["readings"]] == [(0.0, 1.0), (2.0, 3.0)]
    assert "readings" not in json.loads((out / "0000_clip_0" / "results.json").read_text())["runs"]["ttt"]
    assert run["peak_memory_mb"] is not None and run["peak_memory_mb"] >= 0
    assert "TTT vs baseline" in printed and "caveat" in printed  # 3.1 s is a short clip
    assert "reading 2 (2.0-3.0 s): baseline" in printed
