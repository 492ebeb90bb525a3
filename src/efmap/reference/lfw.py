"""Real faces that ship offline: the LFW subset bundled with scikit-image.

``skimage.data.lfw_subset()`` contains 200 grayscale 25x25 images with values in
``[0, 1]``: rows 0-99 are faces from Labeled Faces in the Wild and rows
100-199 are non-face patches. Here they become a two-class task
(0 = face, 1 = non-face) with inputs mapped to ``[-1, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CLASS_NAMES", "FaceSplit", "load_lfw_faces"]

#: Class names, indexed by label.
CLASS_NAMES = ("face", "non-face")


@dataclass(frozen=True)
class FaceSplit:
    """A seeded train/test split of the LFW subset.

    Attributes
    ----------
    x_train
        Training images ``(N, 1, 25, 25)``, float32, in ``[-1, 1]``.
    y_train
        Training labels ``(N,)``, int64: 0 = face, 1 = non-face.
    x_test
        Test images ``(M, 1, 25, 25)``, float32, in ``[-1, 1]``.
    y_test
        Test labels ``(M,)``, int64.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_lfw_faces(*, test_fraction: float = 0.3, seed: int = 0) -> FaceSplit:
    """Load the 200 LFW-subset images shipped with scikit-image and split them, stratified by class.

    Parameters
    ----------
    test_fraction
        Fraction of each class held out for testing. Default 0.3 (30 faces and 30 non-faces).
    seed
        Seed of the permutation that chooses the split.

    Returns
    -------
    FaceSplit
        Training and test images in ``[-1, 1]`` with their labels.

    Raises
    ------
    ImportError
        If scikit-image is not installed (``pip install efmap[examples]``).
    ValueError
        If ``test_fraction`` leaves no training or no test image in a class.

    Examples
    --------
    >>> from efmap.reference.lfw import load_lfw_faces
    >>> data = load_lfw_faces(seed=0)
    >>> tuple(data.x_train.shape), tuple(data.x_test.shape), data.y_test.bincount().tolist()
    ((140, 1, 25, 25), (60, 1, 25, 25), [30, 30])
    """
    try:
        from skimage.data import lfw_subset
    except ImportError as error:
        raise ImportError(
            "The LFW subset ships with scikit-image; install it with `pip install efmap[examples]`."
        ) from error

    images = torch.from_numpy(lfw_subset()).to(torch.float32)  # type: ignore[no-untyped-call]
    labels = torch.cat([torch.zeros(100, dtype=torch.int64), torch.ones(100, dtype=torch.int64)])
    inputs = (images * 2 - 1).unsqueeze(1)

    per_class_test = round(test_fraction * 100)
    if not 0 < per_class_test < 100:
        raise ValueError(f"Expected `test_fraction` to leave images on both sides, but got {test_fraction}.")
    generator = torch.Generator().manual_seed(seed)
    train_rows, test_rows = [], []
    for label in (0, 1):
        rows = torch.nonzero(labels == label).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        test_rows.append(rows[:per_class_test])
        train_rows.append(rows[per_class_test:])
    train = torch.cat(train_rows)
    test = torch.cat(test_rows)
    return FaceSplit(x_train=inputs[train], y_train=labels[train], x_test=inputs[test], y_test=labels[test])
