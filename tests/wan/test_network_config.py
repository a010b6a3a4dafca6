"""``network.emulate``: off by default, a bad cluster file is refused before any rank starts."""

import pytest

from integration.config import BAD_INPUT, compose_and_check

GOOD = "nodes: [{region: a}, {region: b}, {region: a}, {region: b}]\n" \
       "links: [{a: a, b: b, latency_ms: 30, bandwidth_GiB_per_s: 0.01}]\n"


def _compose(tmp_path, monkeypatch, *overrides):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    return compose_and_check([f"output_root={tmp_path}/out", f"data.cache_dir={tmp_path}/cache", *overrides])


def test_off_by_default_and_a_good_file_accepted(tmp_path, monkeypatch):
    assert _compose(tmp_path, monkeypatch)[1].job.network.emulate is None
    f = tmp_path / "net.yaml"
    f.write_text(GOOD)
    assert _compose(tmp_path, monkeypatch, f"network.emulate={f}")[1].job.network.emulate == str(f)


@pytest.mark.parametrize("text", [None, "nodes: [{region: a}, {region: b}]\n",
                                  "nodes: [{region: a}, {region: b}]\ncost_s: [[0, 1], [1, 0]]\n"])
def test_bad_emulation_file_refused(text, tmp_path, monkeypatch):
    f = tmp_path / "net.yaml"
    if text is not None:
        f.write_text(text)
    with pytest.raises(BAD_INPUT) as info:
        _compose(tmp_path, monkeypatch, f"network.emulate={f}")
    assert str(info.value).startswith("network.emulate: "), str(info.value)
