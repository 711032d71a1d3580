import numpy as np
import pytest

from mmtag.data.csv_io import Record
from mmtag.data.labels import LabelMap, UnknownLabelError, read_label_names


def _rec(labels):
    return Record("0.jpg", tuple(labels), "", 2)


def test_integer_labels_keep_numeric_order_and_round_trip():
    lm = LabelMap.from_records([_rec([8, 3, 13]), _rec([1]), _rec([19, 1])])
    assert lm.labels == ("1", "3", "8", "13", "19")  # 13 after 8: numeric, not text order
    assert lm.integer
    vec = lm.encode((8, 3, 13))
    np.testing.assert_array_equal(vec, [0, 1, 1, 1, 0])
    assert vec.dtype == np.float32
    assert lm.encode(("8", "3", "13")).tolist() == vec.tolist()  # the id as text is the same label
    assert lm.decode(vec) == ("3", "8", "13")
    assert LabelMap.from_dict(lm.to_dict()) == lm


def test_string_labels_are_labels():
    rows = [Record("a/1.jpg", ("running shoes", "red"), "", 2),
            Record("b/1.jpg", ("dress", "red", "3"), "", 3)]
    lm = LabelMap.from_records(rows)
    assert lm.labels == ("3", "dress", "red", "running shoes") and not lm.integer
    assert lm.decode(lm.encode(("running shoes", "3"))) == ("3", "running shoes")
    with pytest.raises(UnknownLabelError, match="label blue"):
        lm.encode(("blue",))


def test_an_old_runs_integer_label_list_loads_in_its_unit_order():
    # labels.json / best.pt of a run saved when labels were integers
    old = LabelMap.from_dict({"labels": [1, 2, 3, 10, 19]})
    assert old.labels == ("1", "2", "3", "10", "19") and old.names is None


def test_names_are_shown_and_saved_beside_the_labels(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("# id name\n1 person\n3 traffic light\n")
    names = read_label_names(f)
    assert names == {"1": "person", "3": "traffic light"}
    lm = LabelMap.from_records([_rec([1, 3, 5])], names)
    assert lm.display == ("person", "traffic light", "5")  # a label without a name: itself
    assert LabelMap.from_dict(lm.to_dict()) == lm
    f.write_text("person\n")
    with pytest.raises(ValueError, match="line 1"):
        read_label_names(f)


def test_unknown_label_names_the_sample():
    lm = LabelMap((1, 2, 3))
    with pytest.raises(UnknownLabelError, match=r"label 12 \(train.csv line 7\).*known labels"):
        lm.encode((1, 12), where="train.csv line 7")


def test_bad_label_maps_are_refused():
    with pytest.raises(ValueError, match="natural order"):
        LabelMap((3, 1))
    with pytest.raises(ValueError, match="natural order"):
        LabelMap(("b", "a"))
    with pytest.raises(ValueError, match="at least one"):
        LabelMap.from_records([_rec([])])
    with pytest.raises(ValueError, match="vector of 3"):
        LabelMap((1, 2, 3)).decode([1, 0])
    with pytest.raises(ValueError, match="2 names for 3 labels"):
        LabelMap((1, 2, 3), ("a", "b"))
