import json
import math

import pytest
import torch

from params_helpers import micro_params

from icmlora.cvae import CVAE, PAPER_CHANNELS, CVAEArchitecture, architecture, default_channels


def arch(**fields) -> CVAEArchitecture:
    """An architecture with the paper's values for what a test leaves out (latent 256, kernel 7, ...)."""
    paper = dict(kernel_size=7, latent_dim=256, pad_multiple=4096, kl_weight=0.005, hidden_dim=None, norm="group")
    return CVAEArchitecture(**{**paper, **fields})


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI/dev machine is small and shared; these models are tiny anyway.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHAPES = [
    # (D, channels, pad_multiple, padded_dim)
    (1, [4], 2, 2),
    (1, [4, 8, 4], 64, 64),
    (777, [4, 8], 4, 780),
    (777, [8, 16, 8], 4096, 4096),
    (5000, [4, 8, 8, 4], 16, 5008),
    (9217, [4, 8], 4096, 12288),
    (9217, [2, 4, 8, 4, 2], 32, 9248),
]


@pytest.mark.parametrize("D,channels,pad,padded", SHAPES)
def test_shapes_and_padding(D, channels, pad, padded):
    torch.manual_seed(0)
    cfg = arch(input_dim=D, condition_dim=3, channels=channels, latent_dim=16, pad_multiple=pad)
    assert cfg.padded_dim == padded
    assert cfg.bottleneck_length == padded // 2 ** len(channels)
    model = CVAE(cfg)
    x, cond = torch.randn(2, D), torch.randn(2, 3)
    recon, mu, logvar = model(x, cond)
    assert recon.shape == (2, D)
    assert mu.shape == logvar.shape == (2, 16)
    assert model.decode(torch.randn(5, 16), torch.randn(5, 3)).shape == (5, D)
    total, mse, kl = model.loss(x, recon, mu, logvar)
    assert total.shape == mse.shape == kl.shape == ()
    total.backward()


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_batch_of_one_trains_with_batchnorm_and_groupnorm(norm):
    torch.manual_seed(0)
    cfg = arch(input_dim=300, condition_dim=2, channels=[4, 8], latent_dim=8, pad_multiple=4, norm=norm)
    model = CVAE(cfg).train()
    recon, mu, logvar = model(torch.randn(1, 300), torch.randn(1, 2))
    total = model.loss(torch.randn(1, 300), recon, mu, logvar)[0]
    total.backward()
    assert torch.isfinite(total)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["out_conv.weight"].abs().sum() > 0 and grads["encoder.0.weight"].abs().sum() > 0


def test_bad_input_shapes_raise():
    model = CVAE(arch(input_dim=50, condition_dim=3, channels=[4], latent_dim=8, pad_multiple=2))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 51), torch.randn(2, 3))
    with pytest.raises(ValueError, match="cond must have shape"):
        model.decode(torch.randn(2, 8), torch.randn(2, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(torch.randn(2, 50), torch.randn(3, 3))


def test_reconstruction_loss_is_per_sample():
    model = CVAE(arch(input_dim=64, condition_dim=2, channels=[4], latent_dim=4, pad_multiple=2))
    x = torch.randn(4, 64) * torch.arange(1, 5).unsqueeze(1)  # rows clearly different
    mu, logvar = torch.zeros(4, 4), torch.zeros(4, 4)
    total, mse, kl = model.loss(x, x.clone(), mu, logvar)
    # The reference's [B, D] vs [B, 1, D] comparison scores each output against every
    # input, so even a perfect reconstruction would have a positive loss there.
    assert mse.item() == 0.0 and kl.item() == 0.0 and total.item() == 0.0
    assert ((x.unsqueeze(1) - x) ** 2).mean().item() > 1.0
    swapped = x[[1, 0, 2, 3]]
    assert model.loss(x, swapped, mu, logvar)[1].item() > 1.0
    with pytest.raises(ValueError, match=r"recon and x must both be \[batch, D\]"):
        model.loss(x.unsqueeze(1), x, mu, logvar)


def test_kl_is_averaged_per_sample():
    model = CVAE(arch(input_dim=8, condition_dim=1, channels=[2], latent_dim=3, pad_multiple=2))
    x = torch.zeros(1, 8)
    one = model.loss(x, x, torch.ones(1, 3), torch.zeros(1, 3))[2]
    many = model.loss(x.repeat(5, 1), x.repeat(5, 1), torch.ones(5, 3), torch.zeros(5, 3))[2]
    assert one.item() == pytest.approx(1.5) and many.item() == pytest.approx(1.5)


def test_config_json_round_trip_rebuilds_identical_model():
    torch.manual_seed(1)
    cfg = arch(
        input_dim=777, condition_dim=5, channels=[4, 8, 4], kernel_size=5, latent_dim=12,
        pad_multiple=8, kl_weight=0.01, hidden_dim=20, norm="batch",
    )
    cfg2 = CVAEArchitecture.from_json(json.loads(json.dumps(cfg.to_json())))
    assert cfg2 == cfg
    a, b = CVAE(cfg), CVAE(cfg2)
    sa, sb = a.state_dict(), b.state_dict()
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in sb.items()}
    a.train()(torch.randn(4, 777), torch.randn(4, 5))  # move BatchNorm running stats off their init
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x, cond = torch.randn(3, 777), torch.randn(3, 5)
    with torch.no_grad():
        for ta, tb in zip(a(x, cond), b(x, cond)):
            assert torch.equal(ta, tb)
        z = torch.randn(3, 12)
        assert torch.equal(a.decode(z, cond), b.decode(z, cond))


def test_from_json_rejects_unknown_and_missing_keys():
    d = arch(input_dim=10, condition_dim=2, channels=[4], pad_multiple=2).to_json()
    with pytest.raises(ValueError, match="unknown keys.*'chanels'"):
        CVAEArchitecture.from_json({**d, "chanels": [4]})
    del d["condition_dim"]
    with pytest.raises(ValueError, match="missing keys.*condition_dim"):
        CVAEArchitecture.from_json(d)


def test_loss_falls_on_toy_set():
    torch.manual_seed(2024)
    D = 300
    protos = torch.randn(2, D)
    x = protos.repeat_interleave(4, dim=0) + 0.1 * torch.randn(8, D)
    cond = torch.eye(2).repeat_interleave(4, dim=0)
    cfg = arch(input_dim=D, condition_dim=2, channels=[8], latent_dim=16, pad_multiple=2)
    model = CVAE(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)

    def step():
        recon, mu, logvar = model(x, cond)
        total = model.loss(x, recon, mu, logvar)[0]
        opt.zero_grad()
        total.backward()
        opt.step()
        return total.item()

    first = step()
    for _ in range(149):
        last = step()
    assert last < first / 5, (first, last)


BAD = [
    (dict(channels=[]), "channels"),
    (dict(channels=[4, 0]), "channels"),
    (dict(channels=[4, 8], pad_multiple=6), "pad_multiple"),
    (dict(input_dim=0), "input_dim"),
    (dict(condition_dim=-1), "condition_dim"),
    (dict(latent_dim=0), "latent_dim"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(pad_multiple=0), "pad_multiple"),
    (dict(kl_weight=-0.1), "kl_weight"),
    (dict(kl_weight=float("nan")), "kl_weight"),
    (dict(hidden_dim=0), "hidden_dim"),
    (dict(norm="layer"), "norm"),
    (dict(input_dim=2.5), "input_dim"),
]


@pytest.mark.parametrize("override,field", BAD)
def test_bad_config_raises_naming_the_field(override, field):
    kwargs = dict(input_dim=100, condition_dim=4, channels=[4, 8], pad_multiple=4)
    kwargs.update(override)
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        arch(**kwargs)


def test_paper_defaults_and_pad_message():
    cfg = arch(input_dim=1_929_928, condition_dim=768, channels=PAPER_CHANNELS)
    assert cfg.padded_dim == 472 * 4096 and cfg.bottleneck_length == 472
    with pytest.raises(ValueError, match=r"pad_multiple: 2048 is not a multiple of patch \* 2\*\*len\(channels\) = 4096"):
        arch(input_dim=10, condition_dim=1, channels=PAPER_CHANNELS, pad_multiple=2048)
    with pytest.raises(ValueError, match=r"pad_multiple: 4096 is not a multiple of patch \* 2\*\*len\(channels\) = 65536"):
        arch(input_dim=10, condition_dim=1, channels=PAPER_CHANNELS, pad_multiple=4096, patch=16)


def test_patch_reads_consecutive_values_as_one_step():
    """patch P: the encoder's first layer sees values i*P .. i*P+P-1 as the channels of step i,
    and the decoder writes them back in the same order; no layer runs at the full length."""
    torch.manual_seed(0)
    cfg = arch(input_dim=1000, condition_dim=3, channels=[4, 8], pad_multiple=16, patch=4)
    assert cfg.padded_dim == 1008 and cfg.bottleneck_length == 1008 // 16 and cfg.total_stride == 16
    model = CVAE(cfg)
    assert model.encoder[0].in_channels == 4 and model.out_conv.out_channels == 4
    # A change confined to one patch (values 8..11 = step 2) reaches the first conv's output only
    # within the kernel's reach of step 2: output j of the stride-2, kernel-7, padding-3 conv reads
    # steps 2j-3 .. 2j+3, so positions 0, 1 and 2 of 126 change, and no other.
    x, cond = torch.zeros(1, 1000), torch.zeros(1, 3)
    y = x.clone()
    y[0, 8:12] = 1.0
    first = model.encoder[0]
    to_steps = lambda t: torch.nn.functional.pad(t, (0, 8)).view(1, 252, 4).transpose(1, 2)  # noqa: E731
    diff = (first(to_steps(y)) - first(to_steps(x))).abs().sum(1)[0]
    assert diff.shape == (126,) and [j for j in range(126) if 2 * j - 3 <= 2 <= 2 * j + 3] == [0, 1, 2]
    assert diff.nonzero().flatten().tolist() == [0, 1, 2]
    out, mu, logvar = model(x, cond)
    assert out.shape == (1, 1000) and mu.shape == (1, cfg.latent_dim)
    # The decoder's P channels at step i are output values i*P .. i*P+P-1.
    model.eval()
    z = torch.randn(1, cfg.latent_dim)
    steps = model.out_conv(model.decoder(model.dec_fc(torch.cat([z, cond], 1)).view(1, 8, cfg.bottleneck_length)))
    assert torch.equal(model.decode(z, cond)[0], steps[0].T.reshape(-1)[:1000])


def test_generators_saved_before_patch_existed_load_as_the_papers_layout():
    saved = arch(input_dim=100, condition_dim=4, channels=[4, 8], pad_multiple=4).to_json()
    assert saved.pop("patch") == 1
    assert CVAEArchitecture.from_json(saved).patch == 1


@pytest.mark.parametrize(
    "D,expected",
    [
        (1, [8]),
        (16, [8]),
        (32, [8, 8]),
        (300, [8, 16, 32, 16, 8]),
        (9217, [8, 16, 32, 64, 128, 128, 64, 32, 16, 8]),
        (1_929_928, PAPER_CHANNELS),
    ],
)
def test_default_channels(D, expected):
    ch = default_channels(D)
    assert ch == expected
    knobs = micro_params().cvae.model_copy(update={"channels": [], "pad_multiple": 0, "max_layers": 12})
    cfg = architecture(knobs, D, condition_dim=2)
    assert cfg.channels == ch and cfg.pad_multiple == 2 ** len(ch)
    if D >= 16:
        assert cfg.bottleneck_length >= 8


def test_default_channels_respects_max_layers_and_validates():
    assert len(default_channels(1_929_928, max_layers=5)) == 5
    with pytest.raises(ValueError, match="max_layers"):
        default_channels(100, max_layers=0)
    with pytest.raises(ValueError, match="input_dim"):
        default_channels(0)


class _Echo(torch.nn.Module):
    """Stands in for a trained CVAE: decodes (z, cond) to the two side by side."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def decode(self, z, cond):
        return torch.cat([z, cond], dim=1).double()


def test_a_generator_standardizes_the_task_vector_and_decodes_it_with_each_latent():
    from icmlora.cvae import Generator

    train = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    mean, scale = Generator.standardization(train)
    # Deviations -1, -2, 1, 2: one spread for every dimension, sqrt(10 / 3) (unbiased).
    assert torch.equal(mean, torch.tensor([2.0, 4.0]))
    assert torch.allclose(scale, torch.full((2,), (10 / 3) ** 0.5))
    _, floor = Generator.standardization(torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    assert torch.equal(floor, torch.full((2,), 1e-8))  # no spread: the floor, not a division by 0

    generator = Generator(_Echo().train(), mean, torch.tensor([2.0, 2.0]), {"kind": "icl"}).to("cpu")
    assert not generator.model.training and generator.meta == {"kind": "icl"}
    assert torch.equal(generator.condition(torch.tensor([[4.0, 8.0]], dtype=torch.float64)), torch.tensor([[1.0, 2.0]]))
    rows = generator.sample(torch.tensor([6.0, 0.0]), torch.tensor([[0.5], [-0.5]]))
    assert rows.dtype == torch.float32
    assert torch.equal(rows, torch.tensor([[0.5, 2.0, -2.0], [-0.5, 2.0, -2.0]]))


def test_generators_saved_before_condition_heads_load_without_one():
    saved = arch(input_dim=100, condition_dim=4, channels=[4, 8], pad_multiple=4).to_json()
    for key in ("patch", "condition_head", "decoder_condition"):
        saved.pop(key)
    loaded = CVAEArchitecture.from_json(saved)
    assert (loaded.patch, loaded.condition_head, loaded.decoder_condition) == (1, 0, True)


def test_default_channels_at_the_smallest_limits():
    assert default_channels(1_929_928, max_layers=1) == [8]
    assert default_channels(16, max_layers=3, min_length=1) == [8, 16, 8]  # 16 / 2**3 = 2 positions left
    assert default_channels(16, max_layers=3, min_length=2) == [8, 16, 8]
    assert default_channels(16, max_layers=3, min_length=3) == [8, 8]
    for bad in (0, "x"):
        with pytest.raises(ValueError, match=rf"^min_length: must be a positive integer, got {bad!r}$"):
            default_channels(16, min_length=bad)


def test_architecture_takes_every_knob_that_is_set():
    knobs = micro_params().cvae.model_copy(update={
        "channels": [], "pad_multiple": 0, "max_layers": 2, "hidden_dim": 32, "patch": 2, "condition_head": 4,
        "decoder_condition": False})
    cfg = architecture(knobs, 1000, condition_dim=3)
    assert cfg.channels == [8, 8] and cfg.pad_multiple == 2 * 2**2  # max_layers 2, patch 2
    assert (cfg.hidden_dim, cfg.feature_dim, cfg.patch, cfg.condition_head, cfg.decoder_condition) == (32, 32, 2, 4, False)
    assert architecture(knobs.model_copy(update={"hidden_dim": 0}), 1000, 3).hidden_dim is None  # 0: latent_dim


def test_a_generator_moves_its_model():
    from icmlora.cvae import Generator

    generator = Generator(_Echo(), torch.zeros(2), torch.ones(2), {}).to("meta")
    assert next(generator.model.parameters()).device.type == "meta"


def test_architecture_problems_in_full():
    ok = arch(input_dim=8, condition_dim=2, channels=(1, 1), pad_multiple=4, hidden_dim=1, kl_weight=0, norm="none")
    assert ok.channels == [1, 1] and ok.hidden_dim == 1  # a tuple is kept as a list; 1 and 0 are allowed
    with pytest.raises(ValueError) as err:
        arch(input_dim=8, condition_dim=True, channels=[4, 8, 8], pad_multiple=1, condition_head=-1,
             decoder_condition="yes", hidden_dim=0, kl_weight=True, norm="layer")
    assert str(err.value) == (
        "invalid CVAEArchitecture: condition_dim: must be a positive integer, got True; "
        "condition_head: must be an integer >= 0, got -1; decoder_condition: must be true or false, got 'yes'; "
        "hidden_dim: must be a positive integer or null, got 0; "
        "pad_multiple: 1 is not a multiple of patch * 2**len(channels) = 8; "
        "kl_weight: must be a finite number >= 0, got True; norm: must be one of ['group', 'batch', 'none'], got 'layer'")
    with pytest.raises(ValueError) as err:  # a bad patch: the stride is the layers' alone
        arch(input_dim=8, condition_dim=2, channels=[4, 8, 8], pad_multiple=8, patch=0, decoder_condition=False,
             kl_weight=float("inf"))
    assert str(err.value) == (
        "invalid CVAEArchitecture: patch: must be a positive integer, got 0; "
        "decoder_condition: false needs a condition_head: otherwise nothing generated depends on the task; "
        "kl_weight: must be a finite number >= 0, got inf")
    with pytest.raises(ValueError) as err:
        arch(input_dim=8, condition_dim=2, channels=[0], pad_multiple="x", condition_head="x", kl_weight=-0.5)
    assert str(err.value) == (
        "invalid CVAEArchitecture: pad_multiple: must be a positive integer, got 'x'; "
        "condition_head: must be an integer >= 0, got 'x'; channels: every entry must be a positive integer, got [0]; "
        "kl_weight: must be a finite number >= 0, got -0.5")


def test_norm_layers_and_the_decoders_inputs():
    for norm, kind in (("batch", torch.nn.BatchNorm1d), ("group", torch.nn.GroupNorm), ("none", torch.nn.Identity)):
        model = CVAE(arch(input_dim=40, condition_dim=3, channels=[12, 8], pad_multiple=4, latent_dim=5, norm=norm))
        assert type(model.encoder[1]) is kind and type(model.encoder[4]) is kind
        assert isinstance(model.enc_fc[1], torch.nn.LeakyReLU)
    assert model.dec_fc.in_features == 5 + 3 and not hasattr(model, "condition_head")
    group = CVAE(arch(input_dim=40, condition_dim=3, channels=[12, 8], pad_multiple=4, latent_dim=5))
    assert (group.encoder[1].num_groups, group.encoder[4].num_groups) == (4, 8)  # gcd with 8
    headed = CVAE(arch(input_dim=40, condition_dim=3, channels=[12, 8], pad_multiple=4, latent_dim=5,
                       condition_head=2, decoder_condition=False))
    assert headed.dec_fc.in_features == 5 and headed.condition_head[0].bias is None


def test_the_condition_head_adds_an_affine_map_of_the_condition():
    torch.manual_seed(0)
    model = CVAE(arch(input_dim=40, condition_dim=3, channels=[4], pad_multiple=2, latent_dim=5, condition_head=2,
                      decoder_condition=False)).eval()
    z, cond = torch.randn(2, 5), torch.randn(2, 3)
    base = model.decode(z, cond)
    with torch.no_grad():
        model.condition_head[1].bias.fill_(0.25)
    assert torch.allclose(model.decode(z, cond.double()), base + 0.25, atol=1e-6)


def test_forward_samples_with_the_noise_given_or_takes_the_mean():
    torch.manual_seed(0)
    model = CVAE(arch(input_dim=40, condition_dim=3, channels=[4], pad_multiple=2, latent_dim=5)).eval()
    x, cond, noise = torch.randn(2, 40), torch.randn(2, 3).double(), torch.randn(2, 5)
    mu, logvar = model.encode(x, cond)
    recon, mu2, logvar2 = model(x, cond, sample=True, noise=noise.double())
    assert torch.equal(mu2, mu) and torch.equal(logvar2, logvar)
    assert torch.allclose(recon, model.decode(mu + noise * torch.exp(0.5 * logvar), cond), atol=1e-6)
    assert torch.allclose(model(x, cond)[0], model.decode(mu, cond), atol=1e-6)  # eval: z = mu
    model.train()
    assert torch.allclose(model(x, cond, sample=False)[0], model.decode(mu, cond), atol=1e-6)


def test_loss_at_known_values_and_its_shape_checks():
    model = CVAE(arch(input_dim=2, condition_dim=1, channels=[4], pad_multiple=2, latent_dim=2, kl_weight=0.5))
    x, recon = torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2)
    mu, logvar = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    total, mse, kl = model.loss(x, recon, mu, logvar)
    # KL = -0.5 * ((1 + 1 - 4 - e) + (1 + 0 - 0 - 1)) = (2 + e) / 2
    assert mse.item() == 1.0 and kl.item() == pytest.approx((2 + math.e) / 2)
    assert total.item() == pytest.approx(1.0 + 0.5 * (2 + math.e) / 2)
    for args, message in [
        ((torch.ones(1, 2, 3), torch.ones(1, 2, 3), mu, logvar), "recon and x must both be [batch, D]; got [1, 2, 3] and [1, 2, 3]"),
        ((x, recon, torch.ones(1, 2), torch.ones(1, 3)), "mu and logvar must both be [batch, latent]; got [1, 2] and [1, 3]"),
        ((x, recon, torch.ones(3, 2), torch.ones(3, 2)), "mu and logvar must both be [batch, latent]; got [3, 2] and [3, 2]"),
    ]:
        with pytest.raises(ValueError) as err:
            model.loss(*args)
        assert str(err.value) == message


def test_encode_and_decode_name_the_bad_input():
    model = CVAE(arch(input_dim=40, condition_dim=3, channels=[4], pad_multiple=2, latent_dim=5))
    for call, message in [
        (lambda: model.encode(torch.ones(2, 40), torch.ones(2, 4)), "cond must have shape [batch, 3], got [2, 4]"),
        (lambda: model.encode(torch.ones(2, 40), torch.ones(1, 3)), "x and cond batch sizes differ: 2 vs 1"),
        (lambda: model.decode(torch.ones(2, 4), torch.ones(2, 3)), "z must have shape [batch, 5], got [2, 4]"),
        (lambda: model.decode(torch.ones(2, 5), torch.ones(3, 3)), "z and cond batch sizes differ: 2 vs 3"),
    ]:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message
