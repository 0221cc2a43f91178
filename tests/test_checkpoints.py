"""`bvlib merge` / `bvlib inspect` on real open_clip state dicts written to files, as a user has them."""

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from bvlib import BVLibError
from bvlib.backdoor_vectors import top_mass
from bvlib.checkpoints import inspect_files, merge_files
from bvlib.merging import merge
from bvlib.models import create_clip
from bvlib.store import load_state_dict
from bvlib.weights import Weights, cosine_matrix

MODEL = "mini-clip-w64-l2"
PARAMS = {
    "task_arithmetic": {"lam": 0.3},
    "ties": {"k": 0.2, "lam": 0.7},
    "dare": {"p": 0.5, "lam": 0.3, "seed": 3},
    "tall": {},
    "consensus": {},
    "tsv": {},
    "iso_c": {"lam": 1.2},
    "average": {},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base CLIP (whole, `visual.` keys), three fine-tunes saved as image-encoder state dicts in
    both formats, a defender BV, and a model of another architecture."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model, _ = create_clip(MODEL)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(full, d / "base.safetensors")
    visual = {k[len("visual.") :]: v for k, v in full.items() if k.startswith("visual.")}
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(3):
        ft = {
            k: v + 0.02 * torch.randn(v.shape, generator=g) * (1 + i) if v.is_floating_point() else v
            for k, v in visual.items()
        }
        path = d / (f"ft{i}.safetensors" if i != 1 else "ft1.pt")
        save_file(ft, path) if path.suffix == ".safetensors" else torch.save(ft, path)
        paths.append(path)
    save_file({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in visual.items()}, d / "bv.safetensors")
    other, _ = create_clip("mini-clip-w128-l4")
    save_file({k: v.contiguous() for k, v in other.visual.state_dict().items()}, d / "other.safetensors")
    return d, visual, paths


def _in_memory(visual, paths, method, params, extra=None):
    layout = Weights.from_state_dict(visual).layout
    base = Weights.from_state_dict(visual, layout)
    taus = [Weights.from_state_dict(load_state_dict(p), layout) - base for p in paths] + (extra or [])
    return base + merge(taus, method, **params)


@pytest.mark.parametrize("method", list(PARAMS))
def test_streamed_merge_equals_the_in_memory_merge(files, method):
    d, visual, paths = files
    state, report = merge_files(
        d / "base.safetensors", paths, method, params=PARAMS[method], budget_bytes=40_000
    )  # many groups
    expected = _in_memory(visual, paths, method, PARAMS[method]).state_dict()
    assert report["key_prefix"] == "visual." and set(state) == set(load_state_dict(d / "base.safetensors"))
    for name, value in expected.items():
        got = state[f"visual.{name}"]
        if method in ("tsv", "iso_c"):  # SVDs batched differently per group: equal to float precision
            assert torch.allclose(got, value, atol=1e-6), name
        else:
            assert torch.equal(got, value), f"{method}: {name}"


def test_the_merged_file_loads_in_open_clip_and_ibvs_is_the_merge_with_minus_bv(files, tmp_path):
    d, visual, paths = files
    from bvlib.store import save_state_dict

    state, report = merge_files(
        d / "base.safetensors",
        paths,
        "ties",
        params={"lam": 0.5},
        defender_bv=d / "bv.safetensors",
        strength=0.7,
        budget_bytes=40_000,
    )
    save_state_dict(state, tmp_path / "merged.safetensors")
    model = open_clip.create_model(
        MODEL, pretrained=str(tmp_path / "merged.safetensors")
    )  # open_clip's own loader
    assert torch.equal(model.visual.conv1.weight, state["visual.conv1.weight"])
    layout = Weights.from_state_dict(visual).layout
    bv = Weights.from_state_dict(load_state_dict(d / "bv.safetensors"), layout)
    expected = _in_memory(visual, paths, "ties", {"lam": 0.5}, extra=[bv * -0.7])
    assert all(torch.equal(state[f"visual.{n}"], v) for n, v in expected.state_dict().items())
    assert (
        report["defense"]["strength"] == 0.7
        and len(report["inputs"]) == 3
        and len(report["base"]["sha256"]) == 64
    )


def test_inspect_matches_the_library(files):
    d, visual, paths = files
    layout = Weights.from_state_dict(visual).layout
    base = Weights.from_state_dict(visual, layout)
    taus = [Weights.from_state_dict(load_state_dict(p), layout) - base for p in paths]
    rep = inspect_files(d / "base.safetensors", paths, bv=(str(paths[2]), str(paths[0])), budget_bytes=40_000)
    for v, tau in zip(rep["task_vectors"], taus):
        assert v["norm"] == pytest.approx(tau.norm(), rel=1e-5) and v["top1pct_mass"] == pytest.approx(
            top_mass(tau), rel=1e-4
        )
    assert torch.allclose(torch.tensor(rep["cosine"]).float(), cosine_matrix(taus).float(), atol=1e-5)
    bv = taus[2] - taus[0]
    assert rep["bv"]["norm"] == pytest.approx(bv.norm(), rel=1e-5)
    assert rep["bv"]["cosine_with"]["ft0.safetensors"] == pytest.approx(
        float(cosine_matrix([bv, taus[0]])[0, 1]), abs=1e-5
    )


def test_bad_inputs_are_refused(files, tmp_path):
    d, visual, paths = files
    with pytest.raises(BVLibError, match="different architectures"):
        merge_files(d / "base.safetensors", [paths[0], d / "other.safetensors"])
    with pytest.raises(BVLibError, match="no parameter 'kk'"):
        merge_files(d / "base.safetensors", paths, "ties", params={"kk": 0.2})
    with pytest.raises(BVLibError, match="k must be"):
        merge_files(d / "base.safetensors", paths, "ties", params={"k": 2})

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(BVLibError, match="refusing to load"):
        merge_files(d / "base.safetensors", [paths[0], tmp_path / "evil.pt"])


def _cli(*args):
    """The command in a subprocess; the timeout guards against a hang only (TBAR's unknown-trigger
    search over corners and sizes takes minutes on a busy 2-core machine)."""
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "bvlib.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )


def test_merge_and_inspect_commands(files, tmp_path):
    d, visual, paths = files
    out, report = tmp_path / "merged.safetensors", tmp_path / "merged.json"
    proc = _cli(
        "merge",
        "--base",
        d / "base.safetensors",
        *paths,
        "--method",
        "ties",
        "--param",
        "k=0.2",
        "--param",
        "lam=0.7",
        "--out",
        out,
        "--report",
        report,
    )
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(report.read_text())
    assert rep["method"] == "ties" and rep["params"] == {"k": 0.2, "lam": 0.7} and len(rep["cosine"]) == 3
    assert set(load_state_dict(out)) == set(load_state_dict(d / "base.safetensors"))
    proc = _cli("inspect", "--base", d / "base.safetensors", *paths, "--bv", paths[2], paths[0])
    assert proc.returncode == 0 and "cosine of task vectors" in proc.stdout and "BV =" in proc.stdout, (
        proc.stderr
    )
    for args, why in (
        (("--param", "lam"), "NAME=VALUE"),
        (("--defense", "ibvs"), "needs --defender-bv"),
        (("--out", tmp_path / "x.txt"), "suffix"),
    ):
        base_args = ["merge", "--base", d / "base.safetensors", *paths]
        proc = _cli(*base_args, *(args if "--out" in args else (*args, "--out", out)))
        assert proc.returncode == 2 and why in proc.stderr and proc.stderr.strip().count("\n") == 0, (
            proc.stderr
        )


# defenses that need data, on files ---------------------------------------------------------------
@pytest.fixture(scope="module")
def defended(smoke_world, tmp_path_factory):
    """The smoke world as a user has it: a whole-CLIP base file, a backdoored fine-tune and clean ones
    as image-encoder files, and each task's val images as an ImageFolder."""
    from bvlib.data import write_image_folder
    from bvlib.store import save_state_dict

    w, d = smoke_world, tmp_path_factory.mktemp("own")
    w.export_base(d / "base.safetensors")
    attack = w.badnets()
    files = {}
    for t in w.task_names:
        weights = w.finetune(t, poison=attack if t == "mnist" else None, steps=150)  # as test_defenses' scene
        files[t] = save_state_dict(weights.state_dict(), d / f"{t}.safetensors")
        write_image_folder(w.task(t).val, w.task(t).classnames, d / "images" / t)
    return d, files, attack


def _encoder(world, path):
    return Weights.from_state_dict(load_state_dict(path), world.layout)


def test_tbar_from_the_command_line_cleans_a_suspect_file(smoke_world, defended, tmp_path):
    """`bvlib merge` of the one suspect model (λ 1) with TBAR on the defender's image folder: the
    trigger is unknown, reverse-engineered, and the real trigger's ASR falls."""
    w, (d, files, attack) = smoke_world, defended
    out, report = tmp_path / "cleaned.safetensors", tmp_path / "cleaned.json"
    proc = _cli(
        "merge",
        "--base",
        d / "base.safetensors",
        files["mnist"],
        "--param",
        "lam=1",
        "--defense",
        "tbar",
        "--model",
        w.preset.model,
        "--preset",
        "smoke",
        "--data",
        f"mnist={d / 'images' / 'mnist'}",
        "--defense-param",
        "steps=20",
        "--defense-param",
        "trigger_steps=30",
        "--out",
        out,
        "--report",
        report,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(report.read_text())["defense"]
    assert (
        info["name"] == "tbar" and info["mode"] == "unknown" and info["target"] == attack.target
    )  # digit folders keep their order
    before = w.evaluate("mnist", _encoder(w, files["mnist"]), attack.trigger, attack.target)
    after = w.evaluate("mnist", _encoder(w, out), attack.trigger, attack.target)
    assert before["asr"] > 0.6 and after["asr"] < 0.3 and after["acc"] >= before["acc"] - 0.25, (
        before,
        after,
    )  # see test_defenses
    assert set(load_state_dict(out)) == set(
        load_state_dict(d / "base.safetensors")
    )  # the base's whole-CLIP layout


def test_dam_from_the_command_line_learns_its_mask_on_the_folders(smoke_world, defended, tmp_path):
    w, (d, files, _) = smoke_world, defended
    data = [f"--data={t}={d / 'images' / t}" for t in files]
    plain, masked = tmp_path / "ta.safetensors", tmp_path / "dam.safetensors"
    args = ["merge", "--base", d / "base.safetensors", *files.values(), "--param", "lam=0.5"]
    assert _cli(*args, "--out", plain).returncode == 0
    proc = _cli(
        *args,
        "--defense",
        "dam",
        "--model",
        w.preset.model,
        *data,
        "--defense-param",
        "steps=30",
        "--out",
        masked,
        "--report",
        tmp_path / "dam.json",
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "dam.json").read_text())["defense"]
    assert (
        info["name"] == "dam" and info["lam"] == 0.5 and info["logit_shift"] > 0.05 and info["history"] == 30
    )
    base = w.base_weights
    ta, dm = _encoder(w, plain) - base, _encoder(w, masked) - base
    assert (
        0.3 < float(cosine_matrix([ta, dm])[0, 1]) < 0.999
    )  # a rescaled mask of the same sum, not the plain merge


def test_defenses_on_files_refuse_bad_inputs_in_one_line(smoke_world, defended, tmp_path):
    w, (d, files, _) = smoke_world, defended
    base = ["merge", "--base", d / "base.safetensors", *files.values(), "--out", tmp_path / "m.safetensors"]
    model = ["--model", w.preset.model]
    cases = [
        (["--defense", "tbar", "--data", f"mnist={d}"], "--model"),
        (["--defense", "tbar", *model], "exactly one --data"),
        (["--defense", "dam", *model, "--data", f"mnist={d / 'images' / 'mnist'}"], "has no folder"),
        (["--defense", "dam", *model, "--method", "ties"], "task_arithmetic"),
        (["--data", f"mnist={d}"], "only apply with --defense"),
        (["--defense", "tbar", *model, "--data", "mnist"], "NAME=FOLDER"),
        (["--defense", "tbar", *model, "--data", f"mnist={d / 'nowhere'}"], "does not exist"),
        (
            [
                "--defense",
                "tbar",
                *model,
                "--data",
                f"mnist={d / 'images' / 'mnist'}",
                "--defense-param",
                "nope=1",
            ],
            "not a parameter",
        ),
        (
            ["--defense", "tbar", "--model", "no-such-model", "--data", f"mnist={d / 'images' / 'mnist'}"],
            "unknown model",
        ),
    ]
    for extra, why in cases:
        proc = _cli(*base, *extra)
        assert proc.returncode == 2 and why in proc.stderr and proc.stderr.strip().count("\n") == 0, (
            extra,
            proc.stderr,
        )
    encoder_only = tmp_path / "encoder_base.safetensors"
    save_file({k: v.contiguous() for k, v in w.clip.visual.state_dict().items()}, encoder_only)
    proc = _cli(
        "merge",
        "--base",
        encoder_only,
        files["mnist"],
        "--defense",
        "tbar",
        *model,
        "--data",
        f"mnist={d / 'images' / 'mnist'}",
        "--out",
        tmp_path / "m.safetensors",
    )
    assert proc.returncode == 2 and "whole CLIP" in proc.stderr, proc.stderr
