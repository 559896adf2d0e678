"""cavmae: raw videos to WebDataset shards (`cavmae.preprocess`), the shard contract (`cavmae.shards`) and the
streaming CAV-MAE trainer (`cavmae.train`); this package's own modules are the commands that compose preprocess and
train, which never import each other.

The three sub-packages live in the top-level folders `preprocess/`, `shards/` and `train/` (the layout the project
keeps). An installed cavmae holds them inside this package (setuptools' `package-dir`); in a source checkout used
without installing (PYTHONPATH=checkout, a GPU box with the tree copied over) this package's search path is
extended with the checkout's root so that `cavmae.train` is `train/` there too. Nothing is installed at the top level
of site-packages but `cavmae`.
"""

from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parent.parent
if all((_checkout / name / "__init__.py").is_file() for name in ("preprocess", "shards", "train")):
    __path__.append(str(_checkout))  # noqa: F821  (a package's module search path)
