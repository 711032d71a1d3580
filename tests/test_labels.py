import numpy as np
import pytest

from mmtag.data.csv_io import Record
from mmtag.data.labels import LabelMap, UnknownLabelError


def _rec(labels):
    return Record("0.jpg", tuple(labels), "", 2)


def test_label_set_is_sorted_and_round_trips():
    lm = LabelMap.from_records([_rec([8, 3, 13]), _rec([1]), _rec([19, 1])])
    assert lm.labels == (1, 3, 8, 13, 19)
    vec = lm.encode((8, 3, 13))
    np.testing.assert_array_equal(vec, [0, 1, 1, 1, 0])
    assert vec.dtype == np.float32
    assert lm.decode(vec) == (3, 8, 13)
    assert LabelMap.from_dict(lm.to_dict()) == lm


def test_unknown_label_names_the_sample():
    lm = LabelMap((1, 2, 3))
    with pytest.raises(UnknownLabelError, match=r"label 12 \(train.csv line 7\).*known labels"):
        lm.encode((1, 12), where="train.csv line 7")


def test_bad_label_maps_are_refused():
    with pytest.raises(ValueError, match="sorted"):
        LabelMap((3, 1))
    with pytest.raises(ValueError, match="at least one"):
        LabelMap.from_records([_rec([])])
    with pytest.raises(ValueError, match="vector of 3"):
        LabelMap((1, 2, 3)).decode([1, 0])
