"""diffmem: find, explain and remove memorization in diffusion models.

Installed, the repository is this one package: ``diffmem.common`` (the library, with its two wings
``diffmem.common.t2i`` and ``diffmem.common.edm``) and the CLI folders ``diffmem.detect``,
``diffmem.mitigate``, ``diffmem.finetune`` and ``diffmem.data``; the import path mirrors the
repository path.
"""

from diffmem.common import __version__  # noqa: F401
