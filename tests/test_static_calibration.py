"""The calibration-choice benchmark's pieces: disjoint calibration and check images (deploy_speed calibrates on the
same draw), and the int8-against-fp32 comparison it shares with ``export``, in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptsoup.deploy.quantize import compare_logits
from adaptsoup_bench.datasets import calibration_split


def test_the_split_is_disjoint_and_starts_with_deploy_speeds_calibration_images():
    calib, check = calibration_split(1000, 64, 500, seed=1)
    assert len(calib) == 64 and len(check) == 500 and not set(calib) & set(check)
    deploy_speed_pick = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:64].numpy()
    np.testing.assert_array_equal(calib, deploy_speed_pick)


def test_the_split_refuses_more_images_than_the_folder_holds():
    with pytest.raises(SystemExit, match="holds 10"):
        calibration_split(10, 8, 5, seed=0)


def test_agreement_in_closed_form():
    fp32 = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    int8 = np.array([[0.5, 0.0], [0.0, 1.0], [1.0, 2.0], [0.0, 3.5]])
    got = compare_logits(int8, fp32)
    assert got["top1_agreement"] == 75.0
    assert got["mean_abs_diff"] == pytest.approx((0.5 + 0 + 0 + 0 + 1 + 1 + 0 + 0.5) / 8)
    assert got["max_abs_diff"] == 1.0
