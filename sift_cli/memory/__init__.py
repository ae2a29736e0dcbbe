"""The memory of a fine-tuning step: predicted (model.py, activations.py), measured (measure.py), and the
`sift-memory` command (cli.py)."""
