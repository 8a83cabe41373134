"""Image files of every kind read right: grayscale, RGBA, 16-bit, EXIF-rotated; bad ones named."""
import itertools

import numpy as np
import pytest
from PIL import Image

from lgd_cli.compat.images import image_problem, read_image
from lgd_cli.errors import DataError

# A 48x32 (w x h) RGB picture with a white block in its top-left corner: orientation is visible.
W, H = 48, 32


def _picture() -> np.ndarray:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:8, :12] = 255
    rgb[..., 0] |= 40  # some red everywhere: channel order is visible too
    return rgb


def _write(kind: str, folder) -> str:
    rgb = _picture()
    path = folder / f"{kind}.png"
    if kind == "gray":
        Image.fromarray(rgb[..., 1]).save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, np.full((H, W), 7, np.uint8)])).save(path)
    elif kind == "gray16":
        Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(path)  # full 16-bit range
    elif kind == "rgb16":
        import cv2

        assert cv2.imwrite(str(path), (rgb[..., ::-1].astype(np.uint16) * 257))  # cv2 writes BGR
    elif kind == "exif":
        # Stored rotated by 90 degrees; EXIF orientation 6 ("rotate 90 clockwise to display") undoes it.
        path = folder / "exif.jpg"
        stored = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)
        exif = stored.getexif()
        exif[0x0112] = 6
        stored.save(path, exif=exif.tobytes(), quality=100, subsampling=0)
    elif kind == "palette":
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    return str(path)


@pytest.mark.parametrize("kind", ["gray", "rgba", "gray16", "rgb16", "exif", "palette"])
def test_every_kind_reads_as_the_same_upright_picture(tmp_path, kind):
    image = read_image(_write(kind, tmp_path), format="RGB")
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    expected = _picture()
    if kind in ("gray", "gray16"):
        expected = np.repeat(expected[..., 1:2], 3, axis=2)
    assert np.abs(image.astype(int) - expected).max() <= (8 if kind == "exif" else 1)  # JPEG is lossy


def test_bgr_is_what_detectron2_models_read(tmp_path):
    image = read_image(_write("rgba", tmp_path), format="BGR")
    assert tuple(image[20, 30]) == (0, 0, 40)


def test_detectron2_reads_through_lgd(tmp_path):
    from detectron2.data import detection_utils

    assert detection_utils.read_image is read_image  # installed by lgd_cli.compat.apply()
    assert detection_utils.read_image(_write("gray16", tmp_path), format="BGR").max() == 255


def test_image_problem_names_what_is_wrong(tmp_path):
    good = _write("gray", tmp_path)
    assert image_problem(good) is None
    cut = tmp_path / "cut.png"
    cut.write_bytes(open(good, "rb").read()[:60])
    assert "cannot be decoded" in image_problem(str(cut))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"hello")
    assert image_problem(str(junk)) == "is not an image file Pillow can read"
    assert image_problem(str(tmp_path / "gone.png")) == "does not exist"


def _train_stream(tiny_cfg, records):
    from detectron2.data import DatasetMapper
    from detectron2.data.samplers import TrainingSampler

    from lgd_cli.data.loader import ResumableTrainLoader

    loader = ResumableTrainLoader(records, DatasetMapper(tiny_cfg, True), TrainingSampler(len(records), seed=1),
                                  batch_size=1, json_file="ann.json")
    return [batch[0] for batch in itertools.islice(loader, len(records))]


def test_training_mapper_takes_every_kind(tmp_path, tiny_cfg):
    kinds = ["gray", "rgba", "gray16", "rgb16", "exif", "palette"]
    records = [{"file_name": _write(kind, tmp_path), "image_id": i, "width": W, "height": H, "annotations": []}
               for i, kind in enumerate(kinds)]
    for sample in _train_stream(tiny_cfg, records):
        image = sample["image"]  # C, H, W after the training resize (shortest edge 64)
        assert image.shape[0] == 3 and image.shape[2] > image.shape[1]  # still landscape: upright


def test_exif_record_with_the_stored_size_is_named(tmp_path, tiny_cfg):
    record = {"file_name": _write("exif", tmp_path), "image_id": 9, "width": H, "height": W, "annotations": []}
    with pytest.raises(DataError) as info:
        _train_stream(tiny_cfg, [record])
    message = info.value.message
    assert f"{record['file_name']} (image id 9 in ann.json)" in message
    assert "is 48x32 pixels (after its EXIF orientation), but its record says width 32, height 48" in message
