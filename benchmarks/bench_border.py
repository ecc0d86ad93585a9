"""Border effect of Lite0 head_relu (ImageNet weights) and VGG16 features[29] (random, seed 0)
on real packaged H&E: 512 px tiles with 256 px of context, 4 windows of 1024 px per image."""

import sys
import time

import numpy as np
import torch
import torchvision
from PIL import Image

from captum_nmf.data import path as data_path
from captum_nmf.wsi import border_effect
from captum_nmf.zoo import efficientnet_lite0, normalize

torch.set_num_threads(2)
windows = []
for name in ("hgsc_nest.jpg", "hgsc_stromal_he.jpg"):
    arr = np.asarray(Image.open(data_path(name)).convert("RGB"), dtype=np.float32) / 255
    image = torch.from_numpy(arr).permute(2, 0, 1)
    for y, x in ((0, 0), (0, 476), (476, 0), (476, 476)):
        windows.append(image[:, y : y + 1024, x : x + 1024])
images = torch.stack(windows)
which = sys.argv[1:] or ["lite0", "vgg16"]
if "lite0" in which:
    t = time.time()
    lite0 = efficientnet_lite0()
    effect = border_effect(
        lite0, images, tile_size=512, layer=lite0.head_relu, transform=normalize, batch_size=2
    )
    print(f"Lite0 head_relu ({time.time() - t:.0f} s)")
    print(effect.to_markdown())
    for tol in (0.05, 0.10, 0.25):
        try:
            print(f"suggest_border({tol}) =", effect.suggest_border(tol))
        except ValueError as exc:
            print(f"suggest_border({tol}):", exc)
if "vgg16" in which:
    t = time.time()
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval()
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    effect = border_effect(
        vgg.features,
        images,
        tile_size=512,
        layer=vgg.features[29],
        transform=lambda x: (x - mean) / std,
        batch_size=1,
        max_depth=15,
    )
    print(f"VGG16 features[29], random weights seed 0 ({time.time() - t:.0f} s)")
    print(effect.to_markdown())
    for tol in (0.05, 0.10, 0.25):
        try:
            print(f"suggest_border({tol}) =", effect.suggest_border(tol))
        except ValueError as exc:
            print(f"suggest_border({tol}):", exc)
