import pytest
import torch
from torch import nn

from bvlib import BVLibError
from bvlib.data import Split
from bvlib.evaluation import evaluate, trigger_scores
from bvlib.triggers import PatchTrigger


class Constant(nn.Module):
    """Predicts `label` for every image, or `triggered` when the bottom-right pixel is white."""

    def __init__(self, label, triggered=None):
        super().__init__()
        self.label, self.triggered = label, triggered

    def forward(self, x):
        out = torch.zeros(len(x), 3)
        hit = (
            (x[:, :, -1, -1] == 1).all(dim=1)
            if self.triggered is not None
            else torch.zeros(len(x), dtype=torch.bool)
        )
        out[~hit, self.label] = 1
        out[hit, self.triggered if self.triggered is not None else 0] = 1
        return out


def split():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    return Split(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), labels)


def test_accuracy_counts_correct_predictions():
    assert evaluate(Constant(2), split())["acc"] == pytest.approx(0.5)


def test_asr_excludes_target_class_images():
    # always predicting the target: accuracy is the target's share, ASR is 1 on the 8 non-target images
    r = evaluate(Constant(0), split(), PatchTrigger(size=2), target=0, batch_size=3)
    assert r["acc"] == pytest.approx(0.2) and r["asr"] == 1.0
    # a backdoor that fires on the trigger: clean predictions 1, triggered predictions 2 (the target)
    r = evaluate(Constant(1, triggered=2), split(), PatchTrigger(size=2), target=2)
    assert r["acc"] == pytest.approx(0.3) and r["asr"] == 1.0
    # the trigger flips to class 0, but the target is 2: no success, although 2 of 10 images are "hit"
    assert evaluate(Constant(1, triggered=0), split(), PatchTrigger(size=2), target=2)["asr"] == 0.0


class Counting(Constant):
    """A Constant that remembers how many images it was shown, with or without the trigger."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def forward(self, x):
        self.seen.append(len(x))
        return super().forward(x)


def test_the_triggered_pass_shows_the_model_the_non_target_images_only():
    model, trig = Counting(1, 2), PatchTrigger(size=2)
    r = evaluate(model, split(), trig, target=2)
    assert sum(model.seen) == 10 + 5 and r["asr"] == 1.0  # the clean pass, then the 5 non-target images
    model.seen.clear()
    assert trigger_scores(model, split(), trig, target=0)["asr"] == 0.0 and sum(model.seen) == 8
    target_only = Split(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.tensor([1, 1, 1]))
    with pytest.raises(BVLibError, match="outside target class 1"):
        trigger_scores(model, target_only, trig, target=1)


def test_the_cpu_eval_batch_gives_the_predictions_of_one_big_batch(smoke_world):
    from bvlib.evaluation import eval_batch_size, predict

    assert eval_batch_size("cpu") == 128 and eval_batch_size("cuda") == 1024
    name = smoke_world.task_names[0]
    model, test = smoke_world.classifier(name, smoke_world.finetune(name)), smoke_world.task(name).test
    assert len(test) > 128  # several batches at the default
    small, labels = predict(model, test)
    big, same_labels = predict(model, test, batch_size=len(test))
    assert torch.equal(small, big) and torch.equal(labels, same_labels)
