"""The log wording of examples/explain_age_resnet.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "explain_age_resnet.py"


def load_example():
    spec = importlib.util.spec_from_file_location("explain_age_resnet", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_merged_counts_name_each_group():
    example = load_example()
    assert example.describe_counts({2: 1, 0: 2, 1: 3}) == "6 maps: 2 minor, 3 adult, 1 old"
    assert example.describe_counts({1: 4}) == "4 maps: 4 adult"
