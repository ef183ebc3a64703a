"""The names of what a deploy writes into a Triton model repository, besides each model's ``config.pbtxt``.

One place for them, below every module that reads or writes a repository (the writer, the served models, the
server launcher), so none of those has to import another for a file name.
"""

from __future__ import annotations

RECORD = "atedm-deploy.json"  # what a deploy wrote into the folder: the mark that lets --force replace it
README = "README.md"
BUILD_FOLDER = "build"  # in each version folder of the router: that version's manifest (and onnxruntime's graphs)
#: A file, not a folder, named as Python's bytecode cache, in every Python model's version folder: Python cannot
#: write its cache there, so the version's files never change after deploy and Triton never reloads a serving
#: version when its model is loaded again (``server``'s notes).
BYTECODE_GUARD = "__pycache__"
BYTECODE_GUARD_TEXT = ("atedm-export deploy: a file where Python would write its bytecode cache, so that serving never\n"
                       "changes this version folder (Triton reloads a version whose files changed).\n")
