"""What the models hear: a clip's codes, as a run reads them, decoded back to audio by the codec (its reconstruction).

The models never see the waveform, only the codes the codec gives; the codec's decoder turns those codes back into
sound. The app decodes on demand (a button), not during a run: the scoring run stays as fast as it was, and a run
can be listened to while it scores. Measured on 2 busy cores with the demo codec (0.5 M parameters),
demo_repeat.wav (60 s): encoding 0.35 s, decoding 0.33 s (25 frames per call; 1.9 s at one frame per call); moshi's
Mimi is some hundred times larger, so decoding it on a CPU takes far longer (not measured here).

The codes are those a run scores by construction: the same clip check and codec (`engine.open_clip`), the same
streaming encoding (`engine.clip_codes`, codes independent of how the file is read), the codebooks the baseline
reads. Gradio-free.
"""

from __future__ import annotations

import logging
from pathlib import Path

from moshi_ttt.app.engine import clip_codes, codec_lock, open_clip
from moshi_ttt.app.models import ModelCache
from moshi_ttt.data.decode import Reconstruction, decode_to_wav
from moshi_ttt.reports import results as report

logger = logging.getLogger(__name__)


def reconstruct_clip(
    cache: ModelCache,
    audio_path: str,
    baseline_name: str,
    max_seconds: float,
    folder: Path,
    *,
    allow_silence: bool = False,
) -> Reconstruction:
    """Encodes a clip as a run of these settings does and decodes its codes into `folder`, block by block (memory
    flat in the clip's length).

    Args:
        cache: the shared models (the baseline's codec encodes and decodes, shared with runs through its lock).
        audio_path: the clip (an upload or a demo clip, already validated).
        baseline_name: the run's baseline: its codec, and the codebooks it reads.
        max_seconds: the run's duration limit (only the first `max_seconds` are scored, and decoded).
        folder: where the wav goes (a session's own folder, `resources.RunFolders`).
        allow_silence: accept a silent clip, as the run would.
    Returns:
        The wav written, `<clip>_codec_reconstruction.wav`.
    Raises:
        ValueError / FileNotFoundError: one readable sentence for bad audio or a checkpoint without a codec.
    """
    info, mimi = open_clip(cache, audio_path, baseline_name, max_seconds, allow_silence=allow_silence)
    codebooks = cache.get(baseline_name).model.dep_q  # the Moshi stream's codebooks, those scored
    path = Path(folder) / f"{report.file_stem({'audio': {'name': info.name}})}_codec_reconstruction.wav"
    encoded = clip_codes(info, mimi)
    try:
        return decode_to_wav(mimi, (codes[:, :codebooks] for codes in encoded), path, lock=codec_lock(mimi))
    finally:
        encoded.close()  # leaves the codec's streaming session, also after an error
