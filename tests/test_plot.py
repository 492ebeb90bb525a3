import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from efmap.plot import overlay, plot_grid  # noqa: E402


def test_overlay_draws_two_layers():
    ax = overlay(torch.rand(1, 8, 8) * 2 - 1, torch.rand(8, 8), title="map")
    assert len(ax.get_images()) == 2
    assert ax.get_title() == "map"
    matplotlib.pyplot.close("all")


def test_overlay_rejects_size_mismatch():
    with pytest.raises(ValueError, match=r"heat map shape \(4, 4\) to equal the image size \(8, 8\)"):
        overlay(torch.zeros(8, 8), torch.zeros(4, 4))


def test_grid_layout():
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    figure = plot_grid(
        images,
        torch.rand(3, 8, 8),
        class_maps={0: torch.rand(8, 8), 1: torch.rand(8, 8)},
        overall=torch.rand(8, 8),
        landmarks=torch.rand(8, 8) > 0.5,
        class_names=["a", "b"],
    )
    titles = [ax.get_title() for ax in figure.axes if ax.get_images()]
    assert titles == ["overall", "landmarks", "class a", "class b", "image 0", "image 1", "image 2"]
    matplotlib.pyplot.close(figure)
