"""The docs state today's defaults, and the learner's path stays short enough to read.

A default written by hand goes stale the day config/defaults.yaml changes ("training uses 128" under a
256-token context; `AdamW.step()` in a diagram while the default optimiser is Muon). So every number a page
puts next to the name of a setting (context / sequence length, batch, learning rate, vocabulary, epochs,
layers, heads, width, warmup, decay, clipping, sampling) must be that setting's default, in prose, captions,
diagrams, and the strings stages/figures.py draws into images. A value that is not the default is written
the way it is typed, `SEQ_LEN=128` or `--max-seq-length 128`, so it reads as an override and is skipped.
docs/experiments.md is exempt: it is the lab notebook, each table measured at the settings of its day.

In-process and fast: only text is read.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((REPO / "config" / "defaults.yaml").read_text(encoding="utf-8"))
LEARNER_PATH = ["README.md", "docs/walkthrough.md", "docs/training.md"]
MAX_LEARNER_WORDS = 6000
CHECKED_PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")
                                       if p.name != "experiments.md")]

NUMBER = (r"(\d[\d,]*(?:\.\d+)?(?:e-?\d+)?|one|two|three|four|five|six|eight|twelve|sixteen)\b"
          r"(?! special| bytes?| bits?|-bit|%| MB| GB| ms)")  # those count something else
WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "eight": 8, "twelve": 12, "sixteen": 16}
LINK = r"[\s`*']*"  # markup and spaces between a name and its number
VERB = r"(?:(?:is|was|of|=|:|at|over|to|defaults? to|by default|uses|stays at)" + LINK + r")?"

# setting -> (names a page writes before its number, names written after it: "256-token context", "20 epochs")
SETTINGS = {
    "train.max_seq_length": (r"context(?: length| window)?|sequence length|max_seq_length|SEQ_LEN|training uses|"
                             r"window length", r"-token context|tokens of context|-token windows?"),
    "train.batch_size": (r"batch size|batch_size|BATCH_SIZE|batch(?:es)?", r"windows per step|-window batch"),
    "train.learning_rate": (r"(?i:learning rate)|learning_rate|\bLR\b|peak rate", ""),
    "tokenizer.vocab_size": (r"vocabulary(?: size)?|vocab_size|VOCAB_SIZE|vocab", r" pieces|-piece|-way"),
    "train.epochs": (r"EPOCHS", r" epochs"),
    "train.d_model": (r"d_model|D_MODEL|width", r"-number vectors?"),
    "train.n_layers": (r"n_layers|N_LAYERS|layers", r" layers| blocks"),
    "train.n_heads": (r"n_heads|N_HEADS|heads", r" heads"),
    "train.warmup_steps": (r"warmup(?:_steps)?|WARMUP", r" warmup steps"),
    "train.weight_decay": (r"weight decay|weight_decay|WEIGHT_DECAY", ""),
    "train.grad_clip": (r"grad_clip|GRAD_CLIP|clipping threshold", ""),
    "train.min_lr_ratio": (r"min_lr_ratio|MIN_LR_RATIO", ""),
    "train.muon_lr_scale": (r"muon_lr_scale|MUON_LR_SCALE", ""),
    "train.input_noise": (r"input_noise|INPUT_NOISE|input noise", ""),
    "evaluate.temperature": (r"temperature|TEMPERATURE", ""),
    "evaluate.top_k": (r"top_k|TOP_K|top-k", ""),
}
OPTIMISERS = ("AdamW", "Adam", "Muon", "SGD")


def default(key: str):
    stage, name = key.split(".")
    return CONFIG[stage][name]


def as_number(text: str) -> float:
    return float(WORDS.get(text.lower(), text.replace(",", "")))


def sections(text: str) -> list[str]:
    return re.split(r"\n(?=#+ )", text)


def stale_defaults(text: str, where: str) -> list[str]:
    """stale_in_section over each section (from one heading to the next)."""
    return [stale for section in sections(text) for stale in stale_in_section(section, where)]


def stale_in_section(text: str, where: str) -> list[str]:
    """Every number beside a setting's name that differs from config/defaults.yaml, as 'where: quote (default x)'.
    A value the same section shows being typed (`VOCAB_SIZE=20000`) is that example's, not a default."""
    found = []
    for key, (before, after) in SETTINGS.items():
        if isinstance(default(key), str):
            continue
        names = rf"(?:{before})"
        typed_here = {as_number(m[1]) for m in re.finditer(rf"(?:{names})={NUMBER}", text)}
        for plus_one, pattern in ((0, rf"(?<!\w)(?P<name>{names})(?P<link>{LINK}{VERB}){NUMBER}"),
                                  (1, rf"(?P<name>{names})(?P<link>{LINK}\+{LINK}1{LINK}={LINK}){NUMBER}")):
            for match in re.finditer(pattern, text):
                typed = match["link"].startswith("=") or text[max(0, match.start() - 2):match.start()] == "--"
                product = text[match.end():match.end() + 2].strip()[:1] in {"x", "×", "*", "="}
                value = as_number(match[3])
                if not typed and not product and value != float(default(key)) + plus_one and value not in typed_here:
                    found.append(f"{where}: {match[0]!r} (default {key} = {default(key)})")
        if after:
            for match in re.finditer(rf"(?<![\w.=/-])(?<!every )(?<!Every )(?<!into ){NUMBER}(?:{after})\b", text):
                if as_number(match[1]) != float(default(key)):
                    found.append(f"{where}: {match[0]!r} (default {key} = {default(key)})")
    chosen = default("train.optimizer")
    for match in re.finditer(rf"\b({'|'.join(OPTIMISERS)})\.step\(\)", text):
        line = text[text.rfind("\n", 0, match.start()) + 1:text.find("\n", match.end())]
        if chosen.lower() not in line.lower():
            found.append(f"{where}: {line.strip()!r} steps {match[1]}, the default optimiser is {chosen}")
    for match in re.finditer(rf"default optimi[sz]er(?: is|:)\W*({'|'.join(OPTIMISERS)})\b", text, re.I):
        if match[1].lower() != chosen:
            found.append(f"{where}: {match[0]!r}, the default optimiser is {chosen}")
    return found


def rendered(markdown: str) -> str:
    """What a reader sees: HTML comments (and so cog's code and markers) removed, cog's output kept."""
    return re.sub(r"<!--.*?-->", "", markdown, flags=re.S)


def hand_written(markdown: str) -> str:
    """The page without what cog generates: text a person keeps up to date."""
    return rendered(re.sub(r"\]\]\] -->.*?<!-- \[\[\[end\]\]\] -->", "", markdown, flags=re.S))


def rendered_words(markdown: str) -> int:
    """Words a reader reads: prose, tables, code and logs; not comments or cog markers."""
    return len(rendered(markdown).split())


def figure_strings() -> str:
    """The text stages/figures.py draws into the images (titles, labels, captions), one string a line."""
    tree = ast.parse((REPO / "stages" / "figures.py").read_text(encoding="utf-8"))
    pieces = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    return "\n".join(pieces)


# ----------------------------------------------------------------------------- the checker catches each class


@pytest.mark.parametrize("stale", [
    "![Two epochs' windows (T = 8 here; training uses 128)](images/window_grid.png)",
    "cut into windows of max_seq_length + 1 = 129 ids",
    "The model reads a context of 128 tokens.",
    "one 128-token context at a time",
    "a batch of windows, batch size 64, at the peak learning rate 0.0003",
    "   │    AdamW.step(); zero_grad()                           update     │",
    "The default optimiser is AdamW.",
    "SentencePiece with 16000 pieces",
    "It trains 10 epochs.",
    "in batches of 64 windows",
    "the vocabulary of 4000 pieces",
    "Each of the 4 blocks",
    "at temperature 1.0 and top-k 40",
])
def test_a_stale_default_is_caught(stale):
    assert stale_defaults(stale, "planted"), f"not caught: {stale}"


@pytest.mark.parametrize("fine", [
    "make train SEQ_LEN=128 BATCH_SIZE=64 LR=0.001 EPOCHS=2",
    "python stages/train.py --max-seq-length 128 --learning-rate 0.001",
    "   │    Muon.step(); AdamW.step(); zero_grad()            update     │",
    "4 special ids, 256 byte pieces",
    "every 5 epochs",
])
def test_an_override_or_another_quantity_is_not_a_default(fine):
    assert not stale_defaults(fine, "example"), stale_defaults(fine, "example")


def test_the_current_defaults_pass():
    p = CONFIG["train"]
    text = (f"a context of {p['max_seq_length']} tokens, max_seq_length + 1 = {p['max_seq_length'] + 1}, "
            f"batch size {p['batch_size']}, {CONFIG['tokenizer']['vocab_size']} pieces, {p['epochs']} epochs, "
            f"learning rate {p['learning_rate']}; {p['optimizer'].capitalize()}.step()")
    assert not stale_defaults(text, "today")


# ----------------------------------------------------------------------------- the pages


@pytest.mark.parametrize("page", CHECKED_PAGES)
def test_pages_state_todays_defaults(page):
    text = rendered((REPO / page).read_text(encoding="utf-8"))
    stale = stale_defaults(text, page)
    assert not stale, "a default stated by hand went stale; write it with cog (default('key') in " \
                      "docs/cog_figures.py) or as an override (SEQ_LEN=128):\n" + "\n".join(stale)


def test_figures_draw_todays_defaults():
    stale = stale_defaults(figure_strings(), "stages/figures.py")
    assert not stale, "stages/figures.py draws a default by hand; take it from the run's config:\n" + "\n".join(stale)


def test_derived_defaults_are_generated():
    """Figures computed from defaults (bytes per parameter of the optimiser's state) come from cog, never by hand."""
    by_hand = [f"{page}: {m[0]!r}" for page in CHECKED_PAGES
               for m in re.finditer(r"\d+ bytes (?:per|a) parameter", hand_written((REPO / page).read_text("utf-8")))]
    assert not by_hand, by_hand


def test_the_learners_path_is_at_most_6000_words():
    words = {page: rendered_words((REPO / page).read_text(encoding="utf-8")) for page in LEARNER_PATH}
    assert sum(words.values()) <= MAX_LEARNER_WORDS, f"{sum(words.values())} words: {words}"


def test_the_word_count_skips_comments_and_cog_code():
    page = "One two.\n<!-- [[[cog\nprint('three four five')\n]]] -->\nthree four five\n<!-- [[[end]]] -->\n<!-- a note -->"
    assert rendered_words(page) == 5


# ----------------------------------------------------------------------------- cog blocks split no sentence

LIST_LINE = re.compile(r"^(?:\s*(?:[-*+]|\d+\.)\s|\s{2,}\S)")  # a list item, or a list item's indented continuation


def is_boundary(line: str, generated_edge: str) -> bool:
    """Can a cog marker sit next to this line without cutting its paragraph? A marker is an HTML block, which
    ends the paragraph it interrupts: so only a blank line, a heading, a fence or another marker may touch it,
    or a list line when the generated text on that side is a list line too (the block adds whole items)."""
    stripped = line.strip()
    if not stripped or stripped.startswith(("#", "```", "<!--")) or stripped.endswith("-->"):
        return True
    return bool(LIST_LINE.match(line)) and bool(LIST_LINE.match(generated_edge))


def split_sentences(markdown: str, where: str) -> list[str]:
    """Every cog block that does not generate whole paragraphs, list items or tables, as 'where:line: why'."""
    lines, found = markdown.split("\n"), []
    starts = [i for i, line in enumerate(lines) if "[[[cog" in line]
    for start in starts:
        code_end = next(i for i in range(start, len(lines)) if "]]] -->" in lines[i])
        end = next(i for i in range(code_end, len(lines)) if "[[[end]]]" in lines[i])
        generated = lines[code_end + 1:end] or [""]
        before, after = (lines[start - 1] if start else ""), (lines[end + 1] if end + 1 < len(lines) else "")
        if not lines[start].startswith("<!-- [[[cog") or lines[end].strip() != "<!-- [[[end]]] -->":
            found.append(f"{where}:{start + 1}: text on a marker's line")
        if not is_boundary(before, generated[0]):
            found.append(f"{where}:{start + 1}: the block starts inside a paragraph: {before.strip()!r}")
        if not is_boundary(after, generated[-1]):
            found.append(f"{where}:{end + 1}: the block ends inside a paragraph: {after.strip()!r}")
    return found


@pytest.mark.parametrize("planted", [
    "The vocabulary holds\n<!-- [[[cog print('8000 pieces') ]]] -->\n8000 pieces\n<!-- [[[end]]] -->\n",
    "\n<!-- [[[cog print('Every 5 epochs') ]]] -->\nEvery 5 epochs\n<!-- [[[end]]] -->\nit prints samples.\n",
    "- an item\n<!-- [[[cog print('more of the item') ]]] -->\nmore of the item\n<!-- [[[end]]] -->\n",
    "\n<!-- [[[cog print('A sentence.') ]]] -->\nA sentence.\n<!-- [[[end]]] --> And its tail.\n",
])
def test_a_cog_block_inside_a_sentence_is_caught(planted):
    assert split_sentences(planted, "planted"), f"not caught: {planted!r}"


@pytest.mark.parametrize("fine", [
    "A paragraph.\n\n<!-- [[[cog print('Another.') ]]] -->\nAnother.\n<!-- [[[end]]] -->\n\nA third.\n",
    "## Heading\n<!-- [[[cog\nprint('- an item')\n]]] -->\n- an item\n<!-- [[[end]]] -->\n- the next item\n",
    "- an item\n  continued\n<!-- [[[cog print('- another') ]]] -->\n- another\n<!-- [[[end]]] -->\n",
])
def test_a_cog_block_of_whole_blocks_passes(fine):
    assert not split_sentences(fine, "example"), split_sentences(fine, "example")


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))])
def test_cog_blocks_generate_whole_paragraphs(page):
    """A cog block's markers are HTML blocks, and an HTML block ends the paragraph it interrupts: a block
    in the middle of a sentence splits it in two on the rendered page ("Every 5 epochs" / "and at the end")."""
    split = split_sentences((REPO / page).read_text(encoding="utf-8"), page)
    assert not split, "move the rest of the sentence into the block's output, or end the paragraph first:\n" + \
        "\n".join(split)
