"""What the evaluation measures in generated text: its language, its repetition, the prompts it starts
from (stages/evaluate.py's functions, in the pytest process; the report itself: tests/test_evaluate.py)."""

from __future__ import annotations

import json

from evaluate import choose_prompts, corpus_prompts, identify_language, repetition_metrics


def test_language_identifier_on_known_sentences():
    assert identify_language("And the king said unto them, Go ye into the city of David.") == "en"
    assert identify_language("Y el rey les dijo: Id á la ciudad de David, porque es tiempo.") == "es"
    assert identify_language("Blessed are the poor in spirit: for theirs is the kingdom of heaven.") == "en"
    assert identify_language("Bienaventurados los pobres en espíritu: porque de ellos es el reino.") == "es"
    assert identify_language("12345 !!! ???") == "unknown"


def test_repetition_metrics_on_crafted_sequences():
    fresh = repetition_metrics([1, 2, 3, 4, 5, 6], "one two three four five six")
    assert fresh["repeated_3gram_share"] == 0 and fresh["max_repeat_run"] == 1
    assert fresh["distinct_1"] == 1 and fresh["distinct_2"] == 1
    looping = repetition_metrics([1, 2, 3, 1, 2, 3, 1, 2, 3], "the the the the")
    assert looping["repeated_3gram_share"] == 1 - 3 / 7
    assert looping["distinct_1"] == 0.25
    stuck = repetition_metrics([5, 7, 7, 7, 7, 7, 2], "x")
    assert stuck["max_repeat_run"] == 5


def test_a_number_is_not_a_loop_but_a_repeated_word_still_is():
    """The tokenizer writes a number one piece per digit: a quotation dated 3333 is four 3s in a row."""
    dated = repetition_metrics([40, 41, 8, 9, 9, 9, 9, 41], "Isaiah, 3333,",
                               ["\u2581Isaiah", ",", "\u2581", "3", "3", "3", "3", ","])
    assert dated["max_repeat_run"] == 1
    looping = repetition_metrics([40, 7, 7, 7, 7, 41], "and the the the the end",
                                 ["\u2581and", "\u2581the", "\u2581the", "\u2581the", "\u2581the", "\u2581end"])
    assert looping["max_repeat_run"] == 4


VAL_TEXT = (
    "1.2.1. Basic information about the system\n"
    "Table 3. List of tools\n"
    "The shell is the program that reads the commands you type.\n"
    "The kernel then runs them for you.\n"
    "\n"
    "El intérprete de órdenes es el programa que lee lo que escribe.\n"
    "\n"
    "You can change the shell of your account with the chsh command.\n"
)


def test_corpus_prompts_open_sentences_not_headings_one_per_document():
    prompts = corpus_prompts(VAL_TEXT, per_language=3)
    assert prompts == {"en": ["The shell is the", "You can change the"], "es": ["El intérprete de órdenes"]}
    assert corpus_prompts(VAL_TEXT, per_language=1)["en"] == ["The shell is the"]


def test_prompts_are_the_yaml_ones_for_the_default_corpus_else_from_the_validation_split(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "val.txt").write_text(VAL_TEXT, encoding="utf-8")
    paths = {"raw": tmp_path / "raw", "prepared": tmp_path / "prepared"}
    cfg = {"prompt_source": "auto", "prompts_en": ["In the beginning"], "prompts_es": ["En el principio"],
           "_overridden": []}
    for kind, expected in (("wheel", "config"), ("path", "validation documents"), ("url", "validation documents")):
        (tmp_path / "raw" / "corpus.json").write_text(json.dumps({"source": {"kind": kind}}))
        prompts, origin = choose_prompts(cfg, paths)
        assert origin == expected, kind
    assert prompts == {"en": ["The shell is the"], "es": ["El intérprete de órdenes"]}
    assert choose_prompts({**cfg, "_overridden": ["prompts_en"]}, paths)[1] == "config"  # the user's prompts win
    assert choose_prompts({**cfg, "prompt_source": "corpus"}, paths)[1] == "validation documents"
