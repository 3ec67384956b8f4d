"""Tools apart from the service: the tiny test model, synthetic videos, grounder training, fault
injection, code generation. Nothing in the service or the workers imports them."""

from pathlib import Path

GROUNDER_DIR = Path(__file__).resolve().parent / "grounder"
"""The shipped tiny grounder checkpoint (trained by :mod:`moments.tools.train_grounder`)."""
