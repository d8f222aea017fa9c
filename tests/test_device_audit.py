"""Stage 3 on a non-CPU device, audited (tests/device_audit.py): no random op draws from a
generator on another device, and the hot loops read nothing back to the host.

The ``meta`` device stands in for CUDA; the number of host reads must not grow with the number
of iterations (the GAN: one NaN check per CHECK_EVERY iterations and the history copy; the
classifiers: one read per epoch).
"""
import dataclasses

import numpy as np
import pytest
import torch

from device_audit import DeviceAudit, generator_device, meta_generators
from synthesis_task import make_task
from vldus.config import GanConfig, load_config
from vldus.data.embeddings import load_class_embeddings
from vldus.errors import InputError
from vldus.synthesis.compat import train_compat_classifier
from vldus.synthesis.data import FeatureFile, feature_file_paths
from vldus.synthesis.models import CompatClassifier, Critic, Generator, init_weights
from vldus.synthesis.trainer import GANTrainer
from vldus.synthesis.unseen_classifier import LabelledFeatures, train_unseen_classifier

pytestmark = pytest.mark.usefixtures("one_thread")
META = torch.device("meta")
DIM, ATT, CLASSES, UNSEEN = 16, 6, 7, [2, 5]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("task"), per_class=40)


def _features(task, data_split="train"):
    cfg = load_config(task.config)
    split = cfg.load_split()
    paths = feature_file_paths(task.features_dir, data_split, cfg.features.fg_iou, cfg.features.bg_iou)
    return cfg, split, FeatureFile.open(*paths, cfg.features.dim, split.num_classes)


def _compat_run(task, batch_size):
    cfg, split, features = _features(task)
    emb = load_class_embeddings(task.embeddings, split, False)
    compat = dataclasses.replace(cfg.compat, epochs=1, batch_size=batch_size, val_batch_size=batch_size)
    audit = DeviceAudit()
    with audit:
        train_compat_classifier(features, emb, split.seen_ids, compat, device="meta", quiet=True)
    return audit


def test_compat_classifier_on_another_device(task):
    """The initial weights are not drawn on the CPU into device tensors (the CUDA crash of
    stage 3), and an epoch reads its losses back once and uploads each chunk of rows once,
    however many batches it has."""
    few, many = _compat_run(task, 256), _compat_run(task, 64)
    assert few.generator_mismatches == [] and many.generator_mismatches == []
    assert len(many.syncs) == len(few.syncs), many.syncs
    assert len(many.uploads) == len(few.uploads), many.uploads


def _gan_trainer(device=META, **changes) -> GANTrainer:
    gan = dataclasses.replace(GanConfig(), **{**dict(nz=4, ngh=32, ndh=32, d_feat=8, batch_size=8,
                                                     critic_iter=3, lr=1e-3), **changes})
    gen = torch.Generator().manual_seed(0)
    G, D = Generator(gan.nz, ATT, gan.ngh, DIM), Critic(DIM, ATT, gan.ndh, gan.d_feat)
    init_weights(G, gen)
    init_weights(D, gen)
    emb = torch.randn(CLASSES + 1, ATT, generator=gen)
    return GANTrainer(G, D, emb, torch.nn.Linear(DIM, CLASSES + 1), CompatClassifier(DIM, emb[UNSEEN]),
                      UNSEEN, gan, device, "fp32", None, seed=0)


@pytest.mark.parametrize("legacy_unseen_loss", [False, True])
def test_gan_iterations_do_not_synchronise(monkeypatch, legacy_unseen_loss):
    """Critic and generator steps on the device: no upload and no host read per iteration, only
    the epoch's NaN check and history copy; the noise comes from a generator on the device."""
    with meta_generators(monkeypatch):
        trainer = _gan_trainer(legacy_unseen_loss=legacy_unseen_loss)
        feats = torch.empty(40, DIM, device=META)
        labels = torch.zeros(40, dtype=torch.int64, device=META)
        counts = []
        for iterations in (2, 6):
            batches = torch.zeros(iterations, 8, dtype=torch.int64, device=META)
            audit = DeviceAudit()
            with audit:
                history = trainer.train_epoch(feats, labels, batches)
            assert history.shape[0] == iterations
            assert audit.generator_mismatches == [] and audit.uploads == [], audit.uploads
            counts.append(len(audit.syncs))
        assert counts[0] == counts[1] <= 2, audit.syncs

    # synthesis draws its noise from a CPU generator (the same rows on every device) and uploads it
    # once per chunk
    audit = DeviceAudit()
    with audit:
        trainer.synthesize(torch.empty(2, ATT, device=META), 3, torch.Generator().manual_seed(1))
    assert audit.generator_mismatches == [] and audit.syncs == [] and len(audit.uploads) == 1


def test_every_synthesis_draws_its_noise_on_the_cpu(monkeypatch):
    """Classifier training rows and calibration rows: the noise generator is a CPU one whatever
    G's device (a generator on G's device gave other features on CUDA than on the CPU)."""
    from types import SimpleNamespace

    from vldus.synthesis import calibrate, pipeline
    from vldus.synthesis.models import synthesize

    devices = []

    def spy(G, att, num, noise, chunk=8192):
        devices.append(generator_device(noise))
        return synthesize(G, att, num, noise, chunk)

    class Calibrated(Exception):
        pass

    def stop(*args, **kwargs):
        raise Calibrated

    with meta_generators(monkeypatch), DeviceAudit():
        trainer = _gan_trainer()
        monkeypatch.setattr(calibrate, "synthesize", spy)
        monkeypatch.setattr(calibrate, "calibrate", stop)
        with pytest.raises(Calibrated):
            calibrate.calibrate_generator(torch.zeros(4, DIM), trainer.G, torch.zeros(2, ATT), torch.zeros(3, ATT),
                                          (torch.zeros(1), torch.zeros(1)), (torch.zeros(1), torch.zeros(1)), None,
                                          SimpleNamespace(gate_fit="margin", bg_blend=0, gzsd_min_separation=0), 0, "src")
        cfg = SimpleNamespace(gan=SimpleNamespace(seed=0),
                              unseen_classifier=SimpleNamespace(syn_num=3, bg_multiplier=1))
        inputs = SimpleNamespace(embeddings=np.zeros((CLASSES + 1, ATT), np.float32),
                                 split=SimpleNamespace(unseen_ids=UNSEEN),
                                 train=SimpleNamespace(labels=np.zeros(5, np.int64),
                                                       gather=lambda rows: torch.zeros(len(rows), DIM)))
        monkeypatch.setattr(trainer, "synthesize", lambda att, num, noise: spy(trainer.G, att, num, noise))
        pipeline.ClassifierData(cfg, inputs, trainer, META)(0)
    assert devices == ["cpu", "cpu", "cpu"]


def test_noise_state_from_another_device_is_one_clear_error(monkeypatch):
    """A CPU generator state (5056 bytes) cannot continue on CUDA (16 bytes) or vice versa: an
    InputError naming the checkpoint and both devices, not "RNG state is wrong size"."""
    cpu_state = _gan_trainer("cpu").state_dict()
    assert cpu_state["noise_device"] == "cpu"
    with meta_generators(monkeypatch):
        on_meta = _gan_trainer()
    with pytest.raises(InputError, match=r"ckpt\.pth: written by a run on cpu, this run is on meta"):
        on_meta.load_state_dict(cpu_state, "ckpt.pth")
    older = {k: v for k, v in cpu_state.items() if k != "noise_device"}  # before the device was recorded
    older["noise_rng"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA (Philox) state
    with pytest.raises(InputError, match="written by a run on cuda, this run is on cpu"):
        _gan_trainer("cpu").load_state_dict(older, "ckpt.pth")
    _gan_trainer("cpu").load_state_dict(cpu_state)  # same device: continues


def test_unseen_classifier_on_another_device(task, monkeypatch):
    """Training: no host read per batch. ``selection: test`` evaluates after every classifier
    epoch: the test features are read from the file once, not at every evaluation."""
    cfg, split, test = _features(task, "test")
    uc = dataclasses.replace(cfg.unseen_classifier, epochs=2)
    counts = []
    for rows in (16, 64):
        feats = torch.empty(rows, DIM, device=META)
        labels = torch.zeros(rows, dtype=torch.int64, device=META)
        audit = DeviceAudit()
        with audit:
            train_unseen_classifier(feats, labels, 2, dataclasses.replace(uc, batch_size=8),
                                    torch.Generator().manual_seed(0))
        assert audit.generator_mismatches == [] and audit.syncs == []
        counts.append(len(audit.uploads))
    assert counts[0] == counts[1]  # per epoch (the batch order), not per batch

    reads = []
    monkeypatch.setattr(FeatureFile, "_map", lambda self: reads.append(1) or np.load(self.feats_path, mmap_mode="r"))
    test_set = LabelledFeatures(test, split.unseen_ids)
    model = torch.nn.Linear(cfg.features.dim, 1 + len(split.unseen_ids)).to(META)
    audit = DeviceAudit()
    with audit:
        test_set.accuracy(model, META)
        once = len(reads)
        test_set.accuracy(model, META)
    assert once > 0 and len(reads) == once
    assert audit.generator_mismatches == []


def test_gzsd_calibration_on_another_device(task, monkeypatch):
    """The calibration's synthesized unseen (and seen) features come from the generator on the device
    (vldus.synthesis.models.synthesize), drawn with a generator there, and the calibration itself
    reads nothing back from the device."""
    from vldus.synthesis.calibrate import calibrate_generator

    cfg, split, train = _features(task)
    seen_rows = np.flatnonzero(np.isin(train.labels, split.seen_ids))[:64]
    seen = train.gather(torch.from_numpy(seen_rows))
    with meta_generators(monkeypatch):
        trainer = _gan_trainer_for(cfg, split)
        emb = torch.from_numpy(load_class_embeddings(task.embeddings, split, False))
        dim, rows = cfg.features.dim, 1 + len(split.unseen_ids)
        detector_cls = (torch.zeros(split.num_classes + 1, dim), torch.zeros(split.num_classes + 1))
        audit = DeviceAudit()
        with audit:
            result = calibrate_generator(seen, trainer.G, emb[split.unseen_ids], emb[split.seen_ids], detector_cls,
                                         (torch.zeros(rows, dim), torch.zeros(rows)), split, cfg.inference, 0,
                                         "validation")
    assert audit.generator_mismatches == [], audit.generator_mismatches
    assert audit.count(audit.syncs, file="vldus/synthesis/models.py") == 0
    assert isinstance(result, dict)


def _gan_trainer_for(cfg, split):
    gan = cfg.gan
    emb = torch.from_numpy(load_class_embeddings(cfg.embeddings.file, split, False))
    G = Generator(gan.nz, emb.shape[1], gan.ngh, cfg.features.dim)
    D = Critic(cfg.features.dim, emb.shape[1], gan.ndh, gan.d_feat)
    compat = CompatClassifier(cfg.features.dim, emb[split.unseen_ids])
    return GANTrainer(G, D, emb, torch.nn.Linear(cfg.features.dim, split.num_classes + 1), compat,
                      split.unseen_ids, gan, META, "fp32", None, seed=0)
