"""infopt: calibrate, quantize, verify and run Hugging Face causal language models."""

import os

# Reproducible numbers: left dynamic, MKL may use fewer threads than asked while the machine is busy, which blocks
# products differently and changes their last bits (and so a model card's measured figures). Read when torch loads
# MKL, so it is set before anything imports torch.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__version__ = "0.1.0"
