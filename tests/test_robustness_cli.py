"""Bad input through the `lgd` command: exit code, a message naming the file/record, no traceback,
and nothing left in the output folder. One test per case (issue "Robustness")."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import run_cli


def sets(pairs):
    return [x for pair in pairs for x in ("--set", pair)]


def _fails(capsys, code, *args) -> str:
    assert run_cli(*args) == code
    err = capsys.readouterr().err.replace("\n", " ")
    assert "Traceback" not in err
    return err


@pytest.fixture
def data_copy(tiny_data, tiny_overrides, tmp_path):
    """A writable copy of the tiny set; returns (root, overrides pointing at it)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data.train_images.parent, root)
    rel = {k: Path(v).relative_to(tiny_data.train_images.parent) for k, v in
           (("TRAIN_JSON", tiny_data.train_json), ("TRAIN_IMAGES", tiny_data.train_images),
            ("VAL_JSON", tiny_data.val_json), ("VAL_IMAGES", tiny_data.val_images))}
    pairs = [p for p in tiny_overrides if not p.startswith("LGD.DATA.")]
    pairs += ["LGD.DATA.SOURCE=custom"] + [f"LGD.DATA.{k}={root / v}" for k, v in rel.items()]
    return root, pairs, {k: root / v for k, v in rel.items()}


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("iters", ["0", "-3"])
def test_iters_not_positive(capsys, tiny_overrides, tmp_path, iters):
    pairs = [p for p in tiny_overrides if not p.startswith("SOLVER.MAX_ITER")]  # a --set would win over --iters
    err = _fails(capsys, 2, "train", *sets(pairs), "--iters", iters, "--output", str(tmp_path / "run"))
    assert f"SOLVER.MAX_ITER (--iters) must be positive, got {iters}" in err
    assert not (tmp_path / "run").exists()


def test_device_cuda_without_cuda(capsys, tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _fails(capsys, 2, "train", *sets(tiny_overrides), "--device", "cuda", "--output", str(tmp_path / "run"))
    assert "--device cuda asked for, but no CUDA device is visible" in err and "--device cpu" in err
    assert not (tmp_path / "run").exists()


def test_more_gpus_than_cuda_devices(capsys, tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _fails(capsys, 2, "train", *sets(tiny_overrides), "--device", "cuda", "--gpus", "2",
                 "--output", str(tmp_path / "run"))
    assert "--gpus 2 asked for, but only 1 CUDA device is visible" in err and "--gpus 1 or fewer" in err
    assert not (tmp_path / "run").exists()


# --- data ----------------------------------------------------------------------------------------

def test_missing_images_are_listed_before_anything_starts(capsys, data_copy, tmp_path):
    _, pairs, paths = data_copy
    (paths["TRAIN_IMAGES"] / "000002.png").unlink()
    (paths["TRAIN_IMAGES"] / "000005.png").unlink()
    err = _fails(capsys, 1, "train", *sets(pairs), "--output", str(tmp_path / "run"))
    assert f"{paths['TRAIN_JSON']}: 2 of 8 image files are missing under {paths['TRAIN_IMAGES']}: 000002.png, 000005.png" in err
    assert not (tmp_path / "run").exists()


def test_file_name_outside_the_image_folder(capsys, data_copy, tmp_path, monkeypatch):
    _, pairs, paths = data_copy
    ann = json.loads(paths["TRAIN_JSON"].read_text())
    ann["images"][0]["file_name"] = "../outside.png"
    shutil.copy(paths["TRAIN_IMAGES"] / "000001.png", paths["TRAIN_IMAGES"].parent / "outside.png")
    paths["TRAIN_JSON"].write_text(json.dumps(ann))
    err = _fails(capsys, 1, "train", *sets(pairs), "--output", str(tmp_path / "run"))
    assert "images[0] (id 1).file_name: '../outside.png' points outside the image folder" in err
    assert not (tmp_path / "run").exists()

    from lgd_cli.engine import train as engine_train

    seen = {}

    def fake_launch(worker, n, **kwargs):
        cfg = kwargs["args"][0]
        seen["allowed"] = cfg.LGD.DATA.ALLOW_OUTSIDE_ROOT
        return {"final_checkpoint": "x"}

    monkeypatch.setattr(engine_train, "launch", fake_launch)
    assert run_cli("train", *sets(pairs), "--allow-outside-root", "--output", str(tmp_path / "run")) == 0
    assert seen["allowed"] is True


def _bad_and_odd_images(paths):
    """A training set of 4: 000003.png truncated; 000004 grayscale, 000006 RGBA, 000007 16-bit (these must
    just work). With 2 images a batch, the first 2 iterations see every image."""
    ann = json.loads(paths["TRAIN_JSON"].read_text())
    ann["images"] = [img for img in ann["images"] if img["id"] in (3, 4, 6, 7)]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in (3, 4, 6, 7)]
    paths["TRAIN_JSON"].write_text(json.dumps(ann))
    images = paths["TRAIN_IMAGES"]
    rgb = np.asarray(Image.open(images / "000004.png").convert("RGB"))
    Image.fromarray(rgb).convert("L").save(images / "000004.png")
    Image.open(images / "000006.png").convert("RGBA").save(images / "000006.png")
    gray16 = np.asarray(Image.open(images / "000007.png").convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray16).save(images / "000007.png")
    cut = images / "000003.png"
    cut.write_bytes(cut.read_bytes()[:200])
    return cut


@pytest.mark.slow
def test_undecodable_image_fails_naming_it_or_is_skipped(capsys, data_copy, tmp_path):
    _, pairs, paths = data_copy
    cut = _bad_and_odd_images(paths)
    pairs = pairs + ["SOLVER.MAX_ITER=2"]
    err = _fails(capsys, 1, "train", *sets(pairs), "--output", str(tmp_path / "run"))
    assert f"image {cut} (image id 3 in {paths['TRAIN_JSON']}) cannot be decoded" in err
    assert "--skip-bad-images" in err
    assert not (tmp_path / "run").exists()  # failed before its first checkpoint: nothing left

    assert run_cli("train", *sets(pairs), "--skip-bad-images", "--output", str(tmp_path / "run")) == 0
    err = capsys.readouterr().err.replace("\n", " ")
    assert err.count("skipped: image") == 1 and str(cut) in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == 1
    assert torch.load(tmp_path / "run" / "model_final.pth", weights_only=True)["trainer"]["iteration"] == 1


# --- checkpoints and weights ---------------------------------------------------------------------

class _CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_eval_truncated_checkpoint(capsys, trained_checkpoint, tmp_path):
    cut = tmp_path / "model_final.pth"
    data = trained_checkpoint.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    err = _fails(capsys, 1, "eval", str(cut))
    assert f"{cut} is not a readable checkpoint" in err and "truncated" in err
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("content, what", [
    ({"conv1.weight": torch.zeros(1)}, "no 'model' entry"),  # torchvision state dict
    ({"model": {"backbone.conv1.weight": torch.zeros(1)}, "iteration": 5}, "no embedded config"),  # detectron2
])
def test_eval_checkpoint_of_another_tool(capsys, tmp_path, content, what):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    err = _fails(capsys, 1, "eval", str(path))
    assert f"{path} is not an lgd checkpoint: it has {what}" in err and "MODEL.WEIGHTS" in err


def test_eval_on_data_with_other_classes(capsys, trained_checkpoint, data_copy):
    root, _, paths = data_copy
    ann = json.loads(paths["VAL_JSON"].read_text())
    ann["categories"] = ann["categories"][:4]
    ann["annotations"] = [a for a in ann["annotations"] if a["category_id"] <= 4]
    paths["VAL_JSON"].write_text(json.dumps(ann))
    err = _fails(capsys, 1, "eval", str(trained_checkpoint), "--data", str(paths["VAL_JSON"]),
                 "--data", str(paths["VAL_IMAGES"]), "--output", str(root / "eval"))
    assert f"{paths['VAL_JSON']} has classes ['circle', 'square', 'triangle', 'star']" in err
    assert "was trained on ['circle', 'square', 'triangle', 'star', 'cross']" in err
    assert not (root / "eval").exists()
    # The same through the checkpoint's own validation set, pointed elsewhere.
    err = _fails(capsys, 1, "eval", str(trained_checkpoint), "--set", f"LGD.DATA.VAL_JSON={paths['VAL_JSON']}",
                 "--set", f"LGD.DATA.VAL_IMAGES={paths['VAL_IMAGES']}", "--output", str(root / "eval"))
    assert f"{paths['VAL_JSON']} has classes ['circle', 'square', 'triangle', 'star']" in err
    assert not (root / "eval").exists()


def test_eval_malicious_pickle(capsys, tmp_path):
    victim = tmp_path / "pwned"
    path = tmp_path / "model_final.pth"
    path.write_bytes(pickle.dumps({"model": _CreatesFile(victim)}))
    err = _fails(capsys, 1, "eval", str(path))
    assert "could run code when loaded: refused" in err
    assert not victim.exists()


def test_train_with_malicious_pkl_weights(capsys, tiny_overrides, tmp_path):
    victim = tmp_path / "pwned"
    weights = tmp_path / "R-18.pkl"
    weights.write_bytes(pickle.dumps({"model": {"conv1_w": _CreatesFile(victim)}}))
    err = _fails(capsys, 1, "train", *sets(tiny_overrides + [f"MODEL.WEIGHTS={weights}"]),
                 "--output", str(tmp_path / "run"))
    assert f"{weights} refers to io.open" in err and "could run code when loaded: refused" in err
    assert not victim.exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_falls_back_from_a_truncated_checkpoint_and_repairs_metrics(capsys, trained_checkpoint, tiny_overrides,
                                                                             tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, run)
    final = run / "model_final.pth"  # iteration 1
    shutil.copy(final, run / "model_0000001.pth")  # a periodic checkpoint to fall back on, as at CHECKPOINT_PERIOD 1
    final.write_bytes(final.read_bytes()[:1000])
    with open(run / "metrics.json", "a") as f:
        f.write('{"iteration": 7, "total_loss": 1.0}\n{"iteration": 8, "total_lo')  # a kill mid-line
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=3", "SOLVER.CHECKPOINT_PERIOD=2"]
    assert run_cli("train", *sets(pairs), "--resume", "--output", str(run)) == 0
    err = capsys.readouterr().err.replace("\n", "")
    assert f"skipping {final} is not a readable checkpoint" in err and "model_0000001.pth" in err
    assert torch.load(final, weights_only=True)["trainer"]["iteration"] == 2
    records = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records if "total_loss" in r] == [1, 2]

    for path in run.glob("model_*.pth"):
        path.write_bytes(path.read_bytes()[:1000])
    err = _fails(capsys, 1, "train", *sets(pairs), "--resume", "--output", str(run))
    assert f"no readable checkpoint in {run} to resume from" in err and "--force" in err
