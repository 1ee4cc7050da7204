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


#: The demo's settings as bpo_ray/demo.py spelled them before they became configs/demo.yaml.
OLD_DEMO_OVERRIDES = [
    "world.train_partner_rate=0.9",
    "world.base_model.patch_size=16",
    "world.base_model.align_steps=800",
    "generate.sample_items=1200",
    "generate.sampler.noise.steps=[0,800]",
    "train.epochs=1",
    "evaluate.pope.n_per_image=1",
    "evaluate.mmvet.max_items=24",
    "evaluate.llava_bench.max_items=24",
    "evaluate.mmhal.max_items=24",
    "evaluate.objhal.max_items=100",
    "evaluate.amber.max_items=150",
    "evaluate.judge_model=bias-world-annotator",
]


def test_demo_config_is_tiny_with_the_demo_settings():
    """The named config ``demo`` resolves to what the demo ran with when its settings were
    overrides on ``tiny``: the same values, the name included (manifests and reports record it)."""
    assert load_config("demo") == load_config("tiny", OLD_DEMO_OVERRIDES)
    assert load_config("demo", ["train.epochs=3"]).train.epochs == 3  # --set still wins


def test_demo_config_covers_every_test_image():
    from bpo_ray.demo import NOISE_STEP

    cfg = load_config("demo")
    assert cfg.world.train_partner_rate == 0.9
    assert cfg.generate.sample_items == 1200
    assert cfg.evaluate.max_items is None  # no benchmark is cut to its first N items
    assert cfg.evaluate.pope.n_per_image == 1
    assert NOISE_STEP in cfg.generate.sampler.noise.steps  # the step the BPO variants train on is sampled


def test_a_config_extends_its_base(tmp_path):
    """``base:`` names a config (named, or a path beside the file); sections merge key by key, other
    values (lists too) replace; a loop is an error."""
    (tmp_path / "mid.yaml").write_text("base: tiny\nname: mid\ntrain: {beta: 0.3}\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\ngenerate: {sampler: {noise: {steps: [900]}}}\n")
    cfg, tiny = load_config(str(tmp_path / "top.yaml")), load_config("tiny")
    assert cfg.name == "mid" and cfg.train.beta == 0.3 and cfg.train.epochs == tiny.train.epochs
    assert cfg.generate.sampler.noise.steps == [900]
    assert cfg.generate.sampler.noise.num_steps == tiny.generate.sampler.noise.num_steps
    assert cfg.generate.sampler.sampling == tiny.generate.sampler.sampling
    (tmp_path / "mid.yaml").write_text("base: top.yaml\n")
    with pytest.raises(ConfigError, match="'base' loop"):
        load_config(str(tmp_path / "top.yaml"))
    (tmp_path / "mid.yaml").write_text("base: no-such-config\n")
    with pytest.raises(ConfigError, match="no-such-config"):
        load_config(str(tmp_path / "top.yaml"))


def test_config_differences_name_changed_values_and_skip_one_sided_keys():
    from bpo_ray.config import config_differences

    before = {"train": {"beta": 0.1, "epochs": 1, "retired": 3}, "name": "tiny"}
    now = {"train": {"beta": 0.2, "epochs": 1, "new_knob": 4}, "name": "tiny"}
    assert config_differences(before, now) == ["train.beta: 0.1 -> 0.2"]
    assert len(config_differences(None, {"a": 1})) == 1  # a section one side lacks entirely is a change
    assert config_differences({"a": 1}, {"a": 1}) == []
