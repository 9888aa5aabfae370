"""Fixtures shared by test files. Imports stay inside the fixtures: `make cuda-check` runs a
test of this directory in a venv without mmengine or mmdet."""
import pytest


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """(data root, class names) of a 4-train, 2-val image shapes dataset."""
    from mmdet_fixtures import make_shapes_dataset
    root = str(tmp_path_factory.mktemp('shapes'))
    return root, make_shapes_dataset(root)
