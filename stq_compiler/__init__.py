"""stq_compiler: a torch.compile backend running diffusion LLMs at 4-bit weights and activations."""

from stq_compiler import ops, tac_ops  # noqa: F401  (register the stq:: custom ops)
from stq_compiler.backend import StarQuant, starquant
from stq_compiler.release import release_float_weights

__version__ = "0.1.0"
__all__ = ["Recipe", "StarQuant", "calibrate", "generate", "release_float_weights", "starquant"]


def __getattr__(name):
    # The sampler and calibration pull in model and training code; load them when asked for.
    if name == "generate":
        from stq_compiler.sampling import generate

        return generate
    if name == "calibrate":
        from stq_compiler.calibration.calibrate import calibrate

        return calibrate
    if name == "Recipe":
        from stq_compiler.recipe import Recipe

        return Recipe
    raise AttributeError(f"module 'stq_compiler' has no attribute {name!r}")
