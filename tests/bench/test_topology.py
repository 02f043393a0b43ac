"""Named vertices and the six frozen part regions of the BFM."""

from __future__ import annotations

import numpy as np
import pytest

from v2m_bench import topology as T
from v2m_bench.errors import ValidationError
from v2m_bench.topology import (
    ARE_PAIRS,
    FROZEN_REGIONS,
    KEYPOINTS_68,
    OICD,
    REGION_NAMES,
    bfm_regions,
    check_regions,
    region_checksum,
    region_masks,
)


def test_named_vertices_are_those_of_the_official_code():
    assert OICD == (2217, 14607)
    assert ARE_PAIRS == {"ER": (20636, 34153), "FR": (1678, 42117), "MR": (2130, 15003), "CR": (2294, 13635)}
    assert len(KEYPOINTS_68) == 68 and len(set(KEYPOINTS_68)) == 68
    # spot checks against the 3DDFA keypoints_sim.npy rows (vertex = row // 3)
    assert KEYPOINTS_68[0] == 21873 and KEYPOINTS_68[30] == 8192 and KEYPOINTS_68[36] == 2215
    assert KEYPOINTS_68[45] == 14066 and KEYPOINTS_68[67] == 7629
    assert REGION_NAMES == ("left_eye", "right_eye", "nose", "mouth", "left_cheek", "right_cheek")
    assert set(FROZEN_REGIONS) == set(REGION_NAMES)


def test_hull_distance_on_a_square():
    square = np.array([[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0], [1.0, 1.0]])
    pts = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [5.0, 6.0], [-1.0, -1.0], [1.0, -0.5]])
    np.testing.assert_allclose(T._hull_distance(pts, square), [0.0, 0.0, 1.0, 5.0, np.sqrt(2.0), 0.5])


def test_region_checksum_depends_on_every_bit():
    m = np.zeros(53215, bool)
    m[[5, 8000]] = True
    c = region_checksum(m)
    assert len(c) == 64
    m2 = m.copy()
    m2[53214] = True
    assert region_checksum(m2) != c
    assert region_checksum(m.astype(np.uint8)) == c


def test_check_regions_rejects_other_masks():
    fake = {name: np.zeros(53215, bool) for name in REGION_NAMES}
    with pytest.raises(ValidationError, match="left_eye"):
        check_regions(fake)
    with pytest.raises(ValidationError, match="missing"):
        check_regions({})


def test_region_masks_validates_input(small_model):
    with pytest.raises(ValidationError, match="keypoints"):
        region_masks(np.zeros((53215, 3)), small_model.keypoints[:10], small_model.triangles)
    with pytest.raises(ValidationError, match="mean"):
        region_masks(np.zeros((53215, 2)), small_model.keypoints, small_model.triangles)
    with pytest.raises(ValidationError, match="53,215"):  # 576 vertices: no OICD vertices
        region_masks(small_model.mean, small_model.keypoints, small_model.triangles)


# ----------------------------------------------------------------------------- on the BFM


@pytest.fixture(scope="module")
def regions(bfm):
    return bfm_regions(bfm)


def test_regions_match_the_frozen_definition(regions):
    for name in REGION_NAMES:
        count, digest = FROZEN_REGIONS[name]
        assert int(regions[name].sum()) == count, name
        assert region_checksum(regions[name]) == digest, name
    check_regions(regions)  # does not raise


def test_a_changed_definition_is_detected(bfm, monkeypatch):
    monkeypatch.setitem(T.REGION_MARGINS, "mouth", 0.06)
    changed = bfm_regions(bfm)
    with pytest.raises(ValidationError, match="mouth"):
        check_regions(changed)


def test_regions_are_disjoint_and_sized(regions):
    stack = np.stack([regions[n] for n in REGION_NAMES])
    assert stack.sum(axis=0).max() == 1
    counts = {n: int(regions[n].sum()) for n in REGION_NAMES}
    assert all(500 < c < 10_000 for c in counts.values()), counts
    assert counts["left_cheek"] > counts["nose"] > counts["left_eye"]


def test_left_is_the_subjects_left(bfm, regions):
    x = bfm.mean[:, 0]
    for side, sign in (("left", 1), ("right", -1)):
        for part in ("eye", "cheek"):
            assert np.all(sign * x[regions[f"{side}_{part}"]] > 0), f"{side}_{part}"
    # iBUG 36 (the subject's right outer eye corner) is at x < 0
    assert x[KEYPOINTS_68[36]] < 0


def test_left_and_right_are_near_mirror_images(bfm, regions):
    from scipy.spatial import cKDTree

    tree = cKDTree(bfm.mean)
    for part in ("eye", "cheek"):
        left, right = regions[f"left_{part}"], regions[f"right_{part}"]
        assert abs(int(left.sum()) - int(right.sum())) <= 0.03 * right.sum(), part
        _, mirrored = tree.query(bfm.mean[left] * np.array([-1.0, 1.0, 1.0]))
        assert right[mirrored].mean() > 0.95, part
    for part in ("nose", "mouth"):
        _, mirrored = tree.query(bfm.mean[regions[part]] * np.array([-1.0, 1.0, 1.0]))
        assert regions[part][mirrored].mean() > 0.95, part


def test_regions_contain_the_expected_landmarks(regions):
    def region_of(i):
        v = KEYPOINTS_68[i]
        return [n for n in REGION_NAMES if regions[n][v]]

    for i in (36, 37, 38, 39, 40, 41):
        assert region_of(i) == ["right_eye"], i
    for i in (42, 43, 44, 45, 46, 47):
        assert region_of(i) == ["left_eye"], i
    for i in (27, 28, 29, 30, 31, 33, 35):
        assert region_of(i) == ["nose"], i
    for i in range(48, 60):
        assert region_of(i) == ["mouth"], i
    for i in list(range(0, 17)) + list(range(17, 27)):
        assert region_of(i) in ([], ["left_cheek"], ["right_cheek"]), i  # jaw and brows: no part
    # the OICD vertices: 2217 is by the right outer eye corner, 14607 (not its mirror) on the cheek
    assert region_of_vertex(regions, OICD[0]) == ["right_eye"]
    assert region_of_vertex(regions, OICD[1]) == ["left_cheek"]


def region_of_vertex(regions, v):
    return [n for n in REGION_NAMES if regions[n][v]]


def test_cheeks_lie_between_eyes_mouth_and_jaw(bfm, regions):
    y = bfm.mean[:, 1]
    kp = np.array(KEYPOINTS_68)
    for side, eye in (("left", "left_eye"), ("right", "right_eye")):
        cheek_y = y[regions[f"{side}_cheek"]]
        assert cheek_y.max() < y[regions[eye]].max()
        assert cheek_y.min() > y[kp[8]]  # above the chin
        assert y[kp[48]] - 10_000 < np.median(cheek_y) < y[kp[36]]
