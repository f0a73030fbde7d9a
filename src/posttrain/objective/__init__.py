"""The one policy-gradient estimator, its components and the named presets."""
from .components import aggregation_weights, kl_penalty  # noqa: F401
from .estimator import EstimatorTerms, estimator_loss  # noqa: F401
from .presets import PRESETS, Preset, get_preset  # noqa: F401
