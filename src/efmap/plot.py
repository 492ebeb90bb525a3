"""Figures of heat maps over their images (needs matplotlib: ``pip install efmap[plot]``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from efmap._typing import ValueRange

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["overlay", "plot_grid"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("efmap.plot needs matplotlib; install it with `pip install efmap[plot]`.") from error
    return plt


def _image_array(image: torch.Tensor, value_range: ValueRange) -> Any:
    """Convert ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` to an array in [0, 1] for imshow."""
    image = image.detach().to("cpu", torch.float64)
    if image.dim() == 3:
        image = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
    if image.dim() not in (2, 3):
        raise ValueError(f"Expected an image of shape (H, W), (1, H, W) or (3, H, W), but got {tuple(image.shape)}.")
    lo, hi = value_range
    return ((image - lo) / (hi - lo)).clamp(0, 1).numpy()


def overlay(
    image: torch.Tensor,
    heatmap: torch.Tensor,
    *,
    ax: Axes | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    value_range: ValueRange = (-1.0, 1.0),
    title: str | None = None,
) -> Axes:
    """Draw ``heatmap`` ``(H, W)`` over ``image`` (grayscale, ``(1, H, W)`` or ``(3, H, W)``).

    Parameters
    ----------
    image
        The explained image, values in ``value_range``.
    heatmap
        Map of the same height and width, drawn with ``cmap`` at opacity ``alpha``.
    ax
        Axes to draw into. Default: a new figure.
    alpha
        Opacity of the heat map, in ``[0, 1]``. Default 0.5.
    cmap
        Matplotlib colour map name. Default ``"jet"``.
    value_range
        Range of the image values. Default ``(-1.0, 1.0)``.
    title
        Axes title.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn into.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> import torch
    >>> from efmap.plot import overlay
    >>> ax = overlay(torch.zeros(1, 4, 4), torch.rand(4, 4), title="image 0")
    >>> len(ax.images), ax.get_title()
    (2, 'image 0')
    >>> plt.close(ax.figure)
    """
    plt = _pyplot()
    pixels = _image_array(image, value_range)
    if tuple(heatmap.shape) != tuple(pixels.shape[:2]):
        raise ValueError(
            f"Expected the heat map shape {tuple(heatmap.shape)} to equal the image size {tuple(pixels.shape[:2])}."
        )
    if ax is None:
        _, ax = plt.subplots()
    ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=1)
    ax.imshow(heatmap.detach().to("cpu", torch.float64).numpy(), cmap=cmap, alpha=alpha)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    class_maps: Mapping[int, torch.Tensor] | None = None,
    overall: torch.Tensor | None = None,
    landmarks: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    value_range: ValueRange = (-1.0, 1.0),
    background: torch.Tensor | None = None,
) -> Figure:
    """Lay out maps as in Hong and Yoo (2021): the overall map on top, class maps in the middle, per-image maps below.

    Parameters
    ----------
    images
        Explained images ``(N, C, H, W)``, values in ``value_range``.
    maps
        Their maps ``(N, H, W)``.
    class_maps
        Merged map per class label, each ``(H, W)``.
    overall
        Merged map over all classes ``(H, W)``.
    landmarks
        Boolean landmark mask ``(H, W)``, drawn beside the overall map.
    class_names
        Names indexed by class label. Default: the labels.
    value_range
        Range of the image values.
    background
        Image drawn under the merged maps, ``(C, H, W)``. Default: the mean of ``images``.

    Returns
    -------
    matplotlib.figure.Figure
        The figure.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> import torch
    >>> from efmap.plot import plot_grid
    >>> images, maps = torch.zeros(2, 1, 4, 4), torch.rand(2, 4, 4)
    >>> fig = plot_grid(images, maps, overall=maps.mean(dim=0), class_maps={0: maps[0]}, class_names=["minor"])
    >>> [ax.get_title() for ax in fig.axes if ax.images]
    ['overall', 'class minor', 'image 0', 'image 1']
    >>> plt.close(fig)
    """
    plt = _pyplot()
    if images.shape[0] != maps.shape[0]:
        raise ValueError(f"Expected one map per image, but got {maps.shape[0]} maps for {images.shape[0]} images.")
    class_maps = dict(class_maps or {})
    top_count = (overall is not None) + (landmarks is not None)
    rows = [top_count, len(class_maps), images.shape[0]]
    columns = min(max(max(rows), 1), 8)
    row_count = sum(-(-r // columns) for r in rows if r)
    fig, axes = plt.subplots(row_count, columns, figsize=(1.6 * columns, 1.7 * row_count), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    base = images.mean(dim=0) if background is None else background

    def name(label: int) -> str:
        return class_names[label] if class_names is not None else str(label)

    top_cells = []
    if overall is not None:
        top_cells.append((base, overall, "overall"))
    if landmarks is not None:
        top_cells.append((base, landmarks.to(torch.float64), "landmarks"))
    class_cells = [(base, m, f"class {name(k)}") for k, m in class_maps.items()]
    image_cells = [(images[i], maps[i], f"image {i}") for i in range(images.shape[0])]
    cells = [group for group in (top_cells, class_cells, image_cells) if group]

    row = 0
    for group in cells:
        for start in range(0, len(group), columns):
            for column, (image, heatmap, title) in enumerate(group[start : start + columns]):
                overlay(image, heatmap, ax=axes[row, column], value_range=value_range, title=title)
            row += 1
    fig.tight_layout()
    figure: Figure = fig
    return figure
