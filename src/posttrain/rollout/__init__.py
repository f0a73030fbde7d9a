"""Generation engines: a KV-cached sampler over transformers models."""
from posttrain.rollout.sampler import Rollout, sample

__all__ = ["Rollout", "sample"]
