"""The batched augmentation that feeds a GPU draws what the per-image one draws, keeps dtype and background,
and is a function of its generator's seed (resumption is exact: see test_training's SIGKILL test with
--augment-on device)."""

import numpy as np
import pytest
import torch

from alldetect.data.transforms import PaperBatchAugmentation, augmentation, batch_augmentation, train_augmentation

N = 4000


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _affine_draws_per_image(size: int) -> dict[str, np.ndarray]:
    affine = train_augmentation().transforms[2]
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    draws = [affine.make_params([image]) for _ in range(N)]
    return {"angle": np.array([d["angle"] for d in draws]), "scale": np.array([d["scale"] for d in draws]),
            "shift": np.array([d["translate"][0] for d in draws], dtype=float) / size}


def _affine_draws_batched() -> dict[str, np.ndarray]:
    params = PaperBatchAugmentation().draw(N, _seeded(0), torch.device("cpu"))
    return {"angle": params["angle"].numpy(), "scale": params["scale"].numpy(), "shift": params["shift"][:, 0].numpy()}


def test_batched_affine_draws_the_same_rotation_zoom_and_shift_family():
    torch.manual_seed(0)
    per_image, batched = _affine_draws_per_image(64), _affine_draws_batched()
    for key, (low, high) in {"angle": (-180, 180), "scale": (0.9, 1.1), "shift": (-0.1, 0.1)}.items():
        a, b = per_image[key], batched[key]
        assert low - 0.02 <= b.min() and b.max() <= high + 0.02, key
        spread = (high - low) / np.sqrt(12)  # both uniform over the same range
        assert abs(a.mean() - b.mean()) < 0.1 * spread and abs(a.std() - b.std()) < 0.1 * spread, key


def test_batched_affine_moves_the_cell_as_drawn():
    """One image, one draw, checked against the geometry: a shift of +10% moves a mark right by 10% of the side,
    a flip mirrors it, and the identity leaves every pixel as it was."""
    augment = PaperBatchAugmentation()
    image = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    image[:, :, 18:22, 6:10] = 255  # a mark left of the centre

    def apply(flip=(False, False), angle=0.0, scale=1.0, shift=(0.0, 0.0)):
        params = {"flip": torch.tensor([flip]), "angle": torch.tensor([angle]), "scale": torch.tensor([scale]),
                  "shift": torch.tensor([shift])}
        augment.draw = lambda n, generator, device: params
        return augment(image, _seeded(0))[0, 0]

    assert torch.equal(apply(), image[0, 0])
    assert torch.equal(apply(shift=(0.1, 0.0)), torch.roll(image[0, 0], 4, dims=1))
    assert torch.equal(apply(flip=(True, False)), image[0, 0].flip(-1))
    rows, cols = torch.nonzero(apply(angle=90.0) > 128, as_tuple=True)
    # a quarter turn about the centre (19.5, 19.5) takes the mark from 12 px left of it to 12 px above or below
    assert cols.float().mean() == pytest.approx(19.5, abs=0.5)
    assert abs(rows.float().mean() - 19.5) == pytest.approx(12, abs=0.5)
    rows, cols = torch.nonzero(apply(scale=0.5) > 64, as_tuple=True)  # zooming out halves the distance
    assert cols.float().mean() == pytest.approx(19.5 - 6, abs=0.5) and rows.float().mean() == pytest.approx(19.5)


@pytest.mark.parametrize("name", ["paper", "dihedral", "dihedral+stain"])
def test_batched_flips_dtype_background_and_seed(name):
    augment = batch_augmentation(name)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, 8:14, 6:20] = 200  # an asymmetric mark off the centre
    batch = image.expand(2000, -1, -1, -1).contiguous()
    out = augment(batch, _seeded(1))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert (out[:, :, 0, 0] == 0).all() and (out[:, :, -1, -1] == 0).all()  # black stays black
    left_right = (out[:, 0, :, :16].float().sum((1, 2)) < out[:, 0, :, 16:].float().sum((1, 2))).float().mean()
    assert 0.4 < left_right < 0.6  # the mark sits left in the input: about half the outputs are mirrored
    torch.manual_seed(5)  # the global generator plays no part
    assert torch.equal(augment(batch, _seeded(1)), out)
    assert not torch.equal(augment(batch, _seeded(2)), out)


def test_no_augmentation_is_none():
    assert batch_augmentation("none") is None


def test_stain_jitter_changes_the_cells_colour_but_not_the_black_background():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[0, 8:24, 8:24], image[1, 8:24, 8:24], image[2, 8:24, 8:24] = 65, 27, 76  # C-NMC's mean stain
    generator = _seeded(0)
    for augment in (augmentation("dihedral+stain"),
                    lambda x: batch_augmentation("dihedral+stain")(x[None], generator)[0]):
        torch.manual_seed(0)
        outs = torch.stack([augment(image) for _ in range(200)])
        assert (outs[:, :, 0, 0] == 0).all()
        cell = outs[:, :, 16, 16].float()
        assert cell.std(0).min() > 2  # every channel varies between draws
        assert (cell.mean(0) - torch.tensor([65.0, 27.0, 76.0])).abs().max() < 15  # around the original stain
