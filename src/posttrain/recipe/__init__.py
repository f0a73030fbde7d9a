"""Typed, strict recipes: YAML -> validated objects, dotted overrides, preset defaults resolved in one place.

A recipe names a model and one or more stages; each stage names a method (a preset) and may override
its components (`clip.eps_high: 0.28`). Every config class forbids unknown keys: a typo is an error
naming the key path and the closest valid key, raised before any model is loaded.

    schema.py   the config classes (each field's trailing comment is its line in docs/recipe-keys.md)
    resolve.py  preset defaults filled in, combinations that cannot run refused
    load.py     YAML / builtin:NAME / dict -> Recipe, dotted overrides, errors naming the closest key
"""
from .schema import (
    DATA_FORMATS, RecipeError, Strict, DataConfig, RewardConfig, OptimConfig, ScheduleConfig, BatchConfig,
    RolloutConfig, ClipConfig, KLConfig, DistillConfig, EntropyConfig, AdvantageConfig, CriticConfig,
    DynamicSamplingConfig, StreamConfig, StreamsConfig, SourcesConfig, MixConfig, PreferenceConfig,
    OverlongConfig, RewardPolicyConfig, SamplesConfig, LoraConfig, StopConfig, StageConfig, EvalConfig,
    CheckpointConfig, DistributedConfig, Recipe,
)
from .resolve import (
    resolve_stage, stage_streams, resolve,
)
from .load import (
    apply_overrides, BUILTIN_RECIPES, builtin_recipe, recipe_data, load_recipe, explain, dump_recipe,
    method_table,
)

__all__ = [
    "DATA_FORMATS",
    "RecipeError",
    "Strict",
    "DataConfig",
    "RewardConfig",
    "OptimConfig",
    "ScheduleConfig",
    "BatchConfig",
    "RolloutConfig",
    "ClipConfig",
    "KLConfig",
    "DistillConfig",
    "EntropyConfig",
    "AdvantageConfig",
    "CriticConfig",
    "DynamicSamplingConfig",
    "StreamConfig",
    "StreamsConfig",
    "SourcesConfig",
    "MixConfig",
    "PreferenceConfig",
    "OverlongConfig",
    "RewardPolicyConfig",
    "SamplesConfig",
    "LoraConfig",
    "StopConfig",
    "StageConfig",
    "EvalConfig",
    "CheckpointConfig",
    "DistributedConfig",
    "Recipe",
    "resolve_stage",
    "stage_streams",
    "resolve",
    "apply_overrides",
    "BUILTIN_RECIPES",
    "builtin_recipe",
    "recipe_data",
    "load_recipe",
    "explain",
    "dump_recipe",
    "method_table",
]
