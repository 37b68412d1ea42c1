"""Evaluation: eval loss on every rank's shard, perplexity for causal LMs, BLEU from generation for translation
(and the predictions file of --do_predict). The loop asks `should_eval`; this module does the rest."""
from __future__ import annotations

import math
from pathlib import Path


def should_eval(spec, step: int, total_steps: int, splits) -> bool:
    """Mid-run evaluation every --eval_steps (the end of the run evaluates with --do_eval)."""
    return bool(spec.eval_steps) and step % spec.eval_steps == 0 and step < total_steps and "validation" in splits


def evaluate(engine, spec, ds, collate, tokenizer, step: int, log, denv, zero_stage: int, seq2seq: bool,
             predictions_file: Path | None = None, prefix: str = "eval_") -> None:
    import torch
    import torch.distributed as dist
    from dsfleet.data import eval_batches
    engine.eval()
    device = engine.device
    total = torch.zeros(2, device=device)
    generated: list[tuple[int, str, str]] = []
    want_generate = seq2seq and tokenizer is not None and (spec.predict_with_generate or predictions_file is not None)
    with torch.no_grad():
        for idx in eval_batches(ds, spec.per_device_eval_batch_size, denv.rank, denv.world_size):
            batch = {k: v.to(device) for k, v in collate([ds[i] for i in idx]).items()}
            n_tokens = (batch["labels"] != -100).sum()
            total += torch.stack([engine(**batch).loss.float() * n_tokens, n_tokens.float()])
            if want_generate:
                out = engine.module.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             max_new_tokens=spec.generation_max_length or spec.max_target_length,
                                             num_beams=spec.num_beams,
                                             synced_gpus=zero_stage == 3 and denv.world_size > 1)
                preds = tokenizer.batch_decode(out, skip_special_tokens=True)
                labels = batch["labels"].masked_fill(batch["labels"] == -100, tokenizer.pad_token_id)
                refs = tokenizer.batch_decode(labels, skip_special_tokens=True)
                generated += [(i, p.strip(), r.strip()) for i, p, r in zip(idx, preds, refs)]
    dist.all_reduce(total)
    loss = (total[0] / total[1].clamp(min=1)).item()
    values = {f"{prefix}loss": loss}
    if not seq2seq:
        values[f"{prefix}perplexity"] = math.exp(min(loss, 50))
    if want_generate:
        gathered = [None] * denv.world_size
        dist.all_gather_object(gathered, generated)
        unique = dict((i, (p, r)) for part in gathered for i, p, r in part)
        if denv.rank == 0:
            import sacrebleu
            preds = [unique[i][0] for i in sorted(unique)]
            refs = [unique[i][1] for i in sorted(unique)]
            values["bleu" if prefix == "eval_" else f"{prefix}bleu"] = sacrebleu.corpus_bleu(preds, [refs]).score
            if predictions_file is not None:
                predictions_file.write_text("\n".join(preds) + "\n")
    log.log_eval(step, **values)
    engine.train()


def final_evaluations(engine, spec, splits, collate, tokenizer, step: int, log, denv, zero_stage: int,
                      seq2seq: bool, out: Path) -> None:
    """--do_eval on the validation split and --do_predict on the test split, after training."""
    if spec.do_eval and "validation" in splits:
        evaluate(engine, spec, splits["validation"], collate, tokenizer, step, log, denv, zero_stage, seq2seq)
    if spec.do_predict and "test" in splits:
        evaluate(engine, spec, splits["test"], collate, tokenizer, step, log, denv, zero_stage, seq2seq,
                 predictions_file=out / "generated_predictions.txt", prefix="predict_")
