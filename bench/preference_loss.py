"""CPU step time of DPO/KTO: the model's own LM head (our default on CPU) against TRL's chunked kernel.

Builds the trainer ``python -m train stage=<dpo|kto>`` builds, twice, identical but for
``training.cpu_fused_lm_head``, and times one training step (forward and backward, no optimizer
step) on the same first batch, alternating the two, then prints the medians side by side with the
losses and the largest difference between the two gradients (they compute the same thing).

    python bench/preference_loss.py                      # stage=dpo data=preference_sample
    python bench/preference_loss.py stage=kto data=kto_sample [more overrides...]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 6


def trainer_for(overrides: list[str], fused: bool, tokenizer):
    from data import prepare_from_config
    from train.config import compose_config, load_config
    from train.model.build import build_model, compute_dtype
    from train.run.preference import build_preference_trainer
    from train.run.trainer import training_args

    cfg = compose_config(
        [*overrides, "training.report_to=[]", f"training.cpu_fused_lm_head={str(fused).lower()}"]
    )
    config = load_config(cfg)
    dataset, _, _ = prepare_from_config(
        config.data, tokenizer, max_length=config.training.max_length, objective=config.stage.name
    )
    dtype = compute_dtype(config.model.dtype)
    model = build_model(config.model, tokenizer, dtype=dtype, seed=config.training.seed, method=config.method)
    run_dir = Path(tempfile.mkdtemp())
    args = training_args(config, run_dir, dtype)
    trainer = build_preference_trainer(config, model, tokenizer, dataset, run_dir, args)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); training_step divides by it
    size = config.training.per_device_train_batch_size
    return trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(size)])


def main(argv: list[str]) -> None:
    from data import load_tokenizer

    overrides = argv or ["stage=dpo", "data=preference_sample"]
    tokenizer = load_tokenizer()
    runs = {fused: trainer_for(overrides, fused, tokenizer) for fused in (True, False)}
    seconds, losses, grads = {True: [], False: []}, {}, {}
    for repeat in range(REPEATS + 1):  # the first is a warm-up
        for fused, (trainer, batch) in runs.items():
            trainer.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            losses[fused] = float(trainer.training_step(trainer.model, batch))
            if repeat:
                seconds[fused].append(time.perf_counter() - start)
            grads[fused] = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    trl, ours = statistics.median(seconds[True]), statistics.median(seconds[False])
    tokens = int(runs[False][1]["attention_mask"].numel())
    difference = max((a - b).abs().max().item() for a, b in zip(grads[True], grads[False], strict=True))
    print(f"{' '.join(overrides)}: one step on {tokens} padded tokens, median of {REPEATS}")
    print(f"{'':<26}{'TRL chunked kernel':>20}{'model LM head (ours)':>22}")
    print(f"{'seconds per step':<26}{trl:>20.3f}{ours:>22.3f}")
    print(f"{'speed-up':<26}{'1.00x':>20}{trl / ours:>21.2f}x")
    print(f"losses {losses[True]:.6f} vs {losses[False]:.6f}; largest gradient difference {difference:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
