"""DeepSeek-V2/V3 checkpoints in and out (placeholder being written)."""

import json
import os

DEEPSEEK_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def is_deepseek_checkpoint(path) -> bool:
    config_file = os.path.join(str(path), "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file) as f:
        return json.load(f).get("model_type") in DEEPSEEK_MODEL_TYPES


def load_deepseek_checkpoint(cls, path, *args, **kwargs):
    raise NotImplementedError
