"""`neco.data.prepare` and pycocotools: its own RLE decoder gives pycocotools' masks, polygons need the
`prepare` extra, and without it the command ends with one line naming the extra."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from neco.data import prepare
from neco.data.prepare import decode_segmentation

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools, numpy 2


def random_masks(seed=0):
    """Masks COCO files hold: random noise, blobs, empty, full, one row or column, set first/last pixels."""
    rng = np.random.default_rng(seed)
    masks = [np.zeros((7, 9), bool), np.ones((7, 9), bool), rng.random((1, 40)) < 0.5, rng.random((40, 1)) < 0.5]
    for _ in range(60):
        h, w = rng.integers(1, 120, 2)
        noise = rng.random((h, w)) < rng.random()
        blob = np.zeros((h, w), bool)
        blob[rng.integers(0, h):rng.integers(0, h) + 30, rng.integers(0, w):rng.integers(0, w) + 30] = True
        masks += [noise, blob]
    masks[-1][0, 0] = masks[-1][-1, -1] = True
    return masks


def uncompressed_rle(mask):
    """COCO's plain RLE (crowd annotations): run lengths of 0s, 1s, 0s, ... over the column-major pixels."""
    flat = mask.T.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def test_rle_decoder_gives_the_masks_pycocotools_gives():
    from pycocotools import mask as coco_mask

    for mask in random_masks():
        h, w = mask.shape
        compressed = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))  # counts: bytes
        as_in_json = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}
        plain = uncompressed_rle(mask)
        theirs = coco_mask.decode(compressed).astype(bool)
        assert np.array_equal(theirs, mask)
        assert np.array_equal(coco_mask.decode(coco_mask.frPyObjects(plain, h, w)).astype(bool), mask)
        for segmentation in (compressed, as_in_json, plain):
            assert np.array_equal(decode_segmentation(segmentation, h, w), theirs)


def write_polygon_json(root):
    """stuff_val2017.json with one 8x10 image whose only annotation is a polygon (a rectangle)."""
    folder = root / "annotations" / "stuff_annotations"
    folder.mkdir(parents=True)
    image = {"id": 1, "file_name": "000000000001.jpg", "height": 8, "width": 10}
    polygon = [[2.0, 1.0, 7.0, 1.0, 7.0, 5.0, 2.0, 5.0]]  # x, y pairs
    ann = {"image_id": 1, "category_id": 157, "segmentation": polygon}
    (folder / "stuff_val2017.json").write_text(json.dumps({"images": [image], "annotations": [ann]}))
    return folder / "stuff_val2017_pixelmaps" / "000000000001.png"


def run_prepare_command(monkeypatch, capsys, *overrides):
    monkeypatch.setattr(sys, "argv", ["neco.data.prepare", *overrides])
    with pytest.raises(SystemExit) as ended:
        prepare.main()
    return ended.value.code, capsys.readouterr()


def test_polygons_without_pycocotools_end_with_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    pixelmap = write_polygon_json(tmp_path)
    args = ("dataset=coco_stuff", f"paths.coco_eval={tmp_path}", "splits=[val]", "progress=false")
    with monkeypatch.context() as missing:
        missing.setitem(sys.modules, "pycocotools", None)  # `import pycocotools` raises ImportError
        missing.setitem(sys.modules, "pycocotools.mask", None)
        code, out = run_prepare_command(missing, capsys, *args)
    assert code == 2
    json_path = tmp_path / "annotations" / "stuff_annotations" / "stuff_val2017.json"
    assert out.err.splitlines() == [f"error: the polygon segmentations of {json_path} need pycocotools, which is "
                                    "not installed: pip install 'neco[prepare]'"]
    assert not pixelmap.parent.exists()  # refused before writing anything

    # With pycocotools, the same file is prepared: the rectangle holds the category, the rest is unlabelled.
    monkeypatch.setattr(sys, "argv", ["neco.data.prepare", *args])
    prepare.main()
    written = np.asarray(Image.open(pixelmap))
    assert set(np.unique(written[2:5, 3:7])) == {157} and written[6:, :].max() == 0 and written[:, 8:].max() == 0
