"""size / aspect_ratio / resolution -> (width, height): the seed page's rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.media.sizing import (
    DEFAULT_MAX_PIXELS,
    MAX_SIDE,
    WORK_FACTOR,
    SizeTable,
    check_work,
    parse_pixels,
    parse_ratio,
    resolve_size,
    tier_megapixels,
)

QWEN_1K = {
    "1:1": (1024, 1024),
    "4:3": (1183, 887),
    "3:4": (887, 1182),
    "2:3": (836, 1254),
    "3:2": (1254, 836),
    "9:16": (768, 1365),
    "16:9": (1365, 768),
}


@pytest.fixture
def qwen() -> SizeTable:
    return SizeTable(tiers={"1K": dict(QWEN_1K)}, default=(1024, 1024))


def multi_tier(default=(1024, 1024)) -> SizeTable:
    return SizeTable(
        tiers={
            "0.5K": {"1:1": (512, 512), "16:9": (683, 384)},
            "1K": {"1:1": (1024, 1024), "16:9": (1365, 768)},
            "2K": {"1:1": (2048, 2048), "16:9": (2730, 1536)},
            "4K": {"1:1": (4096, 4096), "16:9": (5461, 3072)},
        },
        default=default,
    )


# --- size "WxH" -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ("1024x1024", (1024, 1024)),
        ("1920x1080", (1920, 1080)),  # not in the table: exact pixels anyway
        ("1000X700", (1000, 700)),
        ("640*480", (640, 480)),
        (" 512 x 256 ", (512, 256)),
        ("1x1", (1, 1)),
        (f"{MAX_SIDE}x1186", (MAX_SIDE, 1186)),  # 16.77 MP: just within the default pixel limit
        ("4096x4096", (4096, 4096)),
    ],
)
def test_wxh_is_exact(qwen, size, expected):
    assert resolve_size(qwen, size) == expected


def test_the_largest_sides_need_a_table_that_allows_their_pixels():
    table = SizeTable(tiers={"1K": dict(QWEN_1K)}, default=(1024, 1024), max_pixels=MAX_SIDE * MAX_SIDE)
    assert resolve_size(table, f"{MAX_SIDE}x{MAX_SIDE}") == (MAX_SIDE, MAX_SIDE)


def test_wxh_wins_over_aspect_ratio_and_resolution():
    table = multi_tier()
    assert resolve_size(table, "800x600", aspect_ratio="16:9", resolution="4K") == (800, 600)


# --- size "W:H", auto, nothing --------------------------------------------------------------------


@pytest.mark.parametrize("ratio", list(QWEN_1K))
def test_ratio_in_size_equals_aspect_ratio(qwen, ratio):
    assert resolve_size(qwen, ratio) == QWEN_1K[ratio]
    assert resolve_size(qwen, ratio) == resolve_size(qwen, None, aspect_ratio=ratio)


def test_ratio_in_size_overrides_aspect_ratio_and_combines_with_resolution():
    table = multi_tier()
    assert resolve_size(table, "16:9", aspect_ratio="1:1") == (1365, 768)
    assert resolve_size(table, "16:9", resolution="2K") == (2730, 1536)


@pytest.mark.parametrize("size", [None, "auto", "AUTO", " auto ", ""])
def test_auto_or_nothing_is_the_default(qwen, size):
    assert resolve_size(qwen, size) == (1024, 1024)


def test_auto_size_still_honours_aspect_ratio(qwen):
    assert resolve_size(qwen, "auto", aspect_ratio="16:9") == (1365, 768)


def test_default_that_is_not_in_the_table_is_returned_as_is():
    table = SizeTable(tiers={"1K": dict(QWEN_1K)}, default=(1000, 1000))
    assert resolve_size(table) == (1000, 1000)
    # with a resolution alone, the nearest table entry to the default's shape is used
    assert resolve_size(table, resolution="1K") == (1024, 1024)


# --- the qwen-image 1K table -----------------------------------------------------------------------


@pytest.mark.parametrize("ratio, expected", list(QWEN_1K.items()))
def test_qwen_1k_table(qwen, ratio, expected):
    assert resolve_size(qwen, aspect_ratio=ratio) == expected
    assert resolve_size(qwen, aspect_ratio=ratio, resolution="1K") == expected


# --- nearest ratio on a log scale ------------------------------------------------------------------


def test_seven_to_one_with_four_and_eight_to_one_gives_eight_to_one():
    # Linear distance would pick 8:1 too, but 6:1 tells the log scale apart: |6-4| = |6-8|,
    # while on a log scale 6:1 is nearer to 8:1 (log 8/6 = 0.29 < log 6/4 = 0.41).
    table = SizeTable(tiers={"1K": {"4:1": (2048, 512), "8:1": (2896, 362)}}, default=(2048, 512))
    assert resolve_size(table, aspect_ratio="7:1") == (2896, 362)
    assert resolve_size(table, aspect_ratio="6:1") == (2896, 362)
    assert resolve_size(table, aspect_ratio="5:1") == (2048, 512)


def test_log_scale_is_symmetric_for_portrait_and_landscape():
    # 1:2 and 2:1 around 1:1: on a log scale 1:1.9 is as near to 1:2 as 1.9:1 is to 2:1.
    table = SizeTable(tiers={"1K": {"1:2": (512, 1024), "1:1": (768, 768), "2:1": (1024, 512)}},
                      default=(768, 768))
    assert resolve_size(table, aspect_ratio="1.9:1") == (1024, 512)
    assert resolve_size(table, aspect_ratio="1:1.9") == (512, 1024)
    # log: 1:1.45 -> 1:2 (log 2/1.45 = 0.32 < log 1.45 = 0.37); 1:1.35 -> 1:1 (0.30 < 0.39).
    # A linear scale on w/h would send 1:1.35 (0.74) to 1:2 (0.5) instead of 1:1.
    assert resolve_size(table, aspect_ratio="1:1.45") == (512, 1024)
    assert resolve_size(table, aspect_ratio="1:1.35") == (768, 768)


@pytest.mark.parametrize(
    "asked, expected",
    [
        ("21:9", (1365, 768)),  # wider than anything: the widest, 16:9
        ("9:21", (768, 1365)),
        ("5:4", (1183, 887)),  # 4:3, not 1:1
        ("4:5", (887, 1182)),
        ("1.5:1", (1254, 836)),
        ("1920:1080", (1365, 768)),
        ("32:9", (1365, 768)),
        ("10:10", (1024, 1024)),
    ],
)
def test_any_ratio_maps_to_the_nearest_supported(qwen, asked, expected):
    assert resolve_size(qwen, aspect_ratio=asked) == expected


# --- resolution tiers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resolution, expected",
    [
        ("0.5K", (512, 512)),
        ("1K", (1024, 1024)),
        ("2K", (2048, 2048)),
        ("4K", (4096, 4096)),
        ("2k", (2048, 2048)),
        ("0.25", (512, 512)),  # megapixels: 0.5K is about 0.26 MP
        ("1", (1024, 1024)),
        ("4", (2048, 2048)),
        ("16", (4096, 4096)),
        ("3K", (4096, 4096)),  # 9.4 MP: nearer 4K (16.8) than 2K (4.2) on a log scale
        ("3", (2048, 2048)),  # 3 MP: nearer 2K (4.2) than 1K (1.05)
        ("8K", (4096, 4096)),  # above the top tier
        ("0.1", (512, 512)),  # below the bottom tier
    ],
)
def test_resolution_alone_picks_the_nearest_tier_and_keeps_the_default_shape(resolution, expected):
    assert resolve_size(multi_tier(), resolution=resolution) == expected


def test_resolution_alone_keeps_a_non_square_default_shape():
    table = multi_tier(default=(1365, 768))
    assert resolve_size(table) == (1365, 768)
    assert resolve_size(table, resolution="2K") == (2730, 1536)
    assert resolve_size(table, resolution="0.5K") == (683, 384)


def test_resolution_with_aspect_ratio_controls_both():
    table = multi_tier()
    assert resolve_size(table, aspect_ratio="16:9", resolution="4K") == (5461, 3072)
    assert resolve_size(table, aspect_ratio="21:9", resolution="0.5K") == (683, 384)
    assert resolve_size(table, aspect_ratio="16:9") == (1365, 768)  # default tier


def test_resolution_on_a_tier_without_the_default_ratio_uses_the_nearest_ratio():
    table = SizeTable(
        tiers={"1K": {"1:1": (1024, 1024)}, "2K": {"4:3": (2364, 1773), "16:9": (2730, 1536)}},
        default=(1024, 1024),
    )
    assert resolve_size(table, resolution="2K") == (2364, 1773)


def test_megapixel_tier_labels_in_the_table():
    table = SizeTable(
        tiers={"0.25": {"1:1": (500, 500)}, "1": {"1:1": (1000, 1000)}, "4": {"1:1": (2000, 2000)}},
        default=(1000, 1000),
    )
    assert resolve_size(table, resolution="0.5K") == (500, 500)
    assert resolve_size(table, resolution="2K") == (2000, 2000)
    assert resolve_size(table, resolution="1") == (1000, 1000)


def test_tier_megapixels():
    assert tier_megapixels("1K") == pytest.approx(1.048576)
    assert tier_megapixels("0.5K") == pytest.approx(0.262144)
    assert tier_megapixels("4K") == pytest.approx(16.777216)
    assert tier_megapixels("0.25") == 0.25
    assert tier_megapixels("2MP") == 2
    for bad in ("0", "0K", "HD", "-1", "", "1KK"):
        with pytest.raises(ValueError):
            tier_megapixels(bad)


def test_parse_ratio():
    assert parse_ratio("16:9") == pytest.approx(16 / 9)
    assert parse_ratio(" 2.35 : 1 ") == pytest.approx(2.35)
    for bad in ("16x9", "0:1", "1:0", "a:b", "16", "-1:2"):
        with pytest.raises(ValueError):
            parse_ratio(bad)


# --- bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["0x100", "100x0", f"{MAX_SIDE + 1}x100", f"100x{MAX_SIDE + 1}", "99999x99999"])
def test_sides_outside_1_to_14142_are_rejected(qwen, size):
    with pytest.raises(InvalidRequest) as e:
        resolve_size(qwen, size)
    assert e.value.param == "size"
    assert e.value.status == 400
    assert "14142" in e.value.message


def test_model_max_side_and_max_pixels():
    table = SizeTable(tiers={"1K": dict(QWEN_1K)}, default=(1024, 1024), max_side=2048, max_pixels=2_000_000)
    assert resolve_size(table, "2048x976") == (2048, 976)
    with pytest.raises(InvalidRequest) as e:
        resolve_size(table, "2049x512")
    assert e.value.param == "size"
    assert "2048" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        resolve_size(table, "2000x1001")  # each side fine, 2,002,000 pixels too many
    assert e.value.param == "size"
    assert "2000000" in e.value.message


# --- work limits: pixels per image without max_pixels, and n x pixels per request -----------------


@pytest.mark.parametrize("size", ["13000x13000", f"{MAX_SIDE}x{MAX_SIDE}", "4097x4096", f"{MAX_SIDE}x1187"])
def test_a_table_without_max_pixels_still_has_a_limit(qwen, size):
    assert qwen.max_pixels is None and qwen.pixel_limit == DEFAULT_MAX_PIXELS == 4096 * 4096
    with pytest.raises(InvalidRequest) as e:
        resolve_size(qwen, size)
    assert e.value.param == "size" and e.value.status == 400
    assert f"Invalid size {size}" in e.value.message and str(DEFAULT_MAX_PIXELS) in e.value.message


def test_check_work_caps_n_times_pixels():
    table = SizeTable(tiers={"1K": dict(QWEN_1K)}, default=(1024, 1024), max_pixels=2048 * 2048)
    assert table.total_pixel_limit == WORK_FACTOR * 2048 * 2048
    check_work(table, 2048, 2048, WORK_FACTOR)  # exactly at the cap
    check_work(table, 1024, 1024, 10)
    with pytest.raises(InvalidRequest) as e:
        check_work(table, 2048, 2048, WORK_FACTOR + 1)
    assert e.value.param == "n" and e.value.status == 400
    assert "at most 4 at this size" in e.value.message and str(table.total_pixel_limit) in e.value.message
    with pytest.raises(InvalidRequest) as e:
        check_work(table, 13000, 13000, 4)  # one image alone is too large: the size is at fault
    assert e.value.param == "size"


def test_check_work_uses_an_explicit_request_cap():
    table = SizeTable(tiers={"1K": dict(QWEN_1K)}, default=(1024, 1024), max_pixels=1024 * 1024,
                      max_total_pixels=3 * 1024 * 1024)
    check_work(table, 1024, 1024, 3)
    with pytest.raises(InvalidRequest) as e:
        check_work(table, 1024, 1024, 4)
    assert e.value.param == "n"
    with pytest.raises(ValueError, match="at least max_pixels"):
        SizeTable(tiers={"1K": dict(QWEN_1K)}, default=(1024, 1024), max_pixels=1024 * 1024,
                  max_total_pixels=1000)


def test_check_work_catches_a_table_entry_above_the_limit():
    # resolve_size returns table entries as they are; check_work still holds the line.
    table = SizeTable(tiers={"4K": {"1:1": (4096, 4096)}}, default=(4096, 4096), max_pixels=2048 * 2048)
    size = resolve_size(table, aspect_ratio="1:1")
    with pytest.raises(InvalidRequest) as e:
        check_work(table, *size, 1)
    assert e.value.param == "size"


def test_the_shipped_tables_have_limits_that_fit_their_sizes():
    from proxy.config import load_config

    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "models.yaml", env={})
    # The built-in tables the shipped models use (models.yaml keeps no copies of them).
    tables = {config.size_table_choice(m)["name"]: config.size_table(m) for m in config.models}
    assert set(tables) == {"qwen-image", "qwen-image-dashscope", "tiny"}
    assert tables["qwen-image"].pixel_limit == 2048 * 2048  # Qwen-Image: native ~1.8 MP, up to ~4 MP
    assert tables["tiny"].pixel_limit == 256 * 256
    for name, table in tables.items():
        for ratios in table.tiers.values():
            for width, height in ratios.values():
                check_work(table, width, height, 1)
        check_work(table, *table.default, 1)
        with pytest.raises(InvalidRequest):
            resolve_size(table, "13000x13000")
        assert table.total_pixel_limit >= 4 * table.pixel_limit, name


# --- malformed values ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["big", "1024", "1024x", "x1024", "1024x-5", "16:0", "0:9", "16/9", "1e3x1e3"])
def test_malformed_size(qwen, size):
    with pytest.raises(InvalidRequest) as e:
        resolve_size(qwen, size)
    assert e.value.param == "size"


@pytest.mark.parametrize("ratio", ["wide", "16x9", "0:1", "1:0", "16", ""])
def test_malformed_aspect_ratio(qwen, ratio):
    with pytest.raises(InvalidRequest) as e:
        resolve_size(qwen, aspect_ratio=ratio)
    assert e.value.param == "aspect_ratio"


@pytest.mark.parametrize("resolution", ["huge", "0K", "0", "-1K", "4 K K", ""])
def test_malformed_resolution(qwen, resolution):
    with pytest.raises(InvalidRequest) as e:
        resolve_size(qwen, resolution=resolution)
    assert e.value.param == "resolution"


def test_malformed_resolution_is_reported_even_with_a_ratio_size(qwen):
    with pytest.raises(InvalidRequest) as e:
        resolve_size(qwen, "16:9", resolution="huge")
    assert e.value.param == "resolution"


# --- the table itself ------------------------------------------------------------------------------


def test_size_table_rejects_empty_or_bad_labels():
    with pytest.raises(ValueError):
        SizeTable(tiers={}, default=(1024, 1024))
    with pytest.raises(ValueError):
        SizeTable(tiers={"1K": {}}, default=(1024, 1024))
    with pytest.raises(ValueError):
        SizeTable(tiers={"1K": {"wide": (1365, 768)}}, default=(1365, 768))
    with pytest.raises(ValueError):
        SizeTable(tiers={"huge": {"1:1": (1024, 1024)}}, default=(1024, 1024))


def test_size_table_default_names_its_tier_and_ratio():
    table = multi_tier(default=(2730, 1536))
    assert (table.default_tier, table.default_ratio) == ("2K", "16:9")


def test_absurd_aspect_ratio_is_rejected(qwen):
    with pytest.raises(InvalidRequest) as e:
        resolve_size(qwen, aspect_ratio="9" * 400 + ":1")
    assert e.value.param == "aspect_ratio"


def _pixels_by_regex(text: str) -> tuple[int, int] | None:
    m = re.match(r"^\s*(\d+)\s*[xX×*]\s*(\d+)\s*$", text)
    return None if not m or max(len(m.group(1)), len(m.group(2))) > 9 else (int(m.group(1)), int(m.group(2)))


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(["1", "0", "64", "٦", "²", "x", "X", "×", "*", " ", "\\n", "-", "+", ".", "a", ":",
                                 "1234567890"]), max_size=8).map("".join))
@example("64x64")
@example("٦٤x٦٤")
@example("123456789x1")
@example("1234567890x1")
@example("²x1")
def test_parse_pixels_reads_what_its_pattern_reads(text):
    assert parse_pixels(text) == _pixels_by_regex(text)
