"""Progress samples: a short continuation of one English and one Spanish prompt every few epochs."""

from __future__ import annotations

import torch

from lib.runtime.files import read_json
from lib.data.language import corpus_prompts

SAMPLE_PROMPTS = {"en": "In the beginning", "es": "En el principio"}


def sample_prompts(paths) -> dict[str, str]:
    """One English and one Spanish prompt for the progress samples.

    The Bible's opening words for the default corpus; for your own corpus the opening
    words of a validation sentence per language, as evaluate.py picks them, so a manual
    is not asked to continue "In the beginning". A language the corpus lacks keeps
    the Bible prompt, and so does a data folder that holds only the token files
    (samples only show progress; they are no reason to refuse to train).
    """
    sidecar, val_text = paths["raw"] / "corpus.json", paths["prepared"] / "val.txt"
    if not (sidecar.exists() and val_text.exists()):
        return dict(SAMPLE_PROMPTS)
    corpus = read_json(sidecar, "corpus sidecar", "run `make download`")
    if corpus["source"]["kind"] == "wheel":
        return dict(SAMPLE_PROMPTS)
    found = corpus_prompts(val_text.read_text(encoding="utf-8"), per_language=1)
    return {lang: (found[lang] or [fallback])[0] for lang, fallback in SAMPLE_PROMPTS.items()}


# How the log's samples are drawn: fixed, so the samples of two runs differ only by their models.
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 50


def generate_samples(model, sp, cfg, device, epoch: int, prompts: dict[str, str]) -> dict:
    """Continue one English and one Spanish prompt; seeded, so runs compare."""
    samples = {}
    for lang, prompt in prompts.items():
        prompt_ids = sp.encode(prompt)
        gen = torch.Generator(device="cpu").manual_seed(cfg["seed"] + epoch)
        new = model.generate([sp.bos_id()] + prompt_ids, cfg["sample_tokens"], temperature=SAMPLE_TEMPERATURE,
                             top_k=SAMPLE_TOP_K, generator=gen, eos_id=sp.eos_id())
        samples[lang] = sp.decode(prompt_ids + [t for t in new if t != sp.eos_id()])
    return samples
