"""The synthesizer's GAN mechanics: critic update (penalty, hand-written backward), generator
losses and where their gradients go, distillation gradients, precision, divergence."""
import copy
import dataclasses

import pytest
import torch

from vldus.config import GanConfig
from vldus.synthesis.critic_step import CriticUpdate
from vldus.synthesis.models import CompatClassifier, Critic, Generator, init_weights
from vldus.synthesis.trainer import GANTrainer, NonFiniteLoss, mode_seeking_loss

DIM, ATT, CLASSES, UNSEEN = 16, 6, 7, [2, 5]


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_critic(seed=0, x_dim=12, att=5, hidden=24, feat=8):
    torch.manual_seed(seed)
    critic = Critic(x_dim, att, hidden, feat)
    for p in critic.parameters():  # larger than the N(0, 0.02) init: masks of both signs
        p.data.normal_(0, 0.3)
    return critic


def autograd_critic_loss(critic, x, fake, att, alpha, lambda_gp, feat_weights=None):
    """The published critic loss, the penalty by autograd's double backward."""
    feat_real, s_real = critic(x, att)
    feat_fake, s_fake = critic(fake, att)
    interp = (alpha * x + (1 - alpha) * fake).requires_grad_(True)
    _, s_interp = critic(interp, att)
    grad, = torch.autograd.grad(s_interp.sum(), interp, create_graph=True)
    gp = lambda_gp * ((grad.norm(2, dim=1) - 1) ** 2).mean()
    loss = -(s_real.mean() - s_fake.mean()) + gp
    if feat_weights is not None:  # a linear loss on the features, like the distillation's entry
        loss = loss + (torch.cat([feat_real, feat_fake]) * feat_weights).sum()
    return loss, gp


@pytest.mark.parametrize("with_feature_loss", [False, True])
def test_critic_update_matches_double_backward(with_feature_loss):
    critic = toy_critic()
    B = 6
    g = torch.Generator().manual_seed(1)
    x, fake = torch.randn(B, 12, generator=g).relu(), torch.randn(B, 12, generator=g).relu()
    att, alpha = torch.randn(B, 5, generator=g), torch.rand(B, 1, generator=g)
    feat_w = torch.randn(2 * B, 8, generator=g) if with_feature_loss else None
    loss, gp = autograd_critic_loss(critic, x, fake, att, alpha, 10.0, feat_w)
    expected = torch.autograd.grad(loss, list(critic.parameters()))

    update = CriticUpdate(critic, 10.0, "fp32")
    loss = update.backward(update.forward(x, fake, att, alpha), feat_w)
    assert torch.allclose(loss.gp, gp, rtol=1e-5)
    for (name, p), e in zip(critic.named_parameters(), expected):
        assert torch.allclose(p.grad, e, rtol=1e-4, atol=1e-5), name


def test_gradient_penalty_by_hand():
    """A critic small enough to write its input gradient down: W1x^T diag(m1) W2^T diag(m2) w3."""
    critic = toy_critic(x_dim=3, att=2, hidden=4, feat=2)
    x, fake = torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[0.0, 2.0, 1.0]])
    att, alpha = torch.tensor([[0.3, -0.2]]), torch.tensor([[0.25]])
    xi = alpha * x + (1 - alpha) * fake
    pre1 = xi @ critic.fc1_x.weight.T + critic.fc1_x.bias + att @ critic.fc1_att.weight.T
    m1 = torch.where(pre1 > 0, 1.0, 0.2)
    pre2 = (pre1 * m1) @ critic.fc2.weight.T + critic.fc2.bias
    m2 = torch.where(pre2 > 0, 1.0, 0.2)
    grad = ((m2 * critic.fc3.weight) @ critic.fc2.weight * m1) @ critic.fc1_x.weight
    by_hand = 10.0 * (grad.norm() - 1) ** 2
    update = CriticUpdate(critic, 10.0, "fp32")
    loss = update.backward(update.forward(x, fake, att, alpha))
    assert torch.allclose(loss.grad_x, grad, atol=1e-6)
    assert torch.allclose(loss.gp, by_hand, rtol=1e-5)


def test_critic_update_bf16_close_to_fp32():
    critic = toy_critic(x_dim=64, att=8, hidden=128, feat=32)
    g = torch.Generator().manual_seed(2)
    x, fake = torch.randn(16, 64, generator=g).relu(), torch.randn(16, 64, generator=g).relu()
    att, alpha = torch.randn(16, 8, generator=g), torch.rand(16, 1, generator=g)
    grads = {}
    for precision in ("fp32", "bf16"):
        update = CriticUpdate(critic, 10.0, precision)
        update.backward(update.forward(x, fake, att, alpha))
        grads[precision] = torch.cat([p.grad.flatten() for p in critic.parameters()])
    cos = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cos > 0.99


def test_mode_seeking_formula():
    g = torch.Generator().manual_seed(3)
    f1, f2 = torch.rand(4, 10, generator=g), torch.rand(4, 10, generator=g)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    ratio = (f2 - f1).abs().sum() / 40 / ((z2 - z1).abs().sum() / 12)
    assert torch.allclose(mode_seeking_loss(f1, f2, z1, z2), 1 / (ratio + 1e-5))


# --------------------------------------------------------------------------------------------
# A tiny trainer
# --------------------------------------------------------------------------------------------
def make_trainer(distiller=None, precision="fp32", d_feat=8, dim=DIM, **gan_changes):
    settings = dict(nz=4, ngh=32, ndh=32, d_feat=d_feat, batch_size=8, critic_iter=2, lr=1e-3,
                    distill_rows=3)
    gan = dataclasses.replace(GanConfig(), **{**settings, **gan_changes})
    gen = torch.Generator().manual_seed(0)
    G, D = Generator(gan.nz, ATT, gan.ngh, dim), Critic(dim, ATT, gan.ndh, gan.d_feat)
    init_weights(G, gen)
    init_weights(D, gen)
    emb = torch.randn(CLASSES + 1, ATT, generator=gen)
    seen = torch.nn.Linear(dim, CLASSES + 1)
    compat = CompatClassifier(dim, emb[UNSEEN])
    for m in (seen, compat.fc):
        torch.nn.init.normal_(m.weight, 0, 0.5, generator=gen)
        torch.nn.init.zeros_(m.bias)
    return GANTrainer(G, D, emb, seen, compat, UNSEEN, gan, "cpu", precision, distiller, seed=0)


def batch(dim=DIM):
    g = torch.Generator().manual_seed(5)
    return torch.rand(8, dim, generator=g), torch.tensor([0, 1, 3, 4, 6, 7, 1, 0])


def g_grads_after_step(trainer, x, y):
    trainer.generator_step(x, y)
    return torch.cat([p.grad.flatten() for p in trainer.G.parameters()])


@pytest.mark.parametrize("legacy", [False, True])
def test_unseen_classifier_loss_reaches_generator_unless_legacy(legacy):
    x, y = batch()
    with_loss = make_trainer(legacy_unseen_loss=legacy, cls_weight_unseen=1.0)
    without = make_trainer(legacy_unseen_loss=legacy, cls_weight_unseen=0.0)
    diff = (g_grads_after_step(with_loss, x, y) - g_grads_after_step(without, x, y)).abs().max()
    if legacy:
        assert diff == 0  # released behaviour: detached features, the term is a constant
    else:
        assert diff > 1e-6


@pytest.fixture
def distill_setup(tiny_clip):
    from vldus.synthesis.distill import build_distiller

    def build(mode, w_fa=0.0, w_ra_dis=0.0, w_ra_div=0.0):
        cfg = dataclasses.replace(GanConfig(), distill=mode, clip_arch=tiny_clip.arch,
                                  clip_weights=tiny_clip.weights_path, d_feat=512, precision="fp32",
                                  w_fa=w_fa, w_ra_dis=w_ra_dis, w_ra_div=w_ra_div)
        text = torch.randn(CLASSES + 1, 512, generator=torch.Generator().manual_seed(9))
        return build_distiller(cfg, text, "cpu")
    return build


def _d_and_g_grads(trainer, x, y):
    trainer.critic_steps(x, y)
    d = torch.cat([p.grad.flatten().clone() for p in trainer.D.parameters()])
    return d, g_grads_after_step(trainer, x, y)


@pytest.mark.parametrize("term,reaches_critic", [("w_fa", True), ("w_ra_dis", True), ("w_ra_div", False)])
def test_distillation_gradients_active_not_logged(distill_setup, term, reaches_critic):
    """Each term of L_fa / L_ra changes the updates of D (not L_ra^div: it only sees CLIP's
    view of the fakes) and of G when active; logged leaves them exactly as without it."""
    x, y = batch(dim=64)  # 64 = 8x8 feature maps for the CLIP encoder
    weights = {term: 1.0}
    off_d, off_g = _d_and_g_grads(make_trainer(None, d_feat=512, dim=64), x, y)
    act_d, act_g = _d_and_g_grads(make_trainer(distill_setup("active", **weights), d_feat=512, dim=64), x, y)
    log_d, log_g = _d_and_g_grads(make_trainer(distill_setup("logged", **weights), d_feat=512, dim=64), x, y)
    assert torch.equal(log_d, off_d) and torch.equal(log_g, off_g)
    assert (act_g - off_g).abs().max() > 1e-7
    if reaches_critic:
        assert (act_d - off_d).abs().max() > 1e-7
    else:
        assert torch.equal(act_d, off_d)


def test_clip_encodes_three_batches_per_iteration(distill_setup):
    """CLIP sees, per iteration, the real batch once, the critic steps' fakes once (one batch:
    they are data for the critic) and the G step's fakes once; the weights equal those of
    encoding everything afresh at every call."""
    x, y = batch(dim=64)
    cached = make_trainer(distill_setup("active", w_fa=1.0, w_ra_dis=1.0), d_feat=512, dim=64)
    fresh = make_trainer(distill_setup("active", w_fa=1.0, w_ra_dis=1.0), d_feat=512, dim=64)
    forward = fresh.distiller.forward
    fresh.distiller.forward = lambda *args: forward(*args[:4])  # drop img_real / img_fake: re-encode
    calls = []
    cached.distiller.encoder.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    iterations = 2
    rows = torch.arange(8).repeat(iterations, 1)
    cached.train_epoch(x, y, rows)
    fresh.train_epoch(x, y, rows)
    r = cached.cfg.distill_rows
    assert calls == [r, cached.cfg.critic_iter * r, r] * iterations
    for a, b in zip(list(cached.G.parameters()) + list(cached.D.parameters()),
                    list(fresh.G.parameters()) + list(fresh.D.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_logged_distill_is_the_released_critic_loop_block(distill_setup, monkeypatch):
    """logged: in every critic step, one random row, a fresh fake, the released image path;
    the last step's terms are recorded (L_ra^div = 0 with one row), nothing in L_G, and the
    weights are exactly those of training without distillation."""
    x, y = batch(dim=64)
    trainer = make_trainer(distill_setup("logged", w_fa=0.005, w_ra_dis=0.01, w_ra_div=0.001),
                           d_feat=512, dim=64)
    calls = []
    released = trainer.distiller.released_terms
    monkeypatch.setattr(trainer.distiller, "released_terms",
                        lambda *a: calls.append([t.shape[0] for t in a]) or released(*a))
    image_calls = []
    from vldus.synthesis import distill

    to_images = distill.features_to_clip_images_released
    monkeypatch.setattr(distill, "features_to_clip_images_released",
                        lambda *a: image_calls.append(1) or to_images(*a))
    d_stats = trainer.critic_steps(x, y)
    g_stats = trainer.generator_step(x, y)
    assert calls == [[1, 1, 1, 1]] * trainer.cfg.critic_iter  # one row per critic step
    assert len(image_calls) == 2 * trainer.cfg.critic_iter  # real and fake row, released path
    distill_d, (distill_g, l_fa, l_ra_dis, l_ra_div) = d_stats[3], g_stats[5:]
    assert l_fa > 0 and l_ra_dis > 0 and l_ra_div == 0 and distill_g == 0
    assert torch.allclose(distill_d, l_fa + l_ra_dis)
    assert torch.equal(d_stats[0], d_stats[2] - d_stats[1])  # not in the critic loss

    off = make_trainer(None, d_feat=512, dim=64)
    rows = torch.arange(8).repeat(2, 1)
    off.train_epoch(x, y, rows)
    logged = make_trainer(distill_setup("logged", w_fa=1.0), d_feat=512, dim=64)
    logged.train_epoch(x, y, rows)
    for a, b in zip(list(off.G.parameters()) + list(off.D.parameters()),
                    list(logged.G.parameters()) + list(logged.D.parameters())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("term", ["w_fa", "w_ra_dis"])
def test_distill_into_d_only_leaves_the_generator_step(distill_setup, term):
    """d_only (the released design): the critic steps are those of d_and_g, the generator
    step is exactly that without distillation."""
    import copy

    x, y = batch(dim=64)
    off_d, _ = _d_and_g_grads(make_trainer(None, d_feat=512, dim=64), x, y)
    both = make_trainer(distill_setup("active", **{term: 1.0}), d_feat=512, dim=64)
    only = make_trainer(distill_setup("active", **{term: 1.0}), d_feat=512, dim=64, distill_into="d_only")
    for t in (both, only):
        t.critic_steps(x, y)
    assert all(torch.equal(a, b) for a, b in zip(both.D.parameters(), only.D.parameters()))
    assert (torch.cat([p.grad.flatten() for p in only.D.parameters()]) - off_d).abs().max() > 1e-7
    plain = copy.deepcopy(only)  # same D and G, no distiller in the G step
    plain.distiller = None
    only_g, plain_g, both_g = (g_grads_after_step(t, x, y) for t in (only, plain, both))
    assert torch.equal(only_g, plain_g) and (both_g - plain_g).abs().max() > 1e-7
    stats = only.generator_step(x, y)
    assert stats[5] == 0 and stats[6 if term == "w_fa" else 7] > 0  # terms logged from the critic


def test_bad_distill_into_is_refused():
    from vldus.errors import InputError

    with pytest.raises(InputError, match="gan.distill_into: 'g_only'"):
        make_trainer(distill_into="g_only")


def test_active_distill_without_clip_weights_is_refused():
    from vldus.errors import InputError
    from vldus.synthesis.distill import build_distiller

    with pytest.raises(InputError, match="clip_weights"):
        build_distiller(dataclasses.replace(GanConfig(), distill="active", clip_weights=None),
                        torch.zeros(3, 512), "cpu")


def test_epoch_is_deterministic_and_bf16_runs():
    x, y = batch()
    feats, labels = torch.rand(40, DIM), torch.randint(0, CLASSES + 1, (40,))
    batches = torch.stack([torch.randperm(40)[:8] for _ in range(4)])
    results = []
    for precision in ("fp32", "fp32", "bf16"):
        trainer = make_trainer(precision=precision)
        history = trainer.train_epoch(feats, labels, batches)
        assert history.shape == (4, 13) and torch.isfinite(history).all()
        results.append(torch.cat([p.detach().flatten() for p in trainer.G.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_non_finite_loss_names_epoch_and_iteration():
    trainer = make_trainer(lr=1e30)
    feats, labels = torch.rand(40, DIM), torch.randint(0, CLASSES + 1, (40,))
    batches = torch.stack([torch.randperm(40)[:8] for _ in range(60)])
    with pytest.raises(NonFiniteLoss) as e:
        trainer.train_epoch(feats, labels, batches, epoch=3)
    assert e.value.epoch == 3 and 1 <= e.value.iteration <= 60
    assert "epoch 3, iteration" in str(e.value)


def test_state_dict_round_trip_continues_identically():
    feats, labels = torch.rand(40, DIM), torch.randint(0, CLASSES + 1, (40,))
    batches = torch.stack([torch.randperm(40)[:8] for _ in range(3)])
    a = make_trainer()
    a.train_epoch(feats, labels, batches)
    b = make_trainer()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.train_epoch(feats, labels, batches)
    b.train_epoch(feats, labels, batches)
    for pa, pb in zip(list(a.G.parameters()) + list(a.D.parameters()),
                      list(b.G.parameters()) + list(b.D.parameters())):
        assert torch.equal(pa, pb)
