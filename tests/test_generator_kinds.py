"""Every generator kind (``icmlora.generators``) behind one face: fitted by train_cvae, saved, rebuilt,
sampled into a PEFT folder that loads, and blind to the held-out tasks."""

import json
import shutil

import pytest
import torch
from peft import PeftModel

from icmlora.artifacts.adapters import read_adapter
from icmlora.artifacts.generators import read_generator
from icmlora.artifacts.lora_matrix import read_lora_matrix, write_lora_matrix
from icmlora.artifacts.task_vectors import read_task_vectors, write_task_vectors
from icmlora.florence.model import build_tiny_model
from icmlora.generators import KINDS, TRAINED, build, model_from_json, noise_width, step_loss
from icmlora.generators.ridge import RidgeGenerator, fit_ridge
from icmlora.stages.collect_params import collect_params
from icmlora.stages.generate import generate_one
from icmlora.stages.task_vectors import compute_task_vectors
from icmlora.stages.train_cvae import train_cvae
from params_helpers import micro_params


def kind_params(cfg, kind, **train):
    return cfg.model_copy(update={"cvae": cfg.cvae.model_copy(update={
        "kind": kind, "train": cfg.cvae.train.model_copy(update=train)})})


@pytest.mark.parametrize("kind", TRAINED)
def test_a_trained_kind_rebuilds_from_its_json_and_decodes_alike(kind):
    torch.manual_seed(0)
    model = build(kind_params(micro_params(), kind).cvae, 96, 8).eval()
    for p in model.parameters():  # the flow's output layer starts at zero: give every weight a value
        torch.nn.init.normal_(p, std=0.1)
    again = model_from_json(kind, json.loads(json.dumps(model.config.to_json()))).eval()
    again.load_state_dict(model.state_dict())
    z, cond = torch.randn(3, model.config.latent_dim), torch.randn(3, 8)
    assert torch.equal(model.decode(z, cond), again.decode(z, cond)) and model.decode(z, cond).shape == (3, 96)
    with pytest.raises(ValueError, match="cond must have shape"):
        model.decode(z, torch.randn(3, 7))


@pytest.mark.parametrize("kind", ["hypernet", "flow"])
def test_the_new_kinds_learn_a_conditional_toy_set(kind):
    """Rows = a fixed non-linear function of the condition: the loss falls by 3x, and the decoded rows
    (z = 0) come nearer to each condition's row than the rows' mean does."""
    torch.manual_seed(0)
    cond = torch.randn(16, 4)
    rows = torch.tanh(cond @ torch.randn(4, 32)) * 2
    model = build(kind_params(micro_params(), kind).cvae, 32, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(400):
        total, _, kl = step_loss(kind, model, model, rows, cond, None)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
        assert kl.item() == 0.0
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 / 3  # flow matching keeps a floor: x1 - x0 given x_t varies
    model.eval()
    with torch.no_grad():
        got = model.decode(torch.zeros(16, model.config.latent_dim), cond)
    assert (got - rows).pow(2).mean() < (rows.mean(0) - rows).pow(2).mean() / 2


def test_flow_samples_differ_with_z_and_the_hypernet_and_ridge_do_not():
    torch.manual_seed(0)
    cfg = micro_params()
    flow = build(kind_params(cfg, "flow").cvae, 24, 4).eval()
    torch.nn.init.normal_(flow.out.weight, std=0.1)
    cond = torch.randn(1, 4).expand(2, -1)
    z = torch.randn(2, flow.config.latent_dim)
    a = flow.decode(z, cond)
    assert not torch.allclose(a[0], a[1]) and noise_width("flow", flow) == 25
    hyper = build(kind_params(cfg, "hypernet").cvae, 24, 4).eval()
    b = hyper.decode(torch.randn(2, 1), cond)
    assert torch.equal(b[0], b[1]) and noise_width("hypernet", hyper) == 0
    ridge = RidgeGenerator.from_map(fit_ridge(torch.randn(5, 4), torch.randn(5, 24), 0.5))
    c = ridge.decode(torch.randn(2, 1), cond)
    assert torch.equal(c[0], c[1])


def test_the_ridge_kind_decodes_what_the_map_predicts():
    torch.manual_seed(0)
    vectors, targets = torch.randn(6, 5), torch.randn(6, 40)
    fitted = fit_ridge(vectors, targets, 0.3)
    module = RidgeGenerator.from_map(fitted)
    again = model_from_json("ridge", module.config.to_json())
    again.load_state_dict(module.state_dict())
    v = torch.randn(5)
    cond = ((v - fitted.cond_mean) / fitted.cond_scale)[None]
    assert torch.allclose(again.decode(torch.zeros(1, 1), cond)[0], fitted.predict(v), atol=1e-5)


@pytest.fixture(scope="module")
def inputs(setting, tmp_path_factory):
    """The micro setting's normalized rows and task vectors (held-out task: triangle)."""
    cfg, root, processor = setting
    out = tmp_path_factory.mktemp("kinds")
    for rank in cfg.lora.ranks:
        collect_params(cfg, rank, root / "lora", out / "matrix")
    compute_task_vectors(cfg, root / "prepared", root / "base", root / "lora", out / "tv.safetensors", out / "tv.json",
                         out / "tv-metrics.json", out / "plots")
    return cfg, root, processor, out


def fit(cfg, kind, out, matrix, vectors, name):
    cfg = kind_params(cfg, kind, epochs=3)
    result = train_cvae(cfg, 2, matrix, vectors, out / name / "gen", out / name / "state", out / name / "metrics")
    return cfg, result, out / name / "gen"


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_writes_a_generator_whose_rows_become_peft_folders_that_load(inputs, kind, tmp_path):
    cfg, root, processor, out = inputs
    cfg, result, gen_root = fit(cfg, kind, tmp_path, out / "matrix", out / "tv.safetensors", kind)
    assert result["kind"] == kind and result["train_tasks"] == cfg.training_tasks()
    gen = read_generator(2, gen_root)
    assert gen.meta["kind"] == kind and type(gen.model).__name__ == {"cvae": "CVAE", "ridge": "RidgeGenerator",
                                                                      "hypernet": "Hypernet", "flow": "Flow"}[kind]
    vectors = read_task_vectors(out / "tv.safetensors")
    written = generate_one(cfg, 2, tmp_path / "adapters", vectors["triangle"], samples=1, cvae_root=gen_root,
                           matrix_root=out / "matrix")
    manifest = json.loads((out / "matrix" / "r2.json").read_text())
    base = build_tiny_model(cfg.base.tiny, processor, 64, seed=0)
    for folder in written:
        tensors, config = read_adapter(folder)
        assert sorted(tensors) == manifest["names"] and config["r"] == 2
        assert f"kind {kind}" in (folder / "README.md").read_text()
        model = PeftModel.from_pretrained(base, folder)
        loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
        assert sorted(loaded) == sorted(tensors)
        for name, value in tensors.items():
            assert torch.equal(loaded[name], value), name
        assert all(torch.isfinite(v).all() for v in tensors.values())
        base = model.unload()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_no_kind_reads_a_held_out_tasks_rows_or_vector(inputs, kind, tmp_path):
    """The held-out task's rows and vector changed: the generator's files are bit-identical; a
    training task's row changed: they are not (the comparison can see a change)."""
    cfg, _, _, out = inputs
    matrix = read_lora_matrix(2, out / "matrix")
    vectors = read_task_vectors(out / "tv.safetensors")
    held = matrix.tasks.index("triangle")

    def variant(name, task):
        folder = tmp_path / name
        shutil.copytree(out / "matrix", folder / "matrix")
        m = read_lora_matrix(2, folder / "matrix")
        rows = m.rows.clone()
        rows[m.task_index == m.tasks.index(task)] += 3.0
        write_lora_matrix(2, type(m)(rows, m.task_index, m.seed, m.step, m.manifest, m.row_mean, m.row_std), folder / "matrix")
        names = list(vectors)
        table = torch.stack([vectors[t] + (5.0 if t == task else 0.0) for t in names])
        write_task_vectors(names, table, {}, {}, folder / "tv.safetensors", folder / "tv.json")
        return fit(cfg, kind, folder, folder / "matrix", folder / "tv.safetensors", "fit")[2]

    _, _, plain = fit(cfg, kind, tmp_path, out / "matrix", out / "tv.safetensors", "plain")
    weights = lambda root: (root / "r2" / "model.safetensors").read_bytes()  # noqa: E731
    assert weights(variant("heldout", "triangle")) == weights(plain)
    assert weights(variant("training", matrix.tasks[(held + 1) % len(matrix.tasks)])) != weights(plain)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["centered", "train_tasks"])
def test_a_held_out_tasks_checkpoints_never_reach_the_normalization(setting, tmp_path, mode):
    """A fold's normalization (collect_params): the held-out task's checkpoints changed, the center,
    the statistics and every training row are bit-identical; a training task's changed, they are not."""
    from safetensors.torch import load_file, save_file

    from icmlora.artifacts import checkpoints_dir

    cfg, root, _ = setting
    cfg = cfg.model_copy(update={"cvae": cfg.cvae.model_copy(update={"normalization": mode})})

    def normalized(task):
        lora = tmp_path / f"lora-{task}"
        shutil.copytree(root / "lora", lora)
        if task:
            for path in checkpoints_dir(task, 2, 0, lora).rglob("*.safetensors"):
                save_file({k: v * 3 + 1 for k, v in load_file(str(path)).items()}, str(path))
        collect_params(cfg, 2, lora, tmp_path / f"matrix-{task}")
        m = read_lora_matrix(2, tmp_path / f"matrix-{task}")
        train = m.task_index != m.tasks.index("triangle")
        return m.manifest.data["normalization"], m.manifest.center, m.rows[train]

    plain = normalized("")
    held = normalized("triangle")
    other = normalized("circle")
    assert held[0] == plain[0] and torch.equal(held[2], plain[2])
    assert (held[1] is None and plain[1] is None) or torch.equal(held[1], plain[1])
    assert other[0] != plain[0] and not torch.equal(other[2], plain[2])
