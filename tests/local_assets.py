"""Local stand-ins for what the seeds pull from the hub (no hub here): a T5 model dir with its tokenizer, and
a dataset dir laid out like the hub's wmt16 (`load_dataset(dir, "ro-en")` works through its README configs)."""
from __future__ import annotations

import json
from pathlib import Path

from dsfleet.data import embedded_files


def make_local_wmt16(root: Path, n_train: int = 400, n_val: int = 48) -> Path:
    (root / "ro-en").mkdir(parents=True, exist_ok=True)
    files = embedded_files("translation")
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_val)):
        rows = Path(files[split]).read_text(encoding="utf-8").splitlines()[:n]
        (root / "ro-en" / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: ro-en\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: ro-en/{s}.jsonl\n" for s in ("train", "validation", "test"))
        + "---\n# wmt16 ro-en, a local stand-in made from dsfleet's embedded corpus\n")
    return root


def make_local_t5(root: Path) -> Path:
    """A t5_tiny model + a BPE tokenizer trained on the embedded text, saved like a hub checkpoint."""
    from dsfleet.data import train_bpe_tokenizer
    from dsfleet.models import load_model
    from dsfleet.presets import get_preset

    rows = [json.loads(line)["translation"] for line in Path(embedded_files("translation")["train"]).read_text().splitlines()]
    tok = train_bpe_tokenizer((t for r in rows for t in (r["en"], r["ro"])), 512, root)
    model = load_model(get_preset("t5_tiny"), None, True, {"vocab_size": len(tok)})
    model.save_pretrained(root)
    return root
