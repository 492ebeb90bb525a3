import warnings

import pytest
import torch

import efmap
from efmap import EfmapWarning


class Linear(torch.nn.Module):
    """Class scores W @ x + b, whose flip effects are known in closed form."""

    def __init__(self, shape, classes=3):
        super().__init__()
        size = 1
        for s in shape:
            size *= s
        self.weight = torch.nn.Parameter(torch.randn(classes, size, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(classes, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


class Counting(torch.nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.model(x)


def closed_form(model, x, groups, score, target=None):
    """Expected positive and negative scores per group for a Linear model."""
    flat = x.flatten(1)
    delta = efmap.reverse(x).flatten(1) - flat  # (N, D)
    clean = model(x).detach()
    pos, neg = [], []
    for n in range(x.shape[0]):
        old = clean[n].max() if score == "max" else clean[n, target[n]]
        p_row, n_row = [], []
        for group in groups:
            change = (model.weight[:, group] * delta[n, group]).sum(dim=1).detach()
            new_out = clean[n] + change
            new = new_out.max() if score == "max" else new_out[target[n]]
            p_row.append(torch.relu(old - new))
            n_row.append(torch.relu(new - old))
        pos.append(torch.stack(p_row))
        neg.append(torch.stack(n_row))
    return torch.stack(pos), torch.stack(neg)


def pixel_groups(channels, height, width):
    return [[c * height * width + h * width + w for c in range(channels)] for h in range(height) for w in range(width)]


@pytest.mark.parametrize("score", ["max", "target"])
def test_linear_pixels_closed_form(images, score):
    model = Linear((3, 6, 5)).eval()
    target = [0, 1, 2, 1] if score == "target" else None
    result = efmap.explain(model, images, score=score, target=target)
    expected_target = target if target is not None else model(images).argmax(1).tolist()
    pos, neg = closed_form(model, images, pixel_groups(3, 6, 5), score, expected_target)
    torch.testing.assert_close(result.positive, pos.reshape(4, 6, 5), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.negative, neg.reshape(4, 6, 5), rtol=1e-10, atol=1e-10)
    assert result.target.tolist() == expected_target


@pytest.mark.parametrize("score", ["max", "target"])
def test_linear_patches_closed_form(images, score):
    model = Linear((3, 6, 5)).eval()
    result = efmap.explain(model, images, score=score, patch_size=4)
    target = model(images).argmax(1).tolist()
    groups = []
    for top in (0, 4):
        for left in (0, 4):
            groups.append(
                [
                    c * 30 + h * 5 + w
                    for c in range(3)
                    for h in range(top, min(top + 4, 6))
                    for w in range(left, min(left + 4, 5))
                ]
            )
    pos, neg = closed_form(model, images, groups, score, target)
    patch_of_pixel = torch.tensor([[(h // 4) * 2 + w // 4 for w in range(5)] for h in range(6)])
    torch.testing.assert_close(result.positive, pos[:, patch_of_pixel], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.negative, neg[:, patch_of_pixel], rtol=1e-10, atol=1e-10)


def test_linear_tabular_feature_mask():
    model = Linear((7,)).eval()
    x = torch.rand(5, 7, dtype=torch.float64) * 2 - 1
    mask = torch.tensor([3, 3, 0, 1, 1, 1, 9])
    result = efmap.explain(model, x, score="target", feature_mask=mask)
    target = model(x).argmax(1).tolist()
    groups = [[2], [3, 4, 5], [0, 1], [6]]  # ids 0, 1, 3, 9 in sorted order
    pos, _ = closed_form(model, x, groups, "target", target)
    expected = pos[:, [2, 2, 0, 1, 1, 1, 3]]
    assert result.positive.shape == (5, 7)
    torch.testing.assert_close(result.positive, expected, rtol=1e-10, atol=1e-10)


def test_sequence_feature_mask_per_time_step():
    model = Linear((2, 6)).eval()
    x = torch.rand(3, 2, 6, dtype=torch.float64) * 2 - 1
    result = efmap.explain(model, x, feature_mask=torch.arange(6))
    target = model(x).argmax(1).tolist()
    pos, _ = closed_form(model, x, [[t, 6 + t] for t in range(6)], "max", target)
    torch.testing.assert_close(result.positive, pos, rtol=1e-10, atol=1e-10)


def test_per_input_feature_mask(images):
    model = Linear((3, 6, 5)).eval()
    masks = torch.stack([torch.arange(30).reshape(1, 6, 5), torch.arange(30).flip(0).reshape(1, 6, 5)])
    masks = torch.cat([masks, masks])
    result = efmap.explain(model, images, feature_mask=masks)
    plain = efmap.explain(model, images)
    assert result.positive.shape == (4, 1, 6, 5)
    torch.testing.assert_close(result.positive[:, 0], plain.positive, rtol=1e-12, atol=1e-12)


captum = pytest.importorskip("captum.attr")


def pixel_mask(height, width):
    return torch.arange(height * width).reshape(1, 1, height, width)


@pytest.mark.parametrize("per_eval", [1, 5])
def test_captum_feature_ablation_oracle(small_cnn, images, per_eval):
    target = [0, 3, 1, 2]
    ours = efmap.explain(small_cnn, images, score="target", target=target, batch_size=9)
    ablation = captum.FeatureAblation(small_cnn)
    theirs = ablation.attribute(
        images,
        baselines=efmap.reverse(images),
        target=torch.tensor(target),
        feature_mask=pixel_mask(6, 5),
        perturbations_per_eval=per_eval,
    )
    torch.testing.assert_close(ours.positive, torch.relu(theirs[:, 0]), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.negative, torch.relu(-theirs[:, 0]), rtol=1e-9, atol=1e-10)


def test_captum_occlusion_oracle(small_cnn, images):
    ours = efmap.explain(small_cnn, images, score="target")
    occlusion = captum.Occlusion(small_cnn)
    theirs = occlusion.attribute(
        images, sliding_window_shapes=(3, 1, 1), baselines=efmap.reverse(images), target=ours.target
    )
    # Captum 0.9 returns Occlusion attributions in float32 for float64 inputs.
    theirs = theirs.double()
    torch.testing.assert_close(ours.positive, torch.relu(theirs[:, 0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs[:, 0], theirs[:, 2])


@pytest.mark.parametrize("score", ["max", "target"])
def test_batch_size_does_not_change_maps(small_cnn, images, score):
    results = [efmap.explain(small_cnn, images, score=score, batch_size=size) for size in (1, 7, 64)]
    for other in results[1:]:
        torch.testing.assert_close(other.positive, results[0].positive, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other.negative, results[0].negative, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other.output_change, results[0].output_change, rtol=1e-12, atol=1e-12)


def test_copies_built_per_chunk(small_cnn, images):
    counting = Counting(small_cnn).eval()
    efmap.explain(counting, images, batch_size=7)
    assert max(counting.batches) <= 7
    perturbed = sum(counting.batches) - images.shape[0] - min(7, images.shape[0])
    assert perturbed == 4 * 30


def test_class_maps_equal_target_runs(small_cnn, images):
    result = efmap.explain(small_cnn, images)
    for k in range(4):
        positive, negative = result.class_maps(k)
        direct = efmap.explain(small_cnn, images, score="target", target=k)
        torch.testing.assert_close(positive, direct.positive, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(negative, direct.negative, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"class_index.*\[0, 3\]"):
        result.class_maps(4)


def test_max_and_target_agree_when_prediction_stays(small_cnn, images):
    result_max = efmap.explain(small_cnn, images, score="max")
    result_target = efmap.explain(small_cnn, images, score="target")
    # Where the predicted class stays the maximum, the two readings give the same positive factor.
    change = result_max.output_change + result_max.clean_output[:, :, None, None]
    stays = change.argmax(dim=1) == result_max.target[:, None, None]
    torch.testing.assert_close(result_max.positive[stays], result_target.positive[stays])
    assert bool((result_max.positive <= result_target.positive + 1e-12).all())


def test_factors_non_negative_and_exclusive(small_cnn, images):
    result = efmap.explain(small_cnn, images)
    assert bool((result.positive >= 0).all())
    assert bool((result.negative >= 0).all())
    assert bool(((result.positive == 0) | (result.negative == 0)).all())


def test_shapes_accepted(small_cnn, images):
    batch = efmap.explain(small_cnn, images[:1])
    single = efmap.explain(small_cnn, images[0])
    assert single.positive.shape == (1, 6, 5)
    torch.testing.assert_close(single.positive, batch.positive)

    gray = Linear((1, 6, 5)).eval()
    two_d = efmap.explain(gray, images[0, 0])
    four_d = efmap.explain(gray, images[:1, :1])
    assert two_d.positive.shape == (1, 6, 5)
    torch.testing.assert_close(two_d.positive, four_d.positive)


def test_channels_last_memory_format_same_map(small_cnn, images):
    plain = efmap.explain(small_cnn, images)
    converted = efmap.explain(small_cnn, images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(converted.positive, plain.positive, rtol=1e-12, atol=1e-12)


def test_channels_last_array_rejected(small_cnn, images):
    with pytest.raises(ValueError, match=r"permute\(0, 3, 1, 2\)"):
        efmap.explain(small_cnn, images.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"permute\(2, 0, 1\)"):
        efmap.explain(small_cnn, images[0].permute(1, 2, 0))


@pytest.mark.parametrize("keep_dim", [False, True])
def test_binary_outputs(keep_dim):
    linear = torch.nn.Linear(6, 1).double()
    x = torch.rand(3, 1, 2, 3, dtype=torch.float64) * 2 - 1

    def model(batch):
        out = linear(batch.flatten(1))
        return out if keep_dim else out[:, 0]

    result = efmap.explain(model, x)
    delta = (efmap.reverse(x) - x).flatten(1) * linear.weight.detach()[0]
    assert result.target.tolist() == [0, 0, 0]
    torch.testing.assert_close(result.positive.flatten(1), torch.relu(-delta), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.negative.flatten(1), torch.relu(delta), rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_and_plain_function(small_cnn, images):
    reference = efmap.explain(small_cnn, images)
    scripted = torch.jit.script(small_cnn)
    torch.testing.assert_close(efmap.explain(scripted, images).positive, reference.positive)

    def function(batch):
        with torch.no_grad():
            return small_cnn(batch)

    torch.testing.assert_close(efmap.explain(function, images).positive, reference.positive)


def test_output_fn_picks_scores(small_cnn, images):
    def as_dict(batch):
        return {"logits": small_cnn(batch), "features": batch}

    reference = efmap.explain(small_cnn, images)
    picked = efmap.explain(as_dict, images, output_fn=lambda out: out["logits"])
    torch.testing.assert_close(picked.positive, reference.positive)


def test_model_dtype_is_used(images):
    model = Linear((3, 6, 5)).float().eval()
    result = efmap.explain(model, images)
    assert result.positive.dtype == torch.float32


def test_progress_callback(small_cnn, images):
    calls = []
    efmap.explain(small_cnn, images, batch_size=16, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (120, 120)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_progress_bar(small_cnn, images, capsys):
    efmap.explain(small_cnn, images, progress=True)
    assert "120/120" in capsys.readouterr().err


def test_training_mode_restored_with_warning(small_cnn, images):
    small_cnn.train()
    small_cnn.bn.eval()
    running_mean = small_cnn.bn.running_mean.clone()
    tracked = int(small_cnn.bn.num_batches_tracked)
    reference = efmap.explain(small_cnn.eval(), images)
    small_cnn.train()
    small_cnn.bn.eval()
    with pytest.warns(EfmapWarning, match="training mode"):
        result = efmap.explain(small_cnn, images)
    torch.testing.assert_close(result.positive, reference.positive)
    assert small_cnn.training
    assert small_cnn.conv.training
    assert not small_cnn.bn.training
    assert small_cnn.drop.training
    torch.testing.assert_close(small_cnn.bn.running_mean, running_mean)
    assert int(small_cnn.bn.num_batches_tracked) == tracked


def test_training_mode_restored_after_error(small_cnn, images):
    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = small_cnn
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 3:
                raise RuntimeError("forced failure")
            return self.inner(x)

    model = Failing().train()
    with pytest.warns(EfmapWarning, match="training mode"), pytest.raises(RuntimeError, match="forced failure"):
        efmap.explain(model, images, batch_size=8)
    assert all(module.training for module in model.modules())


def test_gradients_untouched(small_cnn, images):
    efmap.explain(small_cnn, images)
    assert all(p.requires_grad for p in small_cnn.parameters())
    assert all(p.grad is None for p in small_cnn.parameters())


def test_nondeterministic_model_warns(images):
    class Noisy(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(x.flatten(1)[:, :3], p=0.5, training=True)

    with pytest.warns(EfmapWarning, match=r"differ by up to \d"):
        efmap.explain(Noisy().eval(), images)


# Bad input: each error is raised before any forward pass.


def forward_free(model, images, match, error=ValueError, **kwargs):
    counting = Counting(model).eval()
    with pytest.raises(error, match=match):
        efmap.explain(counting, images, **kwargs)
    return counting.batches


@pytest.mark.parametrize(
    ("scale", "match"),
    [(lambda x: (x + 1) * 127.5, r"values from 0 to 255"), (lambda x: (x + 1) / 2, r"upper half .*x \* 2 - 1")],
)
def test_wrong_value_range_rejected(small_cnn, images, scale, match):
    x = scale(images)
    x[0, 0, 0, 0] = 0.0
    x[0, 0, 0, 1] = 255.0 if "255" in match else 1.0
    assert forward_free(small_cnn, x, match) == []


def test_unit_range_accepted_when_declared(small_cnn, images):
    result = efmap.explain(small_cnn, (images + 1) / 2, value_range=(0.0, 1.0))
    assert result.positive.shape == (4, 6, 5)


def test_range_check_can_be_disabled(small_cnn, images):
    result = efmap.explain(small_cnn, images.abs(), check_range=False)
    assert result.positive.shape == (4, 6, 5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_inputs_rejected(small_cnn, dtype):
    x = torch.zeros(1, 3, 6, 5, dtype=dtype)
    assert forward_free(small_cnn, x, "floating dtype", error=TypeError) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_rejected(small_cnn, images, value):
    images[1, 2, 3, 4] = value
    assert forward_free(small_cnn, images, r"1 NaN or infinite value") == []


@pytest.mark.parametrize("shape", [(6,), (2, 1, 3, 6, 5)])
def test_unsupported_image_shape_rejected(small_cnn, shape):
    assert forward_free(small_cnn, torch.zeros(shape, dtype=torch.float64) - 0.5, r"\(N, C, H, W\)") == []


def test_wrong_output_batch_rejected(images):
    with pytest.raises(ValueError, match=r"one row per input \(4\)"):
        efmap.explain(lambda x: torch.zeros(1, 3, dtype=x.dtype), images)


def test_non_class_output_rejected(images):
    with pytest.raises(ValueError, match=r"\(N, K\) or \(N,\), but got shape \(4, 3, 6, 5\)"):
        efmap.explain(lambda x: x, images)


@pytest.mark.parametrize(
    ("output", "match"),
    [
        ((torch.zeros(4, 2), torch.zeros(4)), r"tuple of 2 items.*output_fn"),
        ({"logits": torch.zeros(4, 2)}, r"keys 'logits'"),
    ],
)
def test_structured_output_needs_output_fn(images, output, match):
    with pytest.raises(TypeError, match=match):
        efmap.explain(lambda x: output, images)


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (4, ValueError, r"\[0, 3\] .* but got 4"),
        (-1, ValueError, r"but got -1"),
        ([0, 1], ValueError, r"4 entries, one per input, but got 2"),
        (torch.zeros(4, 2, dtype=torch.int64), ValueError, r"shape \(4,\), but got shape \(4, 2\)"),
        (torch.zeros(4), TypeError, r"integer class indices"),
        (1.5, TypeError, r"class indices"),
    ],
)
def test_bad_target_rejected(small_cnn, images, target, error, match):
    counting = Counting(small_cnn).eval()
    with pytest.raises(error, match=match):
        efmap.explain(counting, images, score="target", target=target)
    # Only the clean forward passes that define the number of classes may have run.
    assert sum(counting.batches) <= 2 * images.shape[0]


def test_target_with_max_score_rejected(small_cnn, images):
    assert forward_free(small_cnn, images, r"only read with score='target'", target=1) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score": "mean"}, r"'max' or 'target'"),
        ({"batch_size": 0}, r"positive integer or .auto., but got 0"),
        ({"patch_size": 0}, r"patch_size.*but got 0"),
        ({"patch_size": 2, "feature_mask": torch.zeros(6, 5, dtype=torch.int64)}, r"either"),
        ({"feature_mask": torch.zeros(4, 5, dtype=torch.int64)}, r"broadcast to the per-sample input shape"),
    ],
)
def test_bad_options_rejected(small_cnn, images, kwargs, match):
    assert forward_free(small_cnn, images, match, **kwargs) == []


def test_float_feature_mask_rejected(small_cnn, images):
    assert forward_free(small_cnn, images, r"integer dtype", error=TypeError, feature_mask=torch.zeros(6, 5)) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inputs_follow_model_device(small_cnn, images):
    model = small_cnn.cuda()
    result = efmap.explain(model, images)
    assert result.positive.device.type == "cuda"
    reference = efmap.explain(small_cnn.cpu(), images)
    torch.testing.assert_close(result.positive.cpu(), reference.positive, rtol=1e-6, atol=1e-8)


def test_no_warning_for_clean_run(small_cnn, images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        efmap.explain(small_cnn, images)


def test_exported_program_module(small_cnn, images):
    exported = torch.export.export(small_cnn, (images,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    module = exported.module()
    assert module.training  # reported by torch.export, although the graph was traced in eval mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = efmap.explain(module, images, batch_size=8)
    torch.testing.assert_close(result.positive, efmap.explain(small_cnn, images).positive)
    assert module.training


def test_tabular_batch_without_mask_names_fix():
    model = torch.nn.Linear(6, 2).double().eval()
    with pytest.raises(ValueError, match=r"\(1, 1, 10, 2\)") as caught:
        efmap.explain(model, torch.rand(10, 6, dtype=torch.float64) * 2 - 1)
    if hasattr(caught.value, "__notes__"):
        assert "feature_mask=torch.arange(6)" in caught.value.__notes__[0]


def test_numpy_target_and_mask_accepted(small_cnn, images):
    np = pytest.importorskip("numpy")
    reference = efmap.explain(small_cnn, images, score="target", target=1)
    result = efmap.explain(small_cnn, images, score="target", target=np.int64(1))
    torch.testing.assert_close(result.positive, reference.positive)
    masked = efmap.explain(small_cnn, images, feature_mask=np.arange(30).reshape(6, 5))
    torch.testing.assert_close(masked.positive, efmap.explain(small_cnn, images).positive)


def test_inputs_requiring_grad_accepted(small_cnn, images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = efmap.explain(small_cnn, images.clone().requires_grad_())
    torch.testing.assert_close(result.positive, efmap.explain(small_cnn, images).positive)


def test_empty_batch_rejected(small_cnn):
    assert forward_free(small_cnn, torch.zeros(0, 3, 6, 5, dtype=torch.float64), r"at least one non-empty input") == []
