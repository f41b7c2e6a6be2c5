"""Training scripts that regenerate the zoo's shipped folders, one module per entry.

Each module has ``train(steps=None, seed=0, out_dir=None) -> dict`` and runs as
``python -m model_forensics.models.zoo.training.<module>``; its synthetic data
generator lives beside it. :mod:`.common` holds what they share: word-level
tokenizers, the planting recipe (parameter masks for chosen units), unit ablation
and writing a zoo folder with its checksums.
"""
