"""The cache folder: $EETQ_LORA_CACHE, else $XDG_CACHE_HOME/eetq_lora, else ~/.cache/eetq_lora."""

from eetq_lora.cache import cache_dir


def test_cache_dir_prefers_eetq_lora_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("EETQ_LORA_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("EETQ_LORA_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "eetq_lora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "eetq_lora"
