"""mahalo: PRM-guided, batched step-level decoding with two-sided KV-cache reuse."""

from mahalo.api import guided_generate, guided_generate_many
from mahalo.config import GuideConfig
from mahalo.result import Answer, Candidate, GuidedResult, Stats, Step

__all__ = ["guided_generate", "guided_generate_many", "GuideConfig", "GuidedResult", "Step", "Candidate", "Stats",
           "Answer"]
__version__ = "0.1.0"
