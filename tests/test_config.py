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


@pytest.mark.parametrize(
    "spec,msg", [("S4A5E8", "exceed"), ("S0A0E8", "static pruning .* needs N_s >= 1"), ("S1A1E0", "n_experts")]
)
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


def test_static_pruning_and_single_neuron_configs_parse():
    static = CarveConfig.from_string("S2A0E8")
    assert static.static and static.n_routed == 6 and static.active_fraction == 0.25
    fine = CarveConfig.from_string("S128A256E1536")
    assert not fine.static and fine.expert_size(1536) == 1 and fine.active_fraction == 0.25


@pytest.mark.parametrize(
    "inter,m,active,shared,name",
    [(1536, 1, 0.25, 0.0, "S0A384E1536"), (1536, 4, 0.25, 0.0, "S0A96E384"), (1536, 1, 0.25, 1 / 12, "S128A256E1536"),
     (11008, 4, 0.25, 0.0, "S0A688E2752"), (1536, 192, 0.5, 0.25, "S2A2E8")],
)  # fmt: skip
def test_from_granularity(inter, m, active, shared, name):
    cfg = CarveConfig.from_granularity(inter, m, active, shared)
    assert cfg.name == name and cfg.expert_size(inter) == m


@pytest.mark.parametrize("kw,msg", [(dict(expert_size=5), "does not divide"), (dict(active=0.0), "0 < active"),
                                    (dict(active=0.25, shared=0.5), "shared <= active")])  # fmt: skip
def test_from_granularity_rejects(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        CarveConfig.from_granularity(1536, **{"expert_size": 4, "active": 0.25, **kw})


def test_selection_is_validated():
    assert CarveConfig(selection="threshold").selection == "threshold"
    with pytest.raises(ConfigError, match="unknown selection"):
        CarveConfig(selection="magic")
    with pytest.raises(ConfigError, match="shadow router"):
        CarveConfig(selection="threshold", shadow_bits=0)


@pytest.mark.parametrize("spec,bits", [("S0A384E1536", 4), ("S0A767E1536", 4), ("S0A768E1536", 8), ("S2A3E8", 8),
                                       ("S2A2E8", 4), ("S4A0E8", 4)])  # fmt: skip
def test_shadow_bits_default_to_8_from_half_the_routed_experts_active(spec, bits):
    cfg = CarveConfig.from_string(spec)
    assert cfg.shadow_bits == bits
    assert CarveConfig.from_string(spec, shadow_bits=3).shadow_bits == 3  # given: kept
    assert CarveConfig.from_string(spec, shadow_bits=0).shadow_bits == 0  # the probe router
    # written down resolved: a saved config reloads with the bits it was carved with
    assert CarveConfig.from_dict(cfg.to_dict()).shadow_bits == bits
    # every layer of an allocated carve keeps the model's bits, whatever its own share
    alloc = CarveConfig.from_string("S0A4E8", layer_active=(1, 7))
    assert [alloc.for_layer(i).shadow_bits for i in range(2)] == [8, 8]


def test_a_config_written_before_shadow_bits_reads_back_4_bit():
    d = CarveConfig.from_string("S0A4E8").to_dict()
    del d["shadow_bits"]
    assert CarveConfig.from_dict(d).shadow_bits == 4
