import numpy as np
import pytest

from foveation.metrics import ConfusionMatrix


def test_hand_computed_matrix():
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 1]])
    cm = ConfusionMatrix(4).update(pred, label)
    # rows true, cols pred; the 255 pixel counts nowhere
    expected = np.array([[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)
    s = cm.summary(kept=(0, 1, 2), names=("b", "g3", "g4", "g5"))
    # IoU: class0 1/(2+2-1)=1/3, class1 3/(3+4-3)=3/4, class2 1/(2+1-1)=1/2, class3 absent -> 0
    assert s["iou"] == pytest.approx({"b": 1 / 3, "g3": 3 / 4, "g4": 1 / 2, "g5": 0.0})
    assert s["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2 + 0) / 4)
    assert s["miou_kept"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    assert s["class_accuracy"] == pytest.approx({"b": 0.5, "g3": 1.0, "g4": 0.5, "g5": 0.0})
    assert s["dice"]["g3"] == pytest.approx(2 * 3 / (4 + 3))
    assert s["absent_classes"] == ["g5"]


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (64, 80))
    label[rng.random(label.shape) < 0.1] = 255
    pred = rng.integers(0, 4, (64, 80))
    whole = ConfusionMatrix(4).update(pred, label)
    parts = ConfusionMatrix(4)
    for r in range(0, 64, 16):
        parts.update(pred[r : r + 16], label[r : r + 16])
    np.testing.assert_array_equal(whole.matrix, parts.matrix)
    other = ConfusionMatrix(4).update(pred, label)
    np.testing.assert_array_equal(whole.merge(other).matrix, 2 * parts.matrix)


def test_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="differ in size"):
        cm.update(np.zeros(4), np.zeros(5))
    with pytest.raises(ValueError, match="label holds class ids"):
        cm.update(np.zeros(2), np.array([0, 7]))
    with pytest.raises(ValueError, match="prediction holds"):
        cm.update(np.array([0, 9]), np.zeros(2))
