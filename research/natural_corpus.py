"""Speech closer to what users upload (issue 21): many voices, ordinary sentences, repeats at random sample offsets.

Not part of the library (nothing in moshi_ttt imports research/). Needs the `espeak-ng` and `flite` programs
(Debian: `apt-get install espeak-ng flite`). Everything is seeded and both synthesisers are deterministic, so a
seed gives the same samples on one machine.

What differs from scripts/demo_corpus.py (the shipped assets' corpus, six espeak-ng voices, one small grammar):
- voices: espeak-ng's English voices x its variants (male, female, klatt, ...) at a random rate and pitch, and
  flite's voices (kal, kal16, awb, rms, slt), split into training voices and held-out voices (`VOICE_SPLITS`);
- words: a larger grammar (questions, relative clauses, lists, dates and numbers) over a wider vocabulary;
- delivery: random pauses between sentences, a random level per clip, light noise at a random SNR;
- repeats: a passage read three times at arbitrary sample offsets (never padded to a codec frame) with random
  gaps, each reading its own noise; long sequences whose passages come back minutes later (`long_clip`).

Usage:
    python -m research.natural_corpus repeat --out /tmp/nat --count 6 --split heldout --seed 7
    python -m research.natural_corpus long --out /tmp/long.wav --minutes 25 --seed 2121
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 24000
FRAME = 1920  # samples per codec frame (24 kHz / 12.5 Hz)

ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
ESPEAK_VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m7", "+f1", "+f2", "+f3", "+f4", "+klatt", "+klatt2")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
# Held-out voices: never in training clips (the evaluation's "voices the models were not trained on").
HELDOUT_ESPEAK = ("en-gb-x-gbcwmd", "en-029")
HELDOUT_FLITE = ("slt", "rms")

NAMES = (
    "Alice Arthur Beatrice Carlos Diana Edward Fatima George Hannah Ibrahim Julia Kevin Laura Martin Nadia Oscar "
    "Priya Quentin Rachel Simon Teresa Umar Vera William Yusuf Zoe"
).split()
PEOPLE = (
    "nurse mechanic librarian fisherman shopkeeper professor carpenter journalist waiter plumber architect "
    "firefighter grandmother cousin landlord stranger tourist referee cashier farmer baker pilot"
).split()
ADJ = (
    "tall patient noisy polite nervous cheerful stubborn curious generous lonely honest clumsy elegant modest "
    "anxious brave calm eager gentle grumpy proud shy tidy wise"
).split()
THINGS = (
    "umbrella suitcase newspaper ladder kettle envelope notebook sandwich jacket bucket hammer blanket camera "
    "ticket parcel bicycle guitar carpet mirror telescope calendar pillow wallet teapot"
).split()
THING_ADJ = "red heavy cheap broken shiny wooden plastic borrowed expensive dusty enormous tiny striped old".split()
PLACES = (
    "at the bus stop|in the kitchen|outside the post office|on the train to Leeds|behind the town hall|"
    "in a crowded cafe|at the football ground|next to the pharmacy|in the hospital car park|down by the canal|"
    "at the back of the cinema|on the second floor|in the garden shed|near the airport|at her sister's flat"
).split("|")
TIMES = (
    "on Tuesday|last weekend|at half past seven|in the middle of the night|before breakfast|the day after the "
    "wedding|in early spring|on the first of March|during the holidays|a few minutes later|just before midnight"
).split("|")
VERBS_PAST = (
    "dropped|fixed|wrapped|lost|noticed|returned|painted|weighed|stole|bought|hid|polished|measured|packed|"
    "carried|ordered|examined|forgot"
).split("|")
REPORT = "said|explained|admitted|complained|insisted|mentioned|whispered|announced".split("|")
FEELINGS = "surprised|annoyed|relieved|delighted|confused|worried|amused|exhausted".split("|")
OPENERS = "Honestly|Anyway|Unfortunately|By the way|To be fair|Believe it or not|As usual|In the end".split("|")
NUMBER_WORDS = "two three five seven nine eleven fourteen twenty thirty forty-two".split()


class Grammar:
    """Ordinary English sentences from a seeded grammar: statements, reported speech, questions, lists, feelings."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def _pick(self, words) -> str:
        return self.rng.choice(words)

    def person(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            return self._pick(NAMES)
        if r < 0.7:
            return f"the {self._pick(ADJ)} {self._pick(PEOPLE)}"
        return f"my {self._pick(PEOPLE)}"

    def thing(self) -> str:
        if self.rng.random() < 0.3:
            return f"{self._pick(NUMBER_WORDS)} {self._pick(THINGS)}s"
        adjective = self._pick(THING_ADJ)
        return f"{'an' if adjective[0] in 'aeiou' else 'a'} {adjective} {self._pick(THINGS)}"

    def sentence(self) -> str:
        p, v, t = self.person(), self._pick(VERBS_PAST), self.thing()
        k = self.rng.randrange(8)
        if k == 0:
            s = f"{p} {v} {t} {self._pick(PLACES)}."
        elif k == 1:
            s = f"{self._pick(TIMES)}, {p} {v} {t}."
        elif k == 2:
            s = f"{p} {self._pick(REPORT)} that {self.person()} had {v} {t}."
        elif k == 3:
            s = f"Why did {p} leave {t} {self._pick(PLACES)}?"
        elif k == 4:
            s = f"{self._pick(OPENERS)}, {p} was {self._pick(FEELINGS)} when {self.person()} {v} {t}."
        elif k == 5:
            s = f"We need {self.thing()}, {self.thing()} and {self.thing()} by {self._pick(TIMES).split(' ')[-1]}."
        elif k == 6:
            s = f"{p}, who {v} {t} {self._pick(TIMES)}, is waiting {self._pick(PLACES)}."
        else:
            s = f"Do you remember the {self._pick(THINGS)} that {p} {v} {self._pick(PLACES)}?"
        return s[0].upper() + s[1:]


@dataclass(frozen=True)
class Voice:
    engine: str  # "espeak-ng" or "flite"
    name: str  # espeak-ng voice with variant ("en-gb+f3") or flite voice ("slt")
    rate: float  # espeak-ng words per minute; flite duration stretch (1.0 normal, > 1 slower)
    pitch: int  # espeak-ng pitch 0-99 (unused by flite)


def voices(split: str) -> list[Voice]:
    """The voice names of a split ("train" or "heldout"); rate and pitch are drawn per clip by `random_voice`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    held = split == "heldout"
    names = [v for v in ESPEAK_VOICES if (v in HELDOUT_ESPEAK) == held]
    out = [Voice("espeak-ng", n + var, 0.0, 0) for n in names for var in ESPEAK_VARIANTS]
    out += [Voice("flite", v, 0.0, 0) for v in FLITE_VOICES if (v in HELDOUT_FLITE) == held]
    return out


def random_voice(rng: random.Random, split: str) -> Voice:
    base = rng.choice(voices(split))
    if base.engine == "flite":
        return Voice("flite", base.name, round(rng.uniform(0.85, 1.2), 2), 0)
    return Voice("espeak-ng", base.name, float(rng.randrange(130, 196)), rng.randrange(25, 75))


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """Speech at 24 kHz, float32 mono."""
    if voice.engine == "espeak-ng":
        exe = shutil.which("espeak-ng")
        cmd = [exe, "-v", voice.name, "-s", str(int(voice.rate)), "-p", str(voice.pitch), "--stdout", text]
    else:
        exe = shutil.which("flite")
        cmd = [exe, "-voice", voice.name, "--setf", f"duration_stretch={voice.rate}", "-t", text, "-o", "/dev/stdout"]
    if exe is None:
        raise FileNotFoundError(f"{voice.engine} is not installed (Debian: apt-get install {voice.engine})")
    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    data, sr = sf.read(io.BytesIO(wav), dtype="float32")
    if data.ndim != 1:
        raise ValueError(f"{voice.engine} gave {data.ndim}-D audio, expected mono")
    return soxr.resample(data, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * SAMPLE_RATE)), dtype=np.float32)


def speak(grammar: Grammar, voice: Voice, rng: random.Random, seconds: float) -> tuple[np.ndarray, list[str]]:
    """Sentences with random pauses (0.15-0.8 s) until `seconds` of audio."""
    parts, texts = [], []
    while sum(len(p) for p in parts) < seconds * SAMPLE_RATE:
        texts.append(grammar.sentence())
        parts += [synthesize(texts[-1], voice), silence(rng.uniform(0.15, 0.8))]
    return np.concatenate(parts), texts


def deliver(audio: np.ndarray, rng: random.Random, level_db: float, snr_db: float, clean: bool = False) -> np.ndarray:
    """Scales speech to `level_db` (RMS dBFS over its voiced part) and adds white noise at `snr_db` below it (none if
    `clean`; the noise's seed is drawn either way)."""
    voiced = audio[np.abs(audio) > 1e-4]
    rms = float(np.sqrt(np.mean(voiced**2))) if voiced.size else 1.0
    out = audio * (10 ** (level_db / 20) / max(rms, 1e-6))
    seed = rng.randrange(2**31)
    if not clean:
        noise = np.random.default_rng(seed).standard_normal(len(out)).astype(np.float32)
        out = out + noise * 10 ** ((level_db - snr_db) / 20)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


@dataclass
class Clip:
    audio: np.ndarray  # [samples] float32 at 24 kHz
    text: str
    voice: Voice
    readings: list[tuple[int, int]] = field(default_factory=list)  # (start, end) samples of each passage reading


def repeat_clip(
    rng: random.Random,
    split: str,
    passage_s: tuple[float, float],
    gap_s: tuple[float, float],
    aligned: bool = False,
    clean: bool = False,
) -> Clip:
    """A passage read three times by one voice, other sentences between; every reading at an arbitrary sample
    offset (a random 0-1919-sample lead-in of silence), the noise drawn anew over the whole clip. `aligned`: the
    lead-in puts every reading on a codec-frame boundary instead (the same draws otherwise: the same clip with its
    readings moved by less than a frame; a control for what the sub-frame offsets cost). `clean`: no noise (the same
    draws otherwise; with `aligned`, the readings differ only by what the codec's encoder heard before them)."""
    grammar, voice = Grammar(rng), random_voice(rng, split)
    passage, passage_text = speak(grammar, voice, rng, rng.uniform(*passage_s))
    parts, texts, readings = [silence(rng.uniform(0.2, 0.6))], [], []
    for i in range(3):
        lead = rng.randrange(FRAME)  # sub-frame offset
        if aligned:
            lead = -sum(len(p) for p in parts) % FRAME
        parts.append(np.zeros(lead, dtype=np.float32))
        start = sum(len(p) for p in parts)
        parts.append(passage)
        readings.append((start, start + len(passage)))
        texts.append(f"[reading {i + 1}: {start / SAMPLE_RATE:.3f}-{(start + len(passage)) / SAMPLE_RATE:.3f} s] "
                     + " ".join(passage_text))  # fmt: skip
        if i < 2:
            filler, filler_text = speak(grammar, voice, rng, rng.uniform(*gap_s))
            parts += [silence(rng.uniform(0.2, 0.6)), filler, silence(rng.uniform(0.2, 0.6))]
            texts.append("[filler] " + " ".join(filler_text))
    parts.append(silence(0.5))
    audio = deliver(np.concatenate(parts), rng, rng.uniform(-30, -18), rng.uniform(25, 40), clean)
    return Clip(audio, "\n".join(texts), voice, readings)


def long_clip(rng: random.Random, split: str, minutes: float, passage_s: float = 12.0) -> Clip:
    """A long file of sections (40-80 s, one voice each) whose passages come back minutes later: each section
    reads a new passage and, from the fourth section on, one passage of a section 3-6 sections earlier (in that
    section's voice), at an arbitrary sample offset. `readings` lists (start, end) of every passage reading; a
    passage's readings are consecutive pairs in `text`'s [passage N] tags."""
    parts, texts, readings = [], [], []
    sections: list[tuple[Voice, np.ndarray, list[str]]] = []
    total = minutes * 60 * SAMPLE_RATE
    while sum(len(p) for p in parts) < total:
        voice, grammar = random_voice(rng, split), Grammar(rng)
        items = []
        passage, passage_text = speak(grammar, voice, rng, passage_s)
        sections.append((voice, passage, passage_text))
        items.append((len(sections) - 1, passage))
        if len(sections) > 3:
            back = len(sections) - 1 - rng.randrange(3, 7)
            if back >= 0:
                items.append((back, sections[back][1]))
        rng.shuffle(items)
        for n, audio in items:
            filler, _ = speak(grammar, voice, rng, rng.uniform(10, 30))
            parts += [filler, silence(rng.uniform(0.2, 0.6)), np.zeros(rng.randrange(FRAME), dtype=np.float32)]
            start = sum(len(p) for p in parts)
            parts += [audio, silence(rng.uniform(0.2, 0.6))]
            readings.append((start, start + len(audio)))
            texts.append(f"[passage {n}: {start / SAMPLE_RATE:.3f}-{(start + len(audio)) / SAMPLE_RATE:.3f} s]")
    audio = deliver(np.concatenate(parts), rng, -24.0, 35.0)
    return Clip(audio, "\n".join(texts), sections[0][0], readings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("repeat", "long"))
    parser.add_argument("--out", type=Path, required=True, help="repeat: a directory; long: a .wav path")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--split", choices=("train", "heldout"), default="heldout")
    parser.add_argument("--seed", type=int, default=2121)
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--aligned", action="store_true", help="repeat: readings on codec-frame boundaries")
    parser.add_argument("--clean", action="store_true", help="repeat: no noise")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    if args.kind == "long":
        clip = long_clip(rng, args.split, args.minutes)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sf.write(args.out, clip.audio, SAMPLE_RATE, subtype="PCM_16")
        args.out.with_suffix(".json").write_text(json.dumps({"text": clip.text, "readings": clip.readings}))
        print(f"{args.out}: {len(clip.audio) / SAMPLE_RATE / 60:.1f} min, {len(clip.readings)} passage readings")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    index = {}
    for i in range(args.count):
        clip = repeat_clip(rng, args.split, (8.0, 14.0), (2.0, 8.0), args.aligned, args.clean)
        name = f"{args.split}_repeat_{i:03d}"
        sf.write(args.out / f"{name}.wav", clip.audio, SAMPLE_RATE, subtype="PCM_16")
        (args.out / f"{name}.txt").write_text(clip.text + "\n")
        index[name] = {"voice": asdict(clip.voice), "readings": clip.readings, "samples": len(clip.audio)}
    (args.out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{args.count} clips in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
