"""The app: figure builder, handlers without a server, and the real server through gradio_client."""

import json
import math
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from conftest import raw_values

from moshi_ttt.app.engine import compare_file, live_options
from moshi_ttt.app.figure import live_figure
from moshi_ttt.app.handlers import run_handler, run_specs
from moshi_ttt.app.models import ModelCache, build_allow_list
from moshi_ttt.app.resources import RunFolders


def handler(cache, assets):
    """The Run handler called directly (no server, no request), reading the test's clips as if they were uploads.

    Returns:
        run(**values by name): the handler's outputs, given the named values and the controls' defaults for the rest.
    """
    specs = run_specs(cache.names(), [str(assets)], [])
    run = run_handler(cache, specs, RunFolders(assets / "runs"))
    return lambda **given: run(None, *raw_values(specs, **{"max_seconds": 60, **given}))


def run_handler_to_end(cache, clip, mode="chunked", mini_batch_size=4):
    return list(handler(cache, clip.parent)(audio=str(clip), mode=mode, mini_batch_size=mini_batch_size))


def test_allow_list_names_checkpoints_and_skips_the_codec(assets):
    entries = build_allow_list([assets / "checkpoints", assets / "other"], use_env=False)
    assert sorted(entries) == ["baseline", "ttt", "wide_vocab"]
    with pytest.raises(ValueError, match="unknown checkpoint"):
        ModelCache(entries).get("/etc/passwd")


def test_allow_list_spells_each_hub_reference_once():
    entries = build_allow_list([], ["hf://kyutai/moshiko-pytorch-bf16", "hf://kyutai/moshiko-pytorch-bf16/",
                                    "hf://a/b@v1//sub/"], use_env=False)  # fmt: skip
    assert {name: e.ref for name, e in entries.items()} == {
        "kyutai/moshiko-pytorch-bf16": "hf://kyutai/moshiko-pytorch-bf16",
        "a/b@v1/sub": "hf://a/b@v1/sub",
    }
    with pytest.raises(ValueError, match="not a Hub reference"):
        build_allow_list([], ["hf://a"], use_env=False)
    with pytest.raises(ValueError, match=r"'\.\.' in its path"):
        build_allow_list([], ["hf://a/b/../../../etc"], use_env=False)


def test_one_copy_of_the_base_weights_serves_both_models(cache):
    base, ttt = cache.get("baseline").model, cache.get("ttt").model
    a = base.transformer.layers[0].self_attn.in_projs[0].weight
    b = ttt.transformer.layers[0].self_attn.in_projs[0].weight
    assert a.data_ptr() == b.data_ptr()
    assert ttt.transformer.layers[1].ttt.W1.data_ptr() not in {p.data_ptr() for p in base.parameters()}


def test_handler_streams_updates_then_the_table_and_downloads(assets, cache):
    outputs = run_handler_to_end(cache, assets / "a.wav")
    assert len(outputs) >= 2  # at least one live update before the final one
    figure, status, headline_md, rows, readings, files, notes, codebook_figure, codebook_rows = outputs[-1]
    assert [r[0] for r in rows] == ["baseline", "ttt"] and status.startswith("Done")
    assert "TTT vs baseline, the whole clip" in headline_md and "shorter than" in headline_md  # a 3 s clip: caveat
    names = sorted(Path(f).name for f in files)
    assert names == ["a_report.html", "a_results.csv", "a_results.json"]
    doc = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    assert doc["version"] == 2 and set(doc["runs"]) == {"baseline", "ttt"}
    run = doc["runs"]["ttt"]
    assert run["tokens"] == len(run["loss_per_token"]) == math.ceil(3.0 * 12.5)
    assert run["drift"] and all(len(d["W1"]) == len(d["t"]) > 0 for d in run["drift"].values())
    assert figure.type == "plotly"
    ttt_drift = [t for t in json.loads(figure.plot)["data"] if t["yaxis"] == "y3"]
    assert len(ttt_drift) == 4
    assert codebook_figure.type == "plotly" and "| semantic (codebook 0) |" in codebook_rows
    assert "| acoustic (codebooks 1-7) |" in codebook_rows


def test_live_and_chunked_modes_give_the_same_losses(assets, cache):
    def losses(mode):
        cfg = live_options(mode, mini_batch_size=4)
        *_, last = compare_file(cache, str(assets / "a.wav"), "baseline", "ttt", cfg, 60)
        return {k: np.array(v["loss_per_token"], dtype=float) for k, v in last.document["runs"].items()}

    a, b = losses("chunked"), losses("stream")
    for run in a:
        np.testing.assert_allclose(a[run], b[run], atol=1e-4, rtol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("clip", "baseline", "message"),
    [
        ("garbage.wav", "baseline", "could not be read as audio"),
        ("missing.wav", "baseline", "no longer on the server"),
        ("a.wav", "wide_vocab", "do not read the same audio codes"),
    ],
    ids=["garbage", "missing", "incompatible"],
)
def test_bad_input_is_one_readable_error(assets, cache, clip, baseline, message):
    run = handler(cache, assets)
    with pytest.raises(gr.Error, match=message):
        list(run(audio=str(assets / clip), baseline=baseline, mini_batch_size=4))
    with pytest.raises(gr.Error, match="Upload or record"):
        list(run(audio=None, mini_batch_size=4))


def _predict(client, clip):
    from gradio_client import handle_file

    return client.predict(handle_file(str(clip)), "baseline", "ttt", 4, True, "chunked", 60, api_name="/run")


def _losses(result) -> dict:
    files = result[5]
    path = next(f["path"] if isinstance(f, dict) else f for f in files if str(f).endswith("json") or "json" in str(f))
    doc = json.loads(Path(path).read_text())
    return {run: rec["loss_per_token"] for run, rec in doc["runs"].items()}


def test_end_to_end_through_gradio_client(server, assets):
    from gradio_client import Client

    client = Client(server, verbose=False)
    result = _predict(client, assets / "a.wav")
    assert result[3]["data"][0][0] == "baseline"
    assert set(_losses(result)) == {"baseline", "ttt"}
    with pytest.raises(Exception, match="could not be read as audio"):
        _predict(client, assets / "garbage.wav")
    again = _predict(client, assets / "b.wav")  # the app keeps serving
    assert set(_losses(again)) == {"baseline", "ttt"}


def test_two_concurrent_jobs_get_their_solo_results(server, assets):
    from gradio_client import Client

    client = Client(server, verbose=False)
    solo = {clip: _losses(_predict(client, assets / clip)) for clip in ("a.wav", "b.wav")}
    results, errors = {}, []

    def job(clip):
        try:
            results[clip] = _losses(_predict(Client(server, verbose=False), assets / clip))
        except Exception as e:  # noqa: BLE001 - collected and re-raised by the test
            errors.append(e)

    threads = [threading.Thread(target=job, args=(clip,)) for clip in ("a.wav", "b.wav")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for clip in ("a.wav", "b.wav"):
        for run in ("baseline", "ttt"):
            np.testing.assert_array_equal(np.array(results[clip][run], float), np.array(solo[clip][run], float))


def test_stop_cancels_a_running_job_and_frees_the_models(server, assets, cache, tmp_path):
    """The Stop button's mechanism (Gradio's cancel of the run event, here through gradio_client): the job ends
    early, its streaming sessions are closed (the shared models are no longer streaming, their locks are free)
    and the next run works."""
    import time

    import soundfile as sf
    from conftest import SR, speechlike
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    long_clip = tmp_path / "long.wav"
    sf.write(long_clip, speechlike(90.0, 3), SR)
    client = Client(server, verbose=False)
    job = client.submit(
        handle_file(str(long_clip)), "baseline", "ttt", 4, True, "live token by token", 120, api_name="/run"
    )
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:  # the first live update arrived
        time.sleep(0.05)
    assert job.outputs(), "no live update within 60 s"
    job.cancel()
    models = [cache.get(name).model for name in ("baseline", "ttt")]
    while time.monotonic() < deadline and (not job.done() or any(m.is_streaming for m in models)):
        time.sleep(0.05)
    assert job.done() and job.status().code in (Status.CANCELLED, Status.FINISHED)
    assert len(job.outputs()) < 90 * 12.5 / 25 / 2  # ended early: a whole run gives one update per 25 tokens
    assert not any(m.is_streaming for m in models)
    for name in ("baseline", "ttt"):
        lock = cache.lock(cache.get(name).model)
        assert lock.acquire(timeout=5)
        lock.release()
    assert set(_losses(_predict(client, assets / "b.wav"))) == {"baseline", "ttt"}


def test_cpu_threads_are_shared_out_between_concurrent_runs():
    from moshi_ttt.app.engine import threads_per_run

    assert [threads_per_run(c, cpus=2) for c in (1, 2, 3)] == [2, 1, 1]
    assert threads_per_run(2, cpus=16) == 8
    with pytest.raises(ValueError, match="concurrency"):
        threads_per_run(0, cpus=2)


def test_the_live_json_is_the_validated_figure():
    """The app sends figure_json at every update: exactly the JSON of plotly's validated live_figure, built without
    plotly's objects."""
    from moshi_ttt.app.figure import figure_json

    loss = {"baseline": list(np.linspace(3, 2, 400)), "ttt": [float("nan")] + list(np.linspace(3, 1.5, 399))}
    record = {"W1": list(np.linspace(0, 1, 25)), "W2": list(np.linspace(0, 2, 25)), "t": list(range(16, 401, 16))}
    drift = {str(i): record for i in (1, 2, 3)}
    sent = json.loads(figure_json(loss, drift, total_tokens=500))
    assert sent.pop("config") and sent == json.loads(live_figure(loss, drift, total_tokens=500).to_json())
