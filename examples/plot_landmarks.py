"""
Landmarks from merged maps
==========================

One map explains one input. This example merges the maps of all training
images into one map per class and one overall map, keeps the pixels with the
largest merged values as landmarks, and measures how much test accuracy
survives when everything else is removed. Random masks of the same size are
the control: landmarks are only informative if they beat them.
"""

# %%
# Train a small classifier
# ------------------------
# The same data and network as in :doc:`plot_reversal`: 140 training and 60
# test images of 25 by 25 pixels, faces (class 0) and non-faces (class 1).
import matplotlib.pyplot as plt
import torch

import efmap
from efmap.reference.lfw import CLASS_NAMES, load_lfw_faces
from efmap.reference.training import fit

torch.manual_seed(0)
data = load_lfw_faces(seed=0)
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

# %%
# Merge the maps of the training images
# -------------------------------------
# The maps stream into a :class:`~efmap.merge.HeatMapAccumulator` in chunks,
# as they would for a data set that does not fit in memory. Each map is
# min-max normalised before it is added, so every image weighs the same, and
# the overall map averages the two class maps, so every class weighs the same.
accumulator = efmap.HeatMapAccumulator()
for start in range(0, data.x_train.shape[0], 35):
    images = data.x_train[start : start + 35]
    labels = data.y_train[start : start + 35]
    result = efmap.explain(model, images, batch_size=1250)
    accumulator.update(result.positive, labels)
print(f"maps merged per class: {accumulator.counts}")

class_maps = accumulator.class_maps()
overall = accumulator.overall()

# %%
# Select landmarks
# ----------------
# :func:`~efmap.landmarks.select_landmarks` keeps the pixels with the largest
# merged values. Here it keeps 10% of them: ``round(0.1 * 625)``, which is
# 63 pixels, since halves round up.
landmarks = efmap.select_landmarks(overall, keep_fraction=0.1)
print(f"landmarks: {landmarks.count} of {landmarks.mask.numel()} pixels ({landmarks.fraction:.1%})")

face = data.x_test[0]
fig, axes = plt.subplots(1, 5, figsize=(12, 2.8), layout="constrained")
for ax, label in zip(axes[:2], sorted(class_maps), strict=True):
    ax.imshow(class_maps[label], cmap="inferno")
    ax.set_title(f"class map: {CLASS_NAMES[label]}")
axes[2].imshow(overall, cmap="inferno")
axes[2].set_title("overall map")
axes[3].imshow(landmarks.mask, cmap="gray")
axes[3].set_title(f"landmarks ({landmarks.fraction:.0%})")
axes[4].imshow(landmarks.apply(face)[0], cmap="gray", vmin=-1, vmax=1)
axes[4].set_title("a test face, landmarks only")
for ax in axes:
    ax.set_axis_off()

# %%
# Accuracy with the landmarks only
# --------------------------------
# :func:`efmap.masked_accuracy` fills every pixel outside the mask
# with 0, the middle of ``[-1, 1]``, and compares the test accuracy with that
# of 10 random masks that keep as many pixels.
report = efmap.masked_accuracy(model, data.x_test, data.y_test, landmarks, num_random=10)
print(report.table())

# %%
# The same comparison over a range of kept fractions shows where the
# landmarks matter. Hong and Yoo (2021) kept 65.98% of the pixels of their
# faces (10,810 of 16,384). In this run, random masks of that size keep about
# as much accuracy as the landmarks of this small model. The landmarks stand
# out when far fewer pixels are kept.
fractions = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.6598]
landmark_accuracy, random_mean, random_std = [], [], []
for fraction in fractions:
    marks = efmap.select_landmarks(overall, keep_fraction=fraction)
    curve = efmap.masked_accuracy(model, data.x_test, data.y_test, marks, num_random=10)
    landmark_accuracy.append(curve.landmarks)
    random_mean.append(curve.random_mean)
    random_std.append(curve.random_std)

fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
ax.axhline(report.full, color="0.6", linestyle="--", label="full input")
ax.plot(fractions, landmark_accuracy, marker="o", color="C3", label="landmarks")
ax.errorbar(fractions, random_mean, yerr=random_std, marker="s", color="C0", capsize=3, label="random masks")
ax.axvline(0.6598, color="0.3", linestyle=":", label="fraction kept by Hong and Yoo")
ax.set_xlabel("fraction of pixels kept")
ax.set_ylabel("test accuracy")
ax.set_ylim(0.4, 1.0)
ax.legend(loc="lower right", fontsize="small")
plt.show()
