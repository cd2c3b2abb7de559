"""Optional authenticity (issue 24): with $TORCH_TRT_MODULE_CACHE_KEY set, saved modules, engine files,
cache entries and index records are signed (HMAC-SHA256 over the container's content), and what is
unsigned or signed with another key is refused: ttm.load raises EngineLoadError, a cache entry is a
miss that is rebuilt, with a WARNING. Without a key nothing changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import Engine, EngineLoadError
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._cache.cache import EngineCache
from torch_trt_module._core.io import pack, unpack

from harness.faults import capture_warnings, compile_tiny, outputs_ok

KEY_ENV = "TORCH_TRT_MODULE_CACHE_KEY"


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def test_a_container_is_signed_only_with_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = pack("k", {}, {"a": b"1"})
    assert unpack(plain, kind="k")[1] == {"a": b"1"}
    monkeypatch.setenv(KEY_ENV, "one")
    signed = pack("k", {}, {"a": b"1"})
    assert b'"hmac":' in signed and unpack(signed, kind="k")[1] == {"a": b"1"}
    with pytest.raises(EngineLoadError, match=r"^f is unsigned, and \$TORCH_TRT_MODULE_CACHE_KEY is set") as info:
        unpack(plain, kind="k", source="f")
    assert "unset $TORCH_TRT_MODULE_CACHE_KEY to accept unsigned files" in str(info.value)
    monkeypatch.setenv(KEY_ENV, "two")
    with pytest.raises(EngineLoadError, match="f is signed with another key than"):
        unpack(signed, kind="k", source="f")
    monkeypatch.delenv(KEY_ENV)
    assert unpack(signed, kind="k")[1] == {"a": b"1"}  # no key: nothing is checked


def test_a_saved_module_with_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = compile_tiny(0, tmp_path / "cache")
    ttm.save(module, tmp_path / "plain.pt")
    monkeypatch.setenv(KEY_ENV, "one")
    ttm.save(module, tmp_path / "signed.pt")
    assert outputs_ok(ttm.load(tmp_path / "signed.pt"), 0)
    with pytest.raises(EngineLoadError, match=r"plain.pt is unsigned, and \$TORCH_TRT_MODULE_CACHE_KEY is set"):
        ttm.load(tmp_path / "plain.pt")
    module.engine.save(tmp_path / "e.ttm")
    assert Engine.load(tmp_path / "e.ttm").onnx == module.engine.onnx
    monkeypatch.setenv(KEY_ENV, "two")
    with pytest.raises(EngineLoadError, match="signed.pt is signed with another key"):
        ttm.load(tmp_path / "signed.pt")
    with pytest.raises(EngineLoadError, match="e.ttm is signed with another key"):
        Engine.load(tmp_path / "e.ttm")


def test_a_saved_segmented_module_with_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests._support import require_rtx
    from tests.partition.test_split import NonZeroBetween

    require_rtx()
    monkeypatch.setenv(KEY_ENV, "one")
    model = NonZeroBetween().eval()
    split = ttm.compile(model, torch.randn(4, 8), cache=False)
    assert isinstance(split, ttm.SegmentedModule)
    ttm.save(split, tmp_path / "split.pt")
    loaded = ttm.load(tmp_path / "split.pt")
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=1e-4, atol=1e-5)
    state = torch.load(tmp_path / "split.pt", weights_only=True)
    meta = json.loads(state["meta"])
    meta["segments"][0]["why"] = "edited"  # an edit the checksums inside cannot see
    torch.save({**state, "meta": json.dumps(meta)}, tmp_path / "edited.pt")
    with pytest.raises(EngineLoadError, match="edited.pt is signed with another key than .*, or was changed"):
        ttm.load(tmp_path / "edited.pt")
    torch.save({k: v for k, v in state.items() if k != "signature"}, tmp_path / "unsigned.pt")
    with pytest.raises(EngineLoadError, match="unsigned.pt is unsigned"):
        ttm.load(tmp_path / "unsigned.pt")


def test_cache_entries_with_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    compile_tiny(0, root)  # unsigned
    builds = _compile.STATS["builds"]
    monkeypatch.setenv(KEY_ENV, "one")
    with capture_warnings() as warned:
        module = compile_tiny(0, root)
    assert outputs_ok(module, 0) and _compile.STATS["builds"] == builds + 1  # a miss, rebuilt
    assert any("is unusable (the entry is unsigned, and $TORCH_TRT_MODULE_CACHE_KEY is set" in w for w in warned)
    with capture_warnings() as warned:
        compile_tiny(0, root)
    assert warned == [] and _compile.STATS["builds"] == builds + 1  # the signed entry is a hit
    record = next((root / "index").glob("*.json"))
    assert '"hmac":' in record.read_text()
    # Someone with write access but not the key re-points the entry's metadata: refused.
    (info,) = EngineCache(root).entries()
    meta_path = root / "entries" / f"{info.key}.json"
    monkeypatch.setenv(KEY_ENV, "two")
    with capture_warnings() as warned:
        assert EngineCache(root).get(info.key) is None
    assert any("signed with another key" in w for w in warned)
    assert not meta_path.exists()  # evicted: the next compile rebuilds it


def test_an_index_record_without_a_valid_signature_is_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "one")
    cache = EngineCache(tmp_path / "cache")
    assert cache.record("f" * 64, "a" * 64) and cache.lookup("f" * 64) == "a" * 64
    path = tmp_path / "cache" / "index" / f"{'f' * 64}.json"
    rec = json.loads(path.read_text())
    rec["key"] = "b" * 64  # points the fingerprint at another model's entry
    path.write_text(json.dumps(rec))
    with capture_warnings() as warned:
        assert cache.lookup("f" * 64) is None
    assert len(warned) == 1 and "index record ffffffffffffffff is signed with another key" in warned[0]
