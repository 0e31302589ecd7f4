"""The knowledge-distillation evaluation: loss, view geometry, stored labels, the protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_prepared
from ddtool.data import sample_per_class
from ddtool.errors import ConfigError
from ddtool.evaluation import PROTOCOLS, evaluate_set, get_protocol
from ddtool.augment.crops import cutmix_boxes, random_resized_crop_boxes, resized_crop
from ddtool.evaluation.kd import (
    EXTRA_BOX, LiveTeacher, StoredSoftLabels, Views, fit_student, kd_loss, record_soft_labels, sample_views,
    set_label_source,
)
from ddtool.evaluation.protocols import KDSettings
from ddtool.networks import create_network
from ddtool.seeding import generator
from ddtool.storage import SyntheticSet


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- the loss
def test_kd_loss_on_two_classes_by_hand():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax: (3/4, 1/4)
    # T = 1: KL((3/4, 1/4) || (1/2, 1/2)).
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # T = 2: teacher probabilities (sqrt 3, 1) / (sqrt 3 + 1), and the T^2 = 4 factor.
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # Batch mean, and zero when the student agrees with the teacher up to a shift.
    batch = kd_loss(torch.tensor([[0.0, 0.0], [5.0, 5.0 - math.log(3.0)]]), teacher.repeat(2, 1), 1.0)
    assert batch.item() == pytest.approx(0.5 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)), rel=1e-6)


# ---------------------------------------------------------------------------- view geometry
def test_random_resized_crop_boxes_fit_and_respect_the_scale():
    boxes = random_resized_crop_boxes(500, 28, 28, (0.08, 1.0), gen())
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    area = (h * w).double() / 784
    assert area.min() > 0.05 and area.max() <= 1.0 and area.max() > 0.7  # rounding widens 0.08 a little
    aspect = (w / h).double()
    assert aspect.min() >= 0.7 and aspect.max() <= 1.45
    # Scale (1, 1) on a square image: no candidate with another aspect fits, so the whole image.
    full = random_resized_crop_boxes(50, 16, 16, (1.0, 1.0), gen())
    assert (full == torch.tensor([0, 0, 16, 16])).all()
    assert torch.equal(random_resized_crop_boxes(40, 28, 28, (0.08, 1.0), gen(7)),
                       random_resized_crop_boxes(40, 28, 28, (0.08, 1.0), gen(7)))


def test_resized_crop_is_identity_flip_and_interpolate():
    x = torch.randn(3, 2, 8, 8, generator=gen(1))
    whole = torch.tensor([[0, 0, 8, 8]] * 3)
    assert torch.allclose(resized_crop(x, whole), x, atol=1e-5)
    flip = torch.tensor([True, False, True])
    flipped = resized_crop(x, whole, flip)
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-5) and torch.allclose(flipped[1], x[1], atol=1e-5)
    # A 4x6 box at (2, 1) resized back to 8x8: what F.interpolate does to the cut-out.
    box = torch.tensor([[2, 1, 4, 6]] * 3)
    expected = F.interpolate(x[:, :, 2:6, 1:7], size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(resized_crop(x, box), expected, atol=1e-5)


def test_cutmix_pastes_the_partner_view_inside_its_box():
    x = torch.randn(4, 1, 6, 6, generator=gen(2))
    whole = torch.tensor([[0, 0, 6, 6]] * 4)
    views = Views(whole, torch.zeros(4, dtype=torch.bool), torch.tensor([1, 0, 3, 2]),
                  torch.tensor([[1, 2, 4, 5]] * 4))
    out = views.render(x)
    assert torch.allclose(out[0, :, 1:4, 2:5], x[1, :, 1:4, 2:5], atol=1e-5)
    outside = torch.ones(6, 6, dtype=torch.bool)
    outside[1:4, 2:5] = False
    assert torch.allclose(out[0, 0][outside], x[0, 0][outside], atol=1e-5)
    boxes = cutmix_boxes(200, 10, 12, gen(3))
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 2] <= 10).all() and (boxes[:, 3] <= 12).all()


def test_views_never_flip_when_the_dataset_forbids_it():
    views = sample_views(64, 8, 8, KDSettings(), allow_flip=False, generator=gen(4))
    assert not views.flip.any()
    assert sample_views(64, 8, 8, KDSettings(), allow_flip=True, generator=gen(4)).flip.any()
    assert sample_views(8, 8, 8, KDSettings(cutmix=False), True, gen(5)).partner is None


# ---------------------------------------------------------------------------- stored labels
@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_network("convnet-bn", channels=1, num_classes=10, image_size=8, width=4).eval()


def test_stored_labels_replay_through_extras(teacher):
    images = torch.randn(6, 1, 8, 8, generator=gen(6))
    stored = record_soft_labels(teacher, images, epochs=3, settings=KDSettings(), allow_flip=True,
                                generator=gen(7))
    back = StoredSoftLabels.from_extras(stored.to_extras())
    assert back.epochs == 3 and back.num_images == 6
    for epoch in range(3):
        replayed = teacher(back.views(epoch).render(images)).detach().to(torch.float16)
        assert torch.equal(replayed, back.logits[epoch])
    extras = stored.to_extras()
    del extras[EXTRA_BOX]
    with pytest.raises(ConfigError, match="kd_box"):
        StoredSoftLabels.from_extras(extras)
    assert StoredSoftLabels.from_extras({}) is None


def test_a_plan_times_an_epoch_of_kd_training_as_it_does_hard_labels(data, monkeypatch):
    from ddtool.evaluation import kd
    from ddtool.evaluation.train import time_epoch

    trained_on = []
    fit_student = kd.fit_student

    def spy(student, images, labels, **options):
        trained_on.append(labels)
        return fit_student(student, images, labels, **options)

    monkeypatch.setattr(kd, "fit_student", spy)
    for name in ("kd", "mtt"):
        seconds = time_epoch(20, data, protocol=get_protocol(name), arch="convnet", arch_options={"width": 8})
        assert 0 < seconds < 60
    # the KD epochs (warm-up and timed) train the student on stored views, as a curriculum set's
    assert len(trained_on) == 2 and all(isinstance(labels, StoredSoftLabels) for labels in trained_on)
    assert trained_on[0].num_images == 20


def test_set_without_labels_or_teacher_cannot_be_kd_evaluated():
    sset = tiny_set(teacher_record=None, extras={})
    with pytest.raises(ConfigError, match="neither stored soft labels nor a teacher"):
        set_label_source(sset, "cpu")


# ---------------------------------------------------------------------------- the protocol
def test_kd_protocols_and_unchanged_classic_ones():
    kd = get_protocol("kd")
    assert kd.kd.optimizer == "adamw" and kd.kd.schedule == "cosine" and kd.kd.cutmix
    assert "kd" in kd.to_dict() and kd.to_dict()["kd"]["temperature"] == kd.kd.temperature
    assert get_protocol("kd-tiny").kd.optimizer == "sgd"
    assert all("kd" not in p.to_dict() for p in PROTOCOLS.values() if p.kd is None)
    with pytest.raises(ConfigError, match="temperature"):
        KDSettings(temperature=0.0)


@pytest.fixture(scope="module")
def data():
    return tiny_prepared(per_class=5)


def tiny_set(*, teacher_record, extras, data=None) -> SyntheticSet:
    data = data or tiny_prepared(per_class=5)
    idx = sample_per_class(data.train_y, 10, 2, gen(8))
    return SyntheticSet(images=data.train_x[idx], labels=data.train_y[idx], classes=list(data.spec.classes),
                        preprocessing=data.preprocessing, dataset=data.spec.name, ipc=2, method="cda",
                        extras=extras, teacher=teacher_record)


def test_evaluate_set_under_kd_records_the_teacher_mode_and_the_matched_baseline(data, teacher):
    record = {"arch": "convnet-bn", "options": {"width": 4},
              "state": {k: v.clone() for k, v in teacher.state_dict().items()}}
    live = tiny_set(teacher_record=record, extras={}, data=data)
    stored_labels = record_soft_labels(teacher, live.images, epochs=2, settings=get_protocol("kd").kd,
                                       allow_flip=data.spec.flip, generator=gen(9))
    stored = tiny_set(teacher_record=record, extras=stored_labels.to_extras(), data=data)
    protocol = get_protocol("kd").with_overrides(epochs=2, runs=2, batch_size=8)
    reports = {name: evaluate_set(s, data, protocol=protocol, arch="convnetw32", reference=False, progress=False)
               for name, s in (("live", live), ("stored", stored))}
    for mode, report in reports.items():
        entry = report.to_record()
        assert entry["teacher"] == mode and entry["labels"] == "soft" and entry["protocol"]["kd"]
        assert len(entry["runs"]) == 2 and len(entry["baselines"]["random_subset"]["runs"]) == 2
    assert reports["stored"].to_record()["stored_epochs"] == 2
    # Same seed, same everything: the evaluation repeats exactly (the baseline comes from the cache).
    again = evaluate_set(stored, data, protocol=protocol, arch="convnetw32", reference=False, progress=False)
    assert again.synthetic.runs == reports["stored"].synthetic.runs
    assert again.random_subset.runs == reports["stored"].random_subset.runs


def test_a_set_with_stored_labels_and_no_teacher_is_evaluated_without_baselines(data, teacher):
    # Its soft labels are enough to train on, but a matched random subset would need the
    # teacher to label other images: the record says the baselines were skipped, and why.
    images = tiny_set(teacher_record=None, extras={}, data=data).images
    stored_labels = record_soft_labels(teacher, images, epochs=1, settings=get_protocol("kd").kd,
                                       allow_flip=data.spec.flip, generator=gen(9))
    orphan = tiny_set(teacher_record=None, extras=stored_labels.to_extras(), data=data)
    protocol = get_protocol("kd").with_overrides(epochs=1, runs=1, batch_size=8)
    entry = evaluate_set(orphan, data, protocol=protocol, arch="convnetw32", reference=True,
                         progress=False).to_record()
    assert entry["teacher"] == "stored" and entry["teacher_arch"] is None and entry["stored_epochs"] == 1
    assert entry["baselines_skipped"] == "the set carries no teacher" and entry["baselines"] == {}
    assert len(entry["runs"]) == 1 and entry["labels"] == "soft"


def test_fit_student_from_a_live_teacher_learns_its_labels(data, teacher):
    # The student starts as a copy of the teacher's architecture; a few epochs of KD at a
    # large lr must bring its KD loss down on fixed views.
    student = create_network("convnet-bn", channels=1, num_classes=10, image_size=8, width=4,
                             generator=gen(10))
    images = data.train_x[:20]
    views = sample_views(20, 8, 8, KDSettings(cutmix=False), True, gen(11)).render(images)
    target = teacher(views).detach()
    before = kd_loss(student.eval()(views), target, 4.0).item()
    protocol = get_protocol("kd").with_overrides(lr=0.01, batch_size=10)
    fit_student(student, images, LiveTeacher(teacher), protocol=protocol, lr=0.01, epochs=15, batch_size=10,
                seed_generator=lambda name: generator(0, name), allow_flip=True)
    assert kd_loss(student.eval()(views), target, 4.0).item() < before
    assert np.isfinite(before)
