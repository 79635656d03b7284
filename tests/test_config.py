import re

import pytest
from ruamel.yaml import YAML
from pydantic import BaseModel
from params_helpers import REPO, params_dict

from icmlora.config import Params, load_params, params_from_dict, read_yaml
from icmlora.errors import InputError
from icmlora.profile import apply_profile
from icmlora.tracking import flatten


def test_committed_params_are_valid(repo):
    cfg = load_params(repo / "params.yaml")
    assert isinstance(cfg, Params)
    assert cfg.data.source == "synthetic"
    assert cfg.runtime.mixed_precision == "no"  # YAML 1.2: `no` is a string, as DVC writes it


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", info
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _fields(info.annotation, f"{prefix}{name}.")


def test_params_yaml_is_the_one_source_of_values(repo):
    """The models declare no defaults, so nothing in code can drift from params.yaml; and
    params.yaml sets every knob the models declare."""
    defaulted = [key for key, info in _fields(Params) if not info.is_required()]
    assert not defaulted, f"config models must not carry defaults: {defaulted}"
    data = params_dict(profile=None)
    for key, _ in _fields(Params):
        node = data
        for part in key.split("."):
            assert part in node, f"params.yaml does not set {key}"
            node = node[part]


@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO / "profiles").glob("*.yaml")))
def test_profiles_merge_into_valid_params(repo, tmp_path, profile):
    """`icmlora profile NAME` changes exactly the profile's values: every dotted key the profile
    sets has the profile's value in the written params.yaml, every other key keeps params.yaml's
    value (no key added or lost), and the result validates."""
    params = tmp_path / "params.yaml"
    original = (repo / "params.yaml").read_text()
    params.write_text(original)
    profile_file = repo / "profiles" / f"{profile}.yaml"
    merged = apply_profile(params, profile_file)
    written = read_yaml(params.read_text())
    assert merged == written
    before, after = flatten(read_yaml(original)), flatten(written)
    changes = flatten(read_yaml(profile_file.read_text()))
    assert changes, f"{profile_file} sets nothing"
    assert {key: after.get(key, "<missing>") for key in changes} == changes
    assert set(after) == set(before) | set(changes)
    assert {k: v for k, v in after.items() if k not in changes} == {k: v for k, v in before.items() if k not in changes}
    load_params(params)  # validates (InputError otherwise)


def test_real_profile_trains_every_rank_at_the_papers_lr(repo, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((repo / "params.yaml").read_text())
    apply_profile(params, repo / "profiles" / "real.yaml")
    lora = load_params(params).lora
    assert {lora.optimizer(r).lr for r in lora.ranks} == {5.0e-6}


def test_profile_keeps_comments_and_untouched_lines(repo, tmp_path):
    params = tmp_path / "params.yaml"
    original = (repo / "params.yaml").read_text()
    params.write_text(original)
    apply_profile(params, repo / "profiles" / "micro.yaml")
    merged = params.read_text()
    comments = [line.strip() for line in original.splitlines() if line.strip().startswith("#")]
    assert comments and all(c in merged for c in comments)
    assert "  source: synthetic          # synthetic | florence_jsonl | voc | coco" in merged.splitlines()
    assert "  root: data/source          # an imported source's folder (VOC2012 root, COCO root, JSONL folder): a DVC" in merged
    assert "  revision: null" in merged  # a null stays null
    assert "    steps: 6                   # valid mAP50 0.97-1.00" in merged  # a changed value keeps its comment
    assert len(merged.splitlines()) == len(original.splitlines())


def _set(data, key, value):
    *parents, last = key.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("data.synthetic.image_sizee", 3, "data.synthetic.image_sizee: unknown key; allowed keys under data.synthetic"),
        ("base.train.lr", "fast", "base.train.lr: input should be a valid number, got 'fast'"),
        ("base.train.steps", 1.5, "base.train.steps: input should be a valid integer, got 1.5"),
        ("base.train.steps", 0, "base.train.steps: input should be greater than or equal to 1, got 0"),
        ("runtime.mixed_precision", "fp8", "runtime.mixed_precision: input should be 'no', 'bf16' or 'fp16', got 'fp8'"),
        ("data.synthetic.object_size", [40, 10], "data.synthetic.object_size: must be [min, max]"),
        ("data.tasks", [], "data.tasks: needs at least one task"),
        ("data.root", "", "data.root: string should have at least 1 character"),
        ("base.tiny.patch_strides", [4, 2], "base.tiny.patch_strides: must have 3 entries"),
        ("sede", 1, "sede: unknown key; allowed keys under the top level"),
        ("data.synthetic.grid", "yes", "data.synthetic.grid: input should be a valid boolean, got 'yes'"),
        ("data.synthetic.category_colours", False, "data.synthetic.base_labels: 'hue' needs category_colours"),
        ("data.tasks", [f"t{i}" for i in range(13)], "data.synthetic: base_labels 'hue' names at most 12"),
        ("heldout_tasks", ["dog"], "heldout_tasks: ['dog'] not in data.tasks"),
        ("lora.target_modules", 3, "lora.target_modules: input should be a valid string, got 3; or input should be a valid list"),
        ("lora.cross_task_ranks", [3], "lora.cross_task_ranks: [3] not in lora.ranks"),
        ("lora.lr_by_rank", {"1": 0.002}, "lora.lr_by_rank: keys ['1'] are not ranks written r<rank> (e.g. r1)"),
        ("lora.lr_by_rank", {"r1": 0}, "lora.lr_by_rank.r1: input should be greater than 0, got 0"),
        ("cvae.kernel_size", 4, "cvae.kernel_size: must be odd"),
        ("predict.num_beams", None, "predict.num_beams: input should be a valid integer, got None"),
    ],
)
def test_bad_params_name_the_dotted_key(key, value, expected):
    data = params_dict(profile=None)
    if key == "data.tasks":  # tasks that are categories, none held out
        _set(data, "data.synthetic.task_kind", "category")
        _set(data, "heldout_tasks", [])
    _set(data, key, value)
    with pytest.raises(InputError) as err:
        params_from_dict(data)
    assert expected in str(err.value)


def test_lr_by_rank_overrides_the_lora_lr_for_its_ranks_only(repo, tmp_path):
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text((repo / "params.yaml").read_text())
    # As `dvc exp run -S` sets it: a rank already listed, and one added with +.
    apply_overrides(str(params), ["lora.lr_by_rank.r1=0.001", "+lora.lr_by_rank.r8=0.004", "lora.train.lr=0.006"])
    lora = load_params(params).lora
    assert [lora.optimizer(r).lr for r in (1, 2, 4, 8)] == [0.001, 0.006, 0.006, 0.004]
    assert lora.optimizer(2) == lora.train and lora.optimizer(1).steps == lora.train.steps
    # Removing the overrides (one lr for every rank) leaves a file that still loads.
    apply_overrides(str(params), ["~lora.lr_by_rank.r1", "~lora.lr_by_rank.r8"])
    lora = load_params(params).lora
    assert lora.lr_by_rank == {} and {lora.optimizer(r).lr for r in lora.ranks} == {0.006}


def test_a_missing_knob_is_an_error_not_a_default():
    data = params_dict(profile=None)
    del data["cvae"]["latent_dim"]
    with pytest.raises(InputError, match="cvae.latent_dim: missing"):
        params_from_dict(data)


def test_every_problem_is_reported_at_once():
    data = params_dict(profile=None)
    data["base"]["train"]["lr"] = "x"
    data["predict"]["batch_size"] = 0
    data["runtime"]["threads"] = -1
    with pytest.raises(InputError) as err:
        params_from_dict(data)
    assert len(err.value.problems) == 3


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 1\ndata:\n  tasks: [a, b\n")
    with pytest.raises(InputError, match=r"params.yaml:\d+: invalid YAML"):
        load_params(bad)


def test_flatten_gives_dotted_keys(repo):
    flat = flatten(load_params(repo / "params.yaml"))
    assert flat["base.train.lr"] == 2e-3
    assert flat["data.synthetic.image_size"] == 64
    assert flat["cvae.train.epochs"] == 100


@pytest.mark.parametrize("key, section", [("sede", "the top level"), ("data.synthetic.image_sizee", "data.synthetic")])
def test_an_unknown_key_lists_exactly_the_keys_of_its_own_section(key, section):
    from icmlora.config import SyntheticParams

    allowed = {"the top level": Params, "data.synthetic": SyntheticParams}[section].model_fields
    data = params_dict(profile=None)
    _set(data, key, 3)
    with pytest.raises(InputError) as err:
        params_from_dict(data)
    assert err.value.problems == [f"{key}: unknown key; allowed keys under {section}: {', '.join(allowed)}"]
    assert "image_size, " in err.value.problems[0] if section == "data.synthetic" else "seed, " in err.value.problems[0]


def test_a_list_entry_is_named_by_its_index():
    data = params_dict(profile=None)
    data["data"]["tasks"] = ["circle", 3]
    data["base"]["tiny"]["patch_strides"] = [4, "x", 2]
    with pytest.raises(InputError) as err:
        params_from_dict(data)
    assert err.value.problems == ["data.tasks[1]: input should be a valid string, got 3",
                                  "base.tiny.patch_strides[1]: input should be a valid integer, got 'x'"]


def test_load_params_names_its_own_file_in_every_error(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(InputError) as err:
        load_params(missing)
    assert str(err.value) == f"{missing}: parameters file not found (run from the repository root)"
    bad_yaml = tmp_path / "other.yaml"
    bad_yaml.write_text("seed: 1\ndata:\n  tasks: [a, b\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(bad_yaml))}:\d+: invalid YAML"):
        load_params(bad_yaml)
    bad_value = tmp_path / "other-params.yaml"
    data = params_dict(profile=None)
    data["seed"] = "x"
    YAML(typ="safe", pure=True).dump(data, bad_value)
    with pytest.raises(InputError) as err:
        load_params(bad_value)
    assert err.value.summary == f"{bad_value}: invalid parameters"
    assert err.value.problems == ["seed: input should be a valid integer, got 'x'"]
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(not_a_mapping))}: expected a mapping at the top level, got list$"):
        load_params(not_a_mapping)


def test_read_yaml_is_yaml_1_2_and_names_the_line_of_a_syntax_error():
    assert read_yaml("a: no\nb: 1.0e-3\nc: ~\n") == {"a": "no", "b": 0.001, "c": None}  # `no` is a string in 1.2
    with pytest.raises(InputError) as err:
        read_yaml("seed: 1\ndata:\n  tasks: [a, b\n", "p.yaml")
    assert str(err.value) == "p.yaml:4: invalid YAML (expected ',' or ']', but got '<stream end>')"
