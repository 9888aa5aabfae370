"""Export a detector's backbone and neck, DK layers included, to ONNX.

    python tools/deployment/export_onnx.py CONFIG CHECKPOINT --out FILE [--shape H W]

The backbone and neck are the part of a detector that Deformable Kernels change; mmdet's heads
go through their usual deployment tools (MMDeploy). Every DK layer (``DK``, ``DKGlobal``,
``DKDCN``, ``DKDCNv2``) is written in standard ONNX operators (opset 18, no custom domain; see
``dk_ops/export.py``), so any ONNX runtime runs the file, without this project's extension.

The graph takes ``image``, the batch as the detector's data preprocessor hands it to the
backbone (normalised, padded), and returns the neck's feature maps ``feature0``,
``feature1``, ... (finest first). Batch, height and width are dynamic unless ``--static``;
``--shape`` is the size of the example input the export traces (default 800 1333), and the
tool prints which sizes the graph leaves open. ``--verify`` runs the file with onnxruntime
(CPU) on a random image of that size and prints the largest difference from PyTorch per
output, relative to the output's largest magnitude; it exits with status 1 above
``--tolerance``.

See docs/deployment.md.
"""
import argparse
import importlib.util
import os.path as osp
import sys
from typing import List, Tuple

if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from dk_mmdet.analysis import load_detector  # noqa: E402
from dk_ops.export import ONNX_OPSET, export_onnx  # noqa: E402


class BackboneAndNeck(nn.Module):
    """A detector's ``extract_feat``: the image batch to the neck's feature maps."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.backbone = detector.backbone
        self.neck = detector.neck if getattr(detector, 'with_neck', False) else None

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        features = self.backbone(image)
        return tuple(self.neck(features) if self.neck is not None else features)


def export_backbone_and_neck(detector: nn.Module, out: str, shape=(800, 1333),
                             dynamic: bool = True, opset_version: int = ONNX_OPSET):
    """Export ``detector``'s backbone and neck to ``out``.

    Returns the exported module, the example input and the ``torch.onnx.ONNXProgram``.
    """
    module = BackboneAndNeck(detector).eval()
    # Batch 2: torch.export treats sizes 0 and 1 as special and would fix a dynamic batch.
    image = torch.randn(2 if dynamic else 1, 3, *shape)
    dynamic_shapes = None
    if dynamic:
        # AUTO: torch.export finds which sizes may vary. It records its own conditions on
        # them (a stride-64 FPN level with more than one row, say), which the ONNX graph does
        # not check: onnxruntime runs it at any size (docs/deployment.md).
        dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
        dynamic_shapes = {'image': dims}
    with torch.no_grad():  # a small image is enough to count the outputs
        num_outputs = len(module(torch.zeros(1, 3, 256, 256)))
    program = export_onnx(module, (image, ), out, dynamic_shapes=dynamic_shapes,
                          input_names=['image'],
                          output_names=[f'feature{i}' for i in range(num_outputs)],
                          opset_version=opset_version)
    return module, image, program


def dynamic_input_sizes(program) -> List[str]:
    """The sizes of ``image`` that the ONNX graph leaves open (symbolic dimensions)."""
    shape = program.model.graph.inputs[0].shape
    return [name for name, size in zip(('batch', 'channels', 'height', 'width'), shape)
            if not isinstance(size, int)]


def relative_differences(module: nn.Module, onnx_file: str, image: Tensor) -> List[float]:
    """Per output: max |onnxruntime - PyTorch| / max |PyTorch| on ``image``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_file, providers=['CPUExecutionProvider'])
    onnx_outputs = session.run(None, {'image': image.numpy()})
    with torch.no_grad():
        expected = [output.numpy() for output in module(image)]
    return [float(np.abs(got - want).max() / np.abs(want).max())
            for got, want in zip(onnx_outputs, expected)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export the backbone and neck of a detector (DK layers included) to ONNX')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--shape', type=int, nargs=2, default=[800, 1333], metavar=('H', 'W'),
                        help='height and width of the example input (default 800 1333)')
    parser.add_argument('--static', action='store_true',
                        help='fix batch 1 and the --shape size instead of dynamic sizes')
    parser.add_argument('--opset', type=int, default=ONNX_OPSET,
                        help=f'ONNX opset (default {ONNX_OPSET}; another goes through the onnx '
                        'version converter, which fails on some operators)')
    parser.add_argument('--verify', action='store_true',
                        help='compare onnxruntime with PyTorch on a random input of --shape')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest relative difference --verify accepts (default 1e-4)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value in xxx=yyy format')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    detector = load_detector(args.config, args.checkpoint, args.cfg_options)
    module, image, program = export_backbone_and_neck(detector, args.out, tuple(args.shape),
                                                      dynamic=not args.static,
                                                      opset_version=args.opset)
    dynamic = dynamic_input_sizes(program)
    print(f'wrote {args.out}: opset {args.opset}, '
          f'{"dynamic " + ", ".join(dynamic) if dynamic else "static shapes"}')
    if not args.verify:
        return 0
    differences = relative_differences(module, args.out, image[:1])
    for index, difference in enumerate(differences):
        print(f'feature{index}: max |onnxruntime - PyTorch| / max |PyTorch| = {difference:.2e}')
    return 0 if max(differences) <= args.tolerance else 1


if __name__ == '__main__':
    sys.exit(main())
