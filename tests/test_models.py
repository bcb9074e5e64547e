import pytest
import torch

from driftops.errors import DriftopsError
from driftops.models import Generator, VelocityField


def test_generator_shapes_and_sampling():
    torch.manual_seed(0)
    gen = Generator(noise_dim=8, out_dim=3, hidden=32, blocks=2)
    z = torch.randn(5, 8)
    out = gen(z)
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    assert torch.equal(gen(z), out)
    a = gen.sample(7, generator=torch.Generator().manual_seed(1))
    b = gen.sample(7, generator=torch.Generator().manual_seed(1))
    assert a.shape == (7, 3) and torch.equal(a, b)
    assert gen.double().sample(4).dtype == torch.float64


def test_generator_default_protocol_size():
    gen = Generator()
    assert len(gen.net.blocks) == 6 and gen.net.inp.in_features == 16 and gen.net.inp.out_features == 256
    assert gen.sample(3).shape == (3, 2)


def test_conditioning_changes_outputs():
    torch.manual_seed(0)
    gen = Generator(noise_dim=4, out_dim=2, hidden=32, blocks=2, num_classes=3)
    z = torch.randn(6, 4)
    out0 = gen(z, torch.zeros(6, dtype=torch.long))
    out1 = gen(z, torch.ones(6, dtype=torch.long))
    assert out0.shape == (6, 2) and (out0 - out1).abs().max() > 1e-3
    mixed = gen(z, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert torch.allclose(mixed[::2], out0[::2]) and torch.allclose(mixed[1::2], out1[1::2])
    assert gen.sample(4, labels=torch.tensor([2, 2, 0, 1])).shape == (4, 2)


def test_generator_errors():
    cond = Generator(noise_dim=4, hidden=16, blocks=1, num_classes=3)
    plain = Generator(noise_dim=4, hidden=16, blocks=1)
    z = torch.randn(2, 4)
    with pytest.raises(DriftopsError, match="unconditional"):
        plain(z, torch.zeros(2, dtype=torch.long))
    with pytest.raises(DriftopsError, match="pass labels"):
        cond(z)
    with pytest.raises(DriftopsError, match=r"\[0, 3\)"):
        cond(z, torch.tensor([0, 3]))
    with pytest.raises(DriftopsError, match=r"shape \(2,\)"):
        cond(z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(DriftopsError, match=r"\(N, 4\)"):
        plain(torch.randn(2, 5))


@pytest.mark.parametrize("embedding", ["sinusoidal", "fourier"])
def test_velocity_field(embedding):
    torch.manual_seed(0)
    v = VelocityField(dim=3, hidden=32, blocks=2, time_embedding=embedding, time_features=8)
    x = torch.randn(5, 3)
    out = v(x, 0.3)
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    assert torch.allclose(v(x, torch.full((5,), 0.3)), out)
    assert torch.allclose(v(x, torch.tensor(0.3)), out)
    per_point = v(x, torch.tensor([0.0, 0.3, 1.0, 0.3, 0.5]))
    assert torch.allclose(per_point[[1, 3]], out[[1, 3]])
    assert (per_point[0] - out[0]).abs().max() > 1e-4


def test_velocity_field_errors():
    v = VelocityField(dim=2, hidden=16, blocks=1)
    with pytest.raises(DriftopsError, match=r"\(N, 2\)"):
        v(torch.randn(4, 3), 0.5)
    with pytest.raises(DriftopsError, match=r"shape \(4,\)"):
        v(torch.randn(4, 2), torch.zeros(3))
    with pytest.raises(DriftopsError, match="sinusoidal"):
        VelocityField(time_embedding="learned")


def test_wide_generator_is_the_papers_network():
    """hidden 256, 6 blocks of Linear(h, 2h), LayerNorm, SiLU, Linear(2h, h), LayerNorm after an input LayerNorm;
    residual scale 0.9, output weights of std 0.001 and zero bias, noise 16: 1,592,066 parameters."""
    torch.manual_seed(0)
    gen = Generator(arch="wide")
    assert sum(p.numel() for p in gen.parameters()) == 1_592_066
    net = gen.net
    assert isinstance(net.inp_norm, torch.nn.LayerNorm) and net.residual_scale == 0.9 and len(net.blocks) == 6
    kinds = [type(m).__name__ for m in net.blocks[0]]
    assert kinds == ["Linear", "LayerNorm", "SiLU", "Linear", "LayerNorm"]
    assert net.blocks[0][0].weight.shape == (512, 256) and net.blocks[0][3].weight.shape == (256, 512)
    assert abs(float(net.out.weight.detach().std()) - 1e-3) < 2e-4 and float(net.out.bias.detach().abs().max()) == 0
    z = torch.randn(7, 16)
    h = net.inp_norm(net.inp(z))
    for block in net.blocks:
        h = h + 0.9 * block(h)
    torch.testing.assert_close(gen(z), net.out(h))
    with pytest.raises(DriftopsError, match="compact"):
        Generator(arch="huge")
