"""Fixtures and options shared by test files. Imports stay inside the functions: `make cuda-check`
runs a test of this directory in a venv without mmengine or mmdet.

Two switches vary what a verdict could silently depend on (docs/development.md):
``--seed N`` (or ``DK_TEST_SEED``) seeds Python's, numpy's and torch's generators before each
test (default 0), and ``--threads N`` (or ``DK_TEST_THREADS``) sets torch's intra-op threads
and ``OMP_NUM_THREADS`` for the tools the tests start.
"""
import os

import pytest


def pytest_addoption(parser):
    parser.addoption('--seed', type=int, default=int(os.environ.get('DK_TEST_SEED', '0')),
                     help='seed of the random generators before each test (default 0)')
    parser.addoption('--threads', type=int, default=int(os.environ.get('DK_TEST_THREADS', '0')),
                     help="torch's intra-op threads, also for the tools' subprocesses "
                     '(default: leave them as they are)')


def pytest_configure(config):
    threads = config.getoption('threads')
    if threads < 0:
        raise pytest.UsageError(f'--threads must be 0 (unchanged) or more, got {threads}')
    if threads:
        import torch
        torch.set_num_threads(threads)
        os.environ['OMP_NUM_THREADS'] = str(threads)


def pytest_report_header(config):
    threads = config.getoption('threads')
    return f"dk tests: --seed {config.getoption('seed')}, --threads {threads or 'unchanged'}"


@pytest.fixture(autouse=True)
def seeded_generators(request):
    import random

    import numpy as np
    import torch
    seed = request.config.getoption('seed')
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """(data root, class names) of a 4-train, 2-val image shapes dataset."""
    from mmdet_fixtures import make_shapes_dataset
    root = str(tmp_path_factory.mktemp('shapes'))
    return root, make_shapes_dataset(root)
