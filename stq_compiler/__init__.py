"""stq_compiler: a torch.compile backend running diffusion LLMs at 4-bit weights and activations."""

from stq_compiler import ops  # registers the stq:: custom ops

__version__ = "0.1.0"
