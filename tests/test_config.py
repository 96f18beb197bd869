"""Configuration parsing and validation."""

import pytest

from moecarve import CarveConfig, ConfigError


def test_parse_round_trip():
    cfg = CarveConfig.from_string("s2a2e8")
    assert (cfg.n_shared, cfg.n_active, cfg.n_experts, cfg.n_routed) == (2, 2, 8, 6)
    assert cfg.name == "S2A2E8" and cfg.active_fraction == 0.5
    assert CarveConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad", ["S2A2", "2A2E8", "S2A2E8x", ""])
def test_unparseable(bad):
    with pytest.raises(ConfigError, match="S<shared>A<active>E<experts>"):
        CarveConfig.from_string(bad)


@pytest.mark.parametrize("spec,msg", [("S4A5E8", "exceed"), ("S0A0E8", "n_active"), ("S1A1E0", "n_experts")])
def test_invalid(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        CarveConfig.from_string(spec)


def test_expert_size_must_divide():
    cfg = CarveConfig.from_string("S2A2E7")
    assert CarveConfig.from_string("S2A2E8").expert_size(1536) == 192
    with pytest.raises(ConfigError, match="do not divide the intermediate size 1536"):
        cfg.expert_size(1536)


def test_unknown_method_and_router():
    with pytest.raises(ConfigError, match="unknown method"):
        CarveConfig(method="magic")
    with pytest.raises(ConfigError, match="unknown router"):
        CarveConfig(router="magic")
