"""The minimal pack that ``python -m vision_ft new-domain NAME`` copies by default.

One sample generator, one datamodule, one config, one dataset card, one test and a TODO list, all
named after a placeholder pack name that the scaffold replaces with the new pack's name everywhere
(file names, module paths, class names, text). The files are a runnable pack in their own right:
the scaffold test fits a copy of them offline.
"""

from pathlib import Path

#: the folder holding the template's files
ROOT = Path(__file__).resolve().parent
#: the placeholder name in the template's files (lower case; ``Starter`` / ``STARTER`` in other cases)
NAME = "starter"
