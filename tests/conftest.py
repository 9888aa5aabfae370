"""Fixtures shared by the test files that train tiny detectors."""
import pytest

from mmdet_fixtures import make_shapes_dataset


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """(data root, class names) of a 4-train, 2-val image shapes dataset."""
    root = str(tmp_path_factory.mktemp('shapes'))
    return root, make_shapes_dataset(root)
