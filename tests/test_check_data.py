"""Tests for ``mmtag.data.check`` (the ``mmtag check-data`` report), all on CPU and fast."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from mmtag.data.check import DataLayoutError, check_data, format_report

TRAIN_HEADER = "ImageID,Labels,Caption\n"
TEST_HEADER = "ImageID,Caption\n"


def _write_jpeg(path: Path, size: tuple[int, int] = (32, 24), colour=(200, 30, 30)) -> None:
    Image.new("RGB", size, colour).save(path, "JPEG", quality=90)


def _make_folder(
    root: Path,
    train_rows: list[str],
    test_rows: list[str] | None,
    images: dict[str, tuple[int, int]],
) -> Path:
    """Write a Kaggle-layout folder: CSV rows as given (without the header) and JPEGs."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(TRAIN_HEADER + "".join(r + "\n" for r in train_rows))
    if test_rows is not None:
        (root / "test.csv").write_text(TEST_HEADER + "".join(r + "\n" for r in test_rows))
    (root / "data").mkdir(exist_ok=True)
    for name, size in images.items():
        _write_jpeg(root / "data" / name, size)
    return root


@pytest.fixture
def clean_dir(tmp_path: Path) -> Path:
    # 4 train rows: labels {1: 3 images, 2: 2, 5: 1}; 6 occurrences; labels per image 1,2,2,1.
    train = [
        '0.jpg,1,"A man on a horse."',
        '1.jpg,1 2,"Two people riding bicycles down the road today."',
        '2.jpg,2 1,"A bike."',
        '3.jpg,5,"An airplane in the sky."',
    ]
    test = ['10.jpg,"A cat."', '11.jpg,"A dog on a bench."']
    images = {f"{i}.jpg": (40 + i, 30 + i) for i in (0, 1, 2, 3, 10, 11)}
    return _make_folder(tmp_path / "clean", train, test, images)


def test_clean_folder_is_ok_with_correct_counts(clean_dir: Path) -> None:
    report = check_data(clean_dir, workers=1, progress=False)

    assert report["ok"] is True, report["problems"]
    assert report["problems"] == []
    assert report["rows"] == {"train": 4, "test": 2}
    assert report["paths"]["images_dir"] == str(clean_dir / "data")

    labels = report["labels"]
    assert labels["set"] == [1, 2, 5]
    assert labels["occurrences"] == 6
    freq = {f["label"]: f for f in labels["frequency"]}
    assert freq[1]["images"] == 3
    assert freq[1]["pct_images"] == pytest.approx(75.0)
    assert freq[1]["pct_occurrences"] == pytest.approx(50.0)
    assert freq[5]["images"] == 1
    assert freq[5]["pct_occurrences"] == pytest.approx(100 / 6, abs=1e-3)
    assert labels["per_image"] == {"histogram": {"1": 2, "2": 2}, "mean": 1.5, "min": 1, "max": 2}

    # Train captions have 5, 8, 2 and 5 words.
    cap = report["captions"]["train"]
    assert (cap["min"], cap["max"], cap["median"]) == (2, 8, 5)
    assert cap["mean"] == pytest.approx(5.0)
    assert report["captions"]["test"]["max"] == 5

    img = report["images"]
    assert img["decoded"] == 6
    assert img["missing_train"]["count"] == 0
    assert img["unreadable"]["count"] == 0
    assert img["test_without_image"]["count"] == 0
    assert img["size"]["min_width"] == 40 and img["size"]["max_width"] == 51
    assert img["size"]["min_height"] == 30 and img["size"]["max_height"] == 41
    assert img["limited"] is False

    # The CLI prints json.dumps(report): it must serialise and survive the round trip unchanged.
    assert json.loads(json.dumps(report)) == report


def test_missing_and_corrupt_images_are_reported_with_line_and_id(tmp_path: Path) -> None:
    train = [
        '0.jpg,1,"fine"',
        '1.jpg,2,"the image file is not there"',
        '2.jpg,1 3,"a caption over\ntwo lines"',  # row starts on line 4, 3.jpg on line 6
        '3.jpg,3,"garbage bytes"',
        '4.jpg,1,"fine too"',
    ]
    test = ['20.jpg,"truncated test image"', '21.jpg,"fine"']
    root = _make_folder(
        tmp_path / "bad", train, test, {"0.jpg": (64, 48), "4.jpg": (64, 48), "21.jpg": (8, 8)}
    )
    data = root / "data"
    (data / "2.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    # JPEG magic bytes followed by garbage: looks like a JPEG by name and signature only.
    (data / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    # A real JPEG cut in half: the header parses, so only a full decode finds it.
    Image.effect_noise((256, 256), 64).convert("RGB").save(data / "full.jpg", quality=95)
    blob = (data / "full.jpg").read_bytes()
    (data / "20.jpg").write_bytes(blob[: len(blob) // 2])
    (data / "full.jpg").unlink()
    _write_jpeg(data / "stray.jpg")

    report = check_data(root, workers=2, progress=False)

    assert report["ok"] is False
    img = report["images"]
    assert img["missing_train"]["items"] == [{"csv": "train.csv", "line": 3, "image_id": "1.jpg"}]
    bad = {(i["csv"], i["line"], i["image_id"]) for i in img["unreadable"]["items"]}
    assert bad == {("train.csv", 4, "2.jpg"), ("train.csv", 6, "3.jpg"), ("test.csv", 2, "20.jpg")}
    assert all(i["error"] for i in img["unreadable"]["items"])
    assert img["decoded"] == 6
    assert img["unreferenced"] == {"count": 1, "first": ["stray.jpg"]}
    assert len(report["problems"]) == 2  # missing train image, undecodable images

    text = format_report(report)
    assert "FAILED" in text
    assert "train.csv line 3: 1.jpg" in text
    assert "test.csv line 2: 20.jpg" in text
    assert "missing train images: 1" in text


def test_truncated_jpeg_fails_even_if_caller_allows_truncated_images(tmp_path: Path) -> None:
    """A process-wide LOAD_TRUNCATED_IMAGES=True must not hide a truncated file, nor be lost."""
    root = _make_folder(tmp_path / "t", ['0.jpg,1,"x"'], None, {})
    Image.effect_noise((128, 128), 64).convert("RGB").save(root / "data" / "full.jpg")
    blob = (root / "data" / "full.jpg").read_bytes()
    (root / "data" / "0.jpg").write_bytes(blob[: len(blob) // 2])

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        for workers in (1, 2):
            report = check_data(root, workers=workers, progress=False)
            assert report["images"]["unreadable"]["count"] == 1, workers
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def test_test_rows_without_image_are_a_warning_unless_strict(clean_dir: Path) -> None:
    (clean_dir / "data" / "11.jpg").unlink()

    report = check_data(clean_dir, workers=1, progress=False)
    assert report["ok"] is True
    twi = report["images"]["test_without_image"]
    assert twi["count"] == 1
    assert twi["items"] == [{"csv": "test.csv", "line": 3, "image_id": "11.jpg"}]
    warning = report["warnings"][0]
    assert "1 test row(s) without a photo" in warning and "--caption-only-missing" in warning
    text = format_report(report)
    assert "test rows without an image: 1" in text and "WARNINGS:" in text
    assert "usable for training, with 1 warning(s)" in text and "OK, no problem" not in text

    strict = check_data(clean_dir, workers=1, progress=False, strict_test=True)
    assert strict["ok"] is False


def test_empty_labels_and_duplicate_ids_are_problems(tmp_path: Path) -> None:
    # csv_io rejects an ImageID repeated within one file; across train and test it is our job.
    train = ['0.jpg,1,"a"', '1.jpg,,"no labels"']
    test = ['0.jpg,"the train image again"']
    root = _make_folder(tmp_path / "d", train, test, {"0.jpg": (8, 8), "1.jpg": (8, 8)})

    report = check_data(root, workers=1, progress=False)
    assert report["ok"] is False
    assert report["rows_with_empty_labels"]["items"] == [
        {"csv": "train.csv", "line": 3, "image_id": "1.jpg"}
    ]
    assert report["duplicate_image_ids"]["items"] == [
        {
            "image_id": "0.jpg",
            "rows": [{"csv": "train.csv", "line": 2}, {"csv": "test.csv", "line": 2}],
        }
    ]
    assert len(report["problems"]) == 2
    assert report["images"]["decoded"] == 2  # the shared image is decoded once


def test_no_test_csv_is_fine(clean_dir: Path) -> None:
    (clean_dir / "test.csv").unlink()
    report = check_data(clean_dir, workers=1, progress=False)
    assert report["ok"] is True
    assert report["rows"]["test"] is None
    assert report["captions"]["test"] is None
    assert report["paths"]["test_csv"] is None
    # The two test images are now unreferenced: informative only.
    assert report["images"]["unreferenced"] == {"count": 2, "first": ["10.jpg", "11.jpg"]}
    assert "test.csv  : (absent)" in format_report(report)


def test_missing_train_csv_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(DataLayoutError, match="train.csv") as info:
        check_data(tmp_path, progress=False)
    assert str(tmp_path / "train.csv") in str(info.value)
    assert "Kaggle layout" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_images_dir_override_and_limit(clean_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    (clean_dir / "data").rename(moved)

    report = check_data(clean_dir, workers=1, progress=False, images_dir=moved, limit=2)
    assert report["paths"]["images_dir"] == str(moved)
    assert report["images"]["decoded"] == 2
    assert report["images"]["limited"] is True
    assert report["ok"] is True
    assert "limited to 2" in format_report(report)


def test_format_report_contains_key_numbers(clean_dir: Path) -> None:
    text = format_report(check_data(clean_dir, workers=1, progress=False))
    for expected in ("4 rows", "2 rows", "75.00%", "50.00%", "mean 1.5", "OK, no problem found"):
        assert expected in text, expected
    assert "width 40..51" in text


def _real_folder() -> Path:
    env = os.environ.get("MMTAG_COMP5329_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "comp5329"


def test_real_comp5329_folder_subset() -> None:
    root = _real_folder()
    if not (root / "train.csv").is_file():
        pytest.skip(f"COMP5329 data not found at {root} (set MMTAG_COMP5329_DIR to point at it)")

    report = check_data(root, progress=False, limit=200)

    assert report["ok"] is True, report["problems"]
    assert report["rows"]["train"] == 20_000
    assert report["labels"]["count"] == 18
    assert report["labels"]["set"] == [*range(1, 12), *range(13, 20)]
    label1 = next(f for f in report["labels"]["frequency"] if f["label"] == 1)
    assert label1["pct_images"] == pytest.approx(76, abs=1.0)
    assert report["images"]["missing_train"]["count"] == 0
    assert report["images"]["decoded"] == 200
    assert report["images"]["limited"] is True
    if report["rows"]["test"] is not None:
        assert report["rows"]["test"] == 10_000


def test_problems_and_notes_keep_their_order(tmp_path: Path) -> None:
    """Every kind of finding at once: the report lists them in a fixed order (rows, then image
    presence, then decoding), which the text report and anyone diffing reports rely on."""
    train = ['0.jpg,1,"a"', '1.jpg,,"no labels"', '2.jpg,1 1,""', '3.jpg,1,"missing image"']
    test = ['0.jpg,"train image again"', '9.jpg,"no image"']
    root = _make_folder(tmp_path / "all", train, test, {"0.jpg": (8, 8), "1.jpg": (8, 8)})
    (root / "data" / "2.jpg").write_bytes(b"not an image")
    _write_jpeg(root / "data" / "stray.jpg")
    data = root / "data"

    report = check_data(root, workers=1, progress=False, strict_test=True, limit=2)
    assert report["problems"] == [
        "1 train row(s) with no labels",
        "1 ImageID(s) used by more than one row",
        "1 train row(s) whose image is missing",
        f"1 test row(s) without a photo in {data}: mmtag predict refuses them, unless "
        f"--caption-only-missing (then they are predicted from the caption alone, and listed)",
    ]
    assert report["notes"] == [
        "1 label(s) on fewer than 5 rows (see the label table): 1",
        "1 train row(s) repeat a label (counted once per image)",
        "1 train row(s) with an empty caption",
        f"1 file(s) in {data} not referenced by any CSV row",
        "image decoding limited to the first 2 of 3 present images; the rest were not checked",
    ]

    report = check_data(root, workers=1, progress=False)
    assert report["problems"][-1] == "1 image(s) that cannot be decoded, used by 1 row(s)"
    assert report["warnings"][0].startswith(f"1 test row(s) without a photo in {data}")
    text = format_report(report)
    order = ["Labels:", "Caption length", "Images:", "missing train images", "unreadable images",
             "test rows without an image", "files not referenced", "train rows with no labels",
             "ImageIDs used by more than one row", "Notes:", "WARNINGS:", "PROBLEMS:",
             "Result: FAILED"]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)
