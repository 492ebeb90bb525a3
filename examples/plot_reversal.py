"""
A first heat map
================

This example shows what efmap does to an input and what comes out. It plots
the reversal function and a face with every pixel reversed. Then a small
network learns, in a few seconds, to tell the faces that ship with
scikit-image from other patches, and efmap explains its decision on one face
with a positive and a negative map.
"""

# %%
# The reversal
# ------------
# :func:`efmap.reverse` shifts every value by half of the value range,
# wrapping around at the ends. On ``[-1, 1]`` every value moves by exactly 1:
# dark values become bright and bright values dark, but unlike a negative
# image, the middle grey moves too (to black).
import matplotlib.pyplot as plt
import numpy as np
import torch

import efmap
from efmap.reference.lfw import CLASS_NAMES, load_lfw_faces
from efmap.reference.training import fit

torch.manual_seed(0)

x = torch.linspace(-1, 1, 801)
y = efmap.reverse(x).numpy()
wraps = np.r_[False, np.abs(np.diff(y)) > 0.5]  # a gap where the function wraps around

data = load_lfw_faces(seed=0)
face = data.x_test[0]  # (1, 25, 25) in [-1, 1]

fig, axes = plt.subplots(1, 3, figsize=(9, 3), layout="constrained")
axes[0].plot(x, np.ma.masked_where(wraps, y), color="C3", label="reverse(x)")
axes[0].plot(x, x, color="0.6", linestyle="--", label="x")
axes[0].set_aspect("equal")
axes[0].set_xlabel("x")
axes[0].legend(loc="upper left")
axes[0].set_title("reverse on [-1, 1]")
axes[1].imshow(face[0], cmap="gray", vmin=-1, vmax=1)
axes[1].set_title("a test face")
axes[2].imshow(efmap.reverse(face)[0], cmap="gray", vmin=-1, vmax=1)
axes[2].set_title("every pixel reversed")
for ax in axes[1:]:
    ax.set_axis_off()

# %%
# A small classifier
# ------------------
# The LFW subset of scikit-image contains 100 faces and 100 non-face patches of
# 25 by 25 pixels. A network of two convolutions and a linear layer learns to tell them
# apart in a few seconds. :func:`~efmap.reference.training.fit` trains with
# SGD in a seeded order and leaves the model in eval mode.
model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 8, 3, padding=1),
    torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(8, 16, 3, padding=1),
    torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),
    torch.nn.Flatten(),
    torch.nn.Linear(16 * 6 * 6, 2),
)
losses = fit(model, data.x_train, data.y_train, epochs=15)
print(f"final training loss {losses[-1]:.3f}")
print(f"test accuracy {efmap.accuracy(model, data.x_test, data.y_test):.3f}")

# %%
# The map of one face
# -------------------
# :func:`efmap.explain` reverses each of the 625 pixels in turn and reads the
# largest output. ``positive`` is how far it fell (the pixel supported the
# decision), ``negative`` how far it rose (the pixel argued against it).
result = efmap.explain(model, face, batch_size=625)
label = CLASS_NAMES[int(result.target[0])]
print(f"predicted: {label}, score {float(result.clean_score[0]):.3f}")
print(f"largest positive factor {float(result.positive.max()):.4f}, negative {float(result.negative.max()):.4f}")

heatmap = efmap.minmax(result.positive)[0]
# sphinx_gallery_thumbnail_number = 2
fig, axes = plt.subplots(1, 4, figsize=(10, 2.9), layout="constrained")
axes[0].imshow(face[0], cmap="gray", vmin=-1, vmax=1)
axes[0].set_title(f"input ({label})")
image = axes[1].imshow(result.positive[0], cmap="inferno")
fig.colorbar(image, ax=axes[1], shrink=0.8)
axes[1].set_title("positive factor")
image = axes[2].imshow(result.negative[0], cmap="viridis")
fig.colorbar(image, ax=axes[2], shrink=0.8)
axes[2].set_title("negative factor")
axes[3].imshow(face[0], cmap="gray", vmin=-1, vmax=1)
axes[3].imshow(heatmap, cmap="inferno", alpha=0.55)
axes[3].set_title("min-max map over input")
for ax in axes:
    ax.set_axis_off()

# %%
# The two score readings
# ----------------------
# ``score="max"`` compares the new maximum over all classes with the old one;
# ``score="target"`` follows the predicted class. They differ only where
# reversing a feature changes the prediction, and there the "max" reading
# gives the smaller positive factor. Single pixels rarely change the
# prediction of this model, so here every 5 by 5 patch is one feature
# (``patch_size=5``), scored on all 60 test images.
by_max = efmap.explain(model, data.x_test, patch_size=5, batch_size=500)
by_target = efmap.explain(model, data.x_test, score="target", patch_size=5, batch_size=500)
difference = by_target.positive - by_max.positive
changed = difference.flatten(1).ne(0).any(dim=1)
print(f"images with a patch that flips the prediction: {int(changed.sum())} of {changed.numel()}")
print(f"'max' never exceeds 'target': {bool((difference >= 0).all())}")

worst = int(difference.flatten(1).amax(dim=1).argmax())
top = float(by_target.positive[worst].max())
fig, axes = plt.subplots(1, 3, figsize=(8, 2.9), layout="constrained")
axes[0].imshow(data.x_test[worst, 0], cmap="gray", vmin=-1, vmax=1)
axes[0].set_title(f"test image {worst} ({CLASS_NAMES[int(by_max.target[worst])]})")
axes[1].imshow(by_max.positive[worst], cmap="inferno", vmin=0, vmax=top)
axes[1].set_title('score="max"')
image = axes[2].imshow(by_target.positive[worst], cmap="inferno", vmin=0, vmax=top)
axes[2].set_title('score="target"')
fig.colorbar(image, ax=axes[2], shrink=0.8)
for ax in axes:
    ax.set_axis_off()
plt.show()
