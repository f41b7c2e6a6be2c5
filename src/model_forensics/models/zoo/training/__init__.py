"""Training scripts that regenerate the zoo's shipped folders, one module per entry.

Each module defines its entry's recipe (data generator, losses, planted units, checks and
records), has ``train(steps=None, seed=0, out_dir=None, *, evaluate=True) -> dict`` and
runs as ``python -m model_forensics.models.zoo.training.<module>``. :mod:`.trainer` is the
one trainer that runs every recipe (the training loop, the two-stage planting recipe,
metrics and the folder); :mod:`.common` holds the pieces the recipes share: word-level
tokenizers and GPT-2s, parameter masks for chosen units, distillation, unit ablation,
evaluation helpers and writing a zoo folder with its checksums.
"""
