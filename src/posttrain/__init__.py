"""posttrain: SFT, RL and hybrids as named presets of one policy-gradient estimator.

    import posttrain
    summary = posttrain.train("recipes/grpo.yaml", out="runs/grpo", overrides={"stages.0.steps": 50})
"""
__version__ = "0.1.0"


def train(recipe, **kwargs):
    """Run a recipe (path, dict or Recipe); see `posttrain.run.train` for the keyword arguments."""
    from .run import train as _train

    return _train(recipe, **kwargs)


__all__ = ["train", "__version__"]
