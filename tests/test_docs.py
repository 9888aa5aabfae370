"""Every file, command and link that the README and docs/ quote exists.

Read from README.md, docs/*.md and configs/*/README.md:

- Markdown links and images ``[text](target)`` with a relative target must name an existing
  file or folder, relative to the document; a ``#anchor`` must be a heading of the Markdown file
  it points into (GitHub's heading ids).
- In code (inline spans and fenced blocks), every path that starts with one of the repository's
  folders (``tools/train.py``, ``configs/dk/...py``, ``bash tools/gpu_check.sh``) must exist, and
  every ``make TARGET`` must be a rule of the Makefile.

A path component that is a placeholder (a word of PLACEHOLDERS, a shell variable ``$CONFIG``,
``<config name>``) makes the path stand for many files: the folders before it must exist. A
``*`` must match a file, and ``{a,b}`` must exist for each alternative. Words outside the
repository's folders (``CKPT``, ``WORK_DIR/iter_N.pth``, ``work_dirs/``, ``data/``, URLs) are
not paths of this repository and are not checked.
"""
import glob
import os.path as osp
import re
from typing import List, NamedTuple, Tuple

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# The repository's own folders: a quoted path that starts with one of them must exist.
REPO_FOLDERS = ('.ci', 'configs', 'dk_mmdet', 'dk_ops', 'docs', 'tests', 'tools')
# Words the documents use in place of a file the reader chooses.
PLACEHOLDERS = {'CONFIG', 'CKPT', 'CHECKPOINT', 'WORK_DIR', 'DIR', 'IMAGE_OR_DIR', 'FILE',
                'LOG_DIR'}

FENCE = re.compile(r'^ {0,3}(```|~~~)')
CODE_SPAN = re.compile(r'(`+)(.+?)\1', re.S)
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
HEADING = re.compile(r'^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$')
URL_SCHEME = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*:')
REPO_PATH = re.compile(
    r'(?<![\w./$~-])(?:%s)/(?:[\w.*$<>@+-]|/|\{[^{}\s]*\})*'
    % '|'.join(re.escape(folder) for folder in REPO_FOLDERS))
# `make TARGET`, after any VAR=value overrides and options; the target is the first plain word.
MAKE_COMMAND = re.compile(
    r'(?<![\w./-])make(?:[ \t]+[A-Z_]+=\S*|[ \t]+-\S+)*[ \t]+([a-z][\w.-]*)\b')


class Reference(NamedTuple):
    """One thing a document quotes: ``kind`` is 'link', 'path' or 'make'."""
    document: str  # relative to the repository
    line: int
    kind: str
    text: str


class Document(NamedTuple):
    path: str  # relative to the repository
    prose: str  # the text with its code blanked out (same offsets)
    code: List[tuple]  # (offset, code text): fenced blocks and inline spans


def blank(text: str) -> str:
    """``text`` with everything but its line breaks turned into spaces (offsets kept)."""
    return re.sub(r'[^\n]', ' ', text)


def split_fences(text: str) -> Tuple[str, List[tuple]]:
    """The prose of ``text``, its fenced code blocks blanked, and the (offset, line) of each
    line of code in them."""
    prose_lines, code = [], []
    offset, fence = 0, None
    for line in text.splitlines(keepends=True):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is not None:
            code.append((offset, line))
        prose_lines.append(line if fence is None and not opening else blank(line))
        offset += len(line)
    return ''.join(prose_lines), code


def read_document(path: str, text: str) -> Document:
    """Splits ``text`` into prose and code, keeping offsets so that lines can be reported."""
    prose, code = split_fences(text)
    code += [(span.start(2), span.group(2)) for span in CODE_SPAN.finditer(prose)]
    # Blank the spans too: `[x](y)` inside code is not a link.
    prose = CODE_SPAN.sub(lambda span: blank(span.group(0)), prose)
    return Document(path, prose, code)


def references(document: Document) -> List[Reference]:
    def line_of(offset):
        return document.prose.count('\n', 0, offset) + 1

    found = [Reference(document.path, line_of(link.start()), 'link', link.group(1))
             for link in LINK.finditer(document.prose)
             if not URL_SCHEME.match(link.group(1))]
    for offset, code in document.code:
        for path in REPO_PATH.finditer(code):
            found.append(Reference(document.path, line_of(offset + path.start()), 'path',
                                   path.group(0).rstrip('.')))
        for make in MAKE_COMMAND.finditer(code):
            found.append(Reference(document.path, line_of(offset + make.start()), 'make',
                                   make.group(1)))
    return found


def heading_anchors(markdown: str) -> set:
    """The ids GitHub gives the headings of a Markdown text."""
    anchors, seen = set(), {}
    for line in split_fences(markdown)[0].splitlines():
        heading = HEADING.match(line)
        if not heading:
            continue
        title = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading.group(1))
        slug = re.sub(r'[^\w\- ]', '', title.lower()).replace(' ', '-')
        anchors.add(f'{slug}-{seen[slug]}' if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def expand_braces(path: str) -> List[str]:
    brace = re.search(r'\{([^{}]*)\}', path)
    if not brace:
        return [path]
    return [expanded for choice in brace.group(1).split(',')
            for expanded in expand_braces(path[:brace.start()] + choice + path[brace.end():])]


def is_placeholder(component: str) -> bool:
    stem = component.split('.')[0]
    return '$' in component or '<' in component or stem in PLACEHOLDERS


def path_problem(path: str, root: str) -> str:
    """Why ``path`` (relative to ``root``) does not exist; '' when it does."""
    for expanded in expand_braces(path):
        components = expanded.rstrip('/').split('/')
        fixed = []
        for component in components:
            if is_placeholder(component):
                break
            fixed.append(component)
        target = osp.join(root, *fixed)
        if len(fixed) < len(components):
            if not osp.isdir(target):
                return f'no folder {"/".join(fixed)}/ for {expanded}'
        elif '*' in expanded:
            if not glob.glob(target):
                return f'nothing matches {expanded}'
        elif expanded.endswith('/') and not osp.isdir(target):
            return f'no folder {expanded}'
        elif not osp.exists(target):
            return f'no file {expanded}'
    return ''


def makefile_targets(makefile: str) -> set:
    targets = set()
    for line in makefile.splitlines():
        rule = re.match(r'^([\w.][\w. -]*?)\s*::?(?![=])', line)
        if rule:
            targets.update(rule.group(1).split())
    return targets


def problem(reference: Reference, root: str, targets: set) -> str:
    """What is wrong with one reference ('' when nothing is)."""
    if reference.kind == 'make':
        return '' if reference.text in targets else f'no Makefile rule {reference.text!r}'
    if reference.kind == 'path':
        return path_problem(reference.text, root)
    target, _, anchor = reference.text.partition('#')
    document_dir = osp.dirname(osp.join(root, reference.document))
    file = osp.normpath(osp.join(document_dir, target)) if target else \
        osp.join(root, reference.document)
    if not osp.exists(file):
        return f'link to a missing {target}'
    if anchor and file.endswith('.md'):
        with open(file, encoding='utf-8') as markdown:
            if anchor not in heading_anchors(markdown.read()):
                return f'no heading #{anchor} in {osp.relpath(file, root)}'
    return ''


def documents() -> List[str]:
    return ['README.md'] + sorted(glob.glob('docs/*.md', root_dir=REPO_ROOT)) + \
        sorted(glob.glob('configs/*/README.md', root_dir=REPO_ROOT))


def all_references() -> List[Reference]:
    found = []
    for path in documents():
        with open(osp.join(REPO_ROOT, path), encoding='utf-8') as text:
            found += references(read_document(path, text.read()))
    return found


def report(wrong) -> str:
    return '\n'.join(f'{ref.document}:{ref.line}: {ref.text}: {why}' for ref, why in wrong)


def test_quoted_paths_commands_and_links_exist():
    with open(osp.join(REPO_ROOT, 'Makefile'), encoding='utf-8') as makefile:
        targets = makefile_targets(makefile.read())
    found = all_references()
    wrong = [(ref, why) for ref in found if (why := problem(ref, REPO_ROOT, targets))]
    assert not wrong, 'the documents quote what does not exist:\n' + report(wrong)

    # Not a vacuous pass: the documents quote many paths, links and make targets, and the
    # documents the README leads to are among them.
    kinds = {kind: {ref.text for ref in found if ref.kind == kind}
             for kind in ('path', 'link', 'make')}
    assert len(kinds['path']) > 30, kinds['path']
    assert len(kinds['link']) > 20, kinds['link']
    assert {'test', 'demo', 'compare', 'cuda-check'} <= kinds['make'], kinds['make']
    readme_links = {ref.text.partition('#')[0] for ref in found
                    if ref.document == 'README.md' and ref.kind == 'link'}
    assert {'docs/operator.md', 'docs/speed.md', 'docs/shapes.md', 'docs/statistics.md',
            'docs/analysis.md', 'docs/mmdetection.md', 'docs/deployment.md',
            'docs/gpu.md'} <= readme_links


def test_the_check_reports_what_is_wrong(tmp_path):
    # A small repository in tmp_path, and a document that quotes right and wrong things.
    (tmp_path / 'tools').mkdir()
    (tmp_path / 'tools' / 'train.py').write_text('')
    (tmp_path / 'configs' / 'dk').mkdir(parents=True)
    (tmp_path / 'configs' / 'dk' / 'a_coco.py').write_text('')
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'other.md').write_text('# Other page\n\n## Install on a cluster\n')
    text = '\n'.join([
        '# Title',
        'Run `python tools/train.py configs/dk/a_coco.py CKPT` or `tools/trian.py`.',
        '```bash',
        'make test',
        'make tset',
        'python tools/train.py configs/dk/CONFIG.py WORK_DIR/iter_1.pth',
        'python tools/train.py configs/dkk/$CONFIG.py configs/dk/*_coco.py configs/dk/*_x.py',
        'ls tools/{train,test}.py  # [not](a-link.md)',
        '```',
        '[ok](docs/other.md#install-on-a-cluster), [page](docs/other.md#nowhere),',
        '[gone](docs/gone.md), [here](#title), [there](#not-here), [web](https://x.org/y.md).',
    ])
    (tmp_path / 'README.md').write_text(text)
    found = references(read_document('README.md', text))
    wrong = {(ref.kind, ref.text): why for ref in found
             if (why := problem(ref, str(tmp_path), {'test', 'build'}))}
    assert wrong == {
        ('path', 'tools/trian.py'): 'no file tools/trian.py',
        ('make', 'tset'): "no Makefile rule 'tset'",
        ('path', 'configs/dkk/$CONFIG.py'): 'no folder configs/dkk/ for configs/dkk/$CONFIG.py',
        ('path', 'configs/dk/*_x.py'): 'nothing matches configs/dk/*_x.py',
        ('path', 'tools/{train,test}.py'): 'no file tools/test.py',
        ('link', 'docs/other.md#nowhere'): 'no heading #nowhere in docs/other.md',
        ('link', 'docs/gone.md'): 'link to a missing docs/gone.md',
        ('link', '#not-here'): 'no heading #not-here in README.md',
    }
    # The right ones were read too, placeholders and all, and checked without complaint.
    assert {(ref.kind, ref.text) for ref in found} - set(wrong) == {
        ('path', 'tools/train.py'), ('path', 'configs/dk/a_coco.py'), ('make', 'test'),
        ('path', 'configs/dk/CONFIG.py'), ('path', 'configs/dk/*_coco.py'),
        ('link', 'docs/other.md#install-on-a-cluster'), ('link', '#title'),
    }


def test_heading_anchors_follow_github():
    markdown = '# A title\n## The comparison (`make compare`)\n```\n# not a heading\n```\n' \
               '## Initialisation: every variant\n## A title\n'
    assert heading_anchors(markdown) == {
        'a-title', 'the-comparison-make-compare', 'initialisation-every-variant', 'a-title-1'}
