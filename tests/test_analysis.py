"""The analysis and export tools on tiny REAL checkpoints (two short ResNet-18 runs on the digits, one
with SGD, one with LARS) and real images: weight norms, linear CKA, NormRescale, export to
torchvision / timm / detectron2, and the one-line errors of each command."""
from __future__ import annotations

import csv
import importlib.util
import json
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from fastairl import checkpoint
from fastairl.analysis import export as export_mod
from fastairl.analysis.checkpoints import load_backbone
from fastairl.analysis.cka import LinearCKA, MinibatchCKA, cka_per_layer, layer_names, linear_cka, unbiased_hsic
from fastairl.analysis.norms import named_kinds
from fastairl.analysis.rescale import normrescale
from fastairl.cli import main as cli
from fastairl.config import load_config
from fastairl.models import build_backbone
from fastairl.trainer import train
from tiny_runs import one_intra_op_thread, small_folder, write_recipe


# ------------------------------------------------------------------------------------------ fixtures
one_thread = pytest.fixture(scope="module", autouse=True)(one_intra_op_thread)


@pytest.fixture(scope="module")
def runs(digits_root, tmp_path_factory):
    """Two 2-step ResNet-18 runs on 40 digits (BYOL, SGD and LARS recipes): {"sgd": last.pt, "lars":
    last.pt, "val": a held-out image folder}."""
    root = tmp_path_factory.mktemp("analysis_runs")
    images = small_folder(digits_root / "train", root / "train", per_class=4)
    val = small_folder(digits_root / "val", root / "val", per_class=5)
    out = {"val": val}
    for name, base in (("sgd", "byol_sgd.yaml"), ("lars", "byol_lars.yaml")):
        recipe = write_recipe(root / f"{name}.yaml", images, base=base, model={"arch": "resnet18"},
                              data={"val": str(val)}, train={"epochs": 1, "max_steps": 2})
        train(load_config(recipe), root / name)
        out[name] = root / name / "last.pt"
    return out


@pytest.fixture(scope="module")
def digits_batch(runs):
    """40 real 32x32 digits, normalised as the eval loader gives them: 40x3x32x32."""
    from fastairl.pipelines import build_eval_loader

    cfg = load_config(runs["sgd"].parent / "config.yaml")
    images, _ = next(iter(build_eval_loader(cfg, str(runs["val"]), batch_size=64)))
    return images


@pytest.fixture(scope="module")
def pixels():
    """Real data for the CKA algebra: the 8x8 sklearn digits (N=300 x 64) and a nonlinear view of them."""
    sklearn = pytest.importorskip("sklearn.datasets")
    x = torch.from_numpy(sklearn.load_digits().data[:300]).double()  # 300x64
    g = torch.Generator().manual_seed(0)
    y = torch.relu(x @ torch.randn(64, 40, generator=g, dtype=torch.float64))  # 300x40
    return x, y


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line_error(capsys, argv, *fragments) -> str:
    rc, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def check_plot(s: dict, path) -> None:
    """The plot is there, or (matplotlib missing) summary.json says why it is not."""
    if importlib.util.find_spec("matplotlib") is None:
        assert s["plot"].startswith("skipped: matplotlib is not installed") and not path.exists()
    else:
        assert s["plot"] == path.name and path.stat().st_size > 10_000 and path.name in s["outputs"]


def ckpt_backbone(path, branch="student") -> dict[str, torch.Tensor]:
    model = torch.load(path, map_location="cpu", weights_only=True)["model"]
    prefix = f"{branch}.backbone."
    return {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------- CKA algebra
def direct_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. eq. (1)-(2) on the Gram matrices: HSIC = tr(K H L H) / (n-1)^2."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)
    return (hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt()).item()


def debiased_gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    k, l = x @ x.T, y @ y.T
    return (unbiased_hsic(k, l) / (unbiased_hsic(k, k) * unbiased_hsic(l, l)).sqrt()).item()


def test_cka_matches_the_direct_formula(pixels):
    x, y = pixels
    assert linear_cka(x, y) == pytest.approx(direct_cka(x, y), rel=1e-10)
    # the feature-space debiased form against the Gram-matrix unbiased HSIC (Song et al. 2012)
    assert linear_cka(x, y, debiased=True) == pytest.approx(debiased_gram_cka(x, y), rel=1e-9)
    assert 0.0 < linear_cka(x, y) < 1.0


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariances(pixels, debiased):
    x, y = pixels
    ref = linear_cka(x, y, debiased)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert linear_cka(x @ q, y, debiased) == pytest.approx(ref, rel=1e-9)  # orthogonal transform
    assert linear_cka(3.7 * x, 0.01 * y, debiased) == pytest.approx(ref, rel=1e-9)  # isotropic scaling
    assert linear_cka(x + 50.0, y, debiased) == pytest.approx(ref, rel=1e-9)  # translation
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-12)
    # and it is not invariant to everything: an anisotropic scaling changes it
    scale = torch.linspace(0.1, 10, 64, dtype=torch.float64)
    assert abs(linear_cka(x * scale, y, debiased) - ref) > 1e-3


@pytest.mark.parametrize("debiased", [False, True])
def test_minibatch_accumulation_equals_full_batch(pixels, debiased):
    x, y = pixels
    x = x + 1e3  # a large common offset: centring must be over the whole set, not per batch
    est = LinearCKA()
    for i in range(0, x.shape[0], 37):  # uneven batches, a short last one
        est.update(x[i:i + 37], y[i:i + 37])
    assert est.n == 300
    assert est.value(debiased) == pytest.approx(linear_cka(x, y, debiased), rel=1e-9)
    if not debiased:
        assert est.value() == pytest.approx(direct_cka(x, y), rel=1e-9)
    # per-batch centring would be a different (wrong) estimator: check the test can tell
    per_batch = LinearCKA()
    for i in range(0, 300, 37):
        per_batch.update(x[i:i + 37] - x[i:i + 37].mean(0), y[i:i + 37] - y[i:i + 37].mean(0))
    assert abs(per_batch.value(debiased) - est.value(debiased)) > 1e-4


def test_minibatch_cka_of_nguyen(pixels):
    x, y = pixels
    one = MinibatchCKA()
    one.update(x, y)
    assert one.value() == pytest.approx(debiased_gram_cka(x, y), rel=1e-9)  # one batch = debiased CKA
    many, same = MinibatchCKA(), MinibatchCKA()
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    for i in range(0, 300, 50):
        many.update(x[i:i + 50], y[i:i + 50])
        same.update(x[i:i + 50], x[i:i + 50])
    assert same.value() == pytest.approx(1.0, abs=1e-12)
    rotated = MinibatchCKA()
    for i in range(0, 300, 50):
        rotated.update(2.0 * x[i:i + 50] @ q + 7.0, y[i:i + 50])
    assert rotated.value() == pytest.approx(many.value(), rel=1e-9)
    assert many.value() == pytest.approx(one.value(), abs=0.05)  # same population quantity


# ----------------------------------------------------------------------------------- CKA on models
def test_cka_per_layer_on_real_images(runs):
    from fastairl.pipelines import build_eval_loader

    a = load_backbone(runs["sgd"])
    rand = load_backbone("random", arch="resnet18")
    cfg = load_config(runs["sgd"].parent / "config.yaml")
    layers = layer_names(a.net, "blocks")
    assert layers == ["maxpool", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                      "layer4.0", "layer4.1"]
    self_est, n = cka_per_layer(a.net, a.net, build_eval_loader(cfg, str(runs["val"]), batch_size=50), layers)
    assert n == 50 and all(self_est[k].value() == pytest.approx(1.0, abs=1e-9) for k in layers)
    small, _ = cka_per_layer(a.net, rand.net, build_eval_loader(cfg, str(runs["val"]), batch_size=7), layers)
    whole, _ = cka_per_layer(a.net, rand.net, build_eval_loader(cfg, str(runs["val"]), batch_size=50), layers)
    for k in layers:  # batch size does not change the exact estimator
        assert small[k].value() == pytest.approx(whole[k].value(), rel=1e-7), k
    assert whole["layer4.1"].value() < 0.99  # a random network is not the trained one


@pytest.mark.cuda
def test_cka_on_the_gpu_equals_the_cpu(runs):
    from fastairl.pipelines import build_eval_loader

    a, rand = load_backbone(runs["sgd"]), load_backbone("random", arch="resnet18")
    cfg = load_config(runs["sgd"].parent / "config.yaml")
    layers = layer_names(a.net, "blocks")
    values = {}
    # TF32 convolutions (cuDNN's default) moved the debiased CKA of 50 images by 2e-4 on an H200: compare
    # in full fp32, where only the summation order differs
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for device in ("cpu", "cuda"):
            est, _ = cka_per_layer(a.net, rand.net, build_eval_loader(cfg, str(runs["val"]), batch_size=16),
                                   layers, device=device)
            values[device] = [est[k].value(debiased=True) for k in layers]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert values["cuda"] == pytest.approx(values["cpu"], abs=1e-5)


def test_cka_command(runs, tmp_path, capsys):
    out = tmp_path / "cka"
    rc, err = run_cli(capsys, "cka", runs["sgd"], "random", "--out", out, "--debiased", "--workers", 0,
                      "--batch-size", 16, "--labels", "byol_sgd,random")
    assert rc == 0, err
    s = summary(out)
    assert s["tool"] == "cka" and s["data"]["images"] == 50 and s["data"]["path"] == str(runs["val"])
    assert s["inputs"][0]["kind"] == "fastairl" and s["inputs"][0]["file"]["sha256"]
    assert s["inputs"][1] == {"label": "random", "kind": "random", "arch": "resnet18", "cifar_stem": False,
                              "seed": 12345}
    rows = list(csv.DictReader(open(out / "cka.csv")))
    assert [r["layer"] for r in rows] == list(s["results"])
    assert all(0.0 < float(r["cka"]) <= 1.0 + 1e-9 and r["cka_debiased"] for r in rows)
    check_plot(s, out / "cka.png")
    # flattened maps through the minibatch estimator, stages only
    out2 = tmp_path / "cka_flat"
    rc, err = run_cli(capsys, "cka", runs["sgd"], runs["lars"], "--out", out2, "--features", "flatten",
                      "--layers", "stages", "--workers", 0, "--batch-size", 25)
    assert rc == 0, err
    assert list(summary(out2)["results"]) == ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    one_line_error(capsys, ("cka", runs["sgd"], "random", "--out", out), str(out), "already holds results")


# ------------------------------------------------------------------------------------------- norms
def test_norm_kinds_follow_module_types():
    kinds = named_kinds(build_backbone("resnet50"))
    assert kinds["layer1.0.downsample.0.weight"] == "conv"
    assert kinds["layer1.0.downsample.1.weight"] == "bn_weight"  # torchvision's BN without 'bn' in its name
    assert kinds["layer1.0.downsample.1.bias"] == "bn_bias"
    counts = {k: list(kinds.values()).count(k) for k in set(kinds.values())}
    assert counts == {"conv": 53, "bn_weight": 53, "bn_bias": 53}


def test_norms_command(runs, tmp_path, capsys):
    out = tmp_path / "norms"
    rc, err = run_cli(capsys, "norms", runs["sgd"], runs["lars"], "--labels", "SGD,LARS", "--out", out)
    assert rc == 0, err
    rows = list(csv.DictReader(open(out / "norms.csv")))
    for label, path in (("SGD", runs["sgd"]), ("LARS", runs["lars"])):
        state = ckpt_backbone(path)
        mine = {r["name"]: r for r in rows if r["checkpoint"] == label}
        params = [k for k in state if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert sorted(mine) == sorted(params)
        for name in params:  # float64: a float32 sum over a 512x512x3x3 conv is off by ~4e-5
            expected = torch.linalg.norm(state[name].double().flatten()).item()
            assert float(mine[name]["norm"]) == pytest.approx(expected, rel=1e-9), name
    s = summary(out)
    assert s["results"]["SGD"]["per_kind"]["conv"]["tensors"] == 20
    sgd, lars = ckpt_backbone(runs["sgd"]), ckpt_backbone(runs["lars"])
    kinds = named_kinds(build_backbone("resnet18"))
    total = lambda st, kind: sum(st[k].double().square().sum() for k, v in kinds.items() if v == kind) ** 0.5
    ratio = s["results"]["LARS"]["ratio_to_SGD"]["bn_bias"]["total_norm_ratio"]
    assert ratio == pytest.approx((total(lars, "bn_bias") / total(sgd, "bn_bias")).item(), rel=1e-9)
    assert "| SGD |" in (out / "norms.md").read_text()
    check_plot(s, out / "norms.png")
    # the whole student: projector and predictor are linear layers
    out2 = tmp_path / "norms_student"
    rc, err = run_cli(capsys, "norms", runs["sgd"], "--part", "student", "--out", out2)
    assert rc == 0, err
    kinds = summary(out2)["results"][next(iter(summary(out2)["results"]))]["per_kind"]
    assert kinds["fc_weight"]["tensors"] == 4  # 2 in the projector, 2 in the predictor


# ------------------------------------------------------------------------------------ NormRescale
def test_normrescale_takes_the_anchor_norms_and_keeps_directions(runs, tmp_path, capsys):
    out = tmp_path / "rescaled"
    rc, err = run_cli(capsys, "normrescale", runs["lars"], "--anchor", runs["sgd"], "--out", out)
    assert rc == 0, err
    new = checkpoint.load(out / "normrescaled.pt")  # a verified fastairl checkpoint
    lars_model = torch.load(runs["lars"], map_location="cpu", weights_only=True)["model"]
    sgd, lars = ckpt_backbone(runs["sgd"]), ckpt_backbone(runs["lars"])
    kinds = named_kinds(build_backbone("resnet18"))
    for name in kinds:
        w = new["model"][f"student.backbone.{name}"].double().flatten()
        w_lars, w_sgd = lars[name].double().flatten(), sgd[name].double().flatten()
        assert torch.linalg.norm(w).item() == pytest.approx(torch.linalg.norm(w_sgd).item(), rel=1e-6), name
        cos = (w @ w_lars) / (torch.linalg.norm(w) * torch.linalg.norm(w_lars))
        assert cos.item() == pytest.approx(1.0, abs=1e-9), name
    for key, value in lars_model.items():  # running statistics, teacher, heads: untouched
        if not (key.startswith("student.backbone.") and key[len("student.backbone."):] in kinds):
            assert torch.equal(new["model"][key], value), key
    s = summary(out)
    assert s["anchor"]["file"]["path"] == str(runs["sgd"].resolve()) and s["kinds"] == ["conv", "bn_weight", "bn_bias"]
    assert s["results"]["bn_bias"]["total_norm_after"] == pytest.approx(s["results"]["bn_bias"]["total_norm_target"])
    assert load_backbone(out / "normrescaled.pt").arch == "resnet18"  # the tools read it back


def test_normrescale_constant_factor_and_kinds(runs):
    net = load_backbone(runs["lars"]).net
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    rows = normrescale(net, factor=0.1, kinds=("conv",))
    for r in rows:
        w = net.get_parameter(r["name"])
        expected = before[r["name"]] * (0.1 if r["kind"] == "conv" else 1.0)
        assert torch.allclose(w, expected, rtol=1e-6, atol=0), r["name"]
        assert r["action"] == ("rescaled" if r["kind"] == "conv" else "kept (kind not selected)")


def test_normrescale_refuses_a_mismatched_anchor(runs, tmp_path, capsys):
    other = tmp_path / "resnet10.pth"
    torch.save(build_backbone("resnet10").state_dict(), other)
    one_line_error(capsys, ("normrescale", runs["lars"], "--anchor", other, "--out", tmp_path / "o"),
                   "is a resnet18 and the anchor", "a resnet10", "same architecture")
    # same arch, other shapes (a CIFAR stem): the first mismatching tensor is named
    cifar = build_backbone("resnet18", cifar_stem=True)
    from fastairl.analysis.rescale import check_match

    with pytest.raises(ValueError, match=r"conv1.weight \(64, 3, 7, 7\) vs \(64, 3, 3, 3\)"):
        check_match(load_backbone(runs["lars"]).net, cifar, "lars", "cifar")
    one_line_error(capsys, ("normrescale", runs["lars"], "--out", tmp_path / "o"), "--anchor", "--factor")


# ------------------------------------------------------------------------------------------ export
def test_export_loads_into_torchvision_and_timm_with_identical_features(runs, digits_batch, tmp_path, capsys):
    out = tmp_path / "export"
    rc, err = run_cli(capsys, "export", runs["sgd"], "--out", out)
    assert rc == 0, err
    encoder = load_backbone(runs["sgd"]).net.eval()
    state = torch.load(out / "resnet18_torchvision.pth", map_location="cpu", weights_only=True)
    tv = torchvision.models.resnet18()
    missing = tv.load_state_dict(state, strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"] and not missing.unexpected_keys
    tv.fc = nn.Identity()
    tv.load_state_dict(state, strict=True)
    with torch.no_grad():
        ref = encoder(digits_batch)  # 40x512
        assert torch.equal(tv.eval()(digits_batch), ref)
        timm = pytest.importorskip("timm")
        tm = timm.create_model("resnet18", pretrained=False, num_classes=0)
        tm.load_state_dict(torch.load(out / "resnet18_timm.pth", weights_only=True), strict=True)
        torch.testing.assert_close(tm.eval()(digits_batch), ref, rtol=1e-5, atol=1e-5)
    s = summary(out)
    assert s["arch"] == "resnet18" and set(s["exports"]) == {"torchvision", "timm", "detectron2"}
    assert s["inputs"]["step"] == 2


def moco_convert(state: dict) -> dict:
    """MoCo detection/convert-pretrain-to-detectron2.py, rule for rule (its keys had 'module.encoder_q.')."""
    new = {}
    for k, v in state.items():
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace("layer{}".format(t), "res{}".format(t + 1))
        for t in [1, 2, 3]:
            k = k.replace("bn{}".format(t), "conv{}.norm".format(t))
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        new[k] = v.numpy()
    return new


def test_detectron2_pkl_resnet18(runs, tmp_path, capsys):
    out = tmp_path / "d2"
    rc, err = run_cli(capsys, "export", runs["sgd"], "--to", "detectron2", "--out", out)
    assert rc == 0, err
    obj = pickle.load(open(out / "resnet18_detectron2.pkl", "rb"))
    assert obj["matching_heuristics"] is True and obj["__author__"]
    expected = moco_convert(ckpt_backbone(runs["sgd"]))
    assert list(obj["model"]) == list(expected)
    for k, v in expected.items():
        assert isinstance(obj["model"][k], np.ndarray) and np.array_equal(obj["model"][k], v), k
    assert obj["model"]["res3.0.shortcut.weight"].shape == (128, 64, 1, 1)
    assert "res2.0.shortcut.weight" not in obj["model"]  # BasicBlock stage 1 keeps its width: no shortcut
    assert summary(out)["exports"]["detectron2"]["config"]["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64


def test_detectron2_names_resnet50(tmp_path):
    net = build_backbone("resnet50")
    done = export_mod.export(net, "resnet50", tmp_path, ["detectron2", "torchvision"])
    model = pickle.load(open(tmp_path / done["detectron2"]["file"], "rb"))["model"]
    assert model.keys() == moco_convert(net.state_dict()).keys()
    shapes = {"stem.conv1.weight": (64, 3, 7, 7), "stem.conv1.norm.running_var": (64,),
              "res2.0.shortcut.weight": (256, 64, 1, 1), "res2.0.shortcut.norm.bias": (256,),
              "res3.0.conv2.weight": (128, 128, 3, 3), "res4.5.conv3.norm.weight": (1024,),
              "res5.2.conv3.weight": (2048, 512, 1, 1), "res5.2.conv3.norm.running_mean": (2048,)}
    for k, shape in shapes.items():
        assert model[k].shape == shape, k
    assert not [k for k in model if "layer" in k or ".bn" in k or "downsample" in k]
    assert done["detectron2"]["config"]["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    # the Cityscapes DeepLab-v3 route: torchvision's segmentation model takes the same state dict
    from torchvision.models.segmentation import deeplabv3_resnet50

    seg = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=19, aux_loss=False)
    seg.backbone.load_state_dict(torch.load(tmp_path / done["torchvision"]["file"], weights_only=True), strict=True)


def test_export_refuses_what_nothing_could_load(tmp_path):
    with pytest.raises(ValueError, match="CIFAR stem"):
        export_mod.check_exportable("resnet18", True, "x.pt")
    with pytest.raises(ValueError, match="resnet10"):
        export_mod.check_exportable("resnet10", False, "x.pt")


# ---------------------------------------------------------------------------- loading and errors
def test_state_dicts_from_elsewhere(runs, tmp_path):
    """A MoCo-style wrapped state dict and a torchvision file give the same backbone, arch inferred."""
    state = ckpt_backbone(runs["sgd"])
    wrapped = {"state_dict": {**{f"module.encoder_q.{k}": v for k, v in state.items()},
                              **{f"module.encoder_k.{k}": v + 1 for k, v in state.items()},
                              "module.encoder_q.fc.0.weight": torch.zeros(2048, 512)}}
    torch.save(wrapped, tmp_path / "moco.pth.tar")
    bb = load_backbone(tmp_path / "moco.pth.tar")
    assert (bb.arch, bb.cifar_stem, bb.source["kind"]) == ("resnet18", False, "state_dict")
    for k, v in bb.net.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="holds a resnet18, not the resnet50 asked for"):
        load_backbone(tmp_path / "moco.pth.tar", arch="resnet50")
    teacher = load_backbone(runs["sgd"], branch="teacher")
    assert teacher.source["branch"] == "teacher"


def test_bad_checkpoints_are_one_line_errors(runs, tmp_path, capsys):
    one_line_error(capsys, ("norms", tmp_path / "nope.pt", "--out", tmp_path / "o"), "nope.pt", "does not exist")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(runs["sgd"].read_bytes()[:200_000])
    one_line_error(capsys, ("export", truncated, "--out", tmp_path / "o"), str(truncated), "cannot read")
    damaged = tmp_path / "damaged.pt"
    state = torch.load(runs["sgd"], map_location="cpu", weights_only=True)
    state["model"]["student.backbone.conv1.weight"][0, 0, 0, 0] += 1.0  # content no longer fits its digest
    torch.save(state, damaged)
    one_line_error(capsys, ("cka", damaged, "random", "--out", tmp_path / "o"), str(damaged), "damaged", "digest")
    one_line_error(capsys, ("norms", "random", "--out", tmp_path / "o"), "'random' needs an architecture", "--arch")
    assert not (tmp_path / "o" / "summary.json").exists()
