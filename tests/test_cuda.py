"""GPU tier: runs only where CUDA is present (skips cleanly elsewhere)."""
import pytest
import torch

from fastairl.config import build_config
from fastairl.methods import build_method
from fastairl.optim import LARS, build_optimizer

pytestmark = pytest.mark.cuda


def _cfg(**method):
    return build_config({"model": {"arch": "resnet18", "projector": {"hidden_dim": 256, "out_dim": 64},
                                   "predictor": {"hidden_dim": 256}},
                         "method": {"queue_size": 256, "bn": "plain", **method}, "train": {"batch_size": 32}})


@pytest.mark.parametrize("loss", ["infonce", "byol"])
def test_bf16_channels_last_step_on_gpu(loss):
    torch.manual_seed(0)
    cfg = _cfg(loss=loss)
    m = build_method(cfg, 10).cuda().to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg.optim, m.student, 32)
    views = [torch.randn(32, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last) for _ in range(2)]
    y = torch.randint(0, 10, (32,), device="cuda")
    for step in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_value, _ = m(views, y, step)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        m.update_teacher(0.99)
    assert torch.isfinite(loss_value)


def test_lars_gpu_matches_cpu():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    gpu = [p.detach().cuda().requires_grad_() for p in net.parameters()]
    cpu = [p.detach().clone().requires_grad_() for p in net.parameters()]
    groups = lambda ps: [{"params": [p for p in ps if p.ndim > 1]},
                         {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]
    o_gpu, o_cpu = LARS(groups(gpu), lr=0.5, weight_decay=1e-4), LARS(groups(cpu), lr=0.5, weight_decay=1e-4)
    for _ in range(20):
        grads = [torch.randn_like(p) for p in cpu]
        for p, g in zip(cpu, grads):
            p.grad = g
        for p, g in zip(gpu, grads):
            p.grad = g.cuda()
        o_cpu.step()
        o_gpu.step()
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), atol=1e-5)


def test_sgd_is_fused_on_gpu():
    cfg = _cfg()
    m = build_method(cfg, 10).cuda()
    opt = build_optimizer(cfg.optim, m.student, 32)
    assert opt.defaults.get("fused") is True


def test_knn_on_gpu_matches_cpu():
    """The kNN search runs on the device: same neighbours and votes as on the CPU, every k."""
    from fastairl.eval.features import knn_accuracies

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=g)
    by, vy = torch.randint(0, 10, (5000,), generator=g), torch.randint(0, 10, (700,), generator=g)
    bf, vf = centres[by] + 6 * torch.randn(5000, 64, generator=g), centres[vy] + 6 * torch.randn(700, 64, generator=g)
    cpu = knn_accuracies(bf, by, vf, vy, (1, 20, 200), 0.07, 10)
    assert knn_accuracies(bf, by, vf, vy, (1, 20, 200), 0.07, 10, device="cuda") == pytest.approx(cpu, abs=200 / 700 + 1e-9)  # float sums: at most 2 queries
    assert 20 < min(cpu.values()) and max(cpu.values()) < 90  # neither chance nor trivial


def test_cuda_rng_state_is_this_gpus_and_older_lists_restore():
    """A checkpoint keeps the saving process's GPU RNG state only (a resume may see fewer GPUs);
    checkpoints of every visible GPU's state still restore this GPU's entry."""
    from fastairl import checkpoint

    state = checkpoint.rng_state()
    assert isinstance(state["cuda"], torch.Tensor)
    want = torch.rand(3, device="cuda")
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), want)
    checkpoint.set_rng_state({**state, "cuda": [state["cuda"]] * (torch.cuda.current_device() + 1)})
    assert torch.equal(torch.rand(3, device="cuda"), want)
    checkpoint.set_rng_state({**state, "cuda": []})  # saved where this GPU's index did not exist: kept as is
    assert torch.cuda.is_bf16_supported(including_emulation=False) == (torch.cuda.get_device_capability()[0] >= 8)


def test_checkpoint_snapshot_of_gpu_state_is_pinned_reused_and_unaffected_by_later_steps():
    """GPU tensors are copied without a wait each into page-locked buffers, synchronised once: the copy
    holds the values of the save (the next step's in-place updates come after), and a second snapshot
    reuses the buffers."""
    from fastairl import checkpoint

    conv = torch.nn.Conv2d(3, 8, 3).cuda().to(memory_format=torch.channels_last)
    state = {"model": conv.state_dict(), "step": 3, "ok": [torch.ones(2, device="cuda"), torch.zeros(1)]}
    want = {k: v.cpu().clone() for k, v in conv.state_dict().items()}
    pinned = []
    copy = checkpoint.snapshot(state, pinned)
    with torch.no_grad():
        conv.weight.mul_(2.0)  # queued right after the copies
    assert copy["step"] == 3 and all(torch.equal(copy["model"][k], want[k]) for k in want)
    assert all(t.is_pinned() for t in copy["model"].values()) and not copy["ok"][1].is_pinned()
    assert len(pinned) == 3  # weight, bias, ok[0]: the CPU tensor is cloned, not pinned
    ptrs = [t.data_ptr() for t in pinned]
    again = checkpoint.snapshot(state, pinned)
    assert [t.data_ptr() for t in pinned] == ptrs and torch.equal(again["model"]["weight"], 2 * want["weight"])
