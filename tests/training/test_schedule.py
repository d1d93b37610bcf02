import pytest

from alldetect.training.schedule import triangular2_lr


def _keras_clr_triangular2(iteration, base_lr, max_lr, step_size):
    """The reference implementation (bckenstler/CLR, Keras callback), verbatim in logic."""
    import numpy as np

    cycle = np.floor(1 + iteration / (2 * step_size))
    x = np.abs(iteration / step_size - 2 * cycle + 1)
    return base_lr + (max_lr - base_lr) * np.maximum(0, (1 - x)) / float(2 ** (cycle - 1))


@pytest.mark.parametrize("half_cycle", [1, 6, 6 * 17, 6 * 364])
def test_matches_the_keras_clr_formula_at_every_step(half_cycle):
    for step in range(0, 8 * half_cycle, max(1, half_cycle // 7)):
        ours = triangular2_lr(step, low=1e-7, high=2e-3, half_cycle=half_cycle)
        assert ours == pytest.approx(_keras_clr_triangular2(step, 1e-7, 2e-3, half_cycle), rel=1e-12, abs=1e-18)


def test_shape_of_the_paper_schedule():
    half = 6 * 10  # step size = 6 epochs of 10 iterations
    lr = [triangular2_lr(s, low=1e-7, high=2e-3, half_cycle=half) for s in range(4 * half + 1)]
    assert lr[0] == 1e-7 and lr[half] == pytest.approx(2e-3)
    assert lr[2 * half] == pytest.approx(1e-7) and lr[3 * half] == pytest.approx(1e-7 + (2e-3 - 1e-7) / 2)
    assert max(lr) == pytest.approx(2e-3) and min(lr) == pytest.approx(1e-7)


def test_rejects_a_zero_step_size():
    with pytest.raises(ValueError):
        triangular2_lr(0, low=0, high=1, half_cycle=0)
