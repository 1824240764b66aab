"""Schedules against independent closed-form values."""
import math

import pytest

from fastairl.schedules import lr_at, momentum_at, scaled_lr

T, W, PEAK = 1000, 100, 0.4


def _cosine_by_hand(step: int, min_lr: float = 0.0) -> float:
    """Cosine decay written from the textbook formula, not from the module's helper."""
    t = (step - W) / (T - W)
    return min_lr + (PEAK - min_lr) * (1 + math.cos(math.pi * t)) / 2


def test_warmup_is_linear_and_starts_above_zero():
    assert lr_at(0, T, W, PEAK) == pytest.approx(PEAK / W)
    assert lr_at(49, T, W, PEAK) == pytest.approx(PEAK * 50 / W)
    assert lr_at(W - 1, T, W, PEAK) == pytest.approx(PEAK)


def test_cosine_endpoints_and_midpoint():
    assert lr_at(W, T, W, PEAK) == pytest.approx(PEAK)
    assert lr_at((T + W) // 2, T, W, PEAK) == pytest.approx(PEAK / 2)
    assert lr_at(T, T, W, PEAK) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(T + 50, T, W, PEAK) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("step", [100, 137, 400, 777, 999])
def test_cosine_matches_formula(step):
    assert lr_at(step, T, W, PEAK) == pytest.approx(_cosine_by_hand(step))
    assert lr_at(step, T, W, PEAK, min_lr=0.01) == pytest.approx(_cosine_by_hand(step, 0.01))


def test_cosine_ends_at_min_lr():
    assert lr_at(T, T, W, PEAK, min_lr=0.01) == pytest.approx(0.01)


def test_constant_schedule_holds_peak_after_warmup():
    assert lr_at(0, T, W, PEAK, "constant") == pytest.approx(PEAK / W)
    assert all(lr_at(s, T, W, PEAK, "constant") == PEAK for s in (W, 500, T))


def test_no_warmup_starts_at_peak():
    assert lr_at(0, T, 0, PEAK) == pytest.approx(PEAK)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="cosine"):
        lr_at(0, T, W, PEAK, "linear")
    with pytest.raises(ValueError, match="cosine"):
        momentum_at(0, T, 0.99, "step")


def test_momentum_constant():
    assert momentum_at(0, T, 0.99, "constant") == 0.99
    assert momentum_at(T, T, 0.99, "constant") == 0.99


def test_momentum_cosine_endpoints_and_midpoint():
    assert momentum_at(0, T, 0.996, "cosine") == pytest.approx(0.996)
    assert momentum_at(T, T, 0.996, "cosine") == pytest.approx(1.0)
    assert momentum_at(T // 2, T, 0.996, "cosine") == pytest.approx(0.998)
    k = 250  # cos(pi/4) = sqrt(2)/2
    assert momentum_at(k, T, 0.99, "cosine") == pytest.approx(1 - 0.01 * (math.sqrt(2) / 2 + 1) / 2)


def test_momentum_cosine_is_monotone():
    values = [momentum_at(k, T, 0.99, "cosine") for k in range(0, T + 1, 50)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_scaled_lr_linear_rule():
    assert scaled_lr(0.03, 1024) == pytest.approx(0.12)
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    assert scaled_lr(0.05, 256) == pytest.approx(0.05)


def test_run_length_keeps_iterations_and_the_warm_up_share():
    from fastairl.schedules import run_length

    assert run_length(200, 10, 1.0, True) == (200, 10)
    assert run_length(200, 10, 0.1, False) == (200, 10)  # the subset's own epochs
    epochs, warmup = run_length(200, 10, 0.1, True)
    assert epochs == 2000 and warmup == pytest.approx(100)
    epochs, warmup = run_length(200, 10, 0.7, True)
    assert epochs == 286 and warmup / epochs == pytest.approx(10 / 200)  # ceil(200 / 0.7); 5 % warm-up
