"""The netdissect-fast console script: commands end to end, one-line errors."""
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import netdissect_fast as ndf
from netdissect_fast.cli import main
from netdissect_fast.dissect import iter_activations


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU()),
        head=nn.Sequential(OrderedDict(conv=nn.Conv2d(4, 6, 3, 2, 1), act=nn.ReLU()))))


MODEL = f"{__name__}:tiny_model"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["make-dataset", str(path), "--images", "24", "--size", "32", "--seed", "2",
                 "--quiet"]) == 0
    return path


def dissect_args(data, out, *extra):
    return ["dissect", "--model", MODEL, "--layers", "stem,head.conv", "--dataset", str(data),
            "--out", str(out), "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--quiet", *extra]


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("netdissect-fast: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_dissect_matches_score(data, tmp_path, capsys):
    assert main(dissect_args(data, tmp_path, "--cache-dtype", "float32")) == 0
    out = capsys.readouterr().out
    assert "stem:" in out and "head.conv:" in out and "unique detectors" in out
    ds = ndf.Broden(data)
    acts = {}
    for _, _, maps in iter_activations(tiny_model().eval(), ["stem", "head.conv"], ds,
                                       device="cpu", workers=0):
        for name, m in maps.items():
            acts.setdefault(name, []).append(m.numpy())
    for name in ("stem", "head.conv"):
        [layer_dir] = (tmp_path / "tiny_model" / name).iterdir()
        saved = ndf.DissectionResult.load(layer_dir)
        ref = ndf.score(np.concatenate(acts[name]), ds, progress=False)
        np.testing.assert_array_equal(saved.intersection, ref.intersection)
        np.testing.assert_array_equal(saved.cat_activation, ref.cat_activation)
        np.testing.assert_array_equal(saved.label_pixels, ref.label_pixels)
        assert (layer_dir / "report.html").is_file() and (layer_dir / "tally.csv").is_file()


def test_no_report_then_report_command(data, tmp_path, capsys):
    assert main(dissect_args(data, tmp_path, "--no-report")) == 0
    dirs = sorted(str(p) for p in tmp_path.glob("tiny_model/*/*"))
    assert len(dirs) == 2 and not any((Path(d) / "report.html").exists() for d in dirs)
    capsys.readouterr()
    compare = tmp_path / "compare.html"
    assert main(["report", *dirs, "--out", str(compare)]) == 0
    assert all((Path(d) / "report.html").is_file() for d in dirs) and compare.is_file()


@pytest.mark.parametrize("model, layers, needles", [
    ("no_such_pkg_xyz:f", "stem", ["no_such_pkg_xyz"]),
    ("bogus", "stem", ["'bogus'", "not understood"]),
    (MODEL, "head.cnv", ["'head.cnv'", "close matches: head.conv"]),
])
def test_dissect_bad_input_is_one_line(data, tmp_path, capsys, model, layers, needles):
    args = dissect_args(data, tmp_path)
    args[args.index("--model") + 1] = model
    args[args.index("--layers") + 1] = layers
    assert main(args) == 1
    one_line_error(capsys, *needles)


def test_dataset_path_errors(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(dissect_args(missing, tmp_path)) == 1
    one_line_error(capsys, str(missing))
    assert main(["validate-dataset", str(missing)]) == 1
    one_line_error(capsys, str(missing))
    assert main(["report", str(tmp_path)]) == 1
    one_line_error(capsys, "summary.json")


def test_missing_weights_file(data, tmp_path, capsys):
    assert main(dissect_args(data, tmp_path, "--weights", str(tmp_path / "w.pth"))) == 1
    one_line_error(capsys, "w.pth")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["dissect", "--model", "x"])
    assert e.value.code == 2
    one_line_error(capsys, "--layers")
    with pytest.raises(SystemExit):
        main(["dissect", "--model", "x", "--layers", "a", "--dataset", "d", "--out", "o",
              "--cache", "maybe"])
    one_line_error(capsys, "--cache")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "report", str(tmp_path)])


def test_validate_pack_and_backends(data, capsys):
    assert main(["validate-dataset", str(data), "--quiet"]) == 0
    assert main(["pack-dataset", str(data), "--quiet"]) == 0
    assert "packed label store of 24 images" in capsys.readouterr().out
    assert main(["backends"]) == 0
    assert "cpu" in capsys.readouterr().out


def test_console_entry_point_help():
    env_path = str(Path(ndf.__file__).parents[1])
    proc = subprocess.run([sys.executable, "-m", "netdissect_fast", "dissect", "--help"],
                          capture_output=True, text=True, env={"PYTHONPATH": env_path}, timeout=120)
    assert proc.returncode == 0
    for option in ("--model", "--weights", "--layers", "--dataset", "--out", "--q", "--rule",
                   "--upsample", "--device", "--batch-size", "--cache", "--cache-dtype",
                   "--image-size", "--no-report"):
        assert option in proc.stdout
