import numpy as np
import pytest
import torch

from alldetect.data.geometry import center_crop
from alldetect.data.transforms import augmentation, normalize, train_augmentation
from alldetect.errors import ImageProblem


@pytest.mark.parametrize("shape, size", [((450, 450, 3), 300), ((451, 449, 3), 300), ((80, 80, 3), 80),
                                         ((100, 120, 3), 75)])
def test_center_crop_is_numpy_slicing(shape, size):
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    out = center_crop(image, size)
    assert out.shape == (size, size, 3)
    np.testing.assert_array_equal(out, image[top:top + size, left:left + size])


def test_center_crop_450_to_300_keeps_rows_75_to_374():
    image = np.arange(450)[:, None, None].repeat(450, 1).repeat(3, 2)
    out = center_crop(image, 300)
    assert out[0, 0, 0] == 75 and out[-1, 0, 0] == 374


def test_center_crop_refuses_small_images_naming_the_file():
    with pytest.raises(ImageProblem, match="cell.bmp: image is 200x100"):
        center_crop(np.zeros((100, 200, 3), np.uint8), 150, path="cell.bmp")


def test_augmentation_keeps_uint8_shape_and_black_fill():
    torch.manual_seed(0)
    x = torch.zeros(3, 80, 80, dtype=torch.uint8)
    x[:, 30:50, 30:50] = 200
    outs = [train_augmentation()(x) for _ in range(8)]
    assert all(o.shape == x.shape and o.dtype == torch.uint8 for o in outs)
    assert all(o[:, 0, 0].sum() == 0 for o in outs)  # background stays black
    assert any(not torch.equal(o, x) for o in outs)


def test_stain_matrix_augmentation_varies_the_stain_keeps_the_background_and_repeats_under_a_seed():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[0, 8:24, 8:24], image[1, 8:24, 8:24], image[2, 8:24, 8:24] = 65, 27, 76  # C-NMC's mean stain
    augment = augmentation("dihedral+hestain")
    torch.manual_seed(0)
    outs = torch.stack([augment(image) for _ in range(100)])
    assert outs.dtype == torch.uint8 and outs.shape[1:] == image.shape
    assert (outs[:, :, :8].sum() == 0) and (outs[:, :, 24:].sum() == 0)  # black stays black
    cell = outs[:, :, 16, 16].float()
    assert cell.std(0).min() > 2  # every channel varies between draws
    assert (cell.mean(0) - torch.tensor([65.0, 27.0, 76.0])).abs().max() < 40  # a stain near the original
    torch.manual_seed(0)
    assert torch.equal(torch.stack([augment(image) for _ in range(100)]), outs)  # torch's seed decides


def test_normalize_uses_the_model_mean_and_std():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(normalize(x.float() / 255, (0.5,) * 3, (0.25, 0.5, 1.0)), out)


def _cell(colour: tuple[int, int, int], *, size: int = 32) -> torch.Tensor:
    """A textured disc of ``colour`` on the black background, NCHW uint8."""
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    texture = np.random.default_rng(0).integers(-20, 21, (size, size, 1))
    rgb = np.where(disc[..., None], np.asarray(colour) + texture, 0).astype(np.uint8)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_centring_removes_a_cell_s_own_colour_and_keeps_the_background_at_zero():
    pale, dark = _cell((140, 60, 160)), _cell((90, 40, 110))
    centred = [normalize(c, *IMAGENET, "centre") for c in (pale, dark)]
    torch.testing.assert_close(centred[0], centred[1], atol=1e-6, rtol=0)
    background = pale.amax(1, keepdim=True).expand_as(pale) == 0
    assert (centred[0][background] == 0).all() and (centred[0][~background] != 0).any()
    stained = ~background
    torch.testing.assert_close(centred[0][stained].view(3, -1).mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    assert not torch.allclose(normalize(pale, *IMAGENET), normalize(dark, *IMAGENET))  # what imagenet keeps


def test_standardising_also_removes_a_cell_s_contrast():
    cell = _cell((150, 120, 160))
    stained = cell.amax(1, keepdim=True) > 0
    contrasted = torch.where(stained, (cell.float() - 100) * 1.5 + 100, 0.0).round().clamp(0, 255).to(torch.uint8)
    a, b = normalize(cell, *IMAGENET, "standardise"), normalize(contrasted, *IMAGENET, "standardise")
    torch.testing.assert_close(a, b, atol=0.05, rtol=0)  # the uint8 rounding of a spread of about 12 levels
    assert (normalize(cell, *IMAGENET) - normalize(contrasted, *IMAGENET)).abs().max() > 0.5
    assert normalize(torch.zeros_like(cell), *IMAGENET, "standardise").abs().max() == 0  # an empty image: no NaN
