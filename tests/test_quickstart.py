import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_end_to_end(tmp_path, capsys):
    quickstart = load_quickstart()
    args = ["--out", str(tmp_path), "--epochs", "3", "--max-test", "6", "--num-random", "3", "--no-progress"]
    result = quickstart.main(args)

    printed = capsys.readouterr().out
    assert "landmarks only" in printed
    assert "random masks (n=3)" in printed
    assert 0.0 <= result.full <= 1.0
    assert result.kept == int(0.66 * 625 + 0.5)
    assert not math.isnan(result.random_mean)
    for name in ("maps.npz", "maps.png", "example.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = np.load(tmp_path / "maps.npz")
    assert saved["positive"].shape == (6, 25, 25)
    assert saved["landmarks"].sum() == result.kept


def test_quickstart_is_deterministic(tmp_path):
    quickstart = load_quickstart()
    args = ["--epochs", "2", "--max-test", "4", "--num-random", "2", "--no-progress"]
    first = quickstart.main(["--out", str(tmp_path / "a"), *args])
    second = quickstart.main(["--out", str(tmp_path / "b"), *args])
    assert (first.full, first.landmarks, first.kept) == (second.full, second.landmarks, second.kept)
    assert first.random.tolist() == second.random.tolist()
    np.testing.assert_array_equal(
        np.load(tmp_path / "a" / "maps.npz")["positive"], np.load(tmp_path / "b" / "maps.npz")["positive"]
    )
