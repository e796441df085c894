"""infopt: calibrate, quantize, verify and run Hugging Face causal language models."""

__version__ = "0.1.0"
