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


# Tiny configs of architectures without a preset (random init, saved like a hub checkpoint): the causal LMs of the
# Llama family (Qwen2 with tied embeddings, Mistral with grouped-query attention) and two seq2seq models that are
# not T5 (BART, mT5). Token ids follow dsfleet's locally trained tokenizers: pad 0, eos 1.
_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(_IDS, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(_IDS, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(_IDS, vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, sliding_window=None)),
    "bart": ("BartConfig", dict(_IDS, vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=2,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                decoder_ffn_dim=128, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
                                decoder_start_token_id=0, forced_eos_token_id=None)),
    "mt5": ("MT5Config", dict(vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2,
                              num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                              decoder_start_token_id=0)),
}
SEQ2SEQ = ("bart", "mt5")


def tiny_config(kind: str, **overrides):
    import transformers
    cls_name, kwargs = TINY_CONFIGS[kind]
    return getattr(transformers, cls_name)(**{**kwargs, **overrides})


def make_local_model(root: Path, kind: str, weights: bool = True) -> Path:
    """A tiny `kind` model dir: config.json (+ random-init weights unless weights=False) and a byte-level BPE
    trained here on the embedded corpus (translation pairs for seq2seq kinds, text for causal LMs)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from dsfleet.data import train_bpe_tokenizer
    task = "translation" if kind in SEQ2SEQ else "text"
    rows = [json.loads(line) for line in Path(embedded_files(task)["train"]).read_text().splitlines()]
    texts = (t for r in rows for t in ((r["translation"]["en"], r["translation"]["ro"]) if kind in SEQ2SEQ
                                       else (r["text"],)) if t)
    root.mkdir(parents=True, exist_ok=True)
    train_bpe_tokenizer(texts, 512, root)
    cfg = tiny_config(kind)
    if not weights:
        cfg.save_pretrained(root)
        return root
    import torch
    torch.manual_seed(0)
    auto = AutoModelForSeq2SeqLM if kind in SEQ2SEQ else AutoModelForCausalLM
    auto.from_config(cfg).save_pretrained(root)
    return root
