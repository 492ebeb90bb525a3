import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import efmap
from efmap.evaluate import (
    Blur,
    NoisyImputation,
    attribution_maps,
    centered_box,
    compare_methods,
    curve_area,
    feature_ranks,
    fill_removed,
    gaussian_blur,
    noisy_linear_imputation,
    perturbation_curves,
    randomization_check,
    spearman,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Distinct positive weights of a 3x4 linear model, scrambled so that row-major order is not the importance order.
WEIGHTS = torch.tensor([[5.0, 12.0, 1.0, 7.0], [3.0, 10.0, 8.0, 2.0], [11.0, 4.0, 9.0, 6.0]], dtype=torch.float64)


class LinearScore(torch.nn.Module):
    """Class 0 scores ``sum(weights * x)``, class 1 scores 0: removing feature i (fill 0) lowers class 0 by w_i x_i."""

    def __init__(self, weights: torch.Tensor = WEIGHTS) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(weights.clone())

    def forward(self, x):
        score = (x[:, 0] * self.weights).flatten(1).sum(dim=1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


class PixelSign(torch.nn.Module):
    """Class 1 when pixel (0, 0) is positive, else class 0: only that pixel matters."""

    def forward(self, x):
        value = x[:, 0, 0, 0]
        return torch.stack([-value, value], dim=1)


def linear_curves(maps, **options):
    inputs = torch.ones(1, 1, 3, 4, dtype=torch.float64)
    defaults = {"target": 0, "steps": 12, "softmax": False}
    return perturbation_curves(LinearScore().eval(), inputs, maps, **{**defaults, **options})


# Deletion and insertion curves


def test_deletion_curve_of_true_map_is_exact():
    curves = linear_curves(WEIGHTS[None])
    removed_in_order = torch.sort(WEIGHTS.flatten(), descending=True).values
    expected = WEIGHTS.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), removed_in_order.cumsum(0)])
    torch.testing.assert_close(curves.deletion[0], expected)
    torch.testing.assert_close(curves.fractions, torch.arange(13, dtype=torch.float64) / 12)
    # Insertion adds the same features to an all-zero input, so its curve is the complement.
    torch.testing.assert_close(curves.insertion[0], WEIGHTS.sum() - expected)


def test_true_map_curves_are_extreme():
    best = linear_curves(WEIGHTS[None])
    worst = linear_curves(-WEIGHTS[None])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = linear_curves(torch.rand(1, 3, 4, generator=generator, dtype=torch.float64))
        assert (best.deletion <= other.deletion + 1e-9).all()
        assert (other.deletion <= worst.deletion + 1e-9).all()
        assert (best.insertion >= other.insertion - 1e-9).all()
    assert float(best.deletion_area) < float(worst.deletion_area)


@settings(deadline=None, max_examples=25, derandomize=True)
@given(seed=st.integers(0, 2**16), draws=st.integers(1, 4))
def test_random_order_area_lies_between_best_and_worst(seed, draws):
    best = linear_curves(WEIGHTS[None], num_random=draws, seed=seed)
    worst = linear_curves(-WEIGHTS[None])
    random_area = best.random_deletion_area
    assert random_area.shape == (draws, 1)
    assert (best.deletion_area <= random_area).all()
    assert (random_area <= worst.deletion_area).all()
    assert (best.random_insertion_area <= best.insertion_area).all()


def test_curves_do_not_depend_on_batch_size():
    inputs = torch.rand(3, 1, 3, 4, dtype=torch.float64) * 2 - 1
    maps = torch.rand(3, 3, 4, dtype=torch.float64)
    model = LinearScore().eval()
    for fill in (0.0, "reverse", "blur", "road"):
        results = [
            perturbation_curves(model, inputs, maps, steps=5, num_random=2, fill=fill, batch_size=size)
            for size in (1, 7, 200)
        ]
        for other in results[1:]:
            torch.testing.assert_close(other.deletion, results[0].deletion)
            torch.testing.assert_close(other.random_insertion, results[0].random_insertion)


def test_curves_use_at_most_batch_size_copies():
    sizes = []

    def model(x):
        sizes.append(x.shape[0])
        return LinearScore()(x)

    reports = []
    perturbation_curves(
        model,
        torch.ones(2, 1, 3, 4, dtype=torch.float64),
        WEIGHTS.expand(2, 3, 4),
        steps=4,
        batch_size=3,
        progress=lambda done, total: reports.append((done, total)),
    )
    assert reports[-1] == (20, 20)
    assert max(sizes) <= 3
    # Two clean forward passes, then deletion and insertion over 5 steps for 2 inputs.
    assert sum(sizes) == 2 + 2 * 5 * 2


def test_curve_ends_equal_clean_and_fully_filled_scores():
    inputs = torch.rand(2, 1, 3, 4, dtype=torch.float64) * 2 - 1
    for fill in (0.0, "blur", "road"):
        curves = perturbation_curves(
            LinearScore().eval(), inputs, torch.rand(2, 3, 4, dtype=torch.float64), steps=6, fill=fill
        )
        torch.testing.assert_close(curves.deletion[:, 0], curves.insertion[:, -1])
        torch.testing.assert_close(curves.deletion[:, -1], curves.insertion[:, 0])


def test_feature_ranks_and_curve_area_by_hand():
    ranks = feature_ranks(torch.tensor([[[1.0, 3.0], [3.0, 0.0]]]))
    assert ranks.tolist() == [[2, 0, 1, 3]]
    area = curve_area(torch.tensor([0.0, 0.25, 1.0]), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(area, torch.tensor([0.25 + 0.375], dtype=torch.float64))


def test_summary_reports_random_spread():
    curves = linear_curves(WEIGHTS[None], num_random=3)
    summary = curves.summary()
    assert summary["deletion"] == pytest.approx(float(curves.deletion_area.mean()))
    assert summary["random_deletion_std"] >= 0.0
    assert set(summary) == {
        "deletion",
        "insertion",
        "random_deletion",
        "random_deletion_std",
        "random_insertion",
        "random_insertion_std",
    }


# Fills


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    image = torch.rand(2, 3, 9, 7, dtype=torch.float64)
    for sigma in (0.7, 1.5):
        expected = torch.from_numpy(
            ndimage.gaussian_filter(
                image.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", radius=(0, 0, *[math.ceil(3 * sigma)] * 2)
            )
        )
        torch.testing.assert_close(gaussian_blur(image, sigma), expected)


def test_imputation_reproduces_linear_ramp():
    ramp = (torch.linspace(-0.8, 0.8, 7)[None, :] + torch.linspace(-0.1, 0.1, 6)[:, None])[None, None]
    keep = torch.ones(6, 7, dtype=torch.bool)
    keep[1:5, 2:6] = False
    torch.testing.assert_close(noisy_linear_imputation(ramp, keep), ramp, atol=1e-5, rtol=0)


def test_imputation_matches_dense_solve():
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(1, 1, 5, 6, generator=generator, dtype=torch.float64) * 2 - 1
    keep = torch.rand(5, 6, generator=generator) > 0.6
    # Reference: build the linear system of "each removed pixel equals the weighted mean of its neighbours".
    height, width = keep.shape
    removed = [(i, j) for i in range(height) for j in range(width) if not keep[i, j]]
    position = {pixel: k for k, pixel in enumerate(removed)}
    matrix = torch.zeros(len(removed), len(removed), dtype=torch.float64)
    right = torch.zeros(len(removed), dtype=torch.float64)
    for (i, j), k in position.items():
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                ni, nj = i + di, j + dj
                if (di, dj) == (0, 0) or not (0 <= ni < height and 0 <= nj < width):
                    continue
                weight = 1 / 12 if di and dj else 1 / 6
                matrix[k, k] += weight
                if (ni, nj) in position:
                    matrix[k, position[(ni, nj)]] -= weight
                else:
                    right[k] += weight * image[0, 0, ni, nj]
    solution = torch.linalg.solve(matrix, right)
    expected = image.clone()
    for (i, j), k in position.items():
        expected[0, 0, i, j] = solution[k]
    torch.testing.assert_close(noisy_linear_imputation(image, keep, tolerance=1e-12), expected, atol=1e-9, rtol=0)


def test_imputation_of_everything_is_the_middle_plus_noise():
    image = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    nothing = torch.zeros(4, 4, dtype=torch.bool)
    torch.testing.assert_close(
        noisy_linear_imputation(image, nothing, value_range=(0.0, 1.0)), torch.full_like(image, 0.5), atol=1e-6, rtol=0
    )
    noisy = fill_removed(image, nothing, NoisyImputation(noise=0.05, seed=1), value_range=(0.0, 1.0))
    again = fill_removed(image, nothing, NoisyImputation(noise=0.05, seed=1), value_range=(0.0, 1.0))
    torch.testing.assert_close(noisy, again)
    assert 0.03 < float((noisy - 0.5).std()) < 0.07


def test_fills_keep_kept_features_exactly():
    image = torch.rand(3, 2, 5, 5) * 2 - 1
    keep = torch.rand(3, 5, 5) > 0.5
    for fill in (0.3, "reverse", "blur", Blur(sigma=0.5), "road", torch.zeros(2, 1, 1)):
        filled = fill_removed(image, keep, fill)
        assert torch.equal(filled[keep[:, None].expand_as(image)], image[keep[:, None].expand_as(image)])
    reversed_fill = fill_removed(image, keep, "reverse")
    removed = ~keep[:, None].expand_as(image)
    torch.testing.assert_close(reversed_fill[removed], efmap.reverse(image)[removed])


# Masked accuracy with controls


def test_masked_accuracy_controls_on_pixel_sign():
    inputs = torch.rand(40, 1, 4, 4) * 2 - 1
    labels = (inputs[:, 0, 0, 0] > 0).long()
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    result = efmap.masked_accuracy(PixelSign().eval(), inputs, labels, mask, num_random=16, seed=2)
    share_of_class_zero = float((labels == 0).float().mean())
    assert result.landmarks == 1.0
    # Without pixel (0, 0) every prediction is class 0, whether the landmark is removed or a central box is kept.
    assert result.removed == pytest.approx(share_of_class_zero)
    assert result.box == pytest.approx(share_of_class_zero)
    assert result.random_mean < 1.0
    table = result.table()
    for row in ("landmarks only", "landmarks removed", "centered box", "random masks (n=16)", "constant(0)"):
        assert row in table


@pytest.mark.parametrize("fill", ["reverse", "blur", "road", Blur(1.0), NoisyImputation(noise=0.0)])
def test_masked_accuracy_accepts_every_fill(fill):
    inputs = torch.rand(10, 1, 4, 4) * 2 - 1
    labels = (inputs[:, 0, 0, 0] > 0).long()
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    result = efmap.masked_accuracy(PixelSign().eval(), inputs, labels, mask, fill=fill, num_random=2)
    assert result.landmarks == 1.0
    assert result.fill.split("(")[0] in {"reverse", "blur", "road"}


def test_centered_box_keeps_exact_count_around_center():
    assert centered_box((4, 4), 4).nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    for count in (0, 1, 7, 20, 35):
        box = centered_box((5, 7), count)
        assert int(box.sum()) == count
    full_box = centered_box((5, 7), 15)
    # A 3x5 box has the 5x7 map's proportions and is symmetric about the center.
    assert full_box.nonzero().min(dim=0).values.tolist() == [1, 1]
    assert full_box.nonzero().max(dim=0).values.tolist() == [3, 5]


# Sanity check


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny CNN that learns whether the top-left 2x2 corner is brighter than the bottom-right one."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(128, 1, 6, 6, generator=generator) * 2 - 1
    labels = (inputs[:, 0, :2, :2].mean(dim=(1, 2)) > inputs[:, 0, -2:, -2:].mean(dim=(1, 2))).long()
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model.eval(), inputs[:12]


def efmap_positive(model, inputs):
    return efmap.explain(model, inputs).positive


def test_randomization_drops_rank_correlation(trained_tiny):
    model, inputs = trained_tiny
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    check = randomization_check(model, inputs, efmap_positive, seed=1)
    assert check.layers == ("head", "conv")
    assert check.correlation.shape == (2, 12)
    assert check.absolute_correlation.shape == (2, 12)
    assert float(check.mean[-1]) < 0.5
    assert "randomized up to" in check.table()
    # The user's model and the global random state are untouched.
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_randomization_of_model_own_parameters():
    # Inputs in (0.2, 1) keep class 0 on top, so each map is the weight vector of the model explained.
    inputs = torch.rand(4, 1, 3, 4, dtype=torch.float64) * 0.8 + 0.2
    check = randomization_check(
        LinearScore().eval(), inputs, lambda m, x: efmap.explain(m, x, check_range=False).positive, seed=3
    )
    assert check.layers == ("",)
    assert not check.correlation.isnan().any()
    assert float(check.correlation.max() - check.correlation.min()) < 1e-12
    assert float(check.mean[0]) < 0.9


def test_model_independent_map_keeps_full_correlation(trained_tiny):
    model, inputs = trained_tiny
    check = randomization_check(model, inputs, lambda m, x: x[:, 0].abs(), cascade=False)
    assert check.layers == ("all: head, conv",)
    torch.testing.assert_close(check.mean, torch.ones(1, dtype=torch.float64))


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(5)
    first = torch.randint(0, 4, (6, 3, 5), generator=generator).double()
    second = torch.randn(6, 3, 5, generator=generator, dtype=torch.float64)
    second[:, 0] = 0.0
    ours = spearman(first, second)
    for row in range(6):
        expected = stats.spearmanr(first[row].flatten().numpy(), second[row].flatten().numpy()).statistic
        assert float(ours[row]) == pytest.approx(expected)


def test_spearman_of_absolute_values_ignores_sign():
    maps = torch.randn(3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(spearman(maps, -maps), -torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(spearman(maps, -maps, absolute=True), torch.ones(3, dtype=torch.float64))


def test_spearman_of_constant_map_is_nan():
    result = spearman(torch.zeros(1, 2, 2), torch.rand(1, 2, 2))
    assert torch.isnan(result).all()


# Comparison with Captum


def test_attribution_maps_of_linear_model_by_hand():
    pytest.importorskip("captum")
    inputs = torch.full((1, 1, 3, 4), 0.5, dtype=torch.float64)
    maps = attribution_maps(LinearScore().eval(), inputs, target=0)
    # Zeroing x = 0.5 lowers class 0 by 0.5 w; reversing 0.5 to -0.5 lowers it by w.
    torch.testing.assert_close(maps["occlusion"][0], 0.5 * WEIGHTS)
    torch.testing.assert_close(maps["integrated-gradients"][0], 0.5 * WEIGHTS)
    torch.testing.assert_close(maps["saliency"][0], WEIGHTS)
    torch.testing.assert_close(maps["efmap-target"][0], WEIGHTS)
    torch.testing.assert_close(maps["efmap-max"][0], WEIGHTS)


def test_compare_methods_table_lists_every_method():
    pytest.importorskip("captum")
    inputs = torch.rand(3, 1, 3, 4, dtype=torch.float64)
    result = compare_methods(LinearScore().eval(), inputs, steps=4, num_random=2)
    assert list(result.curves) == ["efmap-max", "efmap-target", "occlusion", "saliency", "integrated-gradients"]
    table = result.table()
    for name in [*result.curves, "random order (n=2)"]:
        assert name in table


def test_missing_captum_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match=r"needs Captum.*pip install efmap\[compare\]"):
        attribution_maps(LinearScore().eval(), torch.ones(1, 1, 3, 4, dtype=torch.float64), methods=["saliency"])
    maps = attribution_maps(LinearScore().eval(), torch.ones(1, 1, 3, 4, dtype=torch.float64), methods=["efmap-max"])
    assert list(maps) == ["efmap-max"]


# Every function rejects shapes and lengths that do not match, naming both


def test_curves_reject_maps_of_wrong_shape():
    with pytest.raises(ValueError, match=r"N = 2 inputs.*\(2, 1, 3, 4\).*`maps` of shape \(2, 4, 3\)"):
        perturbation_curves(LinearScore().eval(), torch.ones(2, 1, 3, 4, dtype=torch.float64), torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match=r"N = 2 inputs.*`maps` of shape \(3, 3, 4\)"):
        perturbation_curves(LinearScore().eval(), torch.ones(2, 1, 3, 4, dtype=torch.float64), torch.rand(3, 3, 4))


def test_curves_reject_target_of_wrong_length():
    with pytest.raises(ValueError, match=r"`target` to have 2 entries, one per input, but got 3"):
        perturbation_curves(
            LinearScore().eval(),
            torch.ones(2, 1, 3, 4, dtype=torch.float64),
            torch.rand(2, 3, 4),
            steps=4,
            target=[0, 0, 0],
        )


def test_curves_reject_bad_options():
    inputs, maps = torch.ones(1, 1, 3, 4, dtype=torch.float64), torch.rand(1, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`steps` between 1 and the number of features \(12\), but got 13"):
        perturbation_curves(LinearScore().eval(), inputs, maps, steps=13)
    with pytest.raises(ValueError, match=r"at least two class scores for softmax=True"):
        perturbation_curves(lambda x: x.flatten(1).sum(dim=1, keepdim=True), inputs, maps, steps=4)
    with pytest.raises(ValueError, match=r"one of 'reverse', 'blur', 'road', but got 'smear'"):
        perturbation_curves(LinearScore().eval(), inputs, maps, steps=4, fill="smear")


def test_masked_accuracy_rejects_mismatches():
    inputs = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match=r"one entry per input \(3\), but got shape \(2,\)"):
        efmap.masked_accuracy(PixelSign().eval(), inputs, [0, 1], torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask shape \(5, 5\).*\(1, 1, 4, 4\)"):
        efmap.masked_accuracy(PixelSign().eval(), inputs, [0, 1, 1], torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"images \(N, C, H, W\) with \(H, W\) masks for fill blur"):
        efmap.masked_accuracy(PixelSign().eval(), inputs, [0, 1, 1], torch.ones(1, 4, 4, dtype=torch.bool), fill="blur")


def test_fill_functions_reject_masks_of_wrong_shape():
    with pytest.raises(ValueError, match=r"mask shape \(2, 4, 5\).*\(4, 4\).*\(2, 1, 4, 4\), or \(2, 4, 4\)"):
        fill_removed(torch.zeros(2, 1, 4, 4), torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`keep`.*\(4, 4\) or \(2, 4, 4\).*\(2, 1, 4, 4\).*shape \(3, 4\)"):
        noisy_linear_imputation(torch.zeros(2, 1, 4, 4), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`noise` of the inputs' shape \(2, 1, 4, 4\), but got \(2, 1, 4, 5\)"):
        noisy_linear_imputation(
            torch.zeros(2, 1, 4, 4), torch.ones(4, 4, dtype=torch.bool), noise=torch.zeros(2, 1, 4, 5)
        )
    with pytest.raises(ValueError, match=r"broadcastable to the inputs \(2, 1, 4, 4\), but got shape \(3,\)"):
        fill_removed(torch.zeros(2, 1, 4, 4), torch.ones(4, 4, dtype=torch.bool), torch.zeros(3))
    with pytest.raises(TypeError, match=r"`fill` to be a number.*but got list"):
        fill_removed(torch.zeros(2, 1, 4, 4), torch.ones(4, 4, dtype=torch.bool), [0.0])
    with pytest.raises(ValueError, match=r"`sigma` to be a positive number of pixels, but got 0"):
        Blur(sigma=0)


def test_sanity_and_ranking_reject_mismatched_maps(trained_tiny):
    model, inputs = trained_tiny
    with pytest.raises(ValueError, match=r"same shape \(N, \*map_shape\), but got \(2, 3\) and \(2, 4\)"):
        spearman(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(
        ValueError, match=r"N = 12 for inputs of shape \(12, 1, 6, 6\), but got maps of shape \(11, 6, 6\)"
    ):
        randomization_check(model, inputs, lambda m, x: x[1:, 0])
    calls = []

    def shrinking(m, x):
        calls.append(1)
        return x[:, 0] if len(calls) == 1 else x[:, 0, :5]

    with pytest.raises(ValueError, match=r"trained model's shape \(12, 6, 6\), but got \(12, 5, 6\)"):
        randomization_check(model, inputs, shrinking)
    with pytest.raises(ValueError, match=r"name submodules of the model, but got 'fc'"):
        randomization_check(model, inputs, efmap_positive, layers=["fc"])


def test_compare_and_area_reject_mismatched_shapes():
    inputs = torch.ones(2, 1, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Maps of method 'mine'.*\(2, 1, 3, 4\).*`maps` of shape \(2, 3, 3\)"):
        compare_methods(LinearScore().eval(), inputs, maps={"mine": torch.rand(2, 3, 3)})
    with pytest.raises(ValueError, match=r"selection of .*'efmap-max'.*but got \['gradcam'\]"):
        attribution_maps(LinearScore().eval(), inputs, methods=["gradcam"])
    with pytest.raises(ValueError, match=r"3 points in the last dimension.*but got shape \(2, 4\)"):
        curve_area(torch.linspace(0, 1, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"`count` between 0 and 16 for shape \(4, 4\), but got 17"):
        centered_box((4, 4), 17)


# The example


@pytest.mark.slow
def test_evaluate_quickstart_runs(tmp_path, capsys):
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    path = Path(__file__).resolve().parents[1] / "examples" / "evaluate_quickstart.py"
    spec = importlib.util.spec_from_file_location("evaluate_quickstart", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    arguments = ["--out", str(tmp_path), "--seeds", "1", "--epochs", "1", "--max-test", "4", "--landmark-images", "2"]
    arguments += ["--num-random", "2", "--random-orders", "1", "--steps", "2", "--sanity-images", "2"]
    result = example.main(arguments)
    printed = capsys.readouterr().out
    for row in ("landmarks kept", "random masks", "centered box", "landmarks removed", "efmap-max", "random order"):
        assert row in printed
    assert len(result["runs"]) == 1
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "results.json").stat().st_size > 0
