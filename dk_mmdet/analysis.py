"""What the analysis tools (``tools/analysis_tools/erf.py`` and ``tsne.py``) share.

- :func:`load_detector`: a detector from a config and a checkpoint, on the CPU, in eval mode,
  with its parameters frozen (the tools differentiate with respect to the input only).
- :func:`read_annotated_images`: the ground-truth objects of some images, from a COCO file.
- :class:`ImageInput`: one image through the config's test pipeline, as float pixels that
  autograd can differentiate with respect to, and its boxes scaled to those pixels (the
  pipeline may resize and pad, nothing else).
- :func:`run_to_layer`: the model's data preprocessor and ``extract_feat`` on those pixels,
  returning what one named module received and returned.
- :func:`unit_index`: the feature-map unit nearest to a point of the input.

Coordinates: the test pipeline resizes the image (and the data preprocessor pads it); the
boxes, scaled by the pipeline's ``scale_factor``, and everything the tools compute live in the
resized, unpadded image ("input pixels"). Unit i of a feature map of stride s (the padded
input size over the map size) sits at input coordinate i*s: mmdet's anchors are centred there,
and so is the receptive field of a ResNet unit (every stride-2 conv centres output i on input
2i).
"""
import copy
import json
import math
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmcv.transforms import Compose
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import load_checkpoint
from torch import Tensor, nn

from dk_mmdet.config_loading import load_config

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
LOAD_ANNOTATIONS_TYPES = ('LoadAnnotations', 'mmdet.LoadAnnotations')


@dataclass(frozen=True)
class GroundTruthObject:
    ann_id: int
    category: str
    bbox: Tuple[float, float, float, float]  # x, y, width, height in original image pixels
    area: float  # the annotation's area (COCO's scale ranges use it), else the box's


@dataclass
class AnnotatedImage:
    path: str
    image_id: int
    objects: List[GroundTruthObject] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The file name, as the tools' tables and figures label the image."""
        return osp.basename(self.path)

    @property
    def stem(self) -> str:
        """The file name without its extension, for the files made from the image."""
        return osp.splitext(self.name)[0]


def load_detector(config: str, checkpoint: str, cfg_options: Optional[dict] = None) -> nn.Module:
    """The detector of ``config`` with the weights of ``checkpoint`` (every key must match)."""
    cfg = load_config(config, cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    # The checkpoint holds every weight: no ImageNet initialisation to fetch.
    if 'init_cfg' in cfg.model.get('backbone', {}):
        cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    model.cfg = cfg
    model.eval()
    model.requires_grad_(False)
    return model


def read_annotated_images(ann_file: str, images: Sequence[str]) -> List[AnnotatedImage]:
    """The images named by ``images`` (files, or folders whose files the COCO file lists) with
    their non-crowd objects from ``ann_file``, matched by file name."""
    with open(ann_file) as f:
        coco = json.load(f)
    by_name = {osp.basename(image['file_name']): image for image in coco['images']}
    categories = {category['id']: category['name'] for category in coco['categories']}
    paths = []
    for item in images:
        if osp.isdir(item):
            listed = sorted(name for name in os.listdir(item)
                            if name.lower().endswith(IMAGE_EXTENSIONS) and name in by_name)
            if not listed:
                raise ValueError(f'--images folder {item} holds no image listed in {ann_file}')
            paths += [osp.join(item, name) for name in listed]
        elif osp.isfile(item):
            if osp.basename(item) not in by_name:
                raise ValueError(f'--images file {item} is not listed in {ann_file}')
            paths.append(item)
        else:
            raise FileNotFoundError(f'--images: no such file or folder: {item}')
    annotated = {}
    for path in paths:
        image_id = by_name[osp.basename(path)]['id']
        annotated.setdefault(image_id, AnnotatedImage(path=path, image_id=image_id))
    for ann in coco['annotations']:
        image = annotated.get(ann['image_id'])
        if image is None or ann.get('iscrowd', 0):
            continue
        x, y, w, h = (float(v) for v in ann['bbox'])
        if w <= 0 or h <= 0:
            continue
        image.objects.append(GroundTruthObject(
            ann_id=ann['id'], category=categories[ann['category_id']], bbox=(x, y, w, h),
            area=float(ann.get('area', w * h))))
    return list(annotated.values())


class ImageInput:
    """Runs images through a model config's test pipeline, without its annotation loading."""

    def __init__(self, cfg):
        # mmdet's test pipelines load the boxes after resizing, i.e. unscaled, for evaluation;
        # the tools scale them with the pipeline's scale_factor instead.
        pipeline = [step for step in copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
                    if step['type'] not in LOAD_ANNOTATIONS_TYPES]
        self.pipeline = Compose(pipeline)

    def __call__(self, image: AnnotatedImage):
        """(pixels (3, H, W) float32 in the loader's channel order, data sample, boxes
        (x1, y1, x2, y2) of ``image.objects`` in input pixels)."""
        results = self.pipeline(dict(img_path=image.path, img_id=image.image_id))
        sample = results['data_samples']
        if 'scale_factor' not in sample:
            raise KeyError('the test pipeline must keep scale_factor in the meta_keys of '
                           'PackDetInputs: the tools scale the boxes with it')
        scale_x, scale_y = sample.scale_factor
        boxes = [(x * scale_x, y * scale_y, (x + w) * scale_x, (y + h) * scale_y)
                 for x, y, w, h in (obj.bbox for obj in image.objects)]
        return results['inputs'].float(), sample, boxes


def find_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        top = sorted({key.rsplit('.', 1)[0] for key in modules if key.count('.') == 1})
        raise KeyError(f'the model has no module {name!r}; modules are named like {top[:12]} '
                       '(e.g. backbone.layer3, neck.fpn_convs.1, backbone.layer4.2.conv2)')
    return modules[name]


@dataclass
class LayerCall:
    input: Tensor  # the first positional input of the module
    output: Tensor
    padded_input_size: Tuple[int, int]  # (H, W) of the batch the network ran on


def run_to_layer(model: nn.Module, layer_name: str, pixels: Tensor, sample) -> LayerCall:
    """Runs ``model``'s preprocessor and ``extract_feat`` on one image; what ``layer_name`` saw.

    Differentiable with respect to ``pixels`` (normalisation and padding included).
    """
    layer = find_module(model, layer_name)
    seen: Dict[str, Tensor] = {}

    def keep(module, args, output):
        if not isinstance(output, Tensor):
            raise TypeError(f'{layer_name} returns {type(output).__name__}, not a feature map; '
                            'name a module that returns one tensor')
        seen['input'], seen['output'] = args[0], output

    handle = layer.register_forward_hook(keep)
    try:
        data = model.data_preprocessor(dict(inputs=[pixels], data_samples=[sample]), False)
        model.extract_feat(data['inputs'])
    finally:
        handle.remove()
    if 'output' not in seen:
        raise ValueError(f'{layer_name} is not run by the backbone and neck (extract_feat)')
    return LayerCall(seen['input'], seen['output'], tuple(data['inputs'].shape[-2:]))


def unit_index(point_xy: Tuple[float, float], feature_size: Tuple[int, int],
               padded_input_size: Tuple[int, int]) -> Tuple[int, int]:
    """(row, column) of the unit nearest to the input point (x, y): unit i sits at i*stride."""
    index = []
    for coordinate, units, pixels in zip(point_xy[::-1], feature_size, padded_input_size):
        stride = pixels / units
        index.append(min(max(math.floor(coordinate / stride + 0.5), 0), units - 1))
    return tuple(index)


def box_centre(box_xyxy: Sequence[float]) -> Tuple[float, float]:
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return (x1 + x2) / 2, (y1 + y2) / 2


def config_stem(config: str) -> str:
    """A model's default name: its config file's name without the extension."""
    return osp.splitext(osp.basename(config))[0]


def pair_models(models: Sequence[str]) -> List[Tuple[str, str]]:
    """CONFIG CHECKPOINT [CONFIG CHECKPOINT ...] as (config, checkpoint) pairs."""
    if len(models) % 2:
        raise ValueError(f'expected CONFIG CHECKPOINT pairs, got {len(models)} paths: '
                         f'{list(models)}')
    return list(zip(models[::2], models[1::2]))


def parse_model_arguments(parser, args) -> None:
    """``args.models`` (CONFIG CHECKPOINT ...) as ``args.pairs``, and ``args.names`` (default:
    the config file names) checked to be one distinct name per model; ``parser.error`` if not.
    """
    try:
        args.pairs = pair_models(args.models)
    except ValueError as error:
        parser.error(str(error))
    args.names = args.names or [config_stem(config) for config, _ in args.pairs]
    if len(args.names) != len(args.pairs) or len(set(args.names)) != len(args.names):
        parser.error(f'--names needs one distinct name per model, got {args.names} for '
                     f'{len(args.pairs)} models')


def default_ann_file(cfg) -> str:
    """The annotation file of the config's test dataset."""
    dataset = cfg.test_dataloader.dataset
    return osp.join(dataset.get('data_root') or '', dataset.ann_file)


def to_display_rgb(pixels: Tensor) -> 'torch.Tensor':
    """(H, W, 3) uint8 RGB of pipeline pixels, which mmcv loads as BGR."""
    return pixels.detach()[[2, 1, 0]].permute(1, 2, 0).clamp(0, 255).to(torch.uint8)
