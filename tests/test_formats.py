"""The released models' formats (convert.FORMATS): for each, a PyTorch module written here with
that repository's state-dict layout and forward, random weights and BatchNorm statistics, saved
as its training script saves it; `sslocal convert` (factory.convert_checkpoint) and then the
map through sslocal's evaluator must equal the map that repository's test script computes, at
224 px. Also: `--format auto` recognises each, a file forced into another format fails in one
line naming the mismatch, and nothing whose keys load while its map would differ is accepted.

Read from (docs/protocol.md section 2, "Released models"): hche11/Localizing-Visual-Sounds-the-
Hard-Way 8fe8cbb (model.py, models/base_models.py, test.py), stoneMo/SLAVC 05b429c (model.py,
test.py, train.py), jinxiang-liu/SSL-TIE c49e6a9 (models/model.py, networks/base_models.py,
main.py), OpenNLPLab/FNAC_AVL 0a0ca78 (model.py, test.py, train.py). Widths are reduced (the
layouts and forwards are not).
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="format tests need torch (pip install torch)")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from configs import tiny  # noqa: E402
from sslocal import sharding  # noqa: E402
from sslocal.data.pipeline import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from sslocal.evaluator import Evaluator  # noqa: E402
from sslocal.models import convert, factory, load  # noqa: E402
from tests.torch_reference import TorchBasicBlock, TorchResNet18, randomize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIDTH, DIM, TAU = 8, 16, 0.03
N = 2  # samples per map comparison
TOL = 1e-4


# Compile time dominates these tiny models (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


# ------------------------------------------------------------ the repositories' modules


def normalize_img(value):
    """Their utils.normalize_img: min-max, a constant map left as it is."""
    lo, hi = value.min(), value.max()
    return (value - lo) / (hi - lo) if hi - lo != 0 else value


class LVSResNet(nn.Module):
    """LVS models/base_models.py ResNet (SSL-TIE's networks/base_models.py is the same with
    dim_tgt=None): three stems (conv1_a for audio, conv1 for images, conv1_flow unused),
    layer4 at stride 1, the 1000-way fc kept (unused)."""

    def __init__(self, modal, width):
        super().__init__()
        self.modal = modal
        self.conv1_a = nn.Conv2d(1, width, 7, 2, 3, bias=False)
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.conv1_flow = nn.Conv2d(6, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inp = width
        for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 1))):
            out = width * mult
            setattr(self, f"layer{i + 1}", nn.Sequential(TorchBasicBlock(inp, out, stride),
                                                          TorchBasicBlock(out, out, 1)))
            inp = out
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, 1000)

    def forward(self, x):
        x = self.conv1_a(x) if self.modal == "audio" else self.conv1(x)
        x = self.maxpool(self.relu(self.bn1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TorchLVS(nn.Module):
    """LVS model.py AVENet at evaluation: the cosine map A (B, 1, h, w)."""

    def __init__(self, width):
        super().__init__()
        self.imgnet = LVSResNet("vision", width)
        self.audnet = LVSResNet("audio", width)
        self.m = nn.Sigmoid()
        self.avgpool = nn.AdaptiveMaxPool2d((1, 1))

    def forward(self, image, audio):
        img = F.normalize(self.imgnet(image), dim=1)
        aud = F.normalize(self.avgpool(self.audnet(audio)).view(image.shape[0], -1), dim=1)
        return torch.einsum("ncqa,nchw->nqa", [img, aud.unsqueeze(2).unsqueeze(3)]).unsqueeze(1)


class TorchSSLTIE(TorchLVS):
    """SSL-TIE models/model.py AVENet: LVS's towers, plus vision_fc1 (never called) and
    conv3 / norm3, whose output its forward computes and discards."""

    def __init__(self, width):
        super().__init__(width)
        self.vision_fc1 = nn.Conv2d(1024, 512, kernel_size=(1, 1))
        self.relu = nn.ReLU()
        self.conv3 = nn.Conv2d(1, 1, 1)
        self.norm3 = nn.BatchNorm2d(1)
        self.vpool3 = nn.MaxPool2d(14, stride=14)

    def forward(self, image, audio):
        A = super().forward(image, audio)
        self.out1 = self.norm3(self.conv3(A))  # computed, not part of the map
        return A


def torchvision_tower(in_channels, width, audio):
    """torchvision resnet18 as EZ-VSL / SLAVC / FNAC build it: avgpool and fc replaced
    (audio: AdaptiveMaxPool2d, images: Identity, the map unflattened after)."""
    net = TorchResNet18(in_channels, width)
    net.avgpool = nn.AdaptiveMaxPool2d((1, 1)) if audio else nn.Identity()
    net.fc = nn.Identity()
    return net


def tower_forward(net, x):
    """torchvision ResNet.forward: features, avgpool, flatten, fc."""
    return net.fc(torch.flatten(net.avgpool(net.features(x)), 1))


class TorchFNAC(nn.Module):
    """FNAC_AVL model.py FNAC at evaluation (EZ-VSL's modules): Savl = the diagonal of
    einsum(img, aud) / tau."""

    def __init__(self, width, dim):
        super().__init__()
        self.imgnet = torchvision_tower(3, width, audio=False)
        self.img_proj = nn.Conv2d(8 * width, dim, kernel_size=(1, 1))
        self.img_dropout = nn.Dropout(p=0.9)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.audnet = torchvision_tower(1, width, audio=True)
        self.aud_proj = nn.Linear(8 * width, dim)
        self.aud_dropout = nn.Dropout(p=0.0)
        self.width = width

    def forward(self, image, audio):
        img = tower_forward(self.imgnet, image).unflatten(1, (8 * self.width, 7, 7))
        img = F.normalize(self.img_proj(self.img_dropout(img)), dim=1)
        aud = F.normalize(self.aud_proj(self.aud_dropout(tower_forward(self.audnet, audio))),
                          dim=1)
        logits = torch.einsum("nchw,mc->nmhw", img, aud) / TAU
        return logits[torch.arange(len(img)), torch.arange(len(img))]


class TorchSLAVC(nn.Module):
    """SLAVC model.py SLAVC at evaluation: two heads per tower and momentum copies of every
    part; Savl = the mean of the two heads' maps / tau, of the online or momentum encoders."""

    PARTS = ("imgnet", "img_proj1", "img_proj2", "audnet", "aud_proj1", "aud_proj2")

    def __init__(self, width, dim):
        super().__init__()
        self.width = width
        self.imgnet = torchvision_tower(3, width, audio=False)
        self.img_dropout = nn.Dropout(p=0.9)
        self.img_proj1 = nn.Conv2d(8 * width, dim, kernel_size=(1, 1))
        self.img_proj2 = nn.Conv2d(8 * width, dim, kernel_size=(1, 1))
        self.audnet = torchvision_tower(1, width, audio=True)
        self.aud_proj1 = nn.Linear(8 * width, dim)
        self.aud_proj2 = nn.Linear(8 * width, dim)
        self.aud_dropout = nn.Dropout(p=0.0)
        for part in self.PARTS:
            setattr(self, f"momentum_{part}", copy.deepcopy(getattr(self, part)))

    def forward(self, image, audio, use_mom_eval=False):
        p = "momentum_" if use_mom_eval else ""
        part = {name: getattr(self, p + name) for name in self.PARTS}
        img = tower_forward(part["imgnet"], image).unflatten(1, (8 * self.width, 7, 7))
        img = self.img_dropout(img)
        img1 = F.normalize(part["img_proj1"](img), dim=1)
        img2 = F.normalize(part["img_proj2"](img), dim=1)
        aud = self.aud_dropout(tower_forward(part["audnet"], audio))
        aud1 = F.normalize(part["aud_proj1"](aud), dim=1)
        aud2 = F.normalize(part["aud_proj2"](aud), dim=1)
        savl1 = torch.einsum("nchw,nc->nhw", img1, aud1) / TAU
        savl2 = torch.einsum("nchw,nc->nhw", img2, aud2) / TAU
        return (savl1 + savl2) / 2


def random_model(module, seed):
    """randomize() on every part (float32, as saved); SLAVC's momentum copies get weights of
    their own (after training they differ from the online encoders)."""
    randomize(module, seed)
    if isinstance(module, TorchSLAVC):
        for i, part in enumerate(module.PARTS):
            randomize(getattr(module, f"momentum_{part}"), seed + 100 + i)
    for m in module.modules():  # SSL-TIE's one-channel norm3 too
        assert not isinstance(m, nn.BatchNorm2d) or not torch.all(m.running_var == 1)
    return module.eval()


def adam_state(module):
    return torch.optim.Adam(module.parameters(), lr=1e-4).state_dict()


# How each training (or, for LVS, test) script saves or reads its file.
SAVES = {
    # LVS test.py reads checkpoint['model_state_dict'] into nn.DataParallel(AVENet).
    "lvs": lambda m: {"model_state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}},
    # SLAVC / FNAC train.py: DistributedDataParallel's state dict under 'model'.
    "slavc": lambda m: {"model": {f"module.{k}": v for k, v in m.state_dict().items()},
                        "optimizer": adam_state(m), "epoch": 20, "best_cIoU": 0.4,
                        "best_Auc": 0.4},
    "ezvsl": lambda m: {"model": {f"module.{k}": v for k, v in m.state_dict().items()},
                        "optimizer": adam_state(m), "epoch": 20, "best_cIoU": 0.4,
                        "best_Auc": 0.4},
    # SSL-TIE main.py: model_without_dp.state_dict() under 'state_dict' (.pth.tar).
    "ssltie": lambda m: {"epoch": 7, "state_dict": m.state_dict(), "best_miou": 0.4,
                         "optimizer": adam_state(m), "iteration": 100},
}
MODULES = {"ezvsl": lambda: TorchFNAC(WIDTH, DIM), "lvs": lambda: TorchLVS(WIDTH),
           "slavc": lambda: TorchSLAVC(WIDTH, DIM), "ssltie": lambda: TorchSSLTIE(WIDTH)}
NAMES = {"ezvsl": "fnac_vggsound144k.pth", "lvs": "lvs_vggss.pth", "slavc": "slavc_latest.pth",
         "ssltie": "vggsound144k.pth.tar"}
# Each repository's test script: the upsampling of its map (sslocal's eval.upsample).
UPSAMPLE = {"ezvsl": "bilinear_align_corners", "lvs": "bilinear", "slavc": "bicubic_align_corners",
            "ssltie": "bilinear"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{format: (torch module, file)} saved as the repositories save them."""
    root = tmp_path_factory.mktemp("released")
    out = {}
    for i, (name, make) in enumerate(MODULES.items()):
        module = random_model(make(), seed=10 + i)
        torch.save(SAVES[name](module), root / NAMES[name])
        out[name] = (module.double(), root / NAMES[name])  # the reference runs in float64
    return out


@pytest.fixture(scope="module")
def inputs():
    """N uint8 224 px frames and float16 log spectrograms, as sslocal's loaders batch them,
    and the float64 torch tensors the repositories' forwards take from them."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (N, 224, 224, 3), dtype=np.uint8)
    specs = rng.normal(-4.0, 3.0, (N, 257, 200, 1)).astype(np.float16)
    image = (frames / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    return {"frames": frames, "specs": specs,
            "image": torch.from_numpy(image).permute(0, 3, 1, 2),
            "audio": torch.from_numpy(specs.astype(np.float64) / 12.0).permute(0, 3, 1, 2)}


@pytest.fixture(scope="module")
def evaluators():
    """One evaluator per upsampling (one compile per architecture and upsampling)."""
    cache = {}

    def get(upsample):
        if upsample not in cache:
            config = tiny.get_config()
            config.eval.upsample = upsample
            cache[upsample] = Evaluator(config, sharding.make_mesh(1), ogl=False, batch_size=N)
        return cache[upsample]
    return get


def torch_maps(name, module, inputs, momentum=False):
    """(the map the repository's test script thresholds, its un-normalised upsampled map on
    sslocal's "raw" scale (cosines)), float64 (N, 224, 224)."""
    with torch.no_grad():
        if name in ("lvs", "ssltie"):
            # test.py: cv2.resize(A, (224, 224), INTER_LINEAR) (half-pixel centres, as
            # F.interpolate(align_corners=False) when upsampling), then
            # pred = 1 - normalize_img(-heatmap).
            heat = F.interpolate(module(inputs["image"], inputs["audio"]), size=(224, 224),
                                 mode="bilinear", align_corners=False)[:, 0].numpy()
            return np.stack([1 - normalize_img(-h) for h in heat]), heat
        if name == "slavc":
            # test.py: bicubic, align_corners=True; scores_av = (x - (-1/tau)) / (2/tau);
            # --relative_prediction: normalize_img(scores_av).
            savl = module(inputs["image"], inputs["audio"], use_mom_eval=momentum)
            heat = F.interpolate(savl.unsqueeze(1), size=(224, 224), mode="bicubic",
                                 align_corners=True)[:, 0].numpy()
            scores = (heat + 1 / TAU) / (2 / TAU)
            return np.stack([normalize_img(s) for s in scores]), 2 * scores - 1
        # FNAC test.py validate: bilinear, align_corners=True; normalize_img.
        savl = module(inputs["image"], inputs["audio"])
        heat = F.interpolate(savl.unsqueeze(1), size=(224, 224), mode="bilinear",
                             align_corners=True)[:, 0].numpy()
        return np.stack([normalize_img(h) for h in heat]), heat * TAU


def assert_maps_equal(got, want, what):
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    print(f"{what}: max abs difference {err:.2e}")
    assert got.shape == want.shape == (N, 224, 224)
    assert err < TOL, what


# ---------------------------------------------------------------- parity at 224 px


EXPECTED = {  # the model.json fields each conversion must write (beyond dtype, audio_pool)
    "ezvsl": {"width": WIDTH, "embed_dim": DIM, "image_stride": 32, "audio_stride": 32,
              "projection": True, "heads": 1},
    "lvs": {"width": WIDTH, "embed_dim": 8 * WIDTH, "image_stride": 16, "audio_stride": 16,
            "projection": False, "heads": 1},
    "slavc": {"width": WIDTH, "embed_dim": DIM, "image_stride": 32, "audio_stride": 32,
              "projection": True, "heads": 2},
    "ssltie": {"width": WIDTH, "embed_dim": 8 * WIDTH, "image_stride": 16, "audio_stride": 16,
               "projection": False, "heads": 1},
}


@pytest.mark.parametrize("name", ["ezvsl", "lvs", "slavc", "ssltie"])
def test_converted_model_gives_the_repositorys_map(name, files, inputs, evaluators, tmp_path):
    module, path = files[name]
    out = factory.convert_checkpoint(path, tmp_path / "model", format="auto")
    described = json.loads((out / "model.json").read_text())
    assert described["format"] == name  # auto recognised it
    assert {k: described[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert described["image_size"] == 224 and described["converted_from"] == str(path)
    assert described.get("momentum") is (False if name == "slavc" else None)

    model = load.load_model(out)  # an ordinary model directory from here on
    evaluator = evaluators(UPSAMPLE[name])
    got = evaluator.maps(model, inputs["frames"], inputs["specs"])
    want_av, want_raw = torch_maps(name, module, inputs)
    assert_maps_equal(got["av"], want_av, f"{name} map")
    assert_maps_equal(got["raw"], want_raw, f"{name} raw map")
    side = 14 if name in ("lvs", "ssltie") else 7  # the map before upsampling, at 224 px
    assert _map_side(model) == side
    variant = evaluator.variant(model)
    assert variant["model_format"] == name and variant["upsample"] == UPSAMPLE[name]
    assert variant["map_rule"] == ("mean_of_heads" if name == "slavc" else "cosine")


def _map_side(model):
    """The side of the image map V at 224 px (eval_shape: nothing runs)."""
    from flax import nnx

    def image_map(params, batch_stats, x):
        return nnx.merge(model.graphdef, params, batch_stats).encode_image(x)

    shape = jax.eval_shape(image_map, model.params, model.batch_stats,
                           jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)).shape
    assert shape[1] == shape[2]
    return shape[1]


def test_slavc_momentum_encoders_are_a_choice_recorded(files, inputs, evaluators, tmp_path):
    """The online encoders (SLAVC's test.py default) unless --momentum (its --use_mom_eval);
    both maps are reproduced, they differ, and model.json and the description say which."""
    module, path = files["slavc"]
    evaluator = evaluators(UPSAMPLE["slavc"])
    online = load.load_model(path)
    momentum = load.load_model(factory.convert_checkpoint(path, tmp_path / "m", momentum=True))
    assert json.loads((tmp_path / "m" / "model.json").read_text())["momentum"] is True
    assert "SLAVC format, online encoders, converted in memory" in online.description
    assert "SLAVC format, momentum encoders, converted from" in momentum.description
    got_online = evaluator.maps(online, inputs["frames"], inputs["specs"])["av"]
    got_momentum = evaluator.maps(momentum, inputs["frames"], inputs["specs"])["av"]
    assert_maps_equal(got_momentum, torch_maps("slavc", module, inputs, momentum=True)[0],
                      "slavc momentum map")
    assert_maps_equal(got_online, torch_maps("slavc", module, inputs)[0], "slavc online map")
    assert np.abs(got_online - got_momentum).max() > 0.05
    assert evaluator.num_traces == 1  # one compile for the format, whichever copy


# ---------------------------------------------------------------- recognition and mismatches


def test_auto_recognises_every_format(files, tmp_path):
    for name, (_, path) in files.items():
        kind, state_dict = convert.read_checkpoint(path)
        assert kind == name, path
        assert not any(k.startswith("module.") for k in state_dict)
    tv = tmp_path / "resnet18.pth"
    torch.save(TorchResNet18(3, WIDTH).state_dict(), tv)
    assert convert.read_checkpoint(tv)[0] == "torchvision"


@pytest.mark.parametrize("name", ["ezvsl", "lvs", "slavc", "ssltie"])
def test_a_file_forced_into_another_format_is_refused(name, files):
    """Every other format refuses the file with one line naming missing and unexpected keys
    and the format its keys are those of."""
    path = files[name][1]
    for other in convert.FORMATS:
        if other == name:
            continue
        with pytest.raises(load.ModelMismatchError) as info:
            load.load_model(path, format=other)
        message = str(info.value)
        title = convert.FORMATS[other].title
        assert "\n" not in message
        assert message.startswith(f"{path} ({title} format")
        assert f"does not fit the {title} layout (" in message
        assert "missing keys: " in message or "unexpected keys: " in message, message
        assert message.endswith(f"; its keys are those of the {name} format (--format auto)")


def test_forced_format_through_the_cli_is_one_line(files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SSLOCAL_DEBUG")}
    proc = subprocess.run(
        [sys.executable, "-m", "sslocal", "convert", str(files["slavc"][1]), str(tmp_path / "o"),
         "--format", "lvs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"sslocal convert: error: {files['slavc'][1]} (LVS format, ")
    assert "missing keys: audnet.conv1_a.weight" in errors[0]
    assert "unexpected keys: aud_proj1.bias" in errors[0]
    assert errors[0].endswith("its keys are those of the slavc format (--format auto)")
    assert not (tmp_path / "o").exists()


def test_keys_that_load_with_a_map_that_would_differ_are_refused(files, tmp_path):
    """A part the format's forward does not have (here a projection in an LVS-layout file, as
    a model trained with one would hold) would change the map if it were dropped: refused by
    name, as is a missing BatchNorm statistic, a format's unused part, or a momentum copy asked
    of a format without one. Nothing is loaded with strict=False."""
    module, path = files["lvs"]
    state = {f"module.{k}": v for k, v in module.state_dict().items()}
    cases = {
        "projection.pth": ({**state, "module.img_proj.weight": torch.zeros(64, 64, 1, 1),
                            "module.img_proj.bias": torch.zeros(64)},
                           "unexpected keys: img_proj.bias, img_proj.weight"),
        "no_stats.pth": ({k: v for k, v in state.items() if "imgnet.layer2.0.bn1.running" not in k},
                         "missing keys: imgnet.layer2.0.bn1.running_mean, "),
        "no_stem.pth": ({k: v for k, v in state.items() if "audnet.conv1_flow" not in k},
                        "missing keys: audnet.conv1_flow.weight"),
    }
    for file_name, (content, text) in cases.items():
        torch.save({"model_state_dict": content}, tmp_path / file_name)
        with pytest.raises(load.ModelMismatchError, match="^.* does not fit the LVS layout") \
                as info:
            load.load_model(tmp_path / file_name)
        assert text in str(info.value), file_name
    with pytest.raises(ValueError, match="the lvs format has no momentum encoders"):
        load.load_model(path, momentum=True)
    with pytest.raises(ValueError, match="unknown format 'ezvls'; choose one of auto, ezvsl"):
        load.load_model(path, format="ezvls")
    with pytest.raises(ValueError, match="is a directory: format and momentum apply to PyTorch"):
        load.load_model(tmp_path, momentum=True)


def test_wrappers_and_unknown_layouts_are_named(files, tmp_path):
    module, _ = files["ssltie"]
    torch.save({"net": module.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match=r"a checkpoint wrapper sslocal does not know: entries "
                       r"net \(OrderedDict\), epoch \(int\) are not tensors"):
        load.load_model(tmp_path / "wrapped.pth")
    state = {k.replace("imgnet.", "visual.").replace("audnet.", "audio."): v
             for k, v in module.state_dict().items()}
    torch.save({"state_dict": {k: v for k, v in state.items()
                               if not k.startswith(("vision_fc1", "conv3", "norm3"))}},
               tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"not a layout sslocal knows .*: keys that fit none of "
                       r"them: visual\.conv1_a\.weight, visual\.conv1\.weight, "):
        load.load_model(tmp_path / "renamed.pth")
