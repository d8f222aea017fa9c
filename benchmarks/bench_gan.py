"""Speed and memory of the synthesizer at COCO 65/15 settings (docs/design.md §6.5).

    python benchmarks/bench_gan.py [--device cpu|cuda|all] [--iterations 60] [--repeat 3]
                                   [--precision auto|fp32|bf16|both] [--reference] [--floor]
                                   [--rss-rows 4000000]

Prints, for each device: real samples per second of GAN training, the seconds one GAN epoch
(gan.epoch_budget samples) takes at that rate, the GFLOP/s this achieves (the matrix products of
one iteration, ``--floor``'s list, times iterations per second) against the device's measured
matrix-product peak in the same precision (a large square matmul, best of several), and the
process's peak RSS. The trainer runs WITHOUT the CLIP distillation (configs/coco_65_15.yaml has
``gan.distill: active``: a real iteration also encodes the generated and real images through
ViT-B/32), so the rates are upper bounds of a configured run's. The settings come
from configs/coco_65_15.yaml (batch 32, 5 critic steps, 4096-wide G and D, nz 300, 512-d
embeddings, 15 unseen classes); the features, embeddings and classifiers are generated here.

``--accuracy EPOCHS`` compares the unseen accuracy of fp32 and bf16 training on the separable
synthetic task of the tests, at COCO widths.

``--floor`` times only what no implementation of the method can skip: the matrix products of
one iteration (listed from the config's shapes, run back to back in the compute precision) and
the ``critic_iter + 1`` fused Adam steps over D's and G's parameters. Their sum bounds the
samples/s any trainer built on torch's kernels can reach on this machine.

``--reference`` also times a plain implementation of the published training loop (fp32, a G
forward per critic step, the gradient penalty by double backward, the for-loop Adam, a numpy
batch and a host sync every iteration) on the same machine, for a same-load comparison.

The memory check (``--rss-rows``, 0 to skip) writes a sparse 4-million-row feature file to
/tmp, runs the trainer's data path on it (label checks, the NaN/inf scan, epoch pools gathered
through memory maps, a few iterations) in a child process and reports its peak RSS; the file is
deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vldus.config import load_config  # noqa: E402
from vldus.data.splits import load_split  # noqa: E402
from vldus.synthesis.models import CompatClassifier, Critic, Generator, init_weights  # noqa: E402
from vldus.synthesis.trainer import GANTrainer, resolve_precision  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "coco_65_15.yaml")


def cpu_description() -> str:
    """CPU model and its bf16 matrix support (AMX changes the bf16 numbers several-fold)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "cpu: unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in info]
    return f"cpu: {model} ({os.cpu_count()} logical), {' '.join(flags) or 'no AVX2'}{'' if 'amx_bf16' in flags else ', no AMX'}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_problem(cfg, split, rows: int, seed: int = 0):
    """Random post-ReLU-like features with labels (bg + seen), embeddings and frozen classifiers."""
    g = torch.Generator().manual_seed(seed)
    dim, att = cfg.features.dim, 512
    labels = torch.tensor(split.seen_ids)[torch.randint(len(split.seen_ids), (rows,), generator=g)]
    labels[torch.rand(rows, generator=g) < 0.5] = 0
    feats = torch.relu(torch.randn(rows, dim, generator=g))
    emb = torch.randn(split.num_classes + 1, att, generator=g)
    emb = emb / torch.linalg.matrix_norm(emb, ord=2)
    seen_cls = nn.Linear(dim, split.num_classes + 1)
    compat = CompatClassifier(dim, emb[split.unseen_ids])
    return feats, labels, emb, seen_cls, compat


def build_trainer(cfg, split, emb, seen_cls, compat, device, precision):
    gan = cfg.gan
    G = Generator(gan.nz, emb.shape[1], gan.ngh, cfg.features.dim)
    D = Critic(cfg.features.dim, emb.shape[1], gan.ndh, gan.d_feat)
    gen = torch.Generator().manual_seed(gan.seed)
    init_weights(G, gen)
    init_weights(D, gen)
    return GANTrainer(G, D, emb, seen_cls, compat, split.unseen_ids, gan, device, precision, None, gan.seed)


# --------------------------------------------------------------------------------------------
# The published loop, written plainly (the comparison baseline)
# --------------------------------------------------------------------------------------------
class PlainG(nn.Module):
    def __init__(self, nz, att, hidden, out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(nz + att, hidden), nn.Linear(hidden, out)

    def forward(self, z, a):
        return F.relu(self.fc2(F.leaky_relu(self.fc1(torch.cat([z, a], 1)), 0.2)))


class PlainD(nn.Module):
    def __init__(self, x, att, hidden, feat):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(x + att, hidden), nn.Linear(hidden, feat), nn.Linear(feat, 1)

    def forward(self, x, a):
        h = F.leaky_relu(self.fc2(F.leaky_relu(self.fc1(torch.cat([x, a], 1)), 0.2)), 0.2)
        return h, self.fc3(h)


class ReferenceLoop:
    """One iteration as the released trainer runs it (numpy batch, per-step G forward,
    autograd double-backward penalty, for-loop Adam, unseen features without gradient)."""

    def __init__(self, cfg, split, feats, labels, emb, seen_cls, compat, device):
        gan = cfg.gan
        self.cfg, self.device = gan, torch.device(device)
        self.feats, self.labels = feats.numpy(), labels.numpy()
        self.emb = emb.numpy()
        self.G = PlainG(gan.nz, emb.shape[1], gan.ngh, feats.shape[1]).to(device)
        self.D = PlainD(feats.shape[1], emb.shape[1], gan.ndh, gan.d_feat).to(device)
        for m in (self.G, self.D):
            init_weights(m)
        self.seen_cls, self.compat = seen_cls.to(device), compat.to(device)
        for p in list(self.seen_cls.parameters()) + list(self.compat.parameters()):
            p.requires_grad_(False)
        kw = dict(lr=gan.lr, betas=(gan.beta1, 0.999), foreach=False)
        self.opt_g, self.opt_d = torch.optim.Adam(self.G.parameters(), **kw), torch.optim.Adam(self.D.parameters(), **kw)
        self.unseen_att = emb[split.unseen_ids].to(device)
        self.per = gan.batch_size // 4

    def iteration(self) -> float:
        gan, dev, B = self.cfg, self.device, self.cfg.batch_size
        idx = torch.randperm(len(self.labels))[:B].numpy()
        x = torch.from_numpy(self.feats[idx]).to(dev)
        y = torch.from_numpy(self.labels[idx]).to(dev)
        a = torch.from_numpy(self.emb[self.labels[idx]]).to(dev)
        for p in self.D.parameters():
            p.requires_grad_(True)
        for _ in range(gan.critic_iter):
            self.D.zero_grad()
            real = self.D(x, a)[1].mean()
            (-real).backward()
            fake = self.G(torch.randn(B, gan.nz, device=dev), a)
            fake_score = self.D(fake.detach(), a)[1].mean()
            fake_score.backward()
            alpha = torch.rand(B, 1, device=dev)
            interp = (alpha * x + (1 - alpha) * fake.detach()).requires_grad_(True)
            grad, = torch.autograd.grad(self.D(interp, a)[1].sum(), interp, create_graph=True)
            gp = gan.lambda_gp * ((grad.norm(2, dim=1) - 1) ** 2).mean()
            gp.backward()
            self.opt_d.step()
        for p in self.D.parameters():
            p.requires_grad_(False)
        self.G.zero_grad()
        z1, z2 = torch.randn(B, gan.nz, device=dev), torch.randn(B, gan.nz, device=dev)
        fake, fake2 = self.G(z1, a), self.G(z2, a)
        adv = -self.D(fake, a)[1].mean()
        ms = 1 / ((fake2 - fake).abs().mean() / (z2 - z1).abs().mean() + 1e-5)
        cls = F.cross_entropy(self.seen_cls(fake), y)
        with torch.no_grad():
            att_u = self.unseen_att.repeat_interleave(self.per, 0)
            fake_u = self.G(torch.randn(len(att_u), gan.nz, device=dev), att_u)
        y_u = torch.arange(len(self.unseen_att), device=dev).repeat_interleave(self.per)
        cls_u = F.cross_entropy(self.compat(fake_u), y_u)
        loss = adv + gan.cls_weight * cls + gan.lz_ratio * ms + gan.cls_weight_unseen * cls_u
        loss.backward()
        self.opt_g.step()
        return loss.item()  # the released trainer prints every iteration


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def time_ours(trainer, feats, labels, iterations: int, repeat: int, batch: int, warmup: int = 3) -> list[float]:
    dev = trainer.device
    f, l = feats.to(dev), labels.to(dev)
    g = torch.Generator().manual_seed(1)
    make = lambda n: torch.stack([torch.randperm(len(f), generator=g)[:batch] for _ in range(n)]).to(dev)
    trainer.train_epoch(f, l, make(warmup))
    rates = []
    for _ in range(repeat):
        batches = make(iterations)
        t0 = time.perf_counter()
        trainer.train_epoch(f, l, batches)  # ends with a device->host copy: synchronised
        rates.append(iterations * batch / (time.perf_counter() - t0))
    return rates


def time_reference(loop, iterations: int, repeat: int, batch: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        loop.iteration()
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(iterations):
            loop.iteration()
        rates.append(iterations * batch / (time.perf_counter() - t0))
    return rates


def report(name: str, rates: list[float], cfg) -> dict:
    best = max(rates)
    epoch_iters = math.ceil(cfg.gan.epoch_budget / cfg.gan.batch_size)
    seconds = epoch_iters * cfg.gan.batch_size / best
    print(f"  {name:<28} best {best:7.1f} samples/s  (runs: {', '.join(f'{r:.0f}' for r in rates)})  "
          f"-> {seconds:6.1f} s per GAN epoch of {cfg.gan.epoch_budget}")
    return {"samples_per_s": best, "runs": rates, "seconds_per_epoch": seconds}


def matmul_peak(device: str, precision: str, size: int = 4096, repeat: int = 5) -> float:
    """GFLOP/s of the best of ``repeat`` (size x size) @ (size x size) products on ``device``."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def add_gflops(res: dict, cfg, att: int, num_unseen: int, device: str, precision: str) -> None:
    """The achieved GFLOP/s of ``res`` (samples/s) and its share of the measured peak."""
    gflop = sum(2 * m * k * n * c for m, k, n, c in iteration_products(cfg, att, num_unseen)) / 1e9
    achieved = gflop * res["samples_per_s"] / cfg.gan.batch_size
    peak = matmul_peak(device, precision, 2048 if device == "cpu" else 4096)
    res.update(gflop_per_iteration=gflop, gflop_per_s=achieved, peak_gflop_per_s=peak,
               fraction_of_peak=achieved / peak)
    print(f"  {'':<28} {achieved:7.1f} GFLOP/s of products = {100 * achieved / peak:.1f} % of the "
          f"measured {precision} matmul peak ({peak:.0f} GFLOP/s)")


# --------------------------------------------------------------------------------------------
# Floor: the products and optimizer steps one iteration cannot avoid
# --------------------------------------------------------------------------------------------
def iteration_products(cfg, att: int, num_unseen: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count): the matrix products (M, K) @ (K, N) of one training iteration of the
    method (§6.3 with C_u back-propagated), each weight's forward, input-gradient and
    weight-gradient product, with the fewest rows the arithmetic allows (interpolates through
    the first layer for free, one G forward for all critic steps, embedding rows once)."""
    g = cfg.gan
    B, S, X, H, F_, Hg, nz = g.batch_size, g.critic_iter, cfg.features.dim, g.ndh, g.d_feat, g.ngh, g.nz
    U = (B // 4) * num_unseen                  # unseen rows of the G step
    R, Ad = 2 * B + U, B + num_unseen          # G-step rows, distinct embedding rows
    critic_step = [
        (2 * B, X, H, 1), (B, att, H, 1), (3 * B, H, F_, 1),     # forward: real+fake, a, + interpolates
        (3 * B, F_, H, 1), (B, H, X, 1),                          # backward to layer 1, penalty g
        (B, X, H, 1), (B, H, F_, 1),                              # back through g (double backward)
        (H, 3 * B, X, 1), (H, B, att, 1), (F_, 3 * B, H, 1),      # weight gradients
    ]
    fakes = [(S * B, nz, Hg, 1), (B, att, Hg, 1), (S * B, Hg, X, 1)]
    g_step = [
        (R, nz, Hg, 1), (Ad, att, Hg, 1), (R, Hg, X, 1),          # G forward
        (B, X, H, 1), (B, att, H, 1), (B, H, F_, 1),              # D on G(z1, a)
        (B, F_, H, 1), (B, H, X, 1), (U, att, X, 1),              # back through D and C_u
        (R, X, Hg, 1), (X, R, Hg, 1), (Hg, R, nz, 1), (Hg, Ad, att, 1),  # back through G
    ]
    return [(m, k, n, c * S) for m, k, n, c in critic_step] + fakes + g_step


def floor_check(cfg, att: int, num_unseen: int, precision: str, repeat: int = 5) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    prods = iteration_products(cfg, att, num_unseen)
    gflop = sum(2 * m * k * n * c for m, k, n, c in prods) / 1e9
    g = torch.Generator().manual_seed(0)
    operands = [(torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype), c)
                for m, k, n, c in prods]

    def products():
        for a, b, count in operands:
            for _ in range(count):
                a @ b

    gan = cfg.gan
    D = Critic(cfg.features.dim, att, gan.ndh, gan.d_feat)
    G = Generator(gan.nz, att, gan.ngh, cfg.features.dim)
    opts = []
    for net in (D, G):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opts.append(torch.optim.Adam(net.parameters(), lr=gan.lr, betas=(gan.beta1, 0.999), fused=True))

    def adam():
        for _ in range(gan.critic_iter):
            opts[0].step()
        opts[1].step()

    def best_of(fn):
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_mm, t_adam = best_of(products), best_of(adam)
    rate = gan.batch_size / (t_mm + t_adam)
    print(f"  floor ({precision}): products {gflop:.1f} GFLOP in {t_mm * 1e3:.1f} ms "
          f"({gflop / t_mm:.0f} GFLOP/s) + {gan.critic_iter + 1} Adam steps {t_adam * 1e3:.1f} ms "
          f"-> at most {rate:.0f} samples/s with nothing else done")
    return {"gflop": gflop, "products_ms": t_mm * 1e3, "adam_ms": t_adam * 1e3, "samples_per_s": rate}


# --------------------------------------------------------------------------------------------
# Memory check on a 4M-row file (child process)
# --------------------------------------------------------------------------------------------
def rss_child(folder: str, iterations: int) -> None:
    """Runs in a child process: the data path of run_synthesis on the big file."""
    from vldus.synthesis.data import FeatureFile, check_training_labels, sample_batches, sample_epoch_pool

    cfg = load_config(CONFIG)
    split = load_split(cfg.split)
    base = peak_rss_mb()
    t0 = time.time()
    ff = FeatureFile.open(os.path.join(folder, "train_0.6_0.3_feats.npy"),
                          os.path.join(folder, "train_0.6_0.3_labels.npy"), cfg.features.dim, split.num_classes)
    check_training_labels(ff, split)
    ff.check_finite(quiet=True)
    t_check = time.time() - t0
    _, _, emb, seen_cls, compat = make_problem(cfg, split, 8)
    precision = resolve_precision(cfg.gan.precision, "cpu")
    trainer = build_trainer(cfg, split, emb, seen_cls, compat, "cpu", precision)
    labels = torch.from_numpy(ff.labels)
    fg, bg = torch.nonzero(labels > 0).squeeze(1), torch.nonzero(labels == 0).squeeze(1)
    sampler = torch.Generator().manual_seed(0)
    t_gather = 0.0
    for epoch in range(2):
        pool = sample_epoch_pool(labels, cfg.gan.epoch_budget, sampler, fg, bg)
        batches = sample_batches(len(pool), cfg.gan.batch_size, sampler)
        t0 = time.time()
        feats = ff.gather(pool)
        t_gather += time.time() - t0
        trainer.train_epoch(feats, labels[pool], batches[:iterations], epoch + 1)
        del feats
    print(json.dumps({"rows": ff.num_rows, "peak_rss_mb": peak_rss_mb(), "start_rss_mb": base,
                      "nan_scan_s": t_check, "pool_gather_s": t_gather / 2}))


def rss_check(rows: int, iterations: int) -> dict:
    cfg = load_config(CONFIG)
    split = load_split(cfg.split)
    folder = tempfile.mkdtemp(prefix="vldus_bench_", dir="/tmp")
    try:
        feats = np.lib.format.open_memmap(os.path.join(folder, "train_0.6_0.3_feats.npy"), mode="w+",
                                          dtype=np.float32, shape=(rows, cfg.features.dim))
        rng = np.random.default_rng(0)
        labels = np.zeros(rows, np.int64)
        fg = rng.random(rows) < 1 / 3  # a third foreground, as extraction keeps F fg + 2F bg
        labels[fg] = rng.choice(split.seen_ids, size=int(fg.sum()))
        labels[:len(split.seen_ids)] = split.seen_ids  # every seen class present
        # sparse: only every 1000th row is written, the rest stay holes (zeros)
        written = np.arange(0, rows, 1000)
        feats[written] = rng.random((len(written), cfg.features.dim), dtype=np.float32)
        feats.flush()
        del feats
        np.save(os.path.join(folder, "train_0.6_0.3_labels.npy"), labels)
        out = subprocess.run([sys.executable, __file__, "--rss-child", folder, "--iterations", str(iterations)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Accuracy: bf16 against fp32 on a separable synthetic task at COCO widths
# --------------------------------------------------------------------------------------------
def accuracy_check(epochs: int) -> dict:
    """Train stage 3 on tests/synthesis_task.py's task with 1024-d features and COCO's G/D widths
    in both precisions; the per-epoch unseen test accuracies (recorded, as --select-on-test
    does) and the final classifier's accuracy."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from synthesis_task import make_task, train_compat
    from vldus.cli import main as vldus_main

    cfg = load_config(CONFIG)
    gan = cfg.gan
    out = {}
    with tempfile.TemporaryDirectory(prefix="vldus_acc_") as folder:
        task = make_task(folder, dim=cfg.features.dim, att_dim=8, overrides={
            "gan.nz": gan.nz, "gan.ngh": gan.ngh, "gan.ndh": gan.ndh, "gan.d_feat": gan.d_feat,
            "gan.batch_size": gan.batch_size, "gan.lr": 1e-4, "gan.epochs": epochs,
            "unseen_classifier.syn_num": 250, "unseen_classifier.epochs": 15, "unseen_classifier.lr": 1e-4})
        train_compat(task)
        for precision in ("fp32", "bf16"):
            run_dir = os.path.join(folder, precision)
            vldus_main(["train-generator", "--config", task.config, "--quiet", "--select-on-test",
                        "--out-dir", run_dir, "--set", f"gan.precision={precision}"])
            log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
            curve = [max(r["test_accuracy"]) for r in log]
            out[precision] = {"per_epoch": curve, "mean": float(np.mean(curve)),
                              "last_epoch": curve[-1], "samples_per_s": float(np.mean([r["samples_per_s"] for r in log]))}
            print(f"  {precision}: unseen accuracy per GAN epoch {' '.join(f'{a:.2f}' for a in curve)} "
                  f"(mean {out[precision]['mean']:.3f})")
    return out


def main() -> None:
    torch.set_flush_denormal(True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="all", help="cpu | cuda | all (cpu, and cuda when present)")
    ap.add_argument("--iterations", type=int, default=60, help="timed iterations per run")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (the best is reported)")
    ap.add_argument("--precision", default=None, help="auto | fp32 | bf16 | both (default: config, and fp32)")
    ap.add_argument("--reference", action="store_true", help="also time the plain published loop")
    ap.add_argument("--floor", action="store_true",
                    help="also time only the unavoidable matrix products and Adam steps (CPU)")
    ap.add_argument("--legacy", action="store_true",
                    help="also time gan.legacy_unseen_loss=true (the released C_u term: no gradient, "
                         "so no backward through the unseen batch)")
    ap.add_argument("--rss-rows", type=int, default=4_000_000, help="rows of the memory-check file (0: skip)")
    ap.add_argument("--accuracy", type=int, default=0, metavar="EPOCHS",
                    help="also compare unseen accuracy fp32 vs bf16 on a synthetic task (GAN epochs)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.iterations)
        return

    cfg = load_config(CONFIG)
    split = load_split(cfg.split)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "all" else [args.device]
    results = {"load_before": os.getloadavg(), "threads": torch.get_num_threads()}
    feats, labels, emb, seen_cls, compat = make_problem(cfg, split, 20_000)
    print(f"COCO 65/15 settings: batch {cfg.gan.batch_size}, critic_iter {cfg.gan.critic_iter}, "
          f"ngh/ndh {cfg.gan.ngh}/{cfg.gan.ndh}, nz {cfg.gan.nz}, att {emb.shape[1]}, "
          f"unseen {len(split.unseen_ids)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(cpu_description())
    results["cpu"] = cpu_description()
    for device in devices:
        print(f"device {device}:")
        if args.precision == "both":
            precisions = ["bf16", "fp32"]
        elif args.precision is None:
            precisions = [resolve_precision(cfg.gan.precision, device), "fp32"]
        else:
            precisions = [resolve_precision(args.precision, device)]
        for precision in dict.fromkeys(precisions):
            trainer = build_trainer(cfg, split, emb, seen_cls, compat, device, precision)
            res = report(f"vldus ({precision}, no distillation)", time_ours(
                trainer, feats, labels, args.iterations, args.repeat, cfg.gan.batch_size), cfg)
            add_gflops(res, cfg, emb.shape[1], len(split.unseen_ids), device, precision)
            results[f"{device}/vldus/{precision}"] = dict(res, distillation=False)
            del trainer
        if args.legacy:
            legacy_cfg = load_config(CONFIG, ["gan.legacy_unseen_loss=true"])
            precision = resolve_precision(cfg.gan.precision, device)
            trainer = build_trainer(legacy_cfg, split, emb, seen_cls, compat, device, precision)
            results[f"{device}/vldus_legacy/{precision}"] = report(f"vldus ({precision}, legacy C_u)", time_ours(
                trainer, feats, labels, args.iterations, args.repeat, cfg.gan.batch_size), cfg)
            del trainer
        if args.reference:
            loop = ReferenceLoop(cfg, split, feats, labels, emb, seen_cls, compat, device)
            results[f"{device}/reference"] = report("published loop (fp32)", time_reference(
                loop, max(args.iterations // 3, 5), args.repeat, cfg.gan.batch_size), cfg)
            del loop
        if args.floor and device == "cpu":
            for precision in dict.fromkeys(precisions):
                results[f"cpu/floor/{precision}"] = floor_check(cfg, emb.shape[1], len(split.unseen_ids), precision)
        print(f"  peak RSS so far: {peak_rss_mb():.0f} MB")
    if args.rss_rows:
        r = rss_check(args.rss_rows, iterations=5)
        results["rss_check"] = r
        print(f"memory check: {r['rows']:,} x {cfg.features.dim} feature file: peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(NaN/inf scan {r['nan_scan_s']:.1f} s, epoch pool gather {r['pool_gather_s']:.1f} s)")
    if args.accuracy:
        print(f"accuracy check (synthetic separable task, {cfg.features.dim}-d features, COCO G/D widths):")
        results["accuracy"] = accuracy_check(args.accuracy)
    results["load_after"] = os.getloadavg()
    print("load average after:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
