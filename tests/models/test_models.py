import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from alldetect.errors import AlldetectError
from alldetect.models import Member, WeightsUnavailable, create_member, list_members, member_spec
from alldetect.models._registry import MemberSpec, register_member
from alldetect.models.members import LITE_MEMBERS

PAPER = {"vgg16": "vgg16", "xception": "legacy_xception", "mobilenet": "mobilenetv1_100",
         "inception_resnet_v2": "inception_resnet_v2", "densenet121": "densenet121"}


def test_paper_members_map_to_timm():
    assert list_members(paper_only=True) == list(PAPER)
    for name, timm_name in PAPER.items():
        assert member_spec(name).timm_name == timm_name


@pytest.mark.parametrize("name", list(PAPER) + list(LITE_MEMBERS))
def test_every_member_builds_with_two_classes_and_a_cam_layer(name):
    member = create_member(name).eval()
    with torch.no_grad():
        out = member(torch.zeros(2, 3, 80, 80, dtype=torch.uint8))  # 80 px: above InceptionResNet-V2's 75
    assert out.shape == (2, 2)
    assert len(member.cam_layers) == 1 and isinstance(member.cam_layers[0], torch.nn.Module)
    cfg = member.net.pretrained_cfg
    assert member.mean.tolist() == pytest.approx(list(cfg["mean"]))


def test_unknown_member_and_duplicate_registration():
    with pytest.raises(AlldetectError, match="unknown member 'resnet9'; known: vgg16, xception"):
        create_member("resnet9")
    with pytest.raises(ValueError, match="already registered"):
        register_member(MemberSpec("vgg16", "vgg16", cam_layer="features.28"))


def _photo(image: np.ndarray) -> torch.Tensor:
    """ImageNet evaluation preprocessing: shorter side 256, center crop 224."""
    img = Image.fromarray(image)
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    return torch.from_numpy(np.array(img.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1)


@pytest.mark.parametrize("name", LITE_MEMBERS)
def test_offline_lite_imagenet_weights_recognise_photographs(name):
    model = create_member(name, pretrained=True, num_classes=1000).eval()
    assert model.mean.tolist() == [0.5, 0.5, 0.5]  # TF-trained: [-1, 1] inputs (more confident than ImageNet's)
    photos = torch.stack([_photo(im) for im in load_sample_images().images])  # a temple, a flower close-up
    with torch.no_grad():
        prob = model(photos).softmax(1)
    top = prob.argmax(1).tolist()
    assert top[0] in {442, 497, 663, 698, 832}  # bell cote, church, monastery, palace, stupa
    assert top[1] in {985, 738, 716, 599}  # daisy, pot (flowerpot), picket fence, honeycomb (the flower's heart)
    assert prob[0].max() > 0.25  # 250x chance over 1,000 classes
    torch.manual_seed(0)
    random = create_member(name, num_classes=1000).eval()
    with torch.no_grad():
        assert random(photos).softmax(1).max() < 0.25  # the bound above tells ImageNet weights from none


@pytest.mark.parametrize("name", LITE_MEMBERS)
def test_two_class_lite_keeps_the_imagenet_backbone(name):
    pretrained = create_member(name, pretrained=True)
    reference = create_member(name, pretrained=True, num_classes=1000)
    assert pretrained.net.classifier.out_features == 2
    assert torch.equal(pretrained.net.conv_stem.weight, reference.net.conv_stem.weight)


def test_missing_hub_weights_fail_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="--weights FILE or --weights-dir DIR .* or --no-pretrained"):
        create_member("mobilenet", pretrained=True)


def test_local_imagenet_weights_file_and_folder(tmp_path):
    source = create_member("mobilenet", num_classes=1000)
    torch.save(source.net.state_dict(), tmp_path / "mobilenetv1_100.pth")
    for where in (tmp_path / "mobilenetv1_100.pth", tmp_path):
        loaded = create_member("mobilenet", weights=where)
        assert torch.equal(loaded.net.conv_stem.weight, source.net.conv_stem.weight)
        assert loaded.net.classifier.out_features == 2
    with pytest.raises(WeightsUnavailable, match="no weights file for densenet121"):
        create_member("densenet121", weights=tmp_path)
    (tmp_path / "broken.pth").write_bytes(b"nope")
    with pytest.raises(WeightsUnavailable, match="not usable ImageNet weights"):
        create_member("mobilenet", weights=tmp_path / "broken.pth")


def test_member_normalises_uint8_like_float():
    member = create_member("mobilenet").eval()
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(member(x), member(x.float() / 255), atol=1e-6)
    assert isinstance(member, Member)
