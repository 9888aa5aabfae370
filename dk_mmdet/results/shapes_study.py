"""How the shapes study (tools/run_study.py) names its models, and the compact tables of
docs/shapes.md that it writes from each protocol's summary CSV.

A model is a configs/shapes config, ``<detector>_<variant>_shapes``: the detector
(``faster-rcnn``, ``mask-rcnn``) and the conv variant of stages c3-c5 (``r50_fpn``: rigid,
``r50-dk-c3-c5_fpn``: local DK, ...). The tables call a variant by its label (``DK``).
"""
import csv
import os.path as osp
from collections import defaultdict
from typing import Dict, List

from dk_mmdet.results.seed_statistics import mean_and_sd
from dk_mmdet.results.tables import difference_text, markdown_table

RIGID = 'r50_fpn'
VARIANT_LABELS = {RIGID: 'rigid', 'r50-dconv-c3-c5_fpn': 'DCN', 'r50-mdconv-c3-c5_fpn': 'DCNv2',
                  'r50-dk-c3-c5_fpn': 'DK', 'r50-dk-global-c3-c5_fpn': 'DK-global',
                  'r50-dk-dconv-c3-c5_fpn': 'DK+DCN'}
PROTOCOLS = ('finetune', 'scratch')
OFFSET_RUN_FIELDS = ('model', 'seed', 'stage', 'kind', 'mean_move', 'images')
OFFSET_UNITS = {'kernel': 'kernel offsets (scope cells)', 'data': 'data offsets (pixels)'}
SUMMARY_HEADER = ('conv2 in c3-c5', 'seeds', 'val', 'Δ val [95% CI]', 'test_hard',
                  'Δ test_hard [95% CI]')


def shapes_config_name(detector: str, variant: str) -> str:
    """'faster-rcnn_r50-dk-c3-c5_fpn_shapes' for ('faster-rcnn', 'r50-dk-c3-c5_fpn')."""
    return f'{detector}_{variant}_shapes'


def variant_label(config_name: str) -> str:
    """'DK' for faster-rcnn_r50-dk-c3-c5_fpn_shapes."""
    _, variant = config_name[:-len('_shapes')].split('_', 1)
    return VARIANT_LABELS[variant]


def summary_tables(root: str) -> str:
    """The compact tables of docs/shapes.md, from each protocol's ``ROOT/<protocol>/results.csv``
    (:func:`dk_mmdet.results.study_tables.write_summary_csv`): per detector and task, each
    variant's AP on val and test_hard (mean ± sd over seeds) and its difference to rigid, paired
    by seed, with the 95% t-interval (bold where it excludes 0)."""
    lines = []
    for protocol in PROTOCOLS:
        path = osp.join(root, protocol, 'results.csv')
        if not osp.exists(path):  # a study without this protocol
            continue
        with open(path) as f:
            rows = [row for row in csv.DictReader(f) if row['metric'] == 'AP' and not row['bin']]
        for detector, task in (('faster-rcnn', 'bbox'), ('mask-rcnn', 'bbox'),
                               ('mask-rcnn', 'segm')):
            cells = {(row['model'], row['split']): row for row in rows
                     if row['task'] == task and row['model'].startswith(detector)}
            models = list(dict.fromkeys(model for model, _ in cells))
            if not models:
                continue
            body = []
            for model in models:
                row = [variant_label(model), cells[(model, 'val')]['seeds']]
                for split in ('val', 'test_hard'):
                    cell = cells[(model, split)]
                    row.append(f"{cell['mean']} ± {cell['sd']}" if cell['sd'] else cell['mean'])
                    row.append(summary_difference_cell(cell))
                body.append(row)
            lines += [f'{protocol}, {detector}, {task} AP:', '',
                      *markdown_table(SUMMARY_HEADER, body)]
    return '\n'.join(lines)


def summary_difference_cell(cell: Dict[str, str]) -> str:
    """'+0.5 [-0.7, +1.7]' from a summary CSV line; in bold when the interval excludes 0."""
    if not cell['difference']:
        return ''
    low, high = (float(cell[key]) if cell[key] else None for key in ('ci95_low', 'ci95_high'))
    text = difference_text(float(cell['difference']), low, high)
    return f'**{text}**' if low is not None and (low > 0 or high < 0) else text


def offset_table(rows: List[Dict[str, str]]) -> str:
    """Mean ± sd over seeds of each variant's mean tap move per stage and kind, from rows of
    tools/analysis_tools/offset_magnitudes.py with a ``seed`` added."""
    moves = defaultdict(list)
    for row in rows:
        moves[variant_label(row['model']), row['kind'], row['stage']].append(
            float(row['mean_move']))
    stages = sorted({stage for _, _, stage in moves})
    body = []
    for label, kind in dict.fromkeys((label, kind) for label, kind, _ in moves):
        spreads = [mean_and_sd(moves[label, kind, stage]) if (label, kind, stage) in moves
                   else None for stage in stages]
        cells = ['' if spread is None else f'{spread.mean:.3f}' if spread.sd is None else
                 f'{spread.mean:.3f} ± {spread.sd:.3f}' for spread in spreads]
        seeds = max(spread.count for spread in spreads if spread is not None)
        body.append([label, OFFSET_UNITS[kind], str(seeds), *cells])
    return '\n'.join(markdown_table(('variant', 'offsets', 'seeds', *stages), body))
