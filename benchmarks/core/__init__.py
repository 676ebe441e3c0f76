"""The benchmark core: everything the benchmark scripts share.

Imports flow one way: the scripts (``benchmarks/run.py``, ``tune.py``, ``loss_speed.py``,
``scale_checks.py``, ``distributed_scaling.py``, ``selection_speed.py``, ``build_dataset.py``)
import this package, which imports the library (``pml_proxygml``) and never a script.

* :mod:`.recipes`: recipes as JSON data (``benchmarks/recipes/*.json``), ``--set`` overrides
  and tuning sections;
* :mod:`.registry`: one name per loss, shared by every script;
* :mod:`.models`: backbones, pooling trunk and embedding head;
* :mod:`.transforms` and :mod:`.datasets`: one random resized crop, one class split, the emoji,
  folder and paper datasets;
* :mod:`.harness`: one call trains a whole run (schedule, evaluation epochs, frozen-trunk
  epochs, crash-safe checkpoints and resume);
* :mod:`.measure`: one timing and peak-memory helper;
* :mod:`.report`: the results-folder convention, environment capture and atomic writers;
* :mod:`.summary`: summaries, tables and plots of finished runs;
* :mod:`.cli`: the command-line flags every script shares.
"""
