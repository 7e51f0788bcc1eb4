"""``qtool eval``: perplexity, and KL divergence / top-1 agreement against the base model.

- :mod:`.data`: ``--dataset`` resolution, tokenization, llama-perplexity's windows;
- :mod:`.gguf_decode`: a GGUF's blocks decoded exactly into the base's HF architecture;
- :mod:`.loaders`: artifact -> runner (transformers, compressed-tensors, GGUF, llama.cpp);
- :mod:`.metrics`: streaming PPL / KLD / top-1 / Δp;
- :mod:`.runner`: the one-pass engine; :mod:`.report`: the table and the plot.
"""

from qtool.evaluate.runner import EvalSettings, run_eval

__all__ = ["EvalSettings", "run_eval"]
