import pytest
import yaml

from icmlora.config import Config, config_from_dict, flatten, load_config
from icmlora.errors import InputError
from icmlora.profile import apply_profile


def test_committed_params_are_valid(repo):
    cfg = load_config(repo / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.source == "synthetic"


@pytest.mark.parametrize("profile", ["micro", "real"])
def test_profiles_merge_into_valid_params(repo, tmp_path, profile):
    params = tmp_path / "params.yaml"
    params.write_text((repo / "params.yaml").read_text())
    merged = apply_profile(params, repo / "profiles" / f"{profile}.yaml")
    assert load_config(params) == config_from_dict(merged)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["data"]["synthetic"].update(image_sizee=3), "data.synthetic.image_sizee: unknown key; allowed keys"),
        (lambda d: d["base"]["train"].update(lr="fast"), "base.train.lr: expected a number, got 'fast'"),
        (lambda d: d["base"]["train"].update(steps=1.5), "base.train.steps: expected an integer"),
        (lambda d: d["runtime"].update(mixed_precision="fp8"), "runtime.mixed_precision: 'fp8' is not allowed"),
        (lambda d: d["data"]["synthetic"].update(object_size=[40, 10]), "data.synthetic.object_size: must be [min, max]"),
        (lambda d: d["data"].update(tasks=[]), "data.tasks: needs at least one task"),
        (lambda d: d["data"].update(source="voc"), "data.root: source 'voc' needs data.root"),
        (lambda d: d["base"]["tiny"].update(patch_strides=[4, 2]), "base.tiny.patch_strides: must have 3 entries"),
        (lambda d: d.update(sede=1), "sede: unknown key; allowed keys under the top level"),
        (lambda d: d["data"]["synthetic"].update(grid="yes"), "data.synthetic.grid: expected true or false"),
        (lambda d: d["data"]["synthetic"].update(category_colours=False), "data.synthetic.base_labels: 'hue' needs category_colours"),
        (lambda d: d["data"].update(tasks=[f"t{i}" for i in range(13)]), "data.synthetic.base_labels: 'hue' names at most 12"),
    ],
)
def test_bad_params_name_the_dotted_key(repo, change, expected):
    data = yaml.safe_load((repo / "params.yaml").read_text())
    change(data)
    with pytest.raises(InputError) as err:
        config_from_dict(data)
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once(repo):
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["base"]["train"]["lr"] = "x"
    data["eval"]["batch_size"] = 0
    data["runtime"]["threads"] = -1
    with pytest.raises(InputError) as err:
        config_from_dict(data)
    assert len(err.value.problems) == 3


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 1\ndata:\n  tasks: [a, b\n")
    with pytest.raises(InputError, match=r"params.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_flatten_gives_dotted_keys():
    flat = flatten(Config())
    assert flat["base.train.lr"] == 2e-3
    assert flat["data.synthetic.image_size"] == 64
