"""Every generator kind (``icmlora.generators``) behind one face: fitted by train_cvae, saved, rebuilt,
sampled into a PEFT folder that loads, and blind to the held-out tasks."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from icmlora.artifacts.adapters import read_adapter
from icmlora.artifacts.generators import read_generator
from icmlora.artifacts.lora_matrix import read_lora_matrix, write_lora_matrix
from icmlora.artifacts.task_vectors import read_task_vectors, write_task_vectors
from icmlora.florence.model import build_tiny_model
from icmlora.generators import KINDS, TRAINED, build, model_from_json, noise_width, step_loss
from icmlora.generators.flow import time_features
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


def _random(kind, input_dim=6, condition_dim=3):
    """A module of ``kind`` whose every weight has a value (the flow's output layer starts at zero)."""
    torch.manual_seed(0)
    model = build(kind_params(micro_params(), kind).cvae, input_dim, condition_dim)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_flow_time_features_are_sines_and_cosines_of_t_at_frequencies_from_1_to_100():
    t = torch.tensor([0.0, 0.3, 0.55, 1.0])
    angles = t.double()[:, None] * torch.tensor([100.0 ** (k / 7) for k in range(8)], dtype=torch.float64) * math.pi
    expected = torch.cat([angles.sin(), angles.cos()], dim=1)
    got = time_features(t)
    assert got.dtype == torch.float32 and got.shape == (4, 16)
    assert torch.allclose(got.double(), expected, atol=1e-4)  # float32 angles up to 100 pi


def test_flow_velocity_decode_and_loss_are_the_written_formulas():
    """velocity: the three projections summed, residual blocks [LayerNorm, Linear, GELU, Linear], GELU,
    the output layer; decode: ``steps`` Euler steps from z at t = k / steps; the loss: the velocity's
    squared error on the straight path at t = Phi(the noise's last column)."""
    flow = _random("flow")
    c = flow.config
    assert len(flow.blocks) == c.layers and c.steps > 1
    g = torch.Generator().manual_seed(1)
    x, t, cond = torch.randn(4, 6, generator=g), torch.rand(4, generator=g), torch.randn(4, 3, generator=g)
    h = flow.x_in(x) + flow.c_in(cond) + flow.t_in(time_features(t))
    for block in flow.blocks:
        norm, first, act, second = block
        assert isinstance(norm, nn.LayerNorm) and isinstance(act, nn.GELU)
        h = h + second(F.gelu(first(norm(h))))
    with torch.no_grad():
        assert torch.allclose(flow.velocity(x, t, cond), flow.out(F.gelu(h)), atol=1e-6)
        assert torch.equal(flow.velocity(x, t, cond.double()), flow.velocity(x, t, cond))  # a float64 condition too
        z = torch.randn(4, 6, generator=g)
        step, dt = z.clone(), 1.0 / c.steps
        for k in range(c.steps):
            step = step + dt * flow.velocity(step, torch.full((4,), k * dt), cond)
        assert torch.allclose(flow.decode(z, cond), step, atol=1e-6)
        x1, noise = torch.randn(4, 6, generator=g), torch.randn(4, 7, generator=g)
        x0, tt = noise[:, :6], torch.special.ndtr(noise[:, 6])
        xt = (1 - tt[:, None]) * x0 + tt[:, None] * x1
        expected = (flow.velocity(xt, tt, cond) - (x1 - x0)).pow(2).mean()
        total, recon, kl = flow(x1, cond, noise=noise.double())
        assert torch.allclose(total, expected, atol=1e-6) and torch.equal(recon, total) and kl.item() == 0.0
        torch.manual_seed(5)  # noise not given: drawn as torch.randn(B, D + 1)
        drawn = torch.randn(4, 7)
        torch.manual_seed(5)
        assert torch.equal(flow(x1, cond)[0], flow(x1, cond, noise=drawn)[0])


def test_hypernet_decode_and_loss_are_the_written_formulas():
    hyper = _random("hypernet")
    assert [type(m) for m in hyper.body] == [nn.Linear, nn.GELU, nn.Dropout] * hyper.config.layers
    assert hyper.body[2].p == hyper.config.dropout
    g = torch.Generator().manual_seed(2)
    cond, x = torch.randn(3, 3, generator=g), torch.randn(3, 6, generator=g)
    h = cond
    for layer in hyper.body[0::3]:
        h = F.gelu(layer(h))
    with torch.no_grad():
        assert torch.allclose(hyper.decode(torch.zeros(3, 1), cond), hyper.out(h), atol=1e-6)
        total, recon, kl = hyper(x.double(), cond)  # a float64 target is compared in the rows' float32
        assert total.dtype == torch.float32 and torch.allclose(total, (hyper.out(h) - x).pow(2).mean(), atol=1e-6)
        assert torch.equal(recon, total) and kl.item() == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_names_a_wrong_shape_and_counts_its_numbers(kind):
    if kind == "ridge":
        model = RidgeGenerator.from_map(fit_ridge(torch.randn(4, 3), torch.randn(4, 6), 0.5))
        assert model.num_parameters() == 4 * 3 + 4 * 6 + 6  # the dual form: conditions, dual, row mean
    else:
        model = _random(kind)
        assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0
    latent = model.config.latent_dim
    with pytest.raises(ValueError, match=rf"^z must have shape \[batch, {latent}\], got \[2, {latent + 1}\]$"):
        model.decode(torch.zeros(2, latent + 1), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"^cond must have shape \[batch, 3\], got \[2, 4\]$"):
        model.decode(torch.zeros(2, latent), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"^z and cond batch sizes differ: 2 vs 4$"):
        model.decode(torch.zeros(2, latent), torch.zeros(4, 3))
    if kind in ("hypernet", "flow"):
        with pytest.raises(ValueError, match=r"^x must have shape \[batch, 6\], got \[2, 5\]$"):
            model(torch.zeros(2, 5), torch.zeros(2, 3))
    if kind == "flow":
        with pytest.raises(ValueError, match=r"^cond must have shape \[batch, 3\], got \[2, 2\]$"):
            model(torch.zeros(2, 6), torch.zeros(2, 2))


@pytest.mark.parametrize("kind", ["cvae", "flow"])
def test_a_training_step_uses_the_noise_it_is_given(kind):
    """step_loss passes the step's noise on (every process draws it alike): the same noise, the same
    loss; other noise, another."""
    model = _random(kind, 16, 3).train()
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(2, 16, generator=g), torch.randn(2, 3, generator=g)
    noise = torch.randn(2, noise_width(kind, model), generator=g)
    with torch.no_grad():
        first = step_loss(kind, model, model, x, cond, noise)[0]
        torch.manual_seed(7)
        again = step_loss(kind, model, model, x, cond, noise.clone())[0]
        other = step_loss(kind, model, model, x, cond, noise + 1)[0]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_the_kinds_refuse_what_they_do_not_know_naming_what_they_do():
    with pytest.raises(ValueError, match=r"^cvae.kind 'ridge' is not trained by a loop \(kinds trained so: "
                                         r"\['cvae', 'hypernet', 'flow'\]\)$"):
        build(kind_params(micro_params(), "ridge").cvae, 6, 3)
    with pytest.raises(ValueError, match=r"^unknown generator kind 'gan' \(known: \['cvae', 'ridge', 'hypernet', 'flow'\]\)$"):
        model_from_json("gan", {})
    config = _random("hypernet").config.to_json()
    with pytest.raises(ValueError, match=r"^invalid HypernetArchitecture: unknown keys \['width'\], missing keys \[\] "
                                         r"\(keys: \['condition_dim', 'dropout', 'hidden', 'input_dim', 'layers'\]\)$"):
        model_from_json("hypernet", {**config, "width": 3})
    with pytest.raises(ValueError, match=r"unknown keys \[\], missing keys \['steps'\]"):
        model_from_json("flow", {k: v for k, v in _random("flow").config.to_json().items() if k != "steps"})


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
