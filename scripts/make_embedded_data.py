"""Regenerates dsfleet's embedded demo data (src/dsfleet/embedded/): a small English->Romanian parallel
corpus from a grammar (adjective after the noun, gender agreement, negation), so a tiny T5 shows BLEU
rising within minutes on CPU, plus the same sentences as plain text for the causal-LM presets.
Deterministic: `python scripts/make_embedded_data.py` reproduces the committed files byte for byte."""
import json
import random
from pathlib import Path

SUBJECTS = [("the cat", "pisica", "f"), ("the dog", "câinele", "m"), ("the boy", "băiatul", "m"),
            ("the girl", "fata", "f"), ("the teacher", "profesorul", "m"), ("the doctor", "doctorul", "m"),
            ("the woman", "femeia", "f"), ("the man", "bărbatul", "m"), ("the bird", "pasărea", "f"),
            ("the child", "copilul", "m")]
ADJECTIVES = [("small", "mic", "mică"), ("big", "mare", "mare"), ("red", "roșu", "roșie"),
              ("old", "bătrân", "bătrână"), ("happy", "fericit", "fericită"), ("tired", "obosit", "obosită"),
              ("young", "tânăr", "tânără")]
VERBS = [("sees", "see", "vede"), ("eats", "eat", "mănâncă"), ("reads", "read", "citește"),
         ("wants", "want", "vrea"), ("buys", "buy", "cumpără"), ("finds", "find", "găsește"),
         ("has", "have", "are"), ("carries", "carry", "poartă")]
OBJECTS = [("an apple", "un măr"), ("a book", "o carte"), ("a letter", "o scrisoare"), ("bread", "pâine"),
           ("the house", "casa"), ("a car", "o mașină"), ("water", "apă"), ("a flower", "o floare"),
           ("the ball", "mingea")]
ADVERBS = [("", ""), ("today", "astăzi"), ("in the morning", "dimineața"), ("every day", "în fiecare zi"),
           ("now", "acum")]


def sentence(rng: random.Random) -> dict:
    s_en, s_ro, gender = rng.choice(SUBJECTS)
    if rng.random() < 0.6:
        a_en, a_m, a_f = rng.choice(ADJECTIVES)
        s_en = s_en.replace("the ", f"the {a_en} ")
        s_ro = f"{s_ro} {a_m if gender == 'm' else a_f}"
    v3, vbase, v_ro = rng.choice(VERBS)
    negate = rng.random() < 0.3
    o_en, o_ro = rng.choice(OBJECTS)
    adv_en, adv_ro = rng.choice(ADVERBS)
    en = f"{s_en} {'does not ' + vbase if negate else v3} {o_en} {adv_en}".strip() + "."
    ro = f"{s_ro} {'nu ' if negate else ''}{v_ro} {o_ro} {adv_ro}".strip() + "."
    return {"translation": {"en": en[0].upper() + en[1:], "ro": ro[0].upper() + ro[1:]}}


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "src" / "dsfleet" / "embedded"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    seen, rows = set(), []
    while len(rows) < 2400:
        row = sentence(rng)
        if row["translation"]["en"] not in seen:
            seen.add(row["translation"]["en"])
            rows.append(row)
    splits = {"train": rows[:2000], "validation": rows[2000:2200], "test": rows[2200:]}
    for name, part in splits.items():
        with open(out / f"translation_{name}.jsonl", "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        with open(out / f"text_{name}.jsonl", "w", encoding="utf-8") as f:
            for row in part:
                t = row["translation"]
                f.write(json.dumps({"text": f"{t['en']} = {t['ro']}"}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
