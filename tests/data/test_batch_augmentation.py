"""The batched augmentation that feeds a GPU draws what the per-image one draws, keeps dtype and background,
and is a function of its seed (resumption is exact: see test_training's SIGKILL test with --augment-on device)."""

import numpy as np
import pytest
import torch

from alldetect.data.transforms import PaperBatchAugmentation, augmentation, batch_augmentation, train_augmentation

N = 4000


def _affine_draws_per_image(size: int) -> dict[str, np.ndarray]:
    affine = train_augmentation().transforms[2]
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    draws = [affine.make_params([image]) for _ in range(N)]
    return {"angle": np.array([d["angle"] for d in draws]), "scale": np.array([d["scale"] for d in draws]),
            "shift": np.array([d["translate"][0] for d in draws], dtype=float) / size}


def _affine_draws_batched(size: int) -> dict[str, np.ndarray]:
    params = PaperBatchAugmentation().ops[2].forward_parameters(torch.Size([N, 3, size, size]))
    return {"angle": params["angle"].numpy(), "scale": params["scale"][:, 0].numpy(),
            "shift": params["translations"][:, 0].numpy() / size}


def test_batched_affine_draws_the_same_rotation_zoom_and_shift_family():
    torch.manual_seed(0)
    per_image, batched = _affine_draws_per_image(64), _affine_draws_batched(64)
    for key, (low, high) in {"angle": (-180, 180), "scale": (0.9, 1.1), "shift": (-0.1, 0.1)}.items():
        a, b = per_image[key], batched[key]
        assert low - 0.02 <= b.min() and b.max() <= high + 0.02, key
        spread = (high - low) / np.sqrt(12)  # both uniform over the same range
        assert abs(a.mean() - b.mean()) < 0.1 * spread and abs(a.std() - b.std()) < 0.1 * spread, key


@pytest.mark.parametrize("name", ["paper", "dihedral", "dihedral+stain"])
def test_batched_flips_dtype_background_and_seed(name):
    augment = batch_augmentation(name)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, 8:14, 6:20] = 200  # an asymmetric mark off the centre
    batch = image.expand(2000, -1, -1, -1).contiguous()
    torch.manual_seed(1)
    out = augment(batch)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert (out[:, :, 0, 0] == 0).all() and (out[:, :, -1, -1] == 0).all()  # black stays black
    left_right = (out[:, 0, :, :16].float().sum((1, 2)) < out[:, 0, :, 16:].float().sum((1, 2))).float().mean()
    assert 0.4 < left_right < 0.6  # the mark sits left in the input: about half the outputs are mirrored
    torch.manual_seed(1)
    assert torch.equal(augment(batch), out)
    torch.manual_seed(2)
    assert not torch.equal(augment(batch), out)


def test_no_augmentation_is_none():
    assert batch_augmentation("none") is None


def test_stain_jitter_changes_the_cells_colour_but_not_the_black_background():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[0, 8:24, 8:24], image[1, 8:24, 8:24], image[2, 8:24, 8:24] = 65, 27, 76  # C-NMC's mean stain
    for augment in (augmentation("dihedral+stain"), lambda x: batch_augmentation("dihedral+stain")(x[None])[0]):
        torch.manual_seed(0)
        outs = torch.stack([augment(image) for _ in range(200)])
        assert (outs[:, :, 0, 0] == 0).all()
        cell = outs[:, :, 16, 16].float()
        assert cell.std(0).min() > 2  # every channel varies between draws
        assert (cell.mean(0) - torch.tensor([65.0, 27.0, 76.0])).abs().max() < 15  # around the original stain
