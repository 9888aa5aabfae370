"""The scripts under tools/ as modules, for the tests that call their functions (tools/ is not
an installed package)."""
import importlib.util
import os.path as osp
import sys

TOOLS_DIR = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools')


def load_tool(relative_path):
    """tools/``relative_path`` as a module named after its file, loaded once.

    The script's directory goes on ``sys.path``, last so that it shadows nothing, as the
    directory of a script run from there does: the tools it imports by name (the analysis tools
    import each other) are then the modules loaded here, one copy each, with one set of
    classes. A module of that name from another file raises rather than stand in for it."""
    path = osp.join(TOOLS_DIR, relative_path)
    name = osp.splitext(osp.basename(path))[0]
    loaded = sys.modules.get(name)
    if loaded is not None:
        loaded_path = getattr(loaded, '__file__', None)
        if loaded_path is None or osp.realpath(loaded_path) != osp.realpath(path):
            raise ImportError(f'cannot load tools/{relative_path} as {name!r}: another module of '
                              f'that name is imported already ({loaded_path or loaded!r})')
        return loaded
    if osp.dirname(path) not in sys.path:
        sys.path.append(osp.dirname(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
