import os
from pathlib import Path

# One Inductor cache for the whole suite (a cold CPU compile costs ~20 s); make sets it too.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: "ci" (the default) keeps the property tests
# (tests/properties) to a few examples each and reports a failure as found (shrinking re-captures
# a model per step: minutes); "thorough" (make test-thorough) runs 200 and shrinks. Tests that set
# max_examples themselves keep their own count under either.
settings.register_profile(
    "ci",
    max_examples=6,
    deadline=None,
    derandomize=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(factor: float) -> settings:
    """``@examples(5)``: a property test that runs ``factor`` times the profile's example count
    (cheap tests, e.g. of single ops, can afford many more than tests that capture a model)."""
    return settings(max_examples=max(1, round(settings.default.max_examples * factor)))

ARCHS = ("llada", "dream", "llama", "qwen2")


class GraphRecorder:
    """A Dynamo backend that keeps each captured graph and its example inputs, and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs, **kwargs):
        from stq_compiler.capture import keep_sources

        self.graphs.append((keep_sources(gm), list(example_inputs)))
        return gm.forward


class EmbedsOnly(torch.nn.Module):
    """A model called with embeddings, not token ids: it has no token-state source."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, inputs_embeds):
        return self.proj(inputs_embeds)


def capture_graphs(model, *args):
    torch._dynamo.reset()
    recorder = GraphRecorder()
    with torch.no_grad():
        torch.compile(model, backend=recorder)(*args)
    return recorder.graphs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(arch, seed=0, **overrides):
    from stq_compiler.models import build_tiny

    torch.manual_seed(seed)
    return build_tiny(arch, **overrides).eval()


def sqnr_db(ref, test):
    ref, test = ref.double(), test.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum())).item()


def logits_of(output):
    return output if isinstance(output, torch.Tensor) else output.logits
