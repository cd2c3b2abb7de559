"""Settings: every field is classified, the key part is derived from the marks, options are validated."""

from __future__ import annotations

import dataclasses

import pytest

import torch_trt_module as ttm
from torch_trt_module._core.settings import Settings, SettingsError, normalize_targets


def test_every_field_is_marked_engine_or_runtime() -> None:
    for f in dataclasses.fields(Settings):
        assert f.metadata.get("engine") in (True, False), f"Settings.{f.name} is not classified"


def test_engine_fields_follow_the_marks() -> None:
    marked = {f.name for f in dataclasses.fields(Settings) if f.metadata["engine"]}
    assert set(Settings().engine_fields()) == marked
    assert "precision" in marked and "cache_dir" not in marked and "device" not in marked


@pytest.mark.parametrize("field,value", [("precision", "fp16"), ("optimization_level", 3), ("workspace", 1 << 20),
                                         ("tf32", False), ("max_batch", 64), ("targets", ("sm86",))])
def test_each_engine_setting_changes_the_key_part(field: str, value: object) -> None:
    assert Settings().engine_fields() != Settings(**{field: value}).engine_fields()


def test_runtime_settings_do_not_change_the_key_part() -> None:
    assert Settings().engine_fields() == Settings(verify=False, cache_dir="/x", cast_inputs=True).engine_fields()


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(SettingsError, match=r"unknown option\(s\) \['precison'\]; compile\(\) accepts: .*precision"):
        Settings.from_options(precison="fp16")


def test_bad_values_say_what_was_expected() -> None:
    with pytest.raises(SettingsError, match="option 'precision' got 'int8'; expected one of 'fp32', 'fp16', 'bf16'"):
        Settings.from_options(precision="int8")
    with pytest.raises(SettingsError, match=r"input 'x' dim 0: got \(min, opt, max\) = \(4, 2, 8\)"):
        Settings.from_options(dynamic={"x": {0: (4, 2, 8)}})
    with pytest.raises(ttm.TorchTRTError):
        Settings.from_options(dynamic="time")


def test_dynamic_dict_is_frozen_and_round_trips() -> None:
    s = Settings.from_options(dynamic={"x": {0: (1, 4, 8)}, "a": {1: [2, 3, 4]}})
    hash(s)
    assert s.dynamic_dict() == {"a": {1: (2, 3, 4)}, "x": {0: (1, 4, 8)}}


def test_targets_are_normalised() -> None:
    assert normalize_targets(["SM89", "8.6", "sm86"]) == ("sm86", "sm89")
    with pytest.raises(SettingsError, match="expected compute capabilities like 'sm86'"):
        normalize_targets(["ampere"])
