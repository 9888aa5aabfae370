"""The results of trained detectors: what their work_dirs say, statistics over seeds, and the
tables that report them (tools/analysis_tools/collect_results.py, learning_curves.py,
erf_seeds.py and tools/run_study.py are the command lines).

- :mod:`~dk_mmdet.results.work_dirs`: reading mmengine work_dirs, plain and ``seed<k>/``;
- :mod:`~dk_mmdet.results.complexity`: parameters and MACs, DK and DCN layers included;
- :mod:`~dk_mmdet.results.deformation_bins`: the AP per bin of deformation;
- :mod:`~dk_mmdet.results.seed_statistics`: mean ± sd, t intervals, paired differences;
- :mod:`~dk_mmdet.results.study`: a seeded study's values per run and its rows per model;
- :mod:`~dk_mmdet.results.tables`: the cells of every table, the table of single runs;
- :mod:`~dk_mmdet.results.study_tables`: a study's Markdown, summary CSV and per-run CSV;
- :mod:`~dk_mmdet.results.shapes_study`: the shapes study's model names and compact tables;
- :mod:`~dk_mmdet.results.learning_curves`: val AP during training and the plateau verdict;
- :mod:`~dk_mmdet.results.erf_slopes`: the ERF-scale slope per seed and over seeds.
"""
