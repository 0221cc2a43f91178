"""End to end on the smoke preset: pretraining, heads, (poisoned) fine-tuning, the store, the card."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bvlib import BVLibError, Weights, backdoor_vector
from bvlib.store import Store
from bvlib.world import World, load_preset


def test_card_has_the_documented_columns(smoke_world):
    rows = smoke_world.card()
    assert [r["task"] for r in rows] == smoke_world.task_names
    for r in rows:
        assert set(r) == {
            "task",
            "n_classes",
            "n_train",
            "n_test",
            "zeroshot_acc",
            "clean_acc",
            "backdoor_clean_acc",
            "backdoor_asr",
        }
        assert all(
            0.0 <= r[k] <= 1.0 for k in ("zeroshot_acc", "clean_acc", "backdoor_clean_acc", "backdoor_asr")
        )
        assert r["n_train"] > 0 and r["n_test"] > 0


def test_finetuning_learns_and_badnets_implants_a_backdoor(smoke_world):
    name = smoke_world.task_names[0]
    attack = smoke_world.badnets()
    zs = smoke_world.evaluate(name, None, attack.trigger, attack.target)
    clean = smoke_world.evaluate(name, smoke_world.finetune(name), attack.trigger, attack.target)
    bd = smoke_world.evaluate(name, smoke_world.finetune(name, poison=attack), attack.trigger, attack.target)
    assert clean["acc"] > zs["acc"] + 0.1
    assert bd["asr"] > clean["asr"] + 0.3


def test_clean_plus_bv_is_the_backdoored_model(smoke_world):
    name = smoke_world.task_names[0]
    clean = smoke_world.finetune(name)
    backdoored = smoke_world.finetune(name, poison=smoke_world.badnets())
    bv = backdoor_vector(backdoored, clean)
    assert bv.norm() > 0
    model = smoke_world.classifier(name, clean + bv)
    ref = smoke_world.classifier(name, backdoored)
    x = smoke_world.task(name).test.images[:64].float() / 255
    assert torch.allclose(model(x), ref(x), atol=1e-4)


def test_frozen_classifier_is_a_fresh_one_reused(smoke_world):
    """The one encoder judgements and trigger searches share gives a fresh classifier's logits bit for
    bit, whatever task and weights the call before it took."""
    first, last = smoke_world.task_names[0], smoke_world.task_names[-1]
    tuned = smoke_world.finetune(first)
    x = smoke_world.task(first).test.images[:32].float() / 255
    with torch.no_grad():
        expected = smoke_world.classifier(first, tuned)(x)
        base = smoke_world.classifier(last)(x)
        smoke_world.classifier(last, smoke_world.finetune(last), frozen=True)(x)
        shared = smoke_world.classifier(first, tuned, frozen=True)
        assert torch.equal(shared(x), expected)
        again = smoke_world.classifier(last, frozen=True)  # θ0 again, the other task's head
    assert again is shared and not any(p.requires_grad for p in again.parameters())
    with torch.no_grad():
        assert torch.equal(again(x), base)
    assert smoke_world.classifier(first, tuned) is not smoke_world.classifier(first, tuned)


def test_finetunes_are_cached_and_deterministic(tmp_path, smoke_world):
    name = smoke_world.task_names[-1]
    first, fresh = (
        World("smoke", store=Store(tmp_path / s), device="cpu", progress=False) for s in ("one", "two")
    )
    first._base = fresh._base = (
        smoke_world._base
    )  # same θ0, own stores (the shared one may hold a one-thread build)
    a = first.finetune(name, steps=5)
    b = first.finetune(name, steps=5)  # from the store
    c = fresh.finetune(name, steps=5)  # recomputed
    assert torch.equal(a.flat, b.flat) and torch.equal(a.flat, c.flat)
    assert len(list((tmp_path / "two" / "finetune").glob("*.safetensors"))) == 1
    assert not torch.equal(a.flat, smoke_world.finetune(name, steps=5, seed=1).flat)


def test_evaluations_are_stored_under_the_weights_digest(tmp_path, smoke_world, monkeypatch):
    import bvlib.world as world_module

    name = smoke_world.task_names[0]
    clean, attack = smoke_world.finetune(name), smoke_world.badnets()
    base, smoke_world = (
        smoke_world._base,
        World("smoke", store=Store(tmp_path), device="cpu", progress=False),
    )  # a fresh store
    smoke_world._base = base  # every judgement counts, the base is shared
    first = smoke_world.evaluate(name, clean, attack.trigger, attack.target)
    real = world_module.evaluate
    monkeypatch.setattr(
        world_module, "evaluate", lambda *a, **k: pytest.fail("a stored evaluation was recomputed")
    )
    assert smoke_world.evaluate(name, clean, attack.trigger, attack.target) == first
    calls = []
    monkeypatch.setattr(world_module, "evaluate", lambda *a, **k: calls.append(a) or real(*a, **k))
    nudged = clean + Weights(torch.full_like(clean.flat, 1e-3), clean.layout)
    smoke_world.evaluate(name, nudged, attack.trigger, attack.target)  # other weights: judged again
    smoke_world.evaluate(name, clean, split="val")  # other split: judged again
    assert len(calls) == 2 and set(first) == {"acc", "asr"}


def test_bad_input_is_one_clear_error(smoke_world):
    with pytest.raises(BVLibError, match="unknown task 'svhn'"):
        smoke_world.finetune("svhn")
    with pytest.raises(BVLibError, match="does not fit"):
        smoke_world.finetune(
            smoke_world.task_names[0], poison=smoke_world.badnets(trigger={"size": 64}), steps=1
        )
    with pytest.raises(BVLibError, match="out of range"):
        smoke_world.finetune(smoke_world.task_names[0], poison=smoke_world.badnets(target=99), steps=1)
    with pytest.raises(BVLibError, match="unknown preset"):
        load_preset("huge")


def test_preset_overrides_merge_nested_values():
    p = load_preset("smoke", {"finetune": {"lr": 0.5}, "badnets": {"trigger": {"size": 2}}})
    assert p.finetune.lr == 0.5 and p.finetune.steps == load_preset("smoke").finetune.steps
    assert p.badnets["trigger"] == load_preset("smoke").badnets["trigger"] | {"size": 2}


def test_a_shipped_base_loads_checked_and_keys_everything_after_it(tmp_path, smoke_world):
    path = tmp_path / "base.safetensors"
    digest = smoke_world.export_base(path)
    preset = load_preset("smoke", {"base_checkpoint": {"file": str(path), "sha256": digest}})
    shipped = World(preset, store=Store(tmp_path / "store"), device="cpu", progress=False)
    assert torch.equal(
        shipped.base_weights.flat, smoke_world.base_weights.flat
    )  # the image tower ships in float32
    assert (
        shipped.base_key != smoke_world.base_key
    )  # its own key: fine-tunes of one base never serve the other
    task = shipped.task_names[0]
    assert (
        abs(shipped.evaluate(task)["acc"] - smoke_world.evaluate(task)["acc"]) < 0.05
    )  # heads from a float16 text tower
    path.write_bytes(path.read_bytes()[:-1] + b" ")
    tampered = World(preset, store=Store(tmp_path / "store"), device="cpu", progress=False)
    with pytest.raises(BVLibError, match="was changed"):
        _ = tampered.base_weights


def test_merge_curves_choose_lambda_on_validation(smoke_world):
    curves = smoke_world.merge_curves()
    for method, c in curves.items():
        best = max(range(len(c["lams"])), key=lambda i: c["val"][i])
        assert c["lam"] == c["lams"][best] and c["mean_acc"] == c["test"][best]
        assert smoke_world.merge_params(method) == {"lam": c["lam"]}
    scales = smoke_world.merge_scales()
    assert set(scales) == {
        "dare",
        "tall",
        "consensus",
        "tsv",
        "iso_c",
    }  # every method with a scale: chosen on val too
    for method, c in scales.items():
        assert c["lam"] == c["lams"][max(range(len(c["lams"])), key=lambda i: c["val"][i])]
        assert smoke_world.merge_params(method) == {"lam": c["lam"]}
    assert smoke_world.merge_params("average") == {}


def test_the_cpu_preset_ships_the_base_it_names(tmp_path):
    """The shipped base is in the repository and is the file the preset's hash names (no pretraining here)."""
    import hashlib

    from bvlib.world import BASE_DIR

    world = World("cpu", store=Store(tmp_path), device="cpu", progress=False)
    spec = world.shipped_base
    path = BASE_DIR / spec.file
    assert path.is_file() and path.stat().st_size < 25 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256
    assert world.base_weights.layout.numel > 0  # loads without pretraining


def test_a_merged_judgement_reuses_the_attacked_task_clean_pass(tmp_path, smoke_world, monkeypatch):
    import bvlib.world as world_module

    name, attack = smoke_world.task_names[0], smoke_world.badnets()
    merged = smoke_world.finetune(
        name, poison=attack
    )  # any encoder: one merged from a single backdoored vector
    base, fresh = smoke_world._base, World("smoke", store=Store(tmp_path), device="cpu", progress=False)
    fresh._base = base
    passes = []
    for judge in ("evaluate", "trigger_scores"):
        real = getattr(world_module, judge)
        monkeypatch.setattr(
            world_module,
            judge,
            lambda *a, _real=real, _judge=judge, **k: (
                passes.append((_judge, a[2] is not None)) or _real(*a, **k)
            ),
        )
    r = fresh.evaluate_merged(merged, attacked=name, trigger=attack.trigger, target=attack.target)
    # one clean pass per task, one triggered pass for the ASR; the attacked task's CA is not judged twice
    assert sorted(passes) == sorted(
        [("evaluate", False)] * len(fresh.task_names) + [("trigger_scores", True)]
    )
    assert r["attacked_acc"] == r[f"acc/{name}"] == smoke_world.evaluate(name, merged)["acc"]
    assert r["asr"] == smoke_world.evaluate(name, merged, attack.trigger, attack.target)["asr"] > 0.5
    passes.clear()
    with pytest.raises(BVLibError, match="ASR needs the target class"):  # refused before any pass is spent
        fresh.evaluate_merged(
            smoke_world.base_weights, attacked=name, trigger=attack.trigger
        )  # nothing stored for θ0 here
    assert passes == []


def test_bf16_runs_the_blocks_in_bf16_leaves_nothing_enabled_and_learns_as_fp32(tmp_path, smoke_world):
    """The "bf16" precision: transformer blocks under bf16 autocast, the rest float32, no autocast
    left on after a pass (not even one that raised), and a fine-tune as good as the float32 one."""
    bf16 = World(
        "smoke", store=Store(tmp_path), device="cpu", progress=False, overrides={"precision": "bf16"}
    )
    model = bf16.classifier("mnist")
    dtypes = {}
    encoder = model.encoder
    for name, module in (
        ("block", encoder.transformer.resblocks[0].mlp.c_fc),
        ("patches", encoder.conv1),
        ("blocks", encoder.transformer),
    ):
        module.register_forward_hook(lambda m, a, out, name=name: dtypes.__setitem__(name, out.dtype))
    x = bf16.task("mnist").test.images[:8].float() / 255
    assert model(x).dtype == torch.float32
    assert dtypes == {"block": torch.bfloat16, "patches": torch.float32, "blocks": torch.float32}
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(RuntimeError):
        model.encoder.transformer.register_forward_pre_hook(
            lambda m, a: (_ for _ in ()).throw(RuntimeError("inside"))
        )
        model(x)
    assert not torch.is_autocast_enabled("cpu"), "a pass that raised leaves autocast off"
    assert bf16.finetune_key("mnist") != smoke_world.finetune_key("mnist"), (
        "the precision is part of every key"
    )
    fp32_acc = smoke_world.evaluate("mnist", smoke_world.finetune("mnist"))["acc"]
    bf16_acc = bf16.evaluate("mnist", bf16.finetune("mnist"))["acc"]
    zero_shot = smoke_world.evaluate("mnist")["acc"]
    assert bf16_acc > zero_shot + 0.1 and abs(bf16_acc - fp32_acc) <= 0.05, (zero_shot, fp32_acc, bf16_acc)
    with pytest.raises(BVLibError, match="precision"):
        World("smoke", store=Store(tmp_path), overrides={"precision": "fp16"})


@pytest.mark.parametrize("model", ["mini-clip-w192-l4", "ViT-B-32"])
def test_bvlibs_encoder_computes_open_clips_default_function(model):
    """The mini configs' attention blocks ("block_type": "custom") and `PatchEmbedding` (a patchify
    convolution as a matmul) are open_clip's default encoder from the same weights: same logits and
    gradients to the pixels in float32, logits within bf16 rounding under the bf16 blocks."""
    import open_clip

    from bvlib.models import ImageClassifier, PatchEmbedding, create_clip

    clip, _ = create_clip(model)
    ours = clip.visual
    cfg = open_clip.get_model_config(model)["vision_cfg"]
    default = open_clip.create_model(model, vision_cfg={**cfg, "block_type": "default"}).visual
    default.load_state_dict(ours.state_dict())  # the same parameter names
    assert type(ours.conv1) is PatchEmbedding and type(default.conv1) is torch.nn.Conv2d
    if model.startswith("mini"):
        assert type(ours.transformer.resblocks[0].attn) is not type(default.transformer.resblocks[0].attn)
    side = cfg["image_size"]
    x = torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(0))
    head = torch.nn.functional.normalize(torch.randn(5, clip.visual.output_dim), dim=-1)
    for precision in ("fp32", "bf16"):
        logits, grads = [], []
        for encoder in (ours, default):
            pixels = x.clone().requires_grad_(True)
            out = ImageClassifier(encoder, head, 10.0, [0.5] * 3, [0.25] * 3, precision)(pixels)
            out.logsumexp(-1).sum().backward()
            logits.append(out.detach())
            grads.append(pixels.grad)
        if precision == "fp32":
            assert torch.allclose(logits[0], logits[1], atol=1e-4) and torch.allclose(
                grads[0], grads[1], atol=1e-4
            )
        else:
            assert (logits[0] - logits[1]).abs().max() < 0.1, (logits[0] - logits[1]).abs().max()


def test_a_base_pretrained_here_is_keyed_by_its_architectures_config(monkeypatch):
    """Editing a mini config (a width, the block type) makes another base, so its key changes; a
    shipped base is keyed by its file."""
    import open_clip

    keys = {name: World(name, progress=False).base_key for name in ("smoke", "cpu")}
    real = open_clip.get_model_config

    def edited(name):
        cfg = real(name)
        cfg["vision_cfg"]["block_type"] = (
            "custom" if cfg["vision_cfg"].get("block_type") != "custom" else "default"
        )
        return cfg

    monkeypatch.setattr(open_clip, "get_model_config", edited)
    assert World("smoke", progress=False).base_key != keys["smoke"]
    assert World("cpu", progress=False).base_key == keys["cpu"]


def test_a_base_from_a_file_is_keyed_by_its_bytes_not_its_path(smoke_world, tmp_path):
    """A moved checkout or a copied store finds what it stored: two copies of one base file make
    the same keys; a base with other bytes makes others."""
    import shutil

    first = tmp_path / "a" / "base.safetensors"
    smoke_world.export_base(first)
    second = tmp_path / "b" / "renamed.safetensors"
    second.parent.mkdir()
    shutil.copy(first, second)
    model = smoke_world.preset.model

    def world(base):
        return World.from_files(base, model, {"digits": tmp_path}, preset="smoke", progress=False)

    key = world(first).base_key
    assert world(second).base_key == key
    assert str(tmp_path) not in json.dumps(world(first).base_config)
    other = tmp_path / "other.safetensors"
    state = load_file(str(first))
    state["logit_scale"] = state["logit_scale"] + 1
    save_file(state, str(other))
    assert world(other).base_key != key
