"""Which language a text is in, and prompts taken from a corpus: used by training's progress
samples (lib/training/samples.py) and by evaluate.py's scored samples."""

from __future__ import annotations

import re

STOPWORDS = {
    "en": set("the and of to in that he shall unto for his a they be is him not them it with all thou thy was which "
              "my me but ye their have this from as are were by upon i you said will there when out".split()),
    "es": set("de la que el y en los las a por con no su se del al sus lo le para como es mi fué dijo pues sobre "
              "porque entre ni ha sino hasta yo él tu te vosotros ellos".split()),
}


def words(text: str) -> list[str]:
    return re.findall(r"[a-záéíóúñü]+", text.lower())


def identify_language(text: str) -> str:
    """'en', 'es' or 'unknown': whichever stopword list covers more of the words."""
    tokens = words(text)
    hits = {lang: sum(w in stop for w in tokens) for lang, stop in STOPWORDS.items()}
    if re.search(r"[ñ¿¡áéíóú]", text.lower()):
        hits["es"] += 2
    best = max(hits, key=hits.get)
    return best if hits[best] >= 2 and hits[best] > min(hits.values()) else "unknown"


def corpus_prompts(val_text: str, per_language: int, prompt_words: int = 4) -> dict[str, list[str]]:
    """Opening words of sentences from the validation split, up to `per_language` per language.

    A candidate line starts with a letter and has at least prompt_words + 2 words (a
    sentence rather than a heading, a number or a table row); its language is told by
    identify_language. At most one prompt per language is taken from each document,
    so the prompts come from as many documents as possible, in file order.
    """
    prompts: dict[str, list[str]] = {"en": [], "es": []}
    for document in val_text.split("\n\n"):
        taken = set()
        for line in document.splitlines():
            line_words = line.split()
            if len(line_words) < prompt_words + 2 or not line.lstrip()[:1].isalpha():
                continue
            lang = identify_language(line)
            if lang not in prompts or lang in taken or len(prompts[lang]) >= per_language:
                continue
            opening = " ".join(line_words[:prompt_words])
            if opening not in prompts[lang]:
                prompts[lang].append(opening)
                taken.add(lang)
    return prompts
