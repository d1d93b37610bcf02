import numpy as np
import pytest
import torch

from alldetect.data.geometry import center_crop
from alldetect.data.transforms import normalize, train_augmentation
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


def test_normalize_uses_the_model_mean_and_std():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(normalize(x.float() / 255, (0.5,) * 3, (0.25, 0.5, 1.0)), out)
