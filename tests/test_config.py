import pytest
import yaml

from bpo_ray.config import ConfigError, config_from_dict, dump_config, load_config


@pytest.mark.parametrize("name", ["tiny", "llava-1.5-7b"])
def test_named_configs_round_trip(name):
    cfg = load_config(name)
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert cfg.name == name


def test_override_sets_typed_values():
    cfg = load_config("tiny", ["train.beta=0.25", "train.num_workers=[1,3]", "generate.sampler.noise.steps=[100,900]"])
    assert cfg.train.beta == 0.25
    assert cfg.train.num_workers == (1, 3)
    assert cfg.generate.sampler.noise.steps == [100, 900]


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'train.betta' \(did you mean 'train.beta'\?\)"):
        load_config("tiny", ["train.betta=0.2"])


@pytest.mark.parametrize("override,needle", [
    ("train.beta=-1", "'train.beta' = -1"),
    ("train.zero_stage=5", "ZeRO stage 5 does not exist"),
    ("serve.port=70000", "'serve.port' = 70000"),
    ("generate.strategies=[bogus]", "'generate.strategies.0' = 'bogus'"),
])
def test_bad_values_name_key_and_value(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert needle in str(info.value)


def test_malformed_override_and_unknown_config():
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config("tiny", ["train.beta"])
    with pytest.raises(ConfigError, match="named configs: .*tiny"):
        load_config("no-such-config")


def test_demo_overrides_are_valid_and_cover_every_test_image():
    from bpo_ray.demo import DEMO_OVERRIDES

    cfg = load_config("tiny", DEMO_OVERRIDES)
    assert cfg.world.train_partner_rate == 0.9
    assert cfg.generate.sample_items == 1200
    assert cfg.evaluate.max_items is None  # no benchmark is cut to its first N items
    assert cfg.evaluate.pope.n_per_image == 1
