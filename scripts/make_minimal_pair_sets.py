"""Small synthetic minimal-pair sets in the public layouts of sWUGGY, sBLIMP and spoken / topic StoryCloze.

    python scripts/make_minimal_pair_sets.py --out out/minimal_pairs [--pairs 200] [--seed 0]
    python -m moshi_ttt.evaluate --out out/bench_demo \
        --benchmark swuggy=out/minimal_pairs/zr2021 --benchmark sblimp=out/minimal_pairs/zr2021 \
        --benchmark sstorycloze=out/minimal_pairs/sStoryCloze --benchmark tstorycloze=out/minimal_pairs/tStoryCloze

espeak-ng speaks everything (deterministic: the same arguments give the same files), with the demo corpus's word
lists and voices (scripts/demo_corpus.py), so the demo models have seen the words and the sentence patterns:

- `zr2021/lexical/dev/` (sWUGGY's layout): a word of the demo word lists vs a non-word made from it by swapping
  consonants within their class (b->d, p->t, m->n, ...: still pronounceable), two voices;
- `zr2021/syntactic/dev/` (sBLIMP's): a sentence of the demo grammar vs the same words with the verb moved to the
  front ("word_order") or in a shuffled order ("scrambled"), two voices;
- `sStoryCloze/`, `tStoryCloze/` (<n>_<id>_correct.wav / _incorrect.wav): two sentences, then an ending that
  repeats the first sentence (right) or the same sentence with one noun changed (sStoryCloze) / another story's
  ending (tStoryCloze). The repeated sentence is 5 s+ back, beyond the demo models' 4 s attention window: only a
  memory such as TTT's can use it. Both start on a codec frame (1920 samples at 24 kHz, 1280 at 16 kHz), so the
  repeat gives (almost) the same codes, the easiest case of memory, as in demo_assets.

They show the layouts and the mechanism; they measure nothing about a real Moshi. 16 kHz 16-bit mono, like the
public sets. Needs espeak-ng.
"""

from __future__ import annotations

import argparse
import csv
import random
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_corpus import (  # noqa: E402
    ADJECTIVES,
    NOUNS,
    OBJECTS,
    SAMPLE_RATE,
    SPEAKERS,
    VERBS,
    SentenceMaker,
    Voice,
    check_espeak,
    pad_to_frame,
    silence,
    synthesize,
)

OUT_RATE = 16_000  # the public sets' rate
VOICES = (Voice(*SPEAKERS[0]), Voice(*SPEAKERS[1]))  # en-us, en-gb
# Consonants swapped within their class: a non-word keeps the word's shape and stays pronounceable.
SWAPS = {"b": "d", "d": "g", "g": "b", "p": "t", "t": "k", "k": "p", "m": "n", "n": "m", "l": "r", "r": "l"}
SWAPS |= {"f": "s", "s": "f", "v": "z", "z": "v", "c": "t", "h": "w", "w": "h"}


def write_wav(path: Path, audio: np.ndarray) -> None:
    """Writes a clip as the public sets do (16 kHz, 16-bit), after a lead of silence: 0.3 s padded to a codec frame,
    as every clip of the demo corpus starts (the demo TTT model scores clips that start with speech 0.4-0.5 nats
    worse than its baseline, and no better on a repeat)."""
    lead = [silence(0.3)]
    pad_to_frame(lead)
    samples = soxr.resample(np.concatenate([*lead, audio]), SAMPLE_RATE, OUT_RATE, quality="HQ").astype(np.float32)
    sf.write(path, samples, OUT_RATE, subtype="PCM_16")


def clip_name(rng: random.Random) -> str:
    """An 11-letter file name, like ZeroSpeech 2021's."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(11))


def phones(word: str) -> str:
    return subprocess.run([check_espeak(), "-q", "-x", word], check=True, capture_output=True, text=True).stdout.strip()


def nonword(word: str, lexicon: set[str]) -> str:
    candidate = "".join(SWAPS.get(c, c) for c in word)
    return candidate if candidate not in lexicon and candidate != word else candidate + "el"


def make_lexical(out: Path, pairs: int, rng: random.Random) -> int:
    folder = out / "zr2021" / "lexical" / "dev"
    folder.mkdir(parents=True, exist_ok=True)
    lexicon = sorted({w for group in (NOUNS, OBJECTS, ADJECTIVES, VERBS) for w in group.split()})
    words = rng.sample(lexicon, min(len(lexicon), max(1, pairs // len(VOICES))))
    rows = []
    for pair_id, word in enumerate(words):
        foil = nonword(word, set(lexicon))
        for voice in VOICES:
            for text, correct in ((word, 1), (foil, 0)):
                name = clip_name(rng)
                write_wav(folder / f"{name}.wav", synthesize(text, voice))
                said = phones(text)
                rows.append({"id": pair_id, "filename": name, "correct": correct, "frequency": 1 if correct else "",
                             "word": text if correct else "", "phones": said, "length": len(said.replace("'", "")),
                             "voice": voice.name})  # fmt: skip
    with (folder / "gold.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return len(words) * len(VOICES)


def simple_sentence(maker: SentenceMaker) -> list[str]:
    subject = maker.subject().split()
    return [*subject, maker.pick(VERBS), maker.pick("two three four five six"), maker.pick(ADJECTIVES),
            maker.pick(OBJECTS)]  # fmt: skip


def make_syntactic(out: Path, pairs: int, rng: random.Random, maker: SentenceMaker) -> int:
    folder = out / "zr2021" / "syntactic" / "dev"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    ids = max(1, pairs // len(VOICES))
    for pair_id in range(ids):
        words = simple_sentence(maker)
        kind = ("word_order", "scrambled")[pair_id % 2]
        if kind == "word_order":
            verb = len(words) - 4
            foil = [words[verb], *words[:verb], *words[verb + 1 :]]
        else:
            foil = words[:]
            while foil == words:
                rng.shuffle(foil)
        for voice in VOICES:
            for sentence, correct in ((words, 1), (foil, 0)):
                name = clip_name(rng)
                text = " ".join(sentence)
                write_wav(folder / f"{name}.wav", synthesize(text[0].upper() + text[1:] + ".", voice))
                rows.append({"filename": name, "type": kind, "subtype": kind, "correct": correct, "id": pair_id,
                             "voice": voice.name, "transcription": text})  # fmt: skip
    with (folder / "gold.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return ids * len(VOICES)


def make_story_cloze(out: Path, pairs: int, rng: random.Random, maker: SentenceMaker) -> int:
    """Both StoryCloze variants from the same stories (one voice, as the public sets)."""
    voice = VOICES[0]
    stories = [(maker.sentence(), maker.sentence()) for _ in range(pairs)]
    for variant in ("sStoryCloze", "tStoryCloze"):
        (out / variant).mkdir(parents=True, exist_ok=True)
    gap = np.zeros(int(0.4 * SAMPLE_RATE), dtype=np.float32)
    for n, (first, second) in enumerate(stories):
        story_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        context = [synthesize(first, voice), gap, synthesize(second, voice), gap]
        pad_to_frame(context)  # the ending starts on a codec frame, as the first sentence does: its codes repeat
        context = np.concatenate(context)
        right = synthesize(first, voice)
        words = first.rstrip(".").split()
        nouns = [i for i, w in enumerate(words) if w in OBJECTS.split()]
        changed = words[:]
        i = nouns[-1] if nouns else len(words) - 1
        changed[i] = rng.choice([w for w in OBJECTS.split() if w != words[i]])
        wrong = {"sStoryCloze": synthesize(" ".join(changed) + ".", voice),
                 "tStoryCloze": synthesize(stories[(n + 1) % len(stories)][0], voice)}  # fmt: skip
        for variant, ending in wrong.items():
            write_wav(out / variant / f"{n}_{story_id}_correct.wav", np.concatenate([context, right]))
            write_wav(out / variant / f"{n}_{story_id}_incorrect.wav", np.concatenate([context, ending]))
    return len(stories)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--pairs", type=int, default=200, help="pairs per benchmark (sWUGGY: at most 2 x the word list)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_espeak()
    rng = random.Random(args.seed)
    maker = SentenceMaker(args.seed + 1000)
    counts = {
        "swuggy": make_lexical(args.out, args.pairs, rng),
        "sblimp": make_syntactic(args.out, args.pairs, rng, maker),
        "storycloze": make_story_cloze(args.out, args.pairs, rng, maker),
    }
    print(f"wrote {counts} pairs under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
