"""The efmap command line, end to end on models and images that the tests create."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import efmap
from efmap._cli_io import ModelCallError, error_summary
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


def expect_error(capsys, *, match: str) -> str:
    """Check that the command printed one error line that ``match`` finds (with re.search); return it."""
    line = error_line(capsys)
    assert re.search(match, line), f"{match!r} not found in {line!r}"
    return line


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
    assert run("explain", files["net"], files["images"], "--out", out, "--score", "target") == 1
    line = expect_error(
        capsys,
        match=r"score: 'max' in the saved run, 'target' now\)\. Pass --overwrite to discard it and start again, "
        r"or choose another --out\.$",
    )
    assert "overwrite=True" not in line
    assert "out_dir" not in line


def test_explain_resumes_with_other_batch_size(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("explain", files["net"], files["images"], "--out", out, "--chunk-size", 2) == 0
    first = torch.load(out / "accumulator.pt", weights_only=True)
    capsys.readouterr()

    assert run("explain", files["net"], files["images"], "--out", out, "--chunk-size", 2, "--batch-size", 7) == 0
    output = capsys.readouterr().out
    assert re.search(r"^The run in .* was already complete \(6 image\(s\)\); nothing was explained again\.$", output)
    assert "Explained" not in output
    assert torch.equal(torch.load(out / "accumulator.pt", weights_only=True)["sums"], first["sums"])
    assert json.loads((out / "summary.json").read_text())["images_explained"] == 0


def test_explain_report_counts_resumed_images(tmp_path):
    from efmap.cli import _explain_report

    line = _explain_report(6, 2, 64, 1.25, tmp_path)
    expected = "Explained 2 image(s) (the other 4 were done by an earlier, interrupted run), 128 forward passes, "
    assert line == expected + f"in 1.2 s; results in {tmp_path}"
    assert _explain_report(6, 6, 64, 1.0, tmp_path).startswith("Explained 6 image(s), 384 forward passes")


@pytest.mark.parametrize("name", ["pickled.pt", "weights.pt", "plain.pkl"])
def test_explain_rejects_pickle(files, tmp_path, capsys, name):
    model = files["root"] / name
    assert run("explain", model, files["images"], "--out", tmp_path / "out") == 1
    line = error_line(capsys)
    assert f"{model} is a pickled module or checkpoint (torch.save)" in line
    assert "unpickling can run arbitrary code" in line
    assert not (tmp_path / "out").exists()


def test_pickle_rejection_recommends_export_first(files, tmp_path, capsys):
    assert run("explain", files["root"] / "pickled.pt", files["images"], "--out", tmp_path / "out") == 1
    line = expect_error(
        capsys,
        match=r"Export the model with a dynamic batch dimension, torch\.export\.export\(model\.eval\(\), \(example,\), "
        r'dynamic_shapes=\{"x": \{0: torch\.export\.Dim\("batch"\)\}\}\)',
    )
    assert line.index("torch.export.export") < line.index("torch.jit.script")
    assert re.search(r"TorchScript files \(torch\.jit\.script\) load too, but PyTorch 2\.13 deprecates", line)


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


def test_explain_reports_torchscript_cause(files, tmp_path, capsys):
    model = files["root"] / "net_rgb.pt"
    assert run("explain", model, files["images"], "--out", tmp_path / "out") == 1
    line = expect_error(
        capsys,
        match=rf"^efmap explain: error: {re.escape(str(model))} failed on a batch of shape \(3, 1, 8, 8\): "
        r"RuntimeError: Given groups=1, weight of size \[4, 3, 3, 3\], expected input\[3, 1, 8, 8\] to have 3 "
        r"channels, but got 1 channels instead\. Check the image size and channels \(--resize, --mode\)\.$",
    )
    assert "TorchScript interpreter" not in line
    assert ".." not in line
    assert not (tmp_path / "out").exists()


def test_error_summary_of_other_errors():
    assert error_summary(ValueError("Bad shape.\nMore detail")) == "Bad shape"
    assert error_summary(AssertionError()) == "AssertionError"
    scripted = RuntimeError(
        "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript:\n"
        '  File "code/__torch__.py", line 12\n    <--- HERE\nValueError: wrong size.\n'
    )
    assert error_summary(scripted) == "ValueError: wrong size"


class FailsOnLargeBatches(torch.nn.Module):
    """Passes the pre-flight check on small batches and fails in the middle of a run."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 5:
            raise RuntimeError("batches of more than 5 are not supported")
        return self.net(x)


@pytest.fixture(scope="module")
def fails_on_large_batches(files) -> Path:
    path = files["root"] / "fails_on_large_batches.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(FailsOnLargeBatches().eval()).save(str(path))
    return path


def test_explain_model_failure_mid_run_is_one_line(files, fails_on_large_batches, tmp_path, capsys):
    assert run("explain", fails_on_large_batches, files["images"], "--out", tmp_path / "out", "--batch-size", 16) == 1
    expect_error(
        capsys,
        match=r"fails_on_large_batches\.pt failed on a batch of shape \(6, 1, 8, 8\): "
        r"RuntimeError: batches of more than 5 are not supported\. Check the image size",
    )


def test_explain_debug_shows_model_traceback(files, fails_on_large_batches, tmp_path):
    argv = ["explain", fails_on_large_batches, files["images"], "--out", tmp_path / "out", "--debug"]
    with pytest.raises(ModelCallError, match=r"failed on a batch of shape \(6, 1, 8, 8\)") as raised:
        run(*argv)
    assert "TorchScript interpreter" in str(raised.value.__cause__)


def test_explain_does_not_hide_efmap_bugs(files, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("an efmap bug")

    monkeypatch.setattr("efmap.cli.explain_dataset", broken)
    with pytest.raises(RuntimeError, match="an efmap bug"):
        run("explain", files["net"], files["images"], "--out", tmp_path / "out")


def test_explain_static_export_rejected(files, tmp_path, capsys):
    program = torch.export.export(make_net(), (torch.rand(2, 1, 8, 8),))
    torch.export.save(program, tmp_path / "static.pt2")
    assert run("explain", tmp_path / "static.pt2", files["images"], "--out", tmp_path / "out") == 1
    expect_error(
        capsys,
        match=r"static\.pt2 was exported with a fixed batch size of 2, but efmap runs it on batches of other sizes "
        r"\(this one has 3\)\. Export it again with a dynamic batch dimension: torch\.export\.export\(.*"
        r'dynamic_shapes=\{"x": \{0: torch\.export\.Dim\("batch"\)\}\}\)',
    )
    assert not (tmp_path / "out").exists()


def test_explain_float_array_out_of_range(files, tmp_path, capsys):
    np.save(tmp_path / "floats.npy", np.full((2, 1, 8, 8), 3.0, dtype=np.float32))
    assert run("explain", files["net"], tmp_path / "floats.npy", "--out", tmp_path / "out") == 1
    line = expect_error(
        capsys,
        match=r"floats\.npy to lie in --value-range -1 1, but row 0 has values from 3 to 3\. .*"
        r"for example --value-range 0 255 for pixels in \[0, 255\]",
    )
    assert "value_range=" not in line
    assert "127.5" not in line


def test_explain_later_row_out_of_range(files, tmp_path, capsys):
    rows = np.zeros((4, 1, 8, 8), dtype=np.float32)
    rows[3, 0, 0, 0] = 255.0
    np.save(tmp_path / "floats.npy", rows)
    assert run("explain", files["net"], tmp_path / "floats.npy", "--out", tmp_path / "out", "--chunk-size", 2) == 1
    expect_error(capsys, match=r"but row 3 has values from 0 to 255\. ")


def test_explain_float_array_in_upper_half(files, tmp_path, capsys):
    np.save(tmp_path / "unit.npy", np.random.default_rng(1).uniform(0.1, 1.0, (2, 1, 8, 8)).astype(np.float32))
    assert run("explain", files["net"], tmp_path / "unit.npy", "--out", tmp_path / "out") == 1
    line = expect_error(
        capsys,
        match=r"unit\.npy to use --value-range -1 1, but all its values lie in the upper half .*"
        r"--value-range 0 1\. .*pass --no-range-check\.$",
    )
    assert "check_range=False" not in line
    assert run("explain", files["net"], tmp_path / "unit.npy", "--out", tmp_path / "out", "--no-range-check") == 0


def test_explain_channels_last_array_is_transposed(files, tmp_path, capsys):
    pixels = np.load(files["images"])
    np.save(tmp_path / "hwc.npy", pixels.transpose(0, 2, 3, 1))
    assert run("explain", files["net"], tmp_path / "hwc.npy", "--out", tmp_path / "hwc") == 0
    err = capsys.readouterr().err
    assert re.search(r"hwc\.npy has shape \(6, 8, 8, 1\), read as channels-last \(N, H, W, C\) and transposed", err)
    assert run("explain", files["net"], files["images"], "--out", tmp_path / "chw") == 0
    with np.load(tmp_path / "hwc" / "maps.npz") as hwc, np.load(tmp_path / "chw" / "maps.npz") as chw:
        assert np.array_equal(hwc["positive"], chw["positive"])


def test_explain_rgb_channels_last_array(files, tmp_path, capsys):
    pixels = np.random.default_rng(2).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", pixels)
    assert run("explain", files["root"] / "net_rgb.pt", tmp_path / "rgb.npy", "--out", tmp_path / "out") == 0
    with np.load(tmp_path / "out" / "maps.npz") as saved:
        assert saved["positive"].shape == (2, 8, 8)


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
    expect_error(capsys, match=r"static\.pt2 was exported with a fixed batch size of 1, .*\(this one has 3\)")

    # A run of the same weights as TorchScript and as a torch.export program may be merged.
    assert run("merge", tmp_path / "out", tmp_path / "script", "--out", tmp_path / "merged") == 0


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

    (tmp_path / "text.pt").write_text("not a state")

    cases = [
        ([tmp_path / "max.pt", tmp_path / "mean.pt"], "Cannot merge "),
        ([tmp_path / "unrelated.pt"], "is not an efmap accumulator state: expected the keys"),
        ([files["root"] / "pickled.pt"], r"pickled\.pt is not an efmap accumulator state: it contains Python objects"),
        ([tmp_path / "text.pt"], r"text\.pt is not an efmap accumulator state: torch\.load cannot read it\.$"),
        ([tmp_path / "missing.pt"], "Accumulator state not found: "),
        ([tmp_path / "empty.pt"], "contain no maps"),
    ]
    for inputs, message in cases:
        assert run("merge", *inputs, "--out", tmp_path / "out") == 1
        line = expect_error(capsys, match=message)
        assert "weights_only" not in line, inputs


def test_merge_rejects_model_file(files, tmp_path, capsys):
    assert run("explain", files["net"], files["images"], "--out", tmp_path / "run") == 0
    capsys.readouterr()
    assert run("merge", tmp_path / "run" / "accumulator.pt", files["net"], "--out", tmp_path / "out") == 1
    line = expect_error(capsys, match=rf"^efmap merge: error: {re.escape(str(files['net']))} is not an efmap "
                                      r"accumulator state: it is a TorchScript model\.$")  # fmt: skip
    assert "weights_only" not in line


@pytest.fixture(scope="module")
def base_run(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    assert run("explain", files["net"], files["images"], "--out", out) == 0
    return out


@pytest.mark.parametrize(
    ("model", "images", "options", "field"),
    [
        (
            "other_net.pt",
            "images.npy",
            [],
            r"model weights \(SHA-256 of the state_dict tensors\): '[0-9a-f]{12}\.\.\.' in",
        ),
        ("net.pt", "images.npy", ["--score", "target"], r"score: 'max' in .*, 'target' in"),
        ("net.pt", "images.npy", ["--patch-size", "2"], r"patch_size: None in .*, 2 in "),
        ("net.pt", "images.npy", ["--value-range", "0", "1"], r"value_range: \[-1\.0, 1\.0\] in .*, \[0\.0, 1\.0\] in"),
        ("net.pt", "small.npy", [], r"input shape: \[1, 8, 8\] in .*, \[1, 6, 6\] in"),
        ("net_rgb.pt", "rgb.npy", [], r"input shape: \[1, 8, 8\] in .*, \[3, 8, 8\] in"),
    ],
    ids=["model", "score", "patch-size", "value-range", "image-size", "channels"],
)
def test_merge_rejects_unrelated_runs(files, base_run, tmp_path, capsys, model, images, options, field):
    root = files["root"]
    if not (root / "other_net.pt").exists():
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.script(TinyConv().eval()).save(str(root / "other_net.pt"))
        np.save(root / "small.npy", np.load(files["images"])[:, :, :6, :6])
        np.save(root / "rgb.npy", np.repeat(np.load(files["images"]), 3, axis=1))
    other = tmp_path / "other"
    assert run("explain", root / model, root / images, "--out", other, *options) == 0
    capsys.readouterr()

    assert run("merge", base_run, other / "accumulator.pt", "--out", tmp_path / "merged") == 1
    expect_error(capsys, match=r"Cannot merge .*accumulator\.pt with .*: the runs were made with different options \(.*"
                 + field)  # fmt: skip
    assert not (tmp_path / "merged").exists()


def test_merge_keeps_options_notes_unchecked(files, base_run, tmp_path, capsys):
    saved = torch.load(base_run / "accumulator.pt", weights_only=True)
    assert saved["run_options"]["score"] == "max"
    assert saved["run_options"]["map_shape"] == [8, 8]

    assert run("merge", base_run, base_run, "--out", tmp_path / "twice") == 0
    assert torch.load(tmp_path / "twice" / "accumulator.pt", weights_only=True)["run_options"] == saved["run_options"]
    assert capsys.readouterr().err == ""

    plain = efmap.HeatMapAccumulator()
    plain.update(torch.rand(1, 8, 8), [0])
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    assert run("merge", base_run, tmp_path / "plain.pt", "--out", tmp_path / "mixed") == 0
    err = capsys.readouterr().err
    assert re.search(r"^efmap merge: note: .*plain\.pt record\(s\) no run options, so the model and options", err)
    assert "run_options" not in torch.load(tmp_path / "mixed" / "accumulator.pt", weights_only=True)


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
