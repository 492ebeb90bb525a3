"""The efmap command line, end to end on models and images that the tests create."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import efmap
from efmap.cli import build_parser, main

SOURCE_ROOT = Path(efmap.__file__).resolve().parents[1]


class TinyConv(torch.nn.Module):
    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def make_net(channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyConv(channels).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    net = make_net()
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript, but users still have TorchScript files to explain.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(root / "net.pt"))
        torch.jit.script(make_net(3)).save(str(root / "net_rgb.pt"))
    torch.save(net, root / "pickled.pt")
    torch.save(net.state_dict(), root / "weights.pt")
    (root / "plain.pkl").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 1, 8, 8), dtype=np.uint8)
    np.save(root / "images.npy", pixels)
    np.save(root / "first_half.npy", pixels[:3])
    np.save(root / "second_half.npy", pixels[3:])
    return {"root": root, "net": root / "net.pt", "images": root / "images.npy"}


def run(*argv: object) -> int:
    return main([str(arg) for arg in argv])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_explain_npy_writes_maps_overlays_and_summary(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("explain", files["net"], files["images"], "--out", out, "--batch-size", 16, "--overlays", 2) == 0
    assert "Explained 6 image(s), 384 forward passes" in capsys.readouterr().out

    with np.load(out / "maps.npz") as saved:
        assert saved["positive"].shape == (6, 8, 8)
        assert saved["overall"].shape == (8, 8)
        assert list(saved["names"]) == [str(i) for i in range(6)]
        positive, targets = saved["positive"], saved["targets"]
    images = torch.from_numpy(np.load(files["images"]).astype(np.float32) * np.float32(2 / 255) - 1)
    direct = efmap.explain(make_net(), images)
    torch.testing.assert_close(torch.from_numpy(positive), direct.positive, rtol=0, atol=1e-5)
    assert np.array_equal(targets, direct.target.numpy())

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 6
    assert summary["forward_passes"] == 6 * 64
    assert [row["target"] for row in summary["per_image"]] == direct.target.tolist()
    assert sorted(path.name for path in (out / "overlays").iterdir() if not path.name.startswith("class_")) == [
        "00000.png",
        "00001.png",
        "overall.png",
    ]
    state = torch.load(out / "accumulator.pt", weights_only=True)
    assert int(state["counts"].sum()) == 6


def test_explain_overlay_is_a_png(files, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    assert run("explain", files["net"], files["images"], "--out", out, "--overlays", 1) == 0
    with Image.open(out / "overlays" / "00000.png") as picture:
        assert picture.format == "PNG"
        assert picture.size == (128, 128)


def test_explain_folder_and_single_image(files, tmp_path):
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    pixels = np.load(files["images"])
    for index in range(3):
        Image.fromarray(pixels[index, 0]).save(folder / f"face{index}.png")
    (folder / "notes.txt").write_text("not an image")

    assert run("explain", files["net"], folder, "--out", tmp_path / "folder", "--mode", "L") == 0
    with np.load(tmp_path / "folder" / "maps.npz") as saved:
        assert list(saved["names"]) == ["face0.png", "face1.png", "face2.png"]
        folder_maps = saved["positive"]

    assert run("explain", files["net"], folder / "face1.png", "--out", tmp_path / "one", "--mode", "L") == 0
    with np.load(tmp_path / "one" / "maps.npz") as saved:
        np.testing.assert_allclose(saved["positive"][0], folder_maps[1], rtol=0, atol=1e-5)


def test_explain_rgb_resize(files, tmp_path):
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(folder / "a.png")
    Image.new("RGB", (12, 10), (250, 20, 90)).save(folder / "b.jpg")
    out = tmp_path / "out"
    assert run("explain", files["root"] / "net_rgb.pt", folder, "--out", out, "--resize", 8, 8, "--patch-size", 4) == 0
    with np.load(out / "maps.npz") as saved:
        assert saved["positive"].shape == (2, 8, 8)


def test_explain_mixed_sizes_rejected(files, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "a.png")
    Image.new("L", (12, 10)).save(folder / "b.png")
    assert run("explain", files["net"], folder, "--out", tmp_path / "out", "--mode", "L") == 1
    assert "b.png is 12x10 pixels, but" in error_line(capsys)


def test_explain_resumes_and_overwrites(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("explain", files["net"], files["images"], "--out", out) == 0
    first = torch.load(out / "accumulator.pt", weights_only=True)
    assert run("explain", files["net"], files["images"], "--out", out) == 0
    assert torch.equal(torch.load(out / "accumulator.pt", weights_only=True)["sums"], first["sums"])

    assert run("explain", files["net"], files["images"], "--out", out, "--patch-size", 2) == 1
    assert "Cannot resume the run in" in error_line(capsys)
    assert run("explain", files["net"], files["images"], "--out", out, "--patch-size", 2, "--overwrite") == 0


def test_explain_resume_rejection_names_option(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("explain", files["net"], files["images"], "--out", out) == 0
    capsys.readouterr()
    assert run("explain", files["net"], files["images"], "--out", out, "--batch-size", 7) == 1
    assert "batch_size: 64 in the saved run, 7 now" in error_line(capsys)


@pytest.mark.parametrize("name", ["pickled.pt", "weights.pt", "plain.pkl"])
def test_explain_rejects_pickle(files, tmp_path, capsys, name):
    model = files["root"] / name
    assert run("explain", model, files["images"], "--out", tmp_path / "out") == 1
    line = error_line(capsys)
    assert f"{model} is a pickled module or checkpoint (torch.save)" in line
    assert "unpickling can run arbitrary code" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: root / "missing.pt", "MODEL file not found: "),
        (lambda root: _write(root / "text.pt", b"hello"), "is neither a TorchScript file nor a torch.export program"),
    ],
    ids=["missing", "unknown"],
)
def test_explain_rejects_bad_model_file(files, tmp_path, capsys, setup, message):
    assert run("explain", setup(tmp_path), files["images"], "--out", tmp_path / "out") == 1
    assert message in error_line(capsys)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_explain_rejects_bad_images(files, tmp_path, capsys):
    np.save(tmp_path / "ints.npy", np.zeros((2, 1, 8, 8), dtype=np.int32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "ints.npy", "to be uint8 (8-bit images) or floating point, but got int32"),
        (tmp_path / "objects.npy", "objects.npy as a numeric array without unpickling"),
        (tmp_path / "empty", "No image files (.png"),
        (tmp_path / "nothing.npy", "IMAGES not found: "),
        (files["net"], "IMAGES must be an image file"),
    ]
    for images, message in cases:
        assert run("explain", files["net"], images, "--out", tmp_path / "out") == 1
        assert message in error_line(capsys), images


def test_explain_reports_wrong_channels(files, tmp_path, capsys):
    assert run("explain", files["root"] / "net_rgb.pt", files["images"], "--out", tmp_path / "out") == 1
    assert "The model failed on a batch of shape (2, 1, 8, 8)" in error_line(capsys)


def test_explain_float_array_out_of_range(files, tmp_path, capsys):
    np.save(tmp_path / "floats.npy", np.full((2, 1, 8, 8), 3.0, dtype=np.float32))
    assert run("explain", files["net"], tmp_path / "floats.npy", "--out", tmp_path / "out") == 1
    assert "to lie in value_range [-1.0, 1.0], but got values from 3" in error_line(capsys)


@pytest.mark.slow
def test_explain_export_program(files, tmp_path, capsys):
    net = make_net()
    example = torch.rand(2, 1, 8, 8)
    dynamic = torch.export.export(net, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(dynamic, tmp_path / "dynamic.pt2")
    assert run("explain", tmp_path / "dynamic.pt2", files["images"], "--out", tmp_path / "out") == 0
    with np.load(tmp_path / "out" / "maps.npz") as saved:
        exported_maps = saved["positive"]
    assert run("explain", files["net"], files["images"], "--out", tmp_path / "script") == 0
    with np.load(tmp_path / "script" / "maps.npz") as saved:
        np.testing.assert_allclose(exported_maps, saved["positive"], rtol=0, atol=1e-5)

    static = torch.export.export(net, (example[:1],))
    torch.export.save(static, tmp_path / "static.pt2")
    capsys.readouterr()
    assert run("explain", tmp_path / "static.pt2", files["images"], "--out", tmp_path / "out2") == 1
    assert "a torch.export program needs a dynamic batch dimension" in error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "m.pt", "x.npy"], "the following arguments are required: --out"),
        (["explain", "m.pt", "x.npy", "--out", "o", "--value-range", "1", "-1"], "--value-range needs LO < HI"),
        (["explain", "m.pt", "x.npy", "--out", "o", "--target", "1"], "--target 1 needs --score target"),
        (["explain", "m.pt", "x.npy", "--out", "o", "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["explain", "m.pt", "x.npy", "--out", "o", "--chunk-size", "-2"], "--chunk-size must be a positive integer"),
        (["explain", "m.pt", "x.npy", "--out", "o", "--patch-size", "0"], "--patch-size must be a positive integer"),
        (["explain", "m.pt", "x.npy", "--out", "o", "--score", "target", "--target", "-1"], "non-negative class"),
        (["explain", "m.pt", "x.npy", "--out", "o", "--resize", "0", "8"], "--resize needs positive sizes"),
        (["explain", "m.pt", "x.npy", "--out", "o", "--overlays", "-1"], "--overlays must be 0 or more"),
        (["explain", "m.pt", "x.npy", "--out", "o", "--batch-size", "many"], "invalid int value: 'many'"),
        (["landmarks", "s.pt", "--out", "o"], "one of the arguments --keep-fraction --threshold is required"),
        (["landmarks", "s.pt", "--out", "o", "--keep-fraction", "1.5"], "--keep-fraction must lie between 0 and 1"),
        (["merge", "--out", "o"], "the following arguments are required: STATE"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert line.startswith("efmap")
    assert message in line


def test_help_states_every_default():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in subcommands.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert "default" in action.help or "required" in action.help, f"{name} {action.option_strings}"


def test_merge_of_two_runs_equals_one_run(files, tmp_path):
    root = files["root"]
    for name in ("first_half", "second_half", "images"):
        assert run("explain", files["net"], root / f"{name}.npy", "--out", tmp_path / name, "--chunk-size", 1) == 0

    second = tmp_path / "second_half" / "accumulator.pt"
    assert run("merge", tmp_path / "first_half", second, "--out", tmp_path / "m") == 0

    merged = torch.load(tmp_path / "m" / "accumulator.pt", weights_only=True)
    whole = torch.load(tmp_path / "images" / "accumulator.pt", weights_only=True)
    for key in ("labels", "counts", "sums", "maxima"):
        assert torch.equal(merged[key], whole[key]), f"{key} differs"
    with np.load(tmp_path / "m" / "maps.npz") as saved:
        assert saved["class_maps"].shape[1:] == (8, 8)
    assert (tmp_path / "m" / "overlays" / "overall.png").exists()


def test_merge_errors(files, tmp_path, capsys):
    accumulator = efmap.HeatMapAccumulator("max")
    accumulator.update(torch.rand(2, 8, 8), [0, 1])
    torch.save(accumulator.state_dict(), tmp_path / "max.pt")
    other = efmap.HeatMapAccumulator("mean")
    other.update(torch.rand(2, 8, 8), [0, 1])
    torch.save(other.state_dict(), tmp_path / "mean.pt")
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "unrelated.pt")
    torch.save(efmap.HeatMapAccumulator().state_dict(), tmp_path / "empty.pt")

    cases = [
        ([tmp_path / "max.pt", tmp_path / "mean.pt"], "Cannot merge "),
        ([tmp_path / "unrelated.pt"], "is not an accumulator state: expected the keys"),
        ([files["root"] / "pickled.pt"], "Cannot load "),
        ([tmp_path / "missing.pt"], "Accumulator state not found: "),
        ([tmp_path / "empty.pt"], "contain no maps"),
    ]
    for inputs, message in cases:
        assert run("merge", *inputs, "--out", tmp_path / "out") == 1
        assert message in error_line(capsys), inputs


def test_landmarks_keep_fraction_and_class(tmp_path, capsys):
    accumulator = efmap.HeatMapAccumulator()
    accumulator.update(torch.arange(64.0).reshape(1, 8, 8), [0])
    accumulator.update(torch.arange(64.0).flip(0).reshape(1, 8, 8), [2])
    torch.save(accumulator.state_dict(), tmp_path / "state.pt")

    assert run("landmarks", tmp_path / "state.pt", "--out", tmp_path / "a", "--keep-fraction", 0.25, "--class", 0) == 0
    assert "Kept 16 of 64 features (25.00%)" in capsys.readouterr().out
    mask = np.load(tmp_path / "a" / "landmarks.npy")
    assert mask.dtype == bool
    assert mask[6:].all()
    assert not mask[:6].any()
    record = json.loads((tmp_path / "a" / "landmarks.json").read_text())
    assert record["count"] == 16
    assert record["map"] == "class 0"
    assert (tmp_path / "a" / "landmarks.png").exists()

    # The overall map of two mirrored ramps is 0.5 everywhere, up to rounding.
    assert run("landmarks", tmp_path / "state.pt", "--out", tmp_path / "b", "--threshold", 0.6) == 0
    assert np.load(tmp_path / "b" / "landmarks.npy").sum() == 0
    assert run("landmarks", tmp_path / "state.pt", "--out", tmp_path / "b", "--threshold", 0.4) == 0
    assert np.load(tmp_path / "b" / "landmarks.npy").sum() == 64

    assert run("landmarks", tmp_path / "state.pt", "--out", tmp_path / "c", "--keep-fraction", 0.5, "--class", 1) == 1
    assert "has no map for class 1; it has [0, 2]" in error_line(capsys)


def test_python_module_entry_point(files, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SOURCE_ROOT)}
    command = [sys.executable, "-m", "efmap", "explain", str(files["root"] / "plain.pkl"), str(files["images"])]
    completed = subprocess.run([*command, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert completed.stderr.startswith("efmap explain: error: ")
    assert "arbitrary code" in completed.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(files, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(SOURCE_ROOT)}
    arguments = ["explain", str(files["net"]), str(files["images"]), "--chunk-size", "2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "efmap"]
    completed = subprocess.run(
        [*launcher, *arguments, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr

    assert run(*arguments, "--out", tmp_path / "single") == 0

    for name in ("maps.npy", "targets.npy"):
        two_ranks = (tmp_path / "two" / name).read_bytes()
        assert two_ranks == (tmp_path / "single" / name).read_bytes(), f"{name} differs"
    two = torch.load(tmp_path / "two" / "accumulator.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "accumulator.pt", weights_only=True)
    for key in ("labels", "counts", "sums", "maxima"):
        assert torch.equal(two[key], single[key]), f"{key} differs"
    assert (tmp_path / "two" / "state-rank1.pt").exists()
