"""Synthetic speech corpus for the demo assets: seeded sentences from a small word list, spoken by espeak-ng.

Needs the `espeak-ng` program (Debian/Ubuntu: `apt-get install espeak-ng`). espeak-ng is deterministic: the same
text, voice, speed and pitch give the same samples, which is what makes the corpus (and its checksums) reproducible.
Used by the v1 build of scripts/build_demo_assets.py and by research scripts; not part of the library.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLE_RATE = 24000
FRAME = 1920  # samples per codec frame (24 kHz / 12.5 Hz)

# Six speakers: espeak-ng voice (language + variant, all in Debian's espeak-ng-data), speed (words/min), pitch.
# A fixed set, so that held-out clips are spoken by voices the models were trained on (with a random speed and
# pitch per clip, every clip was a new speaker and a small LM learned nothing that carried over to held-out clips).
SPEAKERS = (("en-us", 165, 50), ("en-gb", 155, 40), ("en-gb-scotland+f3", 170, 60), ("en-029+m3", 150, 35))
SPEAKERS += (("en-us+f2", 175, 55), ("en-gb-x-rp+klatt", 160, 45))

NAMES = "Anna Ben Clara David Elena Felix Grace Henry Iris Jonas Kira Leo Maya Noah Olga Peter Rosa Sam Tara Victor"
ADJECTIVES = (
    "quiet old young bright dark heavy light small large green blue red yellow warm cold careful quick slow "
    "gentle strange happy tired busy empty famous hidden wooden silver broken clever narrow ancient"
)
NOUNS = (
    "farmer teacher doctor sailor painter baker driver singer child captain neighbour student pilot writer "
    "gardener musician traveller engineer"
)
OBJECTS = (
    "boxes letters apples books stones baskets lamps keys maps flowers shoes bottles coins candles blankets "
    "pictures bicycles windows tables pencils rivers mountains songs stories gardens bridges"
)
VERBS = (
    "carried found painted counted opened sold moved cleaned built borrowed hid watched followed remembered "
    "described collected repaired visited crossed forgot"
)
PLACES = (
    "across the river|near the station|behind the market|under the old bridge|inside the library|"
    "along the quiet road|at the edge of the forest|beside the harbour|on top of the hill|in the small village|"
    "through the narrow street|around the lake"
)
TIMES = "in the morning|after lunch|late at night|every Sunday|before the storm|during the winter|at noon|yesterday"
NUMBERS = "two three four five six seven eight nine ten eleven twelve twenty"
CONNECT = "Then|Later|Meanwhile|After that|Suddenly|Of course|Still|Finally"


def _words(s: str) -> list[str]:
    return s.split("|") if "|" in s else s.split()


class SentenceMaker:
    """Seeded grammar: a few templates filled from the word lists above."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, words: str) -> str:
        return self.rng.choice(_words(words))

    def subject(self) -> str:
        if self.rng.random() < 0.4:
            return self.pick(NAMES)
        return f"the {self.pick(ADJECTIVES)} {self.pick(NOUNS)}"

    def sentence(self) -> str:
        s, v, o = self.subject(), self.pick(VERBS), f"{self.pick(NUMBERS)} {self.pick(ADJECTIVES)} {self.pick(OBJECTS)}"
        template = self.rng.randrange(5)
        if template == 0:
            text = f"{s} {v} {o} {self.pick(PLACES)}."
        elif template == 1:
            text = f"{self.pick(TIMES)}, {s} {v} {o}."
        elif template == 2:
            text = (
                f"{self.pick(CONNECT)}, {s} {v} {o} and {self.subject()} {self.pick(VERBS)} them {self.pick(PLACES)}."
            )
        elif template == 3:
            text = f"{s} said that {self.subject()} {v} {o} {self.pick(TIMES)}."
        else:
            text = f"{s} and {self.subject()} {v} {o} {self.pick(PLACES)} {self.pick(TIMES)}."
        return text[0].upper() + text[1:]


@dataclass(frozen=True)
class Voice:
    name: str  # espeak-ng voice, e.g. "en-us+f2"
    speed_wpm: int  # espeak-ng -s
    pitch: int  # espeak-ng -p (0-99)


@dataclass
class Clip:
    """One corpus file: its audio, its text, and where the readings of a repeated passage start and end."""

    name: str
    audio: np.ndarray  # [samples] float32 at 24 kHz
    text: str
    voice: Voice
    readings: list[tuple[int, int]] = field(default_factory=list)  # (start, end) samples of each passage reading


def check_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed; on Debian/Ubuntu run `apt-get install espeak-ng`")
    return exe


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """espeak-ng speech at 24 kHz, float32 mono (espeak-ng speaks at 22.05 kHz; soxr resamples)."""
    cmd = [check_espeak(), "-v", voice.name, "-s", str(voice.speed_wpm), "-p", str(voice.pitch), "--stdout", text]
    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    data, sr = sf.read(io.BytesIO(wav), dtype="float32")
    if data.ndim != 1:
        raise ValueError(f"espeak-ng gave {data.ndim}-D audio, expected mono")
    return soxr.resample(data, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * SAMPLE_RATE)), dtype=np.float32)


def pad_to_frame(parts: list[np.ndarray]) -> None:
    """Appends silence so that the next part starts on a codec frame boundary."""
    length = sum(len(p) for p in parts)
    parts.append(np.zeros((-length) % FRAME, dtype=np.float32))


def random_voice(rng: random.Random) -> Voice:
    return Voice(*rng.choice(SPEAKERS))


def plain_clip(name: str, maker: SentenceMaker, rng: random.Random, duration_s: float) -> Clip:
    """Sentences that never repeat, one voice, until `duration_s` is reached."""
    voice = random_voice(rng)
    parts, texts = [silence(0.3)], []
    while sum(len(p) for p in parts) < duration_s * SAMPLE_RATE:
        text = maker.sentence()
        texts.append(text)
        parts += [synthesize(text, voice), silence(rng.uniform(0.2, 0.5))]
    return Clip(name, np.concatenate(parts), " ".join(texts), voice)


def repeat_clip(name: str, maker: SentenceMaker, rng: random.Random, passage_s: float, filler_s: float) -> Clip:
    """A passage of about `passage_s` read three times, with different filler sentences of about `filler_s` between.

    Each reading starts on a codec frame boundary after silence, so the three readings are sample-identical and give
    (almost) the same codes: the easiest kind of repetition, chosen so that a small model can show memory.
    """
    voice = random_voice(rng)
    passage, audio = [], []
    while sum(len(a) for a in audio) < passage_s * SAMPLE_RATE:
        text = maker.sentence()
        passage.append(text)
        audio += [synthesize(text, voice), silence(0.3)]
    passage_audio = np.concatenate(audio)
    parts, texts, readings = [silence(0.3)], [], []
    for reading in range(3):
        parts.append(silence(0.3))
        pad_to_frame(parts)
        start = sum(len(p) for p in parts)
        parts.append(passage_audio)
        readings.append((start, start + len(passage_audio)))
        span = f"{start / SAMPLE_RATE:.3f}-{(start + len(passage_audio)) / SAMPLE_RATE:.3f} s"  # reports.headline
        texts.append(f"[reading {reading + 1}: {span}] " + " ".join(passage))
        if reading < 2:
            filler = []
            while sum(len(p) for p in parts) - readings[-1][1] < filler_s * SAMPLE_RATE:
                text = maker.sentence()
                filler.append(text)
                parts += [silence(0.3), synthesize(text, voice)]
            texts.append("[filler] " + " ".join(filler))
    parts.append(silence(0.5))
    return Clip(name, np.concatenate(parts), "\n".join(texts), voice, readings)


def read_corpus(work: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    corpus = work / "corpus"
    index = json.loads((corpus / "index.json").read_text())
    audio = {}
    for name in index:
        data, sr = sf.read(corpus / f"{name}.wav", dtype="float32")
        assert sr == SAMPLE_RATE
        pad = (-len(data)) % FRAME  # whole frames: the codec gives one code per 1920 samples
        audio[name] = torch.from_numpy(np.pad(data, (0, pad)))[None, None]  # [1, 1, samples]
    return index, audio


SHORT_SEED = 101  # sentences and voices of the short repeat clips (the demo corpus uses seeds 0 and 1)


def short_repeat_clips(count: int, seed: int = SHORT_SEED) -> tuple[dict, dict[str, torch.Tensor]]:
    """`count` short repeat clips (a 4.5-12 s passage read 3 times, 1.5 s+ of filler between): their index entries
    and audio [1, 1, samples] padded to whole codec frames. Deterministic for a seed (espeak-ng is)."""
    maker, rng, index, audio = SentenceMaker(seed), random.Random(seed + 1), {}, {}
    for i in range(count):
        name = f"train_short_{i:03d}"
        clip = repeat_clip(name, maker, rng, 4.5, 1.5)
        index[name] = {
            "kind": "repeat", "split": "train", "text": clip.text, "voice": dataclasses.asdict(clip.voice),
            "samples": len(clip.audio), "readings": clip.readings,
        }  # fmt: skip
        audio[name] = torch.from_numpy(np.pad(clip.audio, (0, (-len(clip.audio)) % FRAME)))[None, None]
    return index, audio
