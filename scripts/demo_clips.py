"""The two demo clips of demo_assets/ (stage corpus of scripts/build_demo_assets.py), natural speech of held-out voices
(research/natural_corpus.py):

- `demo_repeat.wav`: one more held-out repeat clip made as the evaluation's (`natural_corpus.repeat_clip`, 8-14 s
  passage read three times at random sample offsets, 2-8 s of other sentences between); its `.txt` has one line per
  part, `[reading N: START-END s] text` and `[filler] text` (moshi_ttt.reports.headline reads the readings);
- `demo_plain.wav`: held-out speech that never repeats (as `natural_mix.plain_clip`, ~25 s), its `.txt` the text.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import soundfile as sf

from research.natural_corpus import SAMPLE_RATE, Grammar, deliver, random_voice, repeat_clip, speak

# The first seed from DEMO_REPEAT_SEED on whose readings' spans, as written (3 decimals), have one length: the app
# and tests/test_headline.py read the three readings of the demo as equal.
DEMO_REPEAT_SEED, DEMO_PLAIN_SEED, DEMO_PLAIN_S = 9191, 9292, 25.0


def equal_spans(text: str) -> bool:
    """Whether the `[reading N: START-END s]` spans of a repeat clip's text have one length at 3 decimals."""
    spans = [line.split("]")[0].split(": ")[1].removesuffix(" s").split("-") for line in text.splitlines()
             if line.startswith("[reading")]  # fmt: skip
    return len({round(float(e) - float(s), 3) for s, e in spans}) == 1


def write_demo_clips(out: Path, log) -> dict:
    """OUT/demo_repeat.{wav,txt} and OUT/demo_plain.{wav,txt}; returns what was drawn (seeds, voices, seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    seed = DEMO_REPEAT_SEED
    while True:
        clip = repeat_clip(random.Random(seed), "heldout", (8.0, 14.0), (2.0, 8.0))
        if equal_spans(clip.text):
            break
        seed += 1
    sf.write(out / "demo_repeat.wav", clip.audio, SAMPLE_RATE, subtype="PCM_16")
    (out / "demo_repeat.txt").write_text(clip.text + "\n")
    rng = random.Random(DEMO_PLAIN_SEED)  # natural_mix.plain_clip's draws, keeping the text
    grammar = Grammar(rng)
    voice = random_voice(rng, "heldout")
    audio, texts = speak(grammar, voice, rng, DEMO_PLAIN_S)
    audio = deliver(audio, rng, rng.uniform(-30, -18), rng.uniform(25, 40))
    sf.write(out / "demo_plain.wav", audio, SAMPLE_RATE, subtype="PCM_16")
    (out / "demo_plain.txt").write_text(" ".join(texts) + "\n")
    info = {
        "demo_repeat": {"seed": seed, "voice": asdict(clip.voice), "seconds": len(clip.audio) / SAMPLE_RATE,
                        "readings": clip.readings},
        "demo_plain": {"seed": DEMO_PLAIN_SEED, "voice": asdict(voice), "seconds": len(audio) / SAMPLE_RATE},
    }  # fmt: skip
    log(f"demo clips: demo_repeat seed {seed} ({info['demo_repeat']['seconds']:.1f} s), demo_plain "
        f"({info['demo_plain']['seconds']:.1f} s)")  # fmt: skip
    return info
