"""benchmarks/video_digits.py's pure parts, no training: the moving digits go the captioned way and stay on the
canvas; the direction metric reads a clip moving left as left (and a still clip as no direction); identity
consistency and digit accuracy on hand-made classes; the crop around the centroid moves with the digit."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
vd = pytest.importorskip("video_digits")


def test_clips_move_the_captioned_way_and_the_direction_metric_reads_them():
    digit = np.zeros((16, 16), np.uint8)
    digit[4:12, 6:10] = 255
    clips, directions = [], []
    for d, name in enumerate(vd.DIRECTIONS):
        start = 12 if name in ("left", "up") else 2
        clips.append(vd.place(digit, d, 10, start, 8, vd.FRAMES))
        directions.append(d)
    x = vd.clips_float(np.stack(clips))
    assert x.shape == (4, 3, vd.FRAMES, vd.CANVAS, vd.CANVAS) and x.min() == -1 and x.max() == 1
    shift = vd.centroids(x)[:, -1] - vd.centroids(x)[:, 0]  # (rows, columns)
    torch.testing.assert_close(shift, torch.tensor([[0.0, -10], [0, 10], [-10, 0], [10, 0]]))
    assert vd.direction_correct(x, torch.tensor(directions)).all()
    wrong = torch.tensor([1, 0, 3, 2])  # left read as right, up as down, ...
    assert not vd.direction_correct(x, wrong).any()
    still = x[:, :, :1].expand_as(x)
    assert not vd.direction_correct(still, torch.tensor(directions)).any()


def test_generated_data_stays_on_the_canvas_with_its_captions():
    clips, digits, directions, captions = vd.moving_digits()
    assert clips.shape == (1797 * 4, vd.FRAMES, vd.CANVAS, vd.CANVAS) and clips.dtype == np.uint8
    x = vd.clips_float(clips[:200])
    ink = clips[:200].astype(np.int64).sum((2, 3))  # the whole digit on every frame
    assert (ink == ink[:, :1]).all()
    assert vd.direction_correct(x, torch.as_tensor(directions[:200])).all()
    for i in (0, 1, 2, 3, 101):
        assert vd.WORDS[digits[i]] in captions[i] or str(digits[i]) in captions[i]
        assert vd.DIRECTIONS[directions[i]] in captions[i]


def test_identity_consistency_and_digit_accuracy():
    classes = torch.tensor([[7, 7, 7, 7, 7], [7, 7, 1, 7, 7], [3, 3, 3, 3, 3]])
    assert vd.identity_consistency(classes) == pytest.approx(2 / 3)
    assert vd.digit_accuracy(classes, torch.tensor([7, 7, 2])) == pytest.approx(2 / 3)


def test_the_crop_follows_the_digit():
    digit = np.zeros((16, 16), np.uint8)
    digit[2:14, 5:11] = 200
    x = vd.clips_float(vd.place(digit, 1, 12, 0, 3, vd.FRAMES)[None])
    crops = vd.frame_digits(x)
    assert crops.shape == (vd.FRAMES, 1, 8, 8)
    torch.testing.assert_close(crops, crops[:1].expand_as(crops))
